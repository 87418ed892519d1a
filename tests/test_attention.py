# kernels/attention.py against a dense-mask fp32 reference, with the Triton kernels running in
# Triton's interpreter on CPU tensors.
#
# How Triton 3.7 chooses the interpreter: not at `import triton`, but each time the @triton.jit
# decorator runs (triton/runtime/jit.py consults triton.knobs.runtime.interpret, which reads
# TRITON_INTERPRET from the environment at that moment). What counts is therefore the variable's
# value when kernels/attention.py is executed, and another test module in this pytest process may
# already have imported kernels.attention with compiled kernels. So this module executes its own
# private copy of the file with the variable set (whatever was imported before), then restores the
# variable so other test modules see no change. flash_attention reads the variable again at call
# time (to pick the kernels over SDPA for CPU tensors), hence the autouse fixture below.
import importlib.util
import math
import os
import pathlib

import numpy as np
import pytest
import torch

from kernels import masks

_FILE = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "attention.py"


def _load_attention(interpret):
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        name = "_attention_interpreted" if interpret else "_attention_compiled"
        spec = importlib.util.spec_from_file_location(name, _FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


attn = _load_attention(interpret=True)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    assert attn._INTERPRETED
    assert isinstance(attn._attn_fwd.fn, InterpretedFunction)  # autotune wraps the jitted function


# ----------------------------------------------------------------------------------------------
# Helpers

# Tolerances, as a fraction of max|expected|:
# - fp32: the kernels and the reference differ only in summation order (tiles, online softmax with
#   exp2) over at most ~100 terms of O(1) size: a few hundred fp32 ulps at worst, observed ~1e-6.
#   Below magnitude 1 the bound stays absolute (1e-5): results that cancel to ~0 (dq at T=1 is
#   exactly 0) carry the rounding noise of their O(1) terms, not of themselves.
# - fp16/bf16: in the interpreter the kernels compute in fp32 (the same inputs, upcast), so the
#   output differs by its final rounding: at most one step of the 16-bit format at the largest
#   magnitude (a whole step, not half: the interpreter converts fp32 -> bf16 by truncation, where
#   a GPU rounds to nearest). Gradients get a second step: besides their own rounding, the
#   backward pass takes delta = rowsum(dO * O) from the stored 16-bit O, as FlashAttention-2 does,
#   while the reference differentiates its fp32 O. Observed: up to 1.0 step (output), 1.35 (grads).
FP32_REL = 1e-5
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def assert_close(actual, expected, what, steps=1):
    expected = expected.float()
    magnitude = max(expected.abs().max().item(), 1e-6)
    tol = FP32_REL * max(magnitude, 1.0)
    if actual.dtype in MANTISSA_BITS:
        tol += steps * 2.0 ** (math.floor(math.log2(magnitude)) - MANTISSA_BITS[actual.dtype])
    err = (actual.float() - expected).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > tolerance {tol:.3g} (max|expected| {magnitude:.3g})"
    return err


def packed_segments(*rows):
    """segment_ids (B, T) for packed rows, given each row's example lengths: (3, 2) -> [0, 0, 0, 1, 1]."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def prefix_layout(*rows, T):
    """segment_ids, branch_ids (B, T) of rows of DPO pairs, each row given as (prompt, chosen, rejected) lengths
    laid out prompt | chosen | rejected, segment k per pair, branches 0 | 1 | 2; the rest of the row is padding,
    a segment of its own (branch 0)."""
    seg, branch = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for k, lengths in enumerate(row):
            for name, n in enumerate(lengths):
                seg[b, t:t + n], branch[b, t:t + n] = k, name
                t += n
        assert t <= T, f"row {b}: {t} tokens > T={T}"
        seg[b, t:] = len(row)
    return seg, branch


def random_qkv(B, H, H_kv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g).to(dtype) for h in (H, H_kv, H_kv)]


def check_against_reference(q, k, v, causal=True, sliding_window=None, segment_ids=None, softmax_scale=None,
                            leaves=None, to_bhtd=lambda g: g, branch_ids=None):
    """Run flash_attention forward and backward; compare output and dq, dk, dv with the reference.

    q, k, v are (B, H, T, D) views; `leaves` are the tensors holding .grad (default q, k, v), and
    to_bhtd maps a leaf's gradient to (B, H, T, D) for non-contiguous cases."""
    leaves = leaves or [q, k, v]
    o = attn.flash_attention(q, k, v, causal, sliding_window, segment_ids, softmax_scale, branch_ids)
    assert o.shape == q.shape and o.dtype == q.dtype
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.dtype)
    o.backward(do)

    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = attn.reference_attention(*ref_in, causal, sliding_window, segment_ids, softmax_scale, branch_ids)
    ref.backward(do.float())

    errors = {"out": assert_close(o, ref, "output")}
    for name, leaf, r in zip(("dq", "dk", "dv"), leaves, ref_in):
        grad = to_bhtd(leaf.grad)
        assert grad.shape == r.shape and leaf.grad.dtype == leaf.dtype, name
        errors[name] = assert_close(grad, r.grad, name, steps=2)
    return errors


