"""LoRA: low-rank adapters beside frozen base weights, for dSFT and dDPO on one GPU.

A targeted projection y = x W^T becomes y = x W^T + (alpha / r) * dropout(x) A^T B^T with A (r, in) and B (out, r)
trainable and W frozen. B starts at zero, so training starts from the base model exactly. The parameter names are
PEFT's: `model.layers.0.self_attn.q_proj.weight` stays the base weight's HF name (checkpoints load and export as
before) and the adapter adds `...q_proj.lora_A.weight` and `...q_proj.lora_B.weight`, which PEFT's
adapter_model.safetensors stores under `base_model.model.` + that name. So the export maps 1:1.

With the adapters switched off (`disabled(model)`), the model is the base model: dpo.py's reference costs no
second model and no cache.

    model = Mistral(cfg); lora.apply(model, lora.settings(train_cfg))   # before FSDP sharding (common.build_model)
"""

import contextlib
import dataclasses
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import local_rows

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PEFT's name for a causal LM wrapped by PeftModelForCausalLM


@dataclasses.dataclass
class Settings:
    rank: int
    alpha: float
    dropout: float
    targets: tuple
    init_from: str = ""  # a PEFT adapter directory to start from; "" = fresh adapters (B = 0)

    @property
    def scaling(self):
        return self.alpha / self.rank


def settings(cfg):
    """A stage's Config (fields lora_rank, lora_alpha, lora_dropout, lora_targets, lora_from) -> Settings, or None
    when LoRA is off (lora_rank == 0). Bad values are errors that name the field."""
    if cfg.lora_rank == 0:
        if cfg.lora_from:
            raise ValueError(f"config: lora_from={cfg.lora_from!r} needs lora_rank > 0 (the adapter's r)")
        return None
    if cfg.lora_rank < 0:
        raise ValueError(f"config: lora_rank={cfg.lora_rank}; 0 (off) or a positive rank")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"config: lora_dropout={cfg.lora_dropout}; a probability in [0, 1)")
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad or not targets:
        raise ValueError(f"config: lora_targets={cfg.lora_targets!r}: {bad or 'empty'}; choose from "
                         f"{','.join(ALL_TARGETS)}")
    s = Settings(cfg.lora_rank, float(cfg.lora_alpha), float(cfg.lora_dropout), targets, cfg.lora_from)
    if s.init_from:
        check_peft_config(s)
    return s


class LoRALinear(nn.Module):
    """nn.Linear(bias=False) with a low-rank adapter. `weight` is the frozen base weight, under the name the
    nn.Linear it replaces had."""

    def __init__(self, linear, s):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        self.lora_A = nn.Linear(in_features, s.rank, bias=False, device=linear.weight.device)   # (r, in)
        self.lora_B = nn.Linear(s.rank, out_features, bias=False, device=linear.weight.device)  # (out, r)
        self.scaling, self.dropout, self.disabled = s.scaling, s.dropout, False

    def forward(self, x):
        y = F.linear(x, self.weight)                                                  # (..., out)
        if self.disabled:
            return y
        return y + self.lora_B(self.lora_A(F.dropout(x, self.dropout, self.training))) * self.scaling


def apply(model, s):
    """Freeze every parameter of the model and put an adapter beside each targeted projection. Call it before
    FSDP sharding, on a real or a meta-device model; the adapters are filled by init_adapters after loading."""
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in s.targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), s))
    return model


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def is_adapter(name):
    return ".lora_A." in name or ".lora_B." in name


def count(model):
    # (trainable adapter parameters, all parameters), counting full (unsharded) sizes.
    trainable = sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    return trainable, sum(p.numel() for p in model.parameters())


def freeze_base_dtype(model, dtype):
    # The frozen weights in `dtype` (bf16 on CUDA: half the memory of fp32 masters, and what mixed-precision
    # compute would cast them to anyway); adapters stay fp32 for the optimizer.
    for n, p in model.named_parameters():
        if not is_adapter(n):
            p.data = p.data.to(dtype)


@contextlib.contextmanager
def disabled(model):
    """The base model: every adapter off (the DPO reference)."""
    mods = lora_modules(model)
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m in mods:
            m.disabled = False


@torch.no_grad()
def init_adapters(model, s, seed):
    """Fill the adapters, sharded or not: from s.init_from (a PEFT adapter), or fresh as PEFT makes them
    (A ~ kaiming-uniform(a=sqrt(5)), the nn.Linear default, B = 0). A fresh A is drawn whole from a generator
    seeded by (seed, name), then each rank keeps its rows: any number of ranks starts from the same adapters."""
    from torch.distributed.tensor import DTensor
    loaded = load_adapter_tensors(s.init_from) if s.init_from else None
    for name, p in model.named_parameters():
        if not is_adapter(name):
            continue
        if loaded is not None:
            full = loaded.pop(name, None)
            if full is None or tuple(full.shape) != tuple(p.shape):
                raise ValueError(f"{s.init_from}/adapter_model.safetensors: {PEFT_PREFIX}{name} is "
                                 f"{'missing' if full is None else tuple(full.shape)}; expected {tuple(p.shape)}")
        elif name.endswith("lora_B.weight"):
            full = torch.zeros(p.shape)
        else:
            g = torch.Generator().manual_seed(int.from_bytes(f"{seed}/{name}".encode(), "little") % 2**63)
            bound = 1 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
            full = torch.empty(p.shape).uniform_(-bound, bound, generator=g)
        local = p.to_local() if isinstance(p, DTensor) else p
        if isinstance(p, DTensor):
            start, stop = local_rows(p)
            full = full[start:stop]
        local.copy_(full.to(local.dtype))
    if loaded:
        raise ValueError(f"{s.init_from}/adapter_model.safetensors: tensors this model has no place for "
                         f"({', '.join(sorted(loaded)[:3])}...): other targets or another architecture?")


