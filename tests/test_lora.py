# LoRA (lora.py) in sft.py and dpo.py: against PEFT (the reference implementation), against the precomputed DPO
# reference, against itself on another number of ranks and across an interruption.
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import run, torchrun
from model import Mistral, config_from_preset
from test_dpo import assert_same_run as assert_same_dpo_run
from test_dpo import dpo_args, metrics, write_pairs
from test_sft import assert_same_run as assert_same_sft_run
from test_sft import sft_args, write_random_shards

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_tokenizer):
    """A tiny base model as a Hugging Face directory, SFT shards and preference pairs for its vocabulary."""
    from data.tokenizer import Tokenizer
    r = tmp_path_factory.mktemp("lora")
    model = Mistral(config_from_preset("tiny"))
    model.init_weights(0)
    model.save_pretrained(r / "sft", tokenizer=Tokenizer(tiny_tokenizer))  # test_dpo's layout: root/sft, root/data
    write_pairs(r / "data")
    write_random_shards(r / "sft_data")
    return r


def lora_sft_args(root, out, tokenizer, **kw):
    base = dict(init_from=root / "sft", data_dir=root / "sft_data", lora_rank=4, lora_alpha=8, lr=1e-2)
    base.update(kw)
    return sft_args(base.pop("data_dir"), out, tokenizer, **base)


