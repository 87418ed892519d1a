"""Training checkpoints: model + optimizer through torch.distributed.checkpoint (DCP: sharded, reloadable at
any world size), each rank's train state (data position, RNG) as JSON. common.py saves one when due and
resumes from the newest complete one.
"""

import base64
import dataclasses
import json
import os
import shutil
import time

import torch
import torch.distributed as dist

import lora
from files import fsync_dir, write_json

# -----------------------------------------------------------------------------
# Checkpoints: DCP for model + optimizer (sharded, any world size on reload), JSON for the rest.
# Atomic: written into step_N.tmp, then rank 0 writes meta.json (sizes of every file) and renames the
# directory. A directory without meta.json, or whose files disagree with it, is never taken as latest.


def _rng_state():
    s = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        s["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return s


def _set_rng_state(s):
    import numpy as np
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(s["torch"]), dtype=np.uint8).copy()))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(s["cuda"]), dtype=np.uint8).copy()))


def save_train_checkpoint(ckpt_dir, step, model, optimizer, d, state, config, keep_last=2):
    # DCP (and the DTensor it imports, 0.5 s) only here and in load_train_checkpoint: the generation stages
    # (eval, feedback, generate, chat) import this module through common and never checkpoint.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(ckpt_dir, f"step_{step:07d}")
    tmp = final + ".tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=lora.checkpoint_options(model))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        write_json(os.path.join(tmp, f"train_state_rank{d.rank}.json"), {**state, "rng": _rng_state()})
        dist.barrier()
        if d.main:
            files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
            write_json(os.path.join(tmp, "meta.json"), {"step": step, "world_size": d.world, "files": files,
                                                        "config": dataclasses.asdict(config), "time": time.time()})
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(ckpt_dir)
    except BaseException as e:  # e.g. a full disk (DCP wraps errors in CheckpointException, a BaseException)
        # The torn step_N.tmp would never be listed: remove it, to free the space.
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        last = list_checkpoints(ckpt_dir)
        e.add_note(f"checkpoint {final} was not written (its temporary directory is removed); the last complete "
                   f"checkpoint is {last[-1] if last else 'none'}")
        raise
    if d.main:
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final



def checkpoint_is_complete(path):
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        return all(os.path.getsize(os.path.join(path, fn)) == size for fn, size in meta["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def checkpoint_step(name):
    # "step_0000200" -> 200; None for anything else (a step_N.tmp being written, stray files).
    prefix, _, number = name.partition("_")
    return int(number) if prefix == "step" and number.isdigit() else None


def list_checkpoints(ckpt_dir):
    # Complete checkpoints, oldest first by step number (not by name: "step_10000000" sorts before
    # "step_9999999", and a hand-renamed "step_30" before "step_0000200").
    if not os.path.isdir(ckpt_dir):
        return []
    steps = {n: checkpoint_step(n) for n in os.listdir(ckpt_dir)}
    dirs = [os.path.join(ckpt_dir, n) for n in sorted((n for n in steps if steps[n] is not None), key=steps.get)]
    return [p for p in dirs if checkpoint_is_complete(p)]


def load_train_checkpoint(path, model, optimizer, d):
    """Restore model, optimizer and this rank's train state (data position, RNG). Works for another world
    size too (DCP reshards), except the RNG state, which then comes from rank 0's file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    options = lora.checkpoint_options(model)  # with LoRA: the adapters (the frozen base came from init_from)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    fn = os.path.join(path, f"train_state_rank{d.rank}.json")
    if not os.path.exists(fn):
        fn = os.path.join(path, "train_state_rank0.json")
    with open(fn) as f:
        train_state = json.load(f)
    _set_rng_state(train_state.pop("rng"))
    return train_state
