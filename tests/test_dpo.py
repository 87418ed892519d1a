# dpo.py: the losses against their formulas, log-probs against transformers, and runs that must agree.
import glob
import json
import math
import os
import shutil
import re
import sys

import numpy as np
import pytest
import torch

import common
import dpo
import lora
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


def assert_same_run(a, b, rel=1e-5, outliers=0):
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
    # outliers: elements allowed past 5e-5, though not past half a step (5e-4), for runs whose sums differ in
    # structure, not only in order: packed, a prompt token's gradient is one sum over both answers (padded: one
    # per row, added later), so where that sum nearly cancels (~1e-7 of the largest gradient, fp32) Adam's
    # normalization turns the rounding into a fraction of lr. An error in a pair, a scale or a micro-batch moves
    # thousands of elements by ~lr and shows in the losses above.
    beyond = 0
    for name in wa:
        diff = (wa[name] - wb[name]).abs()
        assert diff.max().item() <= (5e-4 if outliers else 5e-5), name
        beyond += int((diff > 5e-5).sum())
    assert beyond <= outliers, beyond


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


def test_one_fsdp_unit_computes_its_reference_then_trains_its_shards(setup, baseline, tmp_path):
    # fsdp_unit=model leaves the unit unsharded after forward; the reference's log-probs (no_grad, no backward)
    # then left full parameters registered and the optimizer took them ("data is not allocated" at its step).
    # A fresh copy of the data: the reference is computed here, not read from the baseline's cache.
    shutil.copytree(setup / "data", tmp_path / "data", ignore=shutil.ignore_patterns("*.ref_logps.*"))
    torchrun("dpo.py", dpo_args(setup, tmp_path / "out", data_dir=tmp_path / "data", fsdp_unit="model"), nproc=2)
    assert list((tmp_path / "data").glob("train.ref_logps.*.npy"))
    assert_same_run(baseline, tmp_path / "out")


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


# -----------------------------------------------------------------------------
# Packing: each pair prompt | chosen | rejected once, several pairs per row (dpo.py's docstring)


