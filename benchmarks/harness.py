"""What every measurement shares: the bench model, memory and timing meters (inside a measurement
subprocess), model loaders, and spawn(), which runs one measurement in a fresh `bench.py --_case` subprocess.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from kernels.bench import proc_status, reset_peak_rss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BENCH_MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=32, sliding_window=4096,
                   max_position_embeddings=4096, dtype="float32")
MIB = 2**20
LR = 2e-5
SEED = 0


# -----------------------------------------------------------------------------
# Timing and memory of one measurement (inside its subprocess); the RSS readers are kernels/bench.py's


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
# TRL runs (sft, dpo)


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


# -----------------------------------------------------------------------------
# The parent's side: one measurement per subprocess


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
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--_case", spec], capture_output=True, text=True,
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


def fmt(x, spec=".2f", suffix="x"):
    return "n/a" if x is None else f"{x:{spec}}{suffix}"
