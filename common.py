"""What the stage scripts share: config parsing, torchrun setup, FSDP2 sharding and sharded loading, resume
from DCP checkpoints (written by checkpoints.py), Hugging Face export, LR schedules, JSONL + tqdm logging, and
the pieces of the training loop that sft.py and dpo.py run alike. The generation clients and their resumable
loop are in generation.py; atomic writes and row reading in files.py.

Each piece is a plain function; the stage scripts call them in order, like a recipe.
"""

import atexit
import bisect
import dataclasses
import difflib
import gc
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
import types
import typing

import torch
import torch.distributed as dist
import torch.utils.checkpoint

# FSDP2 and DTensor (0.5 s of imports) are imported in the functions that shard: the generation stages (eval,
# feedback, generate, chat) import this module and never shard.
import lora
from checkpoints import list_checkpoints, load_train_checkpoint, save_train_checkpoint
from files import atomic_open, write_json
from model import Mistral, MistralConfig, config_from_preset
from weights import CheckpointReader, local_rows, save_checkpoint

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



# -----------------------------------------------------------------------------
# torchrun


@dataclasses.dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    rehearse: bool = False  # --rehearse_gpu: what CUDA runs, on the CPU (check_rehearsal)

    @property
    def main(self):
        return self.rank == 0

    @property
    def gpu_path(self):
        # The choices CUDA makes: bf16 mixed precision, LoRA's bf16 base, the Triton kernels in the model.
        return self.device.type == "cuda" or self.rehearse


def check_rehearsal(device):
    """--rehearse_gpu=true: run what CUDA would run, on the CPU: the model's attention and log-prob heads through
    the Triton kernels (in Triton's interpreter), FSDP2 with bf16 compute and fp32 gradient reductions, LoRA's
    bf16 base, bf16 local models; gloo between ranks. Slow (the interpreter), for small shapes: it finds what
    breaks on the GPU path before a GPU is rented. Needs TRITON_INTERPRET=1 from the start of the process
    (Triton decides interpreter or compiler when the kernels are defined)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("config: rehearse_gpu=true runs the Triton kernels in Triton's interpreter, which needs "
                         "TRITON_INTERPRET=1 in the environment before Python starts, e.g. `TRITON_INTERPRET=1 "
                         "torchrun --nproc_per_node=2 sft.py ... --rehearse_gpu=true`")
    if device not in ("auto", "cpu"):
        raise ValueError(f"config: rehearse_gpu=true runs on the CPU; device={device!r} (use auto or cpu)")
    attention = sys.modules.get("kernels.attention")
    if attention is not None and not attention._INTERPRETED:
        raise RuntimeError("rehearse_gpu=true: kernels.attention was imported before TRITON_INTERPRET=1 was set")
    return "cpu"


def setup_dist(device="auto", rehearse_gpu=False):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU). Plain `python stage.py`: a
    one-rank group on an in-memory store, so the rest of the code never special-cases it. rehearse_gpu: see
    check_rehearsal."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if rehearse_gpu:
        device = check_rehearsal(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # Two ranks on two cores: one thread each, or they fight over the cores. An OMP_NUM_THREADS that is set
        # (torch read it on import; torchrun sets 1 for several ranks; run.sh sets cores / ranks) is kept.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, world, local_rank, dev, rehearse_gpu)


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


FSDP_UNITS = ("layer", "model")


def reshard(model):
    """Free every FSDP unit's unsharded parameters and register the shards again (FSDP2's reshard)."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def build_model(init_from, d, model_preset="tiny", seed=0, mixed_precision=True, activation_checkpointing=False,
                compile=False, reshard_after_forward=True, adapters=None, fsdp_unit="layer"):
    """init_from: a Hugging Face directory, or "scratch" (random init of `model_preset`).
    Returns the FSDP2-sharded model and its MistralConfig. Parameters are fp32 masters; on CUDA with
    mixed_precision, compute runs in bf16 with fp32 gradient reductions. adapters: lora.Settings (or None):
    LoRA adapters beside the frozen base weights, which are then stored in bf16 on CUDA with mixed_precision.
    With d.rehearse, the CPU makes CUDA's choices (check_rehearsal). fsdp_unit: "layer" shards each decoder layer
    as its own FSDP unit, then the root (torchtitan's way: one layer unsharded at a time); "model" makes the whole
    model one unit: one all-gather and one reduce-scatter per micro-step instead of one per layer, the whole model
    unsharded at once, from forward to the end of backward. For small models, where the collectives' latency
    outweighs their bytes (the tiny CPU run: a base step ~18% faster on 2 gloo ranks), the same numbers either way."""
    if fsdp_unit not in FSDP_UNITS:
        raise ValueError(f"config: fsdp_unit={fsdp_unit!r}; choose {' or '.join(FSDP_UNITS)}")
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
        if mixed_precision and d.gpu_path:
            lora.freeze_base_dtype(model, torch.bfloat16)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = None
    if mixed_precision and d.gpu_path:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model.kernels_on_cpu = d.rehearse
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
        if fsdp_unit == "layer":
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    # One unit stays unsharded from its forward to its backward: no second all-gather (the plan counts it so).
    root_reshards = reshard_after_forward and fsdp_unit == "layer"
    fully_shard(model, reshard_after_forward=root_reshards, **kw)
    if not root_reshards:
        # A unit left unsharded after forward waits for its backward to reshard; a forward under no_grad
        # (evaluation, the DPO reference's log-probs, generation) has none, and the unsharded parameters would
        # stay registered on the module: the optimizer, made next, would hold them instead of the shards.
        model.register_forward_hook(lambda m, args, out: None if torch.is_grad_enabled() else reshard(m))
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


