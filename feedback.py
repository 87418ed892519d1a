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
    module:function                       judge only: a Python function (prompt text, answer) -> float
Any member may add |name=LABEL: what raw.jsonl records as its `model` (default: the path, or the model name).
Every rank holds its own copy of each local member and of a local judge; a pool too big for that is better
served by an inference server behind an endpoint.

Outputs in out_dir:
    parts/rank{r}.jsonl   one line per finished prompt (its answers and ratings), appended and fsynced as it
                          finishes: the state a restart continues from
    raw.jsonl             UltraFeedback's schema: instruction, source, prompt_id, completions [{model, principle,
                          response, annotations {aspect: {Rating}}, mean_score, ...}], in input order
    pairs.jsonl           ultrafeedback_binarized's schema: prompt, prompt_id, chosen, rejected, messages,
                          score_chosen, score_rejected
    summary.json, config.json, metrics.jsonl

Restarts: with resume=true (the default) a run continues from the part files in out_dir, provided the settings
that decide the results are those of config.json there (otherwise it refuses, naming them); resume=false
starts over. A killed run loses at most the batch in flight: a torn last line is cut off, and a batch that
was half written is recomputed whole and only its missing prompts are appended. All randomness is drawn from
(seed, prompt_id) or (seed, batch index) with batches in input order, never from a global stream, so the final
raw.jsonl and pairs.jsonl do not depend on restarts or on the number of ranks.
"""

import concurrent.futures
import dataclasses
import glob
import hashlib
import http.client
import importlib
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

import common
from data.tokenizer import Tokenizer, check_messages, render_chat
from model import Mistral


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


def seed_of(*keys):
    # A 63-bit seed from any keys, the same in every process (Python's hash() is salted per process).
    return int.from_bytes(hashlib.sha256("/".join(map(str, keys)).encode()).digest()[:8], "little") >> 1


# -----------------------------------------------------------------------------
# Prompts


def read_rows(path):
    """(where, row, error) per row of a .jsonl or .parquet file; `where` is file:line or file row N."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # only for parquet input
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i + 1}", row, None
        return
    with open(path, "rb") as f:  # bytes: one line of invalid UTF-8 is that line's problem, not the file's
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{n}", None, f"not valid UTF-8 (byte {e.start + 1})"
                continue
            try:
                yield f"{path}:{n}", json.loads(line), None
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", None, f"not valid JSON ({e.msg} at column {e.colno})"


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
    if not text.strip():
        raise ValueError("the prompt is empty")
    pid = row.get("prompt_id")
    if pid is None:
        pid = hashlib.sha256(text.encode("utf-8")).hexdigest()  # as ultrachat_200k / ultrafeedback_binarized
    elif not isinstance(pid, str) or not pid:
        raise ValueError(f"'prompt_id': expected a non-empty string, got {pid!r:.40}")
    source = row.get("source") if isinstance(row.get("source"), str) else default_source
    return dict(context=context, prompt=text, prompt_id=pid, source=source)


