"""What the stage scripts share: config parsing, torchrun setup, FSDP2 sharding and sharded loading,
DCP checkpoints with resume, Hugging Face export, LR schedules, JSONL + tqdm logging, and the generation
clients (local checkpoints, OpenAI-compatible endpoints) with the resumable loop that feedback.py and
data/ultrachat/generate.py run them in.

Each piece is a plain function; the stage scripts call them in order, like a recipe.
"""

import base64
import concurrent.futures
import dataclasses
import difflib
import glob
import hashlib
import http.client
import importlib
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
import urllib.error
import urllib.request
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import lora
from model import CheckpointReader, Mistral, MistralConfig, config_from_preset, save_checkpoint

# -----------------------------------------------------------------------------
# Config: dataclass defaults <- optional JSON preset <- --key=value flags


def _convert(value, typ, key):
    # Strings from the command line (or JSON values) into the field's declared type.
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], key)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes"):
                return True
            if str(value).lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if typ is int and isinstance(value, str):
            return int(float(value)) if "e" in value.lower() else int(value)
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"config: {key}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from None


def parse_config(cls, argv):
    """`[preset.json] [--key=value ...]` -> cls instance. Unknown keys and bad values are errors that name them."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}

    def put(key, value, where):
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown config key {key!r}{hint}")
        values[key] = _convert(value, hints[key], key)

    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"command line: expected --key=value, got {arg!r}")
            put(key, value, "command line")
        else:
            try:
                with open(arg) as f:
                    preset = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"preset file {arg} not found") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{arg}: not valid JSON ({e})") from None
            for key, value in preset.items():
                if not key.startswith("_"):  # "_comment" keys document presets
                    put(key, value, arg)
    return cls(**values)


def write_json(path, obj):
    # Atomic: a reader sees the old file or the new one, never half of one.
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. disk full: leave no half-written temporary behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -----------------------------------------------------------------------------
# torchrun


@dataclasses.dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup_dist(device="auto"):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU). Plain `python stage.py`: a
    one-rank group on an in-memory store, so the rest of the code never special-cases it."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # Two ranks on two cores: one thread each, or they fight over the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, world, local_rank, dev)


def all_reduce_sum(x, d):
    t = torch.tensor(x, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# Model: built on the meta device, sharded with FSDP2, weights loaded slice by slice


def model_config(init_from, model_preset="tiny"):
    """The MistralConfig of `init_from` (its config.json: no weight is read) or of the preset for "scratch"."""
    if init_from == "scratch":
        return config_from_preset(model_preset)
    return MistralConfig.from_json(os.path.join(init_from, "config.json"))


def build_model(init_from, d, model_preset="tiny", seed=0, mixed_precision=True, activation_checkpointing=False,
                compile=False, reshard_after_forward=True, adapters=None):
    """init_from: a Hugging Face directory, or "scratch" (random init of `model_preset`).
    Returns the FSDP2-sharded model and its MistralConfig. Parameters are fp32 masters; on CUDA with
    mixed_precision, compute runs in bf16 with fp32 gradient reductions. adapters: lora.Settings (or None):
    LoRA adapters beside the frozen base weights, which are then stored in bf16 on CUDA with mixed_precision."""
    cfg = model_config(init_from, model_preset)
    if init_from == "scratch":
        # Small models only: every rank builds the full model with the same seed, then keeps its shard.
        # That makes a 1-rank and a 2-rank run start from identical weights.
        model = Mistral(cfg)
        model.init_weights(seed)
        model.to(torch.float32)
    else:
        reader = CheckpointReader(init_from)
        with torch.device("meta"):
            model = Mistral(cfg)
        reader.check_against(model)  # names and shapes, before any sharding or reading
    if adapters is not None:
        lora.apply(model, adapters)  # before sharding: FSDP shards frozen and adapter parameters together
        if mixed_precision and d.device.type == "cuda":
            lora.freeze_base_dtype(model, torch.bfloat16)
    mp = None
    if mixed_precision and d.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if mp is not None else {}
    # torchtitan's order per decoder layer: checkpoint, compile, then shard. Compile traces the checkpointed
    # forward as one region, and FSDP's hooks sit outside both: the recomputation in backward runs on the
    # parameters that the backward all-gather brought in (2 all-gathers per layer and micro-step, with or
    # without checkpointing: tests/test_fsdp.py counts them).
    for layer in model.model.layers:
        if activation_checkpointing:
            checkpoint_layer(layer)
        if compile:
            layer.compile()  # in place: parameter names stay HF's
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    if init_from == "scratch":
        model.to(d.device)
    else:
        model.to_empty(device=d.device)
        load_sharded(model, reader)
    if adapters is not None:
        lora.init_adapters(model, adapters, seed)
    return model, cfg


def checkpoint_layer(layer):
    """Activation checkpointing of one module, in place: keep only its inputs in forward and recompute its
    insides in backward. Unlike torch's checkpoint_wrapper it adds no module level, so the parameter names stay
    Hugging Face's. Without grad (evaluation, reference log-probs) it just runs the layer."""
    forward = layer.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = checkpointed


