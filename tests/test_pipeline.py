# run.sh tiny-ablation, shortened (QUICK=1): run.sh tiny (base, dSFT, AI feedback, dDPO, evaluation), then the
# ablation's other rows; every stage runs under run.sh's torchrun and writes what the next stage and the user read.
# One rank (NPROC=1, one thread): the 26 launches' second rank would cost ~55 CPU-s of CI's 2 cores, and each
# stage's own tests check that 2 ranks give the 1-rank result. The numbers of a seconds-long run mean nothing; the
# files and schemas do.
import json
import os
import subprocess

from conftest import ROOT, read_jsonl


ABLATION_ROWS = ["base", "dDPO without dSFT, plain", "dDPO without dSFT", "dSFT", "dSFT + SFT on chosen", "dSFT + dDPO",
                 "dSFT + dDPO, round 2", "dDPO without dSFT (on-policy)", "dSFT + SFT on chosen (on-policy)",
                 "dSFT + dDPO (on-policy)", "dSFT + dDPO, round 2 (on-policy)"]
POOL = {"teacher", "expert", "sloppy", "base", "dsft-step15"}  # QUICK's dSFT runs 30 steps: its export at step 15


def test_quick_tiny_ablation_writes_every_stage_output(tmp_path):
    out = tmp_path / "tiny"
    env = {**os.environ, "QUICK": "1", "OUT": str(out), "SEED": "1", "NPROC": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", "run.sh", "tiny-ablation"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]

    for stage in ("base", "sft", "dpo", "dpo_from_base", "dpo_from_base_plain", "sft_chosen", "dpo2", "dpo_onpolicy",
                  "dpo_from_base_onpolicy", "sft_chosen_onpolicy", "dpo2_onpolicy"):
        hf = out / stage / "hf"
        assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", "train_config.json"} <= set(os.listdir(hf))
        assert read_jsonl(out / stage / "metrics.jsonl")[-1]["step"] >= 2
        assert os.listdir(out / stage / "ckpt")  # a complete DCP checkpoint survives the run
    assert "rewards/accuracies" in read_jsonl(out / "dpo" / "metrics.jsonl")[-1]

    raw = read_jsonl(out / "feedback" / "raw.jsonl")
    assert {"instruction", "source", "prompt_id", "completions"} <= set(raw[0])
    assert {"model", "principle", "response", "annotations"} <= set(raw[0]["completions"][0])
    # The paper's AI feedback: 4 distinct members of the pool per prompt, never the dSFT model being aligned.
    for row in raw:
        drawn = [c["model"] for c in row["completions"]]
        assert len(set(drawn)) == len(drawn) == 4 and set(drawn) <= POOL, drawn
    assert {c["model"] for row in raw for c in row["completions"]} == POOL
    assert {c["model"] for row in read_jsonl(out / "feedback_onpolicy" / "raw.jsonl") for c in row["completions"]} \
        == {"dsft"}
    pairs = read_jsonl(out / "feedback" / "pairs.jsonl")
    assert pairs, "binarization produced no pairs"
    for row in pairs:
        assert {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"} <= set(row)
        assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][-1]["role"] == "assistant"
        assert row["score_chosen"] > row["score_rejected"]

    # The base model started dSFT: its trained on every token of the plain text, dSFT on the assistant tokens only.
    assert json.load(open(out / "sft" / "hf" / "train_config.json"))["init_from"] == str(out / "base" / "hf")
    base_info = json.load(open(out / "data" / "base" / "train.json"))
    assert base_info["n_loss_tokens"] == base_info["n_tokens"] > 0
    for suffix in ("", "_onpolicy"):  # SFT on chosen trains on the chosen answers of exactly the pairs' prompts
        assert {r["prompt_id"] for r in read_jsonl(out / "data" / f"sft_chosen{suffix}_jsonl" / "train.jsonl")} == \
            {r["prompt_id"] for r in read_jsonl(out / "data" / f"pairs{suffix}_jsonl" / "train.jsonl")}

    summary = json.load(open(out / "summary.json"))
    tiny = summary["tiny"]  # run.sh tiny's own summary, kept inside the ablation's
    assert {"sft_score", "dpo_score", "dpo_eval_reward_accuracy", "n_eval_prompts", "seconds"} <= set(tiny)
    assert tiny["n_eval_prompts"] == 32 and 0 <= tiny["sft_score"] <= 1 and 0 <= tiny["dpo_score"] <= 1
    assert [r["name"] for r in summary["rows"]] == ABLATION_ROWS
    for row in summary["rows"]:
        assert row["n"] == 32 and row["score_ci95"][0] <= row["score"] <= row["score_ci95"][1]
        assert abs(sum(row[f"{k}_rate"] for k in ("correct", "disclaimer", "refusal", "format_slip", "wrong")) - 1) < 1e-9
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["dSFT"]["score"] == tiny["sft_score"] and rows["dSFT + dDPO"]["score"] == tiny["dpo_score"]
    assert summary["seconds"] >= tiny["seconds"]
    for procedure in ("paper", "on-policy"):
        b = summary["feedback"][procedure]
        assert sum(b["contrasts"].values()) == b["pairs"] > 0
        assert sum(m["chosen"] for m in b["members"].values()) == b["pairs"]
    assert set(summary["feedback"]["paper"]["members"]) == POOL
    assert tiny["aif"] == "paper" and tiny["feedback"] == summary["feedback"]["paper"]
    stages = ["data", "base", "dsft", "feedback", "dpo", "eval", "summary"]
    assert list(tiny["stage_seconds"]) == stages and all(s >= 0 for s in tiny["stage_seconds"].values())
    assert list(summary["stage_seconds"]) == stages + ["abl_paper", "abl_onpolicy_fb", "abl_onpolicy", "abl_round2",
                                                       "abl_eval"]
    assert "judge score" in p.stdout and "dSFT + dDPO, round 2" in p.stdout
