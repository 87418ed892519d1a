# --rehearse_gpu=true: the GPU path on CPU. sft.py and dpo.py under TRITON_INTERPRET=1 run what CUDA runs (the
# model's attention through the Triton kernels on Mask("flash"): packed segments, GQA, sliding window; the fused
# log-prob head through Triton with its 16-bit dz; FSDP2 with bf16 compute and fp32 reductions; LoRA's bf16 base),
# held against the same runs on the fp32 torch path.
#
# The model: one decoder layer, head_dim 16 (the kernels' smallest), 2 query heads on 1 KV head, sliding window 16
# under rows of 32 tokens. The interpreter costs ~1 s per micro-step of 2 x 32 tokens at this size.
#
# Tolerances, from bf16's unit roundoff u = 2^-8: the loss (a mean of fp32 log-probs of bf16 activations) within
# u relative, the gradient norm within 4u. Updated weights: AdamW's first step moves each weight by lr * g / |g|,
# the same +-lr on both paths except where the gradient is within bf16 noise of 0 and its sign flips (measured:
# <= 0.8% of a tensor's elements), so the test counts the weights that moved differently.
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run, torchrun
from model import Mistral, MistralConfig

U = 2.0 ** -8
INTERPRET = {"TRITON_INTERPRET": "1"}
LR = 1e-2
MODEL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, sliding_window=16, max_position_embeddings=256, dtype="float32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    from data.tokenizer import Tokenizer
    from test_dpo import write_pairs
    from test_sft import write_random_shards
    root = tmp_path_factory.mktemp("rehearsal")
    model = Mistral(MistralConfig(**MODEL))
    model.init_weights(seed=1)
    model.save_pretrained(root / "hf", tokenizer=Tokenizer(tiny_tokenizer))
    write_random_shards(root / "sft")
    write_pairs(root / "pairs", n_train=8, n_test=4)
    return root


def args(**kw):
    defaults = dict(warmup_ratio=0.0, eval_every=0, ckpt_every=0, export_dtype="float32", lr=LR)
    return [f"--{k}={v}" for k, v in {**defaults, **kw}.items()]


def sft_args(root, out, **kw):
    return args(init_from=root / "hf", data_dir=root / "sft", out_dir=out, seq_len=32, **kw)


def dpo_args(root, out, **kw):
    return args(init_from=root / "hf", data_dir=root / "pairs", out_dir=out, beta=0.1, lr_schedule="constant",
                global_batch_size=4, micro_batch_size=2, max_steps=1, **kw)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b))


def assert_same_updates(before, a, b):
    """Two first optimizer steps from the same weights `before` moved the same weights by the same amount, but
    for a few whose gradient sign is bf16 noise (module comment). Dicts of name -> tensor."""
    moved_differently = total = 0
    for name, w0 in before.items():
        da, db = a[name] - w0, b[name] - w0
        assert (da - db).abs().max().item() <= 2.01 * LR, name            # never more than a flipped sign
        moved_differently += int(((da - db).abs() > 0.01 * LR).sum())
        total += w0.numel()
    assert moved_differently <= 0.01 * total, f"{moved_differently} of {total} weights moved differently"


def test_fp32_takes_sdpa_and_the_torch_head_on_the_gpu_path():
    # fp32 is refused by the kernels on CUDA (their configurations spill): the model falls back to SDPA and the
    # log-prob head to its torch path, on CUDA and in the rehearsal alike; 16-bit takes the kernels.
    from kernels import logprobs
    model = Mistral(MistralConfig(**MODEL))
    model.kernels_on_cpu = True
    x = torch.zeros(1, 8, MODEL["hidden_size"])
    assert model._mask(x, 8, None, None, None).kind != "flash"
    assert model._mask(x.bfloat16(), 8, None, None, None).kind == "flash"
    cuda = torch.device("cuda")
    assert not logprobs._uses_triton(cuda, torch.float32) and logprobs._uses_triton(cuda, torch.bfloat16)


def hf_weights(path):
    return Mistral.from_pretrained(path, dtype=torch.float32).state_dict()


