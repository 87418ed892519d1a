"""`python bench.py gpu`: what a user with a GPU runs first (kernel checks, kernel tables, 1-GPU SFT
throughput, sft.py and dpo.py against memplan's plan).
"""

import datetime
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.harness import LR, ROOT, SEED, fmt, spawn
from kernels.bench import proc_status

# -----------------------------------------------------------------------------
# GPU: 1-GPU SFT throughput of the ~1B preset (bf16 mixed precision, FSDP2 on one rank, as sft.py runs it)


GPU_SFT = dict(batch=4, seq=2048, warmup=3, steps=10)


def case_gpu_sft(impl, weights):
    import common
    d = common.setup_dist("cuda")
    model, mcfg = common.build_model("scratch", d, model_preset="mistral-1b", seed=SEED, mixed_precision=True)
    opt = common.make_optimizer(model, LR, device_type="cuda")
    B, T, W, S = GPU_SFT["batch"], GPU_SFT["seq"], GPU_SFT["warmup"], GPU_SFT["steps"]
    g = torch.Generator().manual_seed(SEED)
    times = []
    for step in range(W + S):
        ids = torch.randint(3, mcfg.vocab_size, (B, T), generator=g).to(d.device)
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        batch = {"input_ids": ids, "targets": targets, "segment_ids": torch.zeros_like(ids)}  # packed rows
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.set_requires_gradient_sync(True)
        mask = (targets != -100).float()
        nll = -model(**batch, expected_grad=-mask).sum()
        (nll / mask.sum()).backward()
        loss = nll.item() / float(mask.sum())
        common.optimizer_step(model, opt, 1.0, step, loss, None)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tps = B * T / statistics.median(times[W:])
    peak = common.peak_flops(d.device)
    mfu = common.flops_per_token(mcfg, T) * tps / peak if peak else None
    return dict(times=times[W:], warmup_times=times[:W], tokens_per_step=B * T, tokens_per_s=tps, mfu=mfu,
                params=mcfg.num_params(), gpu=torch.cuda.get_device_name(), loads=[0.0] * S,
                peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30, peak=proc_status("VmHWM"), extra=0)


GPU_STAGE_STEPS = 6   # optimizer steps of sft.py and dpo.py in `bench.py gpu` (the first 2 are warm-up)


