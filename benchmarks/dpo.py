"""DPO workloads of bench.py: `dpo` and `dpo_mem` (1024-token sequences)."""

import tempfile

import torch

from benchmarks.harness import BENCH_MODEL, SEED, Meter, StepTimer, load_hf, load_ours, mistral_tokenizer, trainer_common_args

# -----------------------------------------------------------------------------
# DPO: pairs of prompt + chosen / prompt + rejected, sigmoid loss, beta 0.1, AdamW step


DPO = dict(pairs=4, prompt=64, answer=192, warmup=1, steps=3)
DPO_MEM = dict(pairs=2, prompt=256, answer=768, warmup=0, steps=2)     # 1024 tokens per sequence


def dpo_examples(shape, n_steps):
    """Fake prepare.py output: example 2i = prompt + chosen, 2i+1 = prompt + rejected, with answer-token masks."""
    import numpy as np
    g = np.random.default_rng(SEED)
    P, A, V = shape["prompt"], shape["answer"], BENCH_MODEL["vocab_size"]
    examples = []
    for _ in range(n_steps * shape["pairs"]):
        prompt = g.integers(3, V, P)
        for _ in range(2):
            ids = np.concatenate([prompt, g.integers(3, V, A)])
            examples.append((ids, np.concatenate([np.zeros(P, np.uint8), np.ones(A, np.uint8)])))
    return examples


def case_dpo(impl, weights, shape):
    import torch.nn.functional as F
    import common
    import dpo
    W, S, n = shape["warmup"], shape["steps"], shape["pairs"]
    examples = dpo_examples(shape, W + S)
    tokens = 2 * n * (shape["prompt"] + shape["answer"])
    if impl.startswith("trl"):
        return dpo_trl(weights, shape, checkpointing=impl == "trl")
    cfg = dpo.Config(beta=0.1, loss_type="sigmoid", global_batch_size=n, micro_batch_size=n, grad_clip=1.0)
    step_pairs = [list(range(i * n, (i + 1) * n)) for i in range(W + S)]
    meter = Meter(W)

    if impl in ("ours", "ours-live"):
        # dpo.py's micro-step: run_pairs (one concatenated [chosen; rejected] batch through the fused kernel),
        # backward of the pair losses, metrics, clip + AdamW. Plain module (the FSDP2 cost is in the SFT table).
        model, d = load_ours(weights), common.Dist(0, 1, 0, torch.device("cpu"))
        ref_model, ref_cache = None, None
        if impl == "ours-live":
            ref_model = load_ours(weights, requires_grad=False)
        else:
            # dpo.py --reference=precomputed: reference log-probs computed once before training (not timed).
            import numpy as np
            ref_cache = np.zeros((len(examples) // 2, 2))
            model.eval()
            with torch.no_grad():
                for pairs in step_pairs:
                    batch = dpo.pair_batch(examples, pairs)
                    s, _ = dpo.sequence_logps(model, batch)
                    ref_cache[pairs] = s.view(2, -1).T.double().numpy()
            model.train()
        opt = common.make_optimizer(model, cfg.lr, device_type="cpu")
        meter.start()
        for step, pairs in enumerate(step_pairs):
            out = dpo.run_pairs(model, ref_model, examples, ref_cache, pairs, cfg, d)
            (out[0].sum() * (d.world / cfg.global_batch_size)).backward()
            metrics = {k: v / n for k, v in dpo.pair_metrics(*out).items()}
            common.optimizer_step(model, opt, cfg.grad_clip, step, metrics["loss"], None)
            meter.step()
        return meter.result(tokens_per_step=tokens)

    # Full-logits steps, "the common way": log_softmax over (2B, T, V) fp32 logits, gather the targets.
    # hf: transformers' model with a live reference under no_grad; hf-precomputed / ours-logits: reference
    # log-probs precomputed, so the difference to "ours" is only the logits.
    if impl == "ours-logits":
        model = load_ours(weights)
        logits_of = lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])    # noqa: E731
    else:
        model = load_hf(weights)
        logits_of = lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],   # noqa: E731
                                   use_cache=False).logits
    ref_model = load_hf(weights, train=False) if impl == "hf" else None

    def seq_logps(m, b):
        logits = logits_of(m, b).float()                                                  # (2B, T, V)
        tgt = b["targets"]
        lp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)    # (2B, T)
        return (lp * (tgt != -100)).sum(-1)                                                # (2B,)

    batches = [dpo.pair_batch(examples, pairs) for pairs in step_pairs]
    refs = None
    if ref_model is None:
        model.eval()
        with torch.no_grad():
            refs = [seq_logps(model, b) for b in batches]
        model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    meter.start()
    for i, b in enumerate(batches):
        pc, pr = seq_logps(model, b).view(2, -1)
        if refs is None:
            with torch.no_grad():
                rc, rr = seq_logps(ref_model, b).view(2, -1)
        else:
            rc, rr = refs[i].view(2, -1)
        loss = -F.logsigmoid(cfg.beta * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        meter.step()
    return meter.result(tokens_per_step=tokens)


WORDS = ("the of and to in is was for on are with as his they be at one have this from or had by not word but "
         "what some we can out other were all there when up use your how said an each she which do their time if "
         "will way about many then them write would like so these her long make thing see him two has look more "
         "day could go come did number sound no most people my over know water than call first who may down side "
         "been now find").split()


def texts_of_length(tok, n_prompt, n_answer, count, seed):
    """count (prompt, chosen, rejected) strings that TRL's DPOTrainer tokenizes to exactly n_prompt prompt
    tokens (BOS included) and n_answer answer tokens (the EOS it appends included)."""
    import random
    rng = random.Random(seed)

    def grow(prefix_ids_len, target, encode):
        words = []
        while True:
            n = encode(" ".join(words)) - prefix_ids_len
            if n == target:
                return " ".join(words)
            if n > target:
                words = words[:-2]
            words.append(rng.choice(WORDS))

    out = []
    for _ in range(count):
        prompt = grow(0, n_prompt, lambda s: len(tok(s)["input_ids"]))
        answers = [grow(n_prompt, n_answer, lambda s: len(tok(prompt + " " + s + tok.eos_token)["input_ids"]))
                   for _ in range(2)]
        out.append((prompt, " " + answers[0], " " + answers[1]))
    return out


def dpo_trl(weights, shape, checkpointing):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    W, S, n = shape["warmup"], shape["steps"], shape["pairs"]
    tok = mistral_tokenizer()
    triples = texts_of_length(tok, shape["prompt"], shape["answer"], n * (W + S), SEED)
    data = Dataset.from_dict({k: [t[i] for t in triples] for i, k in enumerate(("prompt", "chosen", "rejected"))})
    model, ref = load_hf(weights), load_hf(weights, train=False)
    meter = Meter(W)
    timer = type("Timer", (StepTimer, TrainerCallback), {})(meter)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**trainer_common_args(out, W + S, n), beta=0.1, loss_type=["sigmoid"],
                         precompute_ref_log_probs=False, max_length=None, gradient_checkpointing=checkpointing)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok,
                             callbacks=[timer])
        ds = trainer.train_dataset
        lens = sorted({(len(ds[i]["prompt_ids"]), len(ds[i]["chosen_ids"]), len(ds[i]["rejected_ids"]))
                       for i in range(len(ds))})
        trainer.train()
    return meter.result(tokens_per_step=2 * n * (shape["prompt"] + shape["answer"]), trl_lengths=lens,
                        optim=str(args.optim))
