# run.sh tiny, shortened (QUICK=1): every stage runs under torchrun with 2 ranks and writes what the next
# stage and the user read. The numbers of a seconds-long run mean nothing; the files and schemas do.
import json
import os
import subprocess

from conftest import ROOT, read_jsonl


def test_quick_tiny_pipeline_writes_every_stage_output(tmp_path):
    out = tmp_path / "tiny"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "SEED": "1"}
    p = subprocess.run(["bash", "run.sh", "tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]

    for stage in ("sft", "dpo"):
        hf = out / stage / "hf"
        assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "train_config.json"} <= set(os.listdir(hf))
        assert read_jsonl(out / stage / "metrics.jsonl")[-1]["step"] >= 2
        assert os.listdir(out / stage / "ckpt")  # a complete DCP checkpoint survives the run
    assert "rewards/accuracies" in read_jsonl(out / "dpo" / "metrics.jsonl")[-1]

    raw = read_jsonl(out / "feedback" / "raw.jsonl")
    assert {"instruction", "source", "prompt_id", "completions"} <= set(raw[0])
    assert {"model", "principle", "response", "annotations"} <= set(raw[0]["completions"][0])
    pairs = read_jsonl(out / "feedback" / "pairs.jsonl")
    assert pairs, "binarization produced no pairs"
    for row in pairs:
        assert {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"} <= set(row)
        assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][-1]["role"] == "assistant"
        assert row["score_chosen"] > row["score_rejected"]

    summary = json.load(open(out / "summary.json"))
    assert {"sft_score", "dpo_score", "dpo_eval_reward_accuracy", "n_eval_prompts", "seconds"} <= set(summary)
    assert summary["n_eval_prompts"] == 32 and 0 <= summary["sft_score"] <= 1 and 0 <= summary["dpo_score"] <= 1
    assert "judge score" in p.stdout
