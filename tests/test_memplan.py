# memplan.py: the arithmetic against a hand computation for Mistral-7B on 8 GPUs, and the plan against the peak of
# live CPU tensors that torch's profiler measures during real training steps (tests/memplan_measure.py).
import dataclasses
import json
import sys

import pytest

import memplan
from conftest import run, torchrun
from model import config_from_preset

GIB = 2**30


@dataclasses.dataclass
class Train:  # the fields memplan reads from sft.py's / dpo.py's Config
    micro_batch_size: int = 4
    seq_len: int = 2048
    activation_checkpointing: bool = True
    mixed_precision: bool = True
    reference: str = "precomputed"


@dataclasses.dataclass
class OneUnit(Train):
    fsdp_unit: str = "model"


def test_mistral_7b_on_8_gpus_by_hand():
    # config/sft_public.json: micro batch 4 x 2048, checkpointing, bf16 compute, 8 ranks.
    p = memplan.plan(config_from_preset("mistral-7b"), Train(), 8, "cuda", "sft")
    items = {name: b for _, name, b in p["items"]}
    # Parameters by hand: per layer q, o 4096x4096; k, v 1024x4096; gate, up, down 4096x14336; 2 norms of 4096.
    layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert layer == 218_112_000
    n = 32 * layer + 2 * 32000 * 4096 + 4096
    assert n == 7_241_732_096 == config_from_preset("mistral-7b").num_params()
    # Every dim 0 (4096, 1024, 14336, 32000) divides by 8: no padding, each rank holds n / 8.
    assert items["parameters (fp32 masters, sharded)"] == 4 * n // 8
    assert items["gradients (fp32, sharded)"] == 4 * n // 8
    assert items["AdamW moments (2 x fp32, sharded)"] == 8 * n // 8
    assert p["persistent"] == 16 * n // 8 == 14_483_464_192                     # 13.49 GiB
    tok = 4 * 2048
    assert items["saved per layer x 32 layers (inputs only: checkpointing)"] == 32 * tok * 4096 * 2   # 2 GiB
    # One layer's saved tensors, bf16 but the norms' fp32 inputs: 2 norms x (4 + 2 + 2) x 4096, q/k/v
    # (4096 + 1024 + 1024) x 2, attention output and o_proj input 2 x 4096 x 2, lse 32 x 4, MLP 4 x 14336 x 2.
    inner = 2 * 8 * 4096 + 6144 * 2 + 2 * 4096 * 2 + 32 * 4 + 4 * 14336 * 2
    assert inner == 209_024
    assert items["one layer recomputed in backward (checkpointing)"] == inner * tok
    assert items["decoder layers unsharded (2 at a time)"] == 2 * 2 * layer
    assert items["one layer's unsharded gradients + reduce-scatter input (fp32)"] == (2 + 2 * 4) * layer
    assert items["root group unsharded (embeddings, norm, LM head)"] == 2 * (2 * 32000 * 4096 + 4096)
    assert items["logits chunk (fp32)"] == 512 * 2**20 // (4 * 32000) * 32000 * 4
    backward = (32 * tok * 4096 * 2 + 2 * 2 * 128 * tok            # layer inputs, rotary tables
                + 2 * (2 * 32000 * 4096 + 4096)                   # root group
                + 2 * 2 * 4096 * tok                              # final hidden states and the target rows' copy
                + inner * tok                                     # the layer being recomputed
                + (3 * 2 * 4096 + 2 * 2 * 14336 + 4 * 4096) * tok  # gradients inside its backward
                + 2 * 2 * layer + (2 + 8) * layer                 # FSDP: 2 layers, 1 layer's grads + RS input
                + 2 * 32000 * 4096                                # the LM head's unsharded bf16 gradient
                + 2 * 4096 * tok)                                 # the gradient of the hidden states
    assert p["moment"] == "backward of the last layer"
    assert p["peak"] == p["persistent"] + backward
    assert p["peak"] / GIB == pytest.approx(21.60, abs=0.01)
    assert p["peak"] <= 30 * GIB                                  # the target; fits 8 x 80 GB
    # Without checkpointing every layer keeps its insides: 71 GiB, at the edge of an 80 GB card.
    no_ac = memplan.plan(config_from_preset("mistral-7b"), Train(activation_checkpointing=False), 8, "cuda", "sft")
    assert no_ac["peak"] - p["peak"] == 31 * inner * tok       # 31 more layers' insides, no recomputed one
    assert no_ac["peak"] / GIB == pytest.approx(71.04, abs=0.01)