@torch.no_grad()
def load_sharded(model, reader):
    # Each rank reads only its rows of each tensor from the (memory-mapped) safetensors files:
    # no rank ever holds the full weights.
    from torch.distributed.tensor import DTensor
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
    from torch.distributed.tensor import DTensor
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
# Logging: a tqdm bar on rank 0 and one JSON line per step in out_dir/metrics.jsonl


def keep_until(path, step):
    # A resumed run redoes the steps after its checkpoint: drop their lines (a fresh run, step 0, drops all).
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_open(path, "w") as f:
        f.writelines(lines)


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


def log_peak_memory(metrics, d, first):
    """CUDA: the peak of allocated memory into a step's metrics. The first step of a process (`first`), where the
    Triton kernels autotune (memplan's first_step_peak), as `first_step_peak_mem_gb`; the counter is then reset, so
    later steps log `peak_mem_gb`, the steady-state peak so far (memplan's peak)."""
    if d.device.type != "cuda":
        return
    metrics["first_step_peak_mem_gb" if first else "peak_mem_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
    if first:
        torch.cuda.reset_peak_memory_stats(d.device)


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
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    old = sorted(os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    hf_dir = os.path.join(cfg.out_dir, "hf")  # the final export, and sft.py's intermediate ones (export_every)
    exports = ([hf_dir] if os.path.exists(hf_dir) else []) + sorted(glob.glob(os.path.join(cfg.out_dir, "hf_step_*")))
    old += exports
    if not old:
        return
    if not cfg.overwrite:
        shown = ", ".join(old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
        raise FileExistsError(f"out_dir={cfg.out_dir} holds an earlier run ({shown}); continue it with "
                              "--resume=true, delete them and start over with --overwrite=true, or choose "
                              "another --out_dir")
    dist.barrier()  # every rank has looked before rank 0 deletes
    if d.main:
        for path in [ckpt_dir, *exports]:
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
    from torch.distributed.tensor import DTensor
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
        # Beside the merged model, the adapter in PEFT's format, whose base is init_from; a run from "scratch" has
        # no base on disk, so its frozen random base is exported too (out_dir/base).
        base = cfg.init_from
        if base == "scratch":
            base = os.path.join(cfg.out_dir, "base")
            export_hf(model, mcfg, base, d, tokenizer, getattr(torch, cfg.export_dtype), merge=False)
        if d.main:
            lora.save_adapter(os.path.join(cfg.out_dir, "adapter"), adapter, lora.settings(cfg), base)
            print(f"exported {cfg.out_dir}/adapter (PEFT LoRA adapter of {base})")
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
    # The FSDP model's reference cycles (hooks <-> modules) keep its DeviceMesh, and with it a gloo process group
    # and its worker threads, alive until the interpreter's last garbage collection. Destroyed there, a worker
    # thread that needs the GIL on its way out is killed by the finalizing interpreter, which aborts the process
    # (pt_gloo_runloop, "terminate called without an active exception": about 1 exit in 10 on 2 CPU ranks, seen
    # in gdb). A collection at exit, while the interpreter still runs every thread, destroys them first.
    atexit.register(gc.collect)


def broadcast_object(obj, d):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def best_fit(sizes, capacity, order):
    """Items -> rows of at most `capacity`, each a list of item indices: the items in `order` (longest first makes
    it best-fit decreasing), each into the open row whose free space it fills best, or a new row. sizes: (n,)
    ints <= capacity. sft.py packs examples with it, dpo.py the pairs of a step."""
    rows = []
    # Open rows by free space: free[r] = indices of rows with exactly r tokens free; `sizes` = the r with any
    # row, kept sorted, so the best fit for an item of k tokens is the first r >= k (a bisect).
    free, spaces = {}, []
    for i in [int(i) for i in order]:
        k = int(sizes[i])
        j = bisect.bisect_left(spaces, k)
        if j < len(spaces):
            r = spaces[j]
            row = free[r].pop()
            if not free[r]:
                del free[r], spaces[j]
        else:
            r, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        r -= k
        if r > 0:  # a full row takes no more items
            if r not in free:
                free[r] = []
                bisect.insort(spaces, r)
            free[r].append(row)
    return rows


def rank_batches(n, batch_size, d):
    """Split items 0..n-1 into this rank's batches for evaluation-style loops. Every rank gets the same
    number of batches, because each forward pass of an FSDP model is a collective: a rank that runs out
    of items gets `(the first batch again, False)` and must discard the result. Yields (indices, real)."""
    per_round = batch_size * d.world
    for start in range(0, n, per_round):
        lo = start + d.rank * batch_size
        idx = list(range(lo, min(lo + batch_size, n)))
        yield (idx, True) if idx else (list(range(min(batch_size, n))), False)
