"""Speed and memory of our kernels against the obvious alternatives; prints tables.

    python -m kernels.bench [attention|logprobs|all]        (default: all)
    python -m kernels.bench compile [--json PATH]           (no GPU needed: sm_90/sm_80 resource table)

logprobs, GPU: token_logprobs (fwd+bwd) in its two gradient modes against the naive path (bf16
    logits, upcast to fp32, log_softmax, gather) at D=4096, V=32000, N=4k..32k, bf16. Extra peak memory
    from torch.cuda.max_memory_allocated over what the inputs hold; time from CUDA events (do_bench).
logprobs, CPU: the chunked torch path against the naive one in fp32. Memory: each method runs once
    in a fresh subprocess: inputs are created, the kernel's peak-RSS counter is reset to the current
    RSS (writing 5 to /proc/self/clear_refs), one fwd+bwd runs, and the extra peak memory is VmHWM
    minus the RSS before the step (both from /proc/self/status). A fresh process keeps allocator
    caches and earlier peaks out of the figure. Time: the best of that run and of a few more rounds
    in this process, the methods interleaved so that a burst of load from other jobs on the machine
    does not land on one method only.
attention (GPU only): TFLOP/s of kernels.attention.flash_attention, forward, backward and both,
    against torch SDPA (flash backend, K/V repeated for GQA) and flash-attn when installed. Causal,
    head_dim 128, 32 query / 8 KV heads, ~16k tokens per batch, full and 4096 sliding window.
    The backward counts 2.5x the forward FLOPs. Then DPO pairs packed into rows: the prefix variant (each
    pair prompt | chosen | rejected, the prompt computed once) against the same pairs packed as two segments
    each (prompt + chosen, prompt + rejected), in time per pair and in TFLOP/s of the visible pairs.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

from kernels.logprobs import CPU_CHUNK_BYTES, token_logprobs

MIB = 2**20


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def print_header():
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    import triton
    print(f"machine: {platform.node()} | {cpu} x {os.cpu_count()} cores (torch threads {torch.get_num_threads()}) | GPU: {gpu}")
    print(f"torch {torch.__version__} | triton {triton.__version__} | python {platform.python_version()} "
          f"| {datetime.datetime.now().isoformat(timespec='seconds')}")


# ---------------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------------

def naive_logprobs(hidden, weight, targets):
    # What a training script does without a fused head: (N, V) logits in the model dtype, upcast.
    logits = (hidden @ weight.T).float()                                          # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


METHODS = {
    "naive": lambda h, w, t, mask: naive_logprobs(h, w, t),
    "recompute": lambda h, w, t, mask: token_logprobs(h, w, t),
    "one-pass": lambda h, w, t, mask: token_logprobs(h, w, t, expected_grad=mask),
}


def make_inputs(N, D, V, dtype, device):
    gen = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(N, D, generator=gen, device=device, dtype=dtype).requires_grad_()
    weight = (0.02 * torch.randn(V, D, generator=gen, device=device)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen, device=device)
    mask = torch.ones(N, device=device)                     # SFT loss mask (all tokens count here)
    return hidden, weight, targets, mask


def train_step(method, hidden, weight, targets, mask):
    # The SFT loss, so that upstream gradient == -mask / num_tokens is what the one-pass mode expects.
    hidden.grad = weight.grad = None
    logp = METHODS[method](hidden, weight, targets, mask)
    (-(logp * mask).sum() / mask.sum()).backward()


def bench_logprobs_gpu():
    import triton.testing
    D, V = 4096, 32000
    print(f"\nlogprobs on GPU: fwd+bwd, bf16, D={D}, V={V}; extra peak memory over the inputs (GiB), time (ms)")
    print(f"{'N':>6} | {'naive':>15} | {'recompute':>15} {'mem':>5} {'speed':>6} | {'one-pass':>15} {'mem':>5} {'speed':>6}")
    for N in (4096, 8192, 16384, 32768):
        row = {}
        for method in METHODS:
            inputs = make_inputs(N, D, V, torch.bfloat16, "cuda")
            train_step(method, *inputs)                      # warm-up, autotuning
            torch.cuda.synchronize()
            inputs[0].grad = inputs[1].grad = None
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            train_step(method, *inputs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            ms = triton.testing.do_bench(lambda: train_step(method, *inputs))
            row[method] = (peak / 2**30, ms)
            del inputs
            torch.cuda.empty_cache()
        (nm, nt) = row["naive"]
        cells = [f"{row[m][0]:6.2f} {row[m][1]:7.1f}ms" for m in METHODS]
        print(f"{N:>6} | {cells[0]:>15} | " + " | ".join(
            f"{cells[i]:>15} {row[m][0] / nm:5.0%} {nt / row[m][1]:5.2f}x" for i, m in enumerate(METHODS) if i > 0))


def reset_peak_rss():
    # Linux >= 4.0: writing 5 resets VmHWM to the current RSS. Returns the current RSS in bytes.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        print("warning: cannot reset VmHWM; the peak may include earlier allocations", file=sys.stderr)
    return proc_status("VmRSS")


def proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_cpu_memory(method, N, D, V):
    """Runs in a fresh process (see the module docstring): extra peak bytes and time of one step."""
    inputs = make_inputs(N, D, V, torch.float32, "cpu")
    rss = reset_peak_rss()
    t0 = time.perf_counter()
    train_step(method, *inputs)
    seconds = time.perf_counter() - t0
    return dict(extra_bytes=proc_status("VmHWM") - rss, seconds=seconds)


def _in_fresh_process(method, N, D, V):
    spec = json.dumps(dict(method=method, N=N, D=D, V=V))
    out = subprocess.run([sys.executable, "-m", "kernels.bench", "_cpu_memory", spec],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_logprobs_cpu():
    V = 32000
    # (N, D, extra timing rounds): two small shapes for speed, then the 7B head at 8k tokens, whose
    # time comes from the single memory run.
    shapes = ((1024, 1024, 3), (4096, 1024, 2), (8192, 4096, 0))
    print(f"\nlogprobs on CPU: fwd+bwd, fp32, V={V}, torch path (chunk of logits <= {CPU_CHUNK_BYTES // MIB} MiB); "
          f"extra peak RSS over the inputs (MiB), best step time (s);")
    print("mem = extra memory / naive's, speed = naive time / time")
    print(f"{'N':>5} {'D':>5} | {'naive':>15} | {'recompute':>15} {'mem':>5} {'speed':>6} | {'one-pass':>15} {'mem':>5} {'speed':>6}")
    for N, D, rounds in shapes:
        runs = {m: _in_fresh_process(m, N, D, V) for m in METHODS}
        seconds = {m: [r["seconds"]] for m, r in runs.items()}
        inputs = make_inputs(N, D, V, torch.float32, "cpu")
        for _ in range(rounds):
            for m in METHODS:
                t0 = time.perf_counter()
                train_step(m, *inputs)
                seconds[m].append(time.perf_counter() - t0)
        del inputs
        row = {m: (runs[m]["extra_bytes"] / MIB, min(seconds[m])) for m in METHODS}
        (nm, nt) = row["naive"]
        cells = [f"{row[m][0]:7.0f} {row[m][1]:6.2f}s" for m in METHODS]
        print(f"{N:>5} {D:>5} | {cells[0]:>15} | " + " | ".join(
            f"{cells[i]:>15} {row[m][0] / nm:5.0%} {nt / row[m][1]:5.2f}x" for i, m in enumerate(METHODS) if i > 0),
            flush=True)


def bench_logprobs():
    if torch.cuda.is_available():
        bench_logprobs_gpu()
    bench_logprobs_cpu()


# ---------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------

def _tflops(fn, leaves, flops, do_bench=None):
    """Forward, backward and forward+backward TFLOP/s of fn() -> output, backward = 2.5x forward. do_bench(fn,
    grad_to_none) -> ms: Triton's by default (CUDA)."""
    if do_bench is None:
        import triton.testing
        do_bench = triton.testing.do_bench
    fwd = do_bench(fn)
    out = fn()
    dout = torch.randn_like(out)
    bwd = do_bench(lambda: out.backward(dout, retain_graph=True), grad_to_none=leaves)
    both = do_bench(lambda: fn().backward(dout), grad_to_none=leaves)
    return flops / fwd * 1e-9, 2.5 * flops / bwd * 1e-9, 3.5 * flops / both * 1e-9


