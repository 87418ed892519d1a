# FlashAttention-2 style attention in Triton: causal, sliding window, packed segments, prompt-shared
# segments (DPO pairs), GQA.
#
#   flash_attention(q, k, v, causal=True, sliding_window=None, segment_ids=None, softmax_scale=None,
#                   branch_ids=None)
#     q (B, H, T, D), k and v (B, H_kv, T, D) with H % H_kv == 0  ->  (B, H, T, D) in q's dtype
#
# Masking convention (Hugging Face Mistral's; kernels/masks.py writes it as a dense mask): query i sees
# key j iff j <= i (causal), i - j < W (sliding_window=W: itself and at most W-1 earlier tokens), and
# seg[b, i] == seg[b, j] (segment_ids: packed rows). causal=False keeps only the segment rule.
# With branch_ids: same segment, and the key in my branch or in the segment's shared prefix (branch 0), the
# window measured in logical positions (kernels/masks.py): a pair prompt | chosen | rejected is 0 | 1 | 2.
#
# Layout: autotuning, the Triton kernels (forward, then the three backward kernels), the autograd
# Function, flash_attention (dispatch), and the dense torch reference. Beside it: kernels/masks.py (dense
# mask, segment bounds, input checks), kernels/tuning.py (autotune lists per GPU).
#
# Dispatch: CUDA tensors run the Triton kernels. CPU tensors run torch's SDPA with the same boolean
# mask, unless TRITON_INTERPRET=1, in which case the Triton kernels run in Triton's interpreter
# (how the tests exercise them without a GPU).

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import tuning
from kernels.masks import (attention_mask, check_inputs, check_prefix_layout, prefix_bounds, segment_bounds,
                           segmented_attention)

# Triton decides interpreter-vs-compiled when each @triton.jit decorator runs (it reads
# TRITON_INTERPRET through triton.knobs at that moment), so this module's kernels are interpreted
# iff the variable was "1" when this module was imported. Block sizes and the bf16 upcast follow.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# The kernels work in base 2 (exp2 and log2 are the cheap instructions): scores are multiplied by
# scale * log2(e) once, and the saved natural-log lse is converted back and forth with LOG2E.
LOG2E = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------------------
# Autotuning over kernels/tuning.py's lists (per GPU generation, kernel and head dim). Keys: head dim,
# a power-of-two bucket of T (one tuning per bucket, not per padded DPO length), the mask flags, and
# the dtypes (added by triton.autotune). Each output tile is written once: no reset_to_zero needed.


