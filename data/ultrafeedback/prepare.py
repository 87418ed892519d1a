"""
Tokenize ultrafeedback_binarized (or feedback.py's pairs.jsonl, which has the same schema) into preference
shards for dpo.py: the format of data/shards.py, one split per input split, the pairs interleaved.

    # the dataset as downloaded from the Hub: DIR/data/train_prefs-*.parquet -> train, test_prefs-* -> test
    python data/ultrafeedback/prepare.py --tokenizer path/to/tokenizer.model --out out/data/ultrafeedback --input DIR
    # or files of your own: .parquet, .jsonl (one object per line) or .json (a list of objects)
    python data/ultrafeedback/prepare.py --tokenizer ... --out ... --train pairs.jsonl --test c.parquet

A row needs `prompt_id`, `chosen` and `rejected` (full conversations ending in the assistant's answer, the
same turns before it) and the numbers `score_chosen`, `score_rejected`; `prompt` and `messages` are ignored.
Pair i becomes two examples of the split:

    example 2i     BOS + prompt + chosen answer      prompt = the turns before the answer, rendered with the
    example 2i+1   BOS + prompt + rejected answer    Zephyr template and ending in '<|assistant|>\\n'

Both are the ids training sees for the whole conversation (Tokenizer.encode_chat), cut right after the
answer's </s>: the template's '\\n' after it is not part of the example (TRL appends EOS to the answer and
nothing else). The loss mask is 1 on the answer (content and </s>) only; earlier assistant turns of a
multi-turn prompt are prompt, mask 0. `{split}.prompt_ids.json` lists each pair's prompt_id, in order.

Too-long pairs are truncated by the rule of TRL's DPOTrainer as the alignment handbook ran it for Zephyr
(TRL 0.7, truncation_mode="keep_end", max_length 1024, max_prompt_length 512), on token counts where the
prompt includes BOS and each answer its </s>:

    1. longer = the longer of the two answers. If prompt + longer > max_length and the prompt is longer
       than max_prompt_length, the prompt keeps its last tokens: BOS + the last max_prompt_length - 1.
    2. If prompt + longer is still > max_length, BOTH answers are cut from the right to max_length -
       max_prompt_length tokens (also when the prompt was shorter than max_prompt_length and more would fit,
       and also the shorter answer, if it is that long). A cut answer loses its </s>.

The one deliberate difference is BOS: here every example starts with it, as in SFT and at inference. TRL 0.7
tokenized with add_special_tokens=False and gave the sequences no BOS at all; later versions prepend one and
then keep the last max_prompt_length tokens, so a cut prompt loses it. We keep it and count it: the lengths
are TRL's.

A row that cannot be used is reported on stderr with its file, row number and reason, skipped, and
counted by reason in the summary and in the split's json; --strict makes the first one fatal. Row numbers
are 1-based: the line number in a .jsonl, the position in a .json list or a parquet file.

Runtime imports: numpy, tqdm, the standard library, data/ (and pyarrow, only for parquet files).
"""

import argparse
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python data/ultrafeedback/prepare.py`: make `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from files import atomic_write
from data.shards import ShardWriter
from data.tokenizer import Tokenizer, check_messages
from data.ultrachat.prepare import (BLOCK, BadRow, BadRows, DataError, hub_files, iter_rows,
                                    open_inputs, parquet_rows)

COLUMNS = ("prompt_id", "chosen", "rejected", "score_chosen", "score_rejected")


# -----------------------------------------------------------------------------
# Reading rows

def read_rows(path):
    """(row_number, row or BadRow) for each row of `path`; parquet reads only COLUMNS."""
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
    else:
        yield from iter_rows(path)  # .jsonl / .json, with bad lines as BadRow


def _parquet_rows(path):
    # Only the columns we use: `messages` repeats `chosen` and would double the memory.
    def check(names):
        missing = [c for c in COLUMNS if c not in names]
        return f"no column {', '.join(map(repr, missing))}" if missing else None
    return parquet_rows(path, COLUMNS, check)


# -----------------------------------------------------------------------------
# Checking and tokenizing one pair