# ----------------------------------------------------------------------------------------------
# The convention


def dense_loop_mask(T, W=None, seg=None, causal=True):
    # Written out pair by pair, the way the convention reads: i sees j iff j <= i, i - j < W, same segment.
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            ok = (j <= i) if causal else True
            if W is not None:
                ok = ok and i - j < W
            if seg is not None:
                ok = ok and seg[i] == seg[j]
            mask[i, j] = ok
    return mask


@pytest.mark.parametrize("W", [1, 2, 5, 9, 40])
def test_window_sees_itself_and_w_minus_1_earlier_tokens(W):
    T = 9
    mask = attn.attention_mask(T, sliding_window=W)
    assert mask.shape == (1, 1, T, T) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], dense_loop_mask(T, W))
    # Spelled out for the last query: itself and min(W, T) - 1 tokens before it.
    assert mask[0, 0, T - 1].nonzero().flatten().tolist() == list(range(max(0, T - W), T))


def test_segments_mask_attention_across_examples():
    seg = packed_segments((3, 4, 2), (9,))
    seg[1] = torch.tensor([5, 5, 1, 1, 5, 5, 2, 2, 2])  # ids need not be sorted: 5 reappears
    mask = attn.attention_mask(9, sliding_window=3, segment_ids=seg)
    assert mask.shape == (2, 1, 9, 9)
    for b in range(2):
        assert torch.equal(mask[b, 0], dense_loop_mask(9, 3, seg[b].tolist()))
    bidirectional = attn.attention_mask(9, segment_ids=seg, causal=False)
    for b in range(2):
        assert torch.equal(bidirectional[b, 0], dense_loop_mask(9, None, seg[b].tolist(), causal=False))


@pytest.mark.parametrize("causal,W", [(True, None), (True, 4), (True, 20), (False, None)])
def test_attention_flops_counts_visible_pairs(causal, W):
    B, H, T, D = 2, 3, 11, 16
    pairs = attn.attention_mask(T, W, causal=causal).sum().item()
    from kernels.bench import attention_flops  # after `attn` above: kernels.bench imports triton
    assert attention_flops(B, H, T, D, causal, W) == 4 * B * H * D * pairs


# ----------------------------------------------------------------------------------------------
# Kernels against the reference: values and all three gradients

