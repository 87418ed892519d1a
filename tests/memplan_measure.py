# Under torchrun (gloo, CPU): peak bytes of live CPU tensors during training steps, measured by torch's profiler
# (profile_memory: every allocation and free of torch's CPU allocator), next to memplan.plan for the same run.
#   python -m torch.distributed.run --nproc_per_node=N tests/memplan_measure.py OUT.json SPEC_JSON
# SPEC: {"model": MistralConfig fields, "stage": "sft"|"dpo", "micro_batch_size", "seq_len",
#        "activation_checkpointing", "accum", "packing" (DPO), "fsdp_unit"}. Rows are full of targets (SFT: two packed segments;
# DPO: right padding, answer = second half; packed DPO: two pairs per row, prompt | chosen | rejected of
# T/8 | 3T/16 | 3T/16, every answer token a target), as sft.py's and dpo.py's micro-steps run them. Rank 0 writes
# the JSON.
import json
import sys
import types

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import common
import memplan
from model import MistralConfig


def main(out, spec):
    spec = json.loads(spec)
    d = common.setup_dist("cpu")
    mcfg = MistralConfig(**spec["model"])
    packed = spec.get("packing", False)
    tcfg = types.SimpleNamespace(micro_batch_size=spec["micro_batch_size"], seq_len=spec["seq_len"],
                                 activation_checkpointing=spec["activation_checkpointing"], mixed_precision=False,
                                 reference="precomputed", packing=packed, fsdp_unit=spec.get("fsdp_unit", "layer"))
    dpo = spec["stage"] == "dpo"
    B, T = spec["micro_batch_size"] * (2 if dpo and not packed else 1), spec["seq_len"]
    g = torch.Generator().manual_seed(d.rank)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        import model as M
        M.PRESETS["_measure"] = spec["model"]
        model, _ = common.build_model("scratch", d, "_measure", seed=0,
                                      activation_checkpointing=tcfg.activation_checkpointing, fsdp_unit=tcfg.fsdp_unit)
        del M.PRESETS["_measure"]
        opt = common.make_optimizer(model, 1e-4)
        dist.barrier()
        with torch.profiler.record_function("## train ##"):
            for step in range(2):
                for m in range(spec["accum"]):
                    ids = torch.randint(3, mcfg.vocab_size, (B, T + 1), generator=g)
                    targets = ids[:, 1:].clone()
                    if dpo and packed:
                        P, A = T // 8, 3 * T // 16
                        seg = torch.arange(2).repeat_interleave(T // 2).expand(B, T).contiguous()
                        branch = torch.tensor([0] * P + [1] * A + [2] * A).repeat(2).expand(B, T).contiguous()
                        answer = (branch != 0).flatten().nonzero().squeeze(1)        # every answer token a target
                        lp = model(ids[:, :-1], targets=ids[:, :-1].flatten()[answer], segment_ids=seg,
                                   branch_ids=branch, target_positions=answer - 1)
                        loss = -(lp * torch.linspace(0.5, 1.5, len(answer))).sum()
                    elif dpo:
                        targets[:, :T // 2] = -100
                        attn = torch.ones(B, T, dtype=torch.bool)
                        attn[B // 2:, -T // 8:] = False          # some right padding
                        targets[~attn] = -100
                        lp = model(ids[:, :-1], targets=targets, attention_mask=attn)
                        loss = -(lp.sum(-1) * torch.linspace(0.5, 1.5, B)).sum()  # per-row factors, like DPO
                    else:
                        seg = (torch.arange(T) >= T // 3).long().expand(B, T).contiguous()
                        mask = (targets != -100).float()
                        loss = -model(ids[:, :-1], targets=targets, segment_ids=seg, expected_grad=-mask).sum() / (B * T)
                    loss.backward()
                common.optimizer_step(model, opt, 1.0, step, loss.item(), None)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() in ("[memory]", "## train ##")),
                    key=lambda e: e.start_ns())
    train = [e for e in events if e.name() == "## train ##"][0]
    live, peak, before = 0, 0, None
    for e in events:
        if e.name() != "[memory]":
            continue
        if before is None and e.start_ns() >= train.start_ns():
            before = live                               # model + optimizer, just before the first micro-step
        live += e.nbytes()
        if e.start_ns() >= train.start_ns():
            peak = max(peak, live)
    p = memplan.plan(mcfg, tcfg, d.world, "cpu", spec["stage"], T)
    res = common.all_reduce_sum([peak, before], d)
    if d.main:
        with open(out, "w") as f:
            json.dump({"measured_peak": res[0] / d.world, "measured_before": res[1] / d.world, "plan_peak": p["peak"],
                       "plan_persistent": p["persistent"], "moment": p["moment"], "moments": p["moments"],
                       "items": p["items"]}, f, indent=1)
    common.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