def local_rows(p):
    # (start, stop) of dim 0 that this rank holds of a Shard(0) DTensor.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0], offset[0] + shape[0]


@torch.no_grad()
def load_sharded(model, reader):
    # Each rank reads only its rows of each tensor from the (memory-mapped) safetensors files:
    # no rank ever holds the full weights.
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.numel() == 0 or lora.is_adapter(name):  # adapters: lora.init_adapters
            continue
        start, stop = local_rows(p) if isinstance(p, DTensor) else (0, p.shape[0])
        local.copy_(reader.get(name, dtype=local.dtype, device=local.device, rows=(start, stop)))


def export_hf(model, cfg, path, d, tokenizer=None, dtype=torch.bfloat16, adapter=None, merge=True):
    """Gather the sharded model tensor by tensor; rank 0 streams them into an HF directory. Peak memory on
    rank 0 is one shard file (5 GB at most), never the whole model. A LoRA model is exported as the plain
    model, its adapters merged into the weights (merge=False: the base weights), the adapter tensors collected
    into the dict `adapter` (PEFT names, see lora.merged)."""
    names = [n for n in model.state_dict() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    sd = model.state_dict()

    def gathered():
        for name in names:
            t = sd[name]
            yield name, t.full_tensor() if isinstance(t, DTensor) else t  # a collective: every rank calls it

    stream = gathered()
    if lora.lora_modules(model):
        stream = lora.merged(model, stream, {} if adapter is None else adapter, merge)
    stream = ((name, t.to(dtype)) for name, t in stream)

    out_cfg = dataclasses.replace(cfg, dtype=str(dtype).replace("torch.", ""))
    if d.main:
        save_checkpoint(path, out_cfg, stream, tokenizer=tokenizer)
    else:
        for _ in stream:
            pass
    dist.barrier()


# -----------------------------------------------------------------------------
# Optimizer and learning rate


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999), device_type="cpu"):
    params = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=True)  # torch's fused AdamW runs on CPU too: ~5x faster step there


def lr_at(step, total_steps, peak, warmup_ratio, schedule="cosine"):
    # Linear warmup to `peak` over warmup_ratio * total steps, then cosine or linear decay to 0 (HF's schedules).
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    if schedule == "constant":
        return peak
    raise ValueError(f"config: lr_schedule={schedule!r}; choose cosine, linear or constant")


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
            _fsync_dir(ckpt_dir)
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


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# -----------------------------------------------------------------------------
# Logging: a tqdm bar on rank 0 and one JSON line per step in out_dir/metrics.jsonl


def keep_until(path, step):
    # A resumed run redoes the steps after its checkpoint: drop their lines (a fresh run, step 0, drops all).
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def quiet_bars():
    # Progress bars only on a terminal (or with TQDM_FORCE=1): in a log file their redraws are noise.
    return not sys.stderr.isatty() and os.environ.get("TQDM_FORCE") != "1"


class Logger:
    def __init__(self, out_dir, d, total_steps, initial_step=0, desc="train"):
        self.main = d.main
        self.bar, self.file = None, None
        if self.main:
            from tqdm import tqdm
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "metrics.jsonl")
            keep_until(path, initial_step)
            self.file = open(path, "a")
            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True,
                            disable=quiet_bars())

    def log(self, step, advance=True, **metrics):
        if not self.main:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update(metrics)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if advance:
            self.bar.update(1)
        short = {k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)}
        self.bar.set_postfix(short, refresh=False)

    def print(self, *args):
        if self.main:
            (self.bar.write if self.bar is not None else print)(" ".join(str(a) for a in args))

    def close(self):
        if self.main:
            self.bar.close()
            self.file.close()


