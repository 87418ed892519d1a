"""Pictures of a run: training curves from metrics.jsonl files and the tiny ablation's scores, as PNG files.

    python plot.py out/tiny-ablation                 # every stage under the run directory, and its ablation summary
    python plot.py out/tiny-ablation out/tiny-ablation-s1 out/tiny-ablation-s2 --out plots/   # three seeds
    python plot.py out/zephyr-7b/sft out/zephyr-7b/dpo --out plots/
    pip install matplotlib                           # the one extra dependency; nothing else imports it

Writes into --out (default: the first directory given, under plots/):
    sft_loss.png       per SFT-shaped stage (sft.py: base, dSFT, SFT on chosen): train loss and eval loss by step
    dpo_rewards.png    per DPO stage (dpo.py): rewards/margins and rewards/accuracies, train and eval, by step
    ablation.png       summary.json's rows (run.sh tiny-ablation): score per model, bars with 95% intervals; with
                       several run directories (seeds), one bar per run in each model's group

A directory counts as a stage when it holds metrics.jsonl (common.Logger writes one row per step, evaluations
on the same row as eval_*); a run directory is searched one level down. Runtime imports: the standard library,
and matplotlib inside draw() only, so the reading part (series, ablation_rows) is testable without it.
"""

import argparse
import json
import os
import sys

SFT_KEYS = ("loss", "eval_loss")
DPO_KEYS = ("rewards/margins", "rewards/accuracies")


def read_metrics(path):
    """The training rows of a metrics.jsonl (feedback.py and eval.py log progress rows without a step: none);
    a row of a resumed run replaces the earlier row of the same step."""
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if "step" in row:
                    by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def series(rows, key):
    """(steps, values) of one metric over the rows that have it."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def find_stages(paths):
    """{stage name: metrics rows} for each directory given, or its subdirectories, holding a metrics.jsonl."""
    stages = {}
    for path in paths:
        candidates = [path] + sorted(os.path.join(path, d) for d in os.listdir(path)
                                     if os.path.isdir(os.path.join(path, d)))
        for d in candidates:
            f = os.path.join(d, "metrics.jsonl")
            if os.path.isfile(f) and read_metrics(f):
                stages[os.path.relpath(d, os.path.dirname(path.rstrip("/")) or ".")] = read_metrics(f)
    return stages


def kind(rows):
    """'dpo' when the rows carry DPO's reward metrics, else 'sft'."""
    return "dpo" if any("rewards/margins" in r for r in rows) else "sft"


def ablation_rows(paths):
    """[(directory, rows)] for each of `paths` whose summary.json has ablation rows (one per seed, say)."""
    found = []
    for path in paths:
        f = os.path.join(path, "summary.json")
        if os.path.isfile(f):
            summary = json.load(open(f))
            if isinstance(summary.get("rows"), list):
                label = os.path.basename(path.rstrip("/"))
                meta = os.path.join(path, "data", "tiny.json")  # a tiny run: label it by its seed
                if os.path.isfile(meta):
                    label = f"seed {json.load(open(meta))['seed']}"
                found.append((label, summary["rows"]))
    return found


def draw(stages, runs, out_dir):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    written = []

    sft = {n: r for n, r in stages.items() if kind(r) == "sft"}
    if sft:
        cols = min(3, len(sft))  # three stages a row (base, dSFT, SFT on chosen): one row per seed
        rows = -(-len(sft) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
        for ax in axes.flat[len(sft):]:
            ax.axis("off")
        for ax, (name, r) in zip(axes.flat, sft.items()):
            for key, style in zip(SFT_KEYS, ("-", "o-")):
                x, y = series(r, key)
                if x:
                    ax.plot(x, y, style, label=key, lw=1, ms=3)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_ylabel("NLL per target token")
            ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out_dir, "sft_loss.png", plt))

    dpo = {n: r for n, r in stages.items() if kind(r) == "dpo"}
    if dpo:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
        for ax, key in zip(axes[0], DPO_KEYS):
            for i, (name, r) in enumerate(dpo.items()):
                color = f"C{i}"
                x, y = series(r, key)
                ax.plot(x, y, "-", color=color, lw=1, label=name)
                x, y = series(r, "eval_" + key)
                ax.plot(x, y, "o--", color=color, ms=3)
            ax.set_title(f"{key} (line: train, dots: eval)")
            ax.set_xlabel("step")
        # One legend for both panels, beside them: with several runs it would cover the curves.
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out_dir, "dpo_rewards.png", plt))

    if runs:  # one group of bars per model, one bar per run (seed), each with its interval
        names = [r["name"] for r in runs[0][1]]
        width = 0.8 / len(runs)
        fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 4))
        for j, (label, rows) in enumerate(runs):
            by_name = {r["name"]: r for r in rows}
            xs = [i - 0.4 + width * (j + 0.5) for i, n in enumerate(names) if n in by_name]
            got = [by_name[n] for n in names if n in by_name]
            ax.bar(xs, [r["score"] for r in got], width,
                   yerr=[[r["score"] - r["score_ci95"][0] for r in got], [r["score_ci95"][1] - r["score"] for r in got]],
                   capsize=3, label=label, color=f"C{j}")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace(" + ", "\n+ ").replace(", ", ",\n") for n in names], fontsize=8)
        ax.set_ylabel(f"tasks' judge score ({runs[0][1][0]['n']} prompts)")
        ax.set_title("tiny ablation: score and 95% bootstrap interval over the prompts")
        if len(runs) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir, "ablation.png", plt))
    return written


def _save(fig, out_dir, name, plt):
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")  # tight: keeps a legend placed beside the axes
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader never sees half a PNG
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run or stage directories")
    p.add_argument("--out", help="output directory (default: FIRST_PATH/plots)")
    a = p.parse_args(argv)
    for path in a.paths:
        if not os.path.isdir(path):
            p.error(f"{path}: not a directory")
    stages, runs = find_stages(a.paths), ablation_rows(a.paths)
    if not stages and not runs:
        p.error(f"{', '.join(a.paths)}: no metrics.jsonl in them or one level down, and no summary.json with rows")
    try:
        written = draw(stages, runs, a.out or os.path.join(a.paths[0], "plots"))
    except ImportError:
        sys.exit("plot.py: needs matplotlib (pip install matplotlib); the training scripts never import it")
    print("\n".join(f"wrote {w}" for w in written))


if __name__ == "__main__":
    main()