def check_row(row):
    """(prompt turns, chosen, rejected) if the row is a pair we can train on, else raise BadRow saying why."""
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"expected an object with {', '.join(COLUMNS)}, got {type(row).__name__}")
    for field in COLUMNS:
        if row.get(field) is None:
            raise BadRow("missing_field", f"field '{field}' missing")
    if not isinstance(row["prompt_id"], str):
        raise BadRow("wrong_type", f"field 'prompt_id': expected a string, got {type(row['prompt_id']).__name__}")
    for field in ("score_chosen", "score_rejected"):
        x = row[field]
        # bool is an int to Python, and a NaN would turn the split's mean score into NaN.
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise BadRow("wrong_type", f"field '{field}': expected a finite number, got {str(x)[:40]!r}")
    for field in ("chosen", "rejected"):
        try:
            check_messages(row[field])  # the template's own rules: roles, types, system first only
        except ValueError as e:
            raise BadRow("invalid_messages", f"field '{field}': {e}") from None
        if row[field][-1]["role"] != "assistant":
            raise BadRow("last_turn_not_assistant", f"field '{field}': the last turn is a {row[field][-1]['role']} "
                                                    "turn; expected the assistant's answer")
    chosen, rejected = row["chosen"], row["rejected"]
    if [(m["role"], m["content"]) for m in chosen[:-1]] != [(m["role"], m["content"]) for m in rejected[:-1]]:
        raise BadRow("prompt_mismatch", "the turns before the answer differ between 'chosen' and 'rejected'")
    # A generation prompt after anything but a user turn is not what the model is asked at inference.
    if len(chosen) < 2 or chosen[-2]["role"] != "user":
        before = f"a {chosen[-2]['role']} turn" if len(chosen) > 1 else "nothing"
        raise BadRow("prompt_not_ending_with_user", f"the answer follows {before}; expected a user turn")
    for field in ("chosen", "rejected"):
        if not row[field][-1]["content"].strip():
            raise BadRow("empty_answer", f"field '{field}': the answer is empty or whitespace")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise BadRow("identical_answers", "'chosen' and 'rejected' give the same answer: nothing to prefer")
    return chosen[:-1], chosen, rejected


def encode_pair(row, tok, max_prompt_length=512, max_length=1024):
    """
    The row's two examples: {"prompt_id", "scores": (chosen, rejected), "chosen": (ids, mask),
    "rejected": (ids, mask), "truncated": {"prompt", "chosen", "rejected"} (bools)}. ids int32, mask uint8
    numpy arrays. Raises BadRow.
    """
    prompt_turns, chosen, rejected = check_row(row)
    prompt, _ = tok.encode_chat(prompt_turns, add_generation_prompt=True)
    answers = {}
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        ids, _ = tok.encode_chat(conversation)
        # Cut after the answer's </s>, the last EOS: only the template's '\n' (with legacy '▁' '\n') follows it.
        ids = ids[:len(ids) - ids[::-1].index(tok.eos_id)]
        # Equal by construction (no piece crosses the '\n' after <|assistant|>); if ever not, the mask
        # would be off by some tokens, so refuse the row rather than train on a misaligned answer.
        if ids[:len(prompt)] != prompt:
            raise BadRow("prompt_tokens_differ", f"'{name}' tokenizes its prompt differently from the prompt alone")
        answers[name] = ids[len(prompt):]

    # The handbook-era TRL rule (DPOTrainer, truncation_mode="keep_end"; see the module docstring), decided on
    # the longer answer so that both examples keep the same prompt.
    longer = max(len(a) for a in answers.values())
    truncated = {"prompt": False}
    if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
        prompt = prompt[:1] + prompt[len(prompt) - (max_prompt_length - 1):]  # BOS, then the prompt's end
        truncated["prompt"] = True
    keep = max_length - max_prompt_length if len(prompt) + longer > max_length else longer
    out = {"prompt_id": row["prompt_id"], "scores": (row["score_chosen"], row["score_rejected"])}
    for name, answer in answers.items():
        truncated[name] = len(answer) > keep
        answer = answer[:keep]  # a cut answer loses its </s>, as in TRL
        out[name] = (np.asarray(prompt + answer, np.int32),
                     np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(answer), np.uint8)]))
    out["truncated"] = truncated
    return out


_worker_tokenizer = None  # each pool worker's own copy (a SentencePieceProcessor does not pickle)


def _init_worker(model_path, legacy):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path, legacy=legacy)


def _encode(item, max_prompt_length, max_length, tok=None):
    """(row_number, row) -> (row_number, encode_pair's dict) or (row_number, BadRow)."""
    row_number, row = item
    try:
        if isinstance(row, BadRow):
            raise row
        return row_number, encode_pair(row, tok or _worker_tokenizer, max_prompt_length, max_length)
    except BadRow as bad:
        return row_number, bad


# -----------------------------------------------------------------------------
# Files -> one split

def _encoded_rows(files, encode, pool):
    """(path, row_number, pair dict or BadRow) for every row of `files`, in order."""
    for path in files:
        rows = read_rows(path)
        # A block at a time: pool.imap over a whole file would read all of it into memory ahead of the workers.
        while block := list(itertools.islice(rows, BLOCK)):
            for row_number, result in (pool.imap(encode, block, chunksize=16) if pool else map(encode, block)):
                yield path, row_number, result