def peak_flops(device):
    # Dense bf16 peak per GPU (REFERENCE.md), for MFU. None where we do not know it.
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12)):
        if key in name:
            return flops
    return None


def flops_per_token(cfg, seq_len):
    # 6 N for the matmuls (forward + backward) plus causal attention scores: 6 * layers * hidden * T.
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # embedding lookup is no matmul
    ctx = seq_len if cfg.sliding_window is None else min(seq_len, cfg.sliding_window)
    return 6 * n + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * ctx


# -----------------------------------------------------------------------------
# Pieces of the training loop that every stage runs the same way


def start_or_resume(cfg, model, optimizer, d):
    """Returns (first step, last good checkpoint or None). With cfg.resume, continue from the newest
    complete checkpoint in out_dir/ckpt; a torn one (no meta.json, or sizes that disagree) is skipped."""
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    ckpts = list_checkpoints(ckpt_dir)
    torn = sorted(set(os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n.startswith("step_"))
                  - set(ckpts)) if os.path.isdir(ckpt_dir) else []
    if cfg.resume and torn and d.main:
        print(f"--resume: ignoring incomplete checkpoints (killed while writing?): {', '.join(torn)}")
    if cfg.resume and ckpts:
        state = load_train_checkpoint(ckpts[-1], model, optimizer, d)
        if d.main:
            print(f"resumed from {ckpts[-1]} at step {state['step']}")
        return state["step"], ckpts[-1]
    if cfg.resume and d.main:
        print(f"--resume: no complete checkpoint in {cfg.out_dir}/ckpt, starting from step 0")
    return 0, None


def check_out_dir(cfg, d):
    """Before any work. --resume=false into an out_dir that holds checkpoints or an hf/ export is refused: the
    new run's checkpoints would be pruned, and later resumed, together with the old run's. --overwrite=true
    deletes the old ones first."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("config: resume=true and overwrite=true: choose one (continue the run in out_dir, or "
                         "delete it and start over)")
    if cfg.resume:
        return
    ckpt_dir, hf_dir = os.path.join(cfg.out_dir, "ckpt"), os.path.join(cfg.out_dir, "hf")
    old = sorted(os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    old += [hf_dir] if os.path.exists(hf_dir) else []
    if not old:
        return
    if not cfg.overwrite:
        shown = ", ".join(old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
        raise FileExistsError(f"out_dir={cfg.out_dir} holds an earlier run ({shown}); continue it with "
                              "--resume=true, delete them and start over with --overwrite=true, or choose "
                              "another --out_dir")
    dist.barrier()  # every rank has looked before rank 0 deletes
    if d.main:
        for path in (ckpt_dir, hf_dir):
            shutil.rmtree(path, ignore_errors=True)
        print(f"--overwrite=true: deleted {', '.join(old)}")
    dist.barrier()


def announce(cfg, d, lines):
    # Print the effective config and save it beside the run's outputs.
    if d.main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        for line in lines:
            print(line)
        write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))


def optimizer_step(model, optimizer, grad_clip, step, loss, last_ckpt):
    """Clip, check, step. A non-finite loss or gradient stops the run before it can poison the weights."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step + 1}: loss={loss} grad_norm={grad_norm} is not finite; stopped "
                                 f"before the update. Last good checkpoint: {last_ckpt or 'none'} "
                                 f"(resume from it with --resume=true, perhaps with a lower lr)")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def finish(model, mcfg, cfg, d, tokenizer):
    """Export the final model as a Hugging Face directory (out_dir/hf) with the run's config beside it."""
    hf_dir = os.path.join(cfg.out_dir, "hf")
    adapter = {}
    export_hf(model, mcfg, hf_dir, d, tokenizer, getattr(torch, cfg.export_dtype), adapter=adapter)
    if d.main:
        write_json(os.path.join(hf_dir, "train_config.json"), dataclasses.asdict(cfg))
        print(f"exported {hf_dir}")
    if adapter:
        lora.export_adapter(model, mcfg, cfg, d, tokenizer, adapter)
    shutdown()


