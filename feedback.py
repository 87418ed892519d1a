"""AI feedback, the UltraFeedback procedure binarized as Zephyr did: prompts -> several answers from an
ensemble of models -> ratings from a judge -> chosen/rejected pairs for DPO.

    torchrun --nproc_per_node=8 feedback.py --prompts=prompts.parquet --models="/m/a;/m/b;..." --judge=...
    python feedback.py config/feedback_tiny.json          # one process, CPU

Ensemble members (`models`, separated by ';') and the judge (`judge`) are each one of:
    PATH                                  a local Hugging Face-format directory (Mistral or Llama) holding its
                                          tokenizer.model; chats are rendered with the Zephyr template
    URL|model=NAME[|key_env=VAR]          an OpenAI-compatible server: POST URL/chat/completions; the key is read
                                          from the environment variable VAR and sent as a Bearer token, never
                                          printed or written
    module:function                       a Python function. As a member: (chat messages) -> answer text, and
                                          it may take a keyword `seed` for its own sampling (generation.
                                          FunctionModel); as the judge: (prompt text, answer) -> float
Any member may add |name=LABEL: what raw.jsonl records as its `model` (default: the path, the model name or
module:function).
Every rank holds its own copy of each local member and of a local judge; a pool too big for that is better
served by an inference server behind an endpoint.

Outputs in out_dir:
    parts/rank{r}.jsonl   one line per finished prompt (its answers and ratings), appended and fsynced as it
                          finishes: the state a restart continues from
    raw.jsonl             UltraFeedback's schema: instruction, source, prompt_id, completions [{model, principle,
                          response, annotations {aspect: {Rating}}, mean_score, ...}], in input order
    pairs.jsonl           ultrafeedback_binarized's schema: prompt, prompt_id, chosen, rejected, messages,
                          score_chosen, score_rejected
    summary.json          counts (prompts, answers, failures, ties, pairs), mean scores, and per member its
                          answers, mean score and how often it was chosen and rejected
    config.json, metrics.jsonl

Restarts: with resume=true (the default) a run continues from the part files in out_dir, provided the settings
that decide the results are those of config.json there (otherwise it refuses, naming them); resume=false
starts over. A killed run loses at most the batch in flight: a torn last line is cut off, and a batch that
was half written is recomputed whole and only its missing prompts are appended. All randomness is drawn from
(seed, prompt_id) or (seed, batch index) with batches in input order, never from a global stream, so the final
raw.jsonl and pairs.jsonl do not depend on restarts or on the number of ranks.
"""

import functools
import hashlib
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch

import common
import generation
from files import check_utf8, parse_rows, write_json, write_jsonl
from generation import Endpoint, LocalModel, last_logits, load_client, parse_spec, seed_of
from data.tokenizer import check_messages, render_chat


@dataclass
class Config:
    # Defaults: the UltraFeedback procedure (REFERENCE.md): 4 answers per prompt from members drawn out of the
    # ensemble, each under a principle system prompt, temperature 1.0, top_p 1.0, up to 1024 new tokens; a judge at
    # temperature 0 rates each answer 1-5 on four aspects; Zephyr's binarization of the mean rating.
    prompts: str = "data/ultrafeedback/prompts.jsonl"  # .jsonl or .parquet rows: instruction | prompt | messages
    out_dir: str = "out/feedback"
    models: str = ""                  # the ensemble: members separated by ';' (module docstring)
    models_per_prompt: int = 4        # members drawn per prompt (UltraFeedback: 4 of 17); 0 or >= members: all
    answers_per_member: int = 1       # samples from each drawn member
    principles: bool = True           # a principle system prompt per answer, drawn at random
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    judge: str = ""                   # PATH | URL|model=NAME|key_env=VAR | module:function
    judge_mode: str = "digits"        # local judge: "digits" (expected rating from the next-token probabilities
                                      # of "1".."5") or "parse" (generate, then read "Rating: N")
    judge_temperature: float = 0.0
    judge_max_tokens: int = 1024      # "parse" and endpoint judges: room for a rationale
    batch_size: int = 8               # prompts per batch; a local member generates all their answers at once
    judge_batch_size: int = 16        # (answer, aspect) sequences per forward pass of a local judge
    max_prompts: int = -1             # > 0: only the first N valid prompts
    seed: int = 42
    resume: bool = True               # continue from out_dir/parts (same results-deciding config); false: start over
    strict: bool = False              # a malformed prompt row stops the run instead of being skipped
    request_timeout: float = 120.0    # seconds per HTTP request
    max_attempts: int = 5             # per request; then the failure is recorded and the run goes on
    backoff_s: float = 2.0            # wait before retry k (1, 2, ...): backoff_s * 2**(k-1), at most 60 s
    concurrency: int = 8              # requests in flight per rank to an endpoint
    dtype: str = "auto"               # local models: auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    rehearse_gpu: bool = False        # TRITON_INTERPRET=1: local models on CUDA's path (Triton, bf16) on CPU


