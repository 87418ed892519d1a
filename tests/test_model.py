# model.py against transformers' MistralForCausalLM / LlamaForCausalLM, the independent reference.
import json
import os

import pytest
import torch

from model import KVCache, Mistral, MistralConfig, dense_mask, positions_from_segments, sample

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32 logits, max abs difference


def tiny_config(**kw):
    base = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, sliding_window=None, dtype="float32")
    return MistralConfig(**{**base, **kw})


def ours_and_hf(cfg, seed=0):
    model = Mistral(cfg).eval()
    model.init_weights(seed)
    hf_cfg = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype", "dtype")}
    cls = transformers.LlamaForCausalLM if cfg.model_type == "llama" else transformers.MistralForCausalLM
    conf = transformers.AutoConfig.for_model(**hf_cfg)
    conf._attn_implementation = "eager"  # the plainest reference: a dense mask and softmax
    hf = cls(conf).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return model, hf


CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "gqa-window-shorter-than-seq": dict(num_key_value_heads=1, sliding_window=5),
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "head-dim-not-hidden-over-heads": dict(head_dim=24, sliding_window=7),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(name):
    model, hf = ours_and_hf(tiny_config(**CONFIGS[name]))
    x = torch.randint(0, 101, (3, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_transformers_on_real_tokens(side):
    model, hf = ours_and_hf(tiny_config(sliding_window=6))
    g = torch.Generator().manual_seed(2)
    lengths = [17, 9, 13]
    T = max(lengths)
    x = torch.randint(1, 101, (3, T), generator=g)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, T - n:] = 1
        else:
            mask[i, :n] = 1
    x = x * mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(x, attention_mask=mask)
        ref = hf(x, attention_mask=mask, position_ids=pos).logits
        # And each row alone, unpadded: padding must not change a real token's logits.
        alone = [model(x[i:i + 1, mask[i].bool()]) for i in range(3)]
    real = mask.bool()
    assert (ours - ref)[real].abs().max().item() <= TOL
    for i in range(3):
        assert (ours[i][real[i]] - alone[i][0]).abs().max().item() <= TOL


def test_window_sees_itself_and_w_minus_1_earlier_tokens():
    # HF's convention, written out by hand: query i sees key j iff 0 <= i - j < W.
    T, W = 11, 4
    idx = torch.arange(T)
    m = dense_mask(idx, idx, W)[0, 0]
    for i in range(T):
        for j in range(T):
            assert bool(m[i, j]) == (0 <= i - j < W), (i, j)
    assert int(m[10].sum()) == W  # itself and W-1 earlier


def test_packed_segments_equal_separate_forwards():
    model, _ = ours_and_hf(tiny_config(sliding_window=5))
    g = torch.Generator().manual_seed(3)
    lengths = [6, 1, 9, 4]
    x = torch.randint(0, 101, (1, sum(lengths)), generator=g)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    assert positions_from_segments(seg).tolist()[0] == [p for n in lengths for p in range(n)]
    with torch.no_grad():
        packed = model(x, segment_ids=seg)[0]
        parts = torch.cat([model(part)[0] for part in x.split(lengths, dim=1)])
    assert (packed - parts).abs().max().item() <= TOL


def test_blocked_cpu_attention_equals_one_sdpa_call_and_separate_forwards(monkeypatch):
    # The dense (CPU) path runs SDPA per block of queries on the keys they can see (model.query_blocks): packed
    # segments, right padding and a window shorter than the row, forward and gradients, against one SDPA call over
    # the whole mask and, for the packed row, against each segment run alone.
    import model as M
    cfg = tiny_config(sliding_window=45)
    model, _ = ours_and_hf(cfg)
    g = torch.Generator().manual_seed(4)
    lengths = [50, 1, 73, 20, 56]
    T = sum(lengths)
    x = torch.randint(0, 101, (2, T), generator=g)
    t = torch.randint(0, 101, (2, T), generator=g)
    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]), torch.zeros(T, dtype=torch.long)])
    seg[1, 130:] = 1  # a second layout in the batch: the blocks' key ranges take the smaller start of the two

    def run(block, **kw):
        monkeypatch.setattr(M, "ATTN_BLOCK", block)
        model.zero_grad()
        lp = model(x, targets=t, **kw)
        lp.sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    assert M.query_blocks(T, 45, None, 64) == [(0, 64, 0), (64, 128, 20), (128, 192, 84), (192, 200, 148)]
    for kw in (dict(segment_ids=seg), dict(attention_mask=(torch.arange(T) < torch.tensor([[T], [150]])).long())):
        (a, ga), (b, gb) = run(16, **kw), run(10**9, **kw)
        assert (a - b).abs().max().item() <= 1e-5
        for name in ga:
            assert (ga[name] - gb[name]).abs().max().item() <= 1e-5 * max(1.0, gb[name].abs().max().item()), name
    monkeypatch.setattr(M, "ATTN_BLOCK", 16)
    with torch.no_grad():
        packed = model(x[:1], segment_ids=seg[:1])[0]
        parts = torch.cat([model(part)[0] for part in x[:1].split(lengths, dim=1)])
    assert (packed - parts).abs().max().item() <= TOL


