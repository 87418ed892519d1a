"""
Tokenize ultrachat_200k (or any files in its schema) into SFT shards: the format of data/shards.py, each
conversation rendered with the Zephyr template, loss on the assistant turns only.

    # the dataset as downloaded from the Hub: DIR/data/train_sft-*.parquet -> train, test_sft-* -> test
    python data/ultrachat/prepare.py --tokenizer path/to/tokenizer.model --out out/data/ultrachat --input DIR
    # or files of your own: .parquet, .jsonl (one object per line) or .json (a list of objects)
    python data/ultrachat/prepare.py --tokenizer ... --out ... --train a.jsonl b.parquet --test c.json

A row needs only `messages`, a list of {role, content} with role system (first only), user or assistant;
`prompt` and `prompt_id` are ignored. A row with a `text` string instead (and no `messages`) is plain text for
pre-training a base model (run.sh tiny's base stage): BOS + text + EOS, no template, loss on every token.
A row that cannot be trained on is reported on stderr with its file, row number and reason, skipped, and
counted by reason in the summary and in the split's json; --strict makes the first one fatal. Row numbers
are 1-based: the line number in a .jsonl, the position in a .json list or a parquet file.

Runtime imports: numpy, tqdm, the standard library, data/ (and pyarrow, only for parquet files).
"""

import argparse
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python data/ultrachat/prepare.py`: make `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.shards import ShardWriter
from data.tokenizer import ROLES, Tokenizer, load_tokenizer as load_any_tokenizer

BLOCK = 1024           # rows in flight at once: bounds memory whatever the file size
KEEP_BAD_MESSAGES = 100  # the first bad-row messages are kept in the split's json too


class DataError(ValueError):
    """Input we cannot use, with a message naming the file (and row): a whole file, or a row under --strict."""


class BadRow(Exception):
    """A row that is skipped: counted under `reason`, explained by `detail`. (Both in args, so it pickles.)"""

    def __init__(self, reason, detail):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class BadRows:
    """The bad rows of a split: each reported on stderr as file: row N: reason: detail, counted by reason, the
    first KEEP_BAD_MESSAGES messages kept for the split's json; with strict the first one is fatal."""

    def __init__(self, strict):
        self.strict, self.counts, self.messages = strict, Counter(), []

    def add(self, path, row_number, bad):
        message = f"{path}: row {row_number}: {bad.reason}: {bad.detail}"
        if self.strict:
            raise DataError(message)
        self.counts[bad.reason] += 1
        if len(self.messages) < KEEP_BAD_MESSAGES:
            self.messages.append(message)
        tqdm.write(f"skipped {message}", file=sys.stderr)

    def info(self):
        return {"n_bad_rows": sum(self.counts.values()), "bad_rows": dict(sorted(self.counts.items())),
                "first_bad_rows": self.messages}


# -----------------------------------------------------------------------------
# Reading rows

def iter_rows(path):
    """
    Yield (row_number, row) for each row of a .parquet, .jsonl or .json file, in order; row is the parsed
    JSON value, or a BadRow when the row cannot even be parsed (a .jsonl line that is not UTF-8 or not
    JSON). A file that cannot be read at all raises DataError.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
    elif path.endswith(".jsonl"):
        yield from _jsonl_rows(path)
    elif path.endswith(".json"):
        # HF datasets' to_json writes JSON lines even under a .json name: the first byte tells which.
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        yield from (_jsonl_rows(path) if head.startswith(b"{") else _json_list_rows(path))
    else:
        raise DataError(f"{path}: unknown file type; expected .parquet, .jsonl or .json")


def _jsonl_rows(path):
    with open(path, "rb") as f:  # bytes, so that one line of bad UTF-8 is one bad row, not a dead file
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue  # a blank line (e.g. a trailing newline) is not a row
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_number, BadRow("invalid_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)")
                continue
            try:
                yield line_number, json.loads(text)
            except json.JSONDecodeError as e:
                yield line_number, BadRow("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})")


def _json_list_rows(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSON lines), got a {type(rows).__name__}")
    yield from enumerate(rows, 1)


def parquet_rows(path, columns, check_columns):
    """(row number, row dict) for the wanted `columns` of a parquet file that it has, read a batch at a time
    (unread columns would only cost memory). check_columns(names) returns what is wrong with the file's
    columns, or None. Shared by every reader of parquet data in data/."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                        "or give the data as .jsonl") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    problem = check_columns(names)
    if problem:
        raise DataError(f"{path}: {problem} (columns: {', '.join(names)})")
    row_number = 0
    for batch in pf.iter_batches(batch_size=BLOCK, columns=[c for c in columns if c in names]):
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row  # a null cell comes as None, reported as missing by the caller's checks


