"""Speed and memory of our kernels against the obvious alternatives; prints tables.

    python -m kernels.bench [attention|logprobs|all]        (default: all)

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
    The backward counts 2.5x the forward FLOPs.
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


def print_header():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
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


def _peak_rss_reset():
    # Linux >= 4.0: writing 5 resets VmHWM to the current RSS. Returns the current RSS in bytes.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        print("warning: cannot reset VmHWM; the peak may include earlier allocations", file=sys.stderr)
    return _proc_status("VmRSS")


def _proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_cpu_memory(method, N, D, V):
    """Runs in a fresh process (see the module docstring): extra peak bytes and time of one step."""
    inputs = make_inputs(N, D, V, torch.float32, "cpu")
    rss = _peak_rss_reset()
    t0 = time.perf_counter()
    train_step(method, *inputs)
    seconds = time.perf_counter() - t0
    return dict(extra_bytes=_proc_status("VmHWM") - rss, seconds=seconds)


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

def _tflops(fn, leaves, flops):
    """Forward, backward and forward+backward TFLOP/s of fn() -> output, backward = 2.5x forward."""
    import triton.testing
    fwd = triton.testing.do_bench(fn)
    out = fn()
    dout = torch.randn_like(out)
    bwd = triton.testing.do_bench(lambda: out.backward(dout, retain_graph=True), grad_to_none=leaves)
    both = triton.testing.do_bench(lambda: fn().backward(dout), grad_to_none=leaves)
    return flops / fwd * 1e-9, 2.5 * flops / bwd * 1e-9, 3.5 * flops / both * 1e-9


def bench_attention():
    if not torch.cuda.is_available():
        print("\nattention: no CUDA device here, skipped")
        return
    try:
        from kernels.attention import attention_flops, flash_attention
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
    print(f"{'window':>6} {'T':>6} {'B':>3} | {'ours':>17} | {'sdpa flash':>17} | {'flash-attn':>17}")
    for window in (None, 4096):
        for T in (1024, 2048, 4096, 8192, 16384):
            B = TOKENS // T
            q = torch.randn(B, H, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(B, H_KV, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            flops = attention_flops(B, H, T, HEAD_DIM, True, window)
            cells = []

            cells.append(_tflops(lambda: flash_attention(q, k, v, causal=True, sliding_window=window), [q, k, v], flops))

            if window is None:        # the flash SDPA backend has no sliding window
                k_rep, v_rep = (x.detach().repeat_interleave(H // H_KV, dim=1).requires_grad_() for x in (k, v))

                def sdpa():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
                cells.append(_tflops(sdpa, [q, k_rep, v_rep], flops))
            else:
                cells.append(None)

            if flash_attn_func is not None:   # (B, T, heads, head_dim) layout, GQA native
                qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
                window_size = (-1, -1) if window is None else (window - 1, 0)     # itself + window-1 before
                cells.append(_tflops(lambda: flash_attn_func(qf, kf, vf, causal=True, window_size=window_size),
                                     [qf, kf, vf], flops))
            else:
                cells.append(None)

            text = [" / ".join(f"{x:4.0f}" for x in c) if c else "n/a" for c in cells]
            print(f"{str(window):>6} {T:>6} {B:>3} | {text[0]:>17} | {text[1]:>17} | {text[2]:>17}", flush=True)
            del q, k, v
            torch.cuda.empty_cache()


def main(argv):
    if argv[:1] == ["_cpu_memory"]:               # internal: one CPU measurement in a fresh process
        spec = json.loads(argv[1])
        print(json.dumps(measure_cpu_memory(spec["method"], spec["N"], spec["D"], spec["V"])))
        return
    what = argv[0] if argv else "all"
    if what not in ("attention", "logprobs", "all"):
        raise SystemExit(f"usage: python -m kernels.bench [attention|logprobs|all], got {what!r}")
    print_header()
    if what in ("logprobs", "all"):
        bench_logprobs()
    if what in ("attention", "all"):
        bench_attention()


if __name__ == "__main__":
    main(sys.argv[1:])