def test_targets_give_token_logprobs_of_the_logits():
    model, _ = ours_and_hf(tiny_config())
    x = torch.randint(0, 101, (2, 9))
    t = torch.randint(0, 101, (2, 9))
    t[0, :3] = -100
    lp = model(x, targets=t)
    ref = torch.log_softmax(model(x).float(), -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    ref = ref.masked_fill(t == -100, 0.0)
    assert (lp - ref).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_our_save_loads_in_transformers_with_same_logits(tmp_path):
    model, _ = ours_and_hf(tiny_config(sliding_window=5))
    model.save_pretrained(tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    x = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= TOL
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temp dirs left behind


def test_transformers_save_loads_in_ours_with_same_logits(tmp_path):
    _, hf = ours_and_hf(tiny_config(num_key_value_heads=1, sliding_window=3))
    hf.save_pretrained(tmp_path / "hf")
    model = Mistral.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    x = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= TOL


def test_sharded_checkpoint_round_trip_both_ways(tmp_path):
    model, hf = ours_and_hf(tiny_config())
    model.save_pretrained(tmp_path / "ours", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    n_files = len(set(index["weight_map"].values()))
    assert n_files > 2 and (tmp_path / "ours" / f"model-00001-of-{n_files:05d}.safetensors").exists()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    x = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        ref = model(x)
        a = Mistral.from_pretrained(tmp_path / "ours", dtype=torch.float32)(x)
        b = Mistral.from_pretrained(tmp_path / "hf", dtype=torch.float32)(x)
        c = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)(x).logits
    for other in (a, b, c):
        assert (ref - other).abs().max().item() <= TOL


def test_tied_embeddings_round_trip(tmp_path):
    model, hf = ours_and_hf(tiny_config(tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "c")
    again = Mistral.from_pretrained(tmp_path / "c", dtype=torch.float32)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    x = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        assert (again(x) - hf(x).logits).abs().max().item() <= TOL


def test_from_pretrained_converts_dtype(tmp_path):
    model, _ = ours_and_hf(tiny_config())
    model.save_pretrained(tmp_path / "c")
    bf = Mistral.from_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(bf.model.layers[0].mlp.up_proj.weight, w.to(torch.bfloat16))


def test_missing_shard_names_the_file(tmp_path):
    model, _ = ours_and_hf(tiny_config())
    model.save_pretrained(tmp_path / "c", max_shard_bytes=40_000)
    next((tmp_path / "c").glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of"):
        Mistral.from_pretrained(tmp_path / "c")


def test_wrong_tensor_shape_names_the_tensor(tmp_path):
    from safetensors.torch import save_file
    model, _ = ours_and_hf(tiny_config())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    (tmp_path / "c").mkdir()
    save_file(sd, tmp_path / "c" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "c" / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight has shape \(95, 64\)"):
        Mistral.from_pretrained(tmp_path / "c")


def test_missing_tensor_is_an_error(tmp_path):
    from safetensors.torch import save_file
    model, _ = ours_and_hf(tiny_config())
    sd = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    (tmp_path / "c").mkdir()
    save_file(sd, tmp_path / "c" / "model.safetensors")
    (tmp_path / "c" / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    with pytest.raises(KeyError, match="model.norm.weight"):
        Mistral.from_pretrained(tmp_path / "c")


def test_vocab_mismatch_is_an_error(tmp_path):
    model, _ = ours_and_hf(tiny_config())

    class Tok:
        vocab_size = 100

    with pytest.raises(ValueError, match="100 pieces but the model's vocab_size is 101"):
        model.save_pretrained(tmp_path / "c", tokenizer=Tok())
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------
# Config files


def test_reads_transformers_v4_and_v5_config_files(tmp_path):
    v5 = transformers.MistralConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=48, num_hidden_layers=1, sliding_window=7,
                                    rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    v5.save_pretrained(tmp_path / "v5")
    a = MistralConfig.from_json(tmp_path / "v5" / "config.json")
    assert (a.vocab_size, a.head_dim, a.sliding_window, a.rope_theta) == (99, 8, 7, 5000.0)
    v4 = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
          "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 8, "sliding_window": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-05,
          "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
          "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
          "transformers_version": "4.34.0.dev0", "use_cache": True}
    (tmp_path / "v4.json").write_text(json.dumps(v4))
    b = MistralConfig.from_json(tmp_path / "v4.json")
    assert b == MistralConfig()  # the defaults are Mistral-7B-v0.1
    assert b.num_params() == 7_241_732_096


def test_llama_config_loads_without_window(tmp_path):
    c = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=40,
                                 num_hidden_layers=1)
    c.save_pretrained(tmp_path)
    cfg = MistralConfig.from_json(tmp_path / "config.json")
    assert cfg.model_type == "llama" and cfg.sliding_window is None and cfg.num_key_value_heads == 4


@pytest.mark.parametrize("field,value,message", [
    ("frobnicate", 3, "unknown config field 'frobnicate'"),
    ("attention_bias", True, "attention_bias=True is not implemented"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4}, "rope_parameters"),
    ("model_type", "qwen2", "model_type 'qwen2' is not implemented"),
])
def test_unimplemented_config_fields_are_errors(tmp_path, field, value, message):
    d = MistralConfig().to_hf_dict()
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as e:
        MistralConfig.from_json(tmp_path / "config.json")
    assert "config.json" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Generation


def test_greedy_generate_equals_transformers_token_for_token():
    model, hf = ours_and_hf(tiny_config(sliding_window=8, num_key_value_heads=1), seed=5)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 101, (n,), generator=g).tolist() for n in (5, 11, 2)]
    ours = model.generate(prompts, max_new_tokens=12, temperature=0, eos_id=2)
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      eos_token_id=2)[:, T:].tolist()
    for o, r in zip(ours, ref):
        r = r[:r.index(2) + 1] if 2 in r else r
        assert o == r


