"""Distilled SFT (dSFT): fine-tune a base model on teacher-written dialogues, loss on assistant tokens only.

    torchrun --nproc_per_node=8 sft.py --init_from=/models/Mistral-7B-v0.1   # the paper's recipe: the defaults below
    torchrun --nproc_per_node=8 sft.py config/sft_public.json --init_from=/models/Mistral-7B-v0.1   # the public one
    python sft.py config/sft_tiny.json          # one process, CPU

Data: the output of data/ultrachat/prepare.py (token ids + assistant-token loss masks), packed once into rows of
seq_len tokens (best-fit decreasing), visited in a new order each epoch in whole global batches. Plain-text rows
(`text`) come with a loss mask of all ones, so the same script pre-trains a base model (run.sh tiny, step 2).
"""

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import common
import memplan
import lora
from data.shards import Shards


@dataclass
class Config:
    # Defaults: the paper's dSFT recipe for Mistral-7B (REFERENCE.md).
    init_from: str = "mistralai/Mistral-7B-v0.1"  # a local HF-format directory, or "scratch"
    model_preset: str = "tiny"                    # architecture when init_from == "scratch"
    tokenizer: str = ""                           # tokenizer.model or directory to export with; default: init_from
    data_dir: str = "data/ultrachat/out"          # prepare.py output: train.* and test.*
    out_dir: str = "out/sft"
    seq_len: int = 2048
    packing: bool = True                          # pack examples into seq_len rows (segment ids) or pad
    global_batch_size: int = 512                  # rows per optimizer step, over all ranks and micro-steps
    micro_batch_size: int = 4                     # rows per forward pass per rank
    epochs: float = 1.0
    max_steps: int = -1                           # > 0 overrides epochs
    lr: float = 2e-5
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 42
    mixed_precision: bool = True                  # bf16 compute, fp32 master weights and reductions (CUDA)
    activation_checkpointing: bool = False
    compile: bool = False
    fsdp_unit: str = "layer"                      # "layer": each decoder layer an FSDP unit (one unsharded at a
                                                  # time); "model": one unit, fewer collectives (small models)
    eval_every: int = 100
    eval_rows: int = 64
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    export_every: int = 0                         # > 0: also export out_dir/hf_step_N every N steps (HF format:
                                                  # sample from or evaluate an intermediate model)
    resume: bool = False
    overwrite: bool = False                       # with resume=false: delete out_dir's checkpoints and hf/
    stop_after: int = -1                          # end this process after this step (time-limited jobs)
    export_dtype: str = "bfloat16"
    device: str = "auto"
    rehearse_gpu: bool = False                    # TRITON_INTERPRET=1: CUDA's path (Triton kernels, bf16) on CPU
    memplan: str = ""                             # "WORLD,GPU_GB[,MODEL]": print the memory plan for WORLD GPUs of
                                                  # GPU_GB each and exit; MODEL: a model.py preset for init_from
    # LoRA (lora.py): adapters of rank lora_rank beside frozen base weights; 0 = full fine-tuning.
    lora_rank: int = 0
    lora_alpha: float = 16.0                      # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0                     # > 0 makes runs depend on the number of ranks (dropout masks)
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lora_from: str = ""                           # a PEFT adapter directory to continue from


# -----------------------------------------------------------------------------
# Data: examples -> fixed-length rows -> global batches. Every rank computes the same plan from the seed, so no
# data is exchanged, and the global count of assistant tokens per step is known before the forward pass.


def pack(lengths, seq_len, packing, seed):
    """Examples -> rows, each a list of example indices, computed once for the whole run.

    packing: best-fit decreasing. Examples go longest first (ties in an order drawn from the seed), each into
    the open row whose free space it fills best, or a new row. Examples longer than seq_len count as seq_len
    (make_batch truncates them; the caller counts them). On ultrachat-shaped data (~420-token dialogues,
    seq_len 2048) rows come out ~98% full, where greedy in-order filling gave ~89% (tests/test_sft.py).
    Without packing: one example per row, padded to the longest of its micro-batch."""
    n = len(lengths)
    if not packing:
        return [[i] for i in range(n)]
    size = np.minimum(np.asarray(lengths, dtype=np.int64), seq_len)
    order = np.lexsort((np.random.default_rng(seed).random(n), -size))  # longest first, seeded ties
    return common.best_fit(size, seq_len, order)


