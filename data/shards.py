"""
The on-disk format of tokenized examples: written by every data/<dataset>/prepare.py, read by the stages.

A split is four files in one directory:

    {split}.ids.bin    token ids of all examples back to back (uint16 when vocab_size <= 65536, else uint32)
    {split}.mask.bin   one uint8 per token: 1 where the token is trained on (its loss counts), else 0
    {split}.idx.npy    int64 offsets, n_examples + 1 of them: example i is tokens [idx[i], idx[i+1])
    {split}.json       format, version, dtype, counts, vocab_size, and whatever the prepare script adds
                       (tokenizer, sources, bad rows)

The .json is written last and is the commit marker: the reader refuses a split without it, and checks the
other three files against it, so a crash or a copy cut short never passes for a complete split. Little-endian
throughout (numpy's '<u2' etc.), so shards move between machines.

Preference pairs (data/ultrafeedback/prepare.py, read by dpo.py) are one split with the pairs interleaved:
example 2i is prompt + chosen answer of pair i, example 2i+1 prompt + rejected answer, the mask marking the
answer; the split's json says so ("kind": "preference_pairs", "n_pairs"). Nothing here knows about chat or
tokenizers.

Runtime imports: numpy, the standard library and files.py (no torch).
"""

import json
import operator
import os
import uuid

import numpy as np

from files import fsync_dir

FORMAT, VERSION = "zephyr-shards", 1
SUFFIXES = ("ids.bin", "mask.bin", "idx.npy", "json")


def ids_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def split_paths(directory, split):
    return {s: os.path.join(directory, f"{split}.{s}") for s in SUFFIXES}


# -----------------------------------------------------------------------------
# Writing

