# Loading into and exporting from the FSDP2-sharded model, across 2 ranks, against the unsharded model.
import numpy as np
import pytest
import torch

from conftest import torchrun
from model import Mistral, MistralConfig


def test_sharded_load_and_export_give_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    # Odd sizes so that dim 0 of several tensors does not split evenly over 2 ranks.
    cfg = MistralConfig(vocab_size=257, hidden_size=48, intermediate_size=75, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=3, sliding_window=5, dtype="float32")
    ref = Mistral(cfg).eval()
    ref.init_weights(1)
    ref.save_pretrained(tmp_path / "src", max_shard_bytes=50_000)  # sharded files, too
    torchrun("tests/fsdp_logits.py", [tmp_path / "src", tmp_path / "out", tmp_path / "logits.npy"], nproc=2)
    x = torch.tensor(np.random.default_rng(0).integers(0, 257, (2, 13)))
    with torch.no_grad():
        expect = Mistral.from_pretrained(tmp_path / "src", dtype=torch.float32)(x)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        exported = hf(x).logits
    sharded = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    assert (sharded - expect).abs().max().item() <= 1e-5
    assert (exported - expect).abs().max().item() <= 1e-5
    # Not just close: the exported weights are the source weights, bit for bit.
    a = Mistral.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    for name, t in ref.state_dict().items():
        assert torch.equal(a[name], t), name