def read_prompts(path, strict=False, max_prompts=-1):
    """Valid prompts in input order (each with its `index`), and one message per malformed row skipped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config prompts: {path} not found")
    prompts, malformed = [], []
    for where, row, error in read_rows(path):
        if error is None:
            try:
                p = parse_prompt_row(row, os.path.basename(path))
            except ValueError as e:
                error = str(e)
        if error is not None:
            if strict:
                raise ValueError(f"{where}: {error} (strict=true)")
            malformed.append(f"{where}: {error}; skipped")
            continue
        prompts.append(dict(index=len(prompts), **p))
        if len(prompts) == max_prompts:
            break
    return prompts, malformed


# -----------------------------------------------------------------------------
# Models: local checkpoints, OpenAI-compatible endpoints, Python functions

FUNCTION_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def parse_spec(spec, field):
    """'PATH', 'URL|model=..|key_env=..|name=..' or 'module:function' -> dict(kind, target, options...)."""
    head, *opts = spec.strip().split("|")
    options = {}
    for o in opts:
        key, eq, value = o.partition("=")
        if not eq or key not in ("model", "key_env", "name"):
            raise ValueError(f"config {field}: {spec!r}: option {o!r} is not model=, key_env= or name=")
        options[key] = value
    if head.startswith(("http://", "https://")):
        if "model" not in options:
            raise ValueError(f"config {field}: {spec!r}: an endpoint needs |model=NAME")
        kind = "endpoint"
    elif FUNCTION_RE.fullmatch(head) and not os.path.isdir(head):
        kind = "function"
    elif not os.path.isfile(os.path.join(head, "config.json")):
        raise ValueError(f"config {field}: {spec!r} is not a Hugging Face directory (no {head}/config.json), an "
                         "http(s) URL or module:function")
    else:
        kind = "local"
    return dict(kind=kind, target=head, name=options.get("name") or options.get("model") or head, **options)


class LocalModel:
    def __init__(self, path, device, dtype):
        self.model = Mistral.from_pretrained(path, dtype=dtype, device=device).eval()
        self.tok = Tokenizer.from_pretrained(path)
        if self.tok.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"{path}/tokenizer.model has {self.tok.vocab_size} pieces, {path}/config.json says "
                             f"vocab_size={self.model.config.vocab_size}")
        self.path, self.device, self.max_len = path, device, self.model.config.max_position_embeddings
        self._digits = None

    def generate(self, chats, max_new_tokens, temperature, top_p, generator):
        """One batched model.generate over the rendered chats -> per chat dict(text, finish_reason, tokens, error)."""
        ids = [self.tok.encode_chat(c, add_generation_prompt=True)[0] for c in chats]
        fit = [i for i, x in enumerate(ids) if len(x) + max_new_tokens <= self.max_len]
        out = [failure(f"prompt of {len(x)} tokens + {max_new_tokens} new ones exceeds max_position_embeddings="
                       f"{self.max_len} of {self.path}") for x in ids]  # replaced below where it fits
        if fit:
            new = self.model.generate([ids[i] for i in fit], max_new_tokens, temperature=temperature,
                                      top_p=top_p if top_p < 1.0 else None, generator=generator,
                                      eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
            for i, row in zip(fit, new):
                stop = bool(row) and row[-1] == self.tok.eos_id
                out[i] = dict(text=self.tok.decode(row[:-1] if stop else row), tokens=len(row), error=None,
                              finish_reason="stop" if stop else "length")
        return out

    def digit_ids(self):
        """Ids of "1".."5" as the token after RATING_PREFIX in the judge's reply. Each must be a single token after
        a shared context, or its next-token probability would not be that of the rating."""
        if self._digits is None:
            base = render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True) + RATING_PREFIX
            enc = [self.tok.encode(base + k, bos=True) for k in DIGITS]
            if any(len(e) != len(enc[0]) or e[:-1] != enc[0][:-1] for e in enc):
                raise ValueError(f"{self.path}: this tokenizer does not give each rating digit after "
                                 f"{RATING_PREFIX!r} as one token; use judge_mode=parse")
            self._digits = [e[-1] for e in enc]
        return self._digits


def failure(error):
    return dict(text=None, finish_reason=None, tokens=0, error=error)


class Endpoint:
    """An OpenAI-compatible chat-completions server. Transient failures (timeouts, connection errors, HTTP
    408/409/429/5xx, replies that are not a chat completion) are retried with exponential backoff, then
    returned as a failure; HTTP 401/403 stops the run, since no request could succeed."""

    def __init__(self, url, model, key_env, cfg):
        self.url, self.model, self.key_env = url.rstrip("/") + "/chat/completions", model, key_env
        self._key = os.environ.get(key_env) if key_env else None
        if key_env and not self._key:
            raise ValueError(f"config: the environment variable {key_env} (key_env of {url}) is not set")
        self.timeout, self.attempts, self.backoff, self.concurrency = (cfg.request_timeout, cfg.max_attempts,
                                                                       cfg.backoff_s, cfg.concurrency)

    def __repr__(self):  # never shows the key
        return f"Endpoint({self.url}, model={self.model})"

    def chat(self, messages, temperature, top_p, max_tokens):
        payload = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                              "top_p": top_p, "max_tokens": max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        error = "no attempt made"
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(min(60.0, self.backoff * 2 ** (attempt - 1)))
            try:
                req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    raise PermissionError(f"{self.url}: HTTP {e.code}: the endpoint refuses the key in "
                                          f"${self.key_env}") from None
                error = f"HTTP {e.code} {e.reason}"
                if e.code < 500 and e.code not in (408, 409, 429):
                    break  # a bad request stays bad
                continue
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets are OSErrors
                error = f"{type(e).__name__}: {e}"
                continue
            try:
                body = json.loads(raw)
                choice = body["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, IndexError, TypeError):
                error = f"reply is not a chat completion: {raw[:200]!r}"
                continue
            tokens = (body.get("usage") or {}).get("completion_tokens") or 0
            return dict(text=text, finish_reason=choice.get("finish_reason"), tokens=int(tokens), error=None)
        return failure(f"{error} (after {attempt + 1} attempts)")

    def chat_many(self, conversations, temperature, top_p, max_tokens):
        # In parallel; results in input order.
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda m: self.chat(m, temperature, top_p, max_tokens), conversations))


def load(spec, cfg, d, loaded):
    # Local checkpoints are loaded once per rank, even when the same one is a member and the judge.
    if spec["kind"] == "endpoint":
        return Endpoint(spec["target"], spec["model"], spec.get("key_env"), cfg)
    if spec["kind"] == "function":
        module, name = spec["target"].split(":")
        fn = getattr(importlib.import_module(module), name, None)
        if not callable(fn):
            raise ValueError(f"config judge: {module} has no function {name}")
        return fn
    if spec["target"] not in loaded:
        dtype = torch.float32 if d.device.type == "cpu" else torch.bfloat16
        loaded[spec["target"]] = LocalModel(spec["target"], d.device, dtype if cfg.dtype == "auto" else
                                            getattr(torch, cfg.dtype))
    return loaded[spec["target"]]


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
        if isinstance(runner, Endpoint):
            results = runner.chat_many(chats, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        else:
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


@torch.no_grad()
def last_logits(model, seqs, pad_id):
    # Left-padded batch, one forward pass; the LM head only at the last position, which is real in every row.
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    ok = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        ok[i, T - len(s):] = True
    dev = model.lm_head.weight.device
    h = model.hidden_states(ids.to(dev), attention_mask=ok.to(dev))[:, -1]   # (B, hidden)
    return model.lm_head(h)                                                  # (B, V)


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
        digits = judge.digit_ids()
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
    replies = judge.chat_many(chats, cfg.judge_temperature, 1.0, cfg.judge_max_tokens)
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


def binarize(row, context, seed):
    """chosen = the answer with the highest mean score (the first of them on a tie at the top); rejected = one
    of the other rated answers at random, seeded by (seed, prompt_id) alone; the pair is dropped when the two
    scores tie. Returns (pair or None, "pair" | "tie" | "too_few_rated"). The messages are the prompt's own
    context plus the answer: principle system prompts are left out, as ultrafeedback_binarized leaves them
    out, so chosen and rejected share the prompt DPO trains on."""
    rated = [c for c in row["completions"] if c["mean_score"] is not None]
    if len(rated) < 2:
        return None, "too_few_rated"
    best = max(range(len(rated)), key=lambda i: rated[i]["mean_score"])
    chosen = rated[best]
    rejected = random.Random(seed_of(seed, row["prompt_id"], "rejected")).choice(rated[:best] + rated[best + 1:])
    if rejected["mean_score"] == chosen["mean_score"]:
        return None, "tie"
    chosen_msgs = context + [{"role": "assistant", "content": chosen["response"]}]
    return {"prompt": row["instruction"], "prompt_id": row["prompt_id"], "chosen": chosen_msgs,
            "rejected": context + [{"role": "assistant", "content": rejected["response"]}],
            "messages": chosen_msgs, "score_chosen": chosen["mean_score"],
            "score_rejected": rejected["mean_score"]}, "pair"


# -----------------------------------------------------------------------------
# Part files: the resume state


def read_part(path, own):
    """Records of one part file. A torn last line (no newline: the writer was killed mid-line) is cut off when
    the file is this rank's own, and ignored otherwise; a bad complete line is damage, named."""
    with open(path, "rb") as f:
        data = f.read()
    *lines, tail = data.split(b"\n")
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e}); the part file is damaged") from None
    if tail and own:
        os.truncate(path, len(data) - len(tail))
        print(f"{path}: cut off a torn last line of {len(tail)} bytes (an interrupted write)", flush=True)
    return records


