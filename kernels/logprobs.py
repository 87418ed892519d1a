"""Per-token log-probabilities of the LM head without ever building the (N, V) logits.

    logp[i] = log_softmax(hidden @ weight.T)[i, targets[i]]        (0 where targets[i] == ignore_index)

The math everything below is built on. With z = hidden @ weight.T, p = softmax(z) and onehot(t) the
target row, the gradient of logp[i] with respect to its logits row is (onehot(t_i) - p_i): it does
not depend on the upstream gradient g. Hence

    grad_hidden[i] = g[i] * (onehot(t_i) - p_i) @ weight               (N, D)
    grad_weight    = sum_i g[i] * (onehot(t_i) - p_i)^T hidden[i]      (V, D)

Logits are processed a chunk of rows at a time (a (C, V) fp32 buffer, C ~ 32 MiB / 4V rows on CPU),
so memory is O(C*V + N*D + V*D) instead of O(N*V). Rows whose target is ignore_index never reach the
head at all (token_logprobs drops them first and scatters the results back): the prompt rows of SFT
and DPO cost nothing. There are two ways to get the gradients:

  * recompute (default): the forward keeps only log-probs; the backward recomputes each logits chunk.
    Cost 2 + 2 + 4 = 8 NVD flops against 6 NVD for the naive full-logits path (the 0.78x in
    REFERENCE.md).
  * one pass (`expected_grad=` given, or a frozen weight): the forward already computes grad_hidden
    unscaled (its g factor is applied in backward) and grad_weight weighted by `expected_grad`. The
    backward checks that the real g is c * expected_grad for one scalar c and returns c * grad_weight.
    Cost 6 NVD, like the naive path, with none of its (N, V) traffic. If g turns out not to be
    proportional (say DPO, whose per-sequence factors are only known after the forward), grad_weight
    is recomputed: always correct, just slower. The price is holding grad_hidden (N, D) and
    grad_weight (V, D), both fp32, from forward to backward.

On the Triton path the forward without gradients is one fused kernel: each program sweeps a split of
the vocabulary for a block of rows with an online log-sum-exp (logits tiles never leave registers),
and a log-sum-exp combine merges the splits. grad_hidden for a block of rows needs a (rows, D)
accumulator, too big on chip at D = 4096, so for gradients each chunk of logits is materialized in fp32
by a tl.dot matmul kernel, turned into onehot - softmax in place by a row kernel, and fed to two more
matmuls (grad_weight accumulated in fp32 in place: no atomics).

Paths, chosen at call time:
  * CUDA tensors in bf16 or fp16 -> Triton kernels (below), autotuned for H100.
  * CPU tensors with TRITON_INTERPRET=1 in the environment *at call time* -> the same Triton kernels
    run by the Triton interpreter (for tests and --rehearse_gpu).
  * other CPU tensors, and fp32 on CUDA -> the same chunked algorithm in plain torch.

How Triton 3.7 picks the interpreter: `@triton.jit` reads os.environ["TRITON_INTERPRET"] (through
triton.knobs) when it *decorates* a function, and the interpreter cannot call a compiled JITFunction.
So that the mode depends only on the environment at call time, our kernels are plain functions,
decorated lazily in `_kernels(interpret)`, once per mode; and they avoid tl.zeros, tl.sum and tl.max
(@triton.jit helpers fixed in whatever mode `import triton` saw): tl.full, and tl.reduce with Triton's
own combine functions, which the interpreter maps to numpy without calling them.
"""

import functools

import torch
import triton
import triton.language as tl

from kernels import tuning

# fp32 bytes of one chunk of logits (C, V): small on CPU (cache, memory target), large on GPU (GEMM speed).
CPU_CHUNK_BYTES = 32 * 2**20
GPU_CHUNK_BYTES = 512 * 2**20

# A g accepted as c * expected_grad may differ from it by this much, relative to max|g|. Identically
# computed fp32 values (the SFT case) agree to ~1e-7; anything really different is far above this.
PROPORTIONAL_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------------
# Triton kernels. Undecorated here on purpose: see the module docstring and `_kernels` below.
# In the interpreter bf16 arithmetic is wrong, so every load is cast to DOT_DTYPE (fp32 there; the
# model dtype on GPU so that tl.dot runs on tensor cores) and all other math is fp32.
# ---------------------------------------------------------------------------------------------------

