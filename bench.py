"""End-to-end benchmarks: our stages against transformers and TRL on the same model, weights, shapes, seeds
and dtype, in one run. Prints tables of medians and ratios (results: BENCHMARKS.md).

    python bench.py [sft sft_chat dpo dpo_mem dpo_packed generate checkpoint gpu ...] [--reps 3] [--json results.json]
    python bench.py gpu [--budget_s=480] [--out_dir=out/bench_gpu]    # on a GPU: benchmarks/gpu.py
    python bench.py gpu --rehearse --out_dir=D                         # its orchestration on CPU (CI)

No workload named = all of them. The peers are for benchmarking only (not in requirements.txt):

    pip install trl==1.16.0 accelerate==1.15.0 datasets==5.2.0

A peer that is not installed is skipped with a message. Without mistral-common (the Mistral v1
tokenizer.model that TRL's DPOTrainer needs to tokenize text) the TRL DPO row is skipped too.

The "bench" model: vocab 32000, hidden 256, intermediate 896, 4 layers, 8 heads / 2 KV heads, head_dim 32,
random weights (seed 0), fp32. Ours is model.Mistral; the peer is transformers' MistralForCausalLM loaded from
the same safetensors file, attn_implementation="sdpa". On CPU torch runs with one thread per core.

Method. Every measurement runs in its own subprocess (`bench.py --_case SPEC`), so one measurement's allocator
caches and peak memory never leak into another's. Within a repetition the implementations run one after the
other, and the order is reversed every other repetition, so that load from other jobs on a shared machine hits
all of them alike. Each subprocess builds its models and data, then does warm-up steps and timed steps; the
table gives medians over the timed steps of all repetitions (see "Shared cores" for which steps).
Memory: just before the first step the subprocess resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs); after the last step
VmHWM is the peak RSS while stepping ("peak RSS", the whole process: libraries, models, optimizer, step) and
VmHWM minus the RSS before the first step is what the steps added ("step extra": gradients, optimizer state,
activations, logits). Our subprocesses never import transformers or TRL; peer subprocesses do, which shows in
"peak RSS" (not in "step extra").

Shared cores. Other people's jobs on the same cores slow every measurement, and with OpenMP's default spinning
threads a busy core can slow a 2-thread run down 5-20x. So the measurement subprocesses run with
OMP_WAIT_POLICY=PASSIVE (--omp_wait_policy=default to turn that off), each measurement first waits up to
--quiet_wait seconds for the cores to go idle, and every table has an "other load" column: the CPU other
processes used during each step, in cores (from /proc/stat minus our own CPU time). A step during which they
used less than QUIET cores is quiet; when every implementation of a table has at least two quiet steps, its
medians and ratios use only those, otherwise all steps (the table says which). The targets table also gives the
ratios of the fastest steps (the least disturbed ones).
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

# One file per workload under benchmarks/; the measurement helpers in benchmarks/harness.py.
from benchmarks.checkpoint import CKPT, case_checkpoint  # noqa: E402
from benchmarks.dpo import (DPO, DPO_MEM, DPO_PACKED, case_dpo, case_dpo_packed, dpo_runs_agree,  # noqa: E402
                            positions_table)
from benchmarks.generate import GEN, case_generate  # noqa: E402
from benchmarks.gpu import run_gpu  # noqa: E402
from benchmarks.harness import BENCH_MODEL, MIB, SEED, fmt, set_threads, spawn  # noqa: E402
from benchmarks.sft import SFT, case_sft, chat_layout  # noqa: E402
from kernels.bench import cpu_name  # noqa: E402

QUIET = 0.25          # a step during which other processes used less than this many cores counts as quiet

PEERS_HINT = "pip install trl==1.16.0 accelerate==1.15.0 datasets==5.2.0"

CASES = {"sft": case_sft, "sft_chat": lambda impl, w: case_sft(impl, w, chat=True), "dpo": lambda impl, w: case_dpo(impl, w, DPO),
         "dpo_mem": lambda impl, w: case_dpo(impl, w, DPO_MEM), "dpo_packed": case_dpo_packed, "generate": case_generate,
         "checkpoint": case_checkpoint}


def run_case(spec):
    set_threads()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = CASES[spec["workload"]](spec["impl"], spec["weights"])
    print("RESULT " + json.dumps(res))


# -----------------------------------------------------------------------------
# The parent: spawn measurements, alternate, print tables


def have(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return missing


# workload -> [(impl, label, python modules it needs)]
TRL = ["transformers", "trl", "datasets", "accelerate"]
IMPLS = {
    "sft": [("ours", "sft.py's micro-step (segment ids), plain Mistral module", []),
            ("ours-fsdp", "same, FSDP2-wrapped on 1 rank (as sft.py runs)", []),
            ("hf", "transformers MistralForCausalLM, torch loop", ["transformers"]),
            ("trl", "TRL SFTTrainer, its defaults (gradient checkpointing on)", TRL),
            ("trl-nockpt", "TRL SFTTrainer, gradient_checkpointing=False", TRL)],
    "sft_chat": [("ours", "sft.py's micro-step, loss on assistant tokens (54%)", []),
                 ("ours-fsdp", "same, FSDP2-wrapped on 1 rank (as sft.py runs)", []),
                 ("hf", "transformers, torch loop, labels -100 off the assistant tokens", ["transformers"])],
    "dpo": [("ours", "dpo.py step, reference log-probs precomputed (its default)", []),
            ("ours-live", "dpo.py step, live reference forward (--reference=live)", []),
            ("hf", "transformers, full logits, live reference", ["transformers"]),
            ("trl", "TRL DPOTrainer, live reference, its defaults (grad. ckpt on)", TRL + ["mistral_common"]),
            ("trl-nockpt", "TRL DPOTrainer, live reference, gradient_checkpointing=False",
             TRL + ["mistral_common"])],
    "dpo_packed": [("ours-packed", "dpo.py step, packed prompt-shared rows (--packing=true)", []),
                   ("ours", "dpo.py step, padded rows (--packing=false)", []),
                   ("trl", "TRL DPOTrainer, live reference, its defaults (grad. ckpt on)", TRL + ["mistral_common"])],
    "dpo_mem": [("ours", "dpo.py step, fused log-probs, reference precomputed", []),
                ("ours-logits", "our model, full (B,T,V) logits, reference precomputed", []),
                ("hf-precomputed", "transformers, full logits, reference precomputed", ["transformers"])],
    "generate": [("ours", "Mistral.generate", []),
                 ("hf", "transformers generate", ["transformers"])],
    "checkpoint": [("ours", "Mistral.save_pretrained + from_pretrained", []),
                   ("hf", "transformers save_pretrained + from_pretrained", ["transformers"])],
}
WORKLOADS = ["sft", "sft_chat", "dpo", "dpo_mem", "dpo_packed", "generate", "checkpoint", "gpu"]


def measure(workload, weights, reps, quiet_wait):
    impls = []
    for impl, label, needs in IMPLS[workload]:
        missing = have(*needs)
        if missing:
            print(f"  skipped {impl} ({label}): {', '.join(missing)} not installed; {PEERS_HINT}"
                  + (" mistral-common" if "mistral_common" in missing else ""), flush=True)
        else:
            impls.append((impl, label))
    runs = {impl: [] for impl, _ in impls}
    for rep in range(reps):
        order = impls if rep % 2 == 0 else impls[::-1]
        for impl, _ in order:
            res = spawn(workload, impl, weights, quiet_wait=quiet_wait)
            if res is not None:
                runs[impl].append(res)
                print(f"  rep {rep + 1}/{reps} {impl:<15} step s (other load, cores): "
                      + " ".join(f"{t:.3f} ({x:.1f})" for t, x in zip(res["times"], res["loads"]))
                      + f"; peak RSS {res['peak'] / MIB:.0f} MiB ({res['wall']:.0f} s wall)", flush=True)
    labels = dict(impls)
    summary = {}
    for impl, rs in runs.items():
        if not rs:
            continue
        times = [t for r in rs for t in r["times"]]
        loads = [x for r in rs for x in r["loads"]]
        quiet = [t for t, x in zip(times, loads) if x < QUIET]
        s = dict(label=labels[impl], all=statistics.median(times), min=min(times), max=max(times), n=len(times),
                 quiet=statistics.median(quiet) if len(quiet) >= 2 else None, n_quiet=len(quiet),
                 foreign=statistics.median(loads), peak=statistics.median(r["peak"] for r in rs),
                 extra=statistics.median(r["extra"] for r in rs), raw=rs)
        summary[impl] = s
    # One basis per table: the medians of the quiet steps if every implementation had at least two, else of all.
    basis = "quiet" if summary and all(s["quiet"] is not None for s in summary.values()) else "all"
    for s in summary.values():
        s["basis"], s["median"] = basis, s[basis]
        rs = s["raw"]
        if "tokens_per_step" in rs[0]:
            s["tokens_per_s"] = rs[0]["tokens_per_step"] / s["median"]
        for key in ("save_times", "load_times"):
            if key in rs[0]:
                s[key] = statistics.median(t for r in rs for t in r[key])
        for key in ("trl_lengths", "optim"):
            if key in rs[0]:
                s[key] = rs[0][key]
    return summary


def speed(s, ours, peer, key="median"):
    # > 1: ours is faster. "median" is the table's basis (quiet or all steps); "min" compares the fastest steps.
    if ours in s and peer in s:
        return s[peer][key] / s[ours][key]
    return None


def both(s, ours, peer, invert=False):
    # "median ratio (fastest-step ratio)" for the targets table.
    x, y = speed(s, ours, peer), speed(s, ours, peer, "min")
    if invert:
        x, y = (None if v is None else 1 / v for v in (x, y))
    return x, f"{fmt(x)} (fastest: {fmt(y)})"


def mem(s, ours, peer, key="extra"):
    # < 1: ours uses less.
    if ours in s and peer in s and s[peer][key] > 0:
        return s[ours][key] / s[peer][key]
    return None


def print_table(title, s, cols):
    """cols: list of (header, function (impl, summary row) -> str)."""
    basis = next(iter(s.values()))["basis"] if s else "all"
    print(f"\n{title}")
    if basis == "quiet":
        print(f"medians (and ratios) over quiet steps: other jobs used < {QUIET} cores during the step")
    else:
        print("medians (and ratios) over all steps: some implementation had fewer than 2 quiet steps")
    cols = cols + [("all-steps median", lambda i, r: f"{1e3 * r['all']:.0f} ms"),
                   ("quiet steps", lambda i, r: f"{r['n_quiet']}/{r['n']}"),
                   ("other load (cores)", lambda i, r: f"{r['foreign']:.2f}")]
    heads = ["impl", "what"] + [h for h, _ in cols]
    rows = [[impl, r["label"]] + [f(impl, r) for _, f in cols] for impl, r in s.items()]
    widths = [max(len(x) for x in col) for col in zip(heads, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)   # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(line(heads))
    print("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for r in rows:
        print(line(r))


def header():
    cpu = cpu_name()
    versions = [f"torch {torch.__version__}"]
    for m in ("transformers", "trl", "accelerate", "datasets"):
        try:
            versions.append(f"{m} {__import__(m).__version__}")
        except ImportError:
            versions.append(f"{m} not installed")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout
        commit += " (+ uncommitted changes)" if dirty.strip() else ""
    except OSError:
        commit = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch threads {os.cpu_count()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; GPU: {gpu}")
    print(" | ".join(versions) + f" | python {platform.python_version()}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')} | commit {commit}")


def report(workload, s, targets):
    ms = lambda i, r: f"{1e3 * r['median']:.0f} ms"                                         # noqa: E731
    spread = lambda i, r: f"{1e3 * r['min']:.0f}-{1e3 * r['max']:.0f}"                       # noqa: E731
    rss = lambda i, r: f"{r['peak'] / MIB:.0f}"                                              # noqa: E731
    extra = lambda i, r: f"{r['extra'] / MIB:.0f}"                                           # noqa: E731
    tps = lambda i, r: f"{r['tokens_per_s']:.0f}"                                            # noqa: E731
    faster = lambda i, r: fmt(speed(s, "ours", i))                                          # noqa: E731
    if workload in ("sft", "sft_chat"):
        what = "every position a target" if workload == "sft" else \
            f"2 packed examples per row, loss on the assistant tokens ({int(chat_layout(SFT['seq'])[1].sum())} of {SFT['seq']})"
        print_table(f"SFT step: batch {SFT['batch']} x {SFT['seq']} tokens, {what}, fwd + bwd + clip + AdamW, fp32; "
                    f"{SFT['warmup']} warm-up + {SFT['steps']} timed steps per rep", s,
                    [("tokens/s", tps), ("step (median)", ms), ("min-max ms", spread), ("peak RSS MiB", rss),
                     ("step extra MiB", extra), ("speed ours / this", faster)])
        for ours in ("ours", "ours-fsdp"):
            for peer, want in (("hf", 1.8), ("trl", 2.0), ("trl-nockpt", 2.0)):   # hf: issue 29's target
                x, txt = both(s, ours, peer)
                if peer in s:
                    targets.append((f"{'SFT' if workload == 'sft' else 'chat SFT'} tokens/s, {ours} / {peer}",
                                    f">= {want}x", txt, x is not None and x >= want))
    elif workload in ("dpo", "dpo_mem"):
        shape = DPO if workload == "dpo" else DPO_MEM
        title = (f"DPO step: {shape['pairs']} pairs, {shape['prompt']}-token prompt + {shape['answer']}-token answers "
                 f"(2 x {shape['pairs']} rows of {shape['prompt'] + shape['answer']}), sigmoid, beta 0.1, "
                 f"fwd + bwd + clip + AdamW, fp32; {shape['warmup']} warm-up + {shape['steps']} timed steps per rep")
        if workload == "dpo_mem":
            title = "DPO memory at scale (issue 6): " + title
        slower = lambda i, r: fmt(None if speed(s, "ours", i) is None else 1 / speed(s, "ours", i))  # noqa: E731
        print_table(title, s, [("step (median)", ms), ("min-max ms", spread), ("peak RSS MiB", rss),
                               ("step extra MiB", extra), ("time ours / this", slower),
                               ("step extra ours / this", lambda i, r: fmt(mem(s, "ours", i))),
                               ("peak RSS ours / this", lambda i, r: fmt(mem(s, "ours", i, "peak")))])
        if workload == "dpo":
            if "trl" in s:
                print(f"TRL's tokenized lengths (prompt, chosen, rejected): {s['trl'].get('trl_lengths')}")
            for peer in ("trl", "trl-nockpt"):
                for ours in ("ours", "ours-live"):
                    t, txt = both(s, ours, peer, invert=True)
                    targets.append((f"DPO step time, {ours} / {peer}", "<= 0.7x", txt, t is not None and t <= 0.7))
                for ours in ("ours", "ours-live"):
                    for key, what in (("extra", "step extra"), ("peak", "peak RSS")):
                        m = mem(s, ours, peer, key)
                        targets.append((f"DPO {what}, {ours} / {peer}", "<= 0.5x", fmt(m), m is not None and m <= 0.5))
        else:
            for peer in ("ours-logits", "hf-precomputed"):
                for key, what in (("extra", "step extra"), ("peak", "peak RSS")):
                    m = mem(s, "ours", peer, key)
                    targets.append((f"DPO@1024 {what}, ours / {peer}", "<= 0.5x", fmt(m), m is not None and m <= 0.5))
    elif workload == "dpo_packed":
        report_dpo_packed(s, targets)
    elif workload == "generate":
        print_table(f"Generation: batch {GEN['batch']}, {GEN['prompt']}-token prompts, exactly {GEN['new']} new "
                    f"tokens, sampling (temperature 1), KV cache, fp32; {GEN['warmup']} warm-up + {GEN['steps']} "
                    "timed runs per rep", s,
                    [("new tokens/s", tps), ("run (median)", ms), ("min-max ms", spread),
                     ("ms / decode step", lambda i, r: f"{1e3 * r['median'] / GEN['new']:.2f}"),
                     ("peak RSS MiB", rss), ("speed ours / this", faster)])
        x, txt = both(s, "ours", "hf")
        targets.append(("generation tokens/s, ours / hf", ">= 3x", txt, x is not None and x >= 3))   # issue 29
    elif workload == "checkpoint":
        print_table(f"Checkpoint: save + load of the bench model ({num_params() / 1e6:.1f}M params, fp32, "
                    f"safetensors); {CKPT['warmup']} warm-up + {CKPT['steps']} timed rounds per rep", s,
                    [("save (median)", lambda i, r: f"{1e3 * r['save_times']:.0f} ms"),
                     ("load (median)", lambda i, r: f"{1e3 * r['load_times']:.0f} ms"),
                     ("save + load", ms), ("min-max ms", spread), ("speed ours / this", faster)])
        x, txt = both(s, "ours", "hf")
        targets.append(("checkpoint save + load, speed ours / hf", "(none)", txt, None))


def report_dpo_packed(s, targets):
    n = DPO_PACKED["pairs"]
    per_pair = lambda i, r: f"{1e3 * r['median'] / n:.0f} ms"                                 # noqa: E731
    positions = lambda i, r: (f"{statistics.mean(p for x in r['raw'] for p in x['positions']) / n:.0f}"  # noqa: E731
                              if "positions" in r["raw"][0] else "-")
    print_table(f"DPO step on UltraFeedback-shaped pairs (long tails): {n} pairs per step in micro-steps of "
                f"{DPO_PACKED['micro']} pairs or {DPO_PACKED['micro']} packed rows, sigmoid, beta 0.1, fwd + bwd + clip + "
                f"AdamW, fp32; {DPO_PACKED['warmup']} warm-up + {DPO_PACKED['steps']} timed steps per rep", s,
                [("step (median)", lambda i, r: f"{1e3 * r['median']:.0f} ms"), ("per pair", per_pair),
                 ("min-max ms", lambda i, r: f"{1e3 * r['min']:.0f}-{1e3 * r['max']:.0f}"),
                 ("positions / pair", positions), ("peak RSS MiB", lambda i, r: f"{r['peak'] / MIB:.0f}"),
                 ("step extra MiB", lambda i, r: f"{r['extra'] / MIB:.0f}"),
                 ("padded time / this", lambda i, r: fmt(speed(s, i, "ours")))])
    if "trl" in s:
        raw = s["trl"]["raw"][0]
        print(f"TRL tokenized {raw['trl_tokens']} tokens of these pairs where prepare.py has {raw['our_tokens']} "
              "(each prompt counted once)")
    if "ours" in s and "ours-packed" in s:
        # Paired by repetition (both ran back to back): median step time of the padded run / the packed run.
        reps = [statistics.median(a["times"]) / statistics.median(b["times"])
                for a, b in zip(s["ours"]["raw"], s["ours-packed"]["raw"])]
        print(f"padded / packed step time per repetition: {', '.join(f'{r:.2f}x' for r in reps)} (min "
              f"{min(reps):.2f}x, median {statistics.median(reps):.2f}x, max {max(reps):.2f}x)")
        x, txt = both(s, "ours-packed", "ours")
        targets.append(("DPO CPU step time per pair, padded / packed (UltraFeedback-shaped)", ">= 1.5x", txt,
                        x is not None and x >= 1.5))
    for peer in ("trl",):
        x, txt = both(s, "ours-packed", peer)
        if peer in s:
            targets.append((f"DPO CPU step time per pair, {peer} / ours packed", "(none)", txt, None))


def report_dpo_packed_positions(workdir, weights, targets):
    """The positions table of dpo_packed (no model: dpo.py's packing on the pairs' lengths), then dpo.py itself,
    --packing=true against --packing=false on the same text."""
    print(f"\nPositions computed per pair (forward passes; padding included), UltraFeedback-shaped pairs, "
          f"{DPO_PACKED['n_train']} per shape, micro batch {DPO_PACKED['micro']} (pairs, or packed rows):")
    print("| shape | steps of | real tokens / pair | padded | packed, prompt twice | packed, prompt once | "
          "padded / packed once | padded / packed twice | twice / once | pack_length |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (shape, layout), r in positions_table(workdir).items():
        ratio = r["padded"] / r["packed+shared"]
        print(f"| {shape} | {layout} | {r['tokens']:.0f} | {r['padded']:.0f} | {r['packed']:.0f} | "
              f"{r['packed+shared']:.0f} | {ratio:.2f}x | {r['padded'] / r['packed']:.2f}x | "
              f"{r['packed'] / r['packed+shared']:.2f}x | {r['pack_length']} |")
        if layout.startswith("dpo_public"):
            targets.append((f"DPO positions per pair, padded / packed ({shape}, dpo_public layout)", ">= 2x",
                            f"{ratio:.2f}x", ratio >= 2))
    print("\ndpo.py --packing=true against --packing=false (bench model, 64 pairs of this text, 3 steps of 16):")
    r = dpo_runs_agree(weights, workdir)
    worst = max(r["diffs"], key=r["diffs"].get)
    print(f"losses per step, packed {r['losses']['true']}, padded {r['losses']['false']}")
    print(f"largest difference over {r['steps']} steps and {len(r['diffs'])} logged metrics, relative to the metric's "
          f"largest value: {r['diffs'][worst]:.2e} ({worst}); accuracies that differ (step, metric): "
          f"{r['accuracies'] or 'none'}; reference caches, relative: train {r['caches']['train']:.2e}, test "
          f"{r['caches']['test']:.2e}")
    print(f"tokens per step {r['tokens']}; positions packed {r['positions']['true']} / padded "
          f"{r['positions']['false']}; fill {[round(f, 3) for f in r['fill']['true']]} / "
          f"{[round(f, 3) for f in r['fill']['false']]}")


def num_params():
    from model import MistralConfig
    return MistralConfig(**BENCH_MODEL).num_params()


def main(argv):
    if argv[:1] == ["--_case"]:
        run_case(json.loads(argv[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workloads", nargs="*", help=f"any of {WORKLOADS} (default: all)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; each is one subprocess per implementation")
    ap.add_argument("--quiet_wait", type=float, default=5.0,
                    help="before each measurement, wait up to this many seconds for other jobs to leave the cores idle")
    ap.add_argument("--omp_wait_policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                    help="OMP_WAIT_POLICY of the measurements (default PASSIVE: see BENCHMARKS.md on shared cores)")
    ap.add_argument("--json", default="", help="also write all raw measurements to this file")
    ap.add_argument("--budget_s", type=float, default=480.0, help="gpu: seconds for all its parts (benchmarks/gpu.py)")
    ap.add_argument("--out_dir", default="out/bench_gpu", help="gpu: where gpu.jsonl and gpu.md go")
    ap.add_argument("--rehearse", action="store_true",
                    help="gpu: run every part's orchestration on CPU (tiny shapes, Triton interpreter, gloo)")
    a = ap.parse_args(argv)
    unknown = [w for w in a.workloads if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {WORKLOADS}")
    workloads = a.workloads or WORKLOADS
    if a.rehearse and workloads != ["gpu"]:
        ap.error("--rehearse is an option of the gpu workload: python bench.py gpu --rehearse --out_dir=D")
    if workloads == ["gpu"]:                # no CPU workload: no bench model, no peer versions to report
        run_gpu(a.out_dir, a.budget_s, a.rehearse)
        return
    if a.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy       # inherited by every measurement subprocess
    header()
    print(f"command: python bench.py {' '.join(argv)}".rstrip())
    print("ratios: speed = peer time / our time (> 1: ours faster); memory = ours / peer (< 1: ours smaller)")
    from model import Mistral, MistralConfig
    results, targets = {}, []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "bench")
        m = Mistral(MistralConfig(**BENCH_MODEL))
        m.init_weights(seed=SEED)
        m.save_pretrained(weights)
        del m
        for w in workloads:
            if w == "gpu":
                run_gpu(a.out_dir, a.budget_s, a.rehearse)
                continue
            print(f"\n[{w}] running ({a.reps} reps)...", flush=True)
            s = measure(w, weights, a.reps, a.quiet_wait)
            results[w] = s
            report(w, s, targets)
            if w == "dpo_packed":
                report_dpo_packed_positions(tmp, weights, targets)
    if targets:
        print("\nTargets")
        print("| target | wanted | measured | met |")
        print("|---|---:|---:|:---:|")
        for name, want, got, ok in targets:
            print(f"| {name} | {want} | {got} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
