"""The paper's evaluation: MT-Bench (FastChat's llm_judge, single-answer grading) and AlpacaEval (alpaca_eval's
weighted GPT-4-turbo annotator, win rate and length-controlled win rate), with any judge.

    python eval.py --bench=mt_bench --model=DIR_OR_ENDPOINT --questions=question.jsonl --judge=SPEC \
        [--reference_answers=gpt-4.jsonl] [--judge_prompts=judge_prompts.jsonl] --out_dir=OUT
    python eval.py --bench=alpaca_eval --model=DIR_OR_ENDPOINT --instructions=alpaca_eval.json \
        --baseline=BASELINE_OUTPUTS.json --judge=SPEC [--instruction_difficulty=FILE] --out_dir=OUT
    torchrun --nproc_per_node=8 eval.py ...        # local models: each rank generates and judges its batches

`model` and `judge` take feedback.py's forms: a local Hugging Face directory (chats rendered with the Zephyr
template, encode_chat), or an endpoint `URL|model=NAME[|key_env=VAR]` (the server applies the model's own chat
template); the judge may also be `module:function`, called with the judge's chat messages (a list of
{role, content}) and returning the judge's reply text (or, for AlpacaEval, a dict {"text", "top_logprobs":
{"m": logprob, "M": logprob}}: odds, so that a rule-based judge can call a draw). `--answers=FILE` skips
generation and judges existing answers: FastChat's answer file (MT-Bench) or alpaca_eval's outputs file (AlpacaEval).

MT-Bench, as FastChat does it: each question's turns are answered in order, turn 2 with turn 1 and its answer
in context; temperature by category (below); up to 1024 new tokens. Each turn is graded 1-10 with the prompts
`single-v1` (turn 1) and `single-v1-multi-turn` (turn 2), or their `-math` forms with a reference answer for
math, reasoning and coding. Our own text of those prompts ships in data/eval/mt_bench_judge_prompts.jsonl
(FastChat's schema); `--judge_prompts` reads FastChat's judge_prompts.jsonl instead, for exact comparability.
The score is read from `[[N]]`, else `[N]`; a reply with neither (or a failed request) scores -1 and is left out
of the means, as FastChat does, and counted in summary.json's n_failed. Outputs:
    answers.jsonl     FastChat's answer schema: question_id, answer_id, model_id, choices [{index, turns}], tstamp
    judgments.jsonl   FastChat's single-judgment schema: question_id, model, judge [judge, prompt name],
                      user_prompt, judgment, score, turn, tstamp (FastChat's show_result.py reads it)
    summary.json      bench, score, turn_1, turn_2, categories, n_judged, n_failed, ...

AlpacaEval, as weighted_alpaca_eval_gpt4_turbo does it: one prompt per instruction showing the baseline's and
the model's outputs as "m" (shown first) and "M", in an order flipped or not by a hash of the instruction text;
an endpoint judge is asked for one token with its top-5 logprobs and the preference is 2 - p(m) / (p(m) + p(M)),
mapped back to (baseline 1, model 2); a local judge gives the same from its next-token probabilities; a function
judge, or an endpoint that sends no logprobs, gives 1 or 2 by the first standalone m or M of its reply. Our own
prompt text is data/eval/alpaca_eval_judge.txt (alpaca_eval's file format); `--judge_prompt` reads alpaca_eval's
annotator prompt file instead. Outputs:
    model_outputs.json  alpaca_eval's schema: instruction, output, generator, dataset (alpaca_eval reads it)
    annotations.json    instruction, output_1 (baseline), generator_1, output_2 (model), generator_2, annotator,
                        preference (1 baseline, 2 model, null when the judge gave none), raw_completion, ...
    summary.json        bench, win_rate, standard_error, length_controlled_win_rate, n, n_failed, avg_length, ...
Win rate = mean(preference - 1) x 100 over the annotated instructions, standard error = its sem. The length-
controlled win rate fits alpaca_eval's GLM, logit p(model wins) = a tanh(delta_len / std) + b difficulty + c
(delta_len = baseline minus model length in characters), by maximum likelihood with the soft preferences as
targets, and averages the predicted win probability at delta_len = 0. The difficulty term is there only with
--instruction_difficulty (alpaca_eval's published per-instruction file); without it the GLM has the length
and model terms alone. alpaca_eval fits with sklearn's cross-validated L2 penalty and pulls the weights toward
the baseline's; we fit the plain maximum-likelihood GLM, so LC can differ from theirs in the decimals.

Both benches run through generation.run_in_parts: per-rank part files, fsynced per question, so a killed run resumes
where it stopped and its outputs equal an uninterrupted run's (tstamp fields aside: they are wall-clock times);
the number of ranks does not change them either.
"""

