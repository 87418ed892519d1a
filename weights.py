"""Hugging Face-format weight files: CheckpointReader reads each tensor (or only some of its rows) from
model.safetensors or from shards with an index, checking sizes and names first; save_checkpoint streams
(name, tensor) pairs into a sharded HF directory that is swapped into place whole. model.py's
from_pretrained / save_pretrained and common.py's sharded loading and export use them.
"""

import json
import os
import shutil
import tempfile

from safetensors import safe_open
from safetensors.torch import save_file

from files import write_json

# -----------------------------------------------------------------------------
# Hugging Face checkpoint files


class CheckpointReader:
    """Tensors of an HF checkpoint directory: one model.safetensors, or shards + model.safetensors.index.json.
    Reads lazily (safetensors memory-maps), so a rank can take just its slice of each tensor."""

    def __init__(self, path):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{index}: not a safetensors index with a weight_map ({e})") from None
            self.files = {name: os.path.join(path, fn) for name, fn in weight_map.items()}
        elif os.path.exists(single):
            self.files = None
            self.single = single
        else:
            pickled = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
            what = os.path.join(path, pickled[0]) if pickled else path
            raise FileNotFoundError(f"{what}: refused: weights load only from safetensors (model.safetensors or "
                                    "model.safetensors.index.json); pickled .bin/.pt files can run code when read")
        self._handles = {}
        if self.files is None:
            self.files = {name: single for name in self._open(single).keys()}
        for fn in sorted(set(self.files.values())):
            if not fn.endswith(".safetensors"):
                raise ValueError(f"{index}: shard {os.path.basename(fn)} is not a .safetensors file; only "
                                 "safetensors weights are loaded (pickled .bin/.pt files can run code when read)")
            if not os.path.exists(fn):
                raise FileNotFoundError(f"{path}: shard {os.path.basename(fn)} named in the index is missing")
        self.names = sorted(self.files)

    def _open(self, fn):
        if fn not in self._handles:
            declared, actual = _safetensors_size(fn), os.path.getsize(fn)
            if declared is not None and declared != actual:
                raise ValueError(f"{fn}: truncated or damaged: its header declares {declared} bytes, the file "
                                 f"has {actual} (an interrupted copy or export?)")
            try:
                self._handles[fn] = safe_open(fn, framework="pt")
            except Exception as e:
                raise ValueError(f"{fn}: cannot read as safetensors ({e})") from None
        return self._handles[fn]

    def shape(self, name):
        return tuple(self._open(self.files[name]).get_slice(name).get_shape())

    def get(self, name, dtype=None, device="cpu", rows=None):
        # rows=(start, stop): only that slice of dim 0 is read from disk.
        f = self._open(self.files[name])
        if name not in f.keys():
            raise KeyError(f"{self.files[name]}: tensor {name} named in the index is not in the file")
        t = f.get_slice(name)[rows[0]:rows[1]] if rows is not None else f.get_tensor(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def check_against(self, model):
        # Every name and shape, before any weight is read: errors name the file and the tensor.
        expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        missing = sorted(set(expected) - set(self.files))
        unexpected = sorted(set(self.files) - set(expected) - {"lm_head.weight"})
        if missing:
            raise KeyError(f"{self.path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        if unexpected:
            raise KeyError(f"{self.path}: checkpoint has tensors this model does not, e.g. {unexpected[:3]} "
                           "(another architecture?)")
        for name, shp in expected.items():
            got = self.shape(name)
            if got != shp:
                raise ValueError(f"{self.files[name]}: tensor {name} has shape {got}, the config says {shp}")


def _safetensors_size(fn):
    # The size a safetensors file's header declares: 8 bytes (header length), the JSON header, then the
    # tensors' data up to the largest end offset. None where the header itself cannot be read.
    try:
        with open(fn, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 100 * 2**20:  # safetensors' own limit on the header
                return None
            header = json.loads(f.read(n))
        return 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def local_rows(p):
    """(start, stop) of dim 0 that this rank holds of a Shard(0) DTensor: the rows to read for it."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0], offset[0] + shape[0]


def save_checkpoint(path, cfg, named_tensors, tokenizer=None, max_shard_bytes=5 * 10**9):
    """Write an HF-format directory from an iterable of (name, tensor), streaming: a shard is written as
    soon as it is full, so a caller gathering an FSDP model tensor by tensor never holds the whole model.
    Everything goes into a temporary directory that is renamed into place at the end."""
    if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                         f"{cfg.vocab_size}: they do not belong together")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # left by an export that was killed midway
        if stale.startswith(os.path.basename(path) + ".tmp-"):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        shards, current, size, total = [], {}, 0, 0

        def flush():
            nonlocal current, size
            if current:
                fn = f"shard-{len(shards):05d}.safetensors"
                save_file(current, os.path.join(tmp, fn), metadata={"format": "pt"})
                shards.append((fn, list(current)))
                current, size = {}, 0

        for name, t in named_tensors:
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            t = t.detach().to("cpu").contiguous()
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = t
            size += nbytes
            total += nbytes
        flush()
        weight_map = {}
        if len(shards) == 1:
            os.rename(os.path.join(tmp, shards[0][0]), os.path.join(tmp, "model.safetensors"))
        else:
            for i, (fn, names) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.rename(os.path.join(tmp, fn), os.path.join(tmp, final))
                weight_map.update({n: final for n in names})
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json(os.path.join(tmp, "config.json"), cfg.to_hf_dict())
        write_json(os.path.join(tmp, "generation_config.json"),
                     {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # Swap into place: the old directory (if any) is removed only after the new one is complete.
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        e.add_note(f"export to {path} failed: its partial files are removed and {path} is as it was before")
        raise
