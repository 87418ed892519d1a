"""Distilled DPO (dDPO): align the dSFT model on AI-feedback preference pairs against a frozen reference.

    torchrun --nproc_per_node=8 dpo.py --init_from=out/zephyr-7b/sft/hf   # the paper's recipe: the defaults below
    torchrun --nproc_per_node=8 dpo.py config/dpo_public.json               # the public zephyr-7b-beta recipe
    python dpo.py config/dpo_tiny.json

Data: the output of data/ultrafeedback/prepare.py: pairs stored as consecutive examples (2i = prompt +
chosen, 2i+1 = prompt + rejected) with loss masks on the answer tokens only.

Packing (--packing=true, the default): each pair is computed as one sequence, its prompt once,

    tokens     p0 p1 p2 | c0 c1 c2 c3 | r0 r1 r2      prompt | chosen | rejected
    positions   0  1  2 |  3  4  5  6 |  3  4  5      the rejected answer restarts at the prompt's length
    branch      0  0  0 |  1  1  1  1 |  2  2  2      it sees the prompt and itself, never the chosen answer

and the pairs of one optimizer step are packed best-fit into rows of at most pack_length tokens (a pair is
one segment of a row, kernels/masks.py), so a step trains on exactly the pairs of the padded path. The
prompt's last position predicts both answers' first tokens; every other answer token is predicted inside
its own answer, so each answer's log-prob is the sum over its own span. --packing=false pads prompt + chosen
and prompt + rejected to the longest example of each micro-batch, as TRL does.
The reference model is the starting point itself, frozen. By default its log-probs are computed once, before
training, and cached next to the data, so training holds a single model; --reference=live keeps a second,
sharded copy instead (same numbers, more memory). With LoRA (--lora_rank > 0) the default is --reference=base:
the reference is the same model with its adapters switched off, computed alongside each step (lora.py).
"""

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import lora
import memplan
from data.shards import Shards
from kernels.masks import check_prefix_layout