class Plan:
    """Which rows each optimizer step trains on. The packing is computed once; each epoch visits the rows in
    a new order drawn from (seed, epoch) and is cut into steps_per_epoch full global batches of
    global_batch_size rows. The n_rows % global_batch_size rows left over each epoch are dropped for that
    epoch (a different random set each epoch), so no step is ever short or empty."""

    def __init__(self, lengths, seq_len, packing, seed, global_batch_size):
        self.seq_len, self.seed, self.global_batch_size = seq_len, seed, global_batch_size
        self.rows = pack(lengths, seq_len, packing, seed)
        lengths = np.asarray(lengths, dtype=np.int64)
        self.n_truncated = int((lengths > seq_len).sum())
        self.truncated_tokens = int(np.maximum(lengths - seq_len, 0).sum())
        kept = np.minimum(lengths, seq_len)
        self.row_tokens = np.array([int(kept[r].sum()) for r in self.rows], dtype=np.int64)  # real tokens per row
        self.steps_per_epoch = len(self.rows) // global_batch_size
        self.leftover = len(self.rows) % global_batch_size
        self._epoch, self._order = None, None

    @property
    def fill(self):
        # Real tokens / (rows x seq_len) over the whole packing (for packing=false: of seq_len-long rows).
        return float(self.row_tokens.sum() / max(len(self.rows) * self.seq_len, 1))

    def step_rows(self, step):
        """Indices into self.rows of one optimizer step (all ranks, all micro-steps), in a fixed order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self._order[k * self.global_batch_size:(k + 1) * self.global_batch_size]


def make_batch(shards, rows, seq_len, packing, pad_id=0):
    """rows -> tensors (B, T): ids, targets (-100 = no loss), segment ids or attention mask."""
    T = seq_len if packing else max(min(int(shards.lengths[i]), seq_len) for r in rows for i in r)
    B = len(rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    targets = np.full((B, T), -100, dtype=np.int64)
    seg = np.zeros((B, T), dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            x, m = shards[i]
            x, m = x[:seq_len].astype(np.int64), m[:seq_len]
            n = len(x)
            ids[b, t:t + n] = x
            # Position t predicts token t+1: a loss only where that next token is an assistant token.
            targets[b, t:t + n - 1] = np.where(m[1:] == 1, x[1:], -100)
            seg[b, t:t + n] = s
            t += n
        seg[b, t:] = len(row)  # the padding tail is a segment of its own: no real token sees it
    out = {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets)}
    if packing:
        out["segment_ids"] = torch.from_numpy(seg)
    else:
        out["attention_mask"] = torch.from_numpy(seg == 0)
    return out


def count_targets(shards, rows, seq_len):
    n = 0
    for row in rows:
        for i in row:
            n += int(shards[i][1][1:seq_len].sum())
    return n


# -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, shards, rows, cfg, d):
    model.eval()
    nll, count = 0.0, 0
    for idx, real in common.rank_batches(len(rows), cfg.micro_batch_size, d):
        batch = {k: v.to(d.device) for k, v in make_batch(shards, [rows[i] for i in idx], cfg.seq_len,
                                                            cfg.packing).items()}
        lp = model(**batch)
        if real:
            nll -= lp.sum().item()
            count += int((batch["targets"] != -100).sum())
    model.train()
    nll, count = common.all_reduce_sum([nll, count], d)
    return nll / max(count, 1)


def main(argv):
    cfg = common.parse_config(Config, argv)
    if cfg.memplan:  # on paper: no process group, data or weights
        memplan.print_for(cfg.memplan, cfg, "sft", cfg.seq_len, lambda: common.model_config(cfg.init_from,
                                                                                               cfg.model_preset))
        return
    adapters = lora.settings(cfg)
    d = common.setup_dist(cfg.device, cfg.rehearse_gpu)
    common.check_out_dir(cfg, d)
    torch.manual_seed(cfg.seed)
    train, test = Shards(cfg.data_dir, "train"), Shards(cfg.data_dir, "test")

    rows_per_micro = cfg.micro_batch_size * d.world
    if cfg.global_batch_size % rows_per_micro:
        raise ValueError(f"config: global_batch_size={cfg.global_batch_size} is not a multiple of "
                         f"micro_batch_size * world_size = {rows_per_micro}")
    accum = cfg.global_batch_size // rows_per_micro
    plan = Plan(train.lengths, cfg.seq_len, cfg.packing, cfg.seed, cfg.global_batch_size)
    steps_per_epoch = plan.steps_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data_dir}: {len(plan.rows)} rows of {cfg.seq_len} tokens do not fill one global "
                         f"batch of {cfg.global_batch_size}")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)
    # Evaluation: a fixed, seeded sample of the test split's rows (its packing's first rows hold its longest examples).
    test_plan = pack(test.lengths, cfg.seq_len, cfg.packing, cfg.seed)
    eval_rows = [test_plan[i] for i in np.random.default_rng(cfg.seed).permutation(len(test_plan))[:cfg.eval_rows]]

    memplan.at_start(common.model_config(cfg.init_from, cfg.model_preset), cfg, d, "sft")
    model, mcfg = common.build_model(cfg.init_from, d, cfg.model_preset, cfg.seed, cfg.mixed_precision,
                                     cfg.activation_checkpointing, cfg.compile, adapters=adapters,
                                     fsdp_unit=cfg.fsdp_unit)
    if train.meta["vocab_size"] != mcfg.vocab_size:
        raise ValueError(f"{cfg.data_dir}: data was tokenized with a vocabulary of {train.meta['vocab_size']} "
                         f"but the model has vocab_size={mcfg.vocab_size}")
    tokenizer = common.load_tokenizer(cfg.tokenizer or cfg.init_from, mcfg, [train, test])
    optimizer = common.make_optimizer(model, cfg.lr, cfg.weight_decay, device_type=d.device.type)
    step, last_ckpt = common.start_or_resume(cfg, model, optimizer, d)
    first_step = step + 1                         # this process's first: where the Triton kernels autotune
    common.announce(cfg, d, [
        f"model: {mcfg.num_params() / 1e6:.1f}M parameters, {d.world} ranks on {d.device.type}",
        f"data: {len(train)} train examples -> {len(plan.rows)} rows of {cfg.seq_len} tokens"
        + (f", {plan.fill:.1%} full (best-fit decreasing)" if cfg.packing else " (no packing: one example per row)"),
        f"data: {plan.n_truncated} examples longer than seq_len={cfg.seq_len} truncated ({plan.truncated_tokens} "
        f"tokens cut)",
        f"data: {steps_per_epoch} steps/epoch of {cfg.global_batch_size} rows; {plan.leftover} rows left over each "
        f"epoch are dropped for it (a new random set each epoch); {total_steps} steps of {accum} micro-steps x "
        f"{cfg.micro_batch_size} rows per rank",
        *lora.describe(model, adapters)])

    log = common.Logger(cfg.out_dir, d, total_steps, step, desc="sft")
    peak = common.peak_flops(d.device)
    fpt = common.flops_per_token(mcfg, cfg.seq_len)
    model.train()
    while step < total_steps:
        t0 = time.time()
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
        common.set_lr(optimizer, lr)
        step_rows = plan.step_rows(step)
        rows = [plan.rows[r] for r in step_rows]
        # Loss = sum of assistant-token NLL / assistant tokens in the whole global batch, so the result is
        # the same for any number of ranks and micro-steps. FSDP averages gradients over ranks: undo that.
        n_global = count_targets(train, rows, cfg.seq_len)
        loss_sum, positions = 0.0, 0
        for m in range(accum):
            mine = rows[m * rows_per_micro + d.rank * cfg.micro_batch_size:][:cfg.micro_batch_size]
            batch = {k: v.to(d.device) for k, v in make_batch(train, mine, cfg.seq_len, cfg.packing).items()}
            mask = (batch["targets"] != -100).float()
            nll = -model(**batch, expected_grad=-mask).sum()  # the kernel may precompute its gradient
            (nll * (d.world / max(n_global, 1))).backward()
            loss_sum += nll.item()
            positions += batch["input_ids"].numel()  # what the model computed, padding included
        loss_sum, positions = common.all_reduce_sum([loss_sum, positions], d)
        train_loss = loss_sum / max(n_global, 1)
        tokens = int(plan.row_tokens[step_rows].sum())  # real tokens of the whole global batch, padding excluded
        grad_norm = common.optimizer_step(model, optimizer, cfg.grad_clip, step, train_loss, last_ckpt)
        step += 1
        dt = time.time() - t0
        metrics = dict(loss=train_loss, lr=lr, grad_norm=grad_norm, tokens=tokens, fill=tokens / positions,
                       rows=len(rows), tokens_per_s=tokens / dt, epoch=step / steps_per_epoch)
        if peak:  # a GPU of known peak FLOP/s
            metrics["mfu"] = fpt * tokens / dt / (peak * d.world)
        common.log_peak_memory(metrics, d, step == first_step)
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == total_steps):
            metrics["eval_loss"] = evaluate(model, test, eval_rows, cfg, d)
        log.log(step, **metrics)
        if cfg.export_every > 0 and step % cfg.export_every == 0 and step < total_steps:
            common.export_hf(model, mcfg, f"{cfg.out_dir}/hf_step_{step}", d, tokenizer,
                             getattr(torch, cfg.export_dtype))
        last_ckpt, stop = common.end_of_step(cfg, step, total_steps, model, optimizer, d, log, last_ckpt)
        if stop:
            return
    log.close()
    common.finish(model, mcfg, cfg, d, tokenizer)


if __name__ == "__main__":
    main(sys.argv[1:])
