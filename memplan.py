"""The memory plan of a training run: bytes per rank, from the model's config.json, the stage's Config and the
number of ranks alone. sft.py and dpo.py print it before any weight is read, and on CUDA stop with the knob to
turn when it does not fit, instead of failing after every rank has loaded 14 GB.

    python sft.py config/sft_public.json --memplan=8,80,mistral-7b   # a plan for 8 GPUs of 80 GB, no weights
    python memplan.py --lora_table                                   # Mistral-7B LoRA on one GPU

What it counts (per rank; FSDP2 shards every parameter's dim 0 over the ranks, padded to a multiple of them):
  persistent   fp32 master parameters, fp32 gradients and AdamW's two fp32 moments, all sharded; with LoRA the
               frozen base (bf16 on CUDA) plus the adapters' four fp32 copies; DPO's live reference (sharded).
  activations  what autograd keeps for backward: per decoder layer its input (B, T, D) with activation
               checkpointing, else everything the layer saves (counted op by op below), plus one layer's
               recomputation during backward; the rotary tables and, off CUDA, SDPA's float mask.
  head         the fused log-prob head (kernels/logprobs.py): the logits chunk, and in SFT's one-pass mode the
               fp32 gradients of the hidden rows and of the LM head, held from forward to backward.
  fsdp         unsharded parameters in the compute dtype: the root group (embeddings, final norm, LM head) for
               the whole step, decoder layers one at a time (two on CUDA: the next one is prefetched); in
               backward a layer's unsharded gradients and the reduce-scatter input (fp32).
  autotune     (CUDA, a step in which a Triton kernel meets a new shape: the first, and DPO's first batch of a longer
               length bucket) Triton's 256 MiB benchmark flush buffer, and the copy of the LM head's fp32 gradient
               accumulator that the accumulating GEMM's tuning restores after each trial.
The peak is the persistent part plus the largest of these moments: the end of forward (in the head), the
backward of the last decoder layer, (DPO) the head's backward, and the root group's reduce-scatter at the end;
`first_step_peak` adds autotuning's buffers to the moments where kernels tune. It is a model of our code, checked
against a hand computation for Mistral-7B and against torch's allocator on CPU (tests/test_memplan.py); it leaves out
the CUDA context, NCCL buffers and allocator fragmentation, which is why `check` keeps 10% of the device free.
"""

import math
import sys

GIB = 2**30
AUTOTUNE_FLUSH = 256 * 2**20  # triton.testing.do_bench's L2-flush buffer, allocated by every autotuning benchmark
HEADROOM = 0.9  # fraction of a device's memory the plan may fill: the rest is CUDA context, NCCL, fragmentation
# Usable GiB of cards sold as "N GB" (H100 80GB reports 79.1 GiB, A6000 47.5, RTX 4090 23.6).
CARDS = {24: 23.6, 48: 47.5, 80: 79.1}


