"""Autotune configurations of the Triton kernels, per GPU generation, as data.

Each list is what a kernel's autotuner benchmarks on a device after its early pruning, and what
`python -m kernels.bench compile` compiles for that device's target; tests/test_kernels_compile.py
checks a subset in CI. The rule: every configuration kept for a generation compiles for it within
its shared memory (232,448 B per block on H100/H200, 166,912 B on A100) and without a single
register spilled, in every mask variant, bf16 and fp16; a configuration that spills is replaced or
dropped, not kept. Generation 90 is H100/H200 (sm_90); 80 is A100 (sm_80) and every capability below
9.0. sm_80's mma.sync holds the accumulators in each thread's registers, where sm_90's wgmma spreads
them over a warpgroup, hence smaller tiles there.

fp32 is not on the kernels' path on CUDA: compiled with these lists for sm_90 and sm_80 (ieee fp32 dots), 84 of
the 94 configurations that fit spilled registers (up to 213 KB), so fp32 models run SDPA and the torch log-prob
path there (docs/training.md, "fp32 on CUDA").
"""

import torch


def arch(capability):
    """The generation of a compute capability given as 10 * major + minor (90, 80, 86, ...)."""
    return 90 if capability >= 90 else 80


def device_arch(tensor):
    """The generation of the CUDA device holding `tensor` (what the early_config_prune hooks use)."""
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return arch(10 * major + minor)


# kernels/attention.py: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim (below 64: the
# 64 list). In dk/dv, BLOCK_N (keys owned by a program) carries the two (BLOCK_N, D) fp32 accumulators,
# so at D=128 it pairs with small query tiles.
ATTENTION = {
    90: {"_attn_fwd": {64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4)],
                       128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3)]},
         "_attn_bwd_dkdv": {64: [(32, 128, 8, 3), (32, 64, 4, 3), (32, 128, 8, 2), (64, 64, 8, 3)],
                            128: [(16, 128, 8, 3), (16, 128, 8, 2), (32, 64, 8, 2)]},
         "_attn_bwd_dq": {64: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 3)],
                          128: [(128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3)]}},
    80: {"_attn_fwd": {64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4)],
                       128: [(64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3)]},
         "_attn_bwd_dkdv": {64: [(32, 64, 8, 2), (32, 32, 4, 3), (32, 32, 8, 3)],
                            128: [(32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3), (32, 32, 4, 3)]},
         "_attn_bwd_dq": {64: [(64, 32, 4, 3), (32, 64, 4, 3), (128, 32, 8, 3)],
                          128: [(64, 32, 4, 3), (64, 64, 4, 2), (32, 64, 4, 3), (64, 32, 4, 2)]}},
}

# kernels/logprobs.py, the fused forward: (BLOCK_N, BLOCK_V, num_warps, num_stages), BLOCK_D = 64.
# Dropped for spilling: 128/128 with 4 warps, and 128/64 with 4 warps since the vocabulary split (128 B);
# on sm_80 also every 4-warp tile above 64 x 64 and 128/128.
LOGPROBS_FWD = {
    90: [(64, 64, 4, 3), (64, 64, 8, 4), (64, 128, 4, 3), (64, 128, 8, 4), (128, 64, 8, 4), (128, 128, 8, 4)],
    80: [(64, 64, 4, 3), (64, 64, 8, 4), (64, 128, 8, 4), (128, 64, 8, 4)],
}

# kernels/logprobs.py, the GEMMs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per operand layout.
# With A transposed (grad_weight = dz^T @ h: stride_am == 1) every tile above 128 x 64 or 64 x 128 spilled
# on sm_90, hence a list of its own; on sm_80 the 128 x 256 row-major tile spilled too.
LOGPROBS_MM = {
    90: {"row-major A": [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
                         (128, 64, 64, 4, 4)],
         "transposed A": [(64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3)]},
    80: {"row-major A": [(256, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
         "transposed A": [(64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3)]},
}
