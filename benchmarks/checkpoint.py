"""Checkpoint workload of bench.py: save + load of the bench model."""

import os
import tempfile
import time

import torch

from benchmarks.harness import Meter, load_hf, load_ours

# -----------------------------------------------------------------------------
# Checkpoint: save + load of the bench model (safetensors on both sides)


CKPT = dict(warmup=1, steps=3)


def case_checkpoint(impl, weights):
    meter = Meter(CKPT["warmup"])
    if impl == "ours":
        from model import Mistral
        model = load_ours(weights, requires_grad=False)
        save = lambda path: model.save_pretrained(path)                                   # noqa: E731
        load = lambda path: Mistral.from_pretrained(path, dtype=torch.float32)            # noqa: E731
    else:
        from transformers import MistralForCausalLM
        model = load_hf(weights, train=False)
        save = lambda path: model.save_pretrained(path)                                   # noqa: E731
        load = lambda path: MistralForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    save_t, load_t = [], []
    with tempfile.TemporaryDirectory() as d:
        meter.start()
        for i in range(CKPT["warmup"] + CKPT["steps"]):
            path = os.path.join(d, f"ckpt{i}")
            t0 = time.perf_counter()
            save(path)
            t1 = time.perf_counter()
            loaded = load(path)
            t2 = time.perf_counter()
            save_t.append(t1 - t0)
            load_t.append(t2 - t1)
            del loaded
            meter.step()
    W = CKPT["warmup"]
    return meter.result(save_times=save_t[W:], load_times=load_t[W:])
