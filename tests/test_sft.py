# sft.py under torchrun on CPU/gloo: rank counts, node counts and interruptions must not change the result.
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, free_port, run, torchrun
from data.shards import ShardWriter
from model import Mistral

import sys


def write_random_shards(directory, n_train=160, n_test=24, vocab=512, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        with ShardWriter(directory, split, vocab) as w:
            for _ in range(n):
                length = int(rng.integers(6, 40))
                # Learnable: each sequence counts up (mod vocab) from a random start.
                ids = 3 + (rng.integers(0, vocab - 3) + np.arange(length)) % (vocab - 3)
                ids[0] = 1
                mask = np.zeros(length, dtype=np.uint8)
                mask[int(rng.integers(2, length - 2)):] = 1  # an assistant answer at the end
                w.add(ids, mask)
            w.close({"source": "random"})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_data")
    write_random_shards(d)
    return d


def sft_args(data_dir, out_dir, tokenizer, **kw):
    base = dict(init_from="scratch", model_preset="tiny", tokenizer=tokenizer, data_dir=data_dir, out_dir=out_dir,
                seq_len=64, global_batch_size=8, micro_batch_size=2, max_steps=5, lr=3e-3, warmup_ratio=0.2,
                eval_every=5, eval_rows=7, ckpt_every=0, export_dtype="float32")
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out_dir):
    return Mistral.from_pretrained(os.path.join(out_dir, "hf"), dtype=torch.float32).state_dict()


def assert_same_run(a, b, rel=1e-5):
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for key in ("loss", "grad_norm", "lr"):
            assert x[key] == pytest.approx(y[key], rel=rel), (key, x, y)
    wa, wb = weights(a), weights(b)
    for name in wa:
        scale = wa[name].abs().max().item()
        assert (wa[name] - wb[name]).abs().max().item() <= rel * scale, name


@pytest.fixture(scope="module")
def one_rank(data_dir, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    # Plain python, one process: 4 micro-steps of 2 rows make the global batch of 8.
    run([sys.executable, "sft.py", *sft_args(data_dir, out, tiny_tokenizer)])
    return out


def test_loss_falls_and_metrics_are_logged(one_rank):
    m = metrics(one_rank)
    assert len(m) == 5 and m[-1]["loss"] < m[0]["loss"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(m[-1])
    saved = json.load(open(os.path.join(one_rank, "hf", "train_config.json")))
    assert saved["global_batch_size"] == 8


def test_two_ranks_match_one_rank(one_rank, data_dir, tiny_tokenizer, tmp_path):
    # 2 ranks x 2 micro-steps x 2 rows = the same 8 rows per step, with gradient accumulation on each rank.
    torchrun("sft.py", sft_args(data_dir, tmp_path, tiny_tokenizer), nproc=2)
    assert_same_run(one_rank, tmp_path)


def test_two_nodes_match_one_node(one_rank, data_dir, tiny_tokenizer, tmp_path):
    # Two torchrun "nodes" on localhost (c10d rendezvous), one process each.
    import subprocess
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=sft-test", "sft.py", *sft_args(data_dir, tmp_path, tiny_tokenizer)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-5000:]
    assert_same_run(one_rank, tmp_path)


def test_stopped_and_resumed_run_equals_uninterrupted(one_rank, data_dir, tiny_tokenizer, tmp_path):
    args = sft_args(data_dir, tmp_path, tiny_tokenizer, ckpt_every=2)
    # "Interrupted" after step 3: checkpoints at 2 only; step 3's work is lost and redone.
    run([sys.executable, "sft.py", *args, "--stop_after=3"])
    ckpts = sorted(os.listdir(tmp_path / "ckpt"))
    assert ckpts == ["step_0000002"]
    torchrun("sft.py", [*args, "--resume=true"], nproc=2)  # and resumed on another number of ranks
    assert_same_run(one_rank, tmp_path)


def test_pack_never_splits_examples_and_fills_rows():
    from sft import pack
    lengths = np.array([10, 30, 25, 5, 64, 70, 1])
    rows = pack(lengths, np.arange(7), 64, packing=True)
    assert rows == [[0, 1], [2, 3], [4], [5], [6]]
    assert pack(lengths, np.arange(7), 64, packing=False) == [[i] for i in range(7)]


def test_targets_are_next_assistant_tokens_within_each_segment(data_dir):
    from data.shards import Shards
    from sft import make_batch
    shards = Shards(data_dir, "train")
    batch = make_batch(shards, [[0, 1, 2]], 128, packing=True)
    t = batch["targets"][0].tolist()
    pos = 0
    for s, i in enumerate([0, 1, 2]):
        ids, mask = shards[i]
        n = len(ids)
        for j in range(n - 1):
            expect = int(ids[j + 1]) if mask[j + 1] else -100
            assert t[pos + j] == expect
        assert t[pos + n - 1] == -100  # never predict across the boundary into the next example
        assert (batch["segment_ids"][0, pos:pos + n] == s).all()
        pos += n
    assert all(x == -100 for x in t[pos:])
