#!/usr/bin/env bash
# The whole Zephyr pipeline: dSFT -> AI feedback -> dDPO -> evaluation (MT-Bench, AlpacaEval).
#
#   bash run.sh tiny        every stage on 2 CPU cores in minutes, on generated checkable tasks (data/tiny); AI
#                           feedback as the paper collects it (a pool of other models answers each prompt), or
#                           with AIF=on-policy the dSFT model's own samples
#   bash run.sh tiny-ablation   tiny, then the paper's ablation (Table 3) in miniature for both procedures of AI
#                           feedback: base, dDPO without dSFT, dSFT, dSFT + SFT on chosen, dSFT + dDPO, round 2
#   bash run.sh zephyr-7b   the public zephyr-7b recipe (config/sft_public.json, config/dpo_public.json) on a GPU
#                           node, paths from the environment (below); the paper's recipe is the defaults of
#                           sft.py's and dpo.py's Config (global batch 512 / 32, 3 DPO epochs at beta 0.1)
#
# Environment: SEED (tiny, default 0), N_BASE / N_SFT (tiny: base-text documents / SFT examples), NPROC (ranks per node; tiny: 2, zephyr-7b: all GPUs), OUT (output root),
# LORA (tiny: adapter rank for dSFT and dDPO; 0 = full fine-tuning, the default); AIF (tiny: paper or on-policy);
# zephyr-7b's evaluation: JUDGE, MT_BENCH_DIR, ALPACA_EVAL_DIR, ALPACA_BASELINE (see zephyr_7b below).
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
recipe="${1:-}"
shift || true
start=$(date +%s)
say() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }
run() { echo "+ $*"; "$@"; }

# The stage launcher for $1 ranks, into the caller's array tr: torchrun, or for one rank plain python
# (common.setup_dist makes a one-rank group) without torchrun's launcher, which costs ~1.5 CPU-s a stage.
launcher() {
  tr=(python)
  [ "$1" = 1 ] || tr=(python -m torch.distributed.run --standalone --nproc_per_node="$1")
}

