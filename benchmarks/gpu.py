"""`python bench.py gpu`: what a user with a GPU runs first, the decisive numbers within a time budget.

    python bench.py gpu [--budget_s=480] [--out_dir=out/bench_gpu]      # one CUDA GPU
    python bench.py gpu --rehearse --out_dir=D                           # every part's orchestration on CPU

Parts, in order of value (PARTS): kernel correctness in bf16 against fp32 torch, with pass/fail thresholds; the
attention and log-prob tables at the sizes users run; the 1-GPU SFT step of the ~1B preset (tokens/s, MFU); sft.py
and dpo.py against the memory plan. Each part runs in its own subprocess (`python -m benchmarks.gpu --part NAME`),
with what is left of the budget as its timeout; a part whose estimate (ESTIMATE_S, seconds on one H200:
BENCHMARKS.md says how they were counted) exceeds what is left is skipped. So a crash, a CUDA error or a hang costs
one part, never the others. Each part's record is appended to OUT_DIR/gpu.jsonl the moment it exists (part, status
= ok | failed | timeout | skipped, seconds, and the part's figures), and OUT_DIR/gpu.md, a Markdown summary, is
rewritten after every part.

Autotuning: each part's first call of a kernel at a shape tunes it (compiles come from Triton's disk cache after
the first part that needs them); the tables time only later calls and report the first call's seconds as tune_s.
The stage runs tune in their first step, whose seconds and peak memory are reported apart from the steady state.
Stage runs stop before their final checkpoint and export (--stop_after): nothing multi-GB is written but the
DPO part's 2.0 GB bf16 init model, deleted when dpo.py is done.

--rehearse runs the same orchestration on the CPU: tiny shapes, the Triton kernels in the interpreter
(TRITON_INTERPRET=1), the stages with --rehearse_gpu=true on gloo. Its timings mean nothing; CI checks that every
part ends ok.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PARTS = ["correctness", "attention", "logprobs", "sft_step", "sft_stage", "dpo_stage"]
ESTIMATE_S = {"correctness": 80, "attention": 30, "logprobs": 30, "sft_step": 40, "sft_stage": 50, "dpo_stage": 65}
REHEARSE_ESTIMATE_S = {"correctness": 20, "attention": 10, "logprobs": 10, "sft_step": 15, "sft_stage": 20,
                       "dpo_stage": 25}
RESERVE_S = 5          # of the budget, kept for the summary
SEED = 0

# Sizes per mode. GPU: what users run (Mistral's attention: 32 query / 8 KV heads of 128, window 4096; SFT rows of
# 2048 packed, DPO rows of ~1024 right-padded; the 7B vocabulary and width in the head; the ~1B preset for the
# steps). Rehearsal: the same structure, small enough for the interpreter.
SIZES = {
    False: dict(heads=(32, 8, 128), window=4096, short_window=512, attn_rows={"sft": (4, 2048), "dpo": (8, 1024)},
                check_T=2048, check_B=2, head=(4096, 32000), logprob_rows=(4096, 8192), check_N=4096,
                preset="mistral-1b", step_batch=(4, 2048), warmup=3, steps=10, stage_steps=5, stage_seq=2048,
                dpo_lengths=(400, 1024)),
    True: dict(heads=(2, 1, 16), window=16, short_window=8, attn_rows={"sft": (2, 32), "dpo": (4, 24)},
               check_T=40, check_B=2, head=(32, 300), logprob_rows=(64,), check_N=37,
               preset=None, step_batch=(2, 32), warmup=1, steps=1, stage_steps=2, stage_seq=32, dpo_lengths=(10, 20)),
}
# The rehearsal's model: one layer, head_dim 16 (the kernels' smallest), GQA 2:1, window 16.
TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, sliding_window=16, max_position_embeddings=256, dtype="float32")


def device(rehearse):
    return torch.device("cpu" if rehearse else "cuda")


def gpu_name(rehearse):
    return "CPU (rehearsal: Triton interpreter)" if rehearse else torch.cuda.get_device_name()


def timer(rehearse):
    """fn -> milliseconds per call: Triton's do_bench on CUDA (L2 flushed, medians), one timed call on CPU."""
    if not rehearse:
        import triton.testing
        return lambda fn, grad_to_none=None: triton.testing.do_bench(fn, grad_to_none=grad_to_none)

    def once(fn, grad_to_none=None):
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    return once