_add = tl.standard._sum_combine            # tl.reduce(x, 1, _add) == tl.sum(x, axis=1)
_max = tl.standard._elementwise_max        # tl.reduce(x, 1, _max) == tl.max(x, axis=1)


def _logprobs_fwd_kernel(
    h_ptr, w_ptr, t_ptr, part_ptr,
    N, V, D, V_SPLIT, stride_h, stride_w, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    # Forward only: program (i, j) sweeps vocabulary split j (V_SPLIT columns) for BLOCK_N rows with an
    # online log-sum-exp and writes the split's stats to part (4, splits, N): max m, sum exp(z - m),
    # sum exp(z - m) * z, target logit (_triton_forward combines them; the splits fill the GPU at small
    # N). Logits tiles live in registers only; hidden rows are re-read per vocabulary tile (D = 4096
    # does not fit on chip), and programs walk the vocabulary in one order, so shared W tiles hit L2.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    v_lo = tl.program_id(1) * V_SPLIT
    v_hi = tl.minimum(v_lo + V_SPLIT, V)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)      # running max of the row
    s = tl.full([BLOCK_N], 0.0, tl.float32)                # sum exp(z - m)
    sz = tl.full([BLOCK_N], 0.0, tl.float32)               # sum exp(z - m) * z, for the entropy
    zt = tl.full([BLOCK_N], 0.0, tl.float32)               # logit of the target
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(h_ptr + rows64[:, None] * stride_h + ds[None, :],
                        mask=row_ok[:, None] & (ds[None, :] < D), other=0.0)          # (BLOCK_N, BLOCK_D)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + ds[None, :],
                        mask=col_ok[:, None] & (ds[None, :] < D), other=0.0)          # (BLOCK_V, BLOCK_D)
            z = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), z, input_precision=PRECISION)
        # Padded columns hold z = 0 (zero weight rows); -inf keeps them out of the max and the sums.
        m_new = tl.maximum(m, tl.reduce(tl.where(col_ok[None, :], z, float("-inf")), 1, _max))
        alpha = tl.exp(m - m_new)
        e = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s = s * alpha + tl.reduce(e, 1, _add)
        sz = sz * alpha + tl.reduce(e * z, 1, _add)
        zt += tl.reduce(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1, _add)
        m = m_new

    out = part_ptr + tl.program_id(1) * N + rows64                  # part[:, j, rows]
    plane = tl.num_programs(1) * N
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, sz, mask=row_ok)
    tl.store(out + 3 * plane, zt, mask=row_ok)