tiny() {
  local seed="${SEED:-0}" nproc="${NPROC:-2}" out="${OUT:-out/tiny}" aif="${AIF:-paper}"
  local tr
  launcher "$nproc"
  case "$aif" in paper|on-policy) ;; *) echo "AIF=$aif: choose paper (the default) or on-policy" >&2; exit 2 ;; esac
  # Ranks share the cores: one thread each (an OMP_NUM_THREADS you set is kept).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}"
  mkdir -p "$out"
  stages="$out/stages.tsv"
  : > "$stages"
  # QUICK=1 (the CI test) shortens every stage; the numbers are then meaningless, the plumbing is not.
  local base_extra=() sft_extra=() fb_extra=() onpolicy_extra=() dpo_extra=() ev_extra=() data_extra=()
  early=100  # the step of the dSFT export that joins the AI-feedback pool (sft_tiny.json: export_every=100)
  if [ "${QUICK:-0}" = 1 ]; then
    data_extra=(--n_sft 2000 --n_sft_test 64 --n_feedback 64 --n_eval 32 --n_base 2000 --n_base_test 64)
    base_extra=(--max_steps=20 --eval_every=10 --ckpt_every=10)
    early=15
    sft_extra=(--max_steps=30 --eval_every=15 --ckpt_every=15 --export_every=15)
    fb_extra=(--max_new_tokens=24 --judge=data.tiny.tasks:graded_judge)
    onpolicy_extra=(--answers_per_member=4)
    dpo_extra=(--max_steps=2 --global_batch_size=4 --micro_batch_size=2 --eval_every=2)
    ev_extra=(--max_new_tokens=24)
  fi
  # LORA=R: dSFT and dDPO through rank-R adapters on frozen weights (lora.py; docs/lora.md).
  # LORA_SFT_ARGS / LORA_DPO_ARGS add flags to one stage, e.g. LORA_SFT_ARGS="--lr=1e-2 --lora_alpha=32".
  if [ "${LORA:-0}" != 0 ]; then
    sft_extra+=(--lora_rank="$LORA" ${LORA_SFT_ARGS:-})
    dpo_extra+=(--lora_rank="$LORA" ${LORA_DPO_ARGS:-})
  fi

  stage data "1/7 data: generated tasks, tokenizer, base-text and SFT shards"
  run python data/tiny/prepare.py --out "$out/data" --seed "$seed" --n_base "${N_BASE:-40000}" \
      --n_sft "${N_SFT:-20000}" "${data_extra[@]}"
  run python data/ultrachat/prepare.py --tokenizer "$out/data/tokenizer.model" --out "$out/data/base" \
      --train "$out/data/base_train.jsonl" --test "$out/data/base_test.jsonl"
  run python data/ultrachat/prepare.py --tokenizer "$out/data/tokenizer.model" --out "$out/data/sft" \
      --train "$out/data/sft_train.jsonl" --test "$out/data/sft_test.jsonl"

  stage base "2/7 base model: pre-train a tiny Mistral from random init on plain text of the task world, loss on every token"
  run "${tr[@]}" sft.py config/base_tiny.json --seed="$seed" --tokenizer="$out/data/tokenizer.model" \
      --data_dir="$out/data/base" --out_dir="$out/base" --overwrite=true "${base_extra[@]}"

  stage dsft "3/7 dSFT from the base model"
  run "${tr[@]}" sft.py config/sft_tiny.json --seed="$seed" --init_from="$out/base/hf" \
      --data_dir="$out/data/sft" --out_dir="$out/sft" --overwrite=true "${sft_extra[@]}"

  if [ "$aif" = paper ]; then
    stage feedback "4/7 AI feedback: 4 members of a pool of 5 answer each prompt (not the SFT model), the tasks' judge rates them, binarization"
    feedback_pairs config/feedback_tiny.json feedback pairs --models="$(pool)"
  else
    stage feedback "4/7 AI feedback (on-policy, AIF=on-policy): the SFT model samples 8 answers, the tasks' judge rates them, binarization"
    feedback_pairs config/feedback_onpolicy_tiny.json feedback pairs --models="$out/sft/hf|name=dsft" "${onpolicy_extra[@]}"
  fi

  stage dpo "5/7 dDPO from the SFT model"
  run "${tr[@]}" dpo.py config/dpo_tiny.json --seed="$seed" --init_from="$out/sft/hf" --data_dir="$out/data/pairs" \
      --out_dir="$out/dpo" --overwrite=true "${dpo_extra[@]}"

  stage eval "6/7 evaluation with eval.py: both models answer the held-out prompts greedily, the tasks' judge grades them"
  # The held-out prompts as one-turn MT-Bench questions, graded through eval.py's single-v1 prompt by the tasks'
  # judge (data/tiny/report.py); then AlpacaEval's procedure head to head, DPO's answers against SFT's.
  run python data/tiny/report.py questions "$out/data/eval_prompts.jsonl" "$out/data/eval_questions.jsonl"
  evaluate sft sft
  evaluate dpo dpo
  run python eval.py --bench=alpaca_eval --instructions="$out/eval_sft/model_outputs.json" \
      --baseline="$out/eval_sft/model_outputs.json" --answers="$out/eval_dpo/model_outputs.json" \
      --judge=data.tiny.report:pairwise_judge --out_dir="$out/eval_dpo_vs_sft" --resume=false

  stage summary "7/7 summary"
  run python data/tiny/report.py summary "$out" --seconds "$(( $(date +%s) - start ))" --aif "$aif" \
      --stages "$stages"
}

# Start of a timed stage: its seconds go into the summary (report.py --stages).
stage() {
  local name="$1"
  shift
  say "$@"
  printf '%s\t%s\n' "$name" "$(date +%s.%N)" >> "$stages"
}

# The paper's AI-feedback pool (config/feedback_tiny.json, docs/tiny.md "The AI-feedback pool"): three function members
# (data/tiny/pool.py) and two local models, none of them the dSFT model being aligned. Needs tiny's locals.
pool() {
  echo "data.tiny.pool:teacher|name=teacher;data.tiny.pool:expert|name=expert;data.tiny.pool:sloppy|name=sloppy;$out/base/hf|name=base;$out/sft/hf_step_$early|name=dsft-step$early"
}