def _parquet_rows(path):
    # Only `messages`: the other columns (prompt) would double the memory for nothing.
    return parquet_rows(path, ["messages"], lambda names: None if "messages" in names else "no 'messages' column")


# -----------------------------------------------------------------------------
# Checking and tokenizing one row

def check_message(i, m):
    """messages[i] is an object with a role and a content, else BadRow."""
    if not isinstance(m, dict):
        raise BadRow("bad_message", f"messages[{i}]: expected an object with 'role' and 'content', "
                                    f"got {type(m).__name__}")
    for field in ("role", "content"):
        if m.get(field) is None:
            raise BadRow("missing_field", f"messages[{i}]['{field}'] missing")


def check_utf8(text, where):
    """A JSON-escaped lone surrogate ("\\ud800") decodes to a str that no tokenizer or UTF-8 file can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRow("invalid_unicode", f"{where}: lone surrogate at {e.start}") from None


def check_row(row):
    """The row's messages if it is a conversation we can train on, its text (a str) if it is a plain-text row,
    else raise BadRow saying why."""
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"expected an object with 'messages', got {type(row).__name__}")
    if "messages" not in row and "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise BadRow("bad_text", "field 'text': expected a non-empty string")
        check_utf8(row["text"], "field 'text'")
        return row["text"]
    messages = row.get("messages")
    if messages is None:
        raise BadRow("missing_field", "field 'messages' missing")
    if not isinstance(messages, list):
        raise BadRow("messages_not_a_list", f"field 'messages': expected a list, got {type(messages).__name__}")
    if not messages:
        raise BadRow("empty_conversation", "field 'messages' is an empty list")
    for i, m in enumerate(messages):
        check_message(i, m)
        if m["role"] not in ROLES:
            raise BadRow("unknown_role", f"messages[{i}]['role']: expected one of {', '.join(ROLES)}, "
                                         f"got {str(m['role'])[:40]!r}")
        if not isinstance(m["content"], str):
            raise BadRow("content_not_a_string", f"messages[{i}]['content']: expected a string, "
                                                 f"got {type(m['content']).__name__}")
        check_utf8(m["content"], f"messages[{i}]['content']")
        if m["role"] == "system" and i > 0:
            raise BadRow("system_not_first", f"messages[{i}]['role']: a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant_turn", "no assistant turn, so nothing to train on")
    return messages


_worker_tokenizer = None  # each pool worker's own copy (a SentencePieceProcessor does not pickle)


def _init_worker(model_path, legacy):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path, legacy=legacy)


def _encode(item, tok=None):
    """(row_number, row) -> (row_number, (ids, mask)) or (row_number, BadRow)."""
    row_number, row = item
    try:
        if isinstance(row, BadRow):
            raise row
        tok = tok or _worker_tokenizer
        checked = check_row(row)
        if isinstance(checked, str):  # plain text: every token after BOS is a target (mask 1 everywhere)
            ids = tok.encode(checked, bos=True, eos=True)
            mask = [1] * len(ids)
        else:
            ids, mask = tok.encode_chat(checked)
    except BadRow as bad:
        return row_number, bad
    return row_number, (np.asarray(ids, np.int32), np.asarray(mask, np.uint8))


# -----------------------------------------------------------------------------
# Files -> one split

def load_tokenizer(path):
    """data.tokenizer.load_tokenizer (the one loader every script uses), with a missing path as a DataError."""
    try:
        return load_any_tokenizer(path)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None


def open_inputs(files, tokenizer_path):
    """Fail on a missing input file before any work; then (tokenizer, what the split's json records of it and of
    each input file)."""
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
    tok = load_tokenizer(tokenizer_path)
    tokenizer_info = describe_file(tok.model_path) | {"legacy": tok.legacy, "vocab_size": tok.vocab_size}
    return tok, tokenizer_info, [describe_file(p) for p in files]


def describe_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _tokenized_rows(files, tok, pool):
    """(path, row_number, (ids, mask) or BadRow) for every row of `files`, in order."""
    for path in files:
        rows = iter_rows(path)
        # A block at a time: pool.imap over a whole file would read all of it into memory ahead of the workers.
        while block := list(itertools.islice(rows, BLOCK)):
            results = pool.imap(_encode, block, chunksize=16) if pool else (_encode(item, tok) for item in block)
            for row_number, result in results:
                yield path, row_number, result


def prepare(files, tokenizer_path, out_dir, split, strict=False, max_examples=None, workers=1):
    """
    Tokenize the rows of `files`, in order, into split `split` of `out_dir`; returns the split's json
    (counts, bad rows by reason, sources). Bad rows go to stderr; with strict the first raises DataError.
    workers > 1 starts processes with spawn, which re-imports the calling script: call it from under
    `if __name__ == "__main__":`.
    """
    tok, tokenizer_info, sources = open_inputs(files, tokenizer_path)

    bad, rows_read, n_written = BadRows(strict), 0, 0
    # spawn, not fork: the parent may hold threads (pyarrow's pool, tqdm's monitor), which fork does not copy.
    pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok.model_path, tok.legacy))
            if workers > 1 else None)
    try:
        with ShardWriter(out_dir, split, tok.vocab_size) as writer, \
                tqdm(desc=f"{split} rows", unit=" rows", mininterval=1.0) as bar:
            for path, row_number, result in _tokenized_rows(files, tok, pool):
                if max_examples is not None and n_written >= max_examples:
                    break
                rows_read += 1
                bar.update()
                if isinstance(result, BadRow):
                    bad.add(path, row_number, result)
                    continue
                writer.add(*result)
                n_written += 1
            info = writer.close({
                "template": "zephyr", "loss_on": "assistant turns (content and </s>); every token of a 'text' row",
                "tokenizer": tokenizer_info, "sources": sources, "rows_read": rows_read,
                "max_examples": max_examples, **bad.info(),
            })
    finally:
        if pool is not None:
            pool.terminate()

    skipped = ", ".join(f"{k} {v}" for k, v in info["bad_rows"].items()) or "none"
    print(f"{split}: {info['n_examples']:,} examples, {info['n_tokens']:,} tokens "
          f"({info['n_loss_tokens']:,} trained on) from {rows_read:,} rows; bad rows skipped: {skipped}")
    print(f"{split}: wrote {os.path.join(out_dir, split)}.{{ids.bin,mask.bin,idx.npy,json}}")
    return info


# -----------------------------------------------------------------------------
# Command line

def hub_files(directory, name):
    """ultrachat_200k as downloaded keeps its splits in data/{name}-00000-of-0000N-*.parquet."""
    for d in (os.path.join(directory, "data"), directory):
        found = sorted(glob.glob(os.path.join(d, f"{name}-*.parquet")))
        if found:
            return found
    return []


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize ultrachat_200k-style conversations into SFT shards.")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model, or a directory holding it")
    p.add_argument("--out", required=True, help="output directory for {split}.ids.bin, .mask.bin, .idx.npy, .json")
    p.add_argument("--input", help="ultrachat_200k as downloaded (data/train_sft-*.parquet, data/test_sft-*.parquet)")
    p.add_argument("--train", nargs="+", default=[], help=".parquet/.jsonl/.json files for the train split")
    p.add_argument("--test", nargs="+", default=[], help=".parquet/.jsonl/.json files for the test split")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--max_examples", type=int, help="stop each split after this many examples (quick runs)")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizing processes; the output is the same for any number (one process "
                        "does roughly 500 conversations of 1.5k tokens a second)")
    args = p.parse_args(argv)

    splits = {"train": list(args.train), "test": list(args.test)}
    if args.input:
        if not os.path.isdir(args.input):
            p.error(f"--input {args.input}: not a directory")
        found = {"train": hub_files(args.input, "train_sft"), "test": hub_files(args.input, "test_sft")}
        if not any(found.values()):
            p.error(f"--input {args.input}: no train_sft-*.parquet or test_sft-*.parquet in it or in its data/")
        for split, files in found.items():
            splits[split] += files
    if not any(splits.values()):
        p.error("nothing to do: give --input DIR, or --train/--test FILES")
    if args.workers < 1:
        p.error(f"--workers: expected at least 1, got {args.workers}")
    try:
        for split, files in splits.items():
            if files:
                prepare(files, args.tokenizer, args.out, split, strict=args.strict,
                        max_examples=args.max_examples, workers=args.workers)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
