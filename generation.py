"""The generation clients that write text (local Hugging Face checkpoints, OpenAI-compatible endpoints, Python
functions as judges) and the distributed, resumable loop that runs them over batches with per-rank part files.
feedback.py, eval.py, chat.py and data/ultrachat/generate.py use them.
"""

import concurrent.futures
import dataclasses
import glob
import hashlib
import http.client
import importlib
import inspect
import json
import os
import re
import time
import urllib.error
import urllib.request
from datetime import timedelta

import torch
import torch.distributed as dist

from common import quiet_bars
from files import check_utf8, write_json
from model import Mistral

# -----------------------------------------------------------------------------
# Seeds and model specs


def seed_of(*keys):
    # A 63-bit seed from any keys, the same in every process (Python's hash() is salted per process).
    return int.from_bytes(hashlib.sha256("/".join(map(str, keys)).encode()).digest()[:8], "little") >> 1




FUNCTION_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def parse_spec(spec, field):
    """'PATH', 'URL|model=..|key_env=..|name=..' or 'module:function' -> dict(kind, target, name, options...)."""
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
    return {**options, "kind": kind, "target": head, "name": options.get("name") or options.get("model") or head,
            "field": field}


def failure(error):
    return dict(text=None, finish_reason=None, tokens=0, error=error)


# -----------------------------------------------------------------------------
# Clients: LocalModel, Endpoint and FunctionModel answer generate(chats, max_new_tokens, temperature, top_p,
# generator) with one dict(text, finish_reason, tokens, error) per chat; a function judge is called as it is


class LocalModel:
    """A Hugging Face-format directory on this rank's device; chats are rendered with the Zephyr template."""

    def __init__(self, path, device, dtype, kernels_on_cpu=False):
        from data.tokenizer import Tokenizer
        self.model = Mistral.from_pretrained(path, dtype=dtype, device=device).eval()
        self.model.kernels_on_cpu = kernels_on_cpu   # --rehearse_gpu: the model's CUDA path on CPU
        self.tok = Tokenizer.from_pretrained(path)
        if self.tok.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"{path}/tokenizer.model has {self.tok.vocab_size} pieces, {path}/config.json says "
                             f"vocab_size={self.model.config.vocab_size}")
        self.path, self.device, self.max_len = path, device, self.model.config.max_position_embeddings

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


class FunctionModel:
    """A Python function that answers chats, e.g. a feedback.py ensemble member: fn(messages) -> answer text,
    messages as chat dicts ending in the user turn; one call per chat. The sampling settings are the function's
    own business (max_new_tokens, temperature and top_p are not passed). A function that samples may take a
    keyword `seed`: it then gets one per chat, drawn from the caller's generator as a local model draws its
    samples, so its answers do not depend on the number of ranks or on restarts. An exception or a reply that
    is not text is recorded as that chat's failure, as an endpoint's failed request is."""

    def __init__(self, fn, name):
        self.fn, self.name = fn, name
        self.takes_seed = "seed" in inspect.signature(fn).parameters

    def generate(self, chats, max_new_tokens, temperature, top_p, generator=None):
        out = []
        for messages in chats:
            kw = {}
            if self.takes_seed:
                kw["seed"] = int(torch.randint(2**62, (1,), generator=generator,
                                               device=generator.device if generator is not None else "cpu"))
            try:
                text = self.fn(messages, **kw)
                if isinstance(text, str):
                    check_utf8(text, "reply")
            except Exception as e:  # one bad answer must not cost the batch
                out.append(failure(f"{self.name}: {type(e).__name__}: {e}"))
                continue
            out.append(dict(text=text, finish_reason="stop", tokens=0, error=None) if isinstance(text, str) else
                       failure(f"{self.name}: returned {type(text).__name__}, not a string"))
        return out


@torch.no_grad()
def last_logits(model, seqs, pad_id):
    # Next-token logits of each token-id list (a local judge's verdict: feedback.py, eval.py). Left-padded
    # batch, one forward pass; the LM head only at the last position, which is real in every row.
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    ok = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        ok[i, T - len(s):] = True
    dev = model.lm_head.weight.device
    h = model.hidden_states(ids.to(dev), attention_mask=ok.to(dev))[:, -1]   # (B, hidden)
    return model.lm_head(h)                                                  # (B, V)


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

    def chat(self, messages, temperature, top_p, max_tokens, top_logprobs=0):
        """One chat completion -> dict(text, finish_reason, tokens, error); with top_logprobs=k > 0 also
        top_logprobs: the k most likely first tokens as {token: logprob} (None when the server gives none)."""
        body = {"model": self.model, "messages": messages, "temperature": temperature, "top_p": top_p,
                "max_tokens": max_tokens}
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        payload = json.dumps(body).encode("utf-8")
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
                    raise PermissionError(f"{self.url}: HTTP {e.code}: the endpoint refuses " + (
                        f"the key in ${self.key_env}" if self.key_env else "requests without a key (add |key_env=VAR)")
                    ) from None
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
                check_utf8(text, "content")  # a reply that could not be written out is no reply
            except (ValueError, KeyError, IndexError, TypeError):
                error = f"reply is not a chat completion of valid text: {raw[:200]!r}"
                continue
            tokens = (body.get("usage") or {}).get("completion_tokens") or 0
            out = dict(text=text, finish_reason=choice.get("finish_reason"), tokens=int(tokens), error=None)
            if top_logprobs:
                out["top_logprobs"] = first_token_logprobs(choice)
            return out
        return failure(f"{error} (after {attempt + 1} attempts)")

    def generate(self, chats, max_new_tokens, temperature, top_p, generator=None, top_logprobs=0):
        # As LocalModel.generate: concurrent requests, results in input order. The server draws its own samples.
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda m: self.chat(m, temperature, top_p, max_new_tokens, top_logprobs), chats))