CASES = {
    # name: (B, H, H_kv, T, D, dtype, sliding_window, segment lengths per row or None)
    "T1": (1, 2, 2, 1, 32, torch.float32, None, None),
    "T17-mha": (2, 2, 2, 17, 32, torch.float32, None, None),
    "T100-gqa4-bf16-D64": (1, 4, 1, 100, 64, torch.bfloat16, None, None),
    # Windows of 2 and 18 put the oldest visible key one past a 16-wide tile boundary (16 is the
    # interpreter's tile size): the window's loop bounds get no slack there.
    "T17-gqa4-window2": (2, 4, 1, 17, 32, torch.float32, 2, None),
    "T100-window18-bf16": (1, 2, 2, 100, 32, torch.bfloat16, 18, None),
    "T100-window1": (1, 2, 1, 100, 32, torch.float32, 1, None),
    "T100-gqa4-segments": (2, 4, 1, 100, 32, torch.float32, None, [(30, 1, 45, 24), (60, 40)]),
    "T100-gqa2-segments-window16-bf16": (1, 4, 2, 100, 64, torch.bfloat16, 16, [(7, 50, 43)]),
    "T17-segments-fp16": (1, 2, 2, 17, 32, torch.float16, None, [(5, 12)]),
    "T33-window7-D128-bf16": (1, 2, 1, 33, 128, torch.bfloat16, 7, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference(name):
    B, H, H_kv, T, D, dtype, W, lengths = CASES[name]
    q, k, v = (x.requires_grad_() for x in random_qkv(B, H, H_kv, T, D, dtype))
    seg = packed_segments(*lengths) if lengths else None
    check_against_reference(q, k, v, sliding_window=W, segment_ids=seg)


# The straight-line segment path: each tile walks a masked edge range and an unmasked interior range
# computed from segment starts (kernels/attention.py, _key_ranges / _query_ranges). Tiles are 16 wide
# in the interpreter, so segments of 1-15 tokens sit inside one tile, and a segment boundary or a
# window edge falls inside a tile, on it, or one past it.
SEGMENT_CASES = {
    # name: (B, H, H_kv, T, D, dtype, sliding_window, segment lengths per row)
    "odd-T-many-short-gqa4-fp32": (2, 4, 1, 77, 32, torch.float32, None, [(3, 1, 13, 16, 17, 2, 25), (33, 44)]),
    "boundaries-on-tiles-bf16": (1, 4, 1, 64, 32, torch.bfloat16, None, [(16, 32, 16)]),
    "window-and-segments-gqa4-fp32": (2, 4, 1, 61, 32, torch.float32, 9, [(5, 40, 16), (1, 1, 59)]),
    "window-and-segments-bf16": (1, 4, 1, 71, 64, torch.bfloat16, 20, [(50, 3, 18)]),
    "long-segment-interior-tiles-fp32": (1, 2, 2, 83, 32, torch.float32, None, [(2, 80, 1)]),
}


@pytest.mark.parametrize("name", list(SEGMENT_CASES))
def test_segment_path_matches_dense_mask_reference(name):
    B, H, H_kv, T, D, dtype, W, lengths = SEGMENT_CASES[name]
    q, k, v = (x.requires_grad_() for x in random_qkv(B, H, H_kv, T, D, dtype, seed=3))
    check_against_reference(q, k, v, sliding_window=W, segment_ids=packed_segments(*lengths))


def test_segment_path_with_padding_segment_at_the_end():
    # Packed SFT with right padding: the model gives padding id -1 (ids not monotone, one run each).
    T = 45
    seg = packed_segments((20, 25))
    seg[0, 37:] = -1
    q, k, v = (x.requires_grad_() for x in random_qkv(1, 4, 1, T, 32, torch.float32, seed=4))
    check_against_reference(q, k, v, sliding_window=30, segment_ids=seg)


def test_segment_bounds_match_brute_force():
    g = torch.Generator().manual_seed(5)
    seg = torch.cat([torch.randint(0, 4, (3, 37), generator=g), packed_segments((10, 27))])
    first, last, run_start, run_end = attn.segment_bounds(seg).long()
    for b in range(seg.shape[0]):
        for i in range(seg.shape[1]):
            same = (seg[b] == seg[b, i]).nonzero().squeeze(1)
            assert (first[b, i], last[b, i]) == (same.min(), same.max())
            lo = i
            while lo > 0 and seg[b, lo - 1] == seg[b, i]:
                lo -= 1
            hi = i
            while hi < seg.shape[1] - 1 and seg[b, hi + 1] == seg[b, i]:
                hi += 1
            assert (run_start[b, i], run_end[b, i]) == (lo, hi)


# ----------------------------------------------------------------------------------------------
# Prompt-shared segments (branch_ids): a DPO pair prompt | chosen | rejected is one segment; the rejected
# answer sees the prompt and itself, with positions as if the chosen answer were absent.


def unpacked(x, b, lo, pieces):
    # x (B, H, T, D) -> (1, H, L, D): the positions [lo + a, lo + a + n) for each (a, n) of pieces, in order.
    return torch.cat([x[b:b + 1, :, lo + a:lo + a + n] for a, n in pieces], dim=2)


@pytest.mark.parametrize("path", ["kernels", "cpu", "reference"])
@pytest.mark.parametrize("W", [None, 6])
def test_each_answer_attends_as_in_its_own_unpacked_prompt_plus_answer_sequence(monkeypatch, path, W):
    # The independent definition: a packed pair's answer gets exactly what plain causal attention (window
    # included, positions 0, 1, ... of the sequence) gives on the unpacked prompt + that answer. W=6 is shorter
    # than every pair, so a rejected token's window reaches back into the prompt past the chosen answer.
    pairs = [(5, 4, 7), (9, 1, 3), (2, 6, 1)]
    T = 45
    seg, branch = prefix_layout(pairs, T=T)
    q, k, v = random_qkv(1, 4, 2, T, 16, torch.float32, seed=7)
    if path == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
    fn = attn.reference_attention if path == "reference" else attn.flash_attention
    o = fn(q, k, v, True, W, seg, None, branch)
    t = 0
    for P, C, R in pairs:
        for start, n in ((P, C), (P + C, R)):
            x = [unpacked(y, 0, t, [(0, P), (start, n)]) for y in (q, k, v)]
            expect = attn.reference_attention(*x, True, W)[:, :, P:]
            torch.testing.assert_close(o[:, :, t + start:t + start + n], expect, rtol=0, atol=2e-6)
        expect = attn.reference_attention(*[unpacked(y, 0, t, [(0, P)]) for y in (q, k, v)], True, W)
        torch.testing.assert_close(o[:, :, t:t + P], expect, rtol=0, atol=2e-6)
        t += P + C + R


def test_shared_positions_restart_the_rejected_answer_at_the_prompts_length():
    seg, branch = prefix_layout([(3, 2, 4), (1, 1, 1)], T=16)
    assert masks.shared_positions(seg, branch).tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 6, 0, 1, 1, 0, 1, 2, 3]]
    # The convention's own definition: the tokens a token sees before it.
    seg, branch = prefix_layout([(7, 5, 9), (2, 0, 3), (4, 6, 0)], [(1, 30, 1)], T=37)
    visible = attn.attention_mask(37, None, seg, branch_ids=branch)[:, 0].sum(-1) - 1
    assert torch.equal(masks.shared_positions(seg, branch), visible)


