"""Mistral (and Llama) in one file: config, model, KV-cache generation, from_pretrained / save_pretrained
(the safetensors files themselves are read and written by weights.py).

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so HF
checkpoints load with strict=True and what we save loads in transformers and vLLM unchanged.
The model is a plain nn.Module: sharding, mixed precision and checkpointing live in the stage code.
"""

import functools
import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import CheckpointReader, save_checkpoint

# -----------------------------------------------------------------------------
# Config


@dataclass
class MistralConfig:
    # Field names are those of Hugging Face's config.json, so the file maps 1:1 onto this class.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None          # None -> hidden_size // num_attention_heads
    sliding_window: int | None = 4096    # None -> full causal attention (Llama)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    initializer_range: float = 0.02
    model_type: str = "mistral"          # "mistral" or "llama": same network, Llama has no window
    dtype: str = "bfloat16"              # the dtype the weights are stored in

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
        if self.model_type not in ("mistral", "llama"):
            raise ValueError(f"model_type {self.model_type!r} is not implemented (mistral, llama)")

    def num_params(self):
        D, I, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        attn = D * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + 3 * D * I + 2 * D
        return L * per_layer + D + V * D * (1 if self.tie_word_embeddings else 2)

    # --- Hugging Face config.json <-> MistralConfig -------------------------------------------
    # Keys that carry nothing we implement differently: accepted and dropped.
    _HF_IGNORED = {"architectures", "transformers_version", "use_cache", "pad_token_id", "_name_or_path",
                   "output_attentions", "output_hidden_states", "return_dict", "max_window_layers",
                   "is_decoder", "bad_words_ids", "auto_map", "quantization_config_", "layer_types_"}
    # Keys that must hold exactly these values; anything else is a model we do not implement.
    _HF_REQUIRED = {"hidden_act": ("silu",), "attention_dropout": (0, 0.0), "attention_bias": (False,),
                    "mlp_bias": (False,), "pretraining_tp": (1,), "rope_scaling": (None,),
                    "use_sliding_window": (True,)}

    @classmethod
    def from_hf_dict(cls, d, source="config"):
        d = dict(d)
        model_type = d.get("model_type", "mistral")
        if model_type not in ("mistral", "llama"):
            raise ValueError(f"{source}: model_type {model_type!r} is not implemented (mistral or llama)")
        kw = {"model_type": model_type}
        if model_type == "llama":
            kw["sliding_window"] = None  # Llama has no window; a "sliding_window" key there would be odd
        for key in ("torch_dtype", "dtype"):  # v4 says torch_dtype, v5 says dtype
            if d.get(key) is not None:
                kw["dtype"] = str(d.pop(key)).replace("torch.", "")
            d.pop(key, None)
        rope = d.pop("rope_parameters", None)  # transformers v5: {"rope_type": ..., "rope_theta": ...}
        if rope is not None:
            if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
                raise ValueError(f"{source}: rope_parameters {rope} are not implemented (only default RoPE)")
            kw["rope_theta"] = float(rope["rope_theta"])
        names = {f.name for f in fields(cls)}
        for key, value in d.items():
            if key in names and key != "model_type":
                if key == "eos_token_id" and isinstance(value, list):
                    value = value[0]
                if value is None and key in ("bos_token_id", "eos_token_id"):
                    continue
                kw[key] = value
            elif key in cls._HF_REQUIRED:
                if value not in cls._HF_REQUIRED[key]:
                    raise ValueError(f"{source}: field {key}={value!r} is not implemented "
                                     f"(supported: {cls._HF_REQUIRED[key]})")
            elif key not in cls._HF_IGNORED and key != "model_type":
                raise ValueError(f"{source}: unknown config field {key!r}; refusing to ignore it silently")
        if model_type == "llama":
            kw["sliding_window"] = None
        return cls(**kw)

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self):
        d = asdict(self)
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        d.update(architectures=[arch], hidden_act="silu", attention_dropout=0.0, use_cache=True,
                 torch_dtype=self.dtype,  # v4 readers (vLLM, older transformers)
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})  # v5 readers
        if self.model_type == "llama":
            d.pop("sliding_window")
            d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        return d


