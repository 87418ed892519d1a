"""The attention masking convention in torch, for kernels/attention.py: the dense mask (the CPU path's
mask and the reference's), the per-position tables the Triton kernels derive their tile ranges from, the
CPU path of prompt-shared rows, and the checks of flash_attention's inputs.

Query i sees key j iff
  j <= i                  (causal)
  i - j < W               when sliding_window=W (a token sees itself and at most W-1 earlier tokens)
  seg[b, i] == seg[b, j]  when segment_ids is given (packed rows: no attention across examples)
With causal=False only the segment rule applies; a window without causality is refused.

Prompt-shared segments (branch_ids, with segment_ids, causal): same segment, and the key is in my branch or in
the segment's shared prefix (branch 0). A DPO pair is one segment, prompt | chosen | rejected with branch ids
0 | 1 | 2: the rejected answer sees the prompt and itself, never the chosen answer. Positions are logical: a
token's position is the number of tokens it sees before it (the rejected answer's restart at the prompt's
length, as if the chosen answer were absent), and the window is measured in them:
  pos[b, i] - pos[b, j] < W   instead of i - j < W.
The Triton kernels take one layout of these ids (check_prefix_layout): each segment one run of positions, and
within it the branch ids 0, 1, 2 in that order, each one run (any may be empty). Their tables (prefix_bounds)
give each query at most two key ranges, the prefix's and its own branch's, and each key one range of queries.
"""

import torch
import torch.nn.functional as F

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention_mask(T, sliding_window=None, segment_ids=None, device=None, causal=True, branch_ids=None):
    """Boolean mask (B or 1, 1, T, T), True = query i (dim -2) may attend key j (dim -1)."""
    if branch_ids is not None:
        return _shared_prefix_mask(sliding_window, segment_ids, branch_ids)
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


def _shared_prefix_mask(sliding_window, segment_ids, branch_ids):
    # The definition, written densely for any ids: (B, 1, T, T).
    T = segment_ids.shape[1]
    i = torch.arange(T, device=segment_ids.device)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]                         # (B, T, T)
    branch_q, branch_k = branch_ids[:, :, None], branch_ids[:, None, :]
    sees = same & ((branch_k == 0) | (branch_k == branch_q)) & (i[None, :] <= i[:, None])
    if sliding_window is not None:
        pos = sees.sum(-1) - 1                                  # (B, T): the tokens a token sees before it
        sees = sees & (pos[:, :, None] - pos[:, None, :] < sliding_window)
    return sees[:, None]


def _run_bounds(starts):
    """starts (B, T) bool, True where a run of positions begins (column 0 always): each position's run start and
    last position, (B, T) each. Scans only, no host sync."""
    B, T = starts.shape
    pos = torch.arange(T, device=starts.device).expand(B, T)
    start = torch.where(starts, pos, 0).cummax(1).values
    ends_here = torch.ones_like(starts)
    ends_here[:, :-1] = starts[:, 1:]
    last = torch.where(ends_here, pos, T - 1).flip(1).cummin(1).values.flip(1)
    return start, last


def _changes(x):
    new = torch.ones_like(x, dtype=torch.bool)
    new[:, 1:] = x[:, 1:] != x[:, :-1]
    return new


def segment_bounds(segment_ids):
    """(4, B, T) int32 from (B, T) ids: for each position the first and the last position of the row
    holding the same id, and the start and end of its run of equal ids. Any ids work (packed rows,
    padding as its own id, ids that reappear); the kernels derive their tile ranges from these.
    A few sorts and scans over (B, T), no host sync."""
    run_start, run_end = _run_bounds(_changes(segment_ids))
    ids, perm = torch.sort(segment_ids, dim=1, stable=True)  # stable: positions ascend within an id
    g_start, g_end = _run_bounds(_changes(ids))
    first = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, g_start))
    last = torch.empty_like(perm).scatter_(1, perm, perm.gather(1, g_end))
    return torch.stack([first, last, run_start, run_end]).to(torch.int32).contiguous()