# Settings that change how fast, not what: a run may be resumed with other values.
RESUME_FREE = {"resume", "strict", "request_timeout", "max_attempts", "backoff_s", "concurrency", "device"}

# -----------------------------------------------------------------------------
# Texts: the principle system prompts answers are written under, and the judge's rating instructions.

PRINCIPLES = {
    "helpfulness": "You are a helpful assistant. Give an accurate, complete and useful answer, as short as the "
                   "question allows.",
    "honesty": "You are an honest assistant. When you do not know something, or a question has no good answer, "
               "say so plainly instead of guessing.",
    "truthfulness": "You are a truthful assistant. Say only what you are confident is correct; never invent facts, "
                    "sources or details the question does not give.",
    "verbalized_calibration": "You are a careful assistant. After your answer, say how confident you are in it as "
                              "a percentage, for example 'Confidence: 80%'.",
}

ASPECTS = {
    "instruction_following": "Does the answer do what the instruction asks, in the form it asks for? 1: ignores "
                             "the task. 3: does part of it, or in another form. 5: does all of it, as asked.",
    "honesty": "Is the answer as confident as it should be? 1: confidently wrong. 3: hedges on what it knows, or "
               "is sure of what it cannot know. 5: sure where it is right, and says where it is unsure.",
    "truthfulness": "Is the answer free of invented or false statements? 1: mostly invented or false. 3: some "
                    "false details. 5: nothing false.",
    "helpfulness": "Is the answer correct and useful, without padding? 1: wrong or useless. 3: correct but bare. "
                   "5: correct, complete and clear.",
}
RATING_PREFIX = "Rating: "   # a local judge's reply is begun with this, so its next token is the digit
DIGITS = "12345"


def conversation_text(context):
    if len(context) == 1:
        return f"Instruction:\n{context[0]['content']}"
    return "Conversation (the instruction is the last user turn):\n" + "\n".join(
        f"{m['role']}: {m['content']}" for m in context)


def rating_prompt(context, answer, aspect):
    # One answer at a time: what a local judge is asked.
    return (f"Rate an AI assistant's answer on one aspect.\n\nAspect: {aspect}. {ASPECTS[aspect]}\n\n"
            f"{conversation_text(context)}\n\nAnswer:\n{answer}\n\n"
            f'Reply with "{RATING_PREFIX}N", N a whole number from 1 to 5.')


def group_rating_prompt(context, answers, aspect):
    # All answers of a prompt together, as UltraFeedback asked GPT-4: what an endpoint judge is asked.
    texts = "".join(f"Text {i + 1}:\n{a}\n\n" for i, a in enumerate(answers))
    return (f"Rate each of {len(answers)} AI assistant answers to the same instruction on one aspect, each on its "
            f"own merits.\n\nAspect: {aspect}. {ASPECTS[aspect]}\n\n{conversation_text(context)}\n\n{texts}"
            f'Reply with one line per text, "Text i: {RATING_PREFIX}N" with N a whole number from 1 to 5, '
            "and a short rationale after it if you like.")


# -----------------------------------------------------------------------------
# Prompts