PRESETS = {
    "mistral-7b": dict(),  # the dataclass defaults are Mistral-7B-v0.1 (REFERENCE.md)
    # ~1B parameters, Mistral-shaped, for single-GPU throughput runs.
    "mistral-1b": dict(hidden_size=2048, intermediate_size=7168, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=4),
    # The CPU demo: small enough to train from scratch in minutes on 2 cores.
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, sliding_window=256,
                 max_position_embeddings=1024, tie_word_embeddings=False, dtype="float32"),
}


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return MistralConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in fp32, cast back, then scale: the order HF uses, which matters for bf16 parity.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    # position_ids (B, T) -> cos, sin (B, 1, T, head_dim), HF "rotate_half" layout (halves, not pairs).
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.int64).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2), fp32 like HF
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@functools.cache
def _flash_attention():
    # The Triton kernel, when it exists and applies (CUDA, no KV cache). Imported lazily so model.py
    # works on machines where kernels/ cannot be compiled. Hidden from torch.compile (compile=true): a
    # decoder layer is compiled around it, with a graph break, and the kernels run as they do in eager mode;
    # dynamo cannot trace the Triton interpreter (--rehearse_gpu) and need not trace the autotuner's launch.
    try:
        from kernels.attention import flash_attention
        return torch.compiler.disable(flash_attention)
    except ImportError:
        return None


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, n_heads, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # decode: the whole rolling cache (B, n_kv, S, hd)
        gqa = self.n_heads != self.n_kv_heads
        if mask.kind == "flash":
            y = mask.flash(q, k, v, causal=True, sliding_window=self.sliding_window, segment_ids=mask.segment_ids,
                           branch_ids=mask.branch_ids)
        elif mask.blocks is not None and not torch.compiler.is_compiling():
            # (B, n_heads, q1 - q0, hd) per block, along T. Not under torch.compile: the blocks' bounds change with
            # the data, and each new set would be a new graph (or symbolic slices inductor miscompiles).
            y = torch.cat([F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1],
                                                          attn_mask=mask.dense[..., q0:q1, k0:q1], enable_gqa=gqa)
                           for q0, q1, k0 in mask.blocks], dim=2)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=mask.kind == "causal",
                                               enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MistralModel(nn.Module):
    # The `model.` prefix of HF names: embeddings, layers, final norm.
    def __init__(self, cfg):
        super().__init__()
        # nn.Embedding's own init on the meta device runs normal_'s Python decomposition, whose first call imports
        # torch._dynamo (0.5-0.9 s in a process that only generates) for values that are overwritten: the weight
        # is made here, and off the meta device drawn as nn.Embedding draws it.
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)  # (vocab, hidden), on the ambient device
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# -----------------------------------------------------------------------------
# Masks. One definition of who sees whom, shared by training, prefill and decoding:
# query at index i sees key at index j iff j <= i, i - j < sliding_window (HF's convention: itself
# and at most W-1 earlier tokens), the key is a real token (not padding), and both are in the same
# packed segment. Indices count slots in the row, padding included; padding only ever sits at the
# ends of a row, so index distances equal position distances between real tokens.


class Mask:
    def __init__(self, kind, dense=None, segment_ids=None, flash=None, branch_ids=None, blocks=None):
        self.kind, self.dense, self.segment_ids, self.flash = kind, dense, segment_ids, flash
        self.branch_ids = branch_ids  # prompt-shared segments (packed DPO pairs): kernels/masks.py
        self.blocks = blocks  # dense only: [(q0, q1, k0)] from query_blocks, or None for one SDPA call


# The dense path (CPU) runs SDPA on blocks of ATTN_BLOCK queries, each against only the keys it may see at all:
# none after the block (causal), none older than the window, none before the earliest start of a segment
# holding one of its queries. SDPA cannot skip masked tiles of a dense mask itself, so this is the CPU twin of
# the Triton kernel's tile ranges: on packed rows of 256 tokens it halves the attention's time (fwd + bwd).
ATTN_BLOCK = 64


def query_blocks(T, sliding_window=None, segment_start=None, block=None):
    """[(q0, q1, k0)]: queries q0..q1-1 see no key outside k0..q1-1. segment_start (B, T): the first index of the
    segment holding each position (packed rows); the block's k0 is the smallest over the rows. One host sync."""
    block = block or ATTN_BLOCK
    if T <= block:
        return None
    q0s = list(range(0, T, block))
    firsts = segment_start[:, q0s].amin(0).tolist() if segment_start is not None else [0] * len(q0s)
    out = []
    for q0, first in zip(q0s, firsts):
        k0 = max(0, q0 - sliding_window + 1) if sliding_window is not None else 0
        out.append((q0, min(q0 + block, T), max(k0, first)))
    return out