@pytest.mark.parametrize("W", [None, 1, 2, 5, 12])
def test_prefix_bounds_give_each_token_its_ranges(W):
    # prefix_bounds' planes (kernels/masks.py) against the dense mask, position by position: a query sees
    # exactly [a_lo, a_hi) and its branch's last W tokens; a key is seen by all of [j, c_hi) and by no query
    # outside [j, q_end) (q_end - 1 sees it); without a window exactly by [j, kend); lpos is the position.
    T = 48  # row 0 ends in 3 tokens of padding, row 1 in 12 (segments of their own, branch 0)
    seg, branch = prefix_layout([(7, 5, 9), (2, 0, 3), (4, 6, 0), (3, 3, 3)], [(1, 30, 1), (0, 2, 2)], T=T)
    mask = attn.attention_mask(T, W, seg, branch_ids=branch)[:, 0]
    kend, own_lo, a_lo, a_hi, c_hi, q_end, lpos = masks.prefix_bounds(seg, branch, W).long()
    start = torch.tensor([[(seg[b] == seg[b, i]).nonzero().min() for i in range(T)] for b in range(2)])
    assert torch.equal(lpos - start, masks.shared_positions(seg, branch))
    for b in range(2):
        for i in range(T):
            own = range(max(own_lo[b, i], i - W + 1 if W else 0), i + 1)
            assert set(mask[b, i].nonzero().flatten().tolist()) == set(range(a_lo[b, i], a_hi[b, i])) | set(own)
            queries = mask[b, :, i].nonzero().flatten().tolist()
            assert set(range(i, c_hi[b, i])) <= set(queries) and (c_hi[b, i] == T or not mask[b, c_hi[b, i], i])
            assert max(queries) == q_end[b, i] - 1
            if W is None:
                assert set(queries) == set(range(i, kend[b, i]))


PREFIX_CASES = {
    # name: (B, H, H_kv, T, D, dtype, sliding_window, pairs (prompt, chosen, rejected) per row). Tiles are 16
    # wide in the interpreter: prompts and answers end inside tiles, on their edges and one past them.
    "odd-lengths-gqa4-fp32": (2, 4, 1, 77, 32, torch.float32, None,
                              [[(13, 17, 23), (3, 9, 5)], [(31, 1, 1), (7, 11, 19)]]),
    "one-token-answers-bf16": (1, 4, 2, 57, 32, torch.bfloat16, None, [[(20, 1, 1), (1, 1, 1), (16, 1, 1), (5, 1, 2)]]),
    "pair-longer-than-window-gqa2-fp32": (1, 4, 2, 96, 32, torch.float32, 9, [[(33, 30, 31)]]),
    "window-many-pairs-gqa4-fp32": (2, 4, 1, 61, 32, torch.float32, 16,
                                    [[(16, 16, 16), (4, 4, 5)], [(1, 20, 3), (9, 2, 25)]]),
    "window-bf16-D64": (1, 2, 1, 71, 64, torch.bfloat16, 20, [[(21, 30, 17)]]),
    "long-answers-interior-tiles-fp32": (1, 2, 2, 100, 32, torch.float32, None, [[(18, 40, 35)]]),
}


@pytest.mark.parametrize("name", list(PREFIX_CASES))
def test_prefix_variant_matches_dense_mask_reference(name):
    B, H, H_kv, T, D, dtype, W, rows = PREFIX_CASES[name]
    seg, branch = prefix_layout(*rows, T=T)
    q, k, v = (x.requires_grad_() for x in random_qkv(B, H, H_kv, T, D, dtype, seed=5))
    check_against_reference(q, k, v, sliding_window=W, segment_ids=seg, branch_ids=branch)