def synchronize(rehearse):
    if not rehearse:
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# Part 1: correctness. Each row: what, max abs error, bound, pass. Bounds: attention and gradients within 2^-6 of
# the reference's largest magnitude (four bf16 steps: P and dS are rounded to bf16 before their matmuls, as in
# FlashAttention-2; the log-prob GEMMs take 16-bit dz); log-probs within 2^-10 of the largest (fp32 sums of
# exact bf16 products, in another order). A race, a wrong mask or a wrong stride is off by O(1) of the magnitude.


def check_row(what, got, want, rel):
    err = (got.float() - want.float()).abs().max().item()
    bound = rel * want.float().abs().max().item()
    return dict(check=what, error=err, bound=bound, passed=bool(err <= bound))


def part_correctness(rehearse):
    from kernels.attention import flash_attention, reference_attention
    from kernels.logprobs import reference_token_logprobs, token_logprobs
    s, dev = SIZES[rehearse], device(rehearse)
    g = torch.Generator(device=dev).manual_seed(SEED)
    H, H_kv, D = s["heads"]
    B, T = s["check_B"], s["check_T"]
    rows = []
    # Packed rows as sft.py makes them, and the right end as padding (segment -1, as model.py marks it).
    cut = [T // 3, T // 3 + T // 4, T - T // 8]
    seg = torch.zeros(B, T, dtype=torch.long, device=dev)
    for i, c in enumerate(cut):
        seg[:, c:] = i + 1
    seg[:, cut[-1]:] = -1
    for name, window, segments in (("Mistral window", s["window"], None), ("short window", s["short_window"], None),
                                   ("packed + padding -1", s["window"], seg)):
        q = torch.randn(B, H, T, D, device=dev, generator=g).bfloat16().requires_grad_()
        k, v = (torch.randn(B, H_kv, T, D, device=dev, generator=g).bfloat16().requires_grad_() for _ in range(2))
        do = torch.randn(B, H, T, D, device=dev, generator=g).bfloat16()
        out = flash_attention(q, k, v, causal=True, sliding_window=window, segment_ids=segments)
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(*ref_in, True, window, segments)
        ref_grads = torch.autograd.grad(ref, ref_in, do.float())
        rows.append(check_row(f"attention T={T} {name}: output", out, ref, 2.0 ** -6))
        for x, got, want in zip("qkv", grads, ref_grads):
            rows.append(check_row(f"attention T={T} {name}: d{x}", got, want, 2.0 ** -6))
    N, (Dh, V) = s["check_N"], s["head"]
    h = (0.5 * torch.randn(N, Dh, device=dev, generator=g)).bfloat16()
    w = (0.02 * torch.randn(V, Dh, device=dev, generator=g)).bfloat16()
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    mask = torch.ones(N, device=dev)
    ref_h, ref_w = h.float().requires_grad_(), w.float().requires_grad_()
    ref = reference_token_logprobs(ref_h, ref_w, t)
    ref_grads = torch.autograd.grad(-ref.sum() / N, (ref_h, ref_w))
    # recompute: DPO's path (backward recomputes the logits); one pass: SFT's (expected_grad). Both write 16-bit dz.
    for mode, kw in (("recompute", {}), ("one pass", {"expected_grad": -mask})):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = token_logprobs(hh, ww, t, **kw)
        grads = torch.autograd.grad(-out.sum() / N, (hh, ww))
        rows.append(check_row(f"log-probs N={N} D={Dh} V={V} {mode}: values", out, ref, 2.0 ** -10))
        rows.append(check_row(f"log-probs {mode}: d hidden", grads[0], ref_grads[0], 2.0 ** -6))
        rows.append(check_row(f"log-probs {mode}: d weight", grads[1], ref_grads[1], 2.0 ** -6))
    failed = [r["check"] for r in rows if not r["passed"]]
    return dict(rows=rows, passed=not failed, failed=failed)


# -----------------------------------------------------------------------------
# Part 2: attention TFLOP/s at the sizes of sft.py (packed rows: segments) and dpo.py (right padding: none), both
# with Mistral's window, against torch SDPA's flash backend (K/V repeated for GQA; no window there, which at
# T <= 4096 masks nothing) and flash-attn if installed.


def part_attention(rehearse):
    from kernels.attention import flash_attention
    from kernels.bench import _tflops, attention_flops
    import torch.nn.functional as F
    s, dev = SIZES[rehearse], device(rehearse)
    H, H_kv, D = s["heads"]
    bench = timer(rehearse)
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    rows = []
    for stage, (B, T) in s["attn_rows"].items():
        q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, H_kv, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        seg = (torch.arange(T, device=dev) // (T // 4)).expand(B, T).contiguous() if stage == "sft" else None

        def ours():
            return flash_attention(q, k, v, causal=True, sliding_window=s["window"], segment_ids=seg)
        t0 = time.perf_counter()                 # the first call compiles (or loads) and tunes forward and backward
        ours().backward(torch.ones_like(q))
        synchronize(rehearse)
        tune_s = time.perf_counter() - t0
        flops = attention_flops(B, H, T, D, True, s["window"])
        row = dict(stage=stage, B=B, T=T, segments=seg is not None, tune_s=tune_s,
                   ours=_tflops(ours, [q, k, v], flops, bench))
        if seg is None and not rehearse:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            k_rep, v_rep = (x.detach().repeat_interleave(H // H_kv, dim=1).requires_grad_() for x in (k, v))

            def sdpa():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
            row["sdpa_flash"] = _tflops(sdpa, [q, k_rep, v_rep], flops, bench)
        if flash_attn_func is not None and seg is None and not rehearse:
            qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
            row["flash_attn"] = _tflops(lambda: flash_attn_func(qf, kf, vf, causal=True,
                                                                window_size=(s["window"] - 1, 0)), [qf, kf, vf], flops,
                                        bench)
        rows.append(row)
        del q, k, v
    return dict(rows=rows, heads=s["heads"], window=s["window"], unit="TFLOP/s fwd, bwd, fwd+bwd")


# -----------------------------------------------------------------------------
# Part 3: the log-prob head, fwd + bwd, at the target rows of a micro-batch (SFT: ~half of 4 x 2048; DPO fewer):
# our two gradient modes against full bf16 logits (kernels.bench's methods). Time and extra peak memory.


def part_logprobs(rehearse):
    from kernels.bench import METHODS, make_inputs, train_step
    s, dev = SIZES[rehearse], device(rehearse)
    D, V = s["head"]
    bench = timer(rehearse)
    rows = []
    for N in s["logprob_rows"]:
        for method in METHODS:
            inputs = make_inputs(N, D, V, torch.bfloat16, dev.type)
            t0 = time.perf_counter()
            train_step(method, *inputs)                                  # compiles (or loads) and tunes
            synchronize(rehearse)
            tune_s = time.perf_counter() - t0
            extra = None
            if not rehearse:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                train_step(method, *inputs)
                torch.cuda.synchronize()
                extra = (torch.cuda.max_memory_allocated() - base) / 2**30
            ms = bench(lambda: train_step(method, *inputs))
            rows.append(dict(N=N, method=method, ms=ms, extra_gib=extra, tune_s=tune_s))
            del inputs
    return dict(rows=rows, D=D, V=V)


# -----------------------------------------------------------------------------
# Part 4: one GPU, the ~1B preset, FSDP2 on one rank with bf16 compute (as sft.py builds it), packed rows.


def tiny_model_dir(work):
    """The rehearsal's HF-format model (TINY, random weights), written once into the work directory."""
    from model import Mistral, MistralConfig
    path = os.path.join(work, "tiny_hf")
    if not os.path.exists(path):
        m = Mistral(MistralConfig(**TINY))
        m.init_weights(seed=SEED)
        m.save_pretrained(path)
    return path


def part_sft_step(rehearse, work):
    import common
    s = SIZES[rehearse]
    d = common.setup_dist(device(rehearse).type, rehearse_gpu=rehearse)
    if rehearse:
        model, mcfg = common.build_model(tiny_model_dir(work), d)
    else:
        model, mcfg = common.build_model("scratch", d, model_preset=s["preset"], seed=SEED)
    opt = common.make_optimizer(model, 1e-5, device_type=d.device.type)
    B, T = s["step_batch"]
    g = torch.Generator().manual_seed(SEED)
    times, first_peak, peak = [], None, None
    for step in range(s["warmup"] + s["steps"]):
        ids = torch.randint(3, mcfg.vocab_size, (B, T), generator=g).to(d.device)
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        seg = (torch.arange(T) // (T // 4)).expand(B, T).to(d.device)             # 4 packed examples per row
        synchronize(rehearse)
        t0 = time.perf_counter()
        mask = (targets != -100).float()
        nll = -model(ids, targets=targets, segment_ids=seg, expected_grad=-mask).sum()
        (nll / mask.sum()).backward()
        common.optimizer_step(model, opt, 1.0, step, nll.item() / float(mask.sum()), None)
        synchronize(rehearse)
        times.append(time.perf_counter() - t0)
        if not rehearse and step == 0:           # the first step autotunes: its peak apart from the steady state
            first_peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
    if not rehearse:
        peak = torch.cuda.max_memory_allocated() / 2**30
    tokens_per_s = B * T / statistics.median(times[s["warmup"]:])
    flops = common.peak_flops(d.device)
    mfu = common.flops_per_token(mcfg, T) * tokens_per_s / flops if flops else None
    common.shutdown()
    return dict(gpu=gpu_name(rehearse), params=mcfg.num_params(), batch=[B, T], tokens_per_s=tokens_per_s, mfu=mfu,
                first_step_s=times[0], step_s=statistics.median(times[s["warmup"]:]), first_step_peak_gib=first_peak,
                peak_gib=peak)


# -----------------------------------------------------------------------------
# Parts 5 and 6: sft.py, then dpo.py, as a user runs them, for a few steps on random tokens; their logged peaks
# (first step, steady state) against memplan's plan. A word-level tokenizer of the model's vocabulary size is
# trained in a second (the stages check it against the model); no checkpoint, no export (--stop_after).


def tokenizer(work, vocab):
    from data.tokenizer import train_tokenizer
    import numpy as np
    path = os.path.join(work, f"words{vocab}.model")
    if not os.path.exists(path):
        rng = np.random.default_rng(SEED)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(rng.choice(letters, 7)) for _ in range(vocab + 8000)]
        train_tokenizer([" ".join(words[i:i + 20]) for i in range(0, len(words), 20)], path[:-len(".model")], vocab,
                        model_type="word")
    return path


def write_shards(directory, vocab, n, lengths, answer_from, seed=SEED, pairs=False):
    # n examples per split (train; test gets 8), lengths uniform in `lengths`, loss mask from answer_from * length.
    # pairs: examples 2i and 2i + 1 (chosen, rejected) share their prompt, as prepare.py writes them (packed DPO
    # computes it once), the prompt answer_from of the shorter one.
    import numpy as np
    from data.shards import ShardWriter
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", 8)):
        with ShardWriter(directory, split, vocab) as wr:
            for _ in range(count // 2 if pairs else count):
                Ls = [int(rng.integers(*lengths)) for _ in range(2 if pairs else 1)]
                prompt = rng.integers(3, vocab, int(answer_from * min(Ls)))
                for L in Ls:
                    ids = np.concatenate([prompt, rng.integers(3, vocab, L - len(prompt))])
                    wr.add(ids, (np.arange(L) >= len(prompt)).astype(np.uint8))
            wr.close({"source": "bench.py gpu: random tokens"})


def run_stage(stage, args, rehearse, work):
    """One stage as a subprocess; returns its metrics.jsonl records. A failure raises with the stage's output."""
    cmd = [sys.executable, f"{stage}.py", *args, *(["--rehearse_gpu=true"] if rehearse else [])]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, MEMPLAN_CHECK="0"))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def stage_figures(stage, args, recs, step_s, tokens, mcfg, seq, rehearse):
    """A stage run's figures from its metrics.jsonl records: step seconds (first, and the median of the rest),
    tokens/s, MFU, and its logged peaks (first step, steady state) beside memplan's for its config."""
    import common
    import importlib
    import memplan
    tcfg = common.parse_config(importlib.import_module(stage).Config, args)
    plan = memplan.plan(mcfg, tcfg, 1, "cuda", stage, seq)
    steady = statistics.median(step_s[1:] or step_s)
    tokens_per_s = tokens / steady
    flops = None if rehearse else common.peak_flops(torch.device("cuda"))
    return dict(steps=len(recs), first_step_s=step_s[0], step_s=steady, tokens_per_s=tokens_per_s,
                mfu=common.flops_per_token(mcfg, seq) * tokens_per_s / flops if flops else None,
                first_step_peak_gib=recs[0].get("first_step_peak_mem_gb"),
                peak_gib=max((r["peak_mem_gb"] for r in recs if "peak_mem_gb" in r), default=None),
                plan_first_step_gib=plan["first_step_peak"] / 2**30, plan_gib=plan["peak"] / 2**30,
                plan_moment=plan["moment"])


def part_sft_stage(rehearse, work):
    from model import config_from_preset, MistralConfig
    s = SIZES[rehearse]
    mcfg = MistralConfig(**TINY) if rehearse else config_from_preset(s["preset"])
    write_shards(os.path.join(work, "sft"), mcfg.vocab_size, 16 * (s["stage_steps"] + 1),
                 (s["stage_seq"] // 4, s["stage_seq"] // 2), 0.3)
    steps, seq, mb = s["stage_steps"], s["stage_seq"], 4 if not rehearse else 2
    init = ([f"--init_from={tiny_model_dir(work)}"] if rehearse
            else ["--init_from=scratch", f"--model_preset={s['preset']}"])
    args = [*init, f"--tokenizer={tokenizer(work, mcfg.vocab_size)}", f"--data_dir={work}/sft",
            f"--out_dir={work}/out_sft", f"--seq_len={seq}", f"--micro_batch_size={mb}", f"--global_batch_size={mb}",
            f"--max_steps={steps + 1}", f"--stop_after={steps}", "--eval_every=0", "--ckpt_every=0",
            "--warmup_ratio=0", "--overwrite=true"]
    recs = run_stage("sft", args, rehearse, work)
    step_s = [r["tokens"] / r["tokens_per_s"] for r in recs]          # sft.py logs real tokens and tokens/s
    return stage_figures("sft", args, recs, step_s, statistics.median(r["tokens"] for r in recs), mcfg, seq, rehearse)


def random_hf_model(path, mcfg, dev):
    """An HF-format directory of random weights in bf16 (norms 1), written tensor by tensor from `dev`."""
    from model import Mistral
    from weights import save_checkpoint
    import dataclasses
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Mistral(mcfg).named_parameters()}
    g = torch.Generator(device=dev).manual_seed(SEED)

    def tensors():
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            else:
                yield name, (0.02 * torch.randn(shape, device=dev, generator=g)).bfloat16()
    save_checkpoint(path, dataclasses.replace(mcfg, dtype="bfloat16"), tensors())
    if dev.type == "cuda":
        torch.cuda.empty_cache()                 # this process's cached blocks: the device is dpo.py's next


def part_dpo_stage(rehearse, work):
    from model import config_from_preset, MistralConfig
    s = SIZES[rehearse]
    mcfg = MistralConfig(**TINY) if rehearse else config_from_preset(s["preset"])
    steps, mb = s["stage_steps"], 2 if rehearse else 4      # dpo_public's micro batch: 4 pairs = 8 rows
    init = os.path.join(work, "dpo_init")
    random_hf_model(init, mcfg, device(rehearse))
    lo, hi = s["dpo_lengths"]
    write_shards(os.path.join(work, "pairs"), mcfg.vocab_size, 2 * mb * (steps + 1), (lo, hi), 0.5, pairs=True)
    pack_length = -(-2 * hi // 128) * 128                   # packed rows (dpo.py's default layout): any pair fits
    args = [f"--init_from={init}", f"--tokenizer={tokenizer(work, mcfg.vocab_size)}", f"--data_dir={work}/pairs",
            f"--out_dir={work}/out_dpo", f"--micro_batch_size={mb}", f"--global_batch_size={mb}",
            f"--max_steps={steps + 1}", f"--stop_after={steps}", "--eval_every=0", "--ckpt_every=0",
            "--warmup_ratio=0", "--overwrite=true", f"--pack_length={pack_length}"]
    recs = run_stage("dpo", args, rehearse, work)
    shutil.rmtree(init, ignore_errors=True)
    step_s = [r["tokens"] / r["tokens_per_s"] for r in recs]          # dpo.py logs real tokens and tokens/s
    out = stage_figures("dpo", args, recs, step_s, statistics.median(r["tokens"] for r in recs), mcfg, pack_length,
                        rehearse)
    out["pairs_per_s"] = mb / out["step_s"]
    return out


PART_FUNCTIONS = {"correctness": part_correctness, "attention": part_attention, "logprobs": part_logprobs,
                  "sft_step": part_sft_step, "sft_stage": part_sft_stage, "dpo_stage": part_dpo_stage}


def run_part(name, rehearse, work):
    """Inside the part's subprocess: the figures of one part, printed as a RESULT line."""
    fn = PART_FUNCTIONS[name]
    figures = fn(rehearse, work) if name in ("sft_step", "sft_stage", "dpo_stage") else fn(rehearse)
    figures["gpu"] = gpu_name(rehearse)          # named here: the parent never opens a CUDA context of its own
    print("RESULT " + json.dumps(figures), flush=True)


# -----------------------------------------------------------------------------
# The parent: the budget, one subprocess per part, gpu.jsonl and gpu.md


def spawn_part(name, rehearse, work, timeout):
    """Runs one part; returns (status, figures or an error text)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--part", name, "--work", work]
    cmd += ["--rehearse"] if rehearse else []
    env = dict(os.environ, PYTHONPATH=ROOT)
    if rehearse:
        env["TRITON_INTERPRET"] = "1"                    # before Python starts: Triton reads it when kernels load
    # A session of its own, so that a timeout kills the stage runs it started too (they hold the GPU).
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return "timeout", f"killed after {timeout:.0f} s (the budget's end): {err[-2000:]}"
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return "failed", f"exit {p.returncode}: " + (err or out)[-3000:]
    return "ok", json.loads(lines[-1][len("RESULT "):])


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_gpu(out_dir="out/bench_gpu", budget_s=480.0, rehearse=False):
    """`python bench.py gpu`: the parts in order within budget_s seconds; returns the records (also in gpu.jsonl)."""
    os.makedirs(out_dir, exist_ok=True)
    jsonl, work = os.path.join(out_dir, "gpu.jsonl"), os.path.join(out_dir, "work")
    if os.path.exists(jsonl):
        os.replace(jsonl, jsonl + ".previous")
    os.makedirs(work, exist_ok=True)
    estimates = REHEARSE_ESTIMATE_S if rehearse else ESTIMATE_S
    head = dict(gpu=gpu_name(True) if rehearse else None, torch=torch.__version__,      # GPU: named by the parts
                date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(), budget_s=budget_s,
                rehearse=rehearse)
    print(f"\nbench.py gpu{' --rehearse' if rehearse else ''}: budget {budget_s:.0f} s, results in {jsonl}", flush=True)
    start, records = time.monotonic(), []
    for name in PARTS:
        left = budget_s - RESERVE_S - (time.monotonic() - start)
        t0 = time.monotonic()
        if not rehearse and not torch.cuda.is_available():
            status, result = "skipped", "no CUDA device (torch.cuda.is_available() is False)"
        elif estimates[name] > left:
            status, result = "skipped", f"estimated {estimates[name]} s, {max(left, 0):.0f} s of the budget left"
        else:
            status, result = spawn_part(name, rehearse, os.path.abspath(work), left)
        if status == "ok" and name == "correctness" and not result.get("passed"):
            status = "failed"                            # a check beyond its bound fails the part
            result["error"] = "checks beyond their bounds: " + ", ".join(result.get("failed", []))
        rec = dict(part=name, status=status, seconds=round(time.monotonic() - t0, 1), **head)
        rec.update(result if isinstance(result, dict) else {"error": result})
        append_jsonl(jsonl, rec)
        records.append(rec)
        print(f"  {name}: {status} ({rec['seconds']:.0f} s){': ' + rec['error'][:300] if 'error' in rec else ''}",
              flush=True)
        write_summary(os.path.join(out_dir, "gpu.md"), head, records)
    shutil.rmtree(work, ignore_errors=True)
    print(open(os.path.join(out_dir, "gpu.md")).read())
    return records


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fmt(x, spec=".1f", none="n/a"):
    return none if x is None else format(x, spec)


def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"       # MFU: none on a GPU missing from the peak-FLOPs table


def params(n):
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def rate(x):
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def write_summary(path, head, records):
    """gpu.md: the statuses, then a table per part that gave figures."""
    gpu = next((r["gpu"] for r in records if r.get("gpu")), head["gpu"])
    md = [f"# bench.py gpu{' --rehearse' if head['rehearse'] else ''}: {gpu or 'no GPU'}, {head['date']}, commit "
          f"{head['commit']}, torch {head['torch']}, budget {head['budget_s']:.0f} s", ""]
    md += ["| part | status | seconds |", "|---|---|---:|"]
    md += [f"| {r['part']} | {r['status']}{': ' + r['error'][:120].replace(chr(10), ' ') if 'error' in r else ''} | "
           f"{r['seconds']:.0f} |" for r in records]
    for r in records:
        if "rows" in r or "tokens_per_s" in r:
            md.append("")
            try:
                md += part_table(r)
            except (KeyError, TypeError, ValueError) as e:                     # a summary never stops the run
                md.append(f"{r['part']}: figures in gpu.jsonl ({type(e).__name__} {e} while summarizing)")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(path + ".tmp", path)


def part_table(r):
    """The Markdown table of one part's figures."""
    if r["part"] == "correctness":
        md = ["| kernel check (bf16 vs fp32 torch) | max abs error | bound | pass |", "|---|---:|---:|:---:|"]
        md += [f"| {c['check']} | {c['error']:.3g} | {c['bound']:.3g} | {'yes' if c['passed'] else 'NO'} |"
               for c in r["rows"]]
    elif r["part"] == "attention":
        md = [f"| attention ({r['unit']}) | B x T | segments | ours | SDPA flash | flash-attn | tune s |",
              "|---|---|:---:|---:|---:|---:|---:|"]
        cell = lambda x: " / ".join(rate(v) for v in x) if x else "n/a"   # noqa: E731
        md += [f"| {a['stage']} | {a['B']} x {a['T']} | {'yes' if a['segments'] else 'no'} | {cell(a['ours'])} | "
               f"{cell(a.get('sdpa_flash'))} | {cell(a.get('flash_attn'))} | {a['tune_s']:.1f} |" for a in r["rows"]]
    elif r["part"] == "logprobs":
        md = [f"| log-probs fwd+bwd, D={r['D']} V={r['V']} | method | ms | extra GiB | tune s |",
              "|---|---|---:|---:|---:|"]
        md += [f"| N={a['N']} | {a['method']} | {a['ms']:.1f} | {fmt(a['extra_gib'], '.2f')} | {a['tune_s']:.1f} |"
               for a in r["rows"]]
    elif r["part"] == "sft_step":
        md = ["| 1-GPU SFT step | params | batch | tokens/s | MFU | first step s | step s | peak GiB (first step) |",
              "|---|---:|---|---:|---:|---:|---:|---:|",
              f"| {r['gpu']} | {params(r['params'])} | {r['batch'][0]} x {r['batch'][1]} | "
              f"{r['tokens_per_s']:.0f} | {pct(r['mfu'])} | {r['first_step_s']:.1f} | "
              f"{r['step_s']:.3f} | {fmt(r['peak_gib'], '.1f')} ({fmt(r['first_step_peak_gib'], '.1f')}) |"]
    else:
        md = ["| stage | tokens/s | MFU | first step s | step s | peak GiB / plan | first step GiB / plan |",
              "|---|---:|---:|---:|---:|---:|---:|",
              f"| {r['part']} | {r['tokens_per_s']:.0f} | {pct(r['mfu'])} | "
              f"{r['first_step_s']:.1f} | {r['step_s']:.2f} | {fmt(r['peak_gib'], '.1f')} / {r['plan_gib']:.1f} | "
              f"{fmt(r['first_step_peak_gib'], '.1f')} / {r['plan_first_step_gib']:.1f} |"]
    return md


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description="one part of bench.py gpu")
    ap.add_argument("--part", choices=PARTS, required=True)
    ap.add_argument("--work", required=True, help="the run's work directory (tokenizers, data, models)")
    ap.add_argument("--rehearse", action="store_true")
    a = ap.parse_args(argv)
    run_part(a.part, a.rehearse, a.work)


if __name__ == "__main__":
    main(sys.argv[1:])
