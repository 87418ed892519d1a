"""End-to-end benchmarks: our stages against transformers and TRL on the same model, weights, shapes, seeds
and dtype, in one run. Prints tables of medians and ratios (results: BENCHMARKS.md).

    python bench.py [sft sft_chat dpo dpo_mem generate checkpoint gpu ...] [--reps 3] [--json results.json]

No workload named = all of them. The peers are for benchmarking only (not in requirements.txt):

    pip install trl==1.16.0 accelerate==1.15.0 datasets==5.2.0

A peer that is not installed is skipped with a message. Without mistral-common (the Mistral v1
tokenizer.model that TRL's DPOTrainer needs to tokenize text) the TRL DPO row is skipped too.

The "bench" model: vocab 32000, hidden 256, intermediate 896, 4 layers, 8 heads / 2 KV heads, head_dim 32,
random weights (seed 0), fp32. Ours is model.Mistral; the peer is transformers' MistralForCausalLM loaded from
the same safetensors file, attn_implementation="sdpa". On CPU torch runs with one thread per core.

Method. Every measurement runs in its own subprocess (`bench.py --_case SPEC`), so one measurement's allocator
caches and peak memory never leak into another's. Within a repetition the implementations run one after the
other, and the order is reversed every other repetition, so that load from other jobs on a shared machine hits
all of them alike. Each subprocess builds its models and data, then does warm-up steps and timed steps; the
table gives medians over the timed steps of all repetitions (see "Shared cores" for which steps).
Memory: just before the first step the subprocess resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs); after the last step
VmHWM is the peak RSS while stepping ("peak RSS", the whole process: libraries, models, optimizer, step) and
VmHWM minus the RSS before the first step is what the steps added ("step extra": gradients, optimizer state,
activations, logits). Our subprocesses never import transformers or TRL; peer subprocesses do, which shows in
"peak RSS" (not in "step extra").

Shared cores. Other people's jobs on the same cores slow every measurement, and with OpenMP's default spinning
threads a busy core can slow a 2-thread run down 5-20x. So the measurement subprocesses run with
OMP_WAIT_POLICY=PASSIVE (--omp_wait_policy=default to turn that off), each measurement first waits up to
--quiet_wait seconds for the cores to go idle, and every table has an "other load" column: the CPU other
processes used during each step, in cores (from /proc/stat minus our own CPU time). A step during which they
used less than QUIET cores is quiet; when every implementation of a table has at least two quiet steps, its
medians and ratios use only those, otherwise all steps (the table says which). The targets table also gives the
ratios of the fastest steps (the least disturbed ones).
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

BENCH_MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=32, sliding_window=4096,
                   max_position_embeddings=4096, dtype="float32")
MIB = 2**20
QUIET = 0.25          # a step during which other processes used less than this many cores counts as quiet
LR = 2e-5
SEED = 0

PEERS_HINT = "pip install trl==1.16.0 accelerate==1.15.0 datasets==5.2.0"

# -----------------------------------------------------------------------------
# Memory and timing helpers (used inside a measurement subprocess)


def proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS. Returns the current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        print("warning: cannot reset VmHWM; peaks include the setup", file=sys.stderr)
    return proc_status("VmRSS")


class Meter:
    """Wraps the steps of one measurement: start() right before the first step, then step() after each."""

    def __init__(self, warmup):
        self.warmup, self.ends, self.loads = warmup, [], []

    def start(self):
        self.rss0 = reset_peak_rss()
        self.t, self.busy, self.own = time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds()

    def step(self):
        # Also the CPU that other processes used during this step, in cores (the machine is shared).
        now, busy, own = time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds()
        self.ends.append(now - self.t)
        self.loads.append(max(0.0, (busy - self.busy) - (own - self.own)) / (now - self.t))
        self.t, self.busy, self.own = now, busy, own

    def result(self, **extra):
        W = self.warmup
        return dict(times=self.ends[W:], loads=self.loads[W:], warmup_times=self.ends[:W], peak=proc_status("VmHWM"),
                    extra=proc_status("VmHWM") - self.rss0, **extra)


def cpu_busy_seconds():
    # Busy CPU time of the whole machine, all processes (first line of /proc/stat, in USER_HZ ticks).
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")       # minus idle and iowait


def own_cpu_seconds():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def set_threads():
    torch.set_num_threads(os.cpu_count() or 1)


def load_ours(weights, requires_grad=True):
    from model import Mistral
    m = Mistral.from_pretrained(weights, dtype=torch.float32)
    return m.train() if requires_grad else m.eval().requires_grad_(False)


def load_hf(weights, train=True):
    from transformers import MistralForCausalLM
    m = MistralForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation="sdpa")
    return m.train() if train else m.eval().requires_grad_(False)


def ours_fsdp(weights):
    # What sft.py / dpo.py build: a one-rank process group and common.build_model's FSDP2 wrapping.
    import common
    d = common.setup_dist("cpu")
    model, _ = common.build_model(weights, d, mixed_precision=False)
    model.train()
    return model, d


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


class StepTimer:
    """A transformers TrainerCallback (duck-typed) that feeds a Meter: the time between two on_step_end calls is
    everything the trainer does for one optimizer step (data loading, collation, forward, backward, clipping,
    optimizer, scheduler, metric bookkeeping)."""

    def __init__(self, meter):
        self.meter = meter

    def on_train_begin(self, *a, **k):
        self.meter.start()

    def on_step_end(self, *a, **k):
        self.meter.step()

    def __getattr__(self, name):            # every other callback event: do nothing
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def trainer_common_args(out_dir, steps, batch):
    return dict(output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                max_steps=steps, learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
                logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=SEED)


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


def mistral_tokenizer():
    """transformers' tokenizer for the real Mistral v1 vocabulary (shipped in mistral-common), written by our
    data.tokenizer.Tokenizer.save_pretrained, which makes transformers encode exactly as we do."""
    import mistral_common
    from transformers import AutoTokenizer
    from data.tokenizer import Tokenizer
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    with tempfile.TemporaryDirectory() as d:
        Tokenizer(path).save_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "right"
    return tok


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
# Generation: batch 8, 32-token prompts, exactly 128 new tokens, sampling, KV cache


GEN = dict(batch=8, prompt=32, new=128, warmup=1, steps=2)


def case_generate(impl, weights):
    B, P, N = GEN["batch"], GEN["prompt"], GEN["new"]
    prompts = torch.randint(3, BENCH_MODEL["vocab_size"], (B, P), generator=torch.Generator().manual_seed(SEED))
    meter = Meter(GEN["warmup"])
    if impl == "ours":
        model = load_ours(weights, requires_grad=False)
        meter.start()
        for i in range(GEN["warmup"] + GEN["steps"]):
            # eos_id=-1 never occurs: exactly N tokens per row.
            out = model.generate(prompts.tolist(), N, temperature=1.0, eos_id=-1,
                                 generator=torch.Generator().manual_seed(i))
            assert all(len(o) == N for o in out)
            meter.step()
    else:
        model = load_hf(weights, train=False)
        meter.start()
        for i in range(GEN["warmup"] + GEN["steps"]):
            torch.manual_seed(i)
            with torch.no_grad():
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, min_new_tokens=N,
                                     pad_token_id=0)
            assert out.shape == (B, P + N)
            meter.step()
    return meter.result(tokens_per_step=B * N)


# -----------------------------------------------------------------------------
# Checkpoint: save + load of the bench model (safetensors on both sides)


CKPT = dict(warmup=1, steps=3)


def case_checkpoint(impl, weights):
    meter = Meter(CKPT["warmup"])
    if impl == "ours":
        from model import Mistral
        model = load_ours(weights, requires_grad=False)
        save = lambda path: model.save_pretrained(path)                                   # noqa: E731
        load = lambda path: Mistral.from_pretrained(path, dtype=torch.float32)            # noqa: E731
    else:
        from transformers import MistralForCausalLM
        model = load_hf(weights, train=False)
        save = lambda path: model.save_pretrained(path)                                   # noqa: E731
        load = lambda path: MistralForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    save_t, load_t = [], []
    with tempfile.TemporaryDirectory() as d:
        meter.start()
        for i in range(CKPT["warmup"] + CKPT["steps"]):
            path = os.path.join(d, f"ckpt{i}")
            t0 = time.perf_counter()
            save(path)
            t1 = time.perf_counter()
            loaded = load(path)
            t2 = time.perf_counter()
            save_t.append(t1 - t0)
            load_t.append(t2 - t1)
            del loaded
            meter.step()
    W = CKPT["warmup"]
    return meter.result(save_times=save_t[W:], load_times=load_t[W:])


# -----------------------------------------------------------------------------
# GPU: 1-GPU SFT throughput of the ~1B preset (bf16 mixed precision, FSDP2 on one rank, as sft.py runs it)


GPU_SFT = dict(batch=4, seq=2048, warmup=3, steps=10)


def case_gpu_sft(impl, weights):
    import common
    d = common.setup_dist("cuda")
    model, mcfg = common.build_model("scratch", d, model_preset="mistral-1b", seed=SEED, mixed_precision=True)
    opt = common.make_optimizer(model, LR, device_type="cuda")
    B, T, W, S = GPU_SFT["batch"], GPU_SFT["seq"], GPU_SFT["warmup"], GPU_SFT["steps"]
    g = torch.Generator().manual_seed(SEED)
    times = []
    for step in range(W + S):
        ids = torch.randint(3, mcfg.vocab_size, (B, T), generator=g).to(d.device)
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        batch = {"input_ids": ids, "targets": targets, "segment_ids": torch.zeros_like(ids)}  # packed rows
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.set_requires_gradient_sync(True)
        mask = (targets != -100).float()
        nll = -model(**batch, expected_grad=-mask).sum()
        (nll / mask.sum()).backward()
        loss = nll.item() / float(mask.sum())
        common.optimizer_step(model, opt, 1.0, step, loss, None)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tps = B * T / statistics.median(times[W:])
    peak = common.peak_flops(d.device)
    mfu = common.flops_per_token(mcfg, T) * tps / peak if peak else None
    return dict(times=times[W:], warmup_times=times[:W], tokens_per_step=B * T, tokens_per_s=tps, mfu=mfu,
                params=mcfg.num_params(), gpu=torch.cuda.get_device_name(), loads=[0.0] * S,
                peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30, peak=proc_status("VmHWM"), extra=0)


CASES = {"sft": case_sft, "sft_chat": lambda impl, w: case_sft(impl, w, chat=True), "dpo": lambda impl, w: case_dpo(impl, w, DPO),
         "dpo_mem": lambda impl, w: case_dpo(impl, w, DPO_MEM), "generate": case_generate,
         "checkpoint": case_checkpoint, "gpu_sft": case_gpu_sft}


def run_case(spec):
    set_threads()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = CASES[spec["workload"]](spec["impl"], spec["weights"])
    print("RESULT " + json.dumps(res))


# -----------------------------------------------------------------------------
# The parent: spawn measurements, alternate, print tables


def have(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return missing


# workload -> [(impl, label, python modules it needs)]
TRL = ["transformers", "trl", "datasets", "accelerate"]
IMPLS = {
    "sft": [("ours", "sft.py's micro-step (segment ids), plain Mistral module", []),
            ("ours-fsdp", "same, FSDP2-wrapped on 1 rank (as sft.py runs)", []),
            ("hf", "transformers MistralForCausalLM, torch loop", ["transformers"]),
            ("trl", "TRL SFTTrainer, its defaults (gradient checkpointing on)", TRL),
            ("trl-nockpt", "TRL SFTTrainer, gradient_checkpointing=False", TRL)],
    "sft_chat": [("ours", "sft.py's micro-step, loss on assistant tokens (54%)", []),
                 ("ours-fsdp", "same, FSDP2-wrapped on 1 rank (as sft.py runs)", []),
                 ("hf", "transformers, torch loop, labels -100 off the assistant tokens", ["transformers"])],
    "dpo": [("ours", "dpo.py step, reference log-probs precomputed (its default)", []),
            ("ours-live", "dpo.py step, live reference forward (--reference=live)", []),
            ("hf", "transformers, full logits, live reference", ["transformers"]),
            ("trl", "TRL DPOTrainer, live reference, its defaults (grad. ckpt on)", TRL + ["mistral_common"]),
            ("trl-nockpt", "TRL DPOTrainer, live reference, gradient_checkpointing=False",
             TRL + ["mistral_common"])],
    "dpo_mem": [("ours", "dpo.py step, fused log-probs, reference precomputed", []),
                ("ours-logits", "our model, full (B,T,V) logits, reference precomputed", []),
                ("hf-precomputed", "transformers, full logits, reference precomputed", ["transformers"])],
    "generate": [("ours", "Mistral.generate", []),
                 ("hf", "transformers generate", ["transformers"])],
    "checkpoint": [("ours", "Mistral.save_pretrained + from_pretrained", []),
                   ("hf", "transformers save_pretrained + from_pretrained", ["transformers"])],
}
WORKLOADS = ["sft", "sft_chat", "dpo", "dpo_mem", "generate", "checkpoint", "gpu"]


def wait_for_quiet(max_wait, threshold=0.3):
    """The cores are shared with other people's jobs: wait (at most max_wait s) until they use less than
    `threshold` cores over one second. Returns the foreign load last seen, in cores."""
    deadline = time.perf_counter() + max_wait
    while True:
        b0, t0 = cpu_busy_seconds(), time.perf_counter()
        time.sleep(1.0)
        load = (cpu_busy_seconds() - b0) / (time.perf_counter() - t0)
        if load < threshold or time.perf_counter() > deadline:
            return load


def spawn(workload, impl, weights, timeout=900, quiet_wait=0):
    """One measurement in a fresh subprocess; returns its result dict, or None (after printing why) if it failed."""
    if quiet_wait:
        wait_for_quiet(quiet_wait)
    spec = json.dumps(dict(workload=workload, impl=impl, weights=weights))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", WANDB_DISABLED="true",
               PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_case", spec], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        print(f"  ! {workload}/{impl} failed (exit {p.returncode}):\n{tail}", flush=True)
        return None
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall"] = wall
    return res


def measure(workload, weights, reps, quiet_wait):
    impls = []
    for impl, label, needs in IMPLS[workload]:
        missing = have(*needs)
        if missing:
            print(f"  skipped {impl} ({label}): {', '.join(missing)} not installed; {PEERS_HINT}"
                  + (" mistral-common" if "mistral_common" in missing else ""), flush=True)
        else:
            impls.append((impl, label))
    runs = {impl: [] for impl, _ in impls}
    for rep in range(reps):
        order = impls if rep % 2 == 0 else impls[::-1]
        for impl, _ in order:
            res = spawn(workload, impl, weights, quiet_wait=quiet_wait)
            if res is not None:
                runs[impl].append(res)
                print(f"  rep {rep + 1}/{reps} {impl:<15} step s (other load, cores): "
                      + " ".join(f"{t:.3f} ({x:.1f})" for t, x in zip(res["times"], res["loads"]))
                      + f"; peak RSS {res['peak'] / MIB:.0f} MiB ({res['wall']:.0f} s wall)", flush=True)
    labels = dict(impls)
    summary = {}
    for impl, rs in runs.items():
        if not rs:
            continue
        times = [t for r in rs for t in r["times"]]
        loads = [x for r in rs for x in r["loads"]]
        quiet = [t for t, x in zip(times, loads) if x < QUIET]
        s = dict(label=labels[impl], all=statistics.median(times), min=min(times), max=max(times), n=len(times),
                 quiet=statistics.median(quiet) if len(quiet) >= 2 else None, n_quiet=len(quiet),
                 foreign=statistics.median(loads), peak=statistics.median(r["peak"] for r in rs),
                 extra=statistics.median(r["extra"] for r in rs), raw=rs)
        summary[impl] = s
    # One basis per table: the medians of the quiet steps if every implementation had at least two, else of all.
    basis = "quiet" if summary and all(s["quiet"] is not None for s in summary.values()) else "all"
    for s in summary.values():
        s["basis"], s["median"] = basis, s[basis]
        rs = s["raw"]
        if "tokens_per_step" in rs[0]:
            s["tokens_per_s"] = rs[0]["tokens_per_step"] / s["median"]
        for key in ("save_times", "load_times"):
            if key in rs[0]:
                s[key] = statistics.median(t for r in rs for t in r[key])
        for key in ("trl_lengths", "optim"):
            if key in rs[0]:
                s[key] = rs[0][key]
    return summary


def speed(s, ours, peer, key="median"):
    # > 1: ours is faster. "median" is the table's basis (quiet or all steps); "min" compares the fastest steps.
    if ours in s and peer in s:
        return s[peer][key] / s[ours][key]
    return None


def both(s, ours, peer, invert=False):
    # "median ratio (fastest-step ratio)" for the targets table.
    x, y = speed(s, ours, peer), speed(s, ours, peer, "min")
    if invert:
        x, y = (None if v is None else 1 / v for v in (x, y))
    return x, f"{fmt(x)} (fastest: {fmt(y)})"


def mem(s, ours, peer, key="extra"):
    # < 1: ours uses less.
    if ours in s and peer in s and s[peer][key] > 0:
        return s[ours][key] / s[peer][key]
    return None


def fmt(x, spec=".2f", suffix="x"):
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def print_table(title, s, cols):
    """cols: list of (header, function (impl, summary row) -> str)."""
    basis = next(iter(s.values()))["basis"] if s else "all"
    print(f"\n{title}")
    if basis == "quiet":
        print(f"medians (and ratios) over quiet steps: other jobs used < {QUIET} cores during the step")
    else:
        print("medians (and ratios) over all steps: some implementation had fewer than 2 quiet steps")
    cols = cols + [("all-steps median", lambda i, r: f"{1e3 * r['all']:.0f} ms"),
                   ("quiet steps", lambda i, r: f"{r['n_quiet']}/{r['n']}"),
                   ("other load (cores)", lambda i, r: f"{r['foreign']:.2f}")]
    heads = ["impl", "what"] + [h for h, _ in cols]
    rows = [[impl, r["label"]] + [f(impl, r) for _, f in cols] for impl, r in s.items()]
    widths = [max(len(x) for x in col) for col in zip(heads, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)   # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(line(heads))
    print("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    for r in rows:
        print(line(r))


def header():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = [f"torch {torch.__version__}"]
    for m in ("transformers", "trl", "accelerate", "datasets"):
        try:
            versions.append(f"{m} {__import__(m).__version__}")
        except ImportError:
            versions.append(f"{m} not installed")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout
        commit += " (+ uncommitted changes)" if dirty.strip() else ""
    except OSError:
        commit = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch threads {os.cpu_count()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; GPU: {gpu}")
    print(" | ".join(versions) + f" | python {platform.python_version()}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')} | commit {commit}")


def report(workload, s, targets):
    ms = lambda i, r: f"{1e3 * r['median']:.0f} ms"                                         # noqa: E731
    spread = lambda i, r: f"{1e3 * r['min']:.0f}-{1e3 * r['max']:.0f}"                       # noqa: E731
    rss = lambda i, r: f"{r['peak'] / MIB:.0f}"                                              # noqa: E731
    extra = lambda i, r: f"{r['extra'] / MIB:.0f}"                                           # noqa: E731
    tps = lambda i, r: f"{r['tokens_per_s']:.0f}"                                            # noqa: E731
    faster = lambda i, r: fmt(speed(s, "ours", i))                                          # noqa: E731
    if workload in ("sft", "sft_chat"):
        what = "every position a target" if workload == "sft" else \
            f"2 packed examples per row, loss on the assistant tokens ({int(chat_layout(SFT['seq'])[1].sum())} of {SFT['seq']})"
        print_table(f"SFT step: batch {SFT['batch']} x {SFT['seq']} tokens, {what}, fwd + bwd + clip + AdamW, fp32; "
                    f"{SFT['warmup']} warm-up + {SFT['steps']} timed steps per rep", s,
                    [("tokens/s", tps), ("step (median)", ms), ("min-max ms", spread), ("peak RSS MiB", rss),
                     ("step extra MiB", extra), ("speed ours / this", faster)])
        for ours in ("ours", "ours-fsdp"):
            for peer, want in (("hf", 1.3), ("trl", 2.0), ("trl-nockpt", 2.0)):
                x, txt = both(s, ours, peer)
                if peer in s:
                    targets.append((f"{'SFT' if workload == 'sft' else 'chat SFT'} tokens/s, {ours} / {peer}",
                                    f">= {want}x", txt, x is not None and x >= want))
    elif workload in ("dpo", "dpo_mem"):
        shape = DPO if workload == "dpo" else DPO_MEM
        title = (f"DPO step: {shape['pairs']} pairs, {shape['prompt']}-token prompt + {shape['answer']}-token answers "
                 f"(2 x {shape['pairs']} rows of {shape['prompt'] + shape['answer']}), sigmoid, beta 0.1, "
                 f"fwd + bwd + clip + AdamW, fp32; {shape['warmup']} warm-up + {shape['steps']} timed steps per rep")
        if workload == "dpo_mem":
            title = "DPO memory at scale (issue 6): " + title
        slower = lambda i, r: fmt(None if speed(s, "ours", i) is None else 1 / speed(s, "ours", i))  # noqa: E731
        print_table(title, s, [("step (median)", ms), ("min-max ms", spread), ("peak RSS MiB", rss),
                               ("step extra MiB", extra), ("time ours / this", slower),
                               ("step extra ours / this", lambda i, r: fmt(mem(s, "ours", i))),
                               ("peak RSS ours / this", lambda i, r: fmt(mem(s, "ours", i, "peak")))])
        if workload == "dpo":
            if "trl" in s:
                print(f"TRL's tokenized lengths (prompt, chosen, rejected): {s['trl'].get('trl_lengths')}")
            for peer in ("trl", "trl-nockpt"):
                for ours in ("ours", "ours-live"):
                    t, txt = both(s, ours, peer, invert=True)
                    targets.append((f"DPO step time, {ours} / {peer}", "<= 0.7x", txt, t is not None and t <= 0.7))
                for ours in ("ours", "ours-live"):
                    for key, what in (("extra", "step extra"), ("peak", "peak RSS")):
                        m = mem(s, ours, peer, key)
                        targets.append((f"DPO {what}, {ours} / {peer}", "<= 0.5x", fmt(m), m is not None and m <= 0.5))
        else:
            for peer in ("ours-logits", "hf-precomputed"):
                for key, what in (("extra", "step extra"), ("peak", "peak RSS")):
                    m = mem(s, "ours", peer, key)
                    targets.append((f"DPO@1024 {what}, ours / {peer}", "<= 0.5x", fmt(m), m is not None and m <= 0.5))
    elif workload == "generate":
        print_table(f"Generation: batch {GEN['batch']}, {GEN['prompt']}-token prompts, exactly {GEN['new']} new "
                    f"tokens, sampling (temperature 1), KV cache, fp32; {GEN['warmup']} warm-up + {GEN['steps']} "
                    "timed runs per rep", s,
                    [("new tokens/s", tps), ("run (median)", ms), ("min-max ms", spread),
                     ("ms / decode step", lambda i, r: f"{1e3 * r['median'] / GEN['new']:.2f}"),
                     ("peak RSS MiB", rss), ("speed ours / this", faster)])
        x, txt = both(s, "ours", "hf")
        targets.append(("generation tokens/s, ours / hf", ">= 1.5x", txt, x is not None and x >= 1.5))
    elif workload == "checkpoint":
        print_table(f"Checkpoint: save + load of the bench model ({num_params() / 1e6:.1f}M params, fp32, "
                    f"safetensors); {CKPT['warmup']} warm-up + {CKPT['steps']} timed rounds per rep", s,
                    [("save (median)", lambda i, r: f"{1e3 * r['save_times']:.0f} ms"),
                     ("load (median)", lambda i, r: f"{1e3 * r['load_times']:.0f} ms"),
                     ("save + load", ms), ("min-max ms", spread), ("speed ours / this", faster)])
        x, txt = both(s, "ours", "hf")
        targets.append(("checkpoint save + load, speed ours / hf", "(none)", txt, None))


def num_params():
    from model import MistralConfig
    return MistralConfig(**BENCH_MODEL).num_params()


GPU_STAGE_STEPS = 6   # optimizer steps of sft.py and dpo.py in `bench.py gpu` (the first 2 are warm-up)


def gpu_correctness():
    """Our CUDA kernels against torch references in bf16: values and gradients. Returns rows of (what, max error)."""
    import torch.nn.functional as F
    from kernels.attention import flash_attention
    from kernels.logprobs import reference_token_logprobs, token_logprobs
    g = torch.Generator(device="cuda").manual_seed(SEED)
    rows = []
    for T, window in ((2048, None), (2048, 512)):
        q = torch.randn(2, 32, T, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        k = torch.randn(2, 8, T, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        v = torch.randn(2, 8, T, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        do = torch.randn(2, 32, T, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        i = torch.arange(T, device="cuda")
        mask = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :] < window) if window else True)
        ref = F.scaled_dot_product_attention(*(x.float() for x in (q, k, v)), attn_mask=mask, enable_gqa=True)
        ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
        out = flash_attention(q, k, v, causal=True, sliding_window=window)
        grads = torch.autograd.grad(out, (q, k, v), do)
        rows.append((f"attention T={T} window={window}: output", (out.float() - ref).abs().max().item()))
        for name, a, b in zip("qkv", grads, ref_grads):
            rows.append((f"attention T={T} window={window}: d{name}", (a.float() - b).abs().max().item()))
    N, D, V = 4096, 4096, 32000
    h = (torch.randn(N, D, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    ref = reference_token_logprobs(h, w, t)
    rg = torch.autograd.grad(ref.sum(), (h, w))
    out = token_logprobs(h, w, t)
    og = torch.autograd.grad(out.sum(), (h, w))
    rows.append(("log-probs N=4096 D=4096 V=32000: values", (out - ref).abs().max().item()))
    rows.append(("log-probs: d hidden", (og[0].float() - rg[0].float()).abs().max().item()))
    rows.append(("log-probs: d weight", (og[1].float() - rg[1].float()).abs().max().item()))
    return rows


def gpu_stage_runs(tmp):
    """sft.py, then dpo.py from its export, for GPU_STAGE_STEPS steps on the ~1B preset (1 GPU, bf16, seq 2048,
    micro batch 4, checkpointing off), on random tokens. Returns per stage the median tokens/s, MFU, peak memory
    (torch.cuda.max_memory_allocated) and the memory plan's peak."""
    import numpy as np
    import memplan
    import model as M
    from data.shards import ShardWriter
    try:
        import mistral_common
        tok = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    except ImportError:
        return {"skipped": "mistral-common is not installed (sft.py needs a 32000-piece tokenizer.model)"}
    rng = np.random.default_rng(SEED)
    for name, n, lo, hi in (("sft", 200, 300, 1200), ("dpo", 200, 400, 900)):
        for split in ("train", "test"):
            with ShardWriter(os.path.join(tmp, name), split, 32000) as wr:
                for _ in range(n if split == "train" else 16):
                    L = int(rng.integers(lo, hi))
                    ids = rng.integers(3, 32000, L)
                    wr.add(ids, (np.arange(L) >= L // 3).astype(np.uint8))
                wr.close({"tokenizer": tok})
    common_args = ["--micro_batch_size=4", f"--max_steps={GPU_STAGE_STEPS}", "--eval_every=0", "--ckpt_every=0",
                   f"--tokenizer={tok}", "--warmup_ratio=0"]
    runs = {"sft": ["sft.py", "--init_from=scratch", "--model_preset=mistral-1b", f"--data_dir={tmp}/sft",
                    f"--out_dir={tmp}/out_sft", "--seq_len=2048", "--global_batch_size=4", *common_args],
            "dpo": ["dpo.py", f"--init_from={tmp}/out_sft/hf", f"--data_dir={tmp}/dpo", f"--out_dir={tmp}/out_dpo",
                    "--global_batch_size=4", *common_args]}
    out = {}
    for stage, cmd in runs.items():
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            out[stage] = {"error": (p.stdout + p.stderr)[-3000:]}
            continue
        with open(os.path.join(tmp, f"out_{stage}", "metrics.jsonl")) as f:
            recs = [json.loads(x) for x in f][2:]
        mcfg = M.config_from_preset("mistral-1b")
        mod = importlib.import_module(stage)
        import common
        tcfg = common.parse_config(mod.Config, cmd[1:])
        seq = 2048 if stage == "sft" else 900
        plan = memplan.plan(mcfg, tcfg, 1, "cuda", stage, seq)["peak"]
        if stage == "sft":
            tps, mfu = statistics.median(r["tokens_per_s"] for r in recs), statistics.median(r["mfu"] for r in recs)
        else:  # dpo.py logs pairs/s: 2 examples of 650 tokens on average (uniform 400..900), padding not counted
            tps = statistics.median(r["pairs_per_s"] for r in recs) * 2 * 650
            peak_flops = common.peak_flops(torch.device("cuda"))
            mfu = common.flops_per_token(mcfg, 650) * tps / peak_flops if peak_flops else None
        peak = max(r.get("peak_mem_gb", 0) for r in recs) * 2**30
        out[stage] = dict(tokens_per_s=tps, mfu=mfu, peak_gib=peak / 2**30, plan_gib=plan / 2**30,
                          pairs_per_s=statistics.median(r["pairs_per_s"] for r in recs) if stage == "dpo" else None)
    return out


def run_gpu(out_dir="out/bench_gpu"):
    """`python bench.py gpu`: what a user with a GPU runs first. Kernel correctness (bf16, against torch), the kernel
    tables of kernels.bench, one-GPU throughput of the ~1B preset, and sft.py and dpo.py for a few steps with
    peak memory against memplan's plan. Writes out_dir/bench_gpu.json and bench_gpu.md."""
    print("\nGPU")
    if not torch.cuda.is_available():
        print("skipped: torch.cuda.is_available() is False (no GPU on this machine)")
        return
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "time": datetime.datetime.now().isoformat(timespec="seconds")}
    res["correctness"] = gpu_correctness()
    print("| kernel check (bf16, vs torch in fp32) | max abs error |\n|---|---:|")
    for what, err in res["correctness"]:
        print(f"| {what} | {err:.3g} |")
    p = subprocess.run([sys.executable, "-m", "kernels.bench"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    res["kernels_bench"] = p.stdout if p.returncode == 0 else p.stderr[-3000:]
    print(res["kernels_bench"].rstrip())
    sft_step = spawn("gpu_sft", "ours", "", timeout=900)
    if sft_step is not None:
        res["sft_step"] = {k: sft_step[k] for k in ("tokens_per_s", "mfu", "peak_gpu_gib", "params")}
        print(f"\n1-GPU SFT step, preset mistral-1b ({sft_step['params'] / 1e9:.2f}B params), batch {GPU_SFT['batch']} x "
              f"{GPU_SFT['seq']}, bf16, FSDP2 on 1 rank: {sft_step['tokens_per_s']:.0f} tokens/s, MFU "
              f"{fmt(sft_step['mfu'], '.1%', '')}, peak {sft_step['peak_gpu_gib']:.1f} GiB")
    with tempfile.TemporaryDirectory() as tmp:
        res["stages"] = gpu_stage_runs(tmp)
    md = ["| stage (mistral-1b, 1 GPU, micro batch 4) | tokens/s | MFU | peak GiB | plan GiB | peak / plan |",
          "|---|---:|---:|---:|---:|---:|"]
    for stage, r in res["stages"].items():
        if isinstance(r, dict) and "peak_gib" in r:
            md.append(f"| {stage}.py | {fmt(r['tokens_per_s'], '.0f', '')} | {fmt(r['mfu'], '.1%', '')} | "
                      f"{r['peak_gib']:.1f} | {r['plan_gib']:.1f} | {r['peak_gib'] / r['plan_gib']:.2f} |")
        else:
            md.append(f"| {stage}.py | {r if isinstance(r, str) else str(r)[:300]} | | | | |")
    print("\n" + "\n".join(md))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "bench_gpu.md"), "w") as f:
        f.write(f"GPU check on {res['gpu']}, torch {res['torch']}, {res['time']}\n\n| kernel check | max abs error |\n"
                "|---|---:|\n" + "".join(f"| {w} | {e:.3g} |\n" for w, e in res["correctness"]) + "\n" + "\n".join(md) + "\n")
    print(f"wrote {out_dir}/bench_gpu.json and bench_gpu.md")


def main(argv):
    if argv[:1] == ["--_case"]:
        run_case(json.loads(argv[1]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workloads", nargs="*", help=f"any of {WORKLOADS} (default: all)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; each is one subprocess per implementation")
    ap.add_argument("--quiet_wait", type=float, default=5.0,
                    help="before each measurement, wait up to this many seconds for other jobs to leave the cores idle")
    ap.add_argument("--omp_wait_policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                    help="OMP_WAIT_POLICY of the measurements (default PASSIVE: see BENCHMARKS.md on shared cores)")
    ap.add_argument("--json", default="", help="also write all raw measurements to this file")
    a = ap.parse_args(argv)
    unknown = [w for w in a.workloads if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {unknown}; choose from {WORKLOADS}")
    workloads = a.workloads or WORKLOADS
    if a.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy       # inherited by every measurement subprocess
    header()
    print(f"command: python bench.py {' '.join(argv)}".rstrip())
    print("ratios: speed = peer time / our time (> 1: ours faster); memory = ours / peer (< 1: ours smaller)")
    from model import Mistral, MistralConfig
    results, targets = {}, []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "bench")
        m = Mistral(MistralConfig(**BENCH_MODEL))
        m.init_weights(seed=SEED)
        m.save_pretrained(weights)
        del m
        for w in workloads:
            if w == "gpu":
                run_gpu()
                continue
            print(f"\n[{w}] running ({a.reps} reps)...", flush=True)
            s = measure(w, weights, a.reps, a.quiet_wait)
            results[w] = s
            report(w, s, targets)
    if targets:
        print("\nTargets")
        print("| target | wanted | measured | met |")
        print("|---|---:|---:|:---:|")
        for name, want, got, ok in targets:
            print(f"| {name} | {want} | {got} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
