# bench.py gpu (benchmarks/gpu.py): the budget, the records and the failure handling, and every part's orchestration
# rehearsed on CPU (tiny shapes, the Triton interpreter, gloo), as CI runs it.
import json
import sys

import pytest
import torch

from benchmarks import gpu
from conftest import run


def records(out):
    return [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]


def test_rehearsal_runs_every_part_ok(tmp_path):
    run([sys.executable, "bench.py", "gpu", "--rehearse", f"--out_dir={tmp_path}"], timeout=600)
    recs = records(tmp_path)
    assert [r["part"] for r in recs] == gpu.PARTS
    assert [r["status"] for r in recs] == ["ok"] * len(gpu.PARTS), [r.get("error") for r in recs]
    assert all(r["seconds"] > 0 and r["rehearse"] for r in recs)
    by = {r["part"]: r for r in recs}
    checks = by["correctness"]["rows"]
    assert len(checks) == 18 and all(c["passed"] and c["error"] <= c["bound"] for c in checks)
    assert {c["check"].split(":")[0] for c in checks} >= {"attention T=40 packed + padding -1", "log-probs one pass"}
    assert [(a["stage"], a["segments"]) for a in by["attention"]["rows"]] == [("sft", True), ("dpo", False)]
    assert {a["method"] for a in by["logprobs"]["rows"]} == {"naive", "recompute", "one-pass"}
    assert by["sft_step"]["tokens_per_s"] > 0 and by["sft_step"]["mfu"] is None       # no peak FLOP/s on a CPU
    for stage in ("sft_stage", "dpo_stage"):
        assert by[stage]["steps"] == 2 and by[stage]["plan_first_step_gib"] > by[stage]["plan_gib"] > 0
    md = (tmp_path / "gpu.md").read_text()
    assert "| correctness | ok |" in md and "| kernel check (bf16 vs fp32 torch) |" in md
    assert not (tmp_path / "work").exists()                                  # data, tokenizer, models: removed


def fake_parts(outcomes):
    calls = []

    def spawn(name, rehearse, work, timeout):
        calls.append((name, timeout))
        return outcomes.get(name, ("ok", {"rows": [], "passed": True}))
    return spawn, calls


def test_parts_over_budget_are_skipped_and_failures_recorded_in_order(tmp_path, monkeypatch):
    # Status by status: a correctness check over its bound fails the part; a killed part is a timeout; a crash is a
    # failure with its output; the parts after them still run. Each record is in gpu.jsonl, in PARTS order.
    spawn, calls = fake_parts({"correctness": ("ok", {"rows": [], "passed": False, "failed": ["log-probs: d weight"]}),
                               "logprobs": ("timeout", "killed after 17 s (the budget's end): ..."),
                               "sft_step": ("failed", "exit 1: Traceback ... CUDA error: an illegal memory access")})
    monkeypatch.setattr(gpu, "spawn_part", spawn)
    recs = gpu.run_gpu(str(tmp_path), budget_s=480, rehearse=True)
    assert [r["status"] for r in recs] == ["failed", "ok", "timeout", "failed", "ok", "ok"]
    assert records(tmp_path) == recs and "illegal memory access" in recs[3]["error"]
    assert all(t <= 480 - gpu.RESERVE_S for _, t in calls)                   # no part may run past the budget
    # 22 s: 17 left after the reserve; the parts estimated above what is left at their turn are skipped.
    spawn, calls = fake_parts({})
    monkeypatch.setattr(gpu, "spawn_part", spawn)
    recs = gpu.run_gpu(str(tmp_path), budget_s=22, rehearse=True)
    est = gpu.REHEARSE_ESTIMATE_S
    assert [r["status"] for r in recs] == ["skipped" if est[p] > 17 else "ok" for p in gpu.PARTS]
    assert "estimated 20 s" in recs[0]["error"] and [c[0] for c in calls] == [p for p in gpu.PARTS if est[p] <= 17]
    assert (tmp_path / "gpu.jsonl.previous").exists()                        # the earlier run's records, kept


def test_a_part_that_hangs_is_killed_and_one_that_crashes_is_recorded(tmp_path):
    status, text = gpu.spawn_part("correctness", True, str(tmp_path), timeout=0.5)
    assert status == "timeout" and text.startswith("killed after 0 s")
    status, text = gpu.spawn_part("no_such_part", True, str(tmp_path), timeout=60)
    assert status == "failed" and "invalid choice: 'no_such_part'" in text


def test_without_a_gpu_every_part_is_skipped_not_a_traceback(tmp_path):
    recs = gpu.run_gpu(str(tmp_path), budget_s=480, rehearse=False)
    assert [r["status"] for r in recs] == ["skipped"] * len(gpu.PARTS)
    assert "no CUDA device" in recs[0]["error"] and recs[0]["gpu"] is None


def test_an_unknown_gpu_gets_its_name_and_no_mfu(tmp_path, monkeypatch):
    import common
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert common.peak_flops(torch.device("cuda")) is None
    step = dict(gpu="NVIDIA L40S", params=1.0e9, batch=[4, 2048], tokens_per_s=9000.0, mfu=None, first_step_s=20.0,
                step_s=0.9, first_step_peak_gib=30.1, peak_gib=29.8)
    head = dict(rehearse=False, gpu="NVIDIA L40S", date="-", commit="-", torch="-", budget_s=480)
    gpu.write_summary(str(tmp_path / "gpu.md"), head, [dict(part="sft_step", status="ok", seconds=40.0, **step)])
    md = (tmp_path / "gpu.md").read_text()
    assert "| NVIDIA L40S | 1.00B | 4 x 2048 | 9000 | n/a | 20.0 | 0.900 | 29.8 (30.1) |" in md