def test_rehearsal_without_triton_interpret_is_a_clear_error(setup, tmp_path):
    p = run([sys.executable, "sft.py", *sft_args(setup, tmp_path / "out", max_steps=1), "--rehearse_gpu=true"],
            check=False, env={"TRITON_INTERPRET": "0"})
    assert p.returncode != 0
    assert "config: rehearse_gpu=true runs the Triton kernels in Triton's interpreter" in p.stderr
    assert "TRITON_INTERPRET=1" in p.stderr and not (tmp_path / "out").exists()


def test_rehearsal_sft_step_matches_fp32_torch_path(setup, tmp_path):
    # One step of 4 packed rows (2 per rank): segments, padding tail, GQA, window, the one-pass log-prob head.
    kw = dict(global_batch_size=4, micro_batch_size=2, max_steps=1)
    run([sys.executable, "sft.py", *sft_args(setup, tmp_path / "fp32", **kw)])
    torchrun("sft.py", [*sft_args(setup, tmp_path / "gpu", **kw), "--rehearse_gpu=true"], nproc=2, env=INTERPRET)
    a, b = metrics(tmp_path / "fp32")[0], metrics(tmp_path / "gpu")[0]
    assert close(a["loss"], b["loss"], U) and close(a["grad_norm"], b["grad_norm"], 4 * U), (a, b)
    assert_same_updates(hf_weights(setup / "hf"), hf_weights(tmp_path / "fp32" / "hf"),
                        hf_weights(tmp_path / "gpu" / "hf"))


@pytest.fixture(scope="module")
def dpo_fp32(setup, tmp_path_factory):
    # The fp32 torch path, full fine-tuning and LoRA. Its live reference gives the precomputed one's numbers
    # (tests/test_dpo.py), so one fp32 run serves both.
    runs = {}

    def get(lora):
        if lora not in runs:
            runs[lora] = tmp_path_factory.mktemp("dpo_fp32")
            run([sys.executable, "dpo.py", *dpo_args(setup, runs[lora], lora_rank=lora)])
        return runs[lora]
    return get


@pytest.mark.parametrize("reference,lora", [("precomputed", 0), ("live", 0), ("base", 4)])
def test_rehearsal_dpo_step_matches_fp32_torch_path(setup, dpo_fp32, tmp_path, reference, lora):
    from safetensors.torch import load_file
    fp32 = dpo_fp32(lora)
    torchrun("dpo.py", [*dpo_args(setup, tmp_path / "gpu", reference=reference, lora_rank=lora), "--rehearse_gpu=true"],
             nproc=2, env=INTERPRET)
    a, b = metrics(fp32)[0], metrics(tmp_path / "gpu")[0]
    # Policy = reference at step 1: loss log 2 on both paths, whatever the precision; the policy's summed
    # log-probs (~ -100) and the gradient carry the comparison.
    assert a["loss"] == pytest.approx(math.log(2), abs=1e-6) and b["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("logps/chosen", "logps/rejected"):
        assert close(a[key], b[key], U), (key, a, b)
    assert close(a["grad_norm"], b["grad_norm"], 4 * U), (a, b)
    if reference == "precomputed":  # cached beside the data under separate keys: bf16 kernels vs fp32 torch
        caches = sorted((setup / "pairs").glob("train.ref_logps.*.npy"))
        assert len(caches) == 2
        ref_a, ref_b = (np.load(c) for c in caches)
        assert ref_a.shape == ref_b.shape == (8, 2) and np.abs(ref_a - ref_b).max() <= U * np.abs(ref_a).max()
    if lora:  # the adapters trained (B; A gets no gradient while B = 0); the bf16 base is exported unchanged
        after = [load_file(out / "adapter" / "adapter_model.safetensors") for out in (fp32, tmp_path / "gpu")]
        before = {n: torch.zeros_like(t) if "lora_B" in n else t for n, t in after[0].items()}
        assert_same_updates(before, *after)
    else:
        assert_same_updates(hf_weights(setup / "hf"), hf_weights(fp32 / "hf"), hf_weights(tmp_path / "gpu" / "hf"))


@pytest.fixture(scope="module")
def curves(setup, tmp_path_factory):
    """20 steps of 2 packed rows of 32 tokens on one rank, fp32 torch path and rehearsal."""
    root = tmp_path_factory.mktemp("curves")
    kw = dict(global_batch_size=2, micro_batch_size=2, max_steps=20, lr_schedule="cosine", warmup_ratio=0.1)
    run([sys.executable, "sft.py", *sft_args(setup, root / "fp32", **kw)])
    run([sys.executable, "sft.py", *sft_args(setup, root / "gpu", **kw), "--rehearse_gpu=true"], env=INTERPRET)
    return root, kw


def test_rehearsal_sft_loss_curve_tracks_fp32_over_20_steps(curves):
    root, _ = curves
    a, b = metrics(root / "fp32"), metrics(root / "gpu")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 21))
    table = "\n".join(f"{x['step']:>2} {x['loss']:.4f} {y['loss']:.4f} {y['loss'] - x['loss']:+.4f}"
                      for x, y in zip(a, b))
    # Measured: |difference| <= 0.0054 at every step (loss ~6), grad norms within 1.4%. 0.02 is 0.8 u x loss.
    assert all(abs(x["loss"] - y["loss"]) <= 0.02 for x, y in zip(a, b)), table
    assert all(close(x["grad_norm"], y["grad_norm"], 0.05) for x, y in zip(a, b)), table
    for m in (a, b):  # both learn
        assert np.mean([r["loss"] for r in m[-5:]]) < np.mean([r["loss"] for r in m[:5]]) - 0.1, table


