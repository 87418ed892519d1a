# dpo.py: the losses against their formulas, log-probs against transformers, and runs that must agree.
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

from conftest import run, torchrun
from data.shards import ShardWriter, Shards
from dpo import dpo_loss, pair_batch, sequence_logps
from model import Mistral, config_from_preset


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_losses_match_their_formulas(loss_type, smoothing):
    pc, pr, rc, rr = [-10.0, -3.0], [-12.0, -2.5], [-11.0, -3.5], [-11.5, -2.0]
    beta = 0.3
    losses, chosen, rejected = dpo_loss(*(torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr)),
                                        beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    for i in range(2):
        margin = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            expect = -(1 - smoothing) * math.log(sig(beta * margin)) - smoothing * math.log(sig(-beta * margin))
        elif loss_type == "ipo":
            expect = (margin - 1 / (2 * beta)) ** 2
        else:
            expect = max(0.0, 1 - beta * margin)
        assert losses[i].item() == pytest.approx(expect, rel=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]))
        assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]))


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_with_a_loss_type_that_ignores_it_is_an_error(loss_type, tmp_path):
    with pytest.raises(ValueError, match=f"label_smoothing=0.1 with loss_type='{loss_type}': {loss_type} ignores"):
        dpo_loss(*torch.zeros(4, 2), beta=0.1, loss_type=loss_type, label_smoothing=0.1)
    dpo_loss(*torch.zeros(4, 2), beta=0.1, loss_type=loss_type, label_smoothing=0.0)  # without it: fine
    out = tmp_path / "out"
    p = run([sys.executable, "dpo.py", f"--loss_type={loss_type}", "--label_smoothing=0.1", f"--out_dir={out}"],
            check=False)
    assert p.returncode != 0 and f"config: label_smoothing=0.1 with loss_type='{loss_type}'" in p.stderr
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("options,error", [(dict(label_smoothing=0.6), "label_smoothing=0.6: expected"),
                                           (dict(label_smoothing=-0.1), "label_smoothing=-0.1: expected"),
                                           (dict(beta=0.0), "beta=0.0: expected > 0"),
                                           (dict(loss_type="robust"), "loss_type='robust'; choose")])
def test_other_loss_options_out_of_range_are_errors(options, error):
    kw = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0) | options
    with pytest.raises(ValueError, match=re.escape(error)):
        dpo_loss(*torch.zeros(4, 2), **kw)


def write_pairs(directory, n_train=48, n_test=15, vocab=512, seed=0):
    # Chosen answers draw from a few "good" tokens, rejected ones from "bad" tokens: a preference that
    # generalizes to held-out pairs after a few steps.
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        with ShardWriter(directory, split, vocab) as w:
            for _ in range(n):
                p = int(rng.integers(3, 12))
                prompt = np.concatenate([[1], rng.integers(3, vocab, p - 1)])
                a = int(rng.integers(4, 10))
                chosen = rng.integers(3, 40, a)
                rejected = rng.integers(vocab - 100, vocab, int(rng.integers(4, 10)))
                for ans in (chosen, rejected):
                    ids = np.concatenate([prompt, ans, [2]])
                    w.add(ids, np.r_[np.zeros(p), np.ones(len(ans) + 1)].astype(np.uint8))
            w.close({"n_pairs": n})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    from data.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("dpo")
    write_pairs(root / "data")
    model = Mistral(config_from_preset("tiny"))
    model.init_weights(0)
    model.save_pretrained(root / "sft", tokenizer=Tokenizer(tiny_tokenizer))
    return root


def dpo_args(root, out, **kw):
    base = dict(init_from=root / "sft", data_dir=root / "data", out_dir=out, beta=0.1, lr=1e-3, warmup_ratio=0.0,
                lr_schedule="constant", global_batch_size=8, micro_batch_size=2, max_steps=4, eval_every=4,
                eval_pairs=13,
                ckpt_every=0, export_dtype="float32")
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(a, b, rel=1e-5):
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-6), (k, x, y)
    wa = Mistral.from_pretrained(os.path.join(a, "hf"), dtype=torch.float32).state_dict()
    wb = Mistral.from_pretrained(os.path.join(b, "hf"), dtype=torch.float32).state_dict()
    # Weights: Adam divides by sqrt(v), so last-bit differences in near-zero gradients (summation order
    # differs between the runs) move a weight by a small fraction of lr. 5e-5 is 5% of one step at lr 1e-3;
    # a wrong gradient scale or a missed micro-batch moves weights by ~lr.
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= 5e-5, name


@pytest.fixture(scope="module")
def baseline(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_one_rank")
    run([sys.executable, "dpo.py", *dpo_args(setup, out)])
    return out


def test_first_step_sigmoid_loss_is_log_2(baseline):
    m = metrics(baseline)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: margin 0
    assert m[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    trl = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"]  # TRL's DPOTrainer names (it adds logits/*, which a fused head never makes)
    assert set(trl) | {f"eval_{k}" for k in trl} <= set(m[-1])
    assert m[-1]["rewards/margins"] > 0


def test_precomputed_reference_equals_live_reference(setup, baseline, tmp_path):
    run([sys.executable, "dpo.py", *dpo_args(setup, tmp_path, reference="live")])
    assert_same_run(baseline, tmp_path)


def test_two_ranks_match_one_rank(setup, baseline, tmp_path):
    torchrun("dpo.py", dpo_args(setup, tmp_path), nproc=2)
    assert_same_run(baseline, tmp_path)


def test_stopped_and_resumed_run_equals_uninterrupted(setup, baseline, tmp_path):
    args = dpo_args(setup, tmp_path, ckpt_every=2)
    run([sys.executable, "dpo.py", *args, "--stop_after=3"])
    run([sys.executable, "dpo.py", *args, "--resume=true"])
    assert_same_run(baseline, tmp_path)


def test_sequence_logps_equal_transformers_with_prompt_masked(setup):
    transformers = pytest.importorskip("transformers")
    shards = Shards(setup / "data", "train")
    ours = Mistral.from_pretrained(setup / "sft", dtype=torch.float32).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(setup / "sft", dtype=torch.float32).eval()
    pairs = [0, 3, 5]
    batch = pair_batch(shards, pairs)
    with torch.no_grad():
        s, _ = sequence_logps(ours, batch)
    for row, (i, kind) in enumerate([(p, k) for k in (0, 1) for p in pairs]):
        ids, mask = shards[2 * i + kind]
        with torch.no_grad():
            logits = hf(torch.tensor(ids[None], dtype=torch.long)).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        answer = [t for t in range(1, len(ids)) if mask[t]]  # the prompt is masked out
        expect = sum(lp[t - 1, int(ids[t])].item() for t in answer)
        assert s[row].item() == pytest.approx(expect, abs=1e-4)


def test_reward_accuracy_rises_on_held_out_pairs(setup, tmp_path):
    run([sys.executable, "dpo.py", *dpo_args(setup, tmp_path, max_steps=12, eval_every=12, lr=2e-3)])
    m = metrics(tmp_path)
    assert m[-1]["eval_rewards/accuracies"] >= 0.9, m[-1]