@pytest.fixture(scope="module")
def lora_sft(root, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_sft")
    run([sys.executable, "sft.py", *lora_sft_args(root, out, tiny_tokenizer)])
    return out


def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_peft_loads_our_adapter_and_gives_our_merged_export(root, lora_sft):
    peft = pytest.importorskip("peft")
    from safetensors import safe_open
    with safe_open(os.path.join(lora_sft, "adapter", "adapter_model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert len(names) == 4 * len(ALL) * 2  # 4 layers x 7 projections x (A, B): nothing else
    config = json.load(open(os.path.join(lora_sft, "adapter", "adapter_config.json")))
    assert config["base_model_name_or_path"] == str(root / "sft") and config["r"] == 4

    ids = torch.randint(3, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = hf_model(root / "sft")(ids).logits
        with_adapter = peft.PeftModel.from_pretrained(hf_model(root / "sft"), os.path.join(lora_sft, "adapter"))
        peft_logits = with_adapter.eval()(ids).logits
        merged_logits = hf_model(os.path.join(lora_sft, "hf"))(ids).logits
    assert (peft_logits - merged_logits).abs().max().item() <= 1e-4
    assert (base_logits - merged_logits).abs().max().item() > 1e-2  # the adapter trained: the check has teeth


def peft_saved_adapter(root, path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model(root / "sft"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0, init_lora_weights=False))  # B != 0
    model.save_pretrained(path)
    return model.eval()


def test_our_code_loads_a_peft_adapter_and_continues_training_from_it(root, tiny_tokenizer, tmp_path):
    import lora
    from data.shards import Shards
    from sft import Plan, make_batch
    adapter = tmp_path / "peft_adapter"
    theirs = peft_saved_adapter(root, adapter)

    # Loaded into our model: PEFT's logits.
    s = lora.Settings(4, 8.0, 0.0, tuple(ALL), str(adapter))
    lora.check_peft_config(s)
    ours = lora.apply(Mistral.from_pretrained(root / "sft", dtype=torch.float32), s)
    lora.init_adapters(ours, s, seed=0)
    ids = torch.randint(3, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours.eval()(ids) - theirs(ids).logits).abs().max().item() <= 1e-4

    # Training continues from it: the first step's loss is PEFT's loss on that step's rows (unpacked, padded).
    out = tmp_path / "run"
    run([sys.executable, "sft.py", *lora_sft_args(root, out, tiny_tokenizer, lora_from=adapter, packing="false",
                                                 max_steps=2, eval_every=0)])
    shards = Shards(root / "sft_data", "train")
    plan = Plan(shards.lengths, seq_len=64, packing=False, seed=42, global_batch_size=8)  # as sft.py plans it
    rows = [plan.rows[r] for r in plan.step_rows(0)]
    batch = make_batch(shards, rows, 64, packing=False)
    with torch.no_grad():
        logits = theirs(batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
    targets = batch["targets"]
    lp = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expect = -(lp * (targets != -100)).sum().item() / (targets != -100).sum().item()
    m = metrics(out)
    assert m[0]["loss"] == pytest.approx(expect, rel=1e-5)
    assert m[1]["loss"] < m[0]["loss"] + 1.0 and m[1]["grad_norm"] > 0
    from safetensors.torch import load_file
    before = load_file(adapter / "adapter_model.safetensors")
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(before) == set(after)
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-4  # it trained on


def test_two_ranks_match_one_rank_with_lora(root, lora_sft, tiny_tokenizer, tmp_path):
    torchrun("sft.py", lora_sft_args(root, tmp_path, tiny_tokenizer), nproc=2)
    assert_same_sft_run(lora_sft, tmp_path)


def test_resume_with_lora_equals_uninterrupted_and_checkpoints_hold_only_adapters(root, lora_sft, tiny_tokenizer,
                                                                                   tmp_path):
    args = lora_sft_args(root, tmp_path, tiny_tokenizer, ckpt_every=2)
    run([sys.executable, "sft.py", *args, "--stop_after=3"])
    ckpt = tmp_path / "ckpt" / "step_0000002"
    keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    model_keys = {k for k in keys if k.startswith("model.")}
    assert len(model_keys) == 4 * len(ALL) * 2 and all(".lora_" in k for k in model_keys), sorted(model_keys)[:5]
    data_bytes = sum(os.path.getsize(ckpt / f) for f in os.listdir(ckpt) if f.endswith(".distcp"))
    full_bytes = 4 * config_from_preset("tiny").num_params()
    # Adapters + their Adam moments (+ DCP's per-tensor framing), where full fine-tuning saves the weights and
    # two moments: 3x the model.
    assert data_bytes < 0.1 * 3 * full_bytes, data_bytes
    torchrun("sft.py", [*args, "--resume=true"], nproc=2)  # resumed on another number of ranks
    assert_same_sft_run(lora_sft, tmp_path)


@pytest.fixture(scope="module")
def lora_dpo(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_dpo")
    run([sys.executable, "dpo.py", *dpo_args(root, out, lora_rank=4, lora_alpha=8, lr=1e-2)])
    return out


def test_reference_with_adapters_off_equals_the_precomputed_reference(root, lora_dpo, tmp_path):
    m = metrics(lora_dpo)
    config = json.load(open(os.path.join(lora_dpo, "config.json")))
    assert config["reference"] == "base"  # the default with LoRA
    assert m[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # B = 0: the policy starts as the reference
    assert m[-1]["rewards/margins"] > 0
    # The same run with the reference log-probs of the SFT model computed before training and cached: after the
    # first step the adapters are on, so a reference that did not switch them off would drift from this one.
    run([sys.executable, "dpo.py", *dpo_args(root, tmp_path, lora_rank=4, lora_alpha=8, lr=1e-2,
                                             reference="precomputed")])
    assert_same_dpo_run(lora_dpo, tmp_path)


# Run dpo.py in-process and measure, at the first optimizer step, the bytes of every tensor alive (storages counted
# once): the model, the adapters' gradients and Adam state, and whatever reference the run holds.
MEASURE = """
import gc, json, sys, torch
import common, dpo
seen = {}
step = common.optimizer_step
def measured(*a, **k):
    if not seen:
        gc.collect()
        storages = {}
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and not o.is_meta:
                    t = o.to_local() if hasattr(o, "to_local") else o
                    s = t.untyped_storage()
                    storages[s.data_ptr()] = s.nbytes()
            except Exception:
                pass
        seen["bytes"] = sum(storages.values())
    return step(*a, **k)
common.optimizer_step = measured
dpo.main(sys.argv[1:])
print("MEASURED", json.dumps(seen))
"""


def test_lora_dpo_step_holds_no_second_model(root, tmp_path):
    def tensor_bytes(reference):
        p = run([sys.executable, "-c", MEASURE, *dpo_args(root, tmp_path / reference, lora_rank=4, max_steps=1,
                                                         eval_every=0, reference=reference)])
        line = [x for x in p.stdout.splitlines() if x.startswith("MEASURED")][0]
        return json.loads(line.split(" ", 1)[1])["bytes"]

    model_bytes = 4 * config_from_preset("tiny").num_params()
    base, live = tensor_bytes("base"), tensor_bytes("live")
    assert base < 1.4 * model_bytes, (base, model_bytes)   # one model (+ adapters, their gradients and Adam state)
    assert live - base > 0.9 * model_bytes, (live, base)   # what a second copy of the model costs


def test_bad_lora_settings_are_errors_that_name_the_field(root, tmp_path):
    import lora
    cfg = types.SimpleNamespace(lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets="q_proj,qkv", lora_from="")
    with pytest.raises(ValueError, match="lora_targets"):
        lora.settings(cfg)
    adapter = tmp_path / "peft"
    peft_saved_adapter(root, adapter)
    cfg = types.SimpleNamespace(lora_rank=8, lora_alpha=8, lora_dropout=0.0, lora_targets=",".join(ALL),
                                lora_from=str(adapter))
    with pytest.raises(ValueError, match="lora_rank"):
        lora.settings(cfg)
    p = run([sys.executable, "dpo.py", *dpo_args(root, tmp_path / "x", reference="base")], check=False)
    assert p.returncode != 0 and "needs lora_rank > 0" in p.stderr
