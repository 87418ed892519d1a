"""prepare.py throughput and sft.py's packing fill on ultrachat-shaped data (not a pytest test).

    python tests/bench_prepare.py --alpaca alpaca_eval-0.6.6/example/outputs.json [--rows 20000] [--workers 1 2]

Ultrachat-shaped data from real instruction/answer text: each row is three (instruction, output) pairs of
AlpacaEval's example outputs (805 of them, `example/outputs.json` in the alpaca_eval 0.6.6 sdist:
`pip download --no-deps --no-binary :all: alpaca_eval==0.6.6`) drawn with a fixed seed, as a three-turn
ultrachat_200k row (`prompt`, `prompt_id`, `messages`); ~424 tokens each with the Mistral v1 tokenizer (from
mistral-common). For each --workers value, prepare.py runs as a user runs it (a subprocess, jsonl in, shards
out); the wall time gives rows/s and tokens/s, extrapolated linearly to ultrachat_200k's 207,865 train rows
(whose dialogues are longer: tokens/s is the better guide there). Then the fill of the rows of seq_len tokens:
sft.py's best-fit decreasing packing against the greedy in-order packing it replaced.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.shards import Shards  # noqa: E402
from sft import Plan  # noqa: E402

ULTRACHAT_200K_TRAIN_ROWS = 207_865


def ultrachat_rows(alpaca_path, n, seed=0):
    with open(alpaca_path) as f:
        pairs = [(r["instruction"], r["output"]) for r in json.load(f)]
    rng = np.random.default_rng(seed)
    for k in range(n):
        messages = []
        for i in rng.choice(len(pairs), 3, replace=False):
            messages += [{"role": "user", "content": pairs[i][0]}, {"role": "assistant", "content": pairs[i][1]}]
        yield {"prompt": messages[0]["content"], "prompt_id": f"{k:06d}", "messages": messages}


def greedy_in_order_fill(lengths, seq_len, seed):
    # sft.py's packing before best-fit decreasing: a shuffled order, each row filled until the next one won't fit.
    rows, used = 0, seq_len + 1
    for n in np.minimum(lengths[np.random.default_rng([seed, 0]).permutation(len(lengths))], seq_len).tolist():
        if used + n > seq_len:
            rows, used = rows + 1, 0
        used += n
    return np.minimum(lengths, seq_len).sum() / (rows * seq_len), rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpaca", required=True, help="alpaca_eval 0.6.6's example/outputs.json")
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizer", default="", help="default: the Mistral v1 tokenizer.model in mistral-common")
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--global_batch_size", type=int, default=128)
    a = ap.parse_args()
    tokenizer = a.tokenizer
    if not tokenizer:
        import mistral_common
        tokenizer = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    print(f"cpu cores: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "ultrachat_shaped.jsonl")
        with open(src, "w") as f:
            for row in ultrachat_rows(a.alpaca, a.rows):
                f.write(json.dumps(row) + "\n")
        lengths = None
        for w in a.workers:
            out = os.path.join(tmp, f"out{w}")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "data/ultrachat/prepare.py", "--tokenizer", tokenizer, "--out", out,
                            "--train", src, "--workers", str(w)], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            shards = Shards(out, "train")
            n_rows, n_tokens = len(shards), int(shards.meta["n_tokens"])
            if lengths is None:
                lengths = shards.lengths.copy()
            assert np.array_equal(lengths, shards.lengths), "output differs between worker counts"
            print(f"prepare.py --workers {w}: {n_rows} rows, {n_tokens} tokens ({n_tokens / n_rows:.0f}/row) in "
                  f"{wall:.1f} s: {n_rows / wall:,.0f} rows/s, {n_tokens / wall:,.0f} tokens/s; "
                  f"{ULTRACHAT_200K_TRAIN_ROWS:,} rows at this rate: "
                  f"{ULTRACHAT_200K_TRAIN_ROWS / (n_rows / wall):,.0f} s; "
                  f"load average after: {os.getloadavg()[0]:.2f}")

    before, before_rows = greedy_in_order_fill(lengths, a.seq_len, 42)
    plan = Plan(lengths, a.seq_len, True, 42, a.global_batch_size)
    bound = -(-int(np.minimum(lengths, a.seq_len).sum()) // a.seq_len)  # ceil(tokens / seq_len)
    print(f"fill at seq_len {a.seq_len}: greedy in-order {before:.2%} ({before_rows} rows), best-fit decreasing "
          f"{plan.fill:.2%} ({len(plan.rows)} rows, lower bound {bound}); "
          f"{plan.steps_per_epoch} steps/epoch of {a.global_batch_size} rows, {plan.leftover} left over")


if __name__ == "__main__":
    main()