def load_tokenizer(path, mcfg, splits=()):
    """The tokenizer a stage exports with (data.tokenizer.load_tokenizer: a tokenizer.model, or a directory whose
    tokenizer_config.json sets `legacy`), checked against the model's vocab_size and against the tokenizer each
    prepared split (data.shards.Shards) records in its json: the exported tokenizer must give the ids trained on."""
    from data.tokenizer import load_tokenizer as load
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path} not found (set --tokenizer=PATH/tokenizer.model or a directory)")
    tok = load(path)
    if tok.vocab_size != mcfg.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tok.vocab_size} pieces, the model's vocab_size is {mcfg.vocab_size}")
    ours = {"sha256": hashlib.sha256(tok.model_bytes).hexdigest(), "legacy": tok.legacy}
    for split in splits:
        recorded = split.meta.get("tokenizer") or {}  # absent in splits written by other tools: nothing to check
        for key in ours:
            if key in recorded and recorded[key] != ours[key]:
                raise ValueError(
                    f"{split.paths['json']}: the data was tokenized with {recorded.get('path')} ({key} "
                    f"{recorded[key]}), but this run would export {tok.model_path} ({key} {ours[key]}"
                    + (f", from {os.path.join(path, 'tokenizer_config.json')}" if key == "legacy" and os.path.isdir(path)
                       else "") + "): the model would be served with other ids than it was trained on. Prepare the "
                    "data with this tokenizer, or pass --tokenizer= the one it was prepared with")
    return tok


def end_of_step(cfg, step, total_steps, model, optimizer, d, log, last_ckpt):
    """Checkpoint when due; honour --stop_after. Returns (last good checkpoint, whether to stop now)."""
    if (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0) or step == total_steps:
        last_ckpt = save_train_checkpoint(os.path.join(cfg.out_dir, "ckpt"), step, model, optimizer, d,
                                          {"step": step}, cfg, cfg.keep_checkpoints)
    if step == cfg.stop_after and step < total_steps:
        log.print(f"stopping after step {step} as asked; continue with --resume=true")
        log.close()
        shutdown()
        return last_ckpt, True
    return last_ckpt, False


def shutdown():
    # Every rank reaches the barrier before any tears gloo down: a rank that destroyed the group while its
    # peer was still finishing a write was seen to abort at exit ("terminate called without an active
    # exception") after the run had completed.
    dist.barrier()
    dist.destroy_process_group()


def broadcast_object(obj, d):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_batches(n, batch_size, d):
    """Split items 0..n-1 into this rank's batches for evaluation-style loops. Every rank gets the same
    number of batches, because each forward pass of an FSDP model is a collective: a rank that runs out
    of items gets `(the first batch again, False)` and must discard the result. Yields (indices, real)."""
    per_round = batch_size * d.world
    for start in range(0, n, per_round):
        lo = start + d.rank * batch_size
        idx = list(range(lo, min(lo + batch_size, n)))
        yield (idx, True) if idx else (list(range(min(batch_size, n))), False)


# -----------------------------------------------------------------------------
# Generation: the clients that write text (local checkpoints, OpenAI-compatible endpoints) and the resumable,
# distributed loop over batches with per-rank part files. feedback.py and data/ultrachat/generate.py use them.


def seed_of(*keys):
    # A 63-bit seed from any keys, the same in every process (Python's hash() is salted per process).
    return int.from_bytes(hashlib.sha256("/".join(map(str, keys)).encode()).digest()[:8], "little") >> 1


def check_utf8(text, field):
    # A JSON-escaped lone surrogate ("\ud800") decodes to a str that no UTF-8 file can hold.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"'{field}': lone surrogate at {e.start}") from None


def read_rows(path):
    """(where, row, error) per row of a .jsonl or .parquet file, or of a file holding one JSON list (alpaca_eval's
    .json files; a .json file of JSON lines, as Hugging Face exports them, reads as .jsonl); `where` is file:line,
    file row N or file item N."""
    is_list = False
    if path.endswith(".json"):
        with open(path, "rb") as f:
            is_list = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    if is_list:
        try:
            with open(path, encoding="utf-8-sig") as f:
                rows = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            yield f"{path} item {i + 1}", row, None
        return
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # only for parquet input
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i + 1}", row, None
        return
    with open(path, "rb") as f:  # bytes: one line of invalid UTF-8 is that line's problem, not the file's
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                yield f"{path}:{n}", None, f"not valid UTF-8 (byte {e.start + 1})"
                continue
            try:
                yield f"{path}:{n}", json.loads(line), None
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", None, f"not valid JSON ({e.msg} at column {e.colno})"