def test_stages_print_the_plan_of_their_preset_without_weights_and_exit():
    # sft.py / dpo.py --memplan=WORLD,GPU_GB,MODEL: the plan of the preset as the stage reads it (sft_public: the
    # 21.60 GiB computed by hand above), printed without a process group, data or weights.
    out = run([sys.executable, "sft.py", "config/sft_public.json", "--memplan=8,80,mistral-7b"]).stdout
    assert "planned peak 21.60 GiB (backward of the last layer)" in out and "of 79.1 GiB on the device" in out
    out = run([sys.executable, "sft.py", "config/sft_public.json", "--memplan=4,80,mistral-7b",
               "--activation_checkpointing=false"]).stdout
    p = memplan.plan(config_from_preset("mistral-7b"), Train(activation_checkpointing=False), 4, "cuda", "sft")
    assert f"planned peak {p['peak'] / GIB:.2f} GiB" in out
    out = run([sys.executable, "dpo.py", "config/dpo_public.json", "--memplan=8,80,mistral-7b"]).stdout
    assert "memory plan per rank (dpo, 8 ranks" in out and "planned peak" in out
    bad = run([sys.executable, "sft.py", "--memplan=8"], check=False)
    assert bad.returncode != 0 and "memplan='8': expected WORLD,GPU_GB[,MODEL]" in bad.stderr


def test_dpo_live_reference_and_lora():
    mcfg = config_from_preset("mistral-7b")
    pre = memplan.plan(mcfg, Train(seq_len=1024), 8, "cuda", "dpo")
    live = memplan.plan(mcfg, Train(seq_len=1024, reference="live"), 8, "cuda", "dpo")
    n = mcfg.num_params()
    assert live["persistent"] - pre["persistent"] == 4 * n // 8   # a second, sharded fp32 copy
    # Built with the policy's fsdp_unit: one unit unshards the whole reference (bf16) during its forward.
    one = memplan.plan(mcfg, OneUnit(seq_len=1024, reference="live"), 8, "cuda", "dpo")
    ref_items = {name: b for _, name, b in one["items"]}
    assert ref_items["live reference: whole model unsharded during its forward"] == 2 * n
    assert {name: b for _, name, b in live["items"]}["live reference: root + one layer unsharded during its forward"] \
        == 2 * (2 * 32000 * 4096 + 4096 + 218_112_000)
    # LoRA rank 16 on all seven projections, one GPU: a frozen bf16 base and 16 bytes per adapter parameter.
    lora = memplan.plan(mcfg, LoRA(micro_batch_size=1), 1, "cuda", "sft")
    adapters = 32 * 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + 3 * (4096 + 14336))
    assert adapters == 41_943_040
    items = {name: b for _, name, b in lora["items"]}
    assert items["frozen base parameters (bf16, sharded)"] == 2 * n
    assert items["adapter parameters (fp32, sharded)"] == 4 * adapters
    assert items["AdamW moments (2 x fp32, sharded)"] == 8 * adapters
    assert items["LM head gradient accumulator (fp32)"] == 0      # the head is frozen
    assert 16 * GIB < lora["peak"] < 24 * 0.9 * GIB               # a 24 GB card at micro batch 1