def test_kv_cache_decoding_equals_full_recompute_past_the_window():
    model, _ = ours_and_hf(tiny_config(sliding_window=6, vocab_size=101), seed=7)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42]]
    out = model.generate(prompts, max_new_tokens=14, temperature=0, eos_id=-1)  # never stops early
    cache = KVCache(model.config, 1, 64, "cpu", torch.float32)
    assert cache.S == 6  # the rolling cache holds only the window
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(14):  # no cache: the whole sequence every step
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(p):] == o
    assert len(prompts[0]) + 14 > 2 * 6


def test_generate_stops_each_row_at_eos():
    model, _ = ours_and_hf(tiny_config(), seed=3)
    p = [[4, 5, 6], [7, 8]]
    free = model.generate(p, max_new_tokens=6, temperature=0, eos_id=-1)
    eos = free[0][2]  # make row 0 stop at its third token
    out = model.generate(p, max_new_tokens=6, temperature=0, eos_id=eos)
    assert out[0] == free[0][:3]
    assert out[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])


def test_top_k_top_p_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temp, k, p in [(0.7, 10, 0.9), (1.0, None, 0.5), (1.3, 5, None)]:
        ref = TemperatureLogitsWarper(temp)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p:
            ref = TopPLogitsWarper(p)(None, ref)
        allowed = torch.isfinite(ref)
        draws = torch.stack([sample(logits, temp, k, p, torch.Generator().manual_seed(s)) for s in range(400)])
        seen = torch.zeros_like(allowed).scatter_(1, draws.T, True)
        assert not (seen & ~allowed).any()          # never draws a filtered token
        assert (allowed.sum(1) >= 1).all()
        top = ref.argmax(-1)
        assert seen[torch.arange(4), top].all()      # the most likely token does get drawn


def test_saved_directory_with_tokenizer_loads_in_transformers_and_chats_as_we_train(tmp_path):
    mistral_common = pytest.importorskip("mistral_common")
    from data.tokenizer import Tokenizer
    tok = Tokenizer(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"))
    model, _ = ours_and_hf(tiny_config(vocab_size=32000, hidden_size=32, intermediate_size=48,
                                       sliding_window=16))
    model.save_pretrained(tmp_path / "zephyr", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "zephyr")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "zephyr", dtype=torch.float32).eval()
    chat = [{"role": "user", "content": "Name  three   primes, please."},
            {"role": "assistant", "content": "2, 3 and 5."}]
    ids, _ = tok.encode_chat(chat)
    rendered = hf_tok.apply_chat_template(chat, tokenize=False)
    assert hf_tok(rendered, add_special_tokens=False)["input_ids"] == ids  # the template writes the BOS
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= TOL


def test_sampling_frequencies_follow_the_softmax():
    # Inverse-CDF sampling against the probabilities themselves: 40k draws, 4-sigma bounds per token.
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0]]).repeat(40_000, 1)
    p = torch.softmax(logits[0] / 0.8, -1)
    draws = sample(logits, temperature=0.8, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    sigma = (p * (1 - p) / len(draws)).sqrt()
    assert ((freq - p).abs() <= 4 * sigma + 1e-12).all(), (freq, p)
    assert freq[4] == 0