# AI feedback with PRESET (and more flags) on the feedback prompts into $out/FEEDBACK, its pairs split and
# tokenized into $out/data/PAIRS. Needs tiny's locals (out, seed, tr, fb_extra).
feedback_pairs() {
  local preset="$1" fb="$2" pairs="$3"
  shift 3
  run "${tr[@]}" feedback.py "$preset" --seed="$seed" --prompts="$out/data/feedback_prompts.jsonl" \
      --out_dir="$out/$fb" --resume=false "${fb_extra[@]}" "$@"
  run python data/tiny/report.py split "$out/$fb/pairs.jsonl" "$out/data/${pairs}_jsonl"
  run python data/ultrafeedback/prepare.py --tokenizer "$out/data/tokenizer.model" --out "$out/data/$pairs" \
      --train "$out/data/${pairs}_jsonl/train.jsonl" --test "$out/data/${pairs}_jsonl/test.jsonl" \
      --max_prompt_length 128 --max_length 256
}

# Greedy answers of $out/STAGE/hf to the held-out prompts, judged (eval.py) into $out/eval_NAME.
evaluate() {
  local name="$1" stage="$2"
  run "${tr[@]}" eval.py config/eval_tiny.json --questions="$out/data/eval_questions.jsonl" \
      --model="$out/$stage/hf" --model_id="tiny-$name" --out_dir="$out/eval_$name" --resume=false "${ev_extra[@]}"
  run python data/tiny/report.py outputs "$out/eval_$name/answers.jsonl" "$out/data/eval_questions.jsonl" \
      "$out/eval_$name/model_outputs.json"
}

# DPO from $out/INIT/hf on $out/data/PAIRS into $out/NAME (dpo_tiny.json, and more flags).
dpo_from() {
  local init="$1" pairs="$2" name="$3"
  shift 3
  run "${tr[@]}" dpo.py config/dpo_tiny.json --seed="$seed" --init_from="$out/$init/hf" --data_dir="$out/data/$pairs" \
      --out_dir="$out/$name" --overwrite=true "${dpo_extra[@]}" "$@"
}

# One more SFT of the dSFT model on the chosen answers of $out/data/PAIRS into $out/NAME.
sft_on_chosen() {
  local pairs="$1" name="$2"
  run python data/tiny/report.py chosen "$out/data/${pairs}_jsonl" "$out/data/${name}_jsonl"
  run python data/ultrachat/prepare.py --tokenizer "$out/data/tokenizer.model" --out "$out/data/$name" \
      --train "$out/data/${name}_jsonl/train.jsonl" --test "$out/data/${name}_jsonl/test.jsonl"
  run "${tr[@]}" sft.py config/sft_chosen_tiny.json --seed="$seed" --init_from="$out/sft/hf" \
      --data_dir="$out/data/$name" --out_dir="$out/$name" --overwrite=true "${chosen_extra[@]}"
}