def _softmax_grad_kernel(
    z_ptr, dz_ptr, t_ptr, logp_ptr, lse_ptr, ent_ptr,
    C, V, stride_z, stride_dz, ignore_index,
    WRITE_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # On a chunk of materialized fp32 logits (C, V): the same online log-sum-exp as above, then a
    # second sweep that writes dlogp/dz = onehot(t) - softmax(z) to dz_ptr. Rows with an ignored
    # target get a harmless onehot at column 0: their gradient is scaled by 0 later. dz may be the
    # logits buffer itself (fp32) or a 16-bit view of it (row r at byte 4Vr, the first half of z's
    # row r), so that the GEMMs read 16-bit operands (half the shared memory, no spills) with no second
    # (C, V) buffer. A program owns whole rows, so other programs never touch its bytes; within it, see
    # the barrier below.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < C
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_z                            # (BLOCK_N, 1)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    valid = tgt != ignore_index

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.full([BLOCK_N], 0.0, tl.float32)
    sz = tl.full([BLOCK_N], 0.0, tl.float32)
    zt = tl.full([BLOCK_N], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = tl.load(z_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        m_new = tl.maximum(m, tl.reduce(tl.where(col_ok[None, :], z, float("-inf")), 1, _max))
        alpha = tl.exp(m - m_new)
        e = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s = s * alpha + tl.reduce(e, 1, _add)
        sz = sz * alpha + tl.reduce(e * z, 1, _add)
        zt += tl.reduce(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1, _add)
        m = m_new
    lse = m + tl.log(s)
    tl.store(logp_ptr + rows, tl.where(valid, zt - lse, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(ent_ptr + rows, lse - sz / s, mask=row_ok)

    if WRITE_GRAD:
        onehot_col = tl.where(valid, tgt, 0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols[None, :] < V)
            z = tl.load(z_rows + cols[None, :], mask=mask, other=0.0)
            p = tl.exp(z - lse[:, None])
            dz = tl.where(cols[None, :] == onehot_col[:, None], 1.0 - p, -p)
            if ROUND_BF16:
                # The interpreter casts fp32 to bf16 by truncation (up to 2^-7 relative, biased toward 0);
                # the GPU rounds to nearest even (2^-8). Round here, by the bits, so that the cast is exact.
                b = dz.to(tl.uint32, bitcast=True)
                dz = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            # 16-bit dz column c lands on the bytes of logit c // 2, which another warp of this program may not
            # have loaded yet (this tile when v0 = 0, an earlier one after): nothing orders the warps of one
            # program but a barrier. With it, every warp has loaded tiles 0..v0 before any warp stores tile v0,
            # whose bytes are logits [v0 / 2, (v0 + BLOCK_V) / 2), all in those tiles; later tiles' logits lie
            # beyond them. (The interpreter runs a program at once and cannot show the race: the PTX does,
            # tests/test_kernels_compile.py checks it there.)
            tl.debug_barrier()
            tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :],
                     dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, M_KEY, N_KEY, K_KEY,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # c (M, N) fp32 (+)= a (M, K) @ b (K, N); any strides, so a transpose is free. Operands are cast to
    # DOT_DTYPE on load (a no-op on GPU). M_KEY, N_KEY, K_KEY: only the autotuner reads them (_mm_key).
    # Plain row-major program order: the operands are either small (a chunk) or re-read by every program.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :].to(tl.int64) * stride_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc, mask=c_mask)


# Autotuning on GPU, over the lists of kernels/tuning.py (per GPU generation, each config spill-free
# there); one fixed small config in the interpreter (autotune with several configs fails there, and small
# blocks keep interpreted runs short). One Config object per shape, shared by the generations' lists.
_FWD_CONFIGS = {s: triton.Config({"BLOCK_N": s[0], "BLOCK_V": s[1], "BLOCK_D": 64}, num_warps=s[2], num_stages=s[3])
                for shapes in tuning.LOGPROBS_FWD.values() for s in shapes}
_MM_CONFIGS = {s: triton.Config({"BLOCK_M": s[0], "BLOCK_N": s[1], "BLOCK_K": s[2]}, num_warps=s[3], num_stages=s[4])
               for layouts in tuning.LOGPROBS_MM.values() for shapes in layouts.values() for s in shapes}


def _mm_layout(stride_am, stride_ak):
    return "transposed A" if stride_am == 1 and stride_ak != 1 else "row-major A"


def fwd_configs(capability=90):
    """The fused forward's configs on one GPU generation (after the autotuner's early pruning)."""
    return [_FWD_CONFIGS[s] for s in tuning.LOGPROBS_FWD[tuning.arch(capability)]]


def mm_configs(site, capability=90, layout=None):
    """The GEMM configs the autotuner tries at one of the _GEMM_SITES (or for an operand layout) on one
    GPU generation, after its early pruning."""
    consts = _GEMM_SITES[site][0] if site else {}
    layout = layout or _mm_layout(consts.get("stride_am"), consts.get("stride_ak"))
    return [_MM_CONFIGS[s] for s in tuning.LOGPROBS_MM[tuning.arch(capability)][layout]]


def _prune_fwd(configs, nargs, **kwargs):
    keep = fwd_configs(tuning.device_arch(nargs["h_ptr"]))
    return [c for c in configs if any(c is k for k in keep)]


def _prune_mm(configs, nargs, **kwargs):
    keep = mm_configs(None, tuning.device_arch(nargs["a_ptr"]), _mm_layout(nargs["stride_am"], nargs["stride_ak"]))
    return [c for c in configs if any(c is k for k in keep)]


# The three GEMMs of a chunk as `python -m kernels.bench compile` builds them: unit strides (which
# Triton specializes to constants at launch) and operand types: on GPU every operand is in the model
# dtype (dz written 16-bit by the softmax kernel, the scaled hidden rows cast before the GEMM).
_GEMM_SITES = {
    "logits": (dict(stride_ak=1, stride_bk=1, stride_cn=1), {}),               # z = h @ W^T
    "grad_hidden": (dict(stride_ak=1, stride_bn=1, stride_cn=1), {}),          # dz @ W
    "grad_weight": (dict(stride_am=1, stride_bn=1, stride_cn=1), {}),          # dz^T @ (g h)
}


def _softmax_constexprs(dz_dtype, interpret=False):
    # ROUND_BF16: round dz to bf16 by hand where the cast would truncate (the interpreter).
    return dict(ROUND_BF16=interpret and dz_dtype in (tl.bfloat16, torch.bfloat16))


def _mm_key(M, N, K):
    """Autotune key of a GEMM: each size bucketed to a power of two, rows (the only size that changes
    from one micro-batch to the next) at least 2048: Triton re-benchmarks every config for every new
    key, and a key per distinct row count would tune on almost every step. 2048+ rows of a
    (rows, 4096) x (4096, 32000) GEMM fill an H100 many times over with any of the configs."""
    return tuple(max(triton.next_power_of_2(x), 2048) for x in (M, N, K))


_INTERPRET_BLOCKS = {
    "fwd": dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32),
    "mm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
}
_SOFTMAX_BLOCKS = dict(BLOCK_N=4, BLOCK_V=1024)     # memory bound; no tuning needed
_SOFTMAX_WARPS = 8
_SOFTMAX_BLOCKS_INTERPRET = dict(BLOCK_N=16, BLOCK_V=128)


@functools.cache
def _kernels(interpret):
    # `interpret` must equal triton.knobs.runtime.interpret at the time of the call, because that is
    # what triton.jit reads here to choose between the interpreter and the compiler.
    fwd, softmax_grad, mm = (triton.jit(f) for f in (_logprobs_fwd_kernel, _softmax_grad_kernel, _matmul_kernel))
    mm = {False: mm, True: mm}                      # by ACCUMULATE
    if not interpret:
        fwd = triton.autotune(list(_FWD_CONFIGS.values()), key=["V", "D"],
                              prune_configs_by={"early_config_prune": _prune_fwd})(fwd)
        # Two tuners of one kernel. Accumulating into c, tuning's trial runs must not add up: restore_value keeps
        # a copy of c (the LM head's fp32 gradient, V x D: memplan counts it). Writing c, they need no copy (a
        # copy of the 512 MiB logits chunk otherwise).
        mm = {acc: triton.autotune(list(_MM_CONFIGS.values()), key=["M_KEY", "N_KEY", "K_KEY"],
                                   restore_value=["c_ptr"] if acc else None,
                                   prune_configs_by={"early_config_prune": _prune_mm})(mm[acc]) for acc in mm}
    return fwd, softmax_grad, mm


def _interpreting():
    return triton.knobs.runtime.interpret


def _uses_triton(device, dtype):
    # fp32 on CUDA takes the torch path: the kernels' configurations spill in fp32 on sm_90 and sm_80
    # (docs/training.md, "fp32 on CUDA"), and fp32 is the accuracy path, where torch.mm's fp32 GEMMs do.
    return (device.type == "cuda" and dtype != torch.float32) or _interpreting()


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_args(dtype):
    # fp32 inputs get exact fp32 products (tf32 would miss the 1e-5 tests); in the interpreter every
    # dot is fp32 because its bf16 arithmetic is broken.
    if _interpreting() or dtype == torch.float32:
        return tl.float32, "ieee"
    return _TL_DTYPES[dtype], "tf32"          # tf32 is ignored for 16-bit operands


def _vocab_split(N, V, device, interpret, splits=None):
    """Columns per vocabulary split of the fused forward (a multiple of 128, the largest BLOCK_V): enough
    splits for ~4 programs per SM with row blocks of 64, each split >= 2048 columns (or `splits` given).
    In the interpreter: as if 8 programs filled the machine, splits >= 256 columns (so tests split)."""
    if splits is None:
        sms, rows, min_cols = (2, 16, 256) if interpret else \
            (torch.cuda.get_device_properties(device).multi_processor_count, 64, 2048)
        splits = max(1, min(triton.cdiv(4 * sms, triton.cdiv(N, rows)), V // min_cols))
    return triton.cdiv(triton.cdiv(V, splits), 128) * 128


def _triton_forward(hidden, weight, targets, ignore_index, splits=None):
    N, D = hidden.shape
    V = weight.shape[0]
    interpret = _interpreting()
    v_split = _vocab_split(N, V, hidden.device, interpret, splits)
    n_splits = triton.cdiv(V, v_split)
    part = torch.empty(4, n_splits, N, device=hidden.device, dtype=torch.float32)   # m, s, sz, zt per split
    fwd, _, _ = _kernels(interpret)
    dot_dtype, precision = _dot_args(hidden.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_splits)
    fwd[grid](hidden, weight, targets, part, N, V, D, v_split, hidden.stride(0), weight.stride(0), ignore_index,
              DOT_DTYPE=dot_dtype, PRECISION=precision, **(_INTERPRET_BLOCKS["fwd"] if interpret else {}))
    m, s, sz, zt = part                                                     # each (splits, N)
    m_all = m.max(0).values
    scale = torch.exp(m - m_all)                                            # log-sum-exp combine
    s_all = (s * scale).sum(0)
    lse = m_all + torch.log(s_all)
    logp = torch.where(targets != ignore_index, zt.sum(0) - lse, 0.0)
    return logp, lse, lse - (sz * scale).sum(0) / s_all


def _dz_dtype(dtype):
    # dz in the model's dtype: 16-bit for 16-bit models (the GPU's GEMM rounds its operands to it anyway),
    # fp32 for fp32 models. The interpreter does the same (its dots upcast the 16-bit dz exactly), so that
    # it runs the GPU's storage path and rounding (--rehearse_gpu, the bf16 tests).
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _dz_buffer(z, dz_dtype):
    # Where the softmax-gradient pass writes dz: over the logits chunk z (C, V) itself, fp32 or a 16-bit view
    # (row stride 2V). No second (C, V) buffer; the kernel's barrier makes the overlap safe.
    return z if dz_dtype == torch.float32 else z.view(dz_dtype)[:, :z.shape[1]]


def _triton_softmax_grad_(z, targets, ignore_index, write_grad, dz_dtype=torch.float32):
    """Stats of the fp32 logits chunk z (C, V), contiguous; with write_grad also dz = onehot - softmax,
    returned as z itself (fp32) or as a (C, V) 16-bit view into z's storage (row stride 2V)."""
    C, V = z.shape
    logp, lse, ent = (torch.empty(C, device=z.device, dtype=torch.float32) for _ in range(3))
    dz = _dz_buffer(z, dz_dtype)
    interpret = _interpreting()
    _, softmax_grad, _ = _kernels(interpret)
    blocks = _SOFTMAX_BLOCKS_INTERPRET if interpret else _SOFTMAX_BLOCKS
    grid = (triton.cdiv(C, blocks["BLOCK_N"]),)
    softmax_grad[grid](z, dz, targets, logp, lse, ent, C, V, z.stride(0), dz.stride(0), ignore_index,
                       WRITE_GRAD=write_grad, **_softmax_constexprs(dz.dtype, interpret), **blocks,
                       **({} if interpret else dict(num_warps=_SOFTMAX_WARPS)))
    return (logp, lse, ent), dz


def _triton_matmul(a, b, dtype, out=None):
    # Returns a @ b in fp32; with `out`, adds into it.
    M, K = a.shape
    N = b.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.empty(M, N, device=a.device, dtype=torch.float32)
    interpret = _interpreting()
    _, _, mm = _kernels(interpret)
    dot_dtype, precision = _dot_args(dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    mm[accumulate][grid](a, b, out, M, N, K, *_mm_key(M, N, K),
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
                         ACCUMULATE=accumulate, DOT_DTYPE=dot_dtype, PRECISION=precision,
                         **(_INTERPRET_BLOCKS["mm"] if interpret else {}))
    return out


# ---------------------------------------------------------------------------------------------------
# The plain-torch twins of the two chunk operations (CPU path). Everything in fp32.
# ---------------------------------------------------------------------------------------------------

def _torch_softmax_grad_(z, targets, ignore_index, write_grad, want_entropy):
    # z: (C, V) fp32 logits, overwritten with onehot(t) - softmax(z) when write_grad. In place and in
    # as few passes as possible (torch.logsumexp would add two passes and a (C, V) temporary).
    valid = targets != ignore_index
    onehot_col = torch.where(valid, targets, 0)                         # ignored rows: col 0, scaled by 0 later
    z_target = z.gather(1, onehot_col[:, None]).squeeze(1)              # (C,)
    m = z.amax(dim=1)                                                   # (C,)
    e = z.sub_(m[:, None]).exp_()                                       # exp(z - m), in z's storage
    s = e.sum(dim=1)
    lse = m + s.log()
    logp = torch.where(valid, z_target - lse, 0.0)
    # entropy = lse - sum_j p_j z_j = log s - sum_j e_j log(e_j) / s
    ent = s.log() - torch.special.xlogy(e, e).sum(dim=1) / s if want_entropy else None
    if write_grad:
        e.mul_(-1.0 / s[:, None])                                       # -softmax
        e[torch.arange(e.shape[0], device=e.device), onehot_col] += 1.0
    return logp, lse, ent


# ---------------------------------------------------------------------------------------------------
# The chunk loop shared by every mode and both backends.
# ---------------------------------------------------------------------------------------------------

def _sweep(hidden, weight, targets, ignore_index, chunk, *,
           stats=False, want_entropy=False, grad_h=None, grad_h_scale=None, grad_w=None, grad_w_scale=None):
    """One pass over row chunks of the logits. Per chunk of C rows:
        z  = hidden[c] @ weight.T                     (C, V) fp32, the only O(V) buffer
        z <- onehot(t) - softmax(z)                   (+ log-probs, lse, entropy of the chunk)
        grad_h[c]  = grad_h_scale[c, None] * (z @ weight)         written with a cast to grad_h's dtype
        grad_w    += z.T @ (grad_w_scale[c, None] * hidden[c])    fp32 accumulator
    The scales must be 0 on rows with an ignored target. Returns (logp, lse, entropy) if stats."""
    N = hidden.shape[0]
    use_triton = _uses_triton(hidden.device, hidden.dtype)
    w32 = weight if use_triton else weight.float()     # CPU: one fp32 copy of a bf16 head, reused by all chunks
    write_grad = grad_h is not None or grad_w is not None
    out = [torch.zeros(N, device=hidden.device, dtype=torch.float32) for _ in range(3)] if stats else None
    if not use_triton:
        # One logits buffer for all chunks: a fresh 32 MiB block per chunk fragments glibc's heap
        # (measured: up to twice the chunk in extra peak RSS). The CUDA caching allocator needs no help.
        z_buf = torch.empty(min(chunk, N), weight.shape[0], dtype=torch.float32, device=hidden.device)

    for r0 in range(0, N, chunk):
        rows = slice(r0, min(r0 + chunk, N))
        h = hidden[rows]                                                          # (C, D)
        if use_triton:
            z = _triton_matmul(h, weight.T, weight.dtype)                          # (C, V)
            chunk_stats, z = _triton_softmax_grad_(z, targets[rows], ignore_index, write_grad,
                                                   _dz_dtype(weight.dtype))        # z: now dz, maybe 16-bit
        else:
            z = torch.mm(h.float(), w32.T, out=z_buf[:h.shape[0]])                 # (C, V)
            chunk_stats = _torch_softmax_grad_(z, targets[rows], ignore_index, write_grad, want_entropy)
        if stats:
            for o, x in zip(out, chunk_stats):
                if x is not None:
                    o[rows] = x
        if grad_h is not None:
            gh = _triton_matmul(z, weight, weight.dtype) if use_triton else z @ w32    # (C, D) fp32
            grad_h[rows] = gh.mul_(grad_h_scale[rows, None])
        if grad_w is not None:
            hs = h.float() * grad_w_scale[rows, None]                                  # (C, D) fp32
            if use_triton:
                _triton_matmul(z.T, hs.to(z.dtype), weight.dtype, out=grad_w)      # operands in dz's dtype
            else:
                grad_w.addmm_(z.T, hs)
        del z
    return tuple(out) if stats else None


def _common_factor(g, e):
    # Returns c such that g == c * e (within PROPORTIONAL_RTOL), else None. g, e: (N,) fp32, zero on
    # ignored rows. One device sync.
    g64, e64 = g.double(), e.double()
    ee = (e64 * e64).sum()
    c = torch.where(ee > 0, (g64 * e64).sum() / ee, 0.0)          # e == 0 on every valid row: only g == 0 fits
    ok = (g64 - c * e64).abs().max() <= PROPORTIONAL_RTOL * g64.abs().max()
    return c.item() if ok.item() else None


class _TokenLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, targets, expected_grad, ignore_index, chunk, want_entropy, grad_enabled):
        N, D = hidden.shape
        V = weight.shape[0]
        # needs_input_grad is True under torch.no_grad() too: without grad_enabled (the grad mode
        # outside this call), a no-grad reference pass would pay for gradients.
        need_gh = grad_enabled and ctx.needs_input_grad[0]
        need_gw = grad_enabled and ctx.needs_input_grad[1]
        valid = (targets != ignore_index).float()
        # One pass whenever no part of the gradient depends on the unknown g beyond a known scalar.
        one_pass = (need_gh or need_gw) and (expected_grad is not None or not need_gw)

        if one_pass:
            grad_h = torch.empty(N, D, device=hidden.device, dtype=torch.float32) if need_gh else None
            grad_w = torch.zeros(V, D, device=hidden.device, dtype=torch.float32) if need_gw else None
            e = expected_grad.float() * valid if need_gw else None
            logp, lse, ent = _sweep(hidden, weight, targets, ignore_index, chunk, stats=True,
                                    want_entropy=want_entropy, grad_h=grad_h, grad_h_scale=valid,
                                    grad_w=grad_w, grad_w_scale=e)
            ctx.precomputed = (grad_h, grad_w, e)
        elif _uses_triton(hidden.device, hidden.dtype):
            logp, lse, ent = _triton_forward(hidden, weight, targets, ignore_index)
            ctx.precomputed = None
        else:
            logp, lse, ent = _sweep(hidden, weight, targets, ignore_index, chunk, stats=True,
                                    want_entropy=want_entropy)
            ctx.precomputed = None

        ctx.save_for_backward(hidden, weight, targets)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        ctx.mark_non_differentiable(lse, ent)
        return logp, lse, ent

    @staticmethod
    def backward(ctx, g, _g_lse, _g_ent):
        hidden, weight, targets = ctx.saved_tensors
        need_gh, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = g.float() * (targets != ctx.ignore_index)          # (N,); the output is constant 0 where ignored
        grad_hidden = grad_weight = None

        if ctx.precomputed is not None:
            grad_h, grad_w, e = ctx.precomputed
            ctx.precomputed = None              # scaled in place below: a second backward recomputes
            if need_gh:
                grad_hidden = grad_h.mul_(g[:, None]).to(hidden.dtype)
            if need_gw:
                c = _common_factor(g, e)
                if c is not None:
                    grad_weight = grad_w.mul_(c).to(weight.dtype)
                else:                           # g is not c * expected_grad: recompute grad_weight only
                    _sweep(hidden, weight, targets, ctx.ignore_index, ctx.chunk, grad_w=grad_w.zero_(), grad_w_scale=g)
                    grad_weight = grad_w.to(weight.dtype)
            return grad_hidden, grad_weight, None, None, None, None, None, None

        if need_gh:
            grad_hidden = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_gw else None
        _sweep(hidden, weight, targets, ctx.ignore_index, ctx.chunk,
               grad_h=grad_hidden, grad_h_scale=g, grad_w=grad_w, grad_w_scale=g)
        if need_gw:
            grad_weight = grad_w.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _check_inputs(hidden, weight, targets, expected_grad, ignore_index, chunk_size):
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected (N, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected (V, D) with D = {hidden.shape[1]} (hidden's last dim), "
                         f"got shape {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets: expected shape ({hidden.shape[0]},) to match hidden's rows, got {tuple(targets.shape)}")
    if hidden.dtype not in _TL_DTYPES:
        raise TypeError(f"hidden: expected float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} like hidden, got {weight.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets: expected int64, got {targets.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("expected_grad", expected_grad)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: expected device {hidden.device} like hidden, got {t.device}")
    if expected_grad is not None and (expected_grad.shape != targets.shape or not expected_grad.is_floating_point()):
        raise ValueError(f"expected_grad: expected a float tensor of shape ({targets.shape[0]},), "
                         f"got {expected_grad.dtype} {tuple(expected_grad.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive number of rows, got {chunk_size}")
    V = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():                                                   # one device sync
        i = bad.nonzero()[0, 0].item()
        raise ValueError(f"targets[{i}] = {targets[i].item()} is outside [0, {V}) and is not ignore_index={ignore_index}")


def token_logprobs(hidden, weight, targets, ignore_index=-100, *, expected_grad=None, return_stats=False,
                   chunk_size=None):
    """log_softmax(hidden @ weight.T)[i, targets[i]] as fp32 (N,), exactly 0 where targets == ignore_index.

    hidden (N, D) and weight (V, D) of one float dtype, targets (N,) int64. Differentiable in hidden and
    weight; gradients come back in the inputs' dtypes.
    expected_grad: optional (N,) tensor proportional to the gradient that will reach the returned
        log-probs, e.g. -loss_mask / num_tokens for SFT. Turns on the one-pass mode (module docstring).
    return_stats: also return the per-token log-sum-exp and entropy of the softmax (fp32, not
        differentiable): (logp, lse, entropy), for every row. Without it, rows with an ignored target
        are left out of the computation altogether.
    chunk_size: rows of logits materialized at once; default keeps a chunk near 32 MiB (CPU) or
        512 MiB (GPU).
    """
    _check_inputs(hidden, weight, targets, expected_grad, ignore_index, chunk_size)
    if not return_stats:
        N = targets.shape[0]
        rows = (targets != ignore_index).nonzero().squeeze(1)            # one device sync
        if 0 < rows.numel() < N:
            # The head only on rows with a target, whose results do not depend on the other rows: every GEMM
            # shrinks by the ignored fraction (SFT: system and user turns, padding; DPO: the prompts). Stats
            # are wanted for every row, so they keep the full pass; with no target at all, the full pass gives
            # the zeros with a graph that backward can walk.
            eg = expected_grad.index_select(0, rows) if expected_grad is not None else None
            logp = _apply(hidden.index_select(0, rows), weight, targets.index_select(0, rows), eg, ignore_index,
                          chunk_size, False)
            return logp.new_zeros(N).index_copy(0, rows, logp)            # differentiable in logp
    return _apply(hidden, weight, targets, expected_grad, ignore_index, chunk_size, return_stats)


def default_chunk_rows(V, device_type):
    """Rows of logits per chunk: ~32 MiB (CPU) or ~512 MiB (GPU) of fp32. A power of two on GPU, so
    that every chunk's GEMMs fall in the few autotune buckets of _mm_key."""
    if device_type == "cuda":
        return max(16, 1 << (GPU_CHUNK_BYTES // (4 * V)).bit_length() - 1)
    return max(16, CPU_CHUNK_BYTES // (4 * V))


def _apply(hidden, weight, targets, expected_grad, ignore_index, chunk_size, return_stats):
    if chunk_size is None:
        chunk_size = default_chunk_rows(weight.shape[0], hidden.device.type)
    logp, lse, ent = _TokenLogprobs.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                          expected_grad, ignore_index, chunk_size, return_stats,
                                          torch.is_grad_enabled())
    return (logp, lse, ent) if return_stats else logp


def reference_token_logprobs(hidden, weight, targets, ignore_index=-100):
    """The naive version, for tests and benchmarks: full (N, V) fp32 logits."""
    valid = targets != ignore_index
    logits = hidden.float() @ weight.float().T                                  # (N, V)
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    return torch.where(valid, logp, 0.0)
