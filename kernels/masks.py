"""The attention masking convention in torch, for kernels/attention.py: the dense mask (the CPU path's
mask and the tests' reference), and the per-position segment bounds the Triton kernels derive their
tile ranges from.

Query i sees key j iff
  j <= i                  (causal)
  i - j < W               when sliding_window=W (a token sees itself and at most W-1 earlier tokens)
  seg[b, i] == seg[b, j]  when segment_ids is given (packed rows: no attention across examples)
With causal=False only the segment rule applies; a window without causality is refused.
"""

import torch


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