def test_packed_batch_lays_a_pair_out_once_with_the_rejected_positions_restarting(setup):
    shards = Shards(setup / "data", "train")
    layout = dpo.Layout(shards)
    (xc, mc), (xr, mr) = shards[0], shards[1]
    P = int(np.argmax(mc))  # the first answer token
    C, R = len(xc) - P, len(xr) - P
    assert tuple(layout.parts[0]) == (P, C, R) and np.array_equal(xc[:P], xr[:P])
    batch, pairs = dpo.packed_batch(shards, [[0]], layout)
    T = batch["input_ids"].shape[1]
    assert pairs == [0] and T == -(-(P + C + R) // 16) * 16
    assert batch["input_ids"][0, :P + C + R].tolist() == [*xc, *xr[P:]]
    assert batch["branch_ids"][0, :P + C + R].tolist() == [0] * P + [1] * C + [2] * R
    from kernels.masks import shared_positions
    positions = shared_positions(batch["segment_ids"], batch["branch_ids"])[0, :P + C + R].tolist()
    assert positions == [*range(P + C), *range(P, P + R)]
    # Each answer token with a loss, predicted by the position before it in its own answer; the first ones both
    # by the prompt's last position.
    targets, where, spans = batch["targets"].tolist(), batch["target_positions"].tolist(), batch["spans"].tolist()
    assert targets == [*xc[P:], *xr[P:]] and spans == [0] * C + [1] * R
    assert where == [P - 1, *range(P, P + C - 1), P - 1, *range(P + C, P + C + R - 1)]
    assert batch["span_tokens"].tolist() == [C, R]


def test_pack_step_packs_each_pair_once_and_gives_every_rank_as_many_micro_steps():
    import types
    rng = np.random.default_rng(0)
    layout = types.SimpleNamespace(lengths=rng.integers(10, 120, 40), pack_length=128)
    for n, world, rows_per_micro in ((24, 1, 2), (24, 2, 2), (24, 4, 1), (40, 2, 3), (5, 4, 2)):
        plan = dpo.pack_step(range(n), layout, world, rows_per_micro)
        assert len(plan) == world and len({len(mine) for mine in plan}) == 1
        real = [i for mine in plan for rows, ok in mine if ok for row in rows for i in row]
        assert sorted(real) == list(range(n))  # each pair exactly once
        for mine in plan:
            for rows, ok in mine:
                assert 1 <= len(rows) <= rows_per_micro
                assert all(layout.lengths[row].sum() <= 128 for row in rows)
        assert all(ok for mine in plan for _, ok in mine) == (n >= world)  # a filler only for a round < world


def tiny_model(seed, window=8, adapters=False):
    # A window of 8, shorter than every pair of write_pairs: a rejected token's window reaches into the prompt.
    model = Mistral(config_from_preset("tiny", sliding_window=window))
    model.init_weights(seed)
    if adapters:
        lora.apply(model, lora.Settings(4, 8.0, 0.0, ("q_proj", "v_proj", "down_proj"), ""))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # B != 0: the adapters change the model, so base != policy
            for name, p in model.named_parameters():
                if lora.is_adapter(name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def packed_and_padded(setup, cfg, model, ref_model, pairs):
    """Per pair (loss, rewards, logps) and the gradients of one step's loss, packed and padded."""
    shards = Shards(setup / "data", "train")
    layout = dpo.Layout(shards)
    layout.pack_length = 64
    ref_cache = np.random.default_rng(1).uniform(-90, -20, (len(shards) // 2, 2))
    d = common.Dist(0, 1, 0, torch.device("cpu"))
    results = []
    for packing in (layout, None):
        model.zero_grad(set_to_none=True)
        units = dpo.pack_step(pairs, layout, 1, 3)[0] if packing else [(pairs[i:i + 4], True) for i in range(0, 16, 4)]
        per_pair, sums = {}, {}
        for unit, _ in units:
            losses, rc, rr, pc, pr, _ = dpo.run_pairs(model, ref_model, shards, ref_cache, unit, cfg, d, packing)
            (losses.sum() / len(pairs)).backward()
            order = [i for row in unit for i in row] if packing else unit
            for k, i in enumerate(order):
                per_pair[i] = torch.stack([losses[k], rc[k], rr[k], pc[k], pr[k]]).detach().double()
            for k, v in dpo.pair_metrics(losses, rc, rr, pc, pr).items():
                sums[k] = sums.get(k, 0.0) + v
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((torch.stack([per_pair[i] for i in pairs]), sums, grads, len(units)))
    return results


@pytest.mark.parametrize("loss_type,smoothing,rpo_alpha,reference", [
    ("sigmoid", 0.0, 0.0, "precomputed"), ("sigmoid", 0.2, 1.0, "live"), ("ipo", 0.0, 0.5, "precomputed"),
    ("hinge", 0.0, 1.0, "base")])
def test_packed_pairs_give_the_padded_logps_losses_rewards_and_gradients(setup, loss_type, smoothing, rpo_alpha,
                                                                       reference):
    # CPU, fp32, one optimizer step's 16 pairs: packed prompt-shared rows of 64 tokens against padded micro-batches
    # of 4 pairs, with the reference precomputed, live (a second model) or the LoRA base (adapters off).
    cfg = dpo.Config(beta=0.1, loss_type=loss_type, label_smoothing=smoothing, rpo_alpha=rpo_alpha,
                     reference=reference)
    model = tiny_model(0, adapters=reference == "base")
    ref_model = tiny_model(1).eval().requires_grad_(False) if reference == "live" else None
    pairs = np.random.default_rng(2).permutation(48)[:16].tolist()
    (packed, sums_p, grads_p, steps_p), (padded, sums_q, grads_q, steps_q) = packed_and_padded(
        setup, cfg, model, ref_model, pairs)
    assert steps_p < steps_q  # the same pairs in fewer forward passes
    # Columns: loss, rewards/chosen, rewards/rejected, logps/chosen, logps/rejected (mean per token for ipo).
    logps_rel = ((packed[:, 3:] - padded[:, 3:]).abs() / padded[:, 3:].abs()).max().item()
    assert logps_rel <= 1e-5, logps_rel
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for k in sums_q:
        assert sums_p[k] == pytest.approx(sums_q[k], rel=1e-5, abs=1e-5), k
    assert set(grads_p) == set(grads_q) and len(grads_q) > 0
    for name, g in grads_q.items():
        err = (grads_p[name] - g).abs().max().item()
        assert err <= 1e-5 * max(g.abs().max().item(), 1e-3), (name, err)


def ref_caches(root, split):
    return sorted(glob.glob(os.path.join(root, "data", f"{split}.ref_logps.*.npy")))


def test_padded_run_equals_the_packed_run_which_computes_fewer_positions(setup, baseline, tmp_path):
    # The baseline packs (dpo.py's default); --packing=false pads each micro-batch's rows, as TRL does.
    before = ref_caches(setup, "train")
    run([sys.executable, "dpo.py", *dpo_args(setup, tmp_path, packing="false")])
    assert_same_run(baseline, tmp_path, outliers=8)  # observed: 1 of the 0.92M weights past 5e-5 (2.4e-4)
    packed, padded = metrics(baseline), metrics(tmp_path)
    keys = [k for k in padded[-1] if k.startswith(("rewards/", "logps/", "eval_"))]
    for x, y in zip(packed, padded):
        for k in keys:
            assert x.get(k) == pytest.approx(y.get(k), rel=1e-5, abs=1e-6), k
        assert x["tokens"] == y["tokens"] and x["positions"] < y["positions"]
        assert x["fill"] == pytest.approx(x["tokens"] / x["positions"]) and 0 < y["fill"] < x["fill"] <= 1
    for split in ("train", "test"):  # the reference caches, written by each layout
        caches = ref_caches(setup, split)
        assert len(caches) == 2 and (split != "train" or len(before) == 1)
        a, b = (np.load(c) for c in caches)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_steps_log_the_pairs_tokens_and_the_positions_computed(setup, baseline):
    # Counted here from the shards: each pair's prompt once plus both answers; the padded path would compute
    # 2 x micro_batch_size rows as long as each micro-batch's longest example.
    shards = Shards(setup / "data", "train")
    order = np.random.default_rng([42, 0]).permutation(len(shards) // 2)
    for m in metrics(baseline):
        step_pairs = order[(m["step"] - 1) * 8:m["step"] * 8]
        tokens = padded = 0
        for i in step_pairs:
            (xc, mc), (xr, _) = shards[2 * i], shards[2 * i + 1]
            tokens += len(xc) + len(xr) - int(np.argmax(mc))
        for k in range(0, 8, 2):
            padded += 4 * max(len(shards[2 * i + j][0]) for i in step_pairs[k:k + 2] for j in (0, 1))
        assert m["tokens"] == tokens and tokens <= m["positions"] < padded
        assert m["tokens_per_s"] > 0 and m["fill"] == pytest.approx(tokens / m["positions"])


def test_a_pair_longer_than_pack_length_is_an_error_at_start(setup, tmp_path):
    p = run([sys.executable, "dpo.py", *dpo_args(setup, tmp_path, pack_length=20)], check=False)
    assert p.returncode != 0
    assert re.search(r"data/train: \d+ pairs longer than pack_length=20, e\.g\. pair \d+: prompt \d+ \+ chosen \d+ "
                     r"\+ rejected \d+ = \d+ tokens; raise --pack_length", p.stderr), p.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_pairs_whose_examples_differ_before_the_answer_are_refused_by_packing(tmp_path):
    with ShardWriter(tmp_path, "train", 64) as w:
        for prompt in ([1, 5, 6], [1, 5, 6], [1, 7, 8], [1, 7, 9]):  # pair 1: the prompts differ in one token
            w.add(np.array(prompt + [10, 11, 2]), np.array([0, 0, 0, 1, 1, 1], dtype=np.uint8))
        w.close({})
    shards = Shards(tmp_path, "train")
    with pytest.raises(ValueError, match=r"train.json: pair 1 \(examples 2, 3\): the chosen and rejected examples do "
                                         r"not share their prompt"):
        dpo.Layout(shards)
    assert dpo.Layout(shards, check=False).parts.tolist() == [[3, 3, 3], [3, 3, 3]]  # padded runs count tokens