import ast
import hashlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import common
import generation
from files import parse_rows, write_json, write_jsonl
from generation import Endpoint, LocalModel, load_client, parse_spec, seed_of
from data.eval.formats import (NEED_REF_CATS, parse_instruction, parse_question, prompt_name, read_answer_turns,
                               read_difficulty, read_judge_prompts, read_outputs, read_prompt_file)
from data.tokenizer import render_chat

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    bench: str = "mt_bench"           # mt_bench | alpaca_eval
    model: str = ""                   # PATH | URL|model=NAME[|key_env=VAR]: the model under evaluation
    model_id: str = ""                # its name in the outputs (default: the spec's name, or the answers file's)
    answers: str = ""                 # existing answers to judge instead of generating (FastChat's / alpaca_eval's)
    judge: str = ""                   # PATH | URL|model=NAME|key_env=VAR | module:function
    out_dir: str = "out/eval"
    # MT-Bench
    questions: str = ""               # FastChat's question.jsonl: question_id, category, turns, reference?
    judge_prompts: str = "data/eval/mt_bench_judge_prompts.jsonl"   # relative: to the cwd, else to eval.py
    reference_answers: str = ""       # FastChat's reference_answer/gpt-4.jsonl (else the questions' "reference")
    # AlpacaEval
    instructions: str = ""            # alpaca_eval.json (a JSON list) or .jsonl: instruction, dataset
    baseline: str = ""                # the baseline's outputs in alpaca_eval's schema (instruction, output, generator)
    judge_prompt: str = "data/eval/alpaca_eval_judge.txt"
    instruction_difficulty: str = ""  # .csv/.json/.jsonl: instruction_difficulty with index (row) or instruction
    # Generation: the benchmarks' defaults unless given
    max_new_tokens: int = 1024
    temperature: float | None = None  # None: MT-Bench's per-category temperatures; AlpacaEval 0.7
    top_p: float = 1.0
    # Judge: FastChat asks GPT-4 at temperature 0 for up to 2048 tokens; AlpacaEval asks for 1 token + top-5 logprobs
    judge_temperature: float = 0.0
    judge_max_tokens: int = 2048
    batch_size: int = 8               # questions / instructions per batch
    max_items: int = -1               # > 0: only the first N questions / instructions
    seed: int = 0
    resume: bool = True
    strict: bool = False              # a malformed question / instruction row stops the run instead of being skipped
    request_timeout: float = 300.0
    max_attempts: int = 5
    backoff_s: float = 2.0
    concurrency: int = 8
    dtype: str = "auto"
    device: str = "auto"
    rehearse_gpu: bool = False        # TRITON_INTERPRET=1: local models on CUDA's path (Triton, bf16) on CPU


RESUME_FREE = {"resume", "strict", "request_timeout", "max_attempts", "backoff_s", "concurrency", "device"}

# -----------------------------------------------------------------------------
# MT-Bench (FastChat llm_judge): its constants

TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
                "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
DEFAULT_TEMPERATURE = 0.7             # a category FastChat does not list; also AlpacaEval's default here
SCORE_RE, SCORE_RE_BACKUP = re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]")
ERROR_OUTPUT = "$ERROR$"              # FastChat's text for an answer or judgment that could not be had


