"""token_logprobs against log_softmax of the full fp32 logits, on both CPU paths.

The Triton path runs in the Triton interpreter. TRITON_INTERPRET is set per test (monkeypatch), not
at import: kernels/logprobs.py reads it at call time and decorates its kernels lazily, and its kernels
avoid triton.language's own @jit helpers (tl.sum, tl.max, tl.zeros), which are fixed to one mode when
triton is first imported (see the module docstring). So these tests do not depend on which test
module imported triton first, and they do not leak the interpreter into other modules' tests.
"""

import pytest
import torch
import triton

from kernels import logprobs
from kernels.logprobs import token_logprobs

N, D, V = 37, 48, 1003          # odd on purpose: partial row blocks, vocab tiles and chunks
CHUNK = 16                      # 3 chunks, the last one partial
IGNORE = -100


@pytest.fixture(params=["torch", "triton-interpreter"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert logprobs._uses_triton(torch.device("cpu"), torch.float32) == (request.param != "torch")
    return request.param


@pytest.fixture
def count_sweeps(monkeypatch):
    # Records the passes over the logits (with what each computed); a backward that uses the
    # gradients precomputed in the forward makes none.
    calls = []
    real = logprobs._sweep

    def counting(*args, **kwargs):
        calls.append(dict(kwargs, rows=args[0].shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(logprobs, "_sweep", counting)
    return calls


def make_inputs(dtype, n=N, d=D, v=V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (0.3 * torch.randn(v, d, generator=gen)).to(dtype)     # logits of std ~2
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = IGNORE
    return hidden, weight, targets


def reference(hidden, weight, targets, upstream):
    """Log-probs, lse, entropy and both gradients from the full (N, V) fp32 logits."""
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    logits = h @ w.T
    valid = targets != IGNORE
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1) * valid
    (logp * upstream).sum().backward()
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp.detach(), torch.logsumexp(logits, -1).detach(), entropy.detach(), h.grad, w.grad


def assert_close_in_dtype(actual, expected, operands=0.0):
    """fp32: within 1e-5. bf16: within one bf16 step of the reference rounded to bf16, plus `operands`: the
    error bound of GEMM operands rounded to bf16 (operand_rounding), where the path rounds them."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        return
    assert actual.dtype == torch.bfloat16
    expected = expected.to(torch.bfloat16).float()
    _, exponent = torch.frexp(expected)
    step = torch.ldexp(torch.ones_like(expected), exponent - 8)         # bf16 spacing at |expected|
    step = torch.maximum(step, 1e-5 * expected.abs().max()) + operands  # fp32 noise floor near zero
    err = (actual.float() - expected).abs()
    assert (err <= step).all(), f"max error {err.max().item():.3g} exceeds its bound (max ratio {(err / step).max().item():.2f})"


def operand_rounding(path, hidden, weight, targets, upstream):
    """Bounds on |error| of (grad_hidden, grad_weight) from the 16-bit GEMM operands of the Triton path (as on
    GPU): dz = onehot - softmax rounded to bf16 (to nearest: relative error <= 2^-8 per element), and for
    grad_weight also the scaled hidden rows g * h. From the exact dz:  |dgrad_h| <= 2^-8 |g| (|dz| @ |W|),
    |dgrad_w| <= 2 * 2^-8 |dz|^T @ |g h|. Zero on the torch path (fp32 operands) and for fp32 inputs."""
    if path == "torch" or hidden.dtype == torch.float32:
        return 0.0, 0.0
    valid = targets != IGNORE
    dz = -torch.softmax(hidden.float() @ weight.float().T, dim=-1)                   # (N, V)
    dz[valid.nonzero().squeeze(1), targets[valid]] += 1.0
    g = (upstream * valid).abs()[:, None]                                           # (N, 1)
    return (2.0 ** -8 * g * (dz.abs() @ weight.float().abs()),
            2.0 ** -7 * (dz.abs().T @ (g * hidden.float().abs())))


def run(hidden, weight, targets, upstream, **kwargs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = token_logprobs(h, w, targets, IGNORE, chunk_size=CHUNK, **kwargs)
    (logp * upstream).sum().backward()
    return logp.detach(), None, None, h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_lse_and_entropy_match_full_softmax(path, dtype):
    hidden, weight, targets = make_inputs(dtype)
    logp, lse, entropy = token_logprobs(hidden, weight, targets, IGNORE, return_stats=True, chunk_size=CHUNK)
    ref_logp, ref_lse, ref_entropy, _, _ = reference(hidden, weight, targets, torch.zeros(N))
    assert logp.dtype == lse.dtype == entropy.dtype == torch.float32
    # Both sides compute in fp32 from the same (exactly upcast) inputs, so 1e-5 holds for bf16 too.
    for actual, expected in ((logp, ref_logp), (lse, ref_lse), (entropy, ref_entropy)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (logp[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_recomputed_grads_match_reference_for_random_upstream(path, dtype, count_sweeps):
    hidden, weight, targets = make_inputs(dtype)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1))
    logp, _, _, grad_h, grad_w = run(hidden, weight, targets, upstream)
    ref_logp, _, _, ref_grad_h, ref_grad_w = reference(hidden, weight, targets, upstream)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    assert grad_h.dtype == grad_w.dtype == dtype
    bound_h, bound_w = operand_rounding(path, hidden, weight, targets, upstream)
    assert_close_in_dtype(grad_h, ref_grad_h, bound_h)
    assert_close_in_dtype(grad_w, ref_grad_w, bound_w)
    assert len(count_sweeps) == 1 + (path == "torch")     # backward recomputed (the Triton forward is fused)
    # Only the rows with a target went through the head, in the forward and in the backward.
    assert [c["rows"] for c in count_sweeps] == [N - 8] * len(count_sweeps)  # 8 of the 37 targets are ignored


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_pass_grads_need_no_recompute_when_upstream_is_proportional(path, dtype, count_sweeps):
    hidden, weight, targets = make_inputs(dtype)
    mask = (targets != IGNORE).float()
    upstream = -mask / mask.sum()              # what -(logp * mask).sum() / num_tokens sends back
    logp, _, _, grad_h, grad_w = run(hidden, weight, targets, upstream, expected_grad=mask)
    ref_logp, _, _, ref_grad_h, ref_grad_w = reference(hidden, weight, targets, upstream)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    bound_h, bound_w = operand_rounding(path, hidden, weight, targets, upstream)
    assert_close_in_dtype(grad_h, ref_grad_h, bound_h)
    assert_close_in_dtype(grad_w, ref_grad_w, bound_w)
    assert len(count_sweeps) == 1              # the forward's pass only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_pass_falls_back_to_recompute_when_upstream_is_not_proportional(path, dtype, count_sweeps):
    hidden, weight, targets = make_inputs(dtype)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2))    # per-token factors, like DPO
    _, _, _, grad_h, grad_w = run(hidden, weight, targets, upstream, expected_grad=torch.ones(N))
    _, _, _, ref_grad_h, ref_grad_w = reference(hidden, weight, targets, upstream)
    bound_h, bound_w = operand_rounding(path, hidden, weight, targets, upstream)
    assert_close_in_dtype(grad_h, ref_grad_h, bound_h)
    assert_close_in_dtype(grad_w, ref_grad_w, bound_w)
    assert len(count_sweeps) == 2              # forward, then grad_weight recomputed


def test_frozen_weight_gets_hidden_grad_from_the_forward_pass(path, count_sweeps):
    hidden, weight, targets = make_inputs(torch.float32)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(3))
    h = hidden.clone().requires_grad_()
    (token_logprobs(h, weight, targets, IGNORE, chunk_size=CHUNK) * upstream).sum().backward()
    _, _, _, ref_grad_h, _ = reference(hidden, weight, targets, upstream)
    assert_close_in_dtype(h.grad, ref_grad_h)
    assert len(count_sweeps) == 1


@pytest.mark.parametrize("one_pass", [False, True])
def test_all_targets_ignored_gives_zero_logprobs_and_zero_grads(path, one_pass):
    hidden, weight, _ = make_inputs(torch.float32, n=5)
    targets = torch.full((5,), IGNORE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = torch.ones(5) if one_pass else None
    logp = token_logprobs(h, w, targets, IGNORE, expected_grad=expected)
    logp.sum().backward()
    assert (logp == 0).all()
    assert (h.grad == 0).all() and (w.grad == 0).all()      # also rules out NaN


def test_single_row_with_the_full_mistral_vocab(path):
    # V = 32000 is not a multiple of any block size used; default chunk size.
    hidden, weight, targets = make_inputs(torch.float32, n=1, d=16, v=32000)
    targets[0] = 31999
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = token_logprobs(h, w, targets)
    (3.0 * logp).sum().backward()
    ref_logp, _, _, ref_grad_h, ref_grad_w = reference(hidden, weight, targets, torch.tensor([3.0]))
    torch.testing.assert_close(logp.detach(), ref_logp, rtol=1e-5, atol=1e-5)
    assert_close_in_dtype(h.grad, ref_grad_h)
    assert_close_in_dtype(w.grad, ref_grad_w)


def test_no_grad_call_computes_no_gradients_even_with_expected_grad(path, count_sweeps):
    # A DPO reference pass: parameters require grad, but grad mode is off.
    hidden, weight, targets = make_inputs(torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.no_grad():
        logp = token_logprobs(h, w, targets, IGNORE, expected_grad=torch.ones(N), chunk_size=CHUNK)
    assert not logp.requires_grad
    # torch: one sweep for the log-probs alone; Triton: the fused forward kernel, no sweep.
    assert len(count_sweeps) == (path == "torch")
    assert all(kw.get("grad_h") is None and kw.get("grad_w") is None for kw in count_sweeps)


def test_second_backward_through_a_retained_graph_gives_the_same_grads():
    # The one-pass backward scales its precomputed buffers in place; a second backward must not reuse them.
    hidden, weight, targets = make_inputs(torch.float32)
    mask = (targets != IGNORE).float()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = -(token_logprobs(h, w, targets, IGNORE, expected_grad=mask, chunk_size=CHUNK) * mask).sum()
    loss.backward(retain_graph=True)
    first_h, first_w = h.grad.clone(), w.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, 2 * first_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(targets=torch.tensor([0, 1, 1003, 2])), r"targets\[2\] = 1003 is outside \[0, 1003\)"),
    (dict(targets=torch.tensor([0, -1, 5, 2])), r"targets\[1\] = -1 is outside"),
    (dict(targets=torch.tensor([0, 1, 2])), r"targets: expected shape \(4,\)"),
    (dict(targets=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), r"targets: expected int64"),
    (dict(weight=torch.randn(V, D + 1)), r"weight: expected \(V, D\) with D = 48"),
    (dict(weight=torch.randn(V, D, dtype=torch.float64)), r"weight: expected dtype torch.float32"),
    (dict(hidden=torch.randn(2, 2, D)), r"hidden: expected \(N, D\)"),
    (dict(targets=torch.tensor([0, 1, 2, 3], device="meta")), r"targets: expected device cpu"),
    (dict(expected_grad=torch.ones(3)), r"expected_grad: expected a float tensor of shape \(4,\)"),
])
def test_bad_input_is_rejected_with_a_message_naming_it(change, message):
    args = dict(hidden=torch.randn(4, D), weight=torch.randn(V, D), targets=torch.tensor([0, 1, IGNORE, 2]))
    expected_grad = change.pop("expected_grad", None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        token_logprobs(args["hidden"], args["weight"], args["targets"], IGNORE, expected_grad=expected_grad)


# ---------------------------------------------------------------------------------------------------
# GPU-path plumbing that the interpreter can check: the 16-bit dz written over the fp32 logits, and
# the GEMMs' autotune keys.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,half_step", [(torch.float16, 2.0 ** -12), (torch.bfloat16, 2.0 ** -9)],
                         ids=["fp16", "bf16"])
def test_softmax_grad_writes_16bit_dz_over_its_own_logits(monkeypatch, dtype, half_step):
    # On GPU, dz = onehot - softmax goes out in the model's 16-bit dtype into the first half of each
    # fp32 logits row (the GEMMs then read 16-bit operands). Rows are overwritten while being read.
    # Rounded to nearest, as on GPU: within half a step of |dz| <= 1 (the interpreter's own bf16 cast
    # truncates, a whole step).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    C, Vz = 9, 300                                      # odd: partial row blocks and vocab tiles
    gen = torch.Generator().manual_seed(7)
    z = 3 * torch.randn(C, Vz, generator=gen)
    targets = torch.randint(0, Vz, (C,), generator=gen)
    targets[4] = IGNORE
    expected = torch.softmax(z, dim=1).neg()
    ok = targets != IGNORE
    expected[ok.nonzero().squeeze(1), targets[ok]] += 1.0
    expected[~ok, 0] += 1.0                             # ignored rows: onehot at column 0 (scaled by 0 later)
    lse = torch.logsumexp(z, dim=1)
    expected_logp = z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) - lse    # before z is overwritten
    (logp, out_lse, _), dz = logprobs._triton_softmax_grad_(z, targets, IGNORE, True, dtype)
    assert dz.dtype == dtype and dz.shape == (C, Vz) and dz.stride() == (2 * Vz, 1)
    assert dz.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    assert (dz.float() - expected).abs().max().item() <= half_step + 1e-6
    assert (out_lse - lse).abs().max().item() <= 1e-5
    assert torch.allclose(logp[ok], expected_logp[ok], atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_fused_forward_over_vocabulary_splits_matches_full_softmax(monkeypatch, splits):
    # The fused forward splits the vocabulary across programs (to fill the GPU at small N) and merges the
    # splits' partial stats with a log-sum-exp combine. V = 1003 in splits of 128-column multiples: the
    # last split partial; 8 splits of 128 leave a last split of 107 columns.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    hidden, weight, targets = make_inputs(torch.float32)
    logp, lse, entropy = logprobs._triton_forward(hidden, weight, targets, IGNORE, splits=splits)
    ref_logp, ref_lse, ref_entropy, _, _ = reference(hidden, weight, targets, torch.zeros(N))
    for actual, expected in ((logp, ref_logp), (lse, ref_lse), (entropy, ref_entropy)):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    v_split = logprobs._vocab_split(N, V, None, True, splits)
    assert triton.cdiv(V, v_split) == splits


def test_gemm_autotune_keys_stay_few_over_200_micro_batches(monkeypatch):
    # Triton re-benchmarks every config for each new key. Real micro-batches have a different number
    # of target rows each (here 1,000-9,000 at V=32000, D=4096, the GPU's chunking): the three GEMMs of
    # a training step must stay within a few keys. The sweep runs for real on meta tensors, with the
    # kernels replaced by recorders of their autotune-key arguments.
    keys = set()

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                keys.add((args[6], args[7], args[8], args[0].dtype, args[1].dtype))   # M_KEY, N_KEY, K_KEY
            return launch

    monkeypatch.setattr(logprobs, "_kernels", lambda interpret: (None, None, {False: Recorder(), True: Recorder()}))
    monkeypatch.setattr(logprobs, "_uses_triton", lambda device, dtype: True)
    monkeypatch.setattr(logprobs, "_interpreting", lambda: False)
    monkeypatch.setattr(logprobs, "_triton_softmax_grad_",
                        lambda z, t, ii, wg, dz_dtype: ((z.new_empty(len(t)),) * 3, z.view(dz_dtype)[:, :z.shape[1]]))
    Dm, Vm = 4096, 32000
    weight = torch.empty(Vm, Dm, device="meta", dtype=torch.bfloat16)
    chunk = logprobs.default_chunk_rows(Vm, "cuda")
    rows = torch.randint(1000, 9001, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    for n in rows:
        hidden = torch.empty(n, Dm, device="meta", dtype=torch.bfloat16)
        targets = torch.empty(n, device="meta", dtype=torch.long)
        scale = torch.empty(n, device="meta")
        logprobs._sweep(hidden, weight, targets, IGNORE, chunk, stats=True,
                        grad_h=torch.empty(n, Dm, device="meta"), grad_h_scale=scale,
                        grad_w=torch.empty(Vm, Dm, device="meta"), grad_w_scale=scale)
    assert len({k[:3] for k in keys}) <= 8, sorted(keys)
    assert {k[3] for k in keys} | {k[4] for k in keys} == {torch.bfloat16}      # 16-bit operands only


def test_only_the_accumulating_gemm_tunes_with_a_copy_of_its_output(monkeypatch):
    # Tuning runs each candidate config on the real output: the accumulating GEMM (grad_weight += ...) must be
    # restored after each trial, at the cost of a copy of the LM head's fp32 gradient (memplan counts it); the
    # GEMMs that write their output (the logits chunk, grad_hidden) need no copy of the 512 MiB chunk.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, _, mm = logprobs._kernels(False)
    assert mm[True].restore_value == ["c_ptr"] and mm[False].restore_value == []
    assert mm[True].fn is mm[False].fn