@pytest.mark.parametrize("W", [None, 20])
def test_prefix_variant_visits_only_tiles_holding_a_visible_pair(monkeypatch, W):
    # Two key ranges per query tile (the prompt's, its own branch's) and two query ranges per key tile: with
    # tile-aligned pairs no tile without a visible pair is computed (the chosen answer's tiles are skipped by
    # the rejected answer's). Counted as tl.dot calls: 2 per tile in the forward, 4 in dk/dv and 3 in dq.
    from triton.runtime import interpreter
    seg, branch = prefix_layout([(16, 32, 48), (16, 16, 16)], T=144)
    mask = attn.attention_mask(144, W, seg, branch_ids=branch)[0, 0]
    tiles = int(mask.view(9, 16, 9, 16).any(-1).any(1).sum())  # (query tile, key tile) pairs with a visible pair
    dots = []
    dot = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", lambda self, *a: dots.append(1) or dot(self, *a))
    B, H = 1, 2
    q, k, v = (x.requires_grad_() for x in random_qkv(B, H, 1, 144, 16, torch.float32))
    o = attn.flash_attention(q, k, v, True, W, seg, None, branch)
    assert len(dots) == 2 * tiles * B * H
    o.sum().backward()
    assert len(dots) == (2 + 4 + 3) * tiles * B * H


def test_prefix_layout_and_arguments_are_checked():
    q, k, v = random_qkv(1, 2, 2, 8, 16, torch.float32)
    seg, branch = prefix_layout([(3, 2, 3)], T=8)
    with pytest.raises(ValueError, match="need segment_ids and causal=True"):
        attn.flash_attention(q, k, v, branch_ids=branch)
    with pytest.raises(ValueError, match="need segment_ids and causal=True"):
        attn.flash_attention(q, k, v, causal=False, segment_ids=seg, branch_ids=branch)
    with pytest.raises(ValueError, match=r"branch_ids must be a \(B, T\)"):
        attn.flash_attention(q, k, v, segment_ids=seg, branch_ids=branch[:, :5])
    with pytest.raises(ValueError, match="position 5: branch 1 follows branch 2"):
        attn.flash_attention(q, k, v, segment_ids=seg, branch_ids=torch.tensor([[0, 0, 0, 1, 2, 1, 2, 2]]))
    with pytest.raises(ValueError, match="must be 0 \\(shared prefix\\), 1 or 2"):
        attn.flash_attention(q, k, v, segment_ids=seg, branch_ids=branch + 1)
    with pytest.raises(ValueError, match="occurs in more than one run"):
        attn.flash_attention(q, k, v, segment_ids=torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0]]), branch_ids=branch)


def test_model_gives_right_padded_batches_the_plain_causal_kernel(monkeypatch):
    # model.py's mask choice on the CUDA path (x only needs .is_cuda, .dtype, .shape and .device here).
    import types
    import model
    monkeypatch.setattr(model, "_flash_attention", lambda: "flash")
    this = types.SimpleNamespace(config=model.config_from_preset("tiny"))
    x = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(2, 6, 128), device=torch.device("cpu"))
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    packed = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1, 1]])
    mask = model.Mistral._mask(this, x, 6, right, None, None)
    assert mask.kind == "flash" and mask.segment_ids is None
    mask = model.Mistral._mask(this, x, 6, left, None, None)
    assert mask.segment_ids.tolist() == [[-1, -1, 0, 0, 0, 0], [0] * 6]
    mask = model.Mistral._mask(this, x, 6, right, packed, None)  # packed SFT keeps its segments
    assert mask.segment_ids.tolist() == [[0, 0, 1, 1, -1, -1], [0, 0, 0, 1, 1, 1]]


def test_model_gives_prompt_shared_rows_the_prefix_kernel_in_16_bit_and_sdpa_otherwise(monkeypatch):
    # model.py's mask choice with branch_ids (packed DPO): the Triton kernels on CUDA in bf16, the dense convention
    # (SDPA) for fp32 on CUDA, flash_attention's two-calls-per-pair path on CPU.
    import types
    import model
    monkeypatch.setattr(model, "_flash_attention", lambda: "flash")
    this = types.SimpleNamespace(config=model.config_from_preset("tiny"))
    seg, branch = prefix_layout([(2, 2, 2)], T=8)
    for is_cuda, dtype, kind in ((True, torch.bfloat16, "flash"), (True, torch.float32, "dense"),
                                 (False, torch.float32, "flash")):
        x = types.SimpleNamespace(is_cuda=is_cuda, shape=(1, 8, 128), device=torch.device("cpu"), dtype=dtype)
        mask = model.Mistral._mask(this, x, 8, None, seg, None, branch)
        assert mask.kind == kind
        if kind == "flash":
            assert mask.branch_ids is branch and mask.segment_ids is seg
        else:
            assert torch.equal(mask.dense, attn.attention_mask(8, 256, seg, branch_ids=branch))