def prepare(files, tokenizer_path, out_dir, split, max_prompt_length=512, max_length=1024, strict=False,
            workers=1):
    """
    Tokenize the pairs in `files`, in order, into split `split` of `out_dir` and `{split}.prompt_ids.json`;
    returns the split's json (counts, bad rows by reason, truncations, sources). Bad rows go to stderr;
    with strict the first raises DataError and nothing is written.
    """
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length, max_length: expected 1 <= max_prompt_length < max_length, "
                         f"got {max_prompt_length}, {max_length}")
    tok, tokenizer_info, sources = open_inputs(files, tokenizer_path)

    bad, rows_read = BadRows(strict), 0
    prompt_ids, score_sums, truncated = [], np.zeros(2), Counter(prompt=0, chosen=0, rejected=0)
    # spawn, not fork: the parent may hold threads (pyarrow's pool, tqdm's monitor), which fork does not copy.
    pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok.model_path, tok.legacy))
            if workers > 1 else None)
    encode = functools.partial(_encode, max_prompt_length=max_prompt_length, max_length=max_length,
                               tok=None if pool else tok)
    try:
        with ShardWriter(out_dir, split, tok.vocab_size) as writer, \
                tqdm(desc=f"{split} rows", unit=" rows", mininterval=1.0) as bar:
            for path, row_number, result in _encoded_rows(files, encode, pool):
                rows_read += 1
                bar.update()
                if isinstance(result, BadRow):
                    bad.add(path, row_number, result)
                    continue
                writer.add(*result["chosen"])   # example 2i
                writer.add(*result["rejected"])  # example 2i + 1
                prompt_ids.append(result["prompt_id"])
                score_sums += result["scores"]
                truncated.update(k for k, v in result["truncated"].items() if v)

            # The side file before the split's json, which commits the split: its sha256 goes in there, so a
            # prompt_ids file left from another run is recognisable.
            n = len(prompt_ids)
            ids_file = os.path.join(out_dir, f"{split}.prompt_ids.json")
            ids_bytes = (json.dumps(prompt_ids, ensure_ascii=False) + "\n").encode("utf-8")
            atomic_write(ids_file, ids_bytes)
            info = writer.close({
                "kind": "preference_pairs",
                "layout": "example 2i = prompt + chosen answer of pair i, 2i+1 = prompt + rejected answer",
                "template": "zephyr", "loss_on": "the answer: last assistant turn's content and its </s>",
                "n_pairs": n, "max_prompt_length": max_prompt_length, "max_length": max_length,
                "n_truncated": dict(truncated),
                "score_chosen_mean": float(score_sums[0] / n) if n else None,
                "score_rejected_mean": float(score_sums[1] / n) if n else None,
                "prompt_ids": {"file": os.path.basename(ids_file), "sha256": hashlib.sha256(ids_bytes).hexdigest()},
                "tokenizer": tokenizer_info, "sources": sources, "rows_read": rows_read, **bad.info(),
            })
    finally:
        if pool is not None:
            pool.terminate()

    skipped = ", ".join(f"{k} {v}" for k, v in info["bad_rows"].items()) or "none"
    cut = ", ".join(f"{k} {v}" for k, v in info["n_truncated"].items())
    print(f"{split}: {n:,} pairs ({info['n_tokens']:,} tokens, {info['n_loss_tokens']:,} trained on) from "
          f"{rows_read:,} rows; truncated: {cut}; bad rows skipped: {skipped}")
    print(f"{split}: wrote {os.path.join(out_dir, split)}.{{ids.bin,mask.bin,idx.npy,json,prompt_ids.json}}")
    return info


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize ultrafeedback_binarized-style pairs into DPO shards.")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model, or a directory holding it")
    p.add_argument("--out", required=True, help="output directory for {split}.ids.bin, .mask.bin, .idx.npy, "
                                                ".json, .prompt_ids.json")
    p.add_argument("--input", help="ultrafeedback_binarized as downloaded (data/train_prefs-*.parquet, "
                                   "data/test_prefs-*.parquet)")
    p.add_argument("--train", nargs="+", default=[], help=".parquet/.jsonl/.json files for the train split")
    p.add_argument("--test", nargs="+", default=[], help=".parquet/.jsonl/.json files for the test split")
    p.add_argument("--max_prompt_length", type=int, default=512, help="prompt tokens kept (from the end) when "
                                                                      "a pair is longer than max_length")
    p.add_argument("--max_length", type=int, default=1024, help="tokens per example at most")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is the same for any number)")
    args = p.parse_args(argv)

    splits = {"train": list(args.train), "test": list(args.test)}
    if args.input:
        if not os.path.isdir(args.input):
            p.error(f"--input {args.input}: not a directory")
        for split, name in (("train", "train_prefs"), ("test", "test_prefs")):
            splits[split] += hub_files(args.input, name)
        if not hub_files(args.input, "train_prefs") and not hub_files(args.input, "test_prefs"):
            p.error(f"--input {args.input}: no train_prefs-*.parquet or test_prefs-*.parquet in it or in its data/")
    if not any(splits.values()):
        p.error("nothing to do: give --input DIR, or --train/--test FILES")
    if args.workers < 1:
        p.error(f"--workers: expected at least 1, got {args.workers}")
    if not 1 <= args.max_prompt_length < args.max_length:
        p.error(f"expected 1 <= --max_prompt_length < --max_length, got {args.max_prompt_length}, {args.max_length}")
    try:
        for split, files in splits.items():
            if files:
                prepare(files, args.tokenizer, args.out, split, max_prompt_length=args.max_prompt_length,
                        max_length=args.max_length, strict=args.strict, workers=args.workers)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