def test_a_step_that_autotunes_adds_the_flush_buffer_and_the_restored_gradient_accumulator():
    # The first step on CUDA: each Triton trial run beside the 256 MiB flush buffer; the LM head's accumulating
    # GEMM also beside a copy of its fp32 accumulator. For sft_public both land after the head: the flush buffer
    # on the backward of the last layer (attention's backward tunes there), the copy in the head.
    mcfg = config_from_preset("mistral-7b")
    p = memplan.plan(mcfg, Train(), 8, "cuda", "sft")
    items = {name: b for _, name, b in p["items"]}
    assert items["Triton's benchmark flush buffer (a step that autotunes)"] == 256 * 2**20
    assert items["LM head gradient copy, restored by its GEMM's tuning"] == 4 * 32000 * 4096
    assert p["first_step_moment"] == p["moment"] == "backward of the last layer"
    assert p["first_step_peak"] == p["peak"] + 256 * 2**20
    # Where each lands, moment by moment: the copy in the head (SFT: its forward, one pass; DPO: its backward),
    # the flush buffer wherever a kernel runs (not in the root group's reduce-scatter).
    for stage, head in (("sft", "end of forward (head)"), ("dpo", "head backward")):
        q = memplan.plan(mcfg, Train(micro_batch_size=1, seq_len=256), 1, "cuda", stage)
        extra = {m: (0 if m.startswith("end of backward") else 256 * 2**20) + (4 * 32000 * 4096 if m == head else 0)
                 for m in q["moments"]}
        assert q["first_step_peak"] == q["persistent"] + max(b + extra[m] for m, b in q["moments"].items())
    frozen = memplan.plan(mcfg, LoRA(micro_batch_size=1), 1, "cuda", "sft")    # no head gradient to restore
    assert frozen["first_step_peak"] == frozen["peak"] + 256 * 2**20
    for cpu in (memplan.plan(mcfg, Train(), 8, "cpu", "sft"), memplan.plan(mcfg, Train(mixed_precision=False), 8,
                                                                          "cuda", "sft")):
        assert cpu["first_step_peak"] == cpu["peak"]                 # no Triton kernels: fp32 on CUDA, or CPU
    # check() holds the first step's peak against the device.
    with pytest.raises(MemoryError, match="first step"):
        memplan.check(p, p["first_step_peak"] / 0.9 - 1, mcfg, Train())
    memplan.check(p, p["first_step_peak"] / 0.9 + 1, mcfg, Train())


@dataclasses.dataclass
class LoRA(Train):
    lora_rank: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def test_check_names_the_knobs():
    mcfg = config_from_preset("mistral-7b")
    p = memplan.plan(mcfg, Train(activation_checkpointing=False), 8, "cuda", "sft")
    with pytest.raises(MemoryError) as e:
        memplan.check(p, 80 * 10**9, mcfg, Train(activation_checkpointing=False))
    msg = str(e.value)
    assert "--activation_checkpointing=true" in msg and "--micro_batch_size=" in msg and "16 GPUs" in msg
    assert "(fits)" in msg.split("\n")[1]                       # checkpointing alone fits 80 GB
    memplan.check(memplan.plan(mcfg, Train(), 8, "cuda", "sft"), 80 * 10**9, mcfg, Train())  # no error


BENCH = dict(vocab_size=32000, hidden_size=256, intermediate_size=896, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, sliding_window=4096, max_position_embeddings=4096, dtype="float32")
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=256, max_position_embeddings=1024, dtype="float32")


@pytest.mark.parametrize("name,model,stage,ranks,ac,unit", [
    ("tiny", TINY, "sft", 1, False, "layer"), ("tiny", TINY, "sft", 2, False, "model"),
    ("tiny", TINY, "dpo", 2, False, "layer"), ("tiny", TINY, "dpo-packed", 1, False, "layer"),
    ("bench", BENCH, "sft", 2, True, "layer"), ("bench", BENCH, "dpo", 1, False, "layer")])
def test_plan_against_measured_cpu_peak(tmp_path, name, model, stage, ranks, ac, unit):
    # Peak of live tensors in torch's CPU allocator (profiler memory events) over 2 optimizer steps of 2
    # micro-steps each, from build to the end, per rank; micro batch 2 (pairs for DPO; packed DPO: 2 rows of two
    # pairs) x 512 tokens. Packed DPO on CPU plans one (T, T) mask per row; SDPA's masks are one per pair (~1.15).
    packed = stage == "dpo-packed"
    spec = dict(model=model, stage="dpo" if packed else stage, packing=packed,
                micro_batch_size=2 if stage.startswith("dpo") else 4 if name == "tiny" else 2,
                seq_len=512, activation_checkpointing=ac, accum=2, fsdp_unit=unit)
    torchrun("tests/memplan_measure.py", [tmp_path / "m.json", json.dumps(spec)], nproc=ranks)
    r = json.loads((tmp_path / "m.json").read_text())
    ratio = r["plan_peak"] / r["measured_peak"]
    print(f"{name} {stage} {ranks} ranks ac={ac} fsdp_unit={unit}: plan {r['plan_peak'] / 2**20:.1f} MiB, measured "
          f"{r['measured_peak'] / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25
    # The persistent part is exact: parameters + gradients + AdamW moments were what the plan says before the
    # first step (parameters only: gradients and moments come with the first backward and step).
    assert r["measured_before"] == pytest.approx(r["plan_persistent"] / 4, rel=0.02)
