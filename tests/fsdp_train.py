# Under torchrun (gloo, CPU): a few SFT-style optimizer steps of the tiny model through common.build_model, in
# several modes, recording what tests/test_fsdp.py compares across modes and rank counts.
#   python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_train.py OUT.npz plain,ac,nosync[,compile]
# Each mode: 2 optimizer steps of 16 rows: 2 rows per micro-step and rank, 16 / (2 x ranks) micro-steps (the
# same rows for any number of ranks). After every micro-step's backward it records whether each parameter's .grad is a
# sharded DTensor of its local shard's shape and whether FSDP holds any unsharded gradient, the gradient bytes
# on this rank, and the all-gathers per step; at the end the losses, gradient norms and gathered weights.
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from torch.distributed.tensor import DTensor

import common

STEPS, MICRO, T = 2, 2, 32
GLOBAL = 16  # rows per optimizer step, over all ranks and micro-steps


def unsharded_grad_bytes(model):
    # Every gradient FSDP2 could be holding unsharded: its accumulator (reduce dtype) and the unsharded
    # parameter's own .grad (what no-sync accumulation leaves when there is no reduce dtype, as on CPU).
    n = 0
    for m in model.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        group = state._fsdp_param_group if state is not None else None
        for fp in (group.fsdp_params if group is not None else []):
            for g in (fp.unsharded_accumulated_grad, getattr(fp, "_unsharded_param", None) is not None
                      and fp._unsharded_param.grad):
                if isinstance(g, torch.Tensor):
                    n += g.numel() * g.element_size()
    return n


def run(mode, d):
    model, mcfg = common.build_model("scratch", d, "tiny", seed=3, activation_checkpointing=mode in ("ac", "ac_compile"),
                                     compile=mode in ("compile", "ac_compile"))
    opt = common.make_optimizer(model, 3e-3)
    g = torch.Generator().manual_seed(7)
    data = torch.randint(3, mcfg.vocab_size, (STEPS, GLOBAL, T + 1), generator=g)
    seg = (torch.arange(T) >= T // 2).long().expand(MICRO, T)  # two packed segments per row
    gathers = [0]
    real = _fsdp_param_group.foreach_all_gather

    def counting(*a, **k):
        gathers[0] += 1
        return real(*a, **k)

    _fsdp_param_group.foreach_all_gather = counting
    losses, norms, sharded_ok, unsharded, grad_bytes, ag = [], [], [], [], [], []
    ACCUM = GLOBAL // (MICRO * d.world)
    for step in range(STEPS):
        gathers[0] = 0
        total = 0.0
        n_global = GLOBAL * T
        for m in range(ACCUM):
            rows = data[step, m * MICRO * d.world + d.rank * MICRO:][:MICRO]
            if mode == "nosync":  # the old loop: no reduce-scatter until the last micro-step
                model.set_requires_gradient_sync(m == ACCUM - 1)
            targets = rows[:, 1:]
            mask = torch.ones(MICRO, T)
            nll = -model(rows[:, :-1], targets=targets, segment_ids=seg, expected_grad=-mask).sum()
            (nll * (d.world / n_global)).backward()
            total += nll.item()
            ok = all(isinstance(p.grad, DTensor) and p.grad.to_local().shape == p.to_local().shape
                     for p in model.parameters())
            sharded_ok.append(ok)
            unsharded.append(unsharded_grad_bytes(model))
            grad_bytes.append(sum(p.grad.to_local().numel() * 4 for p in model.parameters() if p.grad is not None))
        loss = common.all_reduce_sum([total], d)[0] / n_global
        ag.append(gathers[0])
        norms.append(common.optimizer_step(model, opt, 1.0, step, loss, None))
        losses.append(loss)
    _fsdp_param_group.foreach_all_gather = real
    weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().numpy().copy()
               for n, p in model.named_parameters()}
    shard_bytes = sum(p.to_local().numel() * 4 for p in model.parameters())
    return dict(losses=np.array(losses), norms=np.array(norms), sharded_ok=np.array(sharded_ok),
                unsharded=np.array(unsharded), grad_bytes=np.array(grad_bytes), shard_bytes=np.array(shard_bytes),
                all_gathers=np.array(ag), **{f"w:{n}": w for n, w in weights.items()})


def main(out, modes):
    d = common.setup_dist("cpu")
    torch.manual_seed(0)
    result = {}
    for mode in modes.split(","):
        try:
            r = run(mode, d)
        except Exception as e:  # e.g. inductor cannot compile here: recorded, the test decides
            if not mode.endswith("compile"):
                raise
            r = {"error": np.array(f"{type(e).__name__}: {str(e)[:2000]}")}
        result.update({f"{mode}/{k}": v for k, v in r.items()})
        dist.barrier()
    if d.main:
        np.savez(out, **result)
    common.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