@pytest.mark.parametrize("lengths", [None, [(10, 23), (33,)]])
def test_non_causal_matches_reference(lengths):
    q, k, v = (x.requires_grad_() for x in random_qkv(2, 4, 2, 33, 32, torch.float32))
    seg = packed_segments(*lengths) if lengths else None
    check_against_reference(q, k, v, causal=False, segment_ids=seg, softmax_scale=0.3)


def test_segment_ids_need_not_be_sorted():
    # Tile ranges come from each id's first/last position and its run (kernels/masks.py, segment_bounds); with
    # interleaved and reappearing ids they must skip nothing that is visible and leave no invisible
    # pair in an unmasked tile. int16 ids: segment_bounds takes any integer dtype.
    T = 48
    seg = torch.stack([torch.arange(T) % 3, torch.tensor([7] * 16 + [2] * 16 + [7] * 16)]).to(torch.int16)
    q, k, v = (x.requires_grad_() for x in random_qkv(2, 2, 1, T, 32, torch.float32))
    check_against_reference(q, k, v, sliding_window=20, segment_ids=seg)


def test_non_contiguous_inputs_read_in_place():
    # The model's layout: projections give (B, T, H, D), viewed as (B, H, T, D) by a transpose.
    B, H, H_kv, T, D = 2, 4, 2, 33, 32
    g = torch.Generator().manual_seed(0)
    q_bthd = torch.randn(B, T, H, D, generator=g).to(torch.bfloat16).requires_grad_()
    k_bthd = torch.randn(B, T, H_kv, D, generator=g).to(torch.bfloat16).requires_grad_()
    v_bthd = torch.randn(B, T, H_kv, D, generator=g).to(torch.bfloat16).requires_grad_()
    q, k, v = (x.transpose(1, 2) for x in (q_bthd, k_bthd, v_bthd))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, sliding_window=9, segment_ids=packed_segments((20, 13), (33,)),
                            leaves=[q_bthd, k_bthd, v_bthd], to_bhtd=lambda g: g.transpose(1, 2))


def test_window_of_one_returns_each_tokens_own_value():
    # Independent of the reference: a token that sees only itself outputs its own value vector.
    q, k, v = random_qkv(1, 4, 2, 21, 16, torch.float32)
    o = attn.flash_attention(q, k, v, sliding_window=1)
    torch.testing.assert_close(o, v.repeat_interleave(2, dim=1), rtol=0, atol=1e-6)


def test_saved_logsumexp_matches_dense_logsumexp():
    B, H, T, D, W = 1, 2, 40, 32, 11
    q, k, v = random_qkv(B, H, 1, T, D, torch.float32)
    seg = packed_segments((25, 15))
    o, lse = attn._triton_forward(q, k, v, True, W, seg, attn.segment_bounds(seg), 0.2)
    # The reference in float64: an fp32 CPU matmul may run at reduced internal precision (oneDNN's
    # fpmath mode, torch's fp32 matmul precision), which alone can move lse by ~1e-5; the kernel's
    # own error against float64 is ~5e-7 here.
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.2  # (B, H, T, T); k broadcasts over the H heads
    scores = scores.masked_fill(~attn.attention_mask(T, W, seg), float("-inf"))
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=0, atol=1e-5)


@pytest.fixture
def bounds_checked_interpreter(monkeypatch):
    """Every load and store of an interpreted kernel must touch only bytes of that launch's tensor
    arguments (the interpreter reads host memory at raw addresses, so a stray read returns whatever
    lies there instead of failing), and every torch.empty/empty_like comes back filled with NaN (or a
    huge int), so an output element the kernels never write, or a buffer read before it is written,
    shows up as NaN in the comparison. Hooks Triton 3.7's interpreter internals (pinned)."""
    from triton.runtime import interpreter

    ranges = []
    init_args = interpreter.GridExecutor._init_args_hst

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges[:] = [(a.untyped_storage().data_ptr(), a.untyped_storage().nbytes())
                     for a in [*args_hst, *kwargs_hst.values()] if isinstance(a, torch.Tensor)]
        return args_hst, kwargs_hst

    def check(ptrs, mask, size, what):
        p = ptrs.data.astype("uint64")[np.broadcast_to(mask.data, ptrs.data.shape)]
        inside = np.zeros(p.shape, dtype=bool)
        for start, nbytes in ranges:
            inside |= (p >= start) & (p + size <= start + nbytes)
        if not inside.all():
            raise AssertionError(f"{what} of {int((~inside).sum())} addresses outside the launch tensors")

    load, store = interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store

    def masked_load(self, ptrs, mask, other, *args):
        check(ptrs, mask, interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize, "load")
        return load(self, ptrs, mask, other, *args)

    def masked_store(self, ptrs, value, mask, *args):
        check(ptrs, mask, value.data.dtype.itemsize, "store")
        return store(self, ptrs, value, mask, *args)

    def poisoned(make):
        def make_poisoned(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan") if t.dtype.is_floating_point else torch.iinfo(t.dtype).max // 3)
        return make_poisoned

    monkeypatch.setattr(interpreter.GridExecutor, "_init_args_hst", init_args_hst)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", masked_load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", masked_store)
    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))


