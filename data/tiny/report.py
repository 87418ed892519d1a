"""Glue for `run.sh tiny`: split the AI-feedback pairs into train/test, turn the held-out prompts into an
MT-Bench question file, judge through eval.py with the tasks' judge, and write the run's summary.

    python data/tiny/report.py split PAIRS.jsonl OUT_DIR [--test_fraction 0.1]
    python data/tiny/report.py questions EVAL_PROMPTS.jsonl QUESTIONS.jsonl
    python data/tiny/report.py outputs ANSWERS.jsonl QUESTIONS.jsonl MODEL_OUTPUTS.json
    python data/tiny/report.py summary RUN_DIR --seconds S [--aif paper|on-policy] [--stages STAGES.tsv]
    python data/tiny/report.py chosen PAIRS_DIR OUT_DIR
    python data/tiny/report.py ablation RUN_DIR --seconds S --rows NAME=EVAL_DIR ... [--feedback NAME=DIR ...]
        [--stages STAGES.tsv]

The tiny "bench": the 500 held-out prompts as one-turn MT-Bench questions (category = the task), answered
greedily by eval.py and graded by `mt_bench_judge`, which reads the question and answer out of eval.py's
single-v1 prompt and returns the tasks' judge score (0, 0.5 or 1) as "Rating: [[s]]": the MT-Bench score of a
model is then its mean tasks-judge score. `pairwise_judge` plays AlpacaEval's annotator on the same answers
(DPO's against SFT's as the baseline): it scores both outputs and names the better, with even odds on a tie.

`ablation` (run.sh tiny-ablation) writes RUN_DIR/summary.json (rows, seconds; the tiny summary kept under "tiny")
and prints the paper's Table 3 in miniature: per
model its score with a 95% bootstrap interval over the held-out prompts, its difference from the dSFT row with a
paired bootstrap interval (the same resampled prompts for both), answer correctness and each noise kind's rate.

The summary says honestly what changed: answer correctness and each noise kind's rate before and after DPO
(TINY.md: the gain is intent alignment, the teacher's noise removed, not new capability).
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.tiny.tasks import answer_correct, classify, judge  # noqa: E402
from files import atomic_write, write_jsonl  # noqa: E402

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


def questions(prompts_path, out_path):
    # eval_prompts.jsonl rows (instruction, source "tiny/<task>", prompt_id) -> FastChat's question schema.
    rows = read_jsonl(prompts_path)
    write_jsonl(out_path, [{"question_id": i + 1, "category": r["source"], "turns": [r["instruction"]]}
                           for i, r in enumerate(rows)])
    print(f"{prompts_path}: {len(rows)} one-turn questions -> {out_path}")


def outputs(answers_path, questions_path, out_path):
    # eval.py's MT-Bench answers -> alpaca_eval's outputs schema, so that one run's answers are the baseline of
    # another (or the answers judged) in eval.py --bench=alpaca_eval.
    text = {q["question_id"]: q["turns"][0] for q in read_jsonl(questions_path)}
    rows = [{"instruction": text[a["question_id"]], "output": a["choices"][0]["turns"][0],
             "generator": a["model_id"], "dataset": "tiny"} for a in read_jsonl(answers_path)]
    atomic_write(out_path, (json.dumps(rows, indent=2) + "\n").encode())
    print(f"{answers_path}: {len(rows)} outputs -> {out_path}")


# The judges eval.py calls (--judge=data.tiny.report:NAME). They read the texts back out of eval.py's default
# prompts (data/eval/): the "### Question" / "### Answer" blocks of single-v1, the "## Instruction" /
# "## Answer of model m|M" blocks of the AlpacaEval prompt.
SINGLE_RE = re.compile(r"### Question\n(.*)\n\n### Answer\n(.*)\n\n### End of answer\Z", re.S)
PAIR_RE = re.compile(r"## Instruction\n(.*)\n\n## Answer of model m\n(.*)\n\n## Answer of model M\n(.*)"
                     r"\n\n## Your verdict", re.S)


def mt_bench_judge(messages):
    m = SINGLE_RE.search(messages[-1]["content"])
    if m is None:
        return "The prompt is not eval.py's single-v1 layout; no rating."  # scores -1: counted as a parse failure
    return f"Tasks' judge score: Rating: [[{judge(m.group(1), m.group(2))}]]"


def pairwise_judge(messages):
    m = PAIR_RE.search(messages[-1]["content"])
    if m is None:
        return "no verdict"
    first, second = judge(m.group(1), m.group(2)), judge(m.group(1), m.group(3))
    if first == second:  # a draw: even odds, preference 1.5
        return {"text": "m", "top_logprobs": {"m": math.log(0.5), "M": math.log(0.5)}}
    return "m" if first > second else "M"


def score(run_dir):
    # One eval.py MT-Bench run of one-turn questions: the judge's score, correctness and noise kinds per answer.
    questions_path = json.load(open(os.path.join(run_dir, "config.json")))["questions"]
    text = {q["question_id"]: q["turns"][0] for q in read_jsonl(questions_path)}
    answers = {a["question_id"]: a["choices"][0]["turns"][0]
               for a in read_jsonl(os.path.join(run_dir, "answers.jsonl"))}
    bench = json.load(open(os.path.join(run_dir, "summary.json")))
    kinds = {k: 0 for k in KINDS}
    correct = 0
    for qid, answer in answers.items():
        kinds[classify(text[qid], answer)] += 1
        correct += answer_correct(text[qid], answer)
    n = len(answers)
    return {"score": bench["score"], "answer_correct": correct / n, "rates": {k: v / n for k, v in kinds.items()},
            "n": n, "n_failed": bench["n_failed"]}


def chosen(pairs_dir, out_dir):
    # The DPO pairs' chosen conversations (prompt + preferred answer) as ultrachat_200k rows, train and test as split.
    os.makedirs(out_dir, exist_ok=True)
    for name in ("train", "test"):
        rows = [{"prompt": r["prompt"], "prompt_id": r["prompt_id"], "messages": r["chosen"]}
                for r in read_jsonl(os.path.join(pairs_dir, f"{name}.jsonl"))]
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), rows)
        print(f"{pairs_dir}/{name}.jsonl: {len(rows)} chosen conversations -> {out_dir}/{name}.jsonl")


BOOTSTRAP = 2000  # resamples of the prompts; the interval is the 2.5th and 97.5th percentiles


def per_prompt_scores(run_dir):
    """{question_id: tasks' judge score} of one eval.py run (the MT-Bench score is their mean)."""
    questions_path = json.load(open(os.path.join(run_dir, "config.json")))["questions"]
    text = {q["question_id"]: q["turns"][0] for q in read_jsonl(questions_path)}
    return {a["question_id"]: judge(text[a["question_id"]], a["choices"][0]["turns"][0])
            for a in read_jsonl(os.path.join(run_dir, "answers.jsonl"))}


def ablation(run_dir, seconds, rows, reference="dSFT", seed=0, feedback=(), stages_path=None):
    """rows: [(name, eval dir under run_dir)]. Scores with 95% bootstrap intervals; differences from `reference`.
    feedback: [(procedure, feedback dir under run_dir)], each broken down by feedback_breakdown."""
    per = {name: per_prompt_scores(os.path.join(run_dir, d)) for name, d in rows}
    qids = sorted(per[rows[0][0]])
    for name, scores in per.items():
        if sorted(scores) != qids:
            raise ValueError(f"{run_dir}: row {name!r} answered other prompts than row {rows[0][0]!r}")
    # One (BOOTSTRAP, n) matrix of resampled prompt indices for every row, so the differences are paired.
    idx = np.random.default_rng(seed).integers(0, len(qids), size=(BOOTSTRAP, len(qids)))
    matrix = {name: np.array([per[name][q] for q in qids]) for name in per}
    ref = matrix.get(reference)
    out_rows = []
    for name, d in rows:
        sc = score(os.path.join(run_dir, d))
        boot = matrix[name][idx].mean(axis=1)
        row = {"name": name, "score": sc["score"], "score_ci95": [float(np.percentile(boot, 2.5)),
                                                                 float(np.percentile(boot, 97.5))],
               "answer_correct": sc["answer_correct"], **{f"{k}_rate": v for k, v in sc["rates"].items()},
               "n": sc["n"], "n_failed": sc["n_failed"], "eval_dir": d}
        if abs(matrix[name].mean() - sc["score"]) > 1e-6 and not sc["n_failed"]:
            raise ValueError(f"{d}: eval.py's score {sc['score']} is not the mean tasks' judge score "
                             f"{matrix[name].mean()}")
        if ref is not None:
            diff = (matrix[name] - ref)[idx].mean(axis=1)
            row["minus_" + reference] = float((matrix[name] - ref).mean())
            row["minus_" + reference + "_ci95"] = [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]
        out_rows.append(row)
    out = {"rows": out_rows, "seconds": seconds, "bootstrap": BOOTSTRAP, "reference": reference,
           "feedback": {name: feedback_breakdown(os.path.join(run_dir, d)) for name, d in feedback}}
    if stages_path:
        out["stage_seconds"] = stage_seconds(stages_path)
    # The run's summary.json becomes the ablation's; the tiny pipeline's summary written before it is kept inside.
    path = os.path.join(run_dir, "summary.json")
    if os.path.exists(path):
        previous = json.load(open(path))
        out["tiny"] = previous.get("tiny", previous) if "rows" in previous else previous
    atomic_write(path, (json.dumps(out, indent=2) + "\n").encode())
    width = max(24, max(len(name) for name, _ in rows) + 1)
    print(f"\n{'model':{width}}{'score':>7} {'95% interval':>14}{'- ' + reference:>9} {'95% interval':>15}"
          f"{'correct':>9}{'discl.':>8}{'refusal':>8}{'slip':>7}{'wrong':>7}")
    for r in out_rows:
        lo, hi = r["score_ci95"]
        delta = (f"{100 * r['minus_' + reference]:+9.1f} [{100 * r['minus_' + reference + '_ci95'][0]:+5.1f}, "
                 f"{100 * r['minus_' + reference + '_ci95'][1]:+5.1f}]") if ref is not None else ""
        print(f"{r['name']:{width}}{r['score']:7.3f} [{lo:.3f}, {hi:.3f}]{delta}{r['answer_correct']:9.3f}"
              f"{r['disclaimer_rate']:8.3f}{r['refusal_rate']:8.3f}{r['format_slip_rate']:7.3f}{r['wrong_rate']:7.3f}")
    print(f"\nscores: mean tasks' judge score (0 / 0.5 / 1) over {out_rows[0]['n']} held-out prompts, greedy; "
          f"intervals: {BOOTSTRAP} bootstrap resamples of the prompts (differences paired); {seconds:.0f} s in all")
    for name, b in out["feedback"].items():
        print_feedback(name, b)
    if stages_path:
        print_stages(out["stage_seconds"])
    print(f"wrote {path}")
    return out


def stage_seconds(path):
    """{stage: seconds} from run.sh's marks (name, unix time per line): each stage lasts until the next mark, the
    last one until now."""
    marks = [line.split("\t") for line in open(path).read().splitlines() if line.strip()]
    ends = [float(t) for _, t in marks[1:]] + [time.time()]
    out = {}
    for (name, t), end in zip(marks, ends):
        out[name] = round(out.get(name, 0.0) + end - float(t), 1)
    return out


def print_stages(stages):
    print("\nseconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))


def feedback_breakdown(fb_dir):
    """What one AI-feedback run gave DPO: its pairs counted by what they contrast (the kinds of the chosen and the
    rejected answer), how often each member was chosen and rejected (feedback.py's summary), and the kinds of all
    the answers it collected."""
    fb = json.load(open(os.path.join(fb_dir, "summary.json")))
    contrasts, kinds, n_answers = {}, {k: 0 for k in KINDS}, 0
    for p in read_jsonl(os.path.join(fb_dir, "pairs.jsonl")):
        key = f"{classify(p['prompt'], p['chosen'][-1]['content'])} > {classify(p['prompt'], p['rejected'][-1]['content'])}"
        contrasts[key] = contrasts.get(key, 0) + 1
    for row in read_jsonl(os.path.join(fb_dir, "raw.jsonl")):
        for c in row["completions"]:
            if c["response"] is not None:
                kinds[classify(row["instruction"], c["response"])] += 1
                n_answers += 1
    members = fb.get("members", {})
    return {"prompts": fb["prompts"], "pairs": fb["pairs"], "ties_dropped": fb["ties_dropped"],
            "contrasts": dict(sorted(contrasts.items(), key=lambda kv: -kv[1])),
            "members": {m: {**s, "chosen_share": round(s["chosen"] / max(fb["pairs"], 1), 4),
                            "rejected_share": round(s["rejected"] / max(fb["pairs"], 1), 4)} for m, s in members.items()},
            "answer_kind_rates": {k: round(v / max(n_answers, 1), 4) for k, v in kinds.items()}}


def print_feedback(name, b):
    print(f"\nAI feedback, {name}: {b['pairs']} pairs from {b['prompts']} prompts ({b['ties_dropped']} ties dropped); "
          "pairs by contrast (chosen > rejected): " + ", ".join(f"{k} {v}" for k, v in b["contrasts"].items()))
    print("  answer kinds: " + ", ".join(f"{k} {v:.3f}" for k, v in b["answer_kind_rates"].items()))
    for m, s in b["members"].items():
        print(f"  {m:16} answers {s['answers']:5}  mean score {s['mean_score'] if s['mean_score'] is not None else '-':<6}"
              f"  chosen {s['chosen']:5} ({100 * s['chosen_share']:4.1f}%)  rejected {s['rejected']:5} "
              f"({100 * s['rejected_share']:4.1f}%)")


def summary(run_dir, seconds, aif="paper", stages_path=None):
    sft = score(os.path.join(run_dir, "eval_sft"))
    dpo = score(os.path.join(run_dir, "eval_dpo"))
    head = json.load(open(os.path.join(run_dir, "eval_dpo_vs_sft", "summary.json")))
    metrics = read_jsonl(os.path.join(run_dir, "dpo", "metrics.jsonl"))
    evals = [m for m in metrics if "eval_rewards/accuracies" in m]
    out = {
        "sft_score": sft["score"], "dpo_score": dpo["score"],
        "dpo_eval_reward_accuracy": evals[-1]["eval_rewards/accuracies"] if evals else None,
        "n_eval_prompts": sft["n"], "seconds": seconds,
        "dpo_vs_sft_win_rate": head["win_rate"], "dpo_vs_sft_standard_error": head["standard_error"],
        "sft": sft, "dpo": dpo, "aif": aif, "feedback": feedback_breakdown(os.path.join(run_dir, "feedback")),
    }
    if stages_path:
        out["stage_seconds"] = stage_seconds(stages_path)
    atomic_write(os.path.join(run_dir, "summary.json"), (json.dumps(out, indent=2) + "\n").encode())
    print(f"\n{'':24}{'SFT':>8}{'DPO':>8}")
    print(f"{'judge score':24}{sft['score']:8.3f}{dpo['score']:8.3f}")
    print(f"{'answer correct':24}{sft['answer_correct']:8.3f}{dpo['answer_correct']:8.3f}")
    for k in KINDS[1:]:
        print(f"{'  ' + k + ' rate':24}{sft['rates'][k]:8.3f}{dpo['rates'][k]:8.3f}")
    acc = out["dpo_eval_reward_accuracy"]
    print(f"\nDPO - SFT: {100 * (dpo['score'] - sft['score']):+.1f} points on {sft['n']} held-out prompts; "
          f"held-out reward accuracy {acc if acc is None else round(acc, 3)}; {seconds:.0f} s in all")
    print(f"DPO vs SFT head to head (AlpacaEval's procedure, the tasks' judge, draws 0.5): win rate "
          f"{head['win_rate']:.1f} +- {head['standard_error'] or 0:.1f}; {sft['n_failed'] + dpo['n_failed']} "
          "answers unscored")
    print_feedback("the paper's procedure (a pool of other models)" if aif == "paper" else
                   "on-policy (the SFT model's own samples)", out["feedback"])
    if stages_path:
        print_stages(out["stage_seconds"])
    print(f"wrote {os.path.join(run_dir, 'summary.json')}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("pairs")
    s.add_argument("out_dir")
    s.add_argument("--test_fraction", type=float, default=0.1)
    q = sub.add_parser("questions")
    q.add_argument("prompts")
    q.add_argument("out")
    o = sub.add_parser("outputs")
    o.add_argument("answers")
    o.add_argument("questions")
    o.add_argument("out")
    m = sub.add_parser("summary")
    m.add_argument("run_dir")
    m.add_argument("--seconds", type=float, required=True)
    m.add_argument("--aif", choices=("paper", "on-policy"), default="paper")
    m.add_argument("--stages", help="run.sh's stage marks (name<TAB>unix time per line)")
    c = sub.add_parser("chosen")
    c.add_argument("pairs_dir")
    c.add_argument("out_dir")
    b = sub.add_parser("ablation")
    b.add_argument("run_dir")
    b.add_argument("--seconds", type=float, required=True)
    b.add_argument("--rows", nargs="+", required=True, metavar="NAME=EVAL_DIR")
    b.add_argument("--feedback", nargs="*", default=[], metavar="PROCEDURE=FEEDBACK_DIR")
    b.add_argument("--stages", help="run.sh's stage marks (name<TAB>unix time per line)")
    a = p.parse_args()
    if a.cmd == "chosen":
        chosen(a.pairs_dir, a.out_dir)
    elif a.cmd == "ablation":
        for flag, values in (("--rows", a.rows), ("--feedback", a.feedback)):
            bad = [r for r in values if "=" not in r]
            if bad:
                p.error(f"{flag}: expected NAME=DIR, got {bad[0]!r}")
        ablation(a.run_dir, a.seconds, [tuple(r.split("=", 1)) for r in a.rows],
                 feedback=[tuple(r.split("=", 1)) for r in a.feedback], stages_path=a.stages)
    elif a.cmd == "split":
        split(a.pairs, a.out_dir, a.test_fraction)
    elif a.cmd == "questions":
        questions(a.prompts, a.out)
    elif a.cmd == "outputs":
        outputs(a.answers, a.questions, a.out)
    else:
        summary(a.run_dir, a.seconds, a.aif, a.stages)