def first_token_logprobs(choice):
    """{token: logprob} of the first generated token's alternatives in a chat-completion choice (OpenAI's
    `logprobs.content[0].top_logprobs`), or None when the server sent none or sent them malformed."""
    try:
        tops = choice["logprobs"]["content"][0]["top_logprobs"]
        return {t["token"]: float(t["logprob"]) for t in tops}
    except (KeyError, IndexError, TypeError, ValueError):
        return None


DTYPES = ("auto", "float32", "bfloat16", "float16")  # of local generation models; auto: bf16 on CUDA, fp32 on CPU


def check_dtype(cfg):
    if cfg.dtype not in DTYPES:
        raise ValueError(f"config dtype: {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")


def local_dtype(cfg, d):
    if cfg.dtype == "auto":
        return torch.bfloat16 if d.gpu_path else torch.float32
    return getattr(torch, cfg.dtype)


def load_client(spec, cfg, d, loaded, answers=False):
    """A parse_spec dict -> LocalModel, Endpoint or function (with answers=True: a FunctionModel, a function that
    answers chats). A local checkpoint is loaded once per rank, even when it plays several parts. cfg provides
    dtype and the endpoint settings (request_timeout, ...)."""
    if spec["kind"] == "endpoint":
        return Endpoint(spec["target"], spec["model"], spec.get("key_env"), cfg)
    if spec["kind"] == "function":
        module, name = spec["target"].split(":")
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except ImportError as e:
            raise ValueError(f"config {spec['field']}: cannot import {module} ({e})") from None
        if not callable(fn):
            raise ValueError(f"config {spec['field']}: {module} has no function {name}")
        return FunctionModel(fn, spec["name"]) if answers else fn
    if spec["target"] not in loaded:
        loaded[spec["target"]] = LocalModel(spec["target"], d.device, local_dtype(cfg, d), d.rehearse)
    return loaded[spec["target"]]


# -----------------------------------------------------------------------------
# The resumable loop: per-rank part files of finished items


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


def read_parts(parts_dir, items, key, rank=None):
    """{index: record} over every rank's part file (a run may be resumed with another number of ranks). Each
    record must carry the `key` of the input item at its index, or the input changed under the run."""
    done = {}
    for path in sorted(glob.glob(os.path.join(parts_dir, "rank*.jsonl"))):
        for n, rec in enumerate(read_part(path, own=path.endswith(f"rank{rank}.jsonl")), 1):
            i = rec.get("index") if isinstance(rec, dict) else None
            if not isinstance(i, int) or key not in rec:
                raise ValueError(f"{path}:{n}: expected a record with 'index' and '{key}'; the part file is damaged")
            if i >= len(items) or items[i][key] != rec[key]:
                raise ValueError(f"{path}:{n}: item {i} ({rec[key]}) is not the input's item {i}: the input "
                                 "changed since the run began; use --resume=false to start over")
            done.setdefault(i, rec)
    return done


