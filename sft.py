"""Distilled SFT (dSFT): fine-tune a base model on teacher-written dialogues, loss on assistant tokens only.

    torchrun --nproc_per_node=8 sft.py config/sft_zephyr.json --init_from=/models/Mistral-7B-v0.1
    python sft.py config/sft_tiny.json          # one process, CPU

Data: the output of data/ultrachat/prepare.py (token ids + assistant-token loss masks).
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
    eval_every: int = 100
    eval_rows: int = 64
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after: int = -1                          # end this process after this step (time-limited jobs)
    export_dtype: str = "bfloat16"
    device: str = "auto"
    # LoRA (lora.py): adapters of rank lora_rank beside frozen base weights; 0 = full fine-tuning.
    lora_rank: int = 0
    lora_alpha: float = 16.0                      # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0                     # > 0 makes runs depend on the number of ranks (dropout masks)
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    lora_from: str = ""                           # a PEFT adapter directory to continue from


# -----------------------------------------------------------------------------
# Data: examples -> fixed-length rows. Every rank computes the same plan from the seed, so no data is
# exchanged, and the global count of assistant tokens per step is known before the forward pass.


def pack(lengths, order, seq_len, packing):
    # Greedy, in order: fill a row until the next example does not fit. Examples longer than seq_len are
    # truncated (counted by the caller). Returns a list of rows, each a list of example indices.
    rows, row, used = [], [], 0
    for i in order:
        n = min(int(lengths[i]), seq_len)
        if row and (not packing or used + n > seq_len):
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(row)
    return rows


def epoch_rows(shards, seq_len, packing, seed, epoch):
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return pack(shards.lengths, order, seq_len, packing)


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


def step_rows(all_rows, step, steps_per_epoch, rows_per_step, seed, shards, cfg):
    # The rows of one optimizer step (all ranks, all micro-steps), in a fixed order.
    epoch = step // steps_per_epoch
    if epoch not in all_rows:
        all_rows.clear()
        all_rows[epoch] = epoch_rows(shards, cfg.seq_len, cfg.packing, seed, epoch)
    start = (step % steps_per_epoch) * rows_per_step
    return all_rows[epoch][start:start + rows_per_step]


def count_targets(shards, rows, seq_len):
    n = 0
    for row in rows:
        for i in row:
            n += int(shards[i][1][1:seq_len].sum())
    return n


# -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, shards, cfg, d):
    model.eval()
    rows = pack(shards.lengths, np.arange(len(shards)), cfg.seq_len, cfg.packing)[:cfg.eval_rows]
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
    adapters = lora.settings(cfg)
    d = common.setup_dist(cfg.device)
    torch.manual_seed(cfg.seed)
    train, test = Shards(cfg.data_dir, "train"), Shards(cfg.data_dir, "test")

    rows_per_micro = cfg.micro_batch_size * d.world
    if cfg.global_batch_size % rows_per_micro:
        raise ValueError(f"config: global_batch_size={cfg.global_batch_size} is not a multiple of "
                         f"micro_batch_size * world_size = {rows_per_micro}")
    accum = cfg.global_batch_size // rows_per_micro
    n_rows = len(epoch_rows(train, cfg.seq_len, cfg.packing, cfg.seed, 0))
    steps_per_epoch = n_rows // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data_dir}: {n_rows} rows of {cfg.seq_len} tokens do not fill one global batch "
                         f"of {cfg.global_batch_size}")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * steps_per_epoch)

    memplan.at_start(common.model_config(cfg.init_from, cfg.model_preset), cfg, d, "sft")
    model, mcfg = common.build_model(cfg.init_from, d, cfg.model_preset, cfg.seed, cfg.mixed_precision,
                                     cfg.activation_checkpointing, cfg.compile, adapters=adapters)
    if train.meta["vocab_size"] != mcfg.vocab_size:
        raise ValueError(f"{cfg.data_dir}: data was tokenized with a vocabulary of {train.meta['vocab_size']} "
                         f"but the model has vocab_size={mcfg.vocab_size}")
    tokenizer = common.load_tokenizer(cfg.tokenizer or cfg.init_from, mcfg, [train, test])
    optimizer = common.make_optimizer(model, cfg.lr, cfg.weight_decay, device_type=d.device.type)
    step, last_ckpt = common.start_or_resume(cfg, model, optimizer, d)
    common.announce(cfg, d, [
        f"model: {mcfg.num_params() / 1e6:.1f}M parameters, {d.world} ranks on {d.device.type}",
        f"data: {len(train)} train examples -> {n_rows} rows of {cfg.seq_len}; {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps of {accum} micro-steps x {cfg.micro_batch_size} rows per rank",
        *lora.describe(model, adapters)])

    log = common.Logger(cfg.out_dir, d, total_steps, step, desc="sft")
    peak = common.peak_flops(d.device)
    fpt = common.flops_per_token(mcfg, cfg.seq_len)
    plan = {}
    model.train()
    while step < total_steps:
        t0 = time.time()
        lr = common.lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio, cfg.lr_schedule)
        common.set_lr(optimizer, lr)
        rows = step_rows(plan, step, steps_per_epoch, cfg.global_batch_size, cfg.seed, train, cfg)
        # Loss = sum of assistant-token NLL / assistant tokens in the whole global batch, so the result is
        # the same for any number of ranks and micro-steps. FSDP averages gradients over ranks: undo that.
        n_global = count_targets(train, rows, cfg.seq_len)
        loss_sum, tokens = 0.0, 0
        for m in range(accum):
            mine = rows[m * rows_per_micro + d.rank * cfg.micro_batch_size:][:cfg.micro_batch_size]
            batch = {k: v.to(d.device) for k, v in make_batch(train, mine, cfg.seq_len, cfg.packing).items()}
            mask = (batch["targets"] != -100).float()
            nll = -model(**batch, expected_grad=-mask).sum()  # the kernel may precompute its gradient
            (nll * (d.world / max(n_global, 1))).backward()
            loss_sum += nll.item()
            tokens += int(batch["input_ids"].numel() if cfg.packing else batch["attention_mask"].sum())
        loss_sum, tokens = common.all_reduce_sum([loss_sum, tokens], d)
        train_loss = loss_sum / max(n_global, 1)
        grad_norm = common.optimizer_step(model, optimizer, cfg.grad_clip, step, train_loss, last_ckpt)
        step += 1
        dt = time.time() - t0
        metrics = dict(loss=train_loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens / dt,
                       epoch=step / steps_per_epoch)
        if peak:
            metrics["mfu"] = fpt * tokens / dt / (peak * d.world)
            metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == total_steps):
            metrics["eval_loss"] = evaluate(model, test, cfg, d)
        log.log(step, **metrics)
        last_ckpt, stop = common.end_of_step(cfg, step, total_steps, model, optimizer, d, log, last_ckpt)
        if stop:
            return
    log.close()
    common.finish(model, mcfg, cfg, d, tokenizer)


if __name__ == "__main__":
    main(sys.argv[1:])