def read_parts(parts_dir, prompts, rank=None):
    """{index: record} over every rank's part file (a run may be resumed with another number of ranks)."""
    done = {}
    for path in sorted(glob.glob(os.path.join(parts_dir, "rank*.jsonl"))):
        for n, rec in enumerate(read_part(path, own=path.endswith(f"rank{rank}.jsonl")), 1):
            i = rec.get("index") if isinstance(rec, dict) else None
            if not isinstance(i, int) or "prompt_id" not in rec:
                raise ValueError(f"{path}:{n}: expected a record with 'index' and 'prompt_id'; the part file is damaged")
            if i >= len(prompts) or prompts[i]["prompt_id"] != rec["prompt_id"]:
                raise ValueError(f"{path}:{n}: prompt {i} ({rec['prompt_id']}) is not the input's prompt {i}: the "
                                 "prompts changed since the run began; use --resume=false to start over")
            done.setdefault(i, rec)
    return done


def check_resumable(cfg):
    path = os.path.join(cfg.out_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    now = dataclasses.asdict(cfg)
    diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RESUME_FREE and saved.get(k) != now[k]]
    if diff:
        raise ValueError(f"{path}: this run directory was made with other settings ({'; '.join(diff)}); resuming "
                         "would mix results. Use another out_dir, or --resume=false to start over")