# ----------------------------------------------------------------------------------------------
# Prompt-shared segments in the layout the kernels take: segment runs, branches 0 | 1 | 2 inside each.
# Per position, with s = its segment's start, e = its end, n0, n1 the lengths of its prefix and branch 1:
# the prefix is [s, s + n0), branch 1 [s + n0, s + n0 + n1), branch 2 from b2 = s + n0 + n1 to e.


def _segment_layout(segment_ids, branch_ids):
    # Per position (B, T) int64: its segment's start s, end e (exclusive), prefix end pe = s + n0, and n1.
    B, T = segment_ids.shape
    s, last = _run_bounds(_changes(segment_ids))
    e = last + 1

    def count(b):  # tokens of branch b in each position's segment
        cum = F.pad((branch_ids == b).long().cumsum(1), (1, 0))                       # (B, T + 1)
        return cum.gather(1, e) - cum.gather(1, s)

    n0, n1 = count(0), count(1)
    return s, e, s + n0, n1


def shared_positions(segment_ids, branch_ids):
    """Position ids (B, T) of prompt-shared rows: the tokens each token sees before it (module docstring), i.e.
    0, 1, ... from each segment's start, and the branch-2 tokens restarting at the prefix's length."""
    s, _, pe, n1 = _segment_layout(segment_ids, branch_ids)
    i = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    return i - s - torch.where(branch_ids == 2, n1, 0)


def prefix_bounds(segment_ids, branch_ids, sliding_window=None):
    """(7, B, T) int32, the tables of the kernels' prefix variant, sliding window included (in logical
    positions). Per position, as a key j:
      0 kend   queries j .. kend - 1 may see j (its branch's end; the segment's end for a prefix key): with
               causality, the whole mask without a window
    as a query i (forward, dq; the own branch's range [own_lo, i] is cut by the window in the kernel):
      1 own_lo start of i's branch (for a prefix token: of the segment)
      2 a_lo   first prefix key that i sees (T when i has none: a prefix token, or a prefix outside the window)
      3 a_hi   end of the prefix for a branch token (0 for a prefix token)
    as a key j (dk/dv): the queries that see j lie in [j, q_end), and all of [j, c_hi) see it
      4 c_hi   end of the run of queries from j on that see j
      5 q_end  one past the last query that sees j: c_hi, unless a window shorter than the pair cuts a prefix
               key off from branch 1's end but not from branch 2's start (two runs: the kernel masks the gap)
    and for the window in the masks:
      6 lpos   logical position in row coordinates (a branch-2 token's index minus branch 1's length)
    Scans and gathers over (B, T), no host sync."""
    B, T = segment_ids.shape
    s, e, pe, n1 = _segment_layout(segment_ids, branch_ids)
    j = torch.arange(T, device=segment_ids.device).expand(B, T)
    W = sliding_window if sliding_window is not None else 2 * T + 1  # no window: wider than any row
    prefix, branch2 = branch_ids == 0, branch_ids == 2
    own_lo, own_last = _run_bounds(_changes(segment_ids) | _changes(branch_ids))
    kend = torch.where(prefix, e, own_last + 1)
    lpos = j - torch.where(branch2, n1, 0)  # logical position, in row coordinates of the prefix
    a_lo = torch.where(prefix, T, torch.maximum(s, lpos - W + 1))
    a_hi = torch.where(prefix, 0, pe)
    # A prefix key: seen by queries [j, min(b2, j + W)) (prefix and branch 1 share its coordinates), and by
    # branch 2's queries [b2, min(e, j + W + n1)). One run when the window reaches b2, else two.
    b2 = pe + n1
    first, second = torch.minimum(b2, j + W), torch.minimum(e, j + W + n1)
    joined = first >= b2
    c_hi = torch.where(prefix, torch.where(joined, torch.maximum(first, second), first),
                       torch.minimum(kend, j + W))
    q_end = torch.where(prefix & ~joined & (second > b2), second, c_hi)
    return torch.stack([kend, own_lo, a_lo, a_hi, c_hi, q_end, lpos]).to(torch.int32).contiguous()


