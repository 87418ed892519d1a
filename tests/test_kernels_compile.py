"""The Triton kernels compiled for an H100 (sm_90) and an A100 (sm_80) on this CPU machine: every
autotune config the kernels may pick on each device compiles, fits that device's shared memory, keeps
every value in registers (zero spill bytes), and the attention kernels' segment and prefix paths are
software-pipelined like plain causal.

A subset of `python -m kernels.bench compile` (the full table: bf16 and fp16, every mask variant): both
targets, bf16, head_dim 64 and 128, the plain causal variant, the heaviest segment variant (causal + window +
segments: packed SFT) and the heaviest prefix variant (causal + window + prefix: packed DPO pairs), every
kernel of kernels/. ~175 compiles of ~1.3 s each.
"""

import os

import pytest
import torch

from kernels import bench, logprobs

SUBSET = dict(targets=("sm_90", "sm_80"), dtypes=("bf16",), head_dims=(64, 128),
              variants=("causal", "causal+window+segments", "causal+window+prefix"))
PIPELINED_KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")


@pytest.fixture(scope="module")
def records():
    jobs = bench.compile_jobs(**SUBSET)
    return bench.run_compile(jobs, workers=min(len(os.sched_getaffinity(0)), 8))


def _name(r):
    return f"{r['kernel']} {r['target']} hd={r['head_dim']} {r['variant']} {bench._config_text(r['config'])}"


def test_subset_covers_every_kernel_and_head_dim(records):
    assert {r["target"] for r in records} == {"sm_90", "sm_80"}
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_delta",
                       "_logprobs_fwd_kernel", "_softmax_grad_kernel", "_matmul_kernel"}
    for k in PIPELINED_KERNELS:
        assert {r["head_dim"] for r in records if r["kernel"] == k} == {64, 128}
    assert {r["variant"] for r in records if r["kernel"] == "_matmul_kernel"} == {"logits", "grad_hidden",
                                                                                 "grad_weight"}


def test_every_config_compiles(records):
    failed = [f"{_name(r)}: {r.get('error')}" for r in records if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_every_config_fits_the_devices_shared_memory(records):
    # Each device's list is chosen for it: none may be one that the autotuner would have to drop there
    # (232,448 B per block on H100/H200, 166,912 B on A100).
    too_big = [f"{_name(r)}: {r['shared_bytes']} B" for r in records
               if r["ok"] and r["shared_bytes"] > bench.TARGETS[r["target"]][1]]
    assert not too_big and not any(r["pruned"] for r in records), "\n".join(too_big)


def test_no_config_spills_registers(records):
    spilling = [f"{_name(r)}: {r['spill_bytes']} B, {r['registers']} registers" for r in records
                if r["ok"] and r["spill_bytes"] != 0]
    assert not spilling, "\n".join(spilling)
    assert all(r["registers"] <= 255 for r in records if r["ok"])


@pytest.mark.parametrize("variant", ["causal+window+segments", "causal+window+prefix"])
def test_segment_and_prefix_variants_are_pipelined_like_plain_causal(records, variant):
    # cp.async in the main loops: the segment and prefix paths have no runtime branch around their loads.
    by_key = {(r["kernel"], r["target"], r["head_dim"], r["variant"], str(r["config"])): r for r in records}
    not_pipelined = [_name(r) for r in records if r["kernel"] in PIPELINED_KERNELS and r["ok"]
                     and not r["pipelined"]]
    assert not not_pipelined, "\n".join(not_pipelined)
    pairs = [k for k in by_key if k[0] in PIPELINED_KERNELS and k[3] == variant]
    assert len(pairs) >= 24
    for kernel, target, hd, _, cfg in pairs:
        assert (kernel, target, hd, "causal", cfg) in by_key


def test_softmax_grad_writes_dz_over_the_logits_only_behind_a_barrier(records):
    # The GPU launch writes the 16-bit dz into the storage of the fp32 logits it is reading: dz column c
    # overwrites bytes of logit c // 2. Warps of one program run unordered, so each store must wait, at a
    # bar.sync, for every warp's loads of the loop iteration (before the fix: 4 ld.global.v4, then 2
    # st.global.v4, no barrier between them, on sm_90).
    z = torch.zeros(3, 10)
    dz = logprobs._dz_buffer(z, logprobs._dz_dtype(torch.bfloat16))       # what the bf16 launch passes
    shares = dz.untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    rs = [r for r in records if r["kernel"] == "_softmax_grad_kernel"]
    assert {r["target"] for r in rs} == {"sm_90", "sm_80"} and all(r["ok"] for r in rs)
    if shares:
        assert [r["unfenced_loop_stores"] for r in rs] == [0] * len(rs)


def test_no_kernel_stores_after_loads_in_a_loop_without_a_barrier(records):
    # Every kernel of kernels/ read for the pattern of the softmax race: none writes, inside a loop, after
    # loading in that loop with no barrier between (the others store once, after their loops).
    unfenced = [f"{_name(r)}: {r['unfenced_loop_stores']}" for r in records if r["ok"] and r["unfenced_loop_stores"]]
    assert not unfenced, "\n".join(unfenced)


def test_the_ptx_check_finds_stores_racing_loads_in_a_loop():
    # The check itself, on PTX shaped like the softmax-gradient loop before and after the fix.
    loop = "$L__BB0_9:\n\tld.global.v4.b32 {%r1}, [%rd1];\n{}\tst.global.v4.b32 [%rd2], {%r2};\n\t@%p1 bra \t$L__BB0_9;\n"
    assert bench.unfenced_loop_stores(loop.replace("{}", "")) == 1
    assert bench.unfenced_loop_stores(loop.replace("{}", "\tbar.sync \t0;\n")) == 0
    assert bench.unfenced_loop_stores(loop.replace("{}", "").replace("bra \t$L__BB0_9", "bra \t$L__BB0_10")) == 0