def read_questions(cfg):
    questions, malformed = parse_rows(cfg.questions, parse_question, "questions", cfg.strict, cfg.max_items)
    seen = set()
    for q in questions:
        if q["question_id"] in seen:
            raise ValueError(f"{cfg.questions}: question_id {q['question_id']!r} appears twice")
        seen.add(q["question_id"])
    return [dict(index=i, **q) for i, q in enumerate(questions)], malformed


def question_temperature(q, cfg):
    t = cfg.temperature if cfg.temperature is not None else TEMPERATURES.get(q["category"], DEFAULT_TEMPERATURE)
    return 0.0 if t < 1e-4 else t  # FastChat samples only from 1e-4 up: below that it is greedy


def answer_mt_bench(model, batch, j, cfg, device):
    """turns[i] per question of the batch: turn t answered with the earlier turns and answers in context. Local
    sampling draws from a generator seeded by (seed, batch, turn, temperature): a recomputed batch redraws the same.
    Returns (turns, errors, tokens)."""
    turns = [[] for _ in batch]
    errors = [None] * len(batch)
    tokens = 0
    for t in range(max(len(q["turns"]) for q in batch)):
        todo = [i for i, q in enumerate(batch) if t < len(q["turns"]) and errors[i] is None]
        for temp in sorted({question_temperature(batch[i], cfg) for i in todo}):
            group = [i for i in todo if question_temperature(batch[i], cfg) == temp]
            chats = []
            for i in group:
                chat = []
                for k in range(t + 1):
                    chat.append({"role": "user", "content": batch[i]["turns"][k]})
                    if k < t:
                        chat.append({"role": "assistant", "content": turns[i][k]})
                chats.append(chat)
            gen = torch.Generator(device=device).manual_seed(seed_of(cfg.seed, "answer", j, t, temp))
            for i, r in zip(group, model.generate(chats, cfg.max_new_tokens, temp, cfg.top_p, gen)):
                tokens += r["tokens"]
                if r["error"] is not None:
                    errors[i] = f"turn {t + 1}: {r['error']}"
                turns[i].append(r["text"].strip() if r["text"] is not None else ERROR_OUTPUT)
        for i, q in enumerate(batch):  # a failed turn ends the conversation: the later turns cannot be asked
            turns[i] += [ERROR_OUTPUT] * (len(q["turns"]) - len(turns[i])) if errors[i] else []
    return turns, errors, tokens


def judge_messages(q, answer_turns, turn, prompts, ref):
    """(prompt name, chat messages) of FastChat's single-answer grading of `turn` (1 or 2)."""
    name = prompt_name(q["category"], turn)
    row = prompts[name]
    kw = {}
    if q["category"] in NEED_REF_CATS:
        kw["ref_answer_1"] = ref[0]
        if turn == 2:
            kw["ref_answer_2"] = ref[1]
    if turn == 1:
        user = row["prompt_template"].format(question=q["turns"][0], answer=answer_turns[0], **kw)
    else:
        user = row["prompt_template"].format(question_1=q["turns"][0], answer_1=answer_turns[0],
                                             question_2=q["turns"][1], answer_2=answer_turns[1], **kw)
    return name, [{"role": "system", "content": row["system_prompt"]}, {"role": "user", "content": user}]


def parse_score(judgment):
    """FastChat's parse: [[N]] first, then [N]; -1 when neither is there."""
    m = SCORE_RE.search(judgment) or SCORE_RE_BACKUP.search(judgment)
    return ast.literal_eval(m.group(1)) if m else -1


# -----------------------------------------------------------------------------
# AlpacaEval (alpaca_eval's weighted GPT-4-turbo annotator)


def read_instructions(cfg):
    items, malformed = parse_rows(cfg.instructions, parse_instruction, "instructions", cfg.strict, cfg.max_items)
    return [dict(index=i, **x) for i, x in enumerate(items)], malformed