def write_jsonl(path, rows):
    # Atomic: temp file, fsync, rename.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge(cfg, prompts, malformed, run_stats):
    """Rank 0, after every rank is done: raw.jsonl and pairs.jsonl in input order, and summary.json."""
    done = read_parts(os.path.join(cfg.out_dir, "parts"), prompts)
    missing = [i for i in range(len(prompts)) if i not in done]
    if missing:
        raise RuntimeError(f"{cfg.out_dir}/parts: {len(missing)} prompts have no record (e.g. {missing[:3]})")
    raw = [{k: v for k, v in done[i].items() if k != "index"} for i in range(len(prompts))]
    pairs, reasons = [], {"pair": 0, "tie": 0, "too_few_rated": 0}
    for row, prompt in zip(raw, prompts):
        pair, why = binarize(row, prompt["context"], cfg.seed)
        reasons[why] += 1
        if pair is not None:
            pairs.append(pair)
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
               "mean_score_rejected": mean([p["score_rejected"] for p in pairs]), **run_stats}
    common.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    return summary


# -----------------------------------------------------------------------------


def check_config(cfg):
    if not cfg.models.strip():
        raise ValueError("config models: empty; name at least one member (PATH or URL|model=NAME)")
    if not cfg.judge.strip():
        raise ValueError("config judge: empty; name a PATH, URL|model=NAME or module:function")
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
    if any(s["kind"] == "function" for s in member_specs):
        raise ValueError("config models: a member must be a local directory or an endpoint, not module:function")
    judge_spec = parse_spec(cfg.judge, "judge")
    d = common.setup_dist(cfg.device)
    # Ranks wait here for the slowest one; the default collective timeout is shorter than a feedback run.
    waits = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    t_start = time.time()
    prompts, malformed = read_prompts(cfg.prompts, cfg.strict, cfg.max_prompts)
    parts_dir = os.path.join(cfg.out_dir, "parts")
    if cfg.resume:
        check_resumable(cfg)
    dist.barrier(group=waits)  # everyone has checked before rank 0 writes config.json
    if d.main:
        for line in malformed[:20]:
            print(line, file=sys.stderr)
        if len(malformed) > 20:
            print(f"... and {len(malformed) - 20} more malformed rows", file=sys.stderr)
        os.makedirs(parts_dir, exist_ok=True)
        if not cfg.resume:
            for path in glob.glob(os.path.join(parts_dir, "rank*.jsonl")):
                os.remove(path)
        print(f"config: {dataclasses.asdict(cfg)}")
        common.write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
    dist.barrier(group=waits)
    done = read_parts(parts_dir, prompts, d.rank)

    # Batches are fixed slices of the input order; rank r takes batches r, r + world, ... . A batch's answers
    # depend only on it, so neither the number of ranks nor a restart changes them.
    def batch(j):
        return prompts[j * cfg.batch_size:(j + 1) * cfg.batch_size]

    mine = range(d.rank, -(-len(prompts) // cfg.batch_size), d.world)
    todo = [j for j in mine if any(p["index"] not in done for p in batch(j))]
    remaining = sum(p["index"] not in done for j in todo for p in batch(j))
    if d.main:
        print(f"{len(prompts)} prompts ({len(malformed)} malformed rows skipped), {len(done)} already done; "
              f"{len(member_specs)} members, judge {judge_spec['kind']} {judge_spec['name']}; {d.world} ranks")
    loaded = {}
    members = [(s, load(s, cfg, d, loaded)) for s in member_specs] if todo else []
    judge = load(judge_spec, cfg, d, loaded) if todo else None

    from tqdm import tqdm
    my_total = sum(len(batch(j)) for j in mine)
    quiet = not sys.stderr.isatty() and os.environ.get("TQDM_FORCE") != "1"  # as common.Logger
    bar = tqdm(total=my_total, initial=my_total - remaining, desc=f"feedback (rank 0 of {d.world})",
               dynamic_ncols=True, disable=not d.main or quiet)
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if d.main else None
    tokens, gen_s, written, t0 = 0, 0.0, 0, time.time()
    with open(os.path.join(parts_dir, f"rank{d.rank}.jsonl"), "a", encoding="utf-8") as part:
        for j in todo:
            tg = time.time()
            completions, n_tok = write_answers(batch(j), j, members, cfg, d.device)
            gen_s, tokens = gen_s + time.time() - tg, tokens + n_tok
            if isinstance(judge, LocalModel):
                rate_local(judge, batch(j), completions, j, cfg)
            elif isinstance(judge, Endpoint):
                rate_endpoint(judge, batch(j), completions, cfg)
            else:
                rate_function(judge, batch(j), completions)
            for prompt, comps in zip(batch(j), completions):
                if prompt["index"] in done:
                    continue  # a half-written batch was recomputed whole: append only what was missing
                for c in comps:
                    c["mean_score"] = mean_score(c["annotations"])
                rec = {"index": prompt["index"], "instruction": prompt["prompt"], "source": prompt["source"],
                       "prompt_id": prompt["prompt_id"], "completions": comps}
                part.write(json.dumps(rec, ensure_ascii=False) + "\n")
                part.flush()
                os.fsync(part.fileno())  # one prompt, once written, survives a kill
                written += 1
                bar.update(1)
            rates = dict(prompts_per_s=written / (time.time() - t0), tokens_per_s=tokens / max(gen_s, 1e-9))
            bar.set_postfix({k: f"{v:.3g}" for k, v in rates.items()}, refresh=False)
            if metrics:
                metrics.write(json.dumps({"batch": j, "time": round(time.time(), 3), "prompts_written": written,
                                          "tokens": tokens, **{k: round(v, 3) for k, v in rates.items()}}) + "\n")
                metrics.flush()
    bar.close()
    if metrics:
        metrics.close()

    totals = torch.tensor([written, tokens, gen_s], dtype=torch.float64)
    dist.all_reduce(totals, group=waits)  # also the wait for every rank to finish its part file
    if d.main:
        wall = time.time() - t_start
        # Throughput of this process's run (a resumed run counts only what it did): all ranks together over the
        # wall time, and answer generation alone per rank.
        stats = {"prompts_this_run": int(totals[0]), "tokens_this_run": int(totals[1]), "wall_s": round(wall, 2),
                 "prompts_per_s": round(float(totals[0]) / wall, 3), "tokens_per_s": round(float(totals[1]) / wall, 1),
                 "generation_tokens_per_s_per_rank": round(float(totals[1]) / max(float(totals[2]), 1e-9), 1)}
        s = merge(cfg, prompts, malformed, stats)
        print(f"{s['pairs']} pairs from {s['prompts']} prompts ({s['ties_dropped']} ties dropped, {s['too_few_rated']} "
              f"with < 2 rated answers; {s['failed_answers']} of {s['answers']} answers failed); wrote "
              f"{cfg.out_dir}/raw.jsonl, pairs.jsonl, summary.json")
    dist.barrier(group=waits)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