def gpu_correctness():
    """Our CUDA kernels against torch references in bf16: values and gradients. Returns rows of (what, max error)."""
    import torch.nn.functional as F
    from kernels.attention import flash_attention
    from kernels.logprobs import reference_token_logprobs, token_logprobs
    g = torch.Generator(device="cuda").manual_seed(SEED)
    rows = []
    for T, window in ((2048, None), (2048, 512)):
        q = torch.randn(2, 32, T, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        k = torch.randn(2, 8, T, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        v = torch.randn(2, 8, T, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        do = torch.randn(2, 32, T, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        i = torch.arange(T, device="cuda")
        mask = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :] < window) if window else True)
        ref = F.scaled_dot_product_attention(*(x.float() for x in (q, k, v)), attn_mask=mask, enable_gqa=True)
        ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
        out = flash_attention(q, k, v, causal=True, sliding_window=window)
        grads = torch.autograd.grad(out, (q, k, v), do)
        rows.append((f"attention T={T} window={window}: output", (out.float() - ref).abs().max().item()))
        for name, a, b in zip("qkv", grads, ref_grads):
            rows.append((f"attention T={T} window={window}: d{name}", (a.float() - b).abs().max().item()))
    N, D, V = 4096, 4096, 32000
    h = (torch.randn(N, D, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    ref = reference_token_logprobs(h, w, t)
    rg = torch.autograd.grad(ref.sum(), (h, w))
    out = token_logprobs(h, w, t)
    og = torch.autograd.grad(out.sum(), (h, w))
    rows.append(("log-probs N=4096 D=4096 V=32000: values", (out - ref).abs().max().item()))
    rows.append(("log-probs: d hidden", (og[0].float() - rg[0].float()).abs().max().item()))
    rows.append(("log-probs: d weight", (og[1].float() - rg[1].float()).abs().max().item()))
    return rows


def gpu_stage_runs(tmp):
    """sft.py, then dpo.py from its export, for GPU_STAGE_STEPS steps on the ~1B preset (1 GPU, bf16, seq 2048,
    micro batch 4, checkpointing off), on random tokens. Returns per stage the median tokens/s, MFU, peak memory
    (torch.cuda.max_memory_allocated) and the memory plan's peak."""
    import numpy as np
    import memplan
    import model as M
    from data.shards import ShardWriter
    try:
        import mistral_common
        tok = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    except ImportError:
        return {"skipped": "mistral-common is not installed (sft.py needs a 32000-piece tokenizer.model)"}
    rng = np.random.default_rng(SEED)
    for name, n, lo, hi in (("sft", 200, 300, 1200), ("dpo", 200, 400, 900)):
        for split in ("train", "test"):
            with ShardWriter(os.path.join(tmp, name), split, 32000) as wr:
                for _ in range(n if split == "train" else 16):
                    L = int(rng.integers(lo, hi))
                    ids = rng.integers(3, 32000, L)
                    wr.add(ids, (np.arange(L) >= L // 3).astype(np.uint8))
                wr.close({"tokenizer": tok})
    common_args = ["--micro_batch_size=4", f"--max_steps={GPU_STAGE_STEPS}", "--eval_every=0", "--ckpt_every=0",
                   f"--tokenizer={tok}", "--warmup_ratio=0"]
    runs = {"sft": ["sft.py", "--init_from=scratch", "--model_preset=mistral-1b", f"--data_dir={tmp}/sft",
                    f"--out_dir={tmp}/out_sft", "--seq_len=2048", "--global_batch_size=4", *common_args],
            "dpo": ["dpo.py", f"--init_from={tmp}/out_sft/hf", f"--data_dir={tmp}/dpo", f"--out_dir={tmp}/out_dpo",
                    "--global_batch_size=4", *common_args]}
    out = {}
    for stage, cmd in runs.items():
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            out[stage] = {"error": (p.stdout + p.stderr)[-3000:]}
            continue
        with open(os.path.join(tmp, f"out_{stage}", "metrics.jsonl")) as f:
            recs = [json.loads(x) for x in f][2:]
        mcfg = M.config_from_preset("mistral-1b")
        mod = importlib.import_module(stage)
        import common
        tcfg = common.parse_config(mod.Config, cmd[1:])
        seq = 2048 if stage == "sft" else 900
        plan = memplan.plan(mcfg, tcfg, 1, "cuda", stage, seq)["peak"]
        if stage == "sft":
            tps, mfu = statistics.median(r["tokens_per_s"] for r in recs), statistics.median(r["mfu"] for r in recs)
        else:  # dpo.py logs pairs/s: 2 examples of 650 tokens on average (uniform 400..900), padding not counted
            tps = statistics.median(r["pairs_per_s"] for r in recs) * 2 * 650
            peak_flops = common.peak_flops(torch.device("cuda"))
            mfu = common.flops_per_token(mcfg, 650) * tps / peak_flops if peak_flops else None
        peak = max(r.get("peak_mem_gb", 0) for r in recs) * 2**30
        out[stage] = dict(tokens_per_s=tps, mfu=mfu, peak_gib=peak / 2**30, plan_gib=plan / 2**30,
                          pairs_per_s=statistics.median(r["pairs_per_s"] for r in recs) if stage == "dpo" else None)
    return out


def run_gpu(out_dir="out/bench_gpu"):
    """`python bench.py gpu`: what a user with a GPU runs first. Kernel correctness (bf16, against torch), the kernel
    tables of kernels.bench, one-GPU throughput of the ~1B preset, and sft.py and dpo.py for a few steps with
    peak memory against memplan's plan. Writes out_dir/bench_gpu.json and bench_gpu.md."""
    print("\nGPU")
    if not torch.cuda.is_available():
        print("skipped: torch.cuda.is_available() is False (no GPU on this machine)")
        return
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "time": datetime.datetime.now().isoformat(timespec="seconds")}
    res["correctness"] = gpu_correctness()
    print("| kernel check (bf16, vs torch in fp32) | max abs error |\n|---|---:|")
    for what, err in res["correctness"]:
        print(f"| {what} | {err:.3g} |")
    p = subprocess.run([sys.executable, "-m", "kernels.bench"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    res["kernels_bench"] = p.stdout if p.returncode == 0 else p.stderr[-3000:]
    print(res["kernels_bench"].rstrip())
    sft_step = spawn("gpu_sft", "ours", "", timeout=900)
    if sft_step is not None:
        res["sft_step"] = {k: sft_step[k] for k in ("tokens_per_s", "mfu", "peak_gpu_gib", "params")}
        print(f"\n1-GPU SFT step, preset mistral-1b ({sft_step['params'] / 1e9:.2f}B params), batch {GPU_SFT['batch']} x "
              f"{GPU_SFT['seq']}, bf16, FSDP2 on 1 rank: {sft_step['tokens_per_s']:.0f} tokens/s, MFU "
              f"{fmt(sft_step['mfu'], '.1%', '')}, peak {sft_step['peak_gpu_gib']:.1f} GiB")
    with tempfile.TemporaryDirectory() as tmp:
        res["stages"] = gpu_stage_runs(tmp)
    md = ["| stage (mistral-1b, 1 GPU, micro batch 4) | tokens/s | MFU | peak GiB | plan GiB | peak / plan |",
          "|---|---:|---:|---:|---:|---:|"]
    for stage, r in res["stages"].items():
        if isinstance(r, dict) and "peak_gib" in r:
            md.append(f"| {stage}.py | {fmt(r['tokens_per_s'], '.0f', '')} | {fmt(r['mfu'], '.1%', '')} | "
                      f"{r['peak_gib']:.1f} | {r['plan_gib']:.1f} | {r['peak_gib'] / r['plan_gib']:.2f} |")
        else:
            md.append(f"| {stage}.py | {r if isinstance(r, str) else str(r)[:300]} | | | | |")
    print("\n" + "\n".join(md))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "bench_gpu.md"), "w") as f:
        f.write(f"GPU check on {res['gpu']}, torch {res['torch']}, {res['time']}\n\n| kernel check | max abs error |\n"
                "|---|---:|\n" + "".join(f"| {w} | {e:.3g} |\n" for w, e in res["correctness"]) + "\n" + "\n".join(md) + "\n")
    print(f"wrote {out_dir}/bench_gpu.json and bench_gpu.md")