def fill_prompt(template, instruction, output_1, output_2):
    # Only the three placeholders, in one pass (alpaca_eval's templates hold other braces; outputs may too).
    values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
    return [{"role": role, "content": re.sub(r"\{(instruction|output_1|output_2)\}", lambda m: values[m.group(1)], t)}
            for role, t in template]


def is_flipped(instruction):
    # Which output is shown first: a function of the instruction text alone, the same in every run and rank.
    return hashlib.sha256(("alpaca_eval/order/" + instruction).encode("utf-8")).digest()[0] & 1 == 1


MM_RE = re.compile(r"(?<![A-Za-z])([mM])(?![A-Za-z])")


def shown_preference(reply):
    """Preference in the order shown (1: m, the first output; 2: M), from a reply dict: 2 - p(m) / (p(m) + p(M))
    from the first token's logprobs where m or M is among them, else the reply's first standalone m or M."""
    lps = reply.get("top_logprobs")
    if lps and ("m" in lps or "M" in lps):
        lm, lM = lps.get("m", -math.inf), lps.get("M", -math.inf)
        return 2.0 - math.exp(lm - np.logaddexp(lm, lM))  # p(m) / (p(m) + p(M)), safe when both are tiny
    m = MM_RE.search(reply["text"] or "")
    return None if m is None else (1.0 if m.group(1) == "m" else 2.0)


def local_mm_logprobs(judge, chats):
    """A local judge: log-probabilities of the reply's first token being "m" and "M", per chat."""
    base = render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)
    enc = [judge.tok.encode(base + k, bos=True) for k in "mM"]
    if len(enc[0]) != len(enc[1]) or enc[0][:-1] != enc[1][:-1]:
        raise ValueError(f"{judge.path}: 'm' and 'M' are not each one token at the start of a reply")
    ids = [e[-1] for e in enc]
    seqs = [judge.tok.encode_chat(c, add_generation_prompt=True)[0] for c in chats]
    out = [None] * len(chats)
    fit = [i for i, s in enumerate(seqs) if len(s) <= judge.max_len]
    for k in range(0, len(fit), 8):
        chunk = fit[k:k + 8]
        lp = generation.last_logits(judge.model, [seqs[i] for i in chunk], judge.tok.pad_id).float().log_softmax(-1)
        for i, row in zip(chunk, lp[:, ids].tolist()):
            out[i] = {"m": row[0], "M": row[1]}
    return out


# -----------------------------------------------------------------------------
# Judges of either bench


def ask(judge, chats, cfg, gen, max_tokens, top_logprobs=0):
    """Replies of any judge kind as dicts(text, error[, top_logprobs])."""
    if isinstance(judge, Endpoint):
        return judge.generate(chats, max_tokens, cfg.judge_temperature, 1.0, top_logprobs=top_logprobs)
    if isinstance(judge, LocalModel):
        if top_logprobs:  # the verdict is the next token: no text to generate
            return [generation.failure("prompt too long for the judge") if lp is None else
                    dict(text=max(lp, key=lp.get), error=None, top_logprobs=lp, tokens=0)
                    for lp in local_mm_logprobs(judge, chats)]
        return judge.generate(chats, max_tokens, cfg.judge_temperature, 1.0, gen)
    out = []
    for chat in chats:
        try:
            reply = judge(chat)
            if isinstance(reply, dict):  # {"text", "top_logprobs"}: a rule-based judge's verdict with odds (a draw)
                reply = dict(text=reply.get("text") or "", error=None, top_logprobs=reply.get("top_logprobs"))
            out.append(dict(text=reply, error=None) if isinstance(reply, str) else reply if isinstance(reply, dict)
                       else generation.failure(f"the judge function returned {type(reply).__name__}, not a string"))
        except Exception as e:  # a judge bug must not cost the finished answers; it is counted in the summary
            out.append(generation.failure(f"{type(e).__name__}: {e}"))
    return out


# -----------------------------------------------------------------------------
# Summaries


