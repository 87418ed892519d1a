"""DPO workloads of bench.py: `dpo`, `dpo_mem` (1024-token sequences) and `dpo_packed` (dpo.py's packed
prompt-shared layout against its padded one and TRL, on UltraFeedback-shaped pairs)."""

import os
import tempfile

import torch

from benchmarks.harness import (BENCH_MODEL, ROOT, SEED, Meter, StepTimer, load_hf, load_ours, mistral_tokenizer,
                                trainer_common_args)

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


# -----------------------------------------------------------------------------
# Packed DPO (issue 27) on UltraFeedback-shaped pairs: generated text with UltraFeedback's lengths (REFERENCE.md:
# median prompt + answer ~409 Mistral tokens, prompt : answer ~0.42, long tails), through data/ultrafeedback/
# prepare.py (Zephyr template, Mistral v1 tokenizer, TRL's truncation at max_length 1024 / max_prompt_length 512).
# A step is 16 pairs in micro-steps of 4: config/dpo_public.json's share of one rank (128 pairs over 8 ranks).

DPO_PACKED = dict(pairs=16, micro=4, warmup=1, steps=2, n_train=2048, n_test=64)
# Log-normal word counts (the generated words are one Mistral token each) with median example (prompt + answer,
# after prepare.py) ~409 tokens and median prompt : median answer ~0.42: prompts of ~80-85 words (+26 template
# tokens: the Zephyr rendering with its empty system turn), answers of ~255-262 words (+ </s>), each answer
# drawn on its own. How much padding costs depends on the tails, which REFERENCE.md does not give: two widths.
UF_SHAPES = {"long tails": dict(prompt_words=80, prompt_sigma=1.0, answer_words=255, answer_sigma=0.8),
             "moderate tails": dict(prompt_words=85, prompt_sigma=0.9, answer_words=262, answer_sigma=0.55)}


def uf_rows(n, seed, shape):
    """n ultrafeedback_binarized rows (prompt_id, chosen, rejected, scores) of generated English words."""
    import numpy as np
    g = np.random.default_rng(seed)
    words = np.array(WORDS)

    def text(median, sigma):
        return " ".join(g.choice(words, max(1, int(round(median * np.exp(sigma * g.standard_normal()))))))

    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": text(shape["prompt_words"], shape["prompt_sigma"])}]
        answers = [text(shape["answer_words"], shape["answer_sigma"]) for _ in range(2)]
        rows.append({"prompt_id": f"uf-{seed}-{i}", "score_chosen": 8.0, "score_rejected": 4.0,
                     "chosen": prompt + [{"role": "assistant", "content": answers[0]}],
                     "rejected": prompt + [{"role": "assistant", "content": answers[1]}]})
    return rows


def mistral_tokenizer_model():
    import mistral_common
    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