def parse_rows(path, parse, field, strict=False, limit=-1):
    """parse(row, file name) over the rows of `path` (config field `field`) -> (the parsed rows, in order, at most
    `limit` if > 0; one message per malformed row, naming it as file:line). A row parse cannot read raises
    ValueError saying why; with strict the first one stops the run."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config {field}: {path} not found")
    parsed, malformed = [], []
    for where, row, error in read_rows(path):
        if error is None:
            try:
                parsed.append(parse(row, os.path.basename(path)))
            except ValueError as e:
                error = str(e)
        if error is not None:
            if strict:
                raise ValueError(f"{where}: {error} (strict=true)")
            malformed.append(f"{where}: {error}; skipped")
        elif len(parsed) == limit:
            break
    return parsed, malformed


FUNCTION_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def parse_spec(spec, field):
    """'PATH', 'URL|model=..|key_env=..|name=..' or 'module:function' -> dict(kind, target, name, options...)."""
    head, *opts = spec.strip().split("|")
    options = {}
    for o in opts:
        key, eq, value = o.partition("=")
        if not eq or key not in ("model", "key_env", "name"):
            raise ValueError(f"config {field}: {spec!r}: option {o!r} is not model=, key_env= or name=")
        options[key] = value
    if head.startswith(("http://", "https://")):
        if "model" not in options:
            raise ValueError(f"config {field}: {spec!r}: an endpoint needs |model=NAME")
        kind = "endpoint"
    elif FUNCTION_RE.fullmatch(head) and not os.path.isdir(head):
        kind = "function"
    elif not os.path.isfile(os.path.join(head, "config.json")):
        raise ValueError(f"config {field}: {spec!r} is not a Hugging Face directory (no {head}/config.json), an "
                         "http(s) URL or module:function")
    else:
        kind = "local"
    return {**options, "kind": kind, "target": head, "name": options.get("name") or options.get("model") or head,
            "field": field}


def failure(error):
    return dict(text=None, finish_reason=None, tokens=0, error=error)


class LocalModel:
    """A Hugging Face-format directory on this rank's device; chats are rendered with the Zephyr template."""

    def __init__(self, path, device, dtype):
        from data.tokenizer import Tokenizer
        self.model = Mistral.from_pretrained(path, dtype=dtype, device=device).eval()
        self.tok = Tokenizer.from_pretrained(path)
        if self.tok.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"{path}/tokenizer.model has {self.tok.vocab_size} pieces, {path}/config.json says "
                             f"vocab_size={self.model.config.vocab_size}")
        self.path, self.device, self.max_len = path, device, self.model.config.max_position_embeddings

    def generate(self, chats, max_new_tokens, temperature, top_p, generator):
        """One batched model.generate over the rendered chats -> per chat dict(text, finish_reason, tokens, error)."""
        ids = [self.tok.encode_chat(c, add_generation_prompt=True)[0] for c in chats]
        fit = [i for i, x in enumerate(ids) if len(x) + max_new_tokens <= self.max_len]
        out = [failure(f"prompt of {len(x)} tokens + {max_new_tokens} new ones exceeds max_position_embeddings="
                       f"{self.max_len} of {self.path}") for x in ids]  # replaced below where it fits
        if fit:
            new = self.model.generate([ids[i] for i in fit], max_new_tokens, temperature=temperature,
                                      top_p=top_p if top_p < 1.0 else None, generator=generator,
                                      eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
            for i, row in zip(fit, new):
                stop = bool(row) and row[-1] == self.tok.eos_id
                out[i] = dict(text=self.tok.decode(row[:-1] if stop else row), tokens=len(row), error=None,
                              finish_reason="stop" if stop else "length")
        return out


@torch.no_grad()
def last_logits(model, seqs, pad_id):
    # Next-token logits of each token-id list (a local judge's verdict: feedback.py, eval.py). Left-padded
    # batch, one forward pass; the LM head only at the last position, which is real in every row.
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    ok = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        ok[i, T - len(s):] = True
    dev = model.lm_head.weight.device
    h = model.hidden_states(ids.to(dev), attention_mask=ok.to(dev))[:, -1]   # (B, hidden)
    return model.lm_head(h)                                                  # (B, V)


class Endpoint:
    """An OpenAI-compatible chat-completions server. Transient failures (timeouts, connection errors, HTTP
    408/409/429/5xx, replies that are not a chat completion) are retried with exponential backoff, then
    returned as a failure; HTTP 401/403 stops the run, since no request could succeed."""

    def __init__(self, url, model, key_env, cfg):
        self.url, self.model, self.key_env = url.rstrip("/") + "/chat/completions", model, key_env
        self._key = os.environ.get(key_env) if key_env else None
        if key_env and not self._key:
            raise ValueError(f"config: the environment variable {key_env} (key_env of {url}) is not set")
        self.timeout, self.attempts, self.backoff, self.concurrency = (cfg.request_timeout, cfg.max_attempts,
                                                                       cfg.backoff_s, cfg.concurrency)

    def __repr__(self):  # never shows the key
        return f"Endpoint({self.url}, model={self.model})"

    def chat(self, messages, temperature, top_p, max_tokens, top_logprobs=0):
        """One chat completion -> dict(text, finish_reason, tokens, error); with top_logprobs=k > 0 also
        top_logprobs: the k most likely first tokens as {token: logprob} (None when the server gives none)."""
        body = {"model": self.model, "messages": messages, "temperature": temperature, "top_p": top_p,
                "max_tokens": max_tokens}
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        payload = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        error = "no attempt made"
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(min(60.0, self.backoff * 2 ** (attempt - 1)))
            try:
                req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    raise PermissionError(f"{self.url}: HTTP {e.code}: the endpoint refuses " + (
                        f"the key in ${self.key_env}" if self.key_env else "requests without a key (add |key_env=VAR)")
                    ) from None
                error = f"HTTP {e.code} {e.reason}"
                if e.code < 500 and e.code not in (408, 409, 429):
                    break  # a bad request stays bad
                continue
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets are OSErrors
                error = f"{type(e).__name__}: {e}"
                continue
            try:
                body = json.loads(raw)
                choice = body["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError
                check_utf8(text, "content")  # a reply that could not be written out is no reply
            except (ValueError, KeyError, IndexError, TypeError):
                error = f"reply is not a chat completion of valid text: {raw[:200]!r}"
                continue
            tokens = (body.get("usage") or {}).get("completion_tokens") or 0
            out = dict(text=text, finish_reason=choice.get("finish_reason"), tokens=int(tokens), error=None)
            if top_logprobs:
                out["top_logprobs"] = first_token_logprobs(choice)
            return out
        return failure(f"{error} (after {attempt + 1} attempts)")

    def generate(self, chats, max_new_tokens, temperature, top_p, generator=None, top_logprobs=0):
        # As LocalModel.generate: concurrent requests, results in input order. The server draws its own samples.
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda m: self.chat(m, temperature, top_p, max_new_tokens, top_logprobs), chats))