@dataclass
class Config:
    # Defaults: the paper's dDPO recipe (REFERENCE.md): 3 epochs, beta 0.1, lr 5e-7 linear, batch 32.
    init_from: str = "out/zephyr-7b/sft/hf"      # the dSFT model, an HF-format directory
    tokenizer: str = ""                          # tokenizer.model or directory; default: init_from
    data_dir: str = "data/ultrafeedback/out"     # prepare.py output: train.* and test.*
    out_dir: str = "out/dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"                   # sigmoid | ipo | hinge
    label_smoothing: float = 0.0                 # > 0 with sigmoid: conservative DPO
    rpo_alpha: float = 0.0                       # weight of an NLL term on the chosen answers (RPO)
    reference: str = "auto"                      # precomputed | live | base (LoRA); auto: base with LoRA, else precomputed
    global_batch_size: int = 32                  # pairs per optimizer step, over all ranks and micro-steps
    micro_batch_size: int = 2                    # per forward pass per rank: pairs (2 rows), or packed rows
    packing: bool = True                         # pairs as prompt | chosen | rejected, packed into rows (docstring)
    pack_length: int = 0                         # tokens per packed row; 0: the longest pair, rounded up to 128
    epochs: float = 3.0
    max_steps: int = -1
    lr: float = 5e-7
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 42
    mixed_precision: bool = True
    activation_checkpointing: bool = False
    compile: bool = False
    fsdp_unit: str = "layer"                      # "layer": each decoder layer an FSDP unit (one unsharded at a
                                                  # time); "model": one unit, fewer collectives (small models)
    eval_every: int = 100
    eval_pairs: int = 1000
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False                      # with resume=false: delete out_dir's checkpoints and hf/
    stop_after: int = -1
    export_dtype: str = "bfloat16"
    device: str = "auto"
    rehearse_gpu: bool = False                   # TRITON_INTERPRET=1: CUDA's path (Triton kernels, bf16) on CPU
    memplan: str = ""                            # "WORLD,GPU_GB[,MODEL]": print the memory plan for WORLD GPUs of
                                                 # GPU_GB each and exit; MODEL: a model.py preset for init_from
    # LoRA (lora.py): adapters of rank lora_rank beside frozen base weights; 0 = full fine-tuning.
    lora_rank: int = 0
    lora_alpha: float = 16.0                      # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0                     # > 0 makes runs depend on the number of ranks (dropout masks)
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lora_from: str = ""                           # a PEFT adapter directory to continue from


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses and implicit rewards. Inputs (B,) summed log-probs of the answers (for ipo, pass
    length-averaged ones, as IPO prescribes). Returns (losses, chosen_rewards, rejected_rewards), each (B,)."""
    if loss_type not in ("sigmoid", "ipo", "hinge"):
        raise ValueError(f"loss_type={loss_type!r}; choose sigmoid, ipo or hinge")
    if not beta > 0:
        raise ValueError(f"beta={beta}: expected > 0")
    if not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: expected a flip probability in [0, 0.5]")
    if label_smoothing and loss_type != "sigmoid":
        # Silently training a different objective than asked is worse than stopping.
        raise ValueError(f"label_smoothing={label_smoothing} with loss_type={loss_type!r}: {loss_type} ignores "
                         "label_smoothing (only sigmoid uses it: conservative DPO); set label_smoothing=0 or "
                         "loss_type=sigmoid")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        # label_smoothing = the assumed probability that a label is flipped (cDPO).
        losses = -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * margin)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# -----------------------------------------------------------------------------
# Data


def pair_batch(shards, pairs, pad_id=0):
    """Pairs -> one concatenated batch: rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1], right-padded."""
    examples = [shards[2 * i] for i in pairs] + [shards[2 * i + 1] for i in pairs]
    T = max(len(ids) for ids, _ in examples)
    ids = np.full((len(examples), T), pad_id, dtype=np.int64)
    targets = np.full((len(examples), T), -100, dtype=np.int64)
    attn = np.zeros((len(examples), T), dtype=bool)
    for b, (x, m) in enumerate(examples):
        x, n = x.astype(np.int64), len(x)  # int64 before -100 appears: uint16 would wrap it
        ids[b, :n] = x
        targets[b, :n - 1] = np.where(m[1:] == 1, x[1:], -100)  # position t predicts answer token t+1
        attn[b, :n] = True
    return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets),
            "attention_mask": torch.from_numpy(attn)}


class Layout:
    """A split's pairs as packing lays them out: parts (n_pairs, 3) int64, the tokens of the prompt (what precedes
    the first answer token), of the chosen and of the rejected answer; lengths (n_pairs,) their sums, each prompt
    counted once (the `tokens` the steps log, in both layouts); pack_length, the rows' length when packing.
    check: every pair's two examples share their prompt (packing computes it once)."""

    def __init__(self, shards, check=True):
        self.parts = np.zeros((len(shards) // 2, 3), dtype=np.int64)
        for i in range(len(shards) // 2):  # ~1 s for UltraFeedback's 61k pairs
            (xc, mc), (xr, mr) = shards[2 * i], shards[2 * i + 1]
            pc, pr = (int(np.argmax(m)) if m.any() else len(m) for m in (mc, mr))
            if check and (pc != pr or not np.array_equal(xc[:pc], xr[:pc])):
                raise ValueError(f"{shards.paths['json']}: pair {i} (examples {2 * i}, {2 * i + 1}): the chosen and "
                                 "rejected examples do not share their prompt (the tokens before the first answer "
                                 "token); packing computes it once: use --packing=false or prepare the pairs again")
            self.parts[i] = pc, len(xc) - pc, len(xr) - pr
        self.lengths = self.parts.sum(1)
        self.pack_length = None


def pack_step(pairs, packing, world, rows_per_micro):
    """The pairs of one optimizer step (or one evaluation round) -> this and every rank's micro-steps:
    plan[rank] = [(rows, real), ...], a row a list of pairs. Best-fit decreasing into rows of at most
    pack_length; the rows go to the ranks longest first in turn, and each rank's into as many micro-steps as the
    fullest rank needs (at most rows_per_micro rows each, rows of like length together), since every rank runs
    as many forward passes (FSDP's collectives). While a rank would have fewer rows than micro-steps, the row
    with the most pairs gives one to a row of its own; a rank still short (a round of fewer pairs than ranks,
    never a training step) repeats another's first micro-step with real=False."""
    pairs = list(pairs)
    sizes = packing.lengths[pairs]
    longest_first = np.argsort(-sizes, kind="stable")  # ties in the step's order
    rows = [[pairs[k] for k in row] for row in common.best_fit(sizes, packing.pack_length, longest_first)]
    while True:
        rows.sort(key=lambda row: -int(packing.lengths[row].sum()))
        per_rank = [rows[r::world] for r in range(world)]
        steps = -(-len(per_rank[0]) // rows_per_micro)
        if len(per_rank[-1]) >= steps or len(rows) == len(pairs):
            break
        donor = max(range(len(rows)), key=lambda r: len(rows[r]))
        rows.append([rows[donor].pop()])
    plan = []
    for mine in per_rank:
        cuts = np.linspace(0, len(mine), steps + 1).round().astype(int)
        plan.append([(mine[a:b], True) for a, b in zip(cuts[:-1], cuts[1:])])
    filler = plan[0][0][0]
    return [[(rows, True) if rows else (filler, False) for rows, _ in mine] for mine in plan]


def packed_batch(shards, rows, packing, pad_id=0):
    """Rows of pairs -> one batch, each pair one segment laid out prompt | chosen | rejected (module docstring):
    input_ids, segment_ids, branch_ids (B, T) with T the longest row rounded up to 16 (the padding tail is a
    segment of its own); targets (N,) and target_positions (N,) flat into (B * T): each answer token with a loss
    and the position that predicts it; spans (N,): which answer, k for the chosen answer of the k-th pair in row
    order and n_pairs + k for its rejected one (the order of pair_batch's rows); span_tokens (2 n_pairs,): the
    targets of each answer."""
    pairs = [i for row in rows for i in row]
    T = -(-int(max(packing.lengths[row].sum() for row in rows)) // 16) * 16
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    seg = np.zeros((len(rows), T), dtype=np.int64)
    branch = np.zeros((len(rows), T), dtype=np.int64)
    targets, positions, spans = [], [], []
    k = 0
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            P, C, R = (int(x) for x in packing.parts[i])
            (xc, mc), (xr, mr) = shards[2 * i], shards[2 * i + 1]
            ids[b, t:t + P + C] = xc
            ids[b, t + P + C:t + P + C + R] = xr[P:]
            seg[b, t:t + P + C + R] = s
            branch[b, t + P:t + P + C], branch[b, t + P + C:t + P + C + R] = 1, 2
            for x, m, start, span in ((xc, mc, t + P, k), (xr, mr, t + P + C, len(pairs) + k)):
                a = np.flatnonzero(m[P:])                          # answer tokens with a loss
                before = np.where(a == 0, t + P - 1, start + a - 1)  # the first one: the prompt's last position
                a, before = a[before >= t], before[before >= t]       # (a pair without prompt: no predictor)
                targets.append(x[P + a].astype(np.int64))
                positions.append(b * T + before)
                spans.append(np.full(len(a), span))
            t += P + C + R
            k += 1
        seg[b, t:] = len(row)
    spans = np.concatenate(spans)
    batch = {"input_ids": torch.from_numpy(ids), "segment_ids": torch.from_numpy(seg),
             "branch_ids": torch.from_numpy(branch), "targets": torch.from_numpy(np.concatenate(targets)),
             "target_positions": torch.from_numpy(np.concatenate(positions)), "spans": torch.from_numpy(spans),
             "span_tokens": torch.from_numpy(np.bincount(spans, minlength=2 * len(pairs)))}
    check_prefix_layout(batch["segment_ids"], batch["branch_ids"])  # on the host: the CUDA kernels rely on it
    return batch, pairs


def micro_batch(shards, unit, packing):
    """A micro-step's unit (pairs, or packed rows of pairs) -> (batch, pairs in the batch's order)."""
    if packing is None:
        return pair_batch(shards, unit), list(unit)
    return packed_batch(shards, unit, packing)


def sequence_logps(model, batch, average=False):
    # Summed (or mean, for IPO) log-probs of each answer: (2B,), chosen answers first. Through the fused kernel:
    # no (rows, T, V) logits tensor is ever made. Packed rows: the answers' tokens summed by span.
    if "spans" not in batch:
        lp = model(**batch)
        n = (batch["targets"] != -100).sum(-1)
        s = lp.sum(-1)
    else:
        lp = model(**{k: v for k, v in batch.items() if k not in ("spans", "span_tokens")})  # (N,)
        n = batch["span_tokens"]
        s = lp.new_zeros(len(n)).index_add(0, batch["spans"], lp)
    return (s / n.clamp(min=1), n) if average else (s, n)


def rank_units(n, cfg, d, packing):
    """Pairs 0..n-1 in this rank's micro-steps, for the passes without an optimizer (reference, evaluation):
    (unit, real), unit = pairs, or rows of pairs when packing (rounds of global_batch_size pairs, as a step)."""
    if packing is None:
        yield from common.rank_batches(n, cfg.micro_batch_size, d)
        return
    for start in range(0, n, cfg.global_batch_size):
        yield from pack_step(range(start, min(start + cfg.global_batch_size, n)), packing, d.world,
                             cfg.micro_batch_size)[d.rank]


@torch.no_grad()
def reference_logps(model, shards, n_pairs, cfg, d, average, packing=None):
    """Reference log-probs of every answer, (n_pairs, 2) [chosen, rejected], computed by all ranks together."""
    model.eval()
    out = torch.zeros(n_pairs, 2, dtype=torch.float64, device=d.device)
    for unit, real in rank_units(n_pairs, cfg, d, packing):
        batch, pairs = micro_batch(shards, unit, packing)
        batch = {k: v.to(d.device) for k, v in batch.items()}
        with lora.disabled(model):  # with LoRA, the reference is the base model (init_from), as for reference=base
            s, _ = sequence_logps(model, batch, average)
        if real:
            out[pairs] = s.view(2, -1).T.double()
    # Ranks that ran out of pairs still join the collective; each pair was filled by exactly one rank.
    dist.all_reduce(out)
    model.train()
    return out.cpu().numpy()


def file_sha256(paths):
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def cached_reference(model, shards, split, cfg, d, average, packing=None):
    """Reference log-probs, computed once and cached beside the data, keyed by a hash of the model's files,
    the data split and everything that changes the numbers (dtype, loss averaging, packing: the same values
    up to rounding, but a packed run reads only packed ones)."""
    key = None
    if d.main:
        model_files = [os.path.join(cfg.init_from, f) for f in os.listdir(cfg.init_from)
                       if f.endswith(".safetensors") or f == "config.json"]
        data_files = [os.path.join(cfg.data_dir, f"{split}.{s}") for s in ("ids.bin", "mask.bin", "idx.npy")]
        # bf16 log-probs on the GPU path (CUDA, or its rehearsal) differ from fp32 ones: keyed by the path.
        tag = f"{average}-{cfg.mixed_precision and d.gpu_path}{'-packed' if packing else ''}".encode()
        key = hashlib.sha256(file_sha256(model_files).encode() + file_sha256(data_files).encode() + tag).hexdigest()
    key = common.broadcast_object(key, d)
    path = os.path.join(cfg.data_dir, f"{split}.ref_logps.{key[:16]}.npy")
    if os.path.exists(path):
        ref = np.load(path, allow_pickle=False)
        if ref.shape == (len(shards) // 2, 2):
            return ref
    ref = reference_logps(model, shards, len(shards) // 2, cfg, d, average, packing)
    if d.main:
        tmp = path + f".tmp{os.getpid()}.npy"
        np.save(tmp, ref)
        os.replace(tmp, path)
        print(f"reference log-probs cached in {path}")
    dist.barrier()
    return ref


# -----------------------------------------------------------------------------


def pair_metrics(losses, rc, rr, pc, pr):
    # Sums over pairs of what TRL reports as means; divided by the global pair count by the caller.
    return {"loss": losses.sum().item(), "rewards/chosen": rc.sum().item(), "rewards/rejected": rr.sum().item(),
            "rewards/accuracies": (rc > rr).float().sum().item(), "rewards/margins": (rc - rr).sum().item(),
            "logps/chosen": pc.detach().sum().item(), "logps/rejected": pr.detach().sum().item()}


def reduce_metrics(sums, n, d):
    keys = sorted(sums)
    totals = common.all_reduce_sum([sums[k] for k in keys], d)
    return {k: v / max(n, 1) for k, v in zip(keys, totals)}


def run_pairs(model, ref_model, shards, ref_cache, unit, cfg, d, packing=None):
    """Policy (and, if live, reference) log-probs of a micro-batch of pairs (packed: rows of pairs) -> per-pair
    losses and stats, and the number of positions computed."""
    average = cfg.loss_type == "ipo"
    batch, pairs = micro_batch(shards, unit, packing)
    batch = {k: v.to(d.device) for k, v in batch.items()}
    rc = rr = None
    if cfg.reference == "base":
        # The same weights with the adapters off: no second model, no cache. Before the policy's forward, so
        # that the forward whose graph backward walks is the model's last.
        with torch.no_grad(), lora.disabled(model):
            rs, _ = sequence_logps(model, batch, average)
        rc, rr = rs.view(2, -1).float()
    (s, n) = sequence_logps(model, batch, average)
    pc, pr = s.view(2, -1)
    if ref_model is not None:
        with torch.no_grad():
            rs, _ = sequence_logps(ref_model, batch, average)
        rc, rr = rs.view(2, -1).float()
    elif rc is None:
        ref = torch.from_numpy(ref_cache[pairs]).to(d.device, torch.float32)
        rc, rr = ref[:, 0], ref[:, 1]
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, cfg.label_smoothing)
    if cfg.rpo_alpha > 0:
        # RPO: + alpha * the chosen answer's mean token NLL.
        summed = pc * n[:len(pairs)] if average else pc
        losses = losses - cfg.rpo_alpha * summed / n[:len(pairs)].clamp(min=1)
    return losses, chosen_rewards, rejected_rewards, pc, pr, batch["input_ids"].numel()


@torch.no_grad()
def evaluate(model, ref_model, shards, ref_cache, cfg, d, packing=None):
    model.eval()
    n = min(len(shards) // 2, cfg.eval_pairs)
    sums = {}
    for unit, real in rank_units(n, cfg, d, packing):
        out = pair_metrics(*run_pairs(model, ref_model, shards, ref_cache, unit, cfg, d, packing)[:5])
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + (v if real else 0.0)
    model.train()
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"]
    return {f"eval_{k}": v for k, v in reduce_metrics({k: sums.get(k, 0.0) for k in keys}, n, d).items()}


def main(argv):
    cfg = common.parse_config(Config, argv)
    adapters = lora.settings(cfg)
    if cfg.reference == "auto":
        cfg.reference = "base" if adapters else "precomputed"
    if cfg.reference not in ("precomputed", "live", "base"):
        raise ValueError(f"config: reference={cfg.reference!r}; choose precomputed, live or base")
    if cfg.reference == "base" and not adapters:
        raise ValueError("config: reference=base is the model with its LoRA adapters off; it needs lora_rank > 0")
    if cfg.rpo_alpha < 0:
        raise ValueError(f"config: rpo_alpha={cfg.rpo_alpha}: expected >= 0")
    try:  # loss_type, beta, label_smoothing: checked before any work
        dpo_loss(*torch.zeros(4, 1), cfg.beta, cfg.loss_type, cfg.label_smoothing)
    except ValueError as e:
        raise ValueError(f"config: {e}") from None
    if cfg.memplan:  # on paper, without the data: rows of pack_length, else the longest pair prepare.py lets through
        memplan.print_for(cfg.memplan, cfg, "dpo", (cfg.pack_length or 2048) if cfg.packing else 1024,
                          lambda: common.model_config(cfg.init_from))
        return
    d = common.setup_dist(cfg.device, cfg.rehearse_gpu)
    common.check_out_dir(cfg, d)
    torch.manual_seed(cfg.seed)
    train, test = Shards(cfg.data_dir, "train"), Shards(cfg.data_dir, "test")
    n_pairs = len(train) // 2

    pairs_per_micro = cfg.micro_batch_size * d.world
    if cfg.global_batch_size % pairs_per_micro:
        raise ValueError(f"config: global_batch_size={cfg.global_batch_size} is not a multiple of "
                         f"micro_batch_size * world_size = {pairs_per_micro}")
    accum = cfg.global_batch_size // pairs_per_micro
    steps_per_epoch = n_pairs // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data_dir}: {n_pairs} pairs do not fill one global batch of {cfg.global_batch_size}")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)

    # Pairs as packing lays them out (prepare.py has already truncated them by TRL's rule). Padded rows are as long
    # as the longest example of their micro-batch, packed rows at most pack_length: the memory plan takes the
    # longest either can be.
    layout_train, layout_test = Layout(train, check=cfg.packing), Layout(test, check=cfg.packing)
    longest = int(max(train.lengths.max(), test.lengths.max()))
    packing_train = packing_test = None
    if cfg.packing:
        longest_pair = int(max(layout_train.lengths.max(), layout_test.lengths.max()))
        pack_length = cfg.pack_length or -(-longest_pair // 128) * 128
        if cfg.pack_length < 0:
            raise ValueError(f"config: pack_length={cfg.pack_length}: expected > 0, or 0 for the longest pair")
        for split, layout in (("train", layout_train), ("test", layout_test)):
            too_long = np.flatnonzero(layout.lengths > pack_length)
            if len(too_long):
                i = int(too_long[0])
                raise ValueError(f"{cfg.data_dir}/{split}: {len(too_long)} pairs longer than pack_length={pack_length}"
                                 f", e.g. pair {i}: prompt {layout.parts[i, 0]} + chosen {layout.parts[i, 1]} + "
                                 f"rejected {layout.parts[i, 2]} = {layout.lengths[i]} tokens; raise --pack_length "
                                 f"(0: the longest pair, {longest_pair}) or truncate in prepare.py")
            layout.pack_length = pack_length
        packing_train, packing_test, longest = layout_train, layout_test, pack_length
    memplan.at_start(common.model_config(cfg.init_from), cfg, d, "dpo", longest)
    model, mcfg = common.build_model(cfg.init_from, d, seed=cfg.seed, mixed_precision=cfg.mixed_precision,
                                     activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                                     adapters=adapters, fsdp_unit=cfg.fsdp_unit)
    if train.meta["vocab_size"] != mcfg.vocab_size:
        raise ValueError(f"{cfg.data_dir}: data was tokenized with a vocabulary of {train.meta['vocab_size']} "
                         f"but the model has vocab_size={mcfg.vocab_size}")
    tokenizer = common.load_tokenizer(cfg.tokenizer or cfg.init_from, mcfg, [train, test])
    average = cfg.loss_type == "ipo"
    ref_model, ref_train, ref_test = None, None, None
    if cfg.reference == "live":
        ref_model, _ = common.build_model(cfg.init_from, d, mixed_precision=cfg.mixed_precision,
                                          fsdp_unit=cfg.fsdp_unit)
        ref_model.requires_grad_(False)
        ref_model.eval()
    elif cfg.reference == "precomputed":
        # Before the optimizer exists and before any resume: the reference is the initial weights.
        ref_train = cached_reference(model, train, "train", cfg, d, average, packing_train)
        ref_test = cached_reference(model, test, "test", cfg, d, average, packing_test)
    optimizer = common.make_optimizer(model, cfg.lr, cfg.weight_decay, device_type=d.device.type)
    step, last_ckpt = common.start_or_resume(cfg, model, optimizer, d)
    first_step = step + 1                        # this process's first: where the Triton kernels autotune
    common.announce(cfg, d, [
        f"model: {mcfg.num_params() / 1e6:.1f}M parameters, {d.world} ranks on {d.device.type}, "
        f"reference: {cfg.reference}",
        f"data: {n_pairs} train pairs, {len(test) // 2} test pairs; {steps_per_epoch} steps/epoch, {total_steps} "
        + (f"steps of {accum} micro-steps x {cfg.micro_batch_size} pairs per rank" if not cfg.packing else
           f"steps of {cfg.global_batch_size} pairs packed prompt | chosen | rejected into rows of {pack_length} "
           f"tokens (the longest pair: {longest_pair}), micro-steps of up to {cfg.micro_batch_size} rows per rank"),
        *lora.describe(model, adapters)])

    log = common.Logger(cfg.out_dir, d, total_steps, step, desc="dpo")
    order = {}
    model.train()
    while step < total_steps:
        t0 = time.time()
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
        common.set_lr(optimizer, lr)
        epoch = step // steps_per_epoch
        if epoch not in order:  # every rank draws the same permutation: no data is exchanged
            order = {epoch: np.random.default_rng([cfg.seed, epoch]).permutation(n_pairs)}
        start = (step % steps_per_epoch) * cfg.global_batch_size
        step_pairs = order[epoch][start:start + cfg.global_batch_size]
        if cfg.packing:  # the step's pairs, packed; every rank computes every rank's share: no data is exchanged
            micro = pack_step(step_pairs.tolist(), packing_train, d.world, cfg.micro_batch_size)[d.rank]
        else:
            micro = [(step_pairs[m * pairs_per_micro + d.rank * cfg.micro_batch_size:][:cfg.micro_batch_size].tolist(),
                      True) for m in range(accum)]
        sums, positions = {}, 0
        for unit, _ in micro:  # all real: a step has at least micro_batch_size pairs per rank
            *out, computed = run_pairs(model, ref_model, train, ref_train, unit, cfg, d, packing_train)
            # Mean over the global batch's pairs; FSDP averages gradients over ranks, so scale by world.
            (out[0].sum() * (d.world / cfg.global_batch_size)).backward()
            for k, v in pair_metrics(*out).items():
                sums[k] = sums.get(k, 0.0) + v
            positions += computed
        metrics = reduce_metrics(sums, cfg.global_batch_size, d)
        positions = int(common.all_reduce_sum([positions], d)[0])
        metrics["grad_norm"] = common.optimizer_step(model, optimizer, cfg.grad_clip, step, metrics["loss"], last_ckpt)
        step += 1
        dt = time.time() - t0
        # tokens: the pairs' real tokens, each prompt once (both layouts); positions: what the forward passes
        # computed, padding and (padded layout) the second copy of each prompt included.
        tokens = int(layout_train.lengths[step_pairs].sum())
        metrics.update(lr=lr, epoch=step / steps_per_epoch, pairs_per_s=cfg.global_batch_size / dt, tokens=tokens,
                       positions=positions, fill=tokens / positions, tokens_per_s=tokens / dt)
        common.log_peak_memory(metrics, d, step == first_step)  # against the memory plan printed at start
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == total_steps):
            metrics.update(evaluate(model, ref_model, test, ref_test, cfg, d, packing_test))
        log.log(step, **metrics)
        last_ckpt, stop = common.end_of_step(cfg, step, total_steps, model, optimizer, d, log, last_ckpt)
        if stop:
            return
    log.close()
    common.finish(model, mcfg, cfg, d, tokenizer)


if __name__ == "__main__":
    main(sys.argv[1:])
