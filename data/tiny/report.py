"""Glue for `run.sh tiny`: split the AI-feedback pairs into train/test, and write the run's summary.

    python data/tiny/report.py split PAIRS.jsonl OUT_DIR [--test_fraction 0.1]
    python data/tiny/report.py summary RUN_DIR --seconds S

The summary scores the SFT and DPO models' greedy answers to the held-out prompts (feedback.py run with one
answer per prompt at temperature 0 and the tasks' judge), and says honestly what changed: answer
correctness and each noise kind's rate before and after DPO (TINY.md: the gain is intent alignment, the
teacher's noise removed, not new capability).
"""

import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.tiny.tasks import answer_correct, classify  # noqa: E402
from data.tokenizer import atomic_write, write_jsonl  # noqa: E402

KINDS = ("correct", "disclaimer", "refusal", "format_slip", "wrong")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split(pairs_path, out_dir, test_fraction=0.1):
    # By a hash of the prompt id: stable across seeds of the sampler and across reruns.
    rows = read_jsonl(pairs_path)
    is_test = [int(hashlib.sha256(r["prompt_id"].encode()).hexdigest(), 16) % 1000 < 1000 * test_fraction
               for r in rows]
    test = [r for r, t in zip(rows, is_test) if t]
    train = [r for r, t in zip(rows, is_test) if not t]
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(out_dir, "test.jsonl"), test)
    print(f"{pairs_path}: {len(train)} train pairs, {len(test)} test pairs -> {out_dir}")


def score(raw_path):
    rows = read_jsonl(raw_path)
    kinds = {k: 0 for k in KINDS}
    total, correct, n = 0.0, 0, 0
    for r in rows:
        c = r["completions"][0]
        answer = c["response"] or ""
        total += c["mean_score"] or 0.0
        kinds[classify(r["instruction"], answer)] += 1
        correct += answer_correct(r["instruction"], answer)
        n += 1
    return {"score": total / n, "answer_correct": correct / n, "rates": {k: v / n for k, v in kinds.items()}, "n": n}


def summary(run_dir, seconds):
    sft = score(os.path.join(run_dir, "eval_sft", "raw.jsonl"))
    dpo = score(os.path.join(run_dir, "eval_dpo", "raw.jsonl"))
    metrics = read_jsonl(os.path.join(run_dir, "dpo", "metrics.jsonl"))
    evals = [m for m in metrics if "eval_rewards/accuracies" in m]
    out = {
        "sft_score": sft["score"], "dpo_score": dpo["score"],
        "dpo_eval_reward_accuracy": evals[-1]["eval_rewards/accuracies"] if evals else None,
        "n_eval_prompts": sft["n"], "seconds": seconds,
        "sft": sft, "dpo": dpo,
    }
    atomic_write(os.path.join(run_dir, "summary.json"), (json.dumps(out, indent=2) + "\n").encode())
    print(f"\n{'':24}{'SFT':>8}{'DPO':>8}")
    print(f"{'judge score':24}{sft['score']:8.3f}{dpo['score']:8.3f}")
    print(f"{'answer correct':24}{sft['answer_correct']:8.3f}{dpo['answer_correct']:8.3f}")
    for k in KINDS[1:]:
        print(f"{'  ' + k + ' rate':24}{sft['rates'][k]:8.3f}{dpo['rates'][k]:8.3f}")
    acc = out["dpo_eval_reward_accuracy"]
    print(f"\nDPO - SFT: {100 * (dpo['score'] - sft['score']):+.1f} points on {sft['n']} held-out prompts; "
          f"held-out reward accuracy {acc if acc is None else round(acc, 3)}; {seconds:.0f} s in all")
    print(f"wrote {os.path.join(run_dir, 'summary.json')}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("pairs")
    s.add_argument("out_dir")
    s.add_argument("--test_fraction", type=float, default=0.1)
    m = sub.add_parser("summary")
    m.add_argument("run_dir")
    m.add_argument("--seconds", type=float, required=True)
    a = p.parse_args()
    if a.cmd == "split":
        split(a.pairs, a.out_dir, a.test_fraction)
    else:
        summary(a.run_dir, a.seconds)