def first_token_logprobs(choice):
    """{token: logprob} of the first generated token's alternatives in a chat-completion choice (OpenAI's
    `logprobs.content[0].top_logprobs`), or None when the server sent none or sent them malformed."""
    try:
        tops = choice["logprobs"]["content"][0]["top_logprobs"]
        return {t["token"]: float(t["logprob"]) for t in tops}
    except (KeyError, IndexError, TypeError, ValueError):
        return None


DTYPES = ("auto", "float32", "bfloat16", "float16")  # of local generation models; auto: bf16 on CUDA, fp32 on CPU


def check_dtype(cfg):
    if cfg.dtype not in DTYPES:
        raise ValueError(f"config dtype: {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")


def local_dtype(cfg, d):
    if cfg.dtype == "auto":
        return torch.float32 if d.device.type == "cpu" else torch.bfloat16
    return getattr(torch, cfg.dtype)


def load_client(spec, cfg, d, loaded):
    """A parse_spec dict -> LocalModel, Endpoint or function. A local checkpoint is loaded once per rank, even
    when it plays several parts. cfg provides dtype and the endpoint settings (request_timeout, ...)."""
    if spec["kind"] == "endpoint":
        return Endpoint(spec["target"], spec["model"], spec.get("key_env"), cfg)
    if spec["kind"] == "function":
        module, name = spec["target"].split(":")
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except ImportError as e:
            raise ValueError(f"config {spec['field']}: cannot import {module} ({e})") from None
        if not callable(fn):
            raise ValueError(f"config {spec['field']}: {module} has no function {name}")
        return fn
    if spec["target"] not in loaded:
        loaded[spec["target"]] = LocalModel(spec["target"], d.device, local_dtype(cfg, d))
    return loaded[spec["target"]]