def mt_bench_summary(questions, judgments, model_id, judge_name, n_answer_failed):
    def mean(xs):
        return round(sum(xs) / len(xs), 6) if xs else None
    ok = [r for r in judgments if r["score"] != -1]  # FastChat's show_result drops -1
    cat = {q["question_id"]: q["category"] for q in questions}
    categories = {}
    for r in ok:
        categories.setdefault(cat[r["question_id"]], []).append(r["score"])
    return {"bench": "mt_bench", "model": model_id, "judge": judge_name,
            "score": mean([r["score"] for r in ok]),
            "turn_1": mean([r["score"] for r in ok if r["turn"] == 1]),
            "turn_2": mean([r["score"] for r in ok if r["turn"] == 2]),
            "categories": {c: mean(v) for c, v in sorted(categories.items())},
            "n_judged": len(ok), "n_failed": len(judgments) - len(ok), "n_questions": len(questions),
            "n_answer_failed": n_answer_failed}


def fit_logistic(X, y, ridge=1e-6, iters=100):
    """Maximum-likelihood logistic regression with soft targets y in [0, 1] (no intercept unless X has a column
    of ones), by Newton's method with step halving. A tiny ridge keeps separable data finite. X (n, k) -> w (k,)."""
    n, k = X.shape
    w = np.zeros(k)

    def loss(w):
        z = X @ w
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * ridge * n * w @ w)

    cur = loss(w)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + ridge * n * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * n * np.eye(k)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while loss(w - t * step) > cur and t > 1e-8:
            t /= 2
        w, prev = w - t * step, cur
        cur = loss(w)
        if prev - cur < 1e-12 * max(1.0, abs(cur)):
            break
    return w


def win_rates(prefs, len_baseline, len_model, difficulty=None):
    """AlpacaEval's figures over the annotated instructions. prefs: preferences in [1, 2] (0, alpaca_eval's other
    draw encoding, counts as 1.5); lengths in characters; difficulty: per instruction or None."""
    y = np.asarray(prefs, dtype=np.float64)
    y = np.where(y == 0, 1.5, y) - 1                                  # (n,) in [0, 1]: 1 = the model wins
    n = len(y)
    out = {"win_rate": float(y.mean() * 100), "standard_error": float(y.std(ddof=1) / math.sqrt(n) * 100) if n > 1
           else None, "n_wins": int((y > 0.5).sum()), "n_wins_base": int((y < 0.5).sum()),
           "n_draws": int((y == 0.5).sum())}
    delta = np.asarray(len_baseline, dtype=np.float64) - np.asarray(len_model, dtype=np.float64)
    std = delta.std(ddof=1) if n > 1 else 0.0
    feats = {"tanh(std_delta_len)": np.tanh(delta / std) if std > 0 else np.zeros(n)}
    if difficulty is not None:
        feats["instruction_difficulty"] = np.asarray(difficulty, dtype=np.float64)
    feats["not_gamed_baseline"] = np.ones(n)                         # the model's own strength
    X = np.stack(list(feats.values()), axis=1)                      # (n, k)
    w = fit_logistic(X, y)
    X0 = X.copy()
    X0[:, 0] = 0.0                                                   # the counterfactual: equal lengths
    out["length_controlled_win_rate"] = float((1 / (1 + np.exp(-(X0 @ w)))).mean() * 100)
    out["glm_weights"] = {name: float(v) for name, v in zip(feats, w)}
    return out