def attention_flops(B, H, T, D, causal=True, sliding_window=None):
    """Useful forward FLOPs: two matmuls (QK^T and PV), 2 FLOPs per multiply-add, visible pairs only."""
    if sliding_window is not None and not causal:
        raise ValueError("sliding_window requires causal=True")
    if not causal:
        pairs = T * T
    elif sliding_window is None or sliding_window >= T:
        pairs = T * (T + 1) // 2  # query i sees i + 1 keys
    else:
        W = sliding_window  # queries 0..W-1 see i + 1 keys, the remaining T - W see W each
        pairs = W * (W + 1) // 2 + (T - W) * W
    return 4 * B * H * D * pairs


def dpo_rows(n_pairs, P, C, R, shared, device="cpu"):
    """One packed row of n_pairs equal pairs, padded to a multiple of 128: (segment_ids, branch_ids or None, T,
    visible query-key pairs of the real tokens). shared: prompt | chosen | rejected per pair (the prefix
    variant); else prompt + chosen and prompt + rejected as two segments (packing without sharing)."""
    if shared:
        lengths, branches = [P, C, R] * n_pairs, [0, 1, 2] * n_pairs
        segments = [k for k in range(n_pairs) for _ in range(3)]
        visible = n_pairs * (P * (P + 1) // 2 + C * P + C * (C + 1) // 2 + R * P + R * (R + 1) // 2)
    else:
        lengths, branches, segments = [P + C, P + R] * n_pairs, [0, 0] * n_pairs, list(range(2 * n_pairs))
        visible = n_pairs * ((P + C) * (P + C + 1) // 2 + (P + R) * (P + R + 1) // 2)
    used = sum(lengths)
    T = -(-used // 128) * 128
    rep = lambda xs, pad: torch.tensor(xs + [pad]).repeat_interleave(torch.tensor(lengths + [T - used]))  # noqa: E731
    seg = rep(segments, len(lengths))[None].to(device)
    branch = rep(branches, 0)[None].to(device) if shared else None
    return seg, branch, T, visible


def bench_attention_pairs(flash_attention, H=32, H_KV=8, D=128, TOKENS=16384, window=4096):
    # UltraFeedback's medians (prompt : answer ~ 0.42, ~409 tokens per prompt + answer; REFERENCE.md).
    P, A = 121, 288
    print(f"\nattention on DPO pairs: prompt {P} + answers {A} + {A} tokens, packed rows of ~{TOKENS} tokens "
          f"per batch, bf16, {H}/{H_KV} heads, head_dim {D}, window {window}; fwd+bwd time per pair, and TFLOP/s "
          "of the visible pairs")
    print(f"{'pairs/row':>9} | {'shared: T':>9} {'us/pair':>8} {'TFLOP/s':>8} | {'unshared: T':>11} {'us/pair':>8} "
          f"{'TFLOP/s':>8} | {'speed':>6}")
    import triton.testing
    for n in (2, 5, 10, 20):
        cells = []
        for shared in (True, False):
            seg, branch, T, visible = dpo_rows(n, P, A, A, shared, "cuda")
            B = max(1, TOKENS // T)
            seg = seg.expand(B, T).contiguous()
            branch = branch.expand(B, T).contiguous() if shared else None
            q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(B, H_KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            dout = torch.randn_like(q)
            step = lambda: flash_attention(q, k, v, True, window, seg, None, branch).backward(dout)  # noqa: E731
            ms = triton.testing.do_bench(step, grad_to_none=[q, k, v])
            cells.append((T, 1e3 * ms / (B * n), 3.5 * 4 * B * H * D * visible / ms * 1e-9))
            del q, k, v
            torch.cuda.empty_cache()
        (ts, us, tf), (tu, uu, tfu) = cells
        print(f"{n:>9} | {ts:>9} {us:>8.1f} {tf:>8.0f} | {tu:>11} {uu:>8.1f} {tfu:>8.0f} | {uu / us:>5.2f}x", flush=True)


def bench_attention():
    if not torch.cuda.is_available():
        print("\nattention: no CUDA device here, skipped")
        return
    try:
        from kernels.attention import flash_attention
    except ImportError as e:
        print(f"\nattention: kernels.attention not importable ({e}), skipped")
        return
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    H, H_KV, HEAD_DIM, TOKENS = 32, 8, 128, 16384
    print(f"\nattention: TFLOP/s fwd / bwd / fwd+bwd, bf16, causal, {H} heads / {H_KV} KV heads, head_dim {HEAD_DIM}, "
          f"{TOKENS} tokens per batch; flash-attn {'found' if flash_attn_func else 'not installed'}")
    print("segments: each row packed with examples of T/4 tokens (the SFT path); SDPA has no such mask")
    print(f"{'window':>6} {'seg':>4} {'T':>6} {'B':>3} | {'ours':>17} | {'sdpa flash':>17} | {'flash-attn':>17}")
    for window, packed in ((None, False), (None, True), (4096, False)):
        for T in (1024, 2048, 4096, 8192, 16384):
            B = TOKENS // T
            q = torch.randn(B, H, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(B, H_KV, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            flops = attention_flops(B, H, T, HEAD_DIM, True, window)
            cells = []

            seg = None
            if packed:  # flops still count the full causal triangle: segments show as lost TFLOP/s
                seg = (torch.arange(T, device="cuda") // (T // 4)).expand(B, T).contiguous()
            cells.append(_tflops(lambda: flash_attention(q, k, v, causal=True, sliding_window=window, segment_ids=seg),
                                 [q, k, v], flops))

            if packed:
                cells.append(None)
            elif window is None:        # the flash SDPA backend has no sliding window
                k_rep, v_rep = (x.detach().repeat_interleave(H // H_KV, dim=1).requires_grad_() for x in (k, v))

                def sdpa():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
                cells.append(_tflops(sdpa, [q, k_rep, v_rep], flops))
            else:
                cells.append(None)

            if flash_attn_func is not None and not packed:   # (B, T, heads, head_dim) layout, GQA native
                qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
                window_size = (-1, -1) if window is None else (window - 1, 0)     # itself + window-1 before
                cells.append(_tflops(lambda: flash_attn_func(qf, kf, vf, causal=True, window_size=window_size),
                                     [qf, kf, vf], flops))
            else:
                cells.append(None)

            text = [" / ".join(f"{x:4.0f}" for x in c) if c else "n/a" for c in cells]
            print(f"{str(window):>6} {'yes' if packed else 'no':>4} {T:>6} {B:>3} | {text[0]:>17} | {text[1]:>17} | "
                  f"{text[2]:>17}", flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    bench_attention_pairs(flash_attention)

# ---------------------------------------------------------------------------------------------------
# compile: every kernel, every autotune config, compiled for H100 (sm_90) and A100 (sm_80) on this
# CPU machine (ptxas ships inside the triton wheel). Method in ../shared/GPU_AUDIT.md: triton.compile
# on an ASTSource with the signature the runtime would build (pointers, strides, T and window
# divisible by 16; unit strides and absent pointers as constants); shared memory from the kernel's
# metadata, registers and spill bytes from the ptxas log, pipelining from cp.async (or TMA) in the PTX.
# A config whose shared memory exceeds the device's limit is one the autotuner drops on that device
# (its launch fails with OutOfResources and the benchmark skips it): `pruned`.
# ---------------------------------------------------------------------------------------------------

TARGETS = {"sm_90": (90, 232448), "sm_80": (80, 166912)}                 # capability, shared bytes per block
VARIANTS = {                                               # IS_CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX
    "causal": (True, False, False, False), "causal+window": (True, True, False, False),
    "causal+segments": (True, False, True, False), "causal+window+segments": (True, True, True, False),
    "non-causal": (False, False, False, False),
    "causal+prefix": (True, False, False, True), "causal+window+prefix": (True, True, False, True),  # DPO pairs
}
_DIV16 = {"T", "T_BUCKET", "window", "V", "D", "V_SPLIT", "stride_h", "stride_w", "stride_z"}


def _arg_type(kernel, name, dtype):
    """Triton signature type of a kernel argument, from its name (the kernels' naming is regular)."""
    if name in ("LSE", "DELTA", "logp_ptr", "lse_ptr", "ent_ptr", "z_ptr", "c_ptr", "part_ptr"):
        return "*fp32"
    if name in ("SEG", "t_ptr"):
        return "*i64"
    if name == "BOUNDS":
        return "*i32"
    if kernel.startswith("_attn") and name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV") or \
            name in ("h_ptr", "w_ptr", "dz_ptr", "a_ptr", "b_ptr"):
        return "*" + dtype
    if name in ("qk_scale", "softmax_scale"):
        return "fp32"
    return "i32"


def compile_jobs(targets=tuple(TARGETS), dtypes=("bf16", "fp16"), head_dims=(64, 128), variants=tuple(VARIANTS),
                 kernels=None):
    """One job per (kernel, target, dtype, head_dim, variant, config): plain dicts, so a process pool can run them."""
    from kernels import attention as A, logprobs as L
    jobs = []
    for target in targets:
        for dtype in dtypes:
            tl_dtype = {"bf16": "tl.bfloat16", "fp16": "tl.float16"}[dtype]
            for head_dim in head_dims:
                for variant in variants:
                    causal, window, segments, prefix = VARIANTS[variant]
                    flags = dict(HEAD_DIM=head_dim, IS_CAUSAL=causal, HAS_WINDOW=window, HAS_SEGMENTS=segments,
                                 HAS_PREFIX=prefix, UPCAST=False, DOT_PRECISION="tf32")
                    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
                        for cfg in A.tuning_configs(name, head_dim, TARGETS[target][0]):   # after the pruning
                            jobs.append(dict(kernel=name, target=target, dtype=dtype, head_dim=head_dim,
                                             variant=variant, constexprs=flags, config=_config_dict(cfg)))
                jobs.append(dict(kernel="_attn_bwd_delta", target=target, dtype=dtype, head_dim=head_dim,
                                 variant="-", constexprs=dict(HEAD_DIM=head_dim),
                                 config=dict(BLOCK=A.PRE_BLOCK_COMPILED, num_warps=4, num_stages=3)))
            lp = dict(DOT_DTYPE=tl_dtype, PRECISION="tf32")
            for cfg in L.fwd_configs(TARGETS[target][0]):
                jobs.append(dict(kernel="_logprobs_fwd_kernel", target=target, dtype=dtype, head_dim=None,
                                 variant="-", constexprs=lp, config=_config_dict(cfg)))
            jobs.append(dict(kernel="_softmax_grad_kernel", target=target, dtype=dtype, head_dim=None, variant="-",
                             constexprs=dict(WRITE_GRAD=True, **L._softmax_constexprs(tl_dtype)),
                             config=dict(**L._SOFTMAX_BLOCKS, num_warps=L._SOFTMAX_WARPS, num_stages=3)))
            for site, (consts, types) in L._GEMM_SITES.items():              # the three GEMMs of a chunk
                for cfg in L.mm_configs(site, TARGETS[target][0]):            # after the pruning
                    jobs.append(dict(kernel="_matmul_kernel", target=target, dtype=dtype, head_dim=None,
                                     variant=site, constexprs=dict(consts, **lp, ACCUMULATE=site == "grad_weight"),
                                     types={k: t.format(dtype=dtype) for k, t in types.items()},
                                     config=_config_dict(cfg)))
    return [j for j in jobs if kernels is None or j["kernel"] in kernels]


def _config_dict(cfg):
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _jitfn(kernel):
    import triton
    from kernels import attention as A, logprobs as L
    if kernel.startswith("_attn"):
        fn = getattr(A, kernel)
        return fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn     # under triton.autotune or not
    return triton.jit(getattr(L, kernel))


def compile_one(job):
    """Compiles one job; returns the record of the issue (kernel, target, dtype, ..., pipelined)."""
    import contextlib, io, re
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True                              # the ptxas log only comes with a compile
    fn = _jitfn(job["kernel"])
    cfg = dict(job["config"])
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    constexprs = dict(job["constexprs"], **cfg)
    for name, value in list(constexprs.items()):                         # "tl.bfloat16" -> the dtype object
        if isinstance(value, str) and value.startswith("tl."):
            constexprs[name] = getattr(triton.language, value[3:])
    if not constexprs.get("HAS_SEGMENTS", True) and not constexprs.get("HAS_PREFIX"):
        constexprs.update({n: None for n in ("SEG", "BOUNDS") if n in fn.arg_names})
    types = job.get("types", {})
    constexprs.update({n: t for n, t in types.items() if not isinstance(t, str)})     # unit strides: 1
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name) or _arg_type(job["kernel"], name, job["dtype"])
        if signature[name].startswith("*") or name.startswith("stride") or name in _DIV16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    capability, limit = TARGETS[job["target"]]
    rec = dict(kernel=job["kernel"], target=job["target"], dtype=job["dtype"], head_dim=job["head_dim"],
               variant=job["variant"], config=job["config"], ok=False, pruned=False, shared_bytes=None,
               registers=None, spill_bytes=None, pipelined=None, unfenced_loop_stores=None)
    log = io.StringIO()
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                               options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:                                               # a config that does not compile
        lines = str(e).strip().splitlines() or [""]
        rec["error"] = f"{type(e).__name__}: {lines[0][:200]} ... {lines[-1][:300]}"
        return rec
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    ptx = k.asm.get("ptx", "")
    rec.update(ok=True, shared_bytes=k.metadata.shared, pruned=k.metadata.shared > limit,
               registers=int(regs.group(1)) if regs else None,
               spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None,
               pipelined="cp.async" in ptx,                                # cp.async.bulk (TMA) included
               unfenced_loop_stores=unfenced_loop_stores(ptx))
    return rec


def unfenced_loop_stores(ptx):
    """Global stores inside a loop of the PTX that follow a global load of the same loop body with no bar.sync
    between them. Harmless when each thread rewrites only what it read, a race between the warps of a program
    when the stores can land on bytes other warps have yet to load (the log-prob softmax-gradient pass writes
    16-bit dz into the fp32 logits it reads: ../shared/GPU_AUDIT.md). A loop is the code from a label to a
    later branch back to it."""
    import re
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\$L__BB\d+_\d+):", line))}
    count = 0
    for end, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if not m or labels.get(m.group(1), end) >= end:
            continue
        loaded = False
        for body in lines[labels[m.group(1)]:end]:
            if "ld.global" in body:
                loaded = True
            elif re.search(r"\b(bar|barrier)\.sync", body):
                loaded = False
            elif "st.global" in body and loaded:
                count += 1
    return count


def run_compile(jobs, workers=None):
    """Runs the jobs in fresh spawned processes (this one may hold kernels imported in interpreter mode, as
    the tests do), with TRITON_INTERPRET unset in their environment before they import triton."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 16))
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(compile_one, jobs, chunksize=1))   # every worker spawned inside map()
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _config_text(c):
    blocks = "/".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
    return f"{blocks}/{c['num_warps']}w/{c['num_stages']}s"


def print_compile_table(records):
    """One line per (kernel, target, head_dim, variant): configs, pruned, spilling, pipelined, max shared/regs."""
    groups = {}
    for r in records:
        groups.setdefault((r["kernel"], r["target"], r["head_dim"] or "-", r["variant"]), []).append(r)
    print(f"{'kernel':<22} {'target':<6} {'hd':>3} {'variant':<24} {'cfgs':>4} {'fail':>4} {'pruned':>6} "
          f"{'spill':>5} {'pipel.':>6} {'max shared':>10} {'max regs':>8}  spilling configs (kept)")
    for (kernel, target, hd, variant), rs in groups.items():
        kept = [r for r in rs if r["ok"] and not r["pruned"]]
        spilling = sorted({_config_text(r["config"]) + f"={r['spill_bytes']}B" for r in kept if r["spill_bytes"]})
        pipelined = sum(bool(r["pipelined"]) for r in kept)
        print(f"{kernel:<22} {target:<6} {hd!s:>3} {variant:<24} {len(rs):>4} {sum(not r['ok'] for r in rs):>4} "
              f"{sum(r['pruned'] for r in rs):>6} {len(spilling):>5} {pipelined:>3}/{len(kept):<2} "
              f"{max((r['shared_bytes'] or 0) for r in kept) if kept else 0:>10} "
              f"{max((r['registers'] or 0) for r in kept) if kept else 0:>8}  {' '.join(spilling[:4])}")
    print(compile_summary(records))


def compile_summary(records):
    kept = [r for r in records if r["ok"] and not r["pruned"]]
    seg = [r for r in kept if "segments" in r["variant"] or "prefix" in r["variant"]]
    return (f"summary: {len(records)} compiles ({len({r['kernel'] for r in records})} kernels), "
            f"{sum(not r['ok'] for r in records)} failed, {sum(r['pruned'] for r in records)} pruned, "
            f"{len(kept)} kept; kept configs that spill: {sum(bool(r['spill_bytes']) for r in kept)}; "
            f"segment- and prefix-variant configs pipelined: {sum(bool(r['pipelined']) for r in seg)}/{len(seg)}; "
            f"max shared {max(r['shared_bytes'] for r in kept)} B; max registers {max(r['registers'] or 0 for r in kept)}")


def bench_compile(argv):
    import argparse
    p = argparse.ArgumentParser(prog="python -m kernels.bench compile")
    p.add_argument("--json", help="write the records here (a list of dicts)")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--kernels", nargs="+", help="only these kernel function names")
    p.add_argument("--workers", type=int, help="compile processes (default: the CPUs available)")
    args = p.parse_args(argv)
    jobs = compile_jobs(args.targets, args.dtypes, args.head_dims, args.variants, args.kernels)
    t0 = time.time()
    records = run_compile(jobs, args.workers)
    records.sort(key=lambda r: (r['kernel'], r['target'], str(r['head_dim']), r['variant']))
    print_compile_table(records)
    print(f"{len(jobs)} compiles in {time.time() - t0:.0f} s")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.json)


def main(argv):
    if argv[:1] == ["_cpu_memory"]:               # internal: one CPU measurement in a fresh process
        spec = json.loads(argv[1])
        print(json.dumps(measure_cpu_memory(spec["method"], spec["N"], spec["D"], spec["V"])))
        return
    what = argv[0] if argv else "all"
    if what == "compile":
        return bench_compile(argv[1:])
    if what not in ("attention", "logprobs", "all"):
        raise SystemExit(f"usage: python -m kernels.bench [attention|logprobs|all|compile], got {what!r}")
    print_header()
    if what in ("logprobs", "all"):
        bench_logprobs()
    if what in ("attention", "all"):
        bench_attention()


if __name__ == "__main__":
    main(sys.argv[1:])