class ShardWriter:
    """
    Streams examples to temporary files beside the final ones; close(meta) renames them into place.

        with ShardWriter(out_dir, "train", tok.vocab_size) as w:
            for ids, mask in examples:
                w.add(ids, mask)
            w.close({"tokenizer": ...})

    Leaving the `with` block without close() (an exception, or a forgotten call) deletes the temporary
    files and leaves any earlier split of that name as it was. Only the offsets stay in memory
    (8 bytes per example).
    """

    def __init__(self, out_dir, split, vocab_size):
        if not split or os.sep in split or split.startswith("."):
            raise ValueError(f"split: expected a plain name like 'train', got {split!r}")
        if not isinstance(vocab_size, (int, np.integer)) or not 0 < vocab_size <= 1 << 32:
            raise ValueError(f"vocab_size: expected an int in [1, 2**32], got {vocab_size!r}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.split, self.vocab_size = out_dir, split, int(vocab_size)
        self.dtype = ids_dtype(self.vocab_size)
        self.paths = split_paths(out_dir, split)
        self.tmp = {}
        self.files = {}
        try:
            for s in ("ids.bin", "mask.bin"):
                self.tmp[s] = self._temp_name(s)
                self.files[s] = open(self.tmp[s], "wb")
        except BaseException:
            self.abort()
            raise
        self.offsets = [0]
        self.n_loss_tokens = 0
        self.closed = False

    def _temp_name(self, suffix):
        # A hidden, unique name in the same directory, so that os.replace is a rename on one filesystem.
        # Created with open(.., "x") rather than mkstemp, whose 0600 mode the renamed file would keep.
        path = os.path.join(self.out_dir, f".{self.split}.{suffix}.{uuid.uuid4().hex[:12]}.tmp")
        open(path, "xb").close()
        return path

    def add(self, ids, loss_mask):
        if self.closed:
            raise ValueError(f"{self.paths['json']}: add() after close()")
        n = len(self.offsets) - 1  # this example's index, for error messages
        ids, mask = np.asarray(ids), np.asarray(loss_mask)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"example {n}: ids: expected a non-empty 1-D integer sequence, got shape "
                             f"{ids.shape} dtype {ids.dtype}")
        if mask.shape != ids.shape:
            raise ValueError(f"example {n}: loss_mask: expected {ids.shape[0]} values like ids, got shape {mask.shape}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"example {n}: ids: {bad} is outside the vocabulary [0, {self.vocab_size})")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"example {n}: loss_mask: expected only 0 and 1, got {np.unique(mask)[:5].tolist()}")
        self.files["ids.bin"].write(ids.astype(self.dtype).tobytes())
        self.files["mask.bin"].write(mask.astype(np.uint8).tobytes())
        self.offsets.append(self.offsets[-1] + ids.size)
        self.n_loss_tokens += int(mask.sum())

    def close(self, meta=None):
        """Write idx and json and move all four files into place; the json goes last. Returns the json dict."""
        if self.closed:
            raise ValueError(f"{self.paths['json']}: close() called twice")
        meta = dict(meta or {})
        info = {
            "format": FORMAT, "version": VERSION, "dtype": self.dtype.str, "vocab_size": self.vocab_size,
            "n_examples": len(self.offsets) - 1, "n_tokens": self.offsets[-1], "n_loss_tokens": self.n_loss_tokens,
        }
        clash = sorted(set(info) & set(meta))
        if clash:
            raise ValueError(f"meta: keys {clash} are the format's own; name them differently")
        info.update(meta)
        try:
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            self.tmp["idx.npy"] = self._temp_name("idx.npy")
            with open(self.tmp["idx.npy"], "wb") as f:
                np.save(f, np.asarray(self.offsets, dtype="<i8"))
                f.flush()
                os.fsync(f.fileno())
            self.tmp["json"] = self._temp_name("json")
            with open(self.tmp["json"], "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            # Remove the old commit marker first: from here until the new one lands, the directory may hold
            # a mix of old and new data files, and without a json the reader refuses them all.
            if os.path.exists(self.paths["json"]):
                os.unlink(self.paths["json"])
                fsync_dir(self.out_dir)
            for s in SUFFIXES:
                os.replace(self.tmp[s], self.paths[s])
                del self.tmp[s]  # only once moved: abort() deletes whatever is still a temp file
            fsync_dir(self.out_dir)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        return info

    def abort(self):
        """Delete the temporary files; the split is not written (an earlier one of that name stays)."""
        for f in self.files.values():
            f.close()
        for path in self.tmp.values():
            if os.path.exists(path):
                os.unlink(path)
        self.files, self.tmp = {}, {}
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.closed:
            self.abort()
            if exc_type is None:
                raise RuntimeError(f"{self.paths['json']}: the writer left its `with` block without close(meta); "
                                   "nothing was written")
        return False


# -----------------------------------------------------------------------------
# Reading

class Shards:
    """
    A split, memory-mapped: len(s), s[i] -> (ids, mask) as read-only numpy views (ids in the file's dtype:
    convert before arithmetic that could overflow uint16), s.lengths (tokens per example), s.meta (the json).
    """

    def __init__(self, directory, split):
        paths = split_paths(directory, split)
        json_path = paths["json"]
        if not os.path.exists(json_path):
            raise FileNotFoundError(f"{json_path}: missing, so split {split!r} in {directory} is absent or was "
                                    "never finished (the json is written last); run the prepare script")
        try:
            with open(json_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{json_path}: not valid JSON ({e})") from None
        for key in ("format", "version", "dtype", "vocab_size", "n_examples", "n_tokens"):
            if key not in meta:
                raise ValueError(f"{json_path}: field {key!r} missing")
        if meta["format"] != FORMAT or meta["version"] != VERSION:
            raise ValueError(f"{json_path}: format {meta['format']!r} version {meta['version']!r}; this code "
                             f"reads {FORMAT!r} version {VERSION}")
        dtype = np.dtype(meta["dtype"])
        if dtype != ids_dtype(meta["vocab_size"]):
            raise ValueError(f"{json_path}: dtype {meta['dtype']} does not fit vocab_size {meta['vocab_size']}")
        n, n_tokens = meta["n_examples"], meta["n_tokens"]

        for s, want in (("ids.bin", n_tokens * dtype.itemsize), ("mask.bin", n_tokens)):
            if not os.path.exists(paths[s]):
                raise FileNotFoundError(f"{paths[s]}: missing ({json_path} describes it)")
            size = os.path.getsize(paths[s])
            if size != want:
                raise ValueError(f"{paths[s]}: {size} bytes, expected {want} ({n_tokens} tokens per {json_path}); "
                                 "truncated or from another run")
        if not os.path.exists(paths["idx.npy"]):
            raise FileNotFoundError(f"{paths['idx.npy']}: missing ({json_path} describes it)")
        try:
            idx = np.load(paths["idx.npy"], mmap_mode="r")
        except Exception as e:  # numpy raises several kinds for a cut-short .npy
            raise ValueError(f"{paths['idx.npy']}: unreadable ({e}); truncated or from another run") from None
        if idx.dtype != np.int64 or idx.shape != (n + 1,) or idx[0] != 0 or idx[-1] != n_tokens:
            raise ValueError(f"{paths['idx.npy']}: expected {n + 1} int64 offsets from 0 to {n_tokens} "
                             f"(per {json_path}), got shape {idx.shape} dtype {idx.dtype}")
        self.lengths = np.diff(idx)
        if (self.lengths < 0).any():
            raise ValueError(f"{paths['idx.npy']}: offsets decrease at example {int(np.argmax(self.lengths < 0))}")

        self.directory, self.split, self.meta, self.paths = directory, split, meta, paths
        self.idx = np.asarray(idx)
        # np.memmap refuses empty files; an empty split is legitimate (everything filtered out).
        if n_tokens:
            self.ids = np.memmap(paths["ids.bin"], dtype=dtype, mode="r")
            self.mask = np.memmap(paths["mask.bin"], dtype=np.uint8, mode="r")
        else:
            self.ids, self.mask = np.zeros(0, dtype), np.zeros(0, np.uint8)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        i, n = operator.index(i), len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.paths['json']}: example {i} out of range for {n} examples")
        i %= n
        a, b = self.idx[i], self.idx[i + 1]
        return self.ids[a:b], self.mask[a:b]