def uf_data(directory, shape="long tails", n_train=DPO_PACKED["n_train"], n_test=DPO_PACKED["n_test"]):
    """The pairs' shards in `directory` (built once: prepare.py on uf_rows, seeded); returns the directory."""
    import json
    from data.ultrafeedback.prepare import prepare
    if not os.path.exists(os.path.join(directory, "test.json")):
        os.makedirs(directory, exist_ok=True)
        tokenizer = mistral_tokenizer_model()
        for split, n, seed in (("train", n_train, SEED), ("test", n_test, SEED + 1)):
            path = os.path.join(directory, f"{split}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in uf_rows(n, seed, UF_SHAPES[shape]))
            prepare([path], tokenizer, directory, split)
    return directory


def uf_layout(directory, split="train"):
    """dpo.py's Layout of a split, pack_length as dpo.py picks it (the longest pair rounded up to 128)."""
    import dpo
    from data.shards import Shards
    shards = Shards(directory, split)
    layout = dpo.Layout(shards)
    layout.pack_length = -(-int(layout.lengths.max()) // 128) * 128
    return shards, layout


def positions_per_pair(layout, global_batch, world, micro, seed=SEED):
    """Positions the forward passes compute per pair, over the split's pairs in seeded steps of global_batch pairs,
    in three layouts: padded (dpo.py --packing=false: each micro-step 2 x micro rows as long as its longest
    example), packed without sharing (prompt + chosen and prompt + rejected as two segments, best-fit into rows of
    pack_length: the packing effect alone) and packed with sharing (dpo.py's default). Packed micro-steps hold
    `micro` rows, each as long as the micro-step's longest row rounded up to 16, as dpo.py builds them."""
    import types
    import numpy as np
    import dpo
    P, C, R = layout.parts.T
    examples = types.SimpleNamespace(lengths=np.stack([P + C, P + R], 1).reshape(-1), pack_length=layout.pack_length)
    longest = np.maximum(P + C, P + R)  # a padded micro-step's rows are as long as its longest example
    order = np.random.default_rng(seed).permutation(len(P))
    steps = len(order) // global_batch
    out = {"padded": 0, "packed": 0, "packed+shared": 0}
    for k in range(steps):
        pairs = order[k * global_batch:(k + 1) * global_batch].tolist()
        for m in range(0, len(pairs), micro):
            out["padded"] += 2 * len(pairs[m:m + micro]) * int(longest[pairs[m:m + micro]].max())
        for name, lay, items in (("packed", examples, [2 * i + j for i in pairs for j in (0, 1)]),
                                 ("packed+shared", layout, pairs)):
            for mine in dpo.pack_step(items, lay, world, micro):
                for rows, _ in mine:
                    out[name] += len(rows) * -(-int(max(lay.lengths[row].sum() for row in rows)) // 16) * 16
    return {name: v / (steps * global_batch) for name, v in out.items()}


def case_dpo_packed(impl, weights):
    """One measurement of the dpo_packed workload: steps of 16 UltraFeedback-shaped pairs (reference log-probs
    precomputed, not timed), dpo.py's micro-steps of 4 pairs (ours) or of 4 packed rows (ours-packed), or TRL's
    DPOTrainer on the same pairs' text in the same order (4 pairs per micro-step, 4 accumulated)."""
    import numpy as np
    import common
    import dpo
    W, S, n, micro = DPO_PACKED["warmup"], DPO_PACKED["steps"], DPO_PACKED["pairs"], DPO_PACKED["micro"]
    shards, layout = uf_layout(uf_data(os.path.join(os.path.dirname(weights), "uf_long_tails")))
    step_pairs = [list(range(i * n, (i + 1) * n)) for i in range(W + S)]
    tokens = [int(layout.lengths[p].sum()) for p in step_pairs]  # each prompt once
    if impl.startswith("trl"):
        return dpo_trl_packed_pairs(weights, shards, layout, step_pairs, checkpointing=impl == "trl", tokens=tokens)
    packing = layout if impl == "ours-packed" else None
    cfg = dpo.Config(beta=0.1, loss_type="sigmoid", global_batch_size=n, micro_batch_size=micro, grad_clip=1.0)
    model, d = load_ours(weights), common.Dist(0, 1, 0, torch.device("cpu"))

    def units(pairs):
        if packing is not None:
            return dpo.pack_step(pairs, layout, 1, micro)[0]
        return [(pairs[i:i + micro], True) for i in range(0, len(pairs), micro)]

    ref_cache = np.zeros((len(shards) // 2, 2))
    model.eval()
    with torch.no_grad():
        for pairs in step_pairs:
            for unit, _ in units(pairs):
                batch, order = dpo.micro_batch(shards, unit, packing)
                s, _ = dpo.sequence_logps(model, batch)
                ref_cache[order] = s.view(2, -1).T.double().numpy()
    model.train()
    opt = common.make_optimizer(model, cfg.lr, device_type="cpu")
    meter, positions = Meter(W), []
    meter.start()
    for step, pairs in enumerate(step_pairs):
        computed = 0
        for unit, _ in units(pairs):  # dpo.py's micro-step
            *out, count = dpo.run_pairs(model, None, shards, ref_cache, unit, cfg, d, packing)
            (out[0].sum() / n).backward()
            dpo.pair_metrics(*out)
            computed += count
        common.optimizer_step(model, opt, cfg.grad_clip, step, out[0].mean().item(), None)
        positions.append(computed)
        meter.step()
    return meter.result(tokens_per_step=tokens[W], pairs_per_step=n, step_tokens=tokens[W:], positions=positions[W:])


def dpo_trl_packed_pairs(weights, shards, layout, step_pairs, checkpointing, tokens):
    # The pairs' text, decoded from the shards (prompt with its template, no BOS; answers without </s>, which TRL
    # appends), no truncation by TRL (prepare.py has done it), sequential sampling: TRL's steps see our steps' pairs.
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    tok = mistral_tokenizer()
    pairs = [i for step in step_pairs for i in step]
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in pairs:
        P = int(layout.parts[i, 0])
        (xc, _), (xr, _) = shards[2 * i], shards[2 * i + 1]
        rows["prompt"].append(tok.decode(xc[1:P].tolist()))
        for key, x in (("chosen", xc), ("rejected", xr)):
            answer = x[P:].tolist()
            rows[key].append(tok.decode(answer[:-1] if answer[-1] == tok.eos_token_id else answer))
    model, ref = load_hf(weights), load_hf(weights, train=False)
    n, micro = len(step_pairs[0]), DPO_PACKED["micro"]
    meter = Meter(DPO_PACKED["warmup"])
    timer = type("Timer", (StepTimer, TrainerCallback), {})(meter)
    with tempfile.TemporaryDirectory() as out:
        steps = trainer_common_args(out, len(step_pairs), micro)
        steps.update(gradient_accumulation_steps=n // micro, train_sampling_strategy="sequential")
        args = DPOConfig(**steps, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False, max_length=None,
                         gradient_checkpointing=checkpointing)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_dict(rows),
                             processing_class=tok, callbacks=[timer])
        ds = trainer.train_dataset
        trl_tokens = sum(len(ds[i]["prompt_ids"]) + len(ds[i]["chosen_ids"]) + len(ds[i]["rejected_ids"])
                         for i in range(len(ds)))
        trainer.train()
    ours = sum(int(layout.lengths[i].sum()) for i in pairs)
    return meter.result(tokens_per_step=tokens[DPO_PACKED["warmup"]], pairs_per_step=n,
                        step_tokens=tokens[DPO_PACKED["warmup"]:], trl_tokens=trl_tokens, our_tokens=ours)


def positions_table(workdir):
    """positions_per_pair for both shapes, at config/dpo_public.json's layout (128 pairs per step, 8 ranks, micro
    batch 4) and at one rank's share on one rank (16 pairs, as the timed steps): {(shape, layout): dict}."""
    out = {}
    for shape in UF_SHAPES:
        _, layout = uf_layout(uf_data(os.path.join(workdir, "uf_" + shape.replace(" ", "_")), shape))
        for name, (global_batch, world) in (("dpo_public (128 pairs, 8 ranks)", (128, 8)),
                                            ("one rank (16 pairs)", (16, 1))):
            r = positions_per_pair(layout, global_batch, world, DPO_PACKED["micro"])
            out[(shape, name)] = dict(r, tokens=float(layout.lengths.mean()), pack_length=layout.pack_length)
    return out


def dpo_runs_agree(weights, workdir, steps=3):
    """dpo.py --packing=true and --packing=false on the same UltraFeedback-shaped text (64 train / 16 test pairs,
    steps of 16 pairs, micro batch 4, reference precomputed): per logged metric the largest difference over the
    steps relative to the metric's largest value in the run (at step 1 the policy is the reference: rewards and
    margins are rounding noise around 0, and relative to themselves meaningless); the steps whose accuracies
    differ; the reference caches' largest relative difference; each run's losses, positions and fill."""
    import glob
    import json
    import subprocess
    import sys
    import numpy as np
    data = uf_data(os.path.join(workdir, "uf_runs"), n_train=64, n_test=16)
    runs = {}
    for packing in ("true", "false"):
        out = os.path.join(workdir, f"dpo_packing_{packing}")
        args = dict(init_from=weights, tokenizer=mistral_tokenizer_model(), data_dir=data, out_dir=out, beta=0.1,
                    lr=1e-5, warmup_ratio=0.0, global_batch_size=16, micro_batch_size=4, max_steps=steps,
                    eval_every=steps, eval_pairs=16, ckpt_every=0, export_dtype="float32", packing=packing)
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(os.cpu_count()))
        p = subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), *[f"--{k}={v}" for k, v in args.items()]],
                           capture_output=True, text=True, env=env, cwd=ROOT)
        if p.returncode != 0:
            raise RuntimeError(f"dpo.py --packing={packing} failed:\n{p.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[packing] = [json.loads(line) for line in f]

    packed, padded = runs["true"], runs["false"]
    keys = [k for k in padded[-1] if k.startswith(("loss", "rewards/", "logps/", "grad_norm", "eval_"))
            and "accuracies" not in k]
    diffs = {}
    for k in keys:
        scale = max(abs(y[k]) for y in padded if k in y)
        diffs[k] = max(abs(x[k] - y[k]) for x, y in zip(packed, padded) if k in y) / max(scale, 1e-12)
    accuracies = [(y["step"], k) for x, y in zip(packed, padded) for k in y if "accuracies" in k and x[k] != y[k]]
    caches = {}
    for split in ("train", "test"):
        a, b = (np.load(c) for c in sorted(glob.glob(os.path.join(data, f"{split}.ref_logps.*.npy"))))
        caches[split] = float(np.max(np.abs(a - b) / np.abs(b)))
    return dict(diffs=diffs, caches=caches, steps=len(padded), accuracies=accuracies,
                losses={k: [m["loss"] for m in runs[k]] for k in runs},
                positions={k: [m["positions"] for m in runs[k]] for k in runs},
                tokens=[m["tokens"] for m in padded], fill={k: [m["fill"] for m in runs[k]] for k in runs})
