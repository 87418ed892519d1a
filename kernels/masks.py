"""The attention masking convention in torch, for kernels/attention.py: the dense mask (the CPU path's
mask and the reference's), the per-position segment bounds the Triton kernels derive their tile ranges
from, and the checks of flash_attention's inputs.

Query i sees key j iff
  j <= i                  (causal)
  i - j < W               when sliding_window=W (a token sees itself and at most W-1 earlier tokens)
  seg[b, i] == seg[b, j]  when segment_ids is given (packed rows: no attention across examples)
With causal=False only the segment rule applies; a window without causality is refused.
"""

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention_mask(T, sliding_window=None, segment_ids=None, device=None, causal=True):
    """Boolean mask (B or 1, 1, T, T), True = query i (dim -2) may attend key j (dim -1)."""
    if segment_ids is not None and device is None:
        device = segment_ids.device
    i = torch.arange(T, device=device)[:, None]  # query positions (T, 1)
    j = torch.arange(T, device=device)[None, :]  # key positions   (1, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i
    if sliding_window is not None:
        if not causal:
            raise ValueError("sliding_window requires causal=True")
        mask &= (i - j) < sliding_window
    mask = mask[None, None]  # (1, 1, T, T)
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
        mask = mask & same[:, None]  # (B, 1, T, T)
    return mask


def segment_bounds(segment_ids):
    """(4, B, T) int32 from (B, T) ids: for each position the first and the last position of the row
    holding the same id, and the start and end of its run of equal ids. Any ids work (packed rows,
    padding as its own id, ids that reappear); the kernels derive their tile ranges from these.
    A few sorts and scans over (B, T), no host sync."""
    B, T = segment_ids.shape
    pos = torch.arange(T, device=segment_ids.device).expand(B, T)

    def group_ends(x):  # for sorted-or-run-ordered x: index where each element's group starts and ends
        new = torch.ones_like(x, dtype=torch.bool)
        new[:, 1:] = x[:, 1:] != x[:, :-1]
        start = torch.where(new, pos, 0).cummax(1).values
        end_here = torch.ones_like(new)
        end_here[:, :-1] = new[:, 1:]
        end = torch.where(end_here, pos, T - 1).flip(1).cummin(1).values.flip(1)
        return start, end

    run_start, run_end = group_ends(segment_ids)
    ids, perm = torch.sort(segment_ids, dim=1, stable=True)  # stable: positions ascend within an id
    g_start, g_end = group_ends(ids)
    first = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, g_start))
    last = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, g_end))
    return torch.stack([first, last, run_start, run_end]).to(torch.int32).contiguous()


def check_inputs(q, k, v, causal, sliding_window, segment_ids, softmax_scale):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-d tensor, (B, H, T, D) for q and (B, H_kv, T, D) for k/v; got {got}")
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, H_kv, T, D); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    Bk, H_kv, Tk, Dk = k.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(f"k/v must match q in batch, length and head dim: q is (B, H, T, D) = {tuple(q.shape)}, "
                         f"k is {tuple(k.shape)}")
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"number of query heads H={H} must be a multiple of the number of kv heads H_kv={H_kv}")
    if T == 0:
        raise ValueError("sequence length T must be at least 1; got q of shape " + str(tuple(q.shape)))
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype among float16, bfloat16, float32; "
                         f"got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int or None; got {sliding_window!r}")
        if not causal:
            raise ValueError("sliding_window requires causal=True (a window over future tokens is not supported)")
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor) or tuple(segment_ids.shape) != (B, T):
            got = tuple(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
            raise ValueError(f"segment_ids must be a (B, T) = {(B, T)} tensor; got {got}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids must have an integer dtype; got {segment_ids.dtype}")
        if segment_ids.device != q.device:
            raise ValueError(f"segment_ids must be on q's device {q.device}; got {segment_ids.device}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive number or None; got {softmax_scale!r}")