def read_part(path, own):
    """Records of one part file. A torn last line (no newline: the writer was killed mid-line) is cut off when
    the file is this rank's own, and ignored otherwise; a bad complete line is damage, named."""
    with open(path, "rb") as f:
        data = f.read()
    *lines, tail = data.split(b"\n")
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e}); the part file is damaged") from None
    if tail and own:
        os.truncate(path, len(data) - len(tail))
        print(f"{path}: cut off a torn last line of {len(tail)} bytes (an interrupted write)", flush=True)
    return records


def read_parts(parts_dir, items, key, rank=None):
    """{index: record} over every rank's part file (a run may be resumed with another number of ranks). Each
    record must carry the `key` of the input item at its index, or the input changed under the run."""
    done = {}
    for path in sorted(glob.glob(os.path.join(parts_dir, "rank*.jsonl"))):
        for n, rec in enumerate(read_part(path, own=path.endswith(f"rank{rank}.jsonl")), 1):
            i = rec.get("index") if isinstance(rec, dict) else None
            if not isinstance(i, int) or key not in rec:
                raise ValueError(f"{path}:{n}: expected a record with 'index' and '{key}'; the part file is damaged")
            if i >= len(items) or items[i][key] != rec[key]:
                raise ValueError(f"{path}:{n}: item {i} ({rec[key]}) is not the input's item {i}: the input "
                                 "changed since the run began; use --resume=false to start over")
            done.setdefault(i, rec)
    return done