def test_compile_with_the_kernel_path_traces_and_gives_eager_numbers(setup, curves):
    # compile=true: each decoder layer compiled (inductor, CPU) around the Triton attention, which runs as in eager
    # mode behind a graph break (model._flash_attention). The first 3 steps of the same 20-step rehearsal.
    root, kw = curves
    run([sys.executable, "sft.py", *sft_args(setup, root / "compiled", **kw), "--stop_after=3", "--compile=true",
         "--rehearse_gpu=true"], env=INTERPRET, timeout=600)
    eager, compiled = metrics(root / "gpu")[:3], metrics(root / "compiled")
    assert len(compiled) == 3
    for x, y in zip(eager, compiled):  # bf16, fused differently: measured losses within 3e-5, norms 1e-4 (relative)
        assert close(x["loss"], y["loss"], U / 8) and close(x["grad_norm"], y["grad_norm"], U), (x, y)


def counting_model(path, tokenizer_model, steps=30):
    """The test model trained (fp32, in this process) to continue sequences that count up by one: greedy
    decisions with margins far above bf16's rounding, so that greedy outputs can be compared token for token."""
    from data.tokenizer import Tokenizer
    torch.manual_seed(0)
    model = Mistral(MistralConfig(**MODEL))
    model.init_weights(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = 3 + (torch.randint(0, 509, (16, 1), generator=g) + torch.arange(25)) % 509       # (16, 25)
        loss = -model(ids[:, :-1], targets=ids[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path, tokenizer=Tokenizer(tokenizer_model))
    return loss.item()


def test_rehearsal_greedy_generation_and_judge_logits_equal_torch_path(tmp_path, tiny_tokenizer):
    final_loss = counting_model(tmp_path / "hf", tiny_tokenizer)
    assert final_loss < 0.5
    prompts = [[3 + (s + i) % 509 for i in range(n)] for s, n in ((10, 5), (200, 12), (480, 20))]  # left-padded
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    run([sys.executable, "tests/rehearsal_generate.py", tmp_path / "hf", tmp_path / "prompts.json",
         tmp_path / "out.json"], env=INTERPRET)
    out = json.loads((tmp_path / "out.json").read_text())
    fp32, gpu = out["torch"], out["rehearsal"]
    assert fp32["dtype"] == "torch.float32" and gpu["dtype"] == "torch.bfloat16" and gpu["kernels_on_cpu"]
    assert gpu["greedy"] == fp32["greedy"]
    assert fp32["greedy"][0][:3] == [3 + (10 + 5 + i) % 509 for i in range(3)]     # it does count
    a, b = torch.tensor(fp32["logits"]), torch.tensor(gpu["logits"])              # (3, V): the judge's path
    assert (a - b).abs().max().item() <= 4 * U * a.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).all()