@pytest.mark.parametrize("case", ["window-and-segments-gqa4-fp32", "long-segment-interior-tiles-fp32",
                                  "odd-T-many-short-gqa4-fp32", "T17-gqa4-window2", "non-causal-segments",
                                  "prefix-window"])
def test_kernels_touch_only_their_arguments_and_write_every_output(bounds_checked_interpreter, case):
    if case == "non-causal-segments":
        q, k, v = (x.requires_grad_() for x in random_qkv(2, 4, 2, 33, 32, torch.float32))
        check_against_reference(q, k, v, causal=False, segment_ids=packed_segments((10, 23), (33,)))
        return
    if case == "prefix-window":  # the prefix table is (7, B, T): every plane's reads stay inside it
        seg, branch = prefix_layout([(13, 17, 23), (3, 9, 5)], [(31, 1, 1), (7, 11, 19)], T=77)
        q, k, v = (x.requires_grad_() for x in random_qkv(2, 4, 1, 77, 32, torch.float32))
        check_against_reference(q, k, v, sliding_window=11, segment_ids=seg, branch_ids=branch)
        return
    B, H, H_kv, T, D, dtype, W, lengths = {**CASES, **SEGMENT_CASES}[case]
    q, k, v = (x.requires_grad_() for x in random_qkv(B, H, H_kv, T, D, dtype, seed=3))
    check_against_reference(q, k, v, sliding_window=W, segment_ids=packed_segments(*lengths) if lengths else None)
    # The hook itself bites: K and V one row shorter than Q (fresh storage), so the last key tile reads past them.
    k_short, v_short = (x.detach()[:, :, :T - 1].clone() for x in (k, v))
    with pytest.raises(Exception, match="addresses outside the launch tensors"):
        attn._triton_forward(q.detach(), k_short, v_short, True, W, None, None, 1.0)


@pytest.mark.parametrize("W,lengths", [(None, None), (6, [(9, 8)])])
def test_cpu_torch_path_matches_reference(monkeypatch, W, lengths):
    monkeypatch.delenv("TRITON_INTERPRET")  # plain CPU: SDPA with attention_mask, the model's path
    q, k, v = random_qkv(1, 4, 2, 17, 24, torch.float32)  # D=24: any head dim on this path
    seg = packed_segments(*lengths) if lengths else None
    o = attn.flash_attention(q, k, v, sliding_window=W, segment_ids=seg)
    torch.testing.assert_close(o, attn.reference_attention(q, k, v, True, W, seg), rtol=0, atol=1e-5)


@pytest.mark.parametrize("W", [None, 7, 30])
def test_cpu_prefix_path_matches_reference_with_gradients(monkeypatch, W):
    # Segment by segment on CPU (kernels/masks.py, segmented_attention); W=30 is longer than the padding tail,
    # W=7 shorter (the tail then takes the dense window mask).
    monkeypatch.delenv("TRITON_INTERPRET")
    seg, branch = prefix_layout([(5, 4, 7), (1, 1, 1)], [(9, 2, 13)], T=40)
    q, k, v = (x.requires_grad_() for x in random_qkv(2, 4, 2, 40, 24, torch.float32))
    check_against_reference(q, k, v, sliding_window=W, segment_ids=seg, branch_ids=branch)


# ----------------------------------------------------------------------------------------------
# Bad input


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