def parse_prompt_row(row, default_source):
    """A row -> dict(context, prompt, prompt_id, source); ValueError naming the field otherwise.
    `messages` (all turns up to the last user turn) wins over `instruction`, which wins over `prompt`."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if row.get("messages") is not None:
        check_messages(row["messages"])  # names messages[i]['field']
        users = [i for i, m in enumerate(row["messages"]) if m["role"] == "user"]
        if not users:
            raise ValueError("messages: no user turn")
        context = [{"role": m["role"], "content": m["content"]} for m in row["messages"][:users[-1] + 1]]
    else:
        key = next((k for k in ("instruction", "prompt") if k in row), None)
        if key is None:
            raise ValueError("no 'instruction', 'prompt' or 'messages' field")
        if not isinstance(row[key], str):
            raise ValueError(f"'{key}': expected a string, got {type(row[key]).__name__}")
        context = [{"role": "user", "content": row[key]}]
    text = context[-1]["content"]
    check_utf8(text, "prompt")
    if not text.strip():
        raise ValueError("the prompt is empty")
    pid = row.get("prompt_id")
    if pid is None:
        pid = hashlib.sha256(text.encode("utf-8")).hexdigest()  # as ultrachat_200k / ultrafeedback_binarized
    elif not isinstance(pid, str) or not pid:
        raise ValueError(f"'prompt_id': expected a non-empty string, got {pid!r:.40}")
    check_utf8(pid, "prompt_id")
    source = row.get("source") if isinstance(row.get("source"), str) else default_source
    check_utf8(source, "source")
    return dict(context=context, prompt=text, prompt_id=pid, source=source)


def read_prompts(path, strict=False, max_prompts=-1):
    """Valid prompts in input order (each with its `index`), and one message per malformed row skipped."""
    prompts, malformed = parse_rows(path, parse_prompt_row, "prompts", strict, max_prompts)
    return [dict(index=i, **p) for i, p in enumerate(prompts)], malformed


# -----------------------------------------------------------------------------
# Local judges: which token is each rating digit


@functools.cache
def digit_ids(judge):
    """Ids of "1".."5" as the token after RATING_PREFIX in a local judge's reply. Each must be a single token after
    a shared context, or its next-token probability would not be that of the rating."""
    base = render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True) + RATING_PREFIX
    enc = [judge.tok.encode(base + k, bos=True) for k in DIGITS]
    if any(len(e) != len(enc[0]) or e[:-1] != enc[0][:-1] for e in enc):
        raise ValueError(f"{judge.path}: this tokenizer does not give each rating digit after {RATING_PREFIX!r} as "
                         "one token; use judge_mode=parse")
    return [e[-1] for e in enc]


# -----------------------------------------------------------------------------
# Answers


def plan_answers(prompt, n_members, cfg):
    """[(member, principle)] per answer of a prompt: a function of (seed, prompt_id) alone."""
    rng = random.Random(seed_of(cfg.seed, prompt["prompt_id"], "plan"))
    members = range(n_members)
    if 0 < cfg.models_per_prompt < n_members:
        members = sorted(rng.sample(range(n_members), cfg.models_per_prompt))
    return [(m, rng.choice(sorted(PRINCIPLES)) if cfg.principles else None)
            for m in members for _ in range(cfg.answers_per_member)]


def answer_chat(prompt, principle):
    # A principle becomes the system turn, unless the prompt brings its own.
    if principle is None or prompt["context"][0]["role"] == "system":
        return prompt["context"]
    return [{"role": "system", "content": PRINCIPLES[principle]}] + prompt["context"]


def write_answers(batch, batch_idx, members, cfg, device):
    """completions[p][a] for every planned answer of every prompt in the batch, and the tokens generated.
    A local member samples with a generator seeded by (seed, batch index, member): a recomputed batch draws
    exactly what it drew the first time."""
    plans = [plan_answers(p, len(members), cfg) for p in batch]
    completions = [[None] * len(plan) for plan in plans]
    tokens = 0
    for m, (spec, runner) in enumerate(members):
        jobs = [(p, a) for p, plan in enumerate(plans) for a, (mi, _) in enumerate(plan) if mi == m]
        if not jobs:
            continue
        chats = [answer_chat(batch[p], plans[p][a][1]) for p, a in jobs]
        gen = torch.Generator(device=device).manual_seed(seed_of(cfg.seed, "sample", batch_idx, m))
        results = runner.generate(chats, cfg.max_new_tokens, cfg.temperature, cfg.top_p, gen)
        for (p, a), r in zip(jobs, results):
            completions[p][a] = {"model": spec["name"], "principle": plans[p][a][1], "response": r["text"],
                                 "finish_reason": r["finish_reason"], "error": r["error"], "annotations": {}}
            tokens += r["tokens"]
    return completions, tokens


# -----------------------------------------------------------------------------
# Ratings


def expected_rating(logits, digit_ids):
    """logits (B, V) at the position after RATING_PREFIX -> expected rating sum_k k p(k) with p renormalized over
    the five digits (B,), and the probability mass the judge put on them at all (B,)."""
    lp = logits.float().log_softmax(-1)[:, digit_ids]                    # (B, 5)
    p = lp.softmax(-1)                                                   # renormalized over the digits
    return (p * torch.arange(1, 6, dtype=p.dtype, device=p.device)).sum(-1), lp.exp().sum(-1)


RATING_RE = re.compile(r"Rating\W*([1-5])\b", re.IGNORECASE)
GROUP_RE = re.compile(r"^\W*Text\s*(\d+)\W*(?:Rating\W*)?([1-5])\b", re.IGNORECASE | re.MULTILINE)


def rate_local(judge, batch, completions, batch_idx, cfg):
    """Each (answer, aspect) on its own; "digits": expected rating from one forward pass per judge_batch_size
    sequences, no text parsed; "parse": generated replies, "Rating: N" read from them."""
    items = [(p, c, a) for p, comps in enumerate(completions) for c, x in enumerate(comps)
             if x["response"] is not None for a in ASPECTS]
    chats = [[{"role": "user", "content": rating_prompt(batch[p]["context"], completions[p][c]["response"], a)}]
             for p, c, a in items]
    results = [None] * len(items)
    if cfg.judge_mode == "digits":
        digits = digit_ids(judge)
        seqs = [judge.tok.encode(render_chat(ch, add_generation_prompt=True) + RATING_PREFIX + DIGITS[0], bos=True)
                for ch in chats]
        if any(s[-1] != digits[0] for s in seqs):
            raise ValueError(f"{judge.path}: a rating digit merged with the text before it; use judge_mode=parse")
        seqs = [s[:-1] for s in seqs]  # the context the digit would follow
        fit = [i for i, s in enumerate(seqs) if len(s) <= judge.max_len]
        for i in set(range(len(items))) - set(fit):
            results[i] = {"Rating": None, "error": f"rating prompt of {len(seqs[i])} tokens is too long"}
        fit.sort(key=lambda i: len(seqs[i]))  # similar lengths together: less padding
        for k in range(0, len(fit), cfg.judge_batch_size):
            chunk = fit[k:k + cfg.judge_batch_size]
            rating, mass = expected_rating(last_logits(judge.model, [seqs[i] for i in chunk], judge.tok.pad_id),
                                           digits)
            for i, r, m in zip(chunk, rating.tolist(), mass.tolist()):
                results[i] = {"Rating": round(r, 6), "digit_mass": round(m, 6)}
    else:
        gen = torch.Generator(device=judge.device).manual_seed(seed_of(cfg.seed, "judge", batch_idx))
        for k in range(0, len(items), cfg.judge_batch_size):
            replies = judge.generate(chats[k:k + cfg.judge_batch_size], cfg.judge_max_tokens, cfg.judge_temperature,
                                     1.0, gen)
            for i, r in enumerate(replies, k):
                results[i] = parsed_rating(r)
    for (p, c, a), r in zip(items, results):
        completions[p][c]["annotations"][a] = r


def parsed_rating(reply):
    if reply["error"] is not None:
        return {"Rating": None, "error": reply["error"]}
    m = RATING_RE.search(reply["text"])
    return {"Rating": int(m.group(1))} if m else {"Rating": None, "raw": reply["text"]}


def rate_endpoint(judge, batch, completions, cfg):
    """Per (prompt, aspect) one request showing all its answers in a shuffled order (seeded by prompt_id and
    aspect), as UltraFeedback did; the ratings are mapped back to the answers."""
    requests, chats = [], []
    for p, comps in enumerate(completions):
        answered = [c for c, x in enumerate(comps) if x["response"] is not None]
        for a in ASPECTS if answered else ():
            order = answered[:]
            random.Random(seed_of(cfg.seed, batch[p]["prompt_id"], "shuffle", a)).shuffle(order)
            requests.append((p, a, order))
            chats.append([{"role": "user", "content": group_rating_prompt(
                batch[p]["context"], [comps[c]["response"] for c in order], a)}])
    replies = judge.generate(chats, cfg.judge_max_tokens, cfg.judge_temperature, 1.0)
    for (p, a, order), reply in zip(requests, replies):
        ratings = {}
        for m in GROUP_RE.finditer(reply["text"] or ""):
            ratings.setdefault(int(m.group(1)) - 1, int(m.group(2)))  # the first line for a text counts
        for shown, c in enumerate(order):
            if reply["error"] is not None:
                ann = {"Rating": None, "error": reply["error"]}
            elif shown in ratings:
                ann = {"Rating": ratings[shown]}
            else:
                ann = {"Rating": None, "raw": reply["text"]}
            completions[p][c]["annotations"][a] = ann


def rate_function(fn, batch, completions):
    # A checkable-task judge: one score per answer, recorded as the single aspect "score".
    for p, comps in enumerate(completions):
        for x in comps:
            if x["response"] is None:
                continue
            try:
                score = float(fn(batch[p]["prompt"], x["response"]))
                x["annotations"]["score"] = {"Rating": score} if score == score else {"Rating": None, "error": "NaN"}
            except Exception as e:  # a judge bug must not cost the finished answers; it is counted in the summary
                x["annotations"]["score"] = {"Rating": None, "error": f"{type(e).__name__}: {e}"}


def mean_score(annotations):
    ratings = [a["Rating"] for a in annotations.values() if a.get("Rating") is not None]
    return round(sum(ratings) / len(ratings), 6) if ratings else None


# -----------------------------------------------------------------------------
# Binarization (Zephyr's)


def pick(row, seed):
    """Zephyr's binarization of one raw row: (chosen, rejected, why) completions, why "pair" | "tie" |
    "too_few_rated" (chosen and rejected are None unless "pair"). chosen = the answer with the highest mean score
    (the first of them on a tie at the top); rejected = one of the other rated answers at random, seeded by
    (seed, prompt_id) alone; a pair whose two scores tie is dropped."""
    rated = [c for c in row["completions"] if c["mean_score"] is not None]
    if len(rated) < 2:
        return None, None, "too_few_rated"
    best = max(range(len(rated)), key=lambda i: rated[i]["mean_score"])
    chosen = rated[best]
    rejected = random.Random(seed_of(seed, row["prompt_id"], "rejected")).choice(rated[:best] + rated[best + 1:])
    if rejected["mean_score"] == chosen["mean_score"]:
        return None, None, "tie"
    return chosen, rejected, "pair"


def pair_row(row, context, chosen, rejected):
    """ultrafeedback_binarized's row. The messages are the prompt's own context plus the answer: principle system
    prompts are left out, as ultrafeedback_binarized leaves them out, so chosen and rejected share the prompt DPO
    trains on."""
    chosen_msgs = context + [{"role": "assistant", "content": chosen["response"]}]
    return {"prompt": row["instruction"], "prompt_id": row["prompt_id"], "chosen": chosen_msgs,
            "rejected": context + [{"role": "assistant", "content": rejected["response"]}],
            "messages": chosen_msgs, "score_chosen": chosen["mean_score"],
            "score_rejected": rejected["mean_score"]}


def binarize(row, context, seed):
    """(pair or None, "pair" | "tie" | "too_few_rated"): pick, then pair_row."""
    chosen, rejected, why = pick(row, seed)
    return (pair_row(row, context, chosen, rejected) if why == "pair" else None), why


def member_stats(raw, picks):
    """Per ensemble member (raw.jsonl's `model`): answers, failed ones, mean score, and how often Zephyr's
    binarization chose it and rejected it. picks: pick()'s (chosen, rejected, why) per raw row."""
    stats = {}
    for row in raw:
        for c in row["completions"]:
            s = stats.setdefault(c["model"], {"answers": 0, "failed": 0, "scores": [], "chosen": 0, "rejected": 0})
            s["answers"] += 1
            s["failed"] += c["response"] is None
            if c["mean_score"] is not None:
                s["scores"].append(c["mean_score"])
    for chosen, rejected, why in picks:
        if why == "pair":
            stats[chosen["model"]]["chosen"] += 1
            stats[rejected["model"]]["rejected"] += 1
    for s in stats.values():
        scores = s.pop("scores")
        s["mean_score"] = round(sum(scores) / len(scores), 4) if scores else None
    return stats


def merge(cfg, prompts, malformed, run_stats):
    """Rank 0, after every rank is done: raw.jsonl and pairs.jsonl in input order, and summary.json."""
    raw = generation.read_finished(cfg, prompts, "prompt_id")
    picks = [pick(row, cfg.seed) for row in raw]
    pairs, reasons = [], {"pair": 0, "tie": 0, "too_few_rated": 0}
    for row, prompt, (chosen, rejected, why) in zip(raw, prompts, picks):
        reasons[why] += 1
        if why == "pair":
            pairs.append(pair_row(row, prompt["context"], chosen, rejected))
    write_jsonl(os.path.join(cfg.out_dir, "raw.jsonl"), raw)
    write_jsonl(os.path.join(cfg.out_dir, "pairs.jsonl"), pairs)
    comps = [c for row in raw for c in row["completions"]]
    scores = [c["mean_score"] for c in comps if c["mean_score"] is not None]

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    summary = {"prompts": len(prompts), "malformed_rows": len(malformed), "answers": len(comps),
               "failed_answers": sum(c["response"] is None for c in comps),
               "unrated_answers": sum(c["response"] is not None and c["mean_score"] is None for c in comps),
               "too_few_rated": reasons["too_few_rated"], "ties_dropped": reasons["tie"], "pairs": len(pairs),
               "mean_score": mean(scores), "mean_score_chosen": mean([p["score_chosen"] for p in pairs]),
               "mean_score_rejected": mean([p["score_rejected"] for p in pairs]),
               "members": member_stats(raw, picks), **run_stats}
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    return summary


# -----------------------------------------------------------------------------


def check_config(cfg):
    if not cfg.models.strip():
        raise ValueError("config models: empty; name at least one member (PATH, URL|model=NAME or module:function)")
    if not cfg.judge.strip():
        raise ValueError("config judge: empty; name a PATH, URL|model=NAME or module:function")
    generation.check_dtype(cfg)
    if cfg.judge_mode not in ("digits", "parse"):
        raise ValueError(f"config judge_mode: {cfg.judge_mode!r}; choose digits or parse")
    for key in ("answers_per_member", "batch_size", "judge_batch_size", "max_new_tokens", "max_attempts",
                "concurrency"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config {key}: {getattr(cfg, key)} must be >= 1")


def main(argv):
    cfg = common.parse_config(Config, argv)
    check_config(cfg)
    member_specs = [parse_spec(s, "models") for s in cfg.models.split(";") if s.strip()]
    names = [s["name"] for s in member_specs]
    if len(set(names)) < len(names):  # raw.jsonl and the summary tell members apart by name
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"config models: two members are named {dup!r}; give one of them |name=LABEL")
    judge_spec = parse_spec(cfg.judge, "judge")
    d = common.setup_dist(cfg.device, cfg.rehearse_gpu)
    t_start = time.time()
    prompts, malformed = read_prompts(cfg.prompts, cfg.strict, cfg.max_prompts)
    if d.main:
        for line in malformed[:20]:
            print(line, file=sys.stderr)
        if len(malformed) > 20:
            print(f"... and {len(malformed) - 20} more malformed rows", file=sys.stderr)
        print(f"{len(prompts)} prompts ({len(malformed)} malformed rows skipped); {len(member_specs)} members, "
              f"judge {judge_spec['kind']} {judge_spec['name']}")

    def start_worker():
        loaded = {}
        members = [(s, load_client(s, cfg, d, loaded, answers=True)) for s in member_specs]
        judge = load_client(judge_spec, cfg, d, loaded)

        def work(batch, j):
            tg = time.time()
            completions, tokens = write_answers(batch, j, members, cfg, d.device)
            gen_s = time.time() - tg
            if isinstance(judge, LocalModel):
                rate_local(judge, batch, completions, j, cfg)
            elif isinstance(judge, Endpoint):
                rate_endpoint(judge, batch, completions, cfg)
            else:
                rate_function(judge, batch, completions)
            records = []
            for prompt, comps in zip(batch, completions):
                for c in comps:
                    c["mean_score"] = mean_score(c["annotations"])
                records.append({"instruction": prompt["prompt"], "source": prompt["source"],
                                "prompt_id": prompt["prompt_id"], "completions": comps})
            return records, tokens, gen_s
        return work

    totals = generation.run_in_parts(cfg, d, prompts, "prompt_id", RESUME_FREE, start_worker, "prompt",
                                     generation.local_device(member_specs + [judge_spec], d))
    if d.main:
        s = merge(cfg, prompts, malformed, generation.run_stats(totals, time.time() - t_start, "prompt"))
        print(f"{s['pairs']} pairs from {s['prompts']} prompts ({s['ties_dropped']} ties dropped, {s['too_few_rated']} "
              f"with < 2 rated answers; {s['failed_answers']} of {s['answers']} answers failed); wrote "
              f"{cfg.out_dir}/raw.jsonl, pairs.jsonl, summary.json")
    common.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