def dense_mask(q_idx, k_idx, sliding_window=None, k_ok=None, q_seg=None, k_seg=None):
    # q_idx (Tq,), k_idx (Tk,) absolute indices (-1 = empty cache slot); k_ok (B, Tk) real keys;
    # q_seg (B, Tq), k_seg (B, Tk) segment ids. Returns a bool (B or 1, 1, Tq, Tk), True = may attend.
    d = q_idx[:, None] - k_idx[None, :]                        # (Tq, Tk)
    m = (d >= 0) & (k_idx[None, :] >= 0)
    if sliding_window is not None:
        m = m & (d < sliding_window)
    m = m[None]                                                 # (1, Tq, Tk)
    if k_ok is not None:
        # A padding query would see no key at all (NaN softmax): let every query see itself.
        m = m & (k_ok[:, None, :] | (d == 0)[None])
    if q_seg is not None:
        m = m & (q_seg[:, :, None] == k_seg[:, None, :])
    return m[:, None]


def _right_padded(ok):
    # ok (B, T) bool: True iff in every row the real tokens come first and padding only after them.
    return bool((ok[:, 1:] <= ok[:, :-1]).all())


def positions_from_segments(segment_ids):
    # Positions restart at 0 where the segment id changes: (B, T) -> (B, T).
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


# -----------------------------------------------------------------------------
# KV cache: a rolling buffer of min(max_len, sliding_window) slots per layer. Token at absolute index t
# lives in slot t % S; with S = W, the token it overwrites (t - W) is exactly the first one the new
# query may no longer see, so decoding past the window needs no more memory than the window.


class KVCache:
    def __init__(self, cfg, batch_size, max_len, device, dtype):
        self.S = max_len if cfg.sliding_window is None else min(max_len, cfg.sliding_window)
        self.rolling = cfg.sliding_window is not None and self.S == cfg.sliding_window
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, self.S, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_idx = torch.full((self.S,), -1, device=device, dtype=torch.long)  # token index per slot
        self.slot_ok = torch.zeros(batch_size, self.S, device=device, dtype=torch.bool)  # real token?
        self.length = 0          # tokens written so far = absolute index of the next token
        self.prefill = False     # True while the forward pass being run is the prompt

    def advance(self, T, ok):
        # Called once per forward, before the layers: decide slots for the T new tokens.
        if self.length > 0 and T != 1:
            raise NotImplementedError("KVCache: after the prompt, decode one token per forward pass")
        if not self.rolling and self.length + T > self.S:
            raise ValueError(f"KVCache: {self.length + T} tokens do not fit in max_len={self.S}")
        self.prefill = self.length == 0
        new_idx = torch.arange(self.length, self.length + T, device=self.slot_idx.device)
        keep = new_idx[-self.S:]                       # only the last S tokens can ever be seen again
        self.slots = keep % self.S
        self.slot_idx[self.slots] = keep
        self.slot_ok[:, self.slots] = ok[:, -len(keep):]
        self.n_keep = len(keep)
        self.length += T
        return new_idx

    def update(self, layer, k, v):
        # k, v (B, n_kv, T, hd). Prefill attends to the fresh keys (all of them, the window is in the mask);
        # a decode step writes its key first, then attends to the whole cache.
        self.k[layer][:, :, self.slots] = k[:, :, -self.n_keep:]
        self.v[layer][:, :, self.slots] = v[:, :, -self.n_keep:]
        if self.prefill:
            return k, v
        return self.k[layer], self.v[layer]


# -----------------------------------------------------------------------------
# The model