def alpaca_summary(annotations, outputs, model_id, baseline_name, judge_name, difficulty):
    valid = [i for i, a in enumerate(annotations) if a["preference"] is not None]
    s = {"bench": "alpaca_eval", "model": model_id, "baseline": baseline_name, "judge": judge_name,
         "win_rate": None, "standard_error": None, "length_controlled_win_rate": None, "n": len(valid),
         "n_failed": len(annotations) - len(valid),
         "avg_length": int(round(sum(len(o["output"]) for o in outputs) / max(1, len(outputs)))),
         "length_controlled_terms": "tanh(std_delta_len) + " + ("instruction_difficulty + " if difficulty else "")
                                    + "not_gamed_baseline - 1"}
    if valid:
        s.update(win_rates([annotations[i]["preference"] for i in valid],
                           [len(annotations[i]["output_1"]) for i in valid],
                           [len(annotations[i]["output_2"]) for i in valid],
                           [difficulty[i] for i in valid] if difficulty else None))
    for k in ("win_rate", "standard_error", "length_controlled_win_rate"):
        s[k] = None if s[k] is None else round(s[k], 6)
    return s


# -----------------------------------------------------------------------------


def shipped(path):
    # Our prompt files are found from any working directory.
    return path if os.path.exists(path) or os.path.isabs(path) else os.path.join(HERE, path)


def answer_id(model_id, qid):
    # Deterministic (FastChat draws a shortuuid): reruns and ranks agree byte for byte.
    return hashlib.sha256(f"{model_id}/{qid}".encode()).hexdigest()[:22]