def check_resumable(cfg, resume_free, fixed=None):
    """Refuse to continue a run directory made with other results-deciding settings (all config fields but
    resume_free, plus `fixed`: what the run resolved, e.g. the device type behind device=auto). A field the saved
    config lacks (added to the code since) counts as its default."""
    path = os.path.join(cfg.out_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    now = {**dataclasses.asdict(cfg), **(fixed or {})}
    diff = [f"{k}: {saved.get(k, defaults.get(k))!r} -> {v!r}" for k, v in now.items()
            if k not in resume_free and saved.get(k, defaults.get(k)) != v]
    if diff:
        raise ValueError(f"{path}: this run directory was made with other settings ({'; '.join(diff)}); resuming "
                         "would mix results. Use another out_dir, or --resume=false to start over")


def run_in_parts(cfg, d, items, key, resume_free, start_worker, unit, fixed=None):
    """
    The distributed, resumable loop. items: dicts with 'index' and `key`, in input order; batches are fixed
    slices of cfg.batch_size of them and rank r takes batches r, r + world, ... . start_worker() is called only
    if this rank has work and returns work(batch, j) -> (records, tokens, generation seconds): one record
    (a dict) per item of batch j. Every finished item is appended to out_dir/parts/rank{r}.jsonl and fsynced,
    so a killed run loses at most the batch in flight: a restart skips finished items, recomputes a half-
    written batch whole and appends only its missing items. Records must depend only on (batch, j), never on
    a global random stream, so neither the number of ranks nor a restart changes them. Returns the totals over
    all ranks: dict(items, tokens, generation_s). `fixed` (see check_resumable) is saved in config.json too.
    """
    from tqdm import tqdm
    # Ranks wait here for the slowest one; the default collective timeout is shorter than a generation run.
    waits = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    parts_dir = os.path.join(cfg.out_dir, "parts")
    if cfg.resume:
        check_resumable(cfg, resume_free, fixed)
    dist.barrier(group=waits)  # everyone has checked before rank 0 writes config.json
    if d.main:
        os.makedirs(parts_dir, exist_ok=True)
        if not cfg.resume:  # start over: the old parts and metrics go (outputs are replaced at the end)
            for path in glob.glob(os.path.join(parts_dir, "rank*.jsonl")) + [os.path.join(cfg.out_dir, "metrics.jsonl")]:
                if os.path.exists(path):
                    os.remove(path)
        print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        write_json(os.path.join(cfg.out_dir, "config.json"), {**dataclasses.asdict(cfg), **(fixed or {})})
    dist.barrier(group=waits)
    done = read_parts(parts_dir, items, key, d.rank)

    def batch(j):
        return items[j * cfg.batch_size:(j + 1) * cfg.batch_size]

    mine = range(d.rank, -(-len(items) // cfg.batch_size), d.world)
    todo = [j for j in mine if any(x["index"] not in done for x in batch(j))]
    remaining = sum(x["index"] not in done for j in todo for x in batch(j))
    if d.main:
        print(f"{len(items)} {unit}s, {len(done)} already done; {d.world} ranks")
    work = start_worker() if todo else None
    my_total = sum(len(batch(j)) for j in mine)
    bar = tqdm(total=my_total, initial=my_total - remaining, desc=f"{unit}s (rank 0 of {d.world})",
               dynamic_ncols=True, disable=not d.main or quiet_bars())
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if d.main else None
    tokens, gen_s, written, t0 = 0, 0.0, 0, time.time()
    with open(os.path.join(parts_dir, f"rank{d.rank}.jsonl"), "a", encoding="utf-8") as part:
        for j in todo:
            records, n_tok, n_s = work(batch(j), j)
            tokens, gen_s = tokens + n_tok, gen_s + n_s
            for x, rec in zip(batch(j), records, strict=True):
                if x["index"] in done:
                    continue  # a half-written batch was recomputed whole: append only what was missing
                part.write(json.dumps({"index": x["index"], **rec}, ensure_ascii=False) + "\n")
                part.flush()
                os.fsync(part.fileno())  # one item, once written, survives a kill
                written += 1
                bar.update(1)
            rates = {f"{unit}s_per_s": written / (time.time() - t0), "tokens_per_s": tokens / max(gen_s, 1e-9)}
            bar.set_postfix({k: f"{v:.3g}" for k, v in rates.items()}, refresh=False)
            if metrics:
                metrics.write(json.dumps({"batch": j, "time": round(time.time(), 3), f"{unit}s_written": written,
                                          "tokens": tokens, **{k: round(v, 3) for k, v in rates.items()}}) + "\n")
                metrics.flush()
    bar.close()
    if metrics:
        metrics.close()
    totals = torch.tensor([written, tokens, gen_s], dtype=torch.float64)
    dist.all_reduce(totals, group=waits)  # also the wait for every rank to finish its part file
    return dict(items=int(totals[0]), tokens=int(totals[1]), generation_s=float(totals[2]))


def local_device(specs, d):
    # What check_resumable must also compare when a local model generates: the device type behind device=auto
    # decides its dtype and its sampler's random stream.
    return {"local_device": d.device.type} if any(s["kind"] == "local" for s in specs) else None


def read_finished(cfg, items, key):
    """Rank 0, after run_in_parts: every item's record, in input order, without its index."""
    done = read_parts(os.path.join(cfg.out_dir, "parts"), items, key)
    missing = [i for i in range(len(items)) if i not in done]
    if missing:
        raise RuntimeError(f"{cfg.out_dir}/parts: {len(missing)} items have no record (e.g. {missing[:3]})")
    return [{k: v for k, v in done[i].items() if k != "index"} for i in range(len(items))]


def run_stats(totals, wall, unit):
    # Throughput of this process's run (a resumed run counts only what it did): all ranks together over the
    # wall time, and generation alone per rank.
    return {f"{unit}s_this_run": totals["items"], "tokens_this_run": totals["tokens"], "wall_s": round(wall, 2),
            f"{unit}s_per_s": round(totals["items"] / wall, 3), "tokens_per_s": round(totals["tokens"] / wall, 1),
            "generation_tokens_per_s_per_rank": round(totals["tokens"] / max(totals["generation_s"], 1e-9), 1)}