# -----------------------------------------------------------------------------
# Checkpoints and export


def checkpoint_options(model):
    """StateDictOptions for DCP checkpoints of a model with frozen parameters: only what trains (the adapters)
    and its optimizer state are saved and loaded; the frozen base comes from init_from on resume. None for a
    model without frozen parameters (full fine-tuning: everything)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    if all(p.requires_grad for p in model.parameters()):
        return None
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def merged(model, named_tensors, adapter, merge=True):
    """Stream (name, full tensor) of a LoRA model's state dict -> (name, tensor) of the plain model: each
    targeted weight W becomes W + (alpha / r) * B @ A (in fp32; with merge=False it stays the base weight), and
    the adapter tensors are left out of the stream and collected into the dict `adapter` under PEFT's names
    (for save_adapter). State dict order is weight, lora_A, lora_B: a weight is held only until its adapter
    arrives, so the stream never holds more than one weight."""
    scaling = {n + ".weight": m.scaling for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    held = None
    for name, t in named_tensors:
        if name in scaling:
            held = (name, t)
        elif is_adapter(name):
            adapter[PEFT_PREFIX + name] = t.detach().float().cpu().contiguous()
            if name.endswith("lora_B.weight"):
                base, w = held
                a = adapter[PEFT_PREFIX + base[:-len("weight")] + "lora_A.weight"]  # (r, in)
                b = adapter[PEFT_PREFIX + name]                                      # (out, r)
                yield base, w.float() + scaling[base] * (b @ a).to(w.device) if merge else w  # fp32; export casts
                held = None
        else:
            yield name, t


def save_adapter(path, adapter, s, base_model):
    """adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained writes them (PEFT and vLLM
    load the directory). Atomic: written into path.tmp, then renamed."""
    import shutil

    from safetensors.torch import save_file

    from files import write_json
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(dict(sorted(adapter.items())), os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(tmp, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.path.abspath(base_model),
        "r": s.rank, "lora_alpha": s.alpha, "lora_dropout": s.dropout, "target_modules": sorted(s.targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "rank_pattern": {},
        "alpha_pattern": {}})
    if os.path.exists(path):
        shutil.rmtree(path)
    os.rename(tmp, path)


def read_peft_config(path):
    fn = os.path.join(path, "adapter_config.json")
    try:
        with open(fn) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config lora_from: {fn} not found (a PEFT adapter directory?)") from None


def check_peft_config(s):
    """An adapter we can continue from must be plain LoRA with the rank, alpha and targets of this run."""
    c = read_peft_config(s.init_from)
    where = os.path.join(s.init_from, "adapter_config.json")
    unsupported = {k: c.get(k) for k in ("use_dora", "use_rslora", "modules_to_save", "rank_pattern",
                                         "alpha_pattern", "layers_to_transform") if c.get(k)}
    if c.get("peft_type", "LORA") != "LORA" or c.get("bias", "none") != "none" or c.get("fan_in_fan_out"):
        unsupported.update(peft_type=c.get("peft_type"), bias=c.get("bias"), fan_in_fan_out=c.get("fan_in_fan_out"))
    if unsupported:
        raise ValueError(f"{where}: {unsupported}: only plain LoRA adapters (no bias, DoRA, rsLoRA, patterns) load")
    targets = c.get("target_modules")
    targets = sorted(targets) if isinstance(targets, list) else targets
    for field, theirs, ours in (("lora_rank", c.get("r"), s.rank), ("lora_alpha", c.get("lora_alpha"), s.alpha),
                                ("lora_targets", targets, sorted(s.targets))):
        if theirs != ours:
            raise ValueError(f"{where}: {field[5:] if field != 'lora_rank' else 'r'} is {theirs!r}; this run has "
                             f"{field}={ours!r}: set --{field} to the adapter's")


def load_adapter_tensors(path):
    """{our parameter name: fp32 tensor} from a PEFT adapter_model.safetensors."""
    from safetensors.torch import load_file
    fn = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(fn):
        raise FileNotFoundError(f"config lora_from: {fn} not found")
    out = {}
    for k, t in load_file(fn).items():
        if not k.startswith(PEFT_PREFIX):
            raise ValueError(f"{fn}: tensor {k!r} does not start with {PEFT_PREFIX!r} (not a causal-LM adapter)")
        name = k[len(PEFT_PREFIX):].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        out[name] = t.float()
    return out


def describe(model, s):
    # The start-up line about the adapters (none without LoRA).
    if s is None:
        return []
    trainable, total = count(model)
    return [f"LoRA: rank {s.rank}, alpha {s.alpha:g} on {','.join(s.targets)}: {trainable / 1e6:.3f}M trainable of "
            f"{total / 1e6:.1f}M parameters ({100 * trainable / total:.2f}%)" +
            (f", from {s.init_from}" if s.init_from else "")]