def check_prefix_layout(segment_ids, branch_ids):
    """Raise ValueError unless the ids have the layout the kernels take (module docstring). Reads the ids on the
    host: call it on CPU tensors (dpo.py checks each batch before moving it)."""
    seg, br = segment_ids.cpu(), branch_ids.cpu()
    if ((br < 0) | (br > 2)).any():
        raise ValueError(f"branch_ids must be 0 (shared prefix), 1 or 2; got {sorted(set(br.unique().tolist()))}")
    for b in range(seg.shape[0]):
        runs = seg[b][_changes(seg[b:b + 1])[0]]
        if runs.unique().numel() != runs.numel():
            raise ValueError(f"segment_ids row {b}: a segment id occurs in more than one run; with branch_ids "
                             "each segment must be one run of positions")
    inside = ~_changes(seg)
    inside[:, 0] = False
    if (inside[:, 1:] & (br[:, 1:] < br[:, :-1])).any():
        b, t = (inside[:, 1:] & (br[:, 1:] < br[:, :-1])).nonzero()[0].tolist()
        raise ValueError(f"branch_ids row {b}, position {t + 1}: branch {int(br[b, t + 1])} follows branch "
                         f"{int(br[b, t])} in one segment; expected the prefix (0), then branch 1, then branch 2")


def segmented_attention(q, k, v, sliding_window, segment_ids, branch_ids, scale):
    """The CPU path of prompt-shared rows, segment by segment since no token sees across segments, each in two
    SDPA calls: the prefix and branch 1 as one causal sequence (SDPA's own causal path, no mask tensor), then
    branch 2's queries against the prefix's keys and its own (a lower-right causal mask, (n2, n0 + n2)). Costs
    about (n0 + n1)^2 / 2 + n2 (n0 + n2) per pair where one masked (T, T) pass costs T^2 per row."""
    B, H, T, D = q.shape
    gqa = H != k.shape[1]

    def sdpa(qs, ks, vs, mask=None):
        causal = mask is None and (sliding_window is None or qs.shape[2] <= sliding_window)
        if mask is None and not causal:  # a first part longer than the window: its dense (L, L) window mask
            mask = attention_mask(qs.shape[2], sliding_window, device=qs.device)
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)

    rows = []
    for b in range(B):
        starts = _changes(segment_ids[b:b + 1])[0].nonzero().squeeze(1).tolist() + [T]
        counts = [(branch_ids[b] == x).long().cumsum(0) for x in (0, 1)]
        parts = []
        for lo, hi in zip(starts[:-1], starts[1:]):
            n0, n1 = (int(c[hi - 1]) - (int(c[lo - 1]) if lo else 0) for c in counts)
            mid = lo + n0 + n1  # branch 2 starts here
            parts.append(sdpa(q[b:b + 1, :, lo:mid], k[b:b + 1, :, lo:mid], v[b:b + 1, :, lo:mid]))
            if mid < hi:
                keys = [torch.cat([x[b:b + 1, :, lo:lo + n0], x[b:b + 1, :, mid:hi]], dim=2) for x in (k, v)]
                i = n0 + torch.arange(hi - mid, device=q.device)[:, None]  # the queries' logical positions
                j = torch.arange(n0 + hi - mid, device=q.device)[None, :]  # the keys'
                mask = j <= i
                if sliding_window is not None:
                    mask = mask & (i - j < sliding_window)
                parts.append(sdpa(q[b:b + 1, :, mid:hi], *keys, mask))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


def _check_ids(name, ids, B, T, device):  # segment_ids, branch_ids: integer (B, T) on q's device
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (B, T):
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a (B, T) = {(B, T)} tensor; got {got}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype; got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} must be on q's device {device}; got {ids.device}")


def check_inputs(q, k, v, causal, sliding_window, segment_ids, softmax_scale, branch_ids=None):
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
        _check_ids("segment_ids", segment_ids, B, T, q.device)
    if branch_ids is not None:
        if segment_ids is None or not causal:
            raise ValueError("branch_ids (prompt-shared segments) need segment_ids and causal=True")
        _check_ids("branch_ids", branch_ids, B, T, q.device)
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive number or None; got {softmax_scale!r}")