def check_config(cfg):
    if cfg.bench not in ("mt_bench", "alpaca_eval"):
        raise ValueError(f"config bench: {cfg.bench!r}; choose mt_bench or alpaca_eval")
    if not cfg.judge.strip():
        raise ValueError("config judge: empty; name a PATH, URL|model=NAME or module:function")
    if bool(cfg.model.strip()) == bool(cfg.answers):
        raise ValueError("config model / answers: give exactly one: a model to generate answers, or answers to judge")
    need = ["questions"] if cfg.bench == "mt_bench" else ["instructions", "baseline"]
    for key in need:
        if not getattr(cfg, key):
            raise ValueError(f"config {key}: empty; --bench={cfg.bench} needs it")
    generation.check_dtype(cfg)
    for key in ("batch_size", "max_new_tokens", "judge_max_tokens", "max_attempts", "concurrency"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config {key}: {getattr(cfg, key)} must be >= 1")


def main(argv):
    cfg = common.parse_config(Config, argv)
    check_config(cfg)
    model_spec = parse_spec(cfg.model, "model") if cfg.model.strip() else None
    if model_spec and model_spec["kind"] == "function":
        raise ValueError("config model: a local directory or an endpoint, not module:function")
    judge_spec = parse_spec(cfg.judge, "judge")
    t_start = time.time()
    mt = cfg.bench == "mt_bench"

    # Inputs, read and checked by every rank before any work (and before joining the process group: a bad input
    # fails alone, at once).
    if mt:
        items, malformed = read_questions(cfg)
        prompts = read_judge_prompts(shipped(cfg.judge_prompts), items)
        refs = {}
        if cfg.reference_answers:
            refs = {qid: turns for qid, (_, turns) in read_answer_turns(cfg.reference_answers,
                                                                        "reference_answers").items()}
        missing = []
        for q in items:
            if q["category"] in NEED_REF_CATS:
                ref = refs.get(q["question_id"], q["reference"])
                if ref is None or len(ref) < len(q["turns"]):
                    missing.append(q["question_id"])
                q["reference"] = ref
        if missing:
            raise ValueError(f"questions {missing[:5]} ({len(missing)} in all) need reference answers (categories "
                             f"{', '.join(NEED_REF_CATS)}): give --reference_answers=FILE (FastChat's gpt-4.jsonl)")
        given = read_answer_turns(cfg.answers, "answers") if cfg.answers else None
        key = "question_id"
    else:
        items, malformed = read_instructions(cfg)
        template = read_prompt_file(shipped(cfg.judge_prompt))
        baseline = read_outputs(cfg.baseline, "baseline")
        given = read_outputs(cfg.answers, "answers") if cfg.answers else None
        difficulty = read_difficulty(cfg.instruction_difficulty, items) if cfg.instruction_difficulty else None
        key = "instruction"
    for x in items:
        if given is not None and x[key] not in given:
            raise ValueError(f"config answers: {cfg.answers} has no answer for {key} {x[key]!r:.80}")
        if given is not None and mt and len(given[x[key]][1]) < len(x["turns"]):
            raise ValueError(f"config answers: {cfg.answers}: question {x[key]!r} has {len(given[x[key]][1])} answer "
                             f"turns; it asks {len(x['turns'])}")
        if not mt and x["instruction"] not in baseline:
            raise ValueError(f"config baseline: {cfg.baseline} has no output for instruction {x['index']} "
                             f"({x['instruction'][:60]!r})")
    if not items:
        raise ValueError(f"no valid rows in {cfg.questions if mt else cfg.instructions}")
    if given is not None:
        names = {v[0] if mt else v[1] for v in given.values()} - {None}
        model_id = cfg.model_id or (sorted(names)[0] if names else os.path.basename(cfg.answers))
    else:
        model_id = cfg.model_id or model_spec["name"]
    baseline_name = None if mt else (next((g for _, g in baseline.values() if g), None)
                                     or os.path.basename(cfg.baseline))
    d = common.setup_dist(cfg.device, cfg.rehearse_gpu)
    if d.main:
        for line in malformed[:20]:
            print(line, file=sys.stderr)
        print(f"{cfg.bench}: {len(items)} {'questions' if mt else 'instructions'} ({len(malformed)} malformed rows "
              f"skipped); model {model_id}{' (given answers)' if given else ''}; judge {judge_spec['kind']} "
              f"{judge_spec['name']}")

    def start_worker():
        loaded = {}
        model = load_client(model_spec, cfg, d, loaded) if model_spec else None
        judge = load_client(judge_spec, cfg, d, loaded)

        def work_mt(batch, j):
            tg = time.time()
            if given is None:
                turns, errors, tokens = answer_mt_bench(model, batch, j, cfg, d.device)
            else:
                turns, errors, tokens = [given[q["question_id"]][1] for q in batch], [None] * len(batch), 0
            gen_s = time.time() - tg
            jobs, chats, names = [], [], []
            for i, q in enumerate(batch):
                for turn in range(1, len(q["turns"]) + 1):
                    name, msgs = judge_messages(q, turns[i], turn, prompts, q["reference"])
                    jobs.append((i, turn))
                    chats.append(msgs)
                    names.append(name)
            live = [k for k, (i, _) in enumerate(jobs) if errors[i] is None]
            gen = torch.Generator(device=d.device).manual_seed(seed_of(cfg.seed, "judge", j))
            replies = dict(zip(live, ask(judge, [chats[k] for k in live], cfg, gen, cfg.judge_max_tokens)))
            now = time.time()
            records = [{"question_id": q["question_id"], "error": errors[i],
                        "answer": {"question_id": q["question_id"], "answer_id": answer_id(model_id, q["question_id"]),
                                   "model_id": model_id, "choices": [{"index": 0, "turns": turns[i]}],
                                   "tstamp": now}, "judgments": []} for i, q in enumerate(batch)]
            for k, (i, turn) in enumerate(jobs):
                r = replies.get(k) or generation.failure(f"the answer failed: {errors[i]}")
                judgment = r["text"] if r["error"] is None else f"{ERROR_OUTPUT} {r['error']}"
                records[i]["judgments"].append({
                    "question_id": batch[i]["question_id"], "model": model_id, "judge": [judge_spec["name"], names[k]],
                    "user_prompt": chats[k][-1]["content"], "judgment": judgment,
                    "score": parse_score(r["text"]) if r["error"] is None else -1, "turn": turn, "tstamp": now})
            return records, tokens, gen_s

        def work_alpaca(batch, j):
            tg = time.time()
            if given is None:
                temp = DEFAULT_TEMPERATURE if cfg.temperature is None else cfg.temperature
                gen = torch.Generator(device=d.device).manual_seed(seed_of(cfg.seed, "answer", j))
                res = model.generate([[{"role": "user", "content": x["instruction"]}] for x in batch],
                                     cfg.max_new_tokens, 0.0 if temp < 1e-4 else temp, cfg.top_p, gen)
                outs = [(r["text"].strip() if r["error"] is None else "", r["error"]) for r in res]
                tokens = sum(r["tokens"] for r in res)
            else:
                outs, tokens = [(given[x["instruction"]][0], None) for x in batch], 0
            gen_s = time.time() - tg
            chats = []
            for x, (out, _) in zip(batch, outs):
                base = baseline[x["instruction"]][0]
                first, second = (out, base) if is_flipped(x["instruction"]) else (base, out)
                chats.append(fill_prompt(template, x["instruction"], first, second))
            live = [k for k, (_, err) in enumerate(outs) if err is None]
            replies = dict(zip(live, ask(judge, [chats[k] for k in live], cfg, None, 1, top_logprobs=5)))
            records = []
            for k, x in enumerate(batch):
                r = replies.get(k) or generation.failure(f"the answer failed: {outs[k][1]}")
                pref = shown_preference(r) if r["error"] is None else None
                if pref is not None and is_flipped(x["instruction"]):
                    pref = 3.0 - pref                                   # back to (baseline 1, model 2)
                ann = {"instruction": x["instruction"], "output_1": baseline[x["instruction"]][0],
                       "generator_1": baseline_name, "output_2": outs[k][0], "generator_2": model_id,
                       "annotator": judge_spec["name"], "preference": pref,
                       "raw_completion": r["text"] if r["error"] is None else f"{ERROR_OUTPUT} {r['error']}",
                       "top_logprobs": r.get("top_logprobs"), "flipped": is_flipped(x["instruction"])}
                records.append({"instruction": x["instruction"], "output": outs[k][0], "generator": model_id,
                                "dataset": x["dataset"], "error": outs[k][1], "annotation": ann})
            return records, tokens, gen_s
        return work_mt if mt else work_alpaca

    specs = [s for s in (model_spec, judge_spec) if s]
    totals = generation.run_in_parts(cfg, d, items, key, RESUME_FREE, start_worker,
                                     "question" if mt else "instruction",
                                     {**(generation.local_device(specs, d) or {}), "model_id": model_id})
    if d.main:
        done = generation.read_finished(cfg, items, key)
        if mt:
            judgments = [j for r in done for j in r["judgments"]]
            write_jsonl(os.path.join(cfg.out_dir, "answers.jsonl"), [r["answer"] for r in done])
            write_jsonl(os.path.join(cfg.out_dir, "judgments.jsonl"), judgments)
            n_answer_failed = sum(r["error"] is not None for r in done)
            s = mt_bench_summary(items, judgments, model_id, judge_spec["name"], n_answer_failed)
            line = (f"MT-Bench {s['score']} (turn 1 {s['turn_1']}, turn 2 {s['turn_2']}) over {s['n_judged']} judged "
                    f"turns; {s['n_failed']} turns without a score (parse failures or errors, left out)")
        else:
            outputs = [{"instruction": r["instruction"], "output": r["output"], "generator": r["generator"],
                        "dataset": r["dataset"]} for r in done]
            write_json(os.path.join(cfg.out_dir, "model_outputs.json"), outputs)
            annotations = [r["annotation"] for r in done]
            write_json(os.path.join(cfg.out_dir, "annotations.json"), annotations)
            s = alpaca_summary(annotations, outputs, model_id, baseline_name, judge_spec["name"], difficulty)
            line = (f"AlpacaEval win rate {s['win_rate']} (se {s['standard_error']}), length-controlled "
                    f"{s['length_controlled_win_rate']} over {s['n']} instructions; {s['n_failed']} without a "
                    f"preference (left out)")
        write_json(os.path.join(cfg.out_dir, "summary.json"), s)
        stats = generation.run_stats(totals, time.time() - t_start, "question" if mt else "instruction")
        print(f"{line}; {stats['wall_s']} s; wrote {cfg.out_dir}/summary.json")
    common.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