def _ceil_div(a, b):
    return -(-a // b)


def linear_shapes(mcfg):
    """(module name, (out, in)) of one decoder layer's projections, HF names."""
    D, I, hd = mcfg.hidden_size, mcfg.intermediate_size, mcfg.head_dim
    q, kv = mcfg.num_attention_heads * hd, mcfg.num_key_value_heads * hd
    return [("q_proj", (q, D)), ("k_proj", (kv, D)), ("v_proj", (kv, D)), ("o_proj", (D, q)),
            ("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))]


def lora_targets(tcfg):
    # The LoRA fields of a stage Config (lora.py): rank 0 = full fine-tuning.
    rank = int(getattr(tcfg, "lora_rank", 0) or 0)
    names = str(getattr(tcfg, "lora_targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"))
    return rank, [t.strip() for t in names.split(",") if t.strip()]


def shard(shape, world):
    # Elements this rank holds of a parameter: FSDP2 pads dim 0 to a multiple of the ranks.
    rest = math.prod(shape[1:])
    return _ceil_div(shape[0], world) * rest


def plan(mcfg, tcfg, world, device="cuda", stage="sft", seq_len=None):
    """A dict: 'items' [(group, name, bytes)], 'peak' bytes, 'moment' (where the peak is), and the inputs.

    mcfg: model.MistralConfig. tcfg: a stage Config (micro_batch_size, activation_checkpointing, mixed_precision,
    reference and packing for DPO, lora_* if any). stage: "sft" (micro_batch_size rows of seq_len) or "dpo" (2 x
    micro_batch_size rows of up to seq_len: chosen and rejected; packed, micro_batch_size rows of seq_len = the
    pack_length). seq_len: sft's tcfg.seq_len by default; for padded DPO the longest example the run can see.
    device: "cuda" (bf16 compute with mixed_precision, our Triton kernels) or "cpu" (fp32, SDPA)."""
    D, I, L, V = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_hidden_layers, mcfg.vocab_size
    H, Hkv, hd = mcfg.num_attention_heads, mcfg.num_key_value_heads, mcfg.head_dim
    Dq, Dkv = H * hd, Hkv * hd
    cuda = device == "cuda"
    c = 2 if cuda and getattr(tcfg, "mixed_precision", True) else 4   # compute dtype bytes
    ac = bool(getattr(tcfg, "activation_checkpointing", False))
    T = int(seq_len if seq_len is not None else tcfg.seq_len)
    rows = tcfg.micro_batch_size * (2 if stage == "dpo" and not getattr(tcfg, "packing", False) else 1)
    tok = rows * T                                                      # tokens per micro-step per rank
    rank, targets = lora_targets(tcfg)
    lora_on = rank > 0
    base = 2 if lora_on and c == 2 else 4                               # bytes of a stored base parameter

    # Parameters: per layer and the root group, full and sharded element counts.
    lin = dict(linear_shapes(mcfg))
    layer_shapes = list(lin.values()) + [(D,), (D,)]
    root_shapes = [(V, D), (D,)] + ([] if mcfg.tie_word_embeddings else [(V, D)])
    P_layer, P_root = sum(math.prod(s) for s in layer_shapes), sum(math.prod(s) for s in root_shapes)
    S_base = L * sum(shard(s, world) for s in layer_shapes) + sum(shard(s, world) for s in root_shapes)
    if lora_on:
        ad_shapes = [s for t in targets for s in ((rank, lin[t][1]), (lin[t][0], rank))]
        P_ad_layer = sum(math.prod(s) for s in ad_shapes)
        S_train = L * sum(shard(s, world) for s in ad_shapes)
    else:
        P_ad_layer, S_train = 0, S_base
    items = []

    def add(group, name, nbytes):
        items.append((group, name, int(nbytes)))
        return int(nbytes)

    # --- persistent -------------------------------------------------------------------------------------
    if lora_on:
        add("persistent", f"frozen base parameters ({'bf16' if base == 2 else 'fp32'}, sharded)", base * S_base)
        add("persistent", "adapter parameters (fp32, sharded)", 4 * S_train)
    else:
        add("persistent", "parameters (fp32 masters, sharded)", 4 * S_train)
    add("persistent", "gradients (fp32, sharded)", 4 * S_train)
    add("persistent", "AdamW moments (2 x fp32, sharded)", 8 * S_train)
    live_ref = stage == "dpo" and getattr(tcfg, "reference", "precomputed") == "live" and not lora_on
    if live_ref:
        add("persistent", "DPO reference model, live (fp32, sharded)", 4 * S_base)
    persistent = sum(b for g, _, b in items if g == "persistent")

    # --- activations ----------------------------------------------------------------------------------------
    # What one decoder layer saves for backward, bytes per token, besides its input (counted op by op from
    # model.py; on CPU measured with saved_tensors_hooks). Each RMSNorm keeps its fp32 input, the normalized
    # value and its output; q, k, v (after RoPE), the attention output (+ its fp32 log-sum-exp on CUDA) and
    # o_proj's input; the MLP keeps gate, up, silu(gate) and their product.
    if cuda:
        norm = 4 * D + 2 * c * D
        inner = 2 * norm + c * (Dq + 2 * Dkv) + c * 2 * Dq + 4 * H + 4 * c * I
    else:
        norm = 3 * 4 * D                       # fp32: the input cast is the input itself, counted once below
        inner = 2 * norm - 4 * D + 4 * (Dq + 2 * Dkv) + 4 * 2 * Dq + 4 * D + 4 * 4 * I
    if lora_on:  # each adapter keeps its rank-r intermediate, and a dropout copy of its input if dropout > 0
        drop = getattr(tcfg, "lora_dropout", 0.0) > 0
        inner += sum(c * rank + (c * lin[t][1] if drop else 0) for t in targets)
    saved_layer = c * D + (0 if ac else inner)
    add("activations", f"saved per layer x {L} layers ({'inputs only: checkpointing' if ac else 'all'})",
        L * saved_layer * tok)
    rope = add("activations", "rotary cos/sin tables", 2 * c * hd * tok)
    mask = 0
    if not cuda:  # SDPA on CPU turns the bool (B, 1, T, T) mask into a float one, which each layer keeps (packed DPO:
        # one (L, L) per pair, at most T x T per row, when a row holds a single pair)
        mask = add("activations", "SDPA float mask (CPU), per layer that keeps it", (1 if ac else L) * 4 * rows * T * T
                   + rows * T * T)
    recompute = add("activations", "one layer recomputed in backward (checkpointing)", inner * tok if ac else 0)
    # In a layer's backward: the gradient flowing in and out (B, T, D) and the widest local gradients
    # (the MLP's (B, T, I) pair), in the compute dtype; on CUDA the fp32 cast of the norm's input gradient.
    layer_bwd = add("activations", "gradients inside one layer's backward", (3 * c * D + 2 * c * I + (4 * D if cuda else 0)) * tok)

    # --- head (kernels/logprobs.py) ------------------------------------------------------------------------
    chunk_rows = max(16, (512 * 2**20 if cuda else 32 * 2**20) // (4 * V))
    chunk = add("head", "logits chunk (fp32)", 4 * V * min(chunk_rows, tok))
    hidden = add("head", "final hidden states + the target rows' copy", 2 * c * D * tok)
    head_trainable = not lora_on
    one_pass = stage == "sft" or not head_trainable   # SFT passes expected_grad; a frozen head needs no grad_w
    grad_h = add("head", "grad of the hidden rows (fp32, from forward to backward)" if one_pass
                 else "grad of the hidden rows", (4 if one_pass else c) * D * tok)
    grad_w = add("head", "LM head gradient accumulator (fp32)", 4 * V * D if head_trainable else 0)
    head_grad = add("head", "LM head gradient, unsharded (compute dtype)",
                    c * V * D if head_trainable and c != 4 else 0)

    # --- FSDP's unsharded working set ---------------------------------------------------------------------
    P_grad = P_ad_layer if lora_on else P_layer
    one_unit = getattr(tcfg, "fsdp_unit", "layer") == "model"
    if one_unit:  # one unit: everything unsharded from forward to backward's end
        root = add("fsdp", "whole model unsharded (fsdp_unit=model)", c * (P_root + L * (P_layer + P_ad_layer)))
        layers = 0
        grads = add("fsdp", "every layer's unsharded gradients + reduce-scatter input (fp32)", (c + 4) * L * P_grad)
    else:
        root = add("fsdp", "root group unsharded (embeddings, norm, LM head)", c * P_root)
        n_layers = 2 if cuda else 1
        layers = add("fsdp", f"decoder layers unsharded ({n_layers} at a time)", n_layers * c * (P_layer + P_ad_layer))
        grads = add("fsdp", "one layer's unsharded gradients + reduce-scatter input (fp32)",
                    (c + 4 * n_layers) * P_grad)
    # The live reference is built with the same unit: with one, all of it is unsharded during its forward.
    ref_fwd = add("fsdp", "live reference: " + ("whole model" if one_unit else "root + one layer")
                  + " unsharded during its forward", c * (P_root + (L if one_unit else 1) * P_layer) if live_ref else 0)

    # --- moments ------------------------------------------------------------------------------------------
    acts = L * saved_layer * tok + rope + mask
    moments = {
        "end of forward (head)": acts + root + hidden + chunk + (grad_h + grad_w if one_pass else 0) + ref_fwd,
        "backward of the last layer": acts + root + hidden + recompute + layer_bwd + layers + grads
                                      + head_grad + c * D * tok,
    }
    # The root group's backward ends the step: its unsharded gradients (embeddings, LM head) and the
    # reduce-scatter input, next to its unsharded parameters; the activations are gone by then.
    root_grads = (1 if mcfg.tie_word_embeddings else 2) * c * V * D if head_trainable else 0
    moments["end of backward (root reduce-scatter)"] = root + root_grads + (4 * P_root if head_trainable else 0)
    if not one_pass:  # DPO's head backward: chunks recomputed, grad_w accumulated, then cast
        moments["head backward"] = acts + root + hidden + chunk + grad_h + grad_w + head_grad
    moment = max(moments, key=moments.get)

    # --- autotuning (a step that tunes) -------------------------------------------------------------------
    # The Triton kernels (CUDA, 16-bit compute) tune at the first call with a new shape: attention in the first
    # forward (layer 0, little alive) and backward (the last layer: the "backward" moment), the head's kernels
    # in the head. Each trial run sits beside the flush buffer; the accumulating GEMM (the LM head's gradient)
    # also beside a copy of its accumulator, restored after each trial.
    tunes = cuda and c == 2
    flush = add("autotune", "Triton's benchmark flush buffer (a step that autotunes)", AUTOTUNE_FLUSH if tunes else 0)
    restore = add("autotune", "LM head gradient copy, restored by its GEMM's tuning",
                  4 * V * D if tunes and head_trainable else 0)
    head_moment = "end of forward (head)" if one_pass else "head backward"
    first_step = {m: b + (flush if m != "end of backward (root reduce-scatter)" else 0)
                  + (restore if m == head_moment else 0) for m, b in moments.items()}
    first_moment = max(first_step, key=first_step.get)
    return dict(items=items, persistent=persistent, moments=moments, moment=moment,
                peak=persistent + moments[moment], first_step_moment=first_moment,
                first_step_peak=persistent + first_step[first_moment], world=world, device=device, stage=stage,
                tokens=tok, rows=rows, seq_len=T, lora_rank=rank, activation_checkpointing=ac,
                micro_batch_size=tcfg.micro_batch_size)


def format_plan(p, device_bytes=None):
    lines = [f"memory plan per rank ({p['stage']}, {p['world']} ranks, {p['device']}, micro batch "
             f"{p['micro_batch_size']} = {p['rows']} rows x {p['seq_len']} tokens, activation checkpointing "
             f"{'on' if p['activation_checkpointing'] else 'off'}{', LoRA rank %d' % p['lora_rank'] if p['lora_rank'] else ''}):"]
    for group, name, b in p["items"]:
        if b:
            lines.append(f"  {group:<12} {name:<62} {b / GIB:8.2f} GiB")
    for name, b in p["moments"].items():
        lines.append(f"  {'moment':<12} {name + ': persistent + ' + format(b / GIB, '.2f') + ' GiB':<62} "
                     f"{(p['persistent'] + b) / GIB:8.2f} GiB")
    tail = f" of {device_bytes / GIB:.1f} GiB on the device" if device_bytes else ""
    lines.append(f"  planned peak {p['peak'] / GIB:.2f} GiB ({p['moment']}); in a step that autotunes (the first) "
                 f"{p['first_step_peak'] / GIB:.2f} GiB ({p['first_step_moment']}){tail}")
    return "\n".join(lines)


def fits(p, device_bytes):
    return p["first_step_peak"] <= HEADROOM * device_bytes


def suggestions(mcfg, tcfg, world, device, stage, seq_len, device_bytes):
    """What would fit instead: the knobs, one at a time, in the order a user would try them."""
    import dataclasses
    tries = []
    if not getattr(tcfg, "activation_checkpointing", False):
        tries.append(("--activation_checkpointing=true", dataclasses.replace(tcfg, activation_checkpointing=True), world))
    mb = tcfg.micro_batch_size
    while mb > 1:
        mb //= 2
        tries.append((f"--micro_batch_size={mb} (gradient accumulation keeps the global batch)",
                      dataclasses.replace(tcfg, micro_batch_size=mb, activation_checkpointing=True), world))
    for w in (world * 2, world * 4):
        tries.append((f"{w} GPUs (with checkpointing, micro batch 1)",
                      dataclasses.replace(tcfg, micro_batch_size=1, activation_checkpointing=True), w))
    out = []
    for knob, cfg, w in tries:
        q = plan(mcfg, cfg, w, device, stage, seq_len)
        out.append(f"{knob}: {q['first_step_peak'] / GIB:.1f} GiB{' (fits)' if fits(q, device_bytes) else ''}")
    return out


def check(p, device_bytes, mcfg, tcfg, seq_len=None):
    """Raise before loading when the plan exceeds HEADROOM of the device's memory, naming the knobs."""
    if fits(p, device_bytes):
        return
    tips = suggestions(mcfg, tcfg, p["world"], p["device"], p["stage"], seq_len, device_bytes)
    raise MemoryError(
        f"memory plan: {p['first_step_peak'] / GIB:.1f} GiB per GPU at the peak ({p['first_step_moment']}, first "
        f"step), more than "
        f"{HEADROOM:.0%} of the {device_bytes / GIB:.1f} GiB this GPU has. Turn one of these knobs (planned peak "
        f"with it):\n  " + "\n  ".join(tips) + "\nor set MEMPLAN_CHECK=0 to start anyway.")


def at_start(mcfg, tcfg, d, stage, seq_len=None):
    """sft.py and dpo.py, before any weight is read: print the plan (rank 0) and, on CUDA, stop every rank
    with the knobs to turn when it does not fit the device (MEMPLAN_CHECK=0 skips the check)."""
    import os
    import torch
    p = plan(mcfg, tcfg, d.world, d.device.type, stage, seq_len)
    total = torch.cuda.get_device_properties(d.device).total_memory if d.device.type == "cuda" else None
    if d.main:
        print(format_plan(p, total), flush=True)
    if total is not None and os.environ.get("MEMPLAN_CHECK", "1") != "0":
        check(p, total, mcfg, tcfg, seq_len)
    return p


def lora_table(stage="sft", seq_len=2048, rank=16, micro_batches=(1, 2, 3, 4)):
    """Mistral-7B with LoRA on one GPU: planned peak per micro batch, and which cards it fits."""
    import dataclasses
    from model import config_from_preset
    mcfg = config_from_preset("mistral-7b")

    @dataclasses.dataclass
    class T:
        micro_batch_size: int
        seq_len: int = 2048
        activation_checkpointing: bool = True
        mixed_precision: bool = True
        reference: str = "precomputed"
        lora_rank: int = rank
        lora_dropout: float = 0.0
        lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    out = []
    for mb in micro_batches:
        p = plan(mcfg, T(mb, seq_len), 1, "cuda", stage, seq_len)
        out.append((mb, p["first_step_peak"], {gb: fits(p, g * GIB) for gb, g in CARDS.items()}))
    return out


def print_for(spec, tcfg, stage, seq_len, model_config):
    """sft.py and dpo.py --memplan=WORLD,GPU_GB[,MODEL]: print the plan for WORLD GPUs of GPU_GB GB each, on paper
    (no process group, data or weights), and return it. MODEL, a model.py preset, stands in for init_from's
    config.json; model_config(): the stage's reading of init_from, called only without MODEL."""
    parts = spec.split(",")
    try:
        world, gpu_gb = int(parts[0]), float(parts[1])
        if len(parts) > 3 or world < 1 or gpu_gb <= 0:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"config: memplan={spec!r}: expected WORLD,GPU_GB[,MODEL], e.g. 8,80 or "
                         f"8,80,mistral-7b") from None
    from model import config_from_preset
    mcfg = config_from_preset(parts[2]) if len(parts) == 3 else model_config()
    p = plan(mcfg, tcfg, world, "cuda", stage, seq_len)
    print(format_plan(p, CARDS.get(int(gpu_gb), gpu_gb) * GIB))
    return p


def main(argv):
    """python memplan.py --lora_table: Mistral-7B with LoRA on one GPU, per micro batch and card.
    (A stage's plan: python sft.py PRESET.json --memplan=8,80[,mistral-7b]; the same for dpo.py.)"""
    if argv != ["--lora_table"]:
        sys.exit("usage: python memplan.py --lora_table\n"
                 "a stage's plan: python sft.py PRESET.json --memplan=WORLD,GPU_GB[,MODEL] (the same for dpo.py)")
    for stage in ("sft", "dpo"):
        rows = "micro batch rows" if stage == "sft" else "micro batch pairs (2 rows each)"
        print(f"\nMistral-7B {stage}, LoRA rank 16 on all 7 projections, bf16 base, seq 2048, checkpointing, 1 GPU; "
              f"{rows}:")
        print("| micro batch | planned peak | " + " | ".join(f"{gb} GB" for gb in CARDS) + " |")
        print("|---:|---:|" + ":---:|" * len(CARDS))
        for mb, peak, ok in lora_table(stage):
            print(f"| {mb} | {peak / GIB:.1f} GiB | " + " | ".join("fits" if ok[g] else "no" for g in CARDS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