# tiny (with the paper's AI feedback), then the other rows of the paper's Table 3 for both procedures of AI
# feedback: the paper's (a pool of other models answers) and on-policy (the dSFT model's own samples).
tiny_ablation() {
  OUT="${OUT:-out/tiny-ablation}"
  if [ "${AIF:-paper}" != paper ]; then
    echo "run.sh tiny-ablation runs both procedures of AI feedback itself; unset AIF" >&2
    exit 2
  fi
  tiny
  local seed="${SEED:-0}" nproc="${NPROC:-2}" out="$OUT"
  local tr
  launcher "$nproc"
  local fb_extra=() onpolicy_extra=() dpo_extra=() ev_extra=() chosen_extra=()
  if [ "${QUICK:-0}" = 1 ]; then
    fb_extra=(--max_new_tokens=24 --judge=data.tiny.tasks:graded_judge)
    onpolicy_extra=(--answers_per_member=4)
    dpo_extra=(--max_steps=2 --global_batch_size=4 --micro_batch_size=2 --eval_every=2)
    chosen_extra=(--max_steps=2 --global_batch_size=4 --micro_batch_size=2 --eval_every=2)
    ev_extra=(--max_new_tokens=24)
  fi

  stage abl_paper "ablation 1/5: the paper's AI feedback: dDPO without dSFT (our NLL term, and the paper's plain loss); dSFT + SFT on chosen"
  dpo_from base pairs dpo_from_base
  dpo_from base pairs dpo_from_base_plain --rpo_alpha=0
  sft_on_chosen pairs sft_chosen

  stage abl_onpolicy_fb "ablation 2/5: on-policy AI feedback: the dSFT model samples 8 answers per prompt"
  feedback_pairs config/feedback_onpolicy_tiny.json feedback_onpolicy pairs_onpolicy --models="$out/sft/hf|name=dsft" \
      "${onpolicy_extra[@]}"

  stage abl_onpolicy "ablation 3/5: on-policy: dSFT + dDPO, dDPO without dSFT, dSFT + SFT on chosen"
  dpo_from sft pairs_onpolicy dpo_onpolicy
  dpo_from base pairs_onpolicy dpo_from_base_onpolicy
  sft_on_chosen pairs_onpolicy sft_chosen_onpolicy

  stage abl_round2 "ablation 4/5: round 2 (on-policy by nature): AI feedback on each dDPO model's own samples, then DPO again from it"
  feedback_pairs config/feedback_onpolicy_tiny.json feedback2 pairs2 --models="$out/dpo/hf|name=ddpo" "${onpolicy_extra[@]}"
  dpo_from dpo pairs2 dpo2
  feedback_pairs config/feedback_onpolicy_tiny.json feedback2_onpolicy pairs2_onpolicy --models="$out/dpo_onpolicy/hf|name=ddpo" \
      "${onpolicy_extra[@]}"
  dpo_from dpo_onpolicy pairs2_onpolicy dpo2_onpolicy

  stage abl_eval "ablation 5/5: evaluate the other models on the same held-out prompts; the table"
  local name
  for name in base dpo_from_base dpo_from_base_plain sft_chosen dpo2 dpo_onpolicy dpo_from_base_onpolicy \
              sft_chosen_onpolicy dpo2_onpolicy; do
    evaluate "$name" "$name"
  done
  stage summary "summary"
  run python data/tiny/report.py ablation "$out" --seconds "$(( $(date +%s) - start ))" --stages "$stages" \
      --feedback "paper=feedback" "on-policy=feedback_onpolicy" \
      --rows "base=eval_base" "dDPO without dSFT, plain=eval_dpo_from_base_plain" \
      "dDPO without dSFT=eval_dpo_from_base" "dSFT=eval_sft" \
      "dSFT + SFT on chosen=eval_sft_chosen" "dSFT + dDPO=eval_dpo" "dSFT + dDPO, round 2=eval_dpo2" \
      "dDPO without dSFT (on-policy)=eval_dpo_from_base_onpolicy" \
      "dSFT + SFT on chosen (on-policy)=eval_sft_chosen_onpolicy" "dSFT + dDPO (on-policy)=eval_dpo_onpolicy" \
      "dSFT + dDPO, round 2 (on-policy)=eval_dpo2_onpolicy"
}