def _shape(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def tuning_configs(kernel, head_dim, capability=90):
    """The autotune configs of one kernel at one head dim on one GPU generation (what the autotuner
    benchmarks there, after its early pruning)."""
    shapes = tuning.ATTENTION[tuning.arch(capability)][kernel][64 if head_dim <= 64 else 128]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _autotune(kernel):
    if _INTERPRETED:  # the interpreter cannot benchmark several configs; small blocks run fastest there
        return triton.autotune(configs=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)],
                               key=_TUNE_KEY)
    configs = {_shape(c): c for arch in tuning.ATTENTION for hd in (64, 128) for c in tuning_configs(kernel, hd, arch)}

    def for_device(configs_, nargs, **kwargs):  # early_config_prune: this GPU's list at the launch's head dim
        keep = {_shape(c) for c in tuning_configs(kernel, kwargs["HEAD_DIM"], tuning.device_arch(nargs["Q"]))}
        return [c for c in configs_ if _shape(c) in keep]

    return triton.autotune(configs=list(configs.values()), key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": for_device})


_TUNE_KEY = ["T_BUCKET", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_SEGMENTS", "HAS_PREFIX"]
PRE_BLOCK_COMPILED = 128
_PRE_BLOCK = 16 if _INTERPRETED else PRE_BLOCK_COMPILED  # rows per program of the delta preprocessing kernel


# ----------------------------------------------------------------------------------------------
# Helpers shared by the kernels (inlined by Triton). Positions and segment ids arrive pre-broadcast,
# so the same mask serves the (queries x keys) tiles of forward/dq and the (keys x queries) tiles
# of dk/dv.


@triton.jit
def _masked(s, q_pos, k_pos, q_seg, k_seg, T, window,
            IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    mask = (q_pos < T) & (k_pos < T)  # tile rows/columns past the end of the sequence
    if IS_CAUSAL:
        mask = mask & (k_pos <= q_pos)
    if HAS_WINDOW:
        mask = mask & (q_pos - k_pos < window)
    if HAS_SEGMENTS:
        mask = mask & (q_seg == k_seg)
    return tl.where(mask, s, float("-inf"))


@triton.jit
def _prefix_masked(s, q_pos, k_pos, q_lpos, k_lpos, k_end, window, HAS_WINDOW: tl.constexpr):
    # The prefix variant (BOUNDS = kernels/masks.py's prefix_bounds): key k is seen by queries k .. kend[k] - 1,
    # which is the whole mask without a window; the window is measured in logical positions (pre-broadcast
    # arguments, as above). kend <= T also keeps tile rows and columns past T out.
    mask = (k_pos <= q_pos) & (q_pos < k_end)
    if HAS_WINDOW:
        mask = mask & (q_lpos - k_lpos < window)
    return tl.where(mask, s, float("-inf"))


@triton.jit
def _load_tile(base, offs, offs_d, stride, T, TRANSPOSED: tl.constexpr, MASKED: tl.constexpr,
               UPCAST: tl.constexpr):
    # Rows `offs` of a (T, D) matrix as a (BLOCK, D) tile, or (D, BLOCK) read transposed. MASKED reads
    # rows past T as 0; unmasked tiles lie wholly inside the sequence. UPCAST is set only when
    # interpreting: the interpreter gets bf16 dots wrong, so every tile is computed in fp32 there.
    if TRANSPOSED:
        ptrs = base + offs[None, :] * stride + offs_d[:, None]
        inside = offs[None, :] < T
    else:
        ptrs = base + offs[:, None] * stride + offs_d[None, :]
        inside = offs[:, None] < T
    if MASKED:
        x = tl.load(ptrs, mask=inside, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_row(ptr, offs, T, MASKED: tl.constexpr):  # (BLOCK,) of a contiguous (T,) fp32 row: lse, delta
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < T, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def _plane(BOUNDS, b, T, BT, offs, PLANE: tl.constexpr):  # (BLOCK,) int32 of a (planes, B, T) table, clamped
    return tl.load(BOUNDS + PLANE * BT + b * T + tl.minimum(offs, T - 1))


@triton.jit
def _segment_ids(BOUNDS, b, T, BT, offs, HAS_SEGMENTS: tl.constexpr, HAS_PREFIX: tl.constexpr,
                 HAS_WINDOW: tl.constexpr):
    # What the masks compare per position. Segments: the first position holding the same id (plane 0 of
    # segment_bounds: equal iff the ids are equal, int32 whatever the caller's dtype). Prefix with a window:
    # the logical position (plane 6 of prefix_bounds). Clamped rather than masked: the mask handles the tail
    # of a partial tile itself. Otherwise a placeholder that is never read.
    seg = offs
    if HAS_SEGMENTS:
        seg = _plane(BOUNDS, b, T, BT, offs, 0)
    if HAS_PREFIX and HAS_WINDOW:
        seg = _plane(BOUNDS, b, T, BT, offs, 6)
    return seg


# Tile ranges, computed once per program so that the loops are straight-line code (a runtime `if`
# around the loads costs Triton its software pipelining: no cp.async, see ../shared/GPU_AUDIT.md).
# A program walks the other side's tiles in two loops: [lo_full, hi_full) unmasked (every pair of
# the tile visible), then the edges [lo, lo_full) and [hi_full, hi) masked, as one loop whose tile
# index is remapped with arithmetic, not a branch. With segments the bounds come from BOUNDS
# (4, B, T) int32 (kernels/masks.py, segment_bounds): per position the first and last position of
# its id (a sound outer range) and its run of equal ids (pairs inside one run: the unmasked range).
# The prefix variant (prefix_bounds' (7, B, T) table) adds a second key range to forward and dq: the prefix
# keys of a branch's queries, whose tiles never overlap the first range's, so the chosen answer's tiles are
# skipped by the rejected answer. In dk/dv a key's queries form one range (the gap a window shorter than a
# pair may cut into a prefix key's queries, between branch 1's end and branch 2's start, is masked).


@triton.jit
def _round_up(x, BLOCK: tl.constexpr):
    return (x + BLOCK - 1) // BLOCK * BLOCK


@triton.jit
def _clamped_ranges(lo, lo_full, hi_full, hi, BOUNDS, b, T, BT, offs, BLOCK: tl.constexpr,
                    HAS_SEGMENTS: tl.constexpr):
    # Narrows the mask-only ranges of the tile at `offs` by its segments (tiles of the other side are
    # BLOCK wide), then orders them: lo <= lo_full <= hi_full <= hi.
    if HAS_SEGMENTS:
        p = BOUNDS + b * T + tl.minimum(offs, T - 1)
        first, last, run_lo, run_hi = tl.load(p), tl.load(p + BT), tl.load(p + 2 * BT), tl.load(p + 3 * BT)
        lo = tl.maximum(lo, tl.min(first, 0) // BLOCK * BLOCK)
        hi = tl.minimum(hi, tl.max(last, 0) + 1)
        lo_full = tl.maximum(lo_full, _round_up(tl.max(run_lo, 0), BLOCK))
        hi_full = tl.minimum(hi_full, (tl.min(run_hi, 0) + 1) // BLOCK * BLOCK)
    lo_full = tl.minimum(tl.maximum(lo_full, lo), hi)
    hi_full = tl.minimum(tl.maximum(hi_full, lo_full), hi)
    return lo, lo_full, hi_full, hi


@triton.jit
def _key_ranges(start_m, T, window, BOUNDS, b, BT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                HAS_PREFIX: tl.constexpr):
    # Key tiles for queries start_m .. end_m - 1; blocks above the diagonal and blocks wholly older
    # than the window are never visited, so work is O(T * window). With a prefix: the own branch's keys.
    end_m = tl.minimum(start_m + BLOCK_M, T)
    lo = 0
    lo_full = 0
    hi = T
    hi_full = T // BLOCK_N * BLOCK_N  # unmasked tiles lie wholly inside the sequence
    if IS_CAUSAL:
        hi = end_m
        hi_full = tl.minimum(start_m + 1, T) // BLOCK_N * BLOCK_N  # keys j <= start_m: before every query
    if HAS_WINDOW:
        lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N  # down to a tile boundary
        lo_full = _round_up(tl.maximum(end_m - window, 0), BLOCK_N)  # keys j >= end_m - W: inside every window
    offs = start_m + tl.arange(0, BLOCK_M)
    if HAS_PREFIX:  # from each query's branch start on (prefix_bounds plane 1)
        own_lo = _plane(BOUNDS, b, T, BT, offs, 1)
        lo = tl.maximum(lo, tl.min(own_lo, 0) // BLOCK_N * BLOCK_N)
        lo_full = tl.maximum(lo_full, _round_up(tl.max(own_lo, 0), BLOCK_N))
    return _clamped_ranges(lo, lo_full, hi_full, hi, BOUNDS, b, T, BT, offs, BLOCK_N, HAS_SEGMENTS)


@triton.jit
def _query_ranges(start_n, T, window, BOUNDS, b, BT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                  HAS_PREFIX: tl.constexpr):
    # Query tiles that may see keys start_n .. end_n - 1 (the transpose of the above).
    end_n = tl.minimum(start_n + BLOCK_N, T)
    lo = 0
    lo_full = 0
    hi = T
    hi_full = T // BLOCK_M * BLOCK_M
    if IS_CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        lo_full = _round_up(end_n - 1, BLOCK_M)  # queries i >= end_n - 1: after every key
    offs = start_n + tl.arange(0, BLOCK_N)
    if HAS_PREFIX:
        # Window included (prefix_bounds planes 4 and 5): the run of queries from each key on that all see it,
        # and the end of those that may (a prefix key's reach into branch 2 goes past start_n + W).
        hi = tl.max(_plane(BOUNDS, b, T, BT, offs, 5), 0)
        hi_full = tl.minimum(hi_full, tl.min(_plane(BOUNDS, b, T, BT, offs, 4), 0) // BLOCK_M * BLOCK_M)
    elif HAS_WINDOW:
        hi = tl.minimum(start_n + BLOCK_N + window - 1, T)
        hi_full = tl.minimum(hi_full, (start_n + window) // BLOCK_M * BLOCK_M)  # i < start_n + W
    return _clamped_ranges(lo, lo_full, hi_full, hi, BOUNDS, b, T, BT, offs, BLOCK_M, HAS_SEGMENTS)


@triton.jit
def _prefix_range(offs, first_lo, BOUNDS, b, T, BT, BLOCK: tl.constexpr):
    # The prefix variant's second key range of the query tile at `offs` (prefix_bounds planes 2 and 3): the union
    # of its queries' prefix keys, and the part all of them see. Keys from first_lo on (the own branch's range,
    # on the same tile grid) are left to that range, so no tile is visited twice.
    lo_i, hi_i = _plane(BOUNDS, b, T, BT, offs, 2), _plane(BOUNDS, b, T, BT, offs, 3)
    lo = tl.min(lo_i, 0) // BLOCK * BLOCK
    hi = tl.maximum(tl.minimum(tl.max(hi_i, 0), first_lo), lo)
    lo_full = tl.minimum(tl.maximum(_round_up(tl.max(lo_i, 0), BLOCK), lo), hi)
    hi_full = tl.minimum(tl.maximum(tl.min(hi_i, 0) // BLOCK * BLOCK, lo_full), hi)
    return lo, lo_full, hi_full, hi


@triton.jit
def _n_tiles(lo, lo_full, hi_full, hi, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    # Unmasked: the tiles of [lo_full, hi_full). Masked: those of [lo, lo_full) and then [hi_full, hi).
    n = (hi_full - lo_full + BLOCK - 1) // BLOCK
    if MASKED:
        n = (lo_full - lo + BLOCK - 1) // BLOCK + (hi - hi_full + BLOCK - 1) // BLOCK
    return n


@triton.jit
def _tile_start(i, lo, lo_full, hi_full, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    start = lo_full + i * BLOCK
    if MASKED:
        n_first = (lo_full - lo + BLOCK - 1) // BLOCK
        start = tl.where(i < n_first, lo + i * BLOCK, hi_full + (i - n_first) * BLOCK)
    return start


@triton.jit
def _key_tile_scores(q, offs_m, q_seg, i, lo, lo_full, hi_full, k_base, v_base, offs_d, stride_kt, stride_vt,
                     BOUNDS, b, T, BT, window, qk_scale, MASKED: tl.constexpr, V_TRANSPOSED: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                     HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    # The i-th key tile of a query tile (forward and dq): scaled scores q k^T in the log2 domain,
    # (BLOCK_M, BLOCK_N) with -inf where masked, and the tile's values, V or V^T.
    offs_n = _tile_start(i, lo, lo_full, hi_full, BLOCK_N, MASKED) + tl.arange(0, BLOCK_N)
    k_t = _load_tile(k_base, offs_n, offs_d, stride_kt, T, True, MASKED, UPCAST)  # (D, BLOCK_N): K^T
    v = _load_tile(v_base, offs_n, offs_d, stride_vt, T, V_TRANSPOSED, MASKED, UPCAST)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    if MASKED:
        k_seg = _segment_ids(BOUNDS, b, T, BT, offs_n, HAS_SEGMENTS, HAS_PREFIX, HAS_WINDOW)[None, :]
        if HAS_PREFIX:
            s = _prefix_masked(s, offs_m[:, None], offs_n[None, :], q_seg[:, None], k_seg,
                               _plane(BOUNDS, b, T, BT, offs_n, 0)[None, :], window, HAS_WINDOW)
        else:
            s = _masked(s, offs_m[:, None], offs_n[None, :], q_seg[:, None], k_seg, T, window, IS_CAUSAL, HAS_WINDOW,
                        HAS_SEGMENTS)
    return s, k_t, v


# ----------------------------------------------------------------------------------------------
# Forward: one program per (query tile, batch x head); online softmax over the key tiles.


@triton.jit
def _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, q_seg, lo, lo_full, hi_full, hi, k_base, v_base, offs_d,
                    stride_kt, stride_vt, BOUNDS, b, T, BT, window, qk_scale,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_SEGMENTS: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    for i in range(0, _n_tiles(lo, lo_full, hi_full, hi, BLOCK_N, MASKED)):
        qk, _, v = _key_tile_scores(q, offs_m, q_seg, i, lo, lo_full, hi_full, k_base, v_base, offs_d, stride_kt,
                                    stride_vt, BOUNDS, b, T, BT, window, qk_scale, MASKED, False, IS_CAUSAL,
                                    HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX, UPCAST, DOT_PRECISION, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(qk - m_new[:, None])  # (BLOCK_M, BLOCK_N), 0 where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune("_attn_fwd")
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, BOUNDS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    H, GROUP, T, BT, T_BUCKET, window, qk_scale,  # GROUP = H // H_kv, BT = B * T; T_BUCKET: the autotuner's
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 so that batch/head offsets cannot overflow
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUP  # GQA: the group's query heads read the same K/V in place

    offs_m = start_m + tl.arange(0, BLOCK_M)  # query positions of this tile (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, T, False, True, UPCAST)
    q_seg = _segment_ids(BOUNDS, b, T, BT, offs_m, HAS_SEGMENTS, HAS_PREFIX, HAS_WINDOW)  # (BLOCK_M,)
    lo, lo_full, hi_full, hi = _key_ranges(start_m, T, window, BOUNDS, b, BT, BLOCK_M, BLOCK_N,
                                           IS_CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX)

    # Running softmax state in the log2 domain. m_i starts at a finite -1e30 rather than -inf, so
    # that a row whose first visited tile is wholly masked (possible with windows and segments)
    # computes exp2(-inf - (-1e30)) = 0 instead of exp2(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max of scaled scores
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running sum of p @ v
    kv = (K + b * stride_kb + h_kv * stride_kh, V + b * stride_vb + h_kv * stride_vh, offs_d, stride_kt,
          stride_vt, BOUNDS, b, T, BT, window, qk_scale)
    if HAS_PREFIX:  # the prefix keys of the tile's branch queries first (planes 2 and 3)
        prefix = _prefix_range(offs_m, lo, BOUNDS, b, T, BT, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, q_seg, *prefix, *kv, False, IS_CAUSAL, HAS_WINDOW,
                                        HAS_SEGMENTS, HAS_PREFIX, UPCAST, DOT_PRECISION, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, q_seg, *prefix, *kv, True, IS_CAUSAL, HAS_WINDOW,
                                        HAS_SEGMENTS, HAS_PREFIX, UPCAST, DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, q_seg, lo, lo_full, hi_full, hi, *kv, False, IS_CAUSAL,
                                    HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX, UPCAST, DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, offs_m, q_seg, lo, lo_full, hi_full, hi, *kv, True, IS_CAUSAL,
                                    HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX, UPCAST, DOT_PRECISION, BLOCK_N)

    # Every real row saw at least its own key (or its own segment), so l_i > 0 there; tail rows of
    # a partial tile have l_i = 0 and are not stored, the where() only keeps them NaN-free.
    l_i = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_i[:, None]
    row = pid_bh.to(tl.int64) * T + offs_m  # O is contiguous (B, H, T, D), LSE (B, H, T)
    tl.store(O + row[:, None] * HEAD_DIM + offs_d[None, :], o.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    # log-sum-exp of the scaled scores in natural-log units: lse = ln(sum_j exp(scale * q.k_j))
    tl.store(LSE + row, (m_i + tl.log2(l_i)) / LOG2E, mask=offs_m < T)


# ----------------------------------------------------------------------------------------------
# Backward, FlashAttention-2 style. With P = exp(S - lse) recomputed from the saved lse:
#   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) with delta_i = rowsum(dO_i * O_i),
#   dQ = scale * dS K,  dK = scale * dS^T Q.
# Kernel 1 computes delta; kernel 2 owns a key tile and loops over query tiles (and over the
# group's query heads, which sums the GQA gradient without atomics); kernel 3 owns a query tile
# and loops over key tiles. S is computed twice (kernels 2 and 3): the price of no atomics.


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA,
    stride_dob, stride_doh, stride_dot,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    row = pid_bh.to(tl.int64) * T + offs_t
    valid = offs_t[:, None] < T
    o = tl.load(O + row[:, None] * HEAD_DIM + offs_d[None, :], mask=valid, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_t[:, None] * stride_dot + offs_d[None, :],
                 mask=valid, other=0.0).to(tl.float32)
    tl.store(DELTA + row, tl.sum(o * do, 1), mask=offs_t < T)  # (BLOCK,)


@triton.jit
def _attn_dkdv_tiles(dk, dv, k, v, offs_n, k_seg, lo, lo_full, hi_full, hi, q_base, do_base, lse_row, delta_row,
                     offs_d, stride_qt, stride_dot, BOUNDS, b, T, BT, window, qk_scale,
                     MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SEGMENTS: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    for i in range(0, _n_tiles(lo, lo_full, hi_full, hi, BLOCK_M, MASKED)):
        offs_m = _tile_start(i, lo, lo_full, hi_full, BLOCK_M, MASKED) + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        q_t = _load_tile(q_base, offs_m, offs_d, stride_qt, T, True, MASKED, UPCAST)  # (D, BLOCK_M): Q^T
        do = _load_tile(do_base, offs_m, offs_d, stride_dot, T, False, MASKED, UPCAST)  # (BLOCK_M, D)
        lse = _load_row(lse_row, offs_m, T, MASKED)  # (BLOCK_M,)
        delta = _load_row(delta_row, offs_m, T, MASKED)
        # Transposed tiles (keys x queries), so that P^T and dS^T come out directly.
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse[None, :] * LOG2E  # (BLOCK_N, BLOCK_M)
        if MASKED:
            q_seg = _segment_ids(BOUNDS, b, T, BT, offs_m, HAS_SEGMENTS, HAS_PREFIX, HAS_WINDOW)[None, :]
            if HAS_PREFIX:
                s_t = _prefix_masked(s_t, offs_m[None, :], offs_n[:, None], q_seg, k_seg[:, None],
                                     _plane(BOUNDS, b, T, BT, offs_n, 0)[:, None], window, HAS_WINDOW)
            else:
                s_t = _masked(s_t, offs_m[None, :], offs_n[:, None], q_seg, k_seg[:, None], T, window, IS_CAUSAL,
                              HAS_WINDOW, HAS_SEGMENTS)
        p_t = tl.exp2(s_t)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@_autotune("_attn_bwd_dkdv")
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, BOUNDS, DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    H, GROUP, T, BT, T_BUCKET, window, qk_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)  # over B * H_kv
    H_kv = H // GROUP
    b = (pid_bh // H_kv).to(tl.int64)
    h_kv = (pid_bh % H_kv).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N)  # key positions of this tile (BLOCK_N,)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_tile(K + b * stride_kb + h_kv * stride_kh, offs_n, offs_d, stride_kt, T, False, True, UPCAST)
    v = _load_tile(V + b * stride_vb + h_kv * stride_vh, offs_n, offs_d, stride_vt, T, False, True, UPCAST)
    k_seg = _segment_ids(BOUNDS, b, T, BT, offs_n, HAS_SEGMENTS, HAS_PREFIX, HAS_WINDOW)
    lo, lo_full, hi_full, hi = _query_ranges(start_n, T, window, BOUNDS, b, BT, BLOCK_M, BLOCK_N,
                                             IS_CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for h in range(h_kv * GROUP, h_kv * GROUP + GROUP):  # the query heads that share this kv head
        row = (b * H + h) * T  # into LSE and DELTA, contiguous (B, H, T)
        rest = (Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh, LSE + row, DELTA + row,
                offs_d, stride_qt, stride_dot, BOUNDS, b, T, BT, window, qk_scale)
        dk, dv = _attn_dkdv_tiles(dk, dv, k, v, offs_n, k_seg, lo, lo_full, hi_full, hi, *rest, False, IS_CAUSAL,
                                  HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX, UPCAST, DOT_PRECISION, BLOCK_M)
        dk, dv = _attn_dkdv_tiles(dk, dv, k, v, offs_n, k_seg, lo, lo_full, hi_full, hi, *rest, True, IS_CAUSAL,
                                  HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX, UPCAST, DOT_PRECISION, BLOCK_M)

    dk = dk * softmax_scale
    row = pid_bh.to(tl.int64) * T + offs_n  # DK and DV are contiguous (B, H_kv, T, D)
    tl.store(DK + row[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < T)
    tl.store(DV + row[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < T)


@triton.jit
def _attn_dq_tiles(dq, q, do, lse, delta, offs_m, q_seg, lo, lo_full, hi_full, hi, k_base, v_base, offs_d,
                   stride_kt, stride_vt, BOUNDS, b, T, BT, window, qk_scale,
                   MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_SEGMENTS: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    for i in range(0, _n_tiles(lo, lo_full, hi_full, hi, BLOCK_N, MASKED)):
        s, k_t, v_t = _key_tile_scores(q, offs_m, q_seg, i, lo, lo_full, hi_full, k_base, v_base, offs_d, stride_kt,
                                       stride_vt, BOUNDS, b, T, BT, window, qk_scale, MASKED, True, IS_CAUSAL,
                                       HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX, UPCAST, DOT_PRECISION, BLOCK_N)
        p = tl.exp2(s - lse[:, None] * LOG2E)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


@_autotune("_attn_bwd_dq")
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, BOUNDS, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    H, GROUP, T, BT, T_BUCKET, window, qk_scale, softmax_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    h_kv = h // GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, T, False, True, UPCAST)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dot, T, False, True, UPCAST)
    row = pid_bh.to(tl.int64) * T + offs_m
    lse = _load_row(LSE + pid_bh.to(tl.int64) * T, offs_m, T, True)  # (BLOCK_M,)
    delta = _load_row(DELTA + pid_bh.to(tl.int64) * T, offs_m, T, True)
    q_seg = _segment_ids(BOUNDS, b, T, BT, offs_m, HAS_SEGMENTS, HAS_PREFIX, HAS_WINDOW)
    lo, lo_full, hi_full, hi = _key_ranges(start_m, T, window, BOUNDS, b, BT, BLOCK_M, BLOCK_N,
                                           IS_CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qs = (q, do, lse, delta, offs_m, q_seg)
    kv = (K + b * stride_kb + h_kv * stride_kh, V + b * stride_vb + h_kv * stride_vh, offs_d, stride_kt, stride_vt,
          BOUNDS, b, T, BT, window, qk_scale)
    if HAS_PREFIX:  # as in the forward: the prefix keys first
        prefix = _prefix_range(offs_m, lo, BOUNDS, b, T, BT, BLOCK_N)
        dq = _attn_dq_tiles(dq, *qs, *prefix, *kv, False, IS_CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX, UPCAST,
                            DOT_PRECISION, BLOCK_N)
        dq = _attn_dq_tiles(dq, *qs, *prefix, *kv, True, IS_CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX, UPCAST,
                            DOT_PRECISION, BLOCK_N)
    dq = _attn_dq_tiles(dq, *qs, lo, lo_full, hi_full, hi, *kv, False, IS_CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX,
                        UPCAST, DOT_PRECISION, BLOCK_N)
    dq = _attn_dq_tiles(dq, *qs, lo, lo_full, hi_full, hi, *kv, True, IS_CAUSAL, HAS_WINDOW, HAS_SEGMENTS, HAS_PREFIX,
                        UPCAST, DOT_PRECISION, BLOCK_N)

    dq = dq * softmax_scale
    tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < T)


# ----------------------------------------------------------------------------------------------
# Launchers and the autograd Function


def _flags(q, causal, sliding_window, segment_ids, branch_ids=None):
    # fp32 inputs get true fp32 dots ("ieee"; Triton's default would round them to tf32, ~1e-3
    # relative): fp32 is the accuracy path, not the fast one. 16-bit inputs ignore the setting.
    # Prompt-shared segments take the prefix variant alone: its table replaces segment_bounds'.
    return dict(HEAD_DIM=q.shape[-1], IS_CAUSAL=causal, HAS_WINDOW=sliding_window is not None,
                HAS_SEGMENTS=segment_ids is not None and branch_ids is None, HAS_PREFIX=branch_ids is not None,
                UPCAST=_INTERPRETED, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _bounds(segment_ids, branch_ids, sliding_window):
    if branch_ids is not None:
        return prefix_bounds(segment_ids, branch_ids, sliding_window)
    return segment_bounds(segment_ids) if segment_ids is not None else None


def _triton_forward(q, k, v, causal, sliding_window, segment_ids, bounds, scale, branch_ids=None):
    B, H, T, D = q.shape
    group = H // k.shape[1]
    o = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    _attn_fwd[lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * H)](
        q, k, v, o, lse, bounds, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        H, group, T, B * T, triton.next_power_of_2(T), sliding_window or 0, scale * LOG2E.value,
        **_flags(q, causal, sliding_window, segment_ids, branch_ids))
    return o, lse


def _triton_backward(do, q, k, v, o, lse, causal, sliding_window, segment_ids, bounds, scale, branch_ids=None):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)  # (B, H, T) fp32
    _attn_bwd_delta[(triton.cdiv(T, _PRE_BLOCK), B * H)](o, do, delta, *do.stride()[:3], H, T, HEAD_DIM=D,
                                                          BLOCK=_PRE_BLOCK)
    dq = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H_kv, T, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, H_kv, T, D, dtype=v.dtype, device=v.device)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
              H, H // H_kv, T, B * T, triton.next_power_of_2(T), sliding_window or 0, scale * LOG2E.value, scale)
    flags = _flags(q, causal, sliding_window, segment_ids, branch_ids)
    _attn_bwd_dkdv[lambda META: (triton.cdiv(T, META["BLOCK_N"]), B * H_kv)](
        q, k, v, do, lse, delta, bounds, dk, dv, *common, **flags)
    _attn_bwd_dq[lambda META: (triton.cdiv(T, META["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, bounds, dq, *common, **flags)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sliding_window, segment_ids, scale, branch_ids):
        bounds = _bounds(segment_ids, branch_ids, sliding_window)
        o, lse = _triton_forward(q, k, v, causal, sliding_window, segment_ids, bounds, scale, branch_ids)
        ctx.save_for_backward(q, k, v, o, lse, segment_ids, bounds, branch_ids)
        ctx.mask_args = (causal, sliding_window)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, segment_ids, bounds, branch_ids = ctx.saved_tensors
        causal, sliding_window = ctx.mask_args
        dq, dk, dv = _triton_backward(do, q, k, v, o, lse, causal, sliding_window, segment_ids, bounds, ctx.scale,
                                      branch_ids)
        return dq, dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public entry point


def flash_attention(q, k, v, causal=True, sliding_window=None, segment_ids=None, softmax_scale=None,
                    branch_ids=None):
    """Attention over q (B, H, T, D) and k, v (B, H_kv, T, D) -> (B, H, T, D); convention at the top.
    branch_ids must have the layout of kernels/masks.py's check_prefix_layout (checked here on CPU tensors;
    on CUDA a check would cost a host sync per call: dpo.py checks its rows before moving them)."""
    check_inputs(q, k, v, causal, sliding_window, segment_ids, softmax_scale, branch_ids)
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if branch_ids is not None and not q.is_cuda:
        check_prefix_layout(segment_ids, branch_ids)

    if not q.is_cuda and not interpret:  # CPU: torch's SDPA with the shared mask
        if branch_ids is not None:  # segment by segment: sum(L^2) work, not T^2
            return segmented_attention(q, k, v, sliding_window, segment_ids, branch_ids, scale)
        if sliding_window is None and segment_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                  enable_gqa=H != k.shape[1])
        mask = attention_mask(T, sliding_window, segment_ids, device=q.device, causal=causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=H != k.shape[1])

    if D < 16 or D > 128 or D & (D - 1):  # the kernels tile D whole; the SDPA path above takes any D
        raise ValueError(f"head dim D must be a power of two in 16..128 for the Triton kernels; got D={D}")
    if q.is_cuda and q.dtype == torch.float32:  # every tuned config spills in fp32 (docs/training.md, "fp32 on CUDA")
        raise ValueError("q, k, v: float32 on CUDA is not on the Triton kernels' path (their configurations spill "
                         "registers in fp32 on sm_90 and sm_80); pass bf16 or fp16, or use SDPA (model.py does)")
    if interpret and not _INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 must be set before kernels.attention is imported: "
                           "Triton fixes interpreted-vs-compiled when the kernels are defined")
    # Kernels index rows with strides (so (B, T, H, D) tensors viewed as (B, H, T, D) are read in
    # place) but assume unit stride along D; anything else is copied once.
    # Segment ids of any integer dtype and layout: the kernels read only segment_bounds' int32 table.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _FlashAttention.apply(q, k, v, bool(causal), sliding_window, segment_ids, scale, branch_ids)


def reference_attention(q, k, v, causal=True, sliding_window=None, segment_ids=None, softmax_scale=None,
                        branch_ids=None):
    """Dense-mask attention in fp32; slow and simple, the yardstick the tests hold the kernels to."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    k = k.float().repeat_interleave(group, dim=1)  # (B, H, T, D): query head h reads kv head h // group
    v = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    mask = attention_mask(T, sliding_window, segment_ids, device=q.device, causal=causal, branch_ids=branch_ids)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)