class Mistral(nn.Module):
    kernels_on_cpu = False  # True: CPU tensors take the Triton attention path too (--rehearse_gpu, interpreter)

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = MistralModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed=None):
        # HF's init: normal(0, initializer_range) for linears and embeddings, ones for norms.
        # Works after `to_empty()` of a meta-device model, too.
        g = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                w = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, self.config.initializer_range, generator=g)
                p.copy_(w)

    def _mask(self, x, T, attention_mask, segment_ids, cache, branch_ids=None):
        # Decide, once per forward, how every layer masks attention.
        cfg, B, dev = self.config, x.shape[0], x.device
        if branch_ids is not None:
            # Prompt-shared segments (kernels/masks.py): the Triton kernels' prefix variant on CUDA in 16-bit, two SDPA
            # calls per pair on CPU (both in flash_attention); the dense mask otherwise (fp32 on CUDA, whose kernel
            # configurations are tuned for 16-bit, other head dims, or kernels/ not importable).
            flash = _flash_attention()
            on_kernels = cfg.head_dim in (16, 32, 64, 128) and x.dtype != torch.float32
            if flash is not None and (not x.is_cuda or on_kernels):
                return Mask("flash", segment_ids=segment_ids, flash=flash, branch_ids=branch_ids)
            from kernels.masks import attention_mask as shared_prefix_mask
            return Mask("dense", dense=shared_prefix_mask(T, cfg.sliding_window, segment_ids, branch_ids=branch_ids))
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
        if cache is not None:
            ok = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
            q_idx = cache.advance(T, ok)
            if cache.prefill:
                dense = dense_mask(q_idx, q_idx, cfg.sliding_window, k_ok=ok)
                return Mask("dense", dense=dense, blocks=query_blocks(T, cfg.sliding_window))
            dense = dense_mask(q_idx, cache.slot_idx, cfg.sliding_window, k_ok=cache.slot_ok)
            return Mask("dense", dense=dense)
        # The Triton kernel takes power-of-two head dims up to 128 (Mistral: 128) in bf16 or fp16; other shapes,
        # and fp32 (whose kernel configurations spill: docs/training.md, "fp32 on CUDA"), use SDPA.
        on_kernels = (x.is_cuda or self.kernels_on_cpu) and x.dtype != torch.float32
        flash = _flash_attention() if on_kernels and cfg.head_dim in (16, 32, 64, 128) else None
        if flash is not None:
            seg = segment_ids
            # Padding becomes its own segment (-1): real tokens never see it. Right padding without
            # packing (DPO, unpacked SFT) needs no segments: causality already hides every pad from
            # every real token, and the pad rows' own outputs are never used (their targets are
            # ignored), so those batches take the plain causal kernel. One host sync to check.
            if attention_mask is not None and (seg is not None or not _right_padded(attention_mask)):
                seg = torch.where(attention_mask, seg if seg is not None else 0, -1)
            return Mask("flash", segment_ids=seg, flash=flash)
        if attention_mask is None and segment_ids is None and (cfg.sliding_window is None or T <= cfg.sliding_window):
            return Mask("causal")  # SDPA's own causal path: no mask tensor at all
        idx = torch.arange(T, device=dev)
        dense = dense_mask(idx, idx, cfg.sliding_window, k_ok=attention_mask, q_seg=segment_ids, k_seg=segment_ids)
        start = idx - positions_from_segments(segment_ids) if segment_ids is not None else None
        return Mask("dense", dense=dense, blocks=query_blocks(T, cfg.sliding_window, start))

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, segment_ids=None, cache=None,
                      branch_ids=None):
        """Final-norm hidden states (B, T, hidden_size), i.e. everything but the LM head.

        attention_mask (B, T): 1 = real token, 0 = padding (left or right).
        segment_ids (B, T): packed rows; tokens attend only within their segment and positions restart.
        branch_ids (B, T), with segment_ids: prompt-shared segments (a DPO pair prompt | chosen | rejected is
            0 | 1 | 2; kernels/masks.py): a branch sees the shared prefix and itself, its positions continuing
            from the prefix's end.
        """
        B, T = input_ids.shape
        if position_ids is None:
            if branch_ids is not None:
                from kernels.masks import shared_positions
                position_ids = shared_positions(segment_ids, branch_ids)
            elif segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                start = cache.length if cache is not None else 0
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)                                      # (B, T, hidden)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = self._mask(x, T, attention_mask, segment_ids, cache, branch_ids)
        for layer in self.model.layers:  # activation checkpointing, if any, is set per layer (common.build_model)
            x = layer(x, cos, sin, mask, cache)
        return self.model.norm(x)

    def forward(self, input_ids, targets=None, position_ids=None, attention_mask=None, segment_ids=None,
                cache=None, ignore_index=-100, expected_grad=None, branch_ids=None, target_positions=None):
        """Logits (B, T, V) in the model's dtype; or, with `targets` (B, T), the fp32 log-probability of
        each target token (B, T) (0 where target == ignore_index), computed by the fused kernel without
        ever materializing the logits. It runs inside forward so that FSDP has the LM head unsharded.
        `expected_grad` (B, T) is passed to the kernel (see kernels/logprobs.py).
        target_positions (N,): targets (N,) are predicted at these flat indices into (B * T), which may repeat
        (packed DPO: a prompt's last position predicts both answers' first tokens); returns (N,)."""
        h = self.hidden_states(input_ids, position_ids, attention_mask, segment_ids, cache, branch_ids)
        if targets is None:
            return self.lm_head(h)
        from kernels.logprobs import token_logprobs
        B, T, D = h.shape
        eg = expected_grad.reshape(-1) if expected_grad is not None else None
        kw = {"expected_grad": eg} if eg is not None else {}
        h = h.reshape(B * T, D)
        if target_positions is not None:
            h = h.index_select(0, target_positions)  # (N, D)
        lp = token_logprobs(h, self.lm_head.weight, targets.reshape(-1), ignore_index, **kw)
        lp = lp.view(B, T) if target_positions is None else lp
        return lp.clone()  # not a view: FSDP2 hooks the output for backward

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 pad_id=0, generator=None, max_len=None, on_token=None):
        """Batched sampling with a KV cache. prompts: list of token-id lists of any lengths (left-padded
        here). temperature 0 = greedy. Each row stops at its first EOS; returns the new tokens per row,
        EOS included when generated. on_token (streaming, e.g. chat.py): called after each step with a list of
        B new ids, None for rows already finished; per row they add up to the returned ids. Without it the
        loop does no extra work."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        eos_id = self.config.eos_token_id if eos_id is None else eos_id
        dev = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
        ok = torch.zeros(B, P, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            ok[i, P - len(p):] = True
        cache = KVCache(self.config, B, max_len or P + max_new_tokens, dev, self.lm_head.weight.dtype)
        pos = (ok.long().cumsum(-1) - 1).clamp(min=0)                     # (B, P)
        # Prefill: the LM head on the last position only ((B, P, V) logits would be GBs for long prompts).
        logits = self._head(self.hidden_states(ids, position_ids=pos, attention_mask=ok, cache=cache)[:, -1])
        next_pos = pos[:, -1:] + 1                                         # (B, 1)
        out = torch.empty(B, 0, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for _ in range(max_new_tokens):
            tok = sample(logits.float(), temperature, top_k, top_p, generator)     # (B,)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out = torch.cat([out, tok[:, None]], dim=1)
            if on_token is not None:
                on_token([None if finished else t for t, finished in zip(tok.tolist(), done.tolist())])
            done = done | (tok == eos_id)
            if bool(done.all()):
                break
            logits = self._head(self.hidden_states(tok[:, None], position_ids=next_pos, cache=cache)[:, -1])
            next_pos = next_pos + 1
        results = []
        for row in out.tolist():
            if eos_id in row:
                row = row[:row.index(eos_id) + 1]
            results.append(row)
        return results

    def _head(self, h):
        # Decode-time LM head, h (B, D) -> (B, V). On CPU, BLAS runs the short-and-wide h @ W.T at a fraction
        # of its speed (~8 GFLOP/s for B=8, V=32000); the same product as the tall (W @ h.T).T is ~3x faster.
        if h.is_cuda:
            return self.lm_head(h)
        return (self.lm_head.weight @ h.T).T

    # -------------------------------------------------------------------------
    # Checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        cfg = MistralConfig.from_json(os.path.join(path, "config.json"))
        dtype = dtype or getattr(torch, cfg.dtype)
        with torch.device("meta"):
            model = cls(cfg)
        reader = CheckpointReader(path)
        reader.check_against(model)
        # One tensor at a time: read (memory-mapped), convert, place. Peak host memory is one copy of the
        # weights plus one tensor, never two copies.
        sd = {name: reader.get(name, dtype=dtype, device=device) for name in reader.names}
        model.load_state_dict(sd, strict=not cfg.tie_word_embeddings, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        cfg.dtype = str(dtype).replace("torch.", "")
        return model

    def save_pretrained(self, path, tokenizer=None, state_dict=None, max_shard_bytes=5 * 10**9):
        sd = state_dict if state_dict is not None else self.state_dict()
        save_checkpoint(path, self.config, sd.items(), tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    # logits (B, V) fp32 -> token ids (B,). temperature 0 is greedy; top-k then top-p, as HF orders them.
    if temperature == 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p   # keep the smallest prefix reaching top_p (>= 1 token)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse-CDF sampling: one uniform number per row. torch.multinomial draws one per vocabulary entry,
    # which was a third of a CPU decode step at V=32000.
    cdf = logits.softmax(-1).double().cumsum(-1)                      # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