BAD_INPUTS = {
    "q-rank": (dict(q=_t(2, 8, 32)), "q must be a 4-d tensor"),
    "k-v-shapes": (dict(v=_t(1, 2, 8, 16)), "k and v must have the same shape"),
    "heads-not-multiple": (dict(q=_t(1, 3, 8, 32)), "multiple of the number of kv heads"),
    "length-mismatch": (dict(k=_t(1, 2, 9, 32), v=_t(1, 2, 9, 32)), "must match q"),
    "dtype-mismatch": (dict(k=_t(1, 2, 8, 32, dtype=torch.bfloat16)), "share one dtype"),
    "float64": (dict(q=_t(1, 4, 8, 32, dtype=torch.float64), k=_t(1, 2, 8, 32, dtype=torch.float64),
                     v=_t(1, 2, 8, 32, dtype=torch.float64)), "share one dtype"),
    "device-mismatch": (dict(q=_t(1, 4, 8, 32, device="meta")), "one device"),
    "head-dim-not-power-of-two": (dict(q=_t(1, 4, 8, 24), k=_t(1, 2, 8, 24), v=_t(1, 2, 8, 24)), "head dim D"),
    "head-dim-too-large": (dict(q=_t(1, 4, 8, 256), k=_t(1, 2, 8, 256), v=_t(1, 2, 8, 256)), "head dim D"),
    "segments-shape": (dict(segment_ids=torch.zeros(1, 7, dtype=torch.long)), r"segment_ids must be a \(B, T\)"),
    "segments-float": (dict(segment_ids=torch.zeros(1, 8)), "segment_ids must have an integer dtype"),
    "window-zero": (dict(sliding_window=0), "sliding_window must be a positive int"),
    "window-float": (dict(sliding_window=2.5), "sliding_window must be a positive int"),
    "window-not-causal": (dict(sliding_window=4, causal=False), "sliding_window requires causal=True"),
    "scale-negative": (dict(softmax_scale=-1.0), "softmax_scale must be a positive number"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(name):
    overrides, message = BAD_INPUTS[name]
    args = {**dict(q=_t(1, 4, 8, 32), k=_t(1, 2, 8, 32), v=_t(1, 2, 8, 32)), **overrides}
    with pytest.raises(ValueError, match=message):
        attn.flash_attention(**args)


# ----------------------------------------------------------------------------------------------
# Compiled kernels on a GPU, at sizes where the H100 block configurations matter. There P and dS
# are rounded to bf16 before their matmuls (as in FlashAttention-2), hence a wider tolerance: four
# bf16 steps of the magnitude.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp32 on CUDA is refused (below)
@pytest.mark.parametrize("W,lengths", [(None, None), (100, None), (None, [(300, 5, 207)]), (64, [(250, 262)])])
def test_compiled_kernels_match_reference_on_gpu(monkeypatch, dtype, W, lengths):
    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = _load_attention(interpret=False)
    q, k, v = (x.cuda().requires_grad_() for x in random_qkv(2, 8, 2, 512, 128, dtype))
    seg = packed_segments(*lengths * 2).cuda() if lengths else None
    o = compiled.flash_attention(q, k, v, sliding_window=W, segment_ids=seg)
    do = torch.randn_like(o)
    o.backward(do)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = attn.reference_attention(*ref_in, True, W, seg)
    ref.backward(do.float())
    for name, got, want in (("out", o, ref), ("dq", q.grad, ref_in[0].grad),
                            ("dk", k.grad, ref_in[1].grad), ("dv", v.grad, ref_in[2].grad)):
        magnitude = want.abs().max().item()
        tol = magnitude * (2.0 ** -6 if dtype == torch.bfloat16 else 1e-5)
        err = (got.float() - want).abs().max().item()
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_on_cuda_is_refused_naming_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = _load_attention(interpret=False)
    q, k, v = (x.cuda() for x in random_qkv(1, 4, 2, 64, 64, torch.float32))
    with pytest.raises(ValueError, match="float32 on CUDA is not on the Triton kernels' path"):
        compiled.flash_attention(q, k, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16])  # 16-bit: what training runs on the kernels
@pytest.mark.parametrize("W", [None, 100, 4096])
def test_compiled_prefix_variant_matches_reference_on_gpu(monkeypatch, dtype, W):
    # DPO rows at training shapes: pairs of odd lengths, one longer than W=100, a padding tail; tolerance as above.
    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = _load_attention(interpret=False)
    seg, branch = prefix_layout([(121, 288, 290), (7, 1, 1), (100, 17, 160)], [(1000, 3, 5)], T=1024)
    seg, branch = seg.cuda(), branch.cuda()
    q, k, v = (x.cuda().requires_grad_() for x in random_qkv(2, 8, 2, 1024, 128, dtype))
    o = compiled.flash_attention(q, k, v, sliding_window=W, segment_ids=seg, branch_ids=branch)
    do = torch.randn_like(o)
    o.backward(do)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = attn.reference_attention(*ref_in, True, W, seg, None, branch)
    ref.backward(do.float())
    for name, got, want in (("out", o, ref), ("dq", q.grad, ref_in[0].grad),
                            ("dk", k.grad, ref_in[1].grad), ("dv", v.grad, ref_in[2].grad)):
        tol = want.abs().max().item() * (2.0 ** -6 if dtype == torch.bfloat16 else 1e-5)
        err = (got.float() - want).abs().max().item()
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"