zephyr_7b() {
  # The public recipe (config/*_public.json) on one node of GPUs; several nodes: run sft.py / dpo.py under your
  # launcher's torchrun with --nnodes (README).
  local nproc="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}" out="${OUT:-out/zephyr-7b}"
  local missing=()
  [ -n "${MISTRAL_DIR:-}" ] && [ -f "${MISTRAL_DIR}/config.json" ] && [ -f "${MISTRAL_DIR}/tokenizer.model" ] \
    || missing+=("MISTRAL_DIR: a Mistral-7B-v0.1 directory with config.json, tokenizer.model and *.safetensors (now '${MISTRAL_DIR:-}')")
  [ -n "${ULTRACHAT_DIR:-}" ] && ls "${ULTRACHAT_DIR}"/data/train_sft-*.parquet >/dev/null 2>&1 \
    || missing+=("ULTRACHAT_DIR: ultrachat_200k as downloaded, with data/train_sft-*.parquet (now '${ULTRACHAT_DIR:-}')")
  [ -n "${ULTRAFEEDBACK_DIR:-}" ] && ls "${ULTRAFEEDBACK_DIR}"/data/train_prefs-*.parquet >/dev/null 2>&1 \
    || missing+=("ULTRAFEEDBACK_DIR: ultrafeedback_binarized as downloaded, with data/train_prefs-*.parquet (now '${ULTRAFEEDBACK_DIR:-}')")
  ls "${MISTRAL_DIR:-/nonexistent}"/*.safetensors >/dev/null 2>&1 || missing+=("MISTRAL_DIR: no *.safetensors weights")
  python -c "import pyarrow" 2>/dev/null || missing+=("pyarrow (pip install pyarrow): the datasets are parquet files")
  [ "$nproc" -ge 1 ] 2>/dev/null || missing+=("GPUs: nvidia-smi lists none; set NPROC")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "run.sh zephyr-7b: cannot start, missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
  fi
  local tr=(torchrun --standalone --nproc_per_node="$nproc")
  say "1/5 tokenize ultrachat_200k and ultrafeedback_binarized"
  run python data/ultrachat/prepare.py --tokenizer "$MISTRAL_DIR/tokenizer.model" --input "$ULTRACHAT_DIR" \
      --out "$out/data/ultrachat" --workers 8
  run python data/ultrafeedback/prepare.py --tokenizer "$MISTRAL_DIR/tokenizer.model" --input "$ULTRAFEEDBACK_DIR" \
      --out "$out/data/ultrafeedback" --workers 8
  say "2/5 dSFT (resumes from its last checkpoint if interrupted)"
  run "${tr[@]}" sft.py config/sft_public.json --init_from="$MISTRAL_DIR" --data_dir="$out/data/ultrachat" \
      --out_dir="$out/sft" --resume=true
  say "3/5 AI feedback: optional here; ultrafeedback_binarized is that stage's public output (feedback.py)"
  say "4/5 dDPO"
  run "${tr[@]}" dpo.py config/dpo_public.json --init_from="$out/sft/hf" --data_dir="$out/data/ultrafeedback" \
      --out_dir="$out/dpo" --resume=true
  say "5/5 evaluation: MT-Bench and AlpacaEval (eval.py)"
  # JUDGE: an endpoint spec, e.g. "https://api.openai.com/v1|model=gpt-4|key_env=OPENAI_API_KEY"; MT_BENCH_DIR:
  # FastChat's data/mt_bench (question.jsonl, reference_answer/gpt-4.jsonl); ALPACA_EVAL_DIR: alpaca_eval.json and
  # the baseline's outputs (ALPACA_BASELINE, default gpt4_1106_preview.json), both as downloaded.
  if [ -n "${JUDGE:-}" ] && [ -f "${MT_BENCH_DIR:-/nonexistent}/question.jsonl" ]; then
    run "${tr[@]}" eval.py config/eval_mt_bench.json --model="$out/dpo/hf" --model_id=zephyr-7b-ours \
        --questions="$MT_BENCH_DIR/question.jsonl" --reference_answers="$MT_BENCH_DIR/reference_answer/gpt-4.jsonl" \
        --judge="$JUDGE" --out_dir="$out/eval/mt_bench"
  else
    echo "MT-Bench skipped: set JUDGE (an endpoint spec) and MT_BENCH_DIR (FastChat's data/mt_bench) to run it"
  fi
  if [ -n "${JUDGE:-}" ] && [ -f "${ALPACA_EVAL_DIR:-/nonexistent}/alpaca_eval.json" ]; then
    run "${tr[@]}" eval.py config/eval_alpaca_eval.json --model="$out/dpo/hf" --model_id=zephyr-7b-ours \
        --instructions="$ALPACA_EVAL_DIR/alpaca_eval.json" \
        --baseline="$ALPACA_EVAL_DIR/${ALPACA_BASELINE:-gpt4_1106_preview.json}" --judge="$JUDGE" \
        --out_dir="$out/eval/alpaca_eval"
  else
    echo "AlpacaEval skipped: set JUDGE (an endpoint spec) and ALPACA_EVAL_DIR (alpaca_eval.json + baseline outputs)"
  fi
  echo "done in $(( $(date +%s) - start )) s: $out/dpo/hf loads in transformers and vLLM (README)"
}

case "$recipe" in
  tiny) tiny ;;
  tiny-ablation) tiny_ablation ;;
  zephyr-7b) zephyr_7b ;;
  *) echo "usage: bash run.sh tiny | tiny-ablation | zephyr-7b" >&2; exit 2 ;;
esac
