"""SFT workloads of bench.py: `sft` (every position a target) and `sft_chat` (packed chat rows)."""

import tempfile

import torch

from benchmarks.harness import BENCH_MODEL, LR, SEED, Meter, StepTimer, load_hf, load_ours, mistral_tokenizer, ours_fsdp, trainer_common_args

# -----------------------------------------------------------------------------
# SFT: batch 4 x 256, AdamW, forward + backward + clip + step


SFT = dict(batch=4, seq=256, warmup=1, steps=4)
# sft_chat: the same batch shaped like chat SFT data, loss on the assistant tokens only. Each 256-token row packs
# two 128-token examples of 59 prompt tokens (system and user turns, template included) and 69 assistant tokens:
# 54% targets, the share measured on AlpacaEval's example outputs (alpaca_eval 0.6.6 sdist, example/outputs.json,
# 805 instruction/output pairs) rendered with the Zephyr template and the Mistral v1 tokenizer (64,353 of 118,667
# tokens). Multi-turn UltraChat dialogues have a similar or higher share; the exact one is the data's.
CHAT_EXAMPLE, CHAT_PROMPT = 128, 59


def sft_rows(n_steps):
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(3, BENCH_MODEL["vocab_size"], (n_steps * SFT["batch"], SFT["seq"]), generator=g)


def chat_layout(seq):
    """(segment ids, is-target) for one packed row of sft_chat: position t is a target if it predicts an
    assistant token of its own example (sft.py's rule: the next token, within the segment)."""
    seg = torch.arange(seq) // CHAT_EXAMPLE
    pos = torch.arange(seq) % CHAT_EXAMPLE
    target = (pos >= CHAT_PROMPT - 1) & (pos < CHAT_EXAMPLE - 1)
    return seg, target


def case_sft(impl, weights, chat=False):
    import common
    B, W, S = SFT["batch"], SFT["warmup"], SFT["steps"]
    rows = sft_rows(W + S)
    tokens = B * SFT["seq"]
    if impl.startswith("trl"):
        return sft_trl(weights, rows, checkpointing=impl == "trl")
    meter = Meter(W)
    if impl.startswith("ours"):
        if impl == "ours-fsdp":
            model, d = ours_fsdp(weights)
        else:
            model, d = load_ours(weights), common.Dist(0, 1, 0, torch.device("cpu"))
        opt = common.make_optimizer(model, LR, device_type="cpu")
        batches = []
        for i in range(W + S):
            ids = rows[i * B:(i + 1) * B]
            targets = torch.full_like(ids, -100)
            targets[:, :-1] = ids[:, 1:]                        # position t predicts token t+1
            batch = {"input_ids": ids, "targets": targets}
            # sft.py's default (packing=true) passes segment ids; here each row is one 256-token example.
            # (Without them the model takes SDPA's is_causal path, as transformers does: no measurable difference.)
            batch["segment_ids"] = torch.zeros_like(ids)
            if chat:
                seg, is_target = chat_layout(SFT["seq"])
                batch["segment_ids"] = seg.expand_as(ids).contiguous()
                batch["targets"] = torch.where(is_target, targets, -100)
            batches.append(batch)
        meter.start()
        for step, batch in enumerate(batches):
            # sft.py's micro-step, verbatim but for the data plumbing.
            if impl == "ours-fsdp":
                model.set_requires_gradient_sync(True)
            mask = (batch["targets"] != -100).float()
            n_global = int(mask.sum())
            nll = -model(**batch, expected_grad=-mask).sum()
            (nll * (d.world / max(n_global, 1))).backward()
            loss = nll.item() / n_global
            common.optimizer_step(model, opt, 1.0, step, loss, None)
            meter.step()
    else:                                                       # "hf": the plain torch loop
        model = load_hf(weights)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        meter.start()
        for i in range(W + S):
            ids = rows[i * B:(i + 1) * B]
            labels = ids
            if chat:  # labels are shifted inside: label t+1 is the target of position t; the same targets as ours
                _, is_target = chat_layout(SFT["seq"])
                labels = torch.full_like(ids, -100)
                labels[:, 1:] = torch.where(is_target[:-1], ids[:, 1:], -100)
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
            loss.backward()
            loss = loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            meter.step()
    return meter.result(tokens_per_step=tokens)


def sft_trl(weights, rows, checkpointing):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    W, S = SFT["warmup"], SFT["steps"]
    tok = mistral_tokenizer()                # only its pad id is used: the data is already token ids
    model = load_hf(weights)
    data = Dataset.from_dict({"input_ids": rows.tolist()})
    meter = Meter(W)
    timer = type("Timer", (StepTimer, TrainerCallback), {})(meter)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**trainer_common_args(out, W + S, SFT["batch"]), max_length=SFT["seq"], packing=False,
                         gradient_checkpointing=checkpointing)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
        trainer.train()
    return meter.result(tokens_per_step=SFT["batch"] * SFT["seq"], optim=str(args.optim))