def check_resumable(cfg, resume_free, fixed=None):
    """Refuse to continue a run directory made with other results-deciding settings (all config fields but
    resume_free, plus `fixed`: what the run resolved, e.g. the device type behind device=auto). A field the saved
    config lacks (added to the code since) counts as its default."""
    path = os.path.join(cfg.out_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    now = {**dataclasses.asdict(cfg), **(fixed or {})}
    diff = [f"{k}: {saved.get(k, defaults.get(k))!r} -> {v!r}" for k, v in now.items()
            if k not in resume_free and saved.get(k, defaults.get(k)) != v]
    if diff:
        raise ValueError(f"{path}: this run directory was made with other settings ({'; '.join(diff)}); resuming "
                         "would mix results. Use another out_dir, or --resume=false to start over")


def run_in_parts(cfg, d, items, key, resume_free, start_worker, unit, fixed=None):
    """
    The distributed, resumable loop. items: dicts with 'index' and `key`, in input order; batches are fixed
    slices of cfg.batch_size of them and rank r takes batches r, r + world, ... . start_worker() is called only
    if this rank has work and returns work(batch, j) -> (records, tokens, generation seconds): one record
    (a dict) per item of batch j. Every finished item is appended to out_dir/parts/rank{r}.jsonl and fsynced,
    so a killed run loses at most the batch in flight: a restart skips finished items, recomputes a half-
    written batch whole and appends only its missing items. Records must depend only on (batch, j), never on
    a global random stream, so neither the number of ranks nor a restart changes them. Returns the totals over
    all ranks: dict(items, tokens, generation_s). `fixed` (see check_resumable) is saved in config.json too.
    """
    from tqdm import tqdm
    # Ranks wait here for the slowest one; the default collective timeout is shorter than a generation run.
    waits = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    parts_dir = os.path.join(cfg.out_dir, "parts")
    if cfg.resume:
        check_resumable(cfg, resume_free, fixed)
    dist.barrier(group=waits)  # everyone has checked before rank 0 writes config.json
    if d.main:
        os.makedirs(parts_dir, exist_ok=True)
        if not cfg.resume:  # start over: the old parts and metrics go (outputs are replaced at the end)
            for path in glob.glob(os.path.join(parts_dir, "rank*.jsonl")) + [os.path.join(cfg.out_dir, "metrics.jsonl")]:
                if os.path.exists(path):
                    os.remove(path)
        print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        write_json(os.path.join(cfg.out_dir, "config.json"), {**dataclasses.asdict(cfg), **(fixed or {})})
    dist.barrier(group=waits)
    done = read_parts(parts_dir, items, key, d.rank)

    def batch(j):
        return items[j * cfg.batch_size:(j + 1) * cfg.batch_size]

    mine = range(d.rank, -(-len(items) // cfg.batch_size), d.world)
    todo = [j for j in mine if any(x["index"] not in done for x in batch(j))]
    remaining = sum(x["index"] not in done for j in todo for x in batch(j))
    if d.main:
        print(f"{len(items)} {unit}s, {len(done)} already done; {d.world} ranks")
    work = start_worker() if todo else None
    my_total = sum(len(batch(j)) for j in mine)
    bar = tqdm(total=my_total, initial=my_total - remaining, desc=f"{unit}s (rank 0 of {d.world})",
               dynamic_ncols=True, disable=not d.main or quiet_bars())
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if d.main else None
    tokens, gen_s, written, t0 = 0, 0.0, 0, time.time()
    with open(os.path.join(parts_dir, f"rank{d.rank}.jsonl"), "a", encoding="utf-8") as part:
        for j in todo:
            records, n_tok, n_s = work(batch(j), j)
            tokens, gen_s = tokens + n_tok, gen_s + n_s
            for x, rec in zip(batch(j), records, strict=True):
                if x["index"] in done:
                    continue  # a half-written batch was recomputed whole: append only what was missing
                part.write(json.dumps({"index": x["index"], **rec}, ensure_ascii=False) + "\n")
                part.flush()
                os.fsync(part.fileno())  # one item, once written, survives a kill
                written += 1
                bar.update(1)
            rates = {f"{unit}s_per_s": written / (time.time() - t0), "tokens_per_s": tokens / max(gen_s, 1e-9)}
            bar.set_postfix({k: f"{v:.3g}" for k, v in rates.items()}, refresh=False)
            if metrics:
                metrics.write(json.dumps({"batch": j, "time": round(time.time(), 3), f"{unit}s_written": written,
                                          "tokens": tokens, **{k: round(v, 3) for k, v in rates.items()}}) + "\n")
                metrics.flush()
    bar.close()
    if metrics:
        metrics.close()
    totals = torch.tensor([written, tokens, gen_s], dtype=torch.float64)
    dist.all_reduce(totals, group=waits)  # also the wait for every rank to finish its part file
    return dict(items=int(totals[0]), tokens=int(totals[1]), generation_s=float(totals[2]))


def local_device(specs, d):
    # What check_resumable must also compare when a local model generates: the device type behind device=auto
    # decides its dtype and its sampler's random stream.
    return {"local_device": d.device.type} if any(s["kind"] == "local" for s in specs) else None


def read_finished(cfg, items, key):
    """Rank 0, after run_in_parts: every item's record, in input order, without its index."""
    done = read_parts(os.path.join(cfg.out_dir, "parts"), items, key)
    missing = [i for i in range(len(items)) if i not in done]
    if missing:
        raise RuntimeError(f"{cfg.out_dir}/parts: {len(missing)} items have no record (e.g. {missing[:3]})")
    return [{k: v for k, v in done[i].items() if k != "index"} for i in range(len(items))]


def run_stats(totals, wall, unit):
    # Throughput of this process's run (a resumed run counts only what it did): all ranks together over the
    # wall time, and generation alone per rank.
    return {f"{unit}s_this_run": totals["items"], "tokens_this_run": totals["tokens"], "wall_s": round(wall, 2),
            f"{unit}s_per_s": round(totals["items"] / wall, 3), "tokens_per_s": round(totals["tokens"] / wall, 1),
            "generation_tokens_per_s_per_rank": round(totals["tokens"] / max(totals["generation_s"], 1e-9), 1)}
