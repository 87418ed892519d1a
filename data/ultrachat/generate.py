"""
Teacher-written dialogues for dSFT, the UltraChat procedure: from seed material, one model plays the user
(writes the opening message, then a follow-up after each answer) and one plays the assistant, the teacher.

    torchrun --nproc_per_node=8 data/ultrachat/generate.py --seeds=data/ultrachat/seeds.jsonl \\
        --assistant="https://api.example.com/v1|model=teacher|key_env=API_KEY" --user=/ckpt/user-model
    python data/ultrachat/generate.py config/generate_tiny.json          # one process, CPU

Seeds (.jsonl or .parquet), one row each from one of UltraChat's three sectors, with optional `id` (string or
integer; default: a hash of the seed) and `source` (default: the file name):
    {"prompt": "..."}      the opening user message, as written: one dialogue
    {"topic": "..."}       questions about the world: the user role writes an opening question on the topic
    {"text_type": "..."}   writing and creation: the user role asks for a piece of that kind of text
    {"material": "..."}    assistance on existing material: the user role writes a request about the text, and
                           the opening message is that request, a blank line, then the material
A topic, text_type or material row gives openers_per_seed dialogues, each its own draw; openers_by=assistant
has the teacher write those opening messages instead of the user role. data/ultrachat/seeds.jsonl
is a small example of all four.

The roles `assistant` and `user` (empty: the assistant's model plays the user too) are each a PATH (a local
Hugging Face-format directory, chats rendered with the Zephyr template, one copy per rank) or an OpenAI-compatible
endpoint URL|model=NAME[|key_env=VAR], optionally |name=LABEL: as in feedback.py, whose clients these are.
The user role is asked in plain words (USER_SYSTEM, OPENERS, FOLLOW_UP below) to write the person's next message.

Each dialogue gets a number of rounds (a user message and the assistant's answer) drawn uniformly from
[min_rounds, max_rounds] by (seed, dialogue id). It ends early, keeping the rounds before, when a role fails (an
endpoint still failing after max_attempts, a prompt longer than a local model's context), writes an empty message,
or stops at its token limit (a cut-off message is no training target; keep_truncated=true keeps them).
assistant_system, if set, is the teacher's system prompt; it steers the teacher and is not written out.

Outputs in out_dir:
    parts/rank{r}.jsonl  one line per finished dialogue, appended and fsynced as it finishes (the resume state)
    raw.jsonl            every dialogue in input order: dialogue_id, source, seed_kind, user_model,
                         assistant_model, opener_model, rounds_planned, rounds, end (how it ended: complete, or
                         "opener|user|assistant failed|empty|truncated"), error, messages
    dialogues.jsonl      ultrachat_200k's schema (prompt, prompt_id = sha256 of it, messages) for every dialogue
                         with at least one round: data/ultrachat/prepare.py and sft.py take it as it is
    clean.jsonl          dialogues.jsonl cleaned as Zephyr cleaned UltraChat (data/ultrachat/clean.py: truecasing,
    clean.stats.json     refusal filter, duplicate prompts), with its counts; clean=false skips it
    summary.json, config.json, metrics.jsonl

Restarts are feedback.py's: with resume=true (the default) a run continues from its part files if the settings that
decide the results are those of config.json in out_dir (for local models, also the device type behind device=auto,
which decides their dtype); a killed run loses at most the batch in flight; local sampling is seeded by (seed, batch
index, round, role), so outputs do not depend on restarts or the number of ranks.
An endpoint samples on its own: rerun requests there give other text, which a restart never mixes into one dialogue.
"""

import hashlib
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

if __package__ in (None, ""):  # run as `python data/ultrachat/generate.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402
import generation  # noqa: E402
from files import check_utf8, parse_rows, write_json, write_jsonl  # noqa: E402
from data.ultrachat import clean  # noqa: E402


@dataclass
class Config:
    # Defaults: UltraChat's procedure (REFERENCE.md) at the sizes of its release (several rounds per dialogue,
    # answers up to 1024 tokens); sampling settings are ours, since UltraChat does not state them.
    seeds: str = "data/ultrachat/seeds.jsonl"   # .jsonl or .parquet rows: prompt | topic | text_type | material
    out_dir: str = "out/ultrachat_generate"
    assistant: str = ""               # PATH | URL|model=NAME[|key_env=VAR][|name=LABEL]: the teacher
    user: str = ""                    # the same forms; empty: the assistant's model plays the user too
    openers_per_seed: int = 1         # dialogues per topic / text_type / material row
    openers_by: str = "user"          # who turns those seeds into opening messages: "user" or "assistant" (the
                                      # teacher, as in UltraChat, where one model played both roles)
    min_rounds: int = 2               # rounds per dialogue, drawn uniformly from [min_rounds, max_rounds]
    max_rounds: int = 5
    assistant_system: str = ""        # the teacher's system prompt (not written to the output)
    temperature: float = 0.7          # the assistant's sampling
    top_p: float = 1.0                # both roles' nucleus sampling
    max_new_tokens: int = 1024
    user_temperature: float = 1.0     # the user's: higher, for varied questions
    user_max_new_tokens: int = 256
    keep_truncated: bool = False      # keep messages cut off at the token limit
    clean: bool = True                # write clean.jsonl (clean.py's three steps) beside dialogues.jsonl
    batch_size: int = 8               # dialogues generated together; a local model samples a round of all at once
    max_seeds: int = -1               # > 0: only the first N valid seed rows
    seed: int = 42
    resume: bool = True               # continue from out_dir/parts (same results-deciding config); false: start over
    strict: bool = False              # a malformed seed row stops the run instead of being skipped
    request_timeout: float = 300.0    # seconds per HTTP request
    max_attempts: int = 5             # per request; then the failure is recorded and the dialogue ends there
    backoff_s: float = 2.0            # wait before retry k (1, 2, ...): backoff_s * 2**(k-1), at most 60 s
    concurrency: int = 8              # requests in flight per rank to an endpoint
    dtype: str = "auto"               # local models: auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"


# Settings that change how fast, or only what is written after the dialogues: a run may resume with other values.
RESUME_FREE = {"resume", "strict", "request_timeout", "max_attempts", "backoff_s", "concurrency", "device", "clean"}

# -----------------------------------------------------------------------------
# What the user role is asked

USER_SYSTEM = ("You are role-playing a person who is chatting with an AI assistant. You are the person, not the "
               "assistant: write only what the person says, in their voice.")

OPENERS = {
    "topic": "Write the first message a curious person might send an AI assistant to learn about this topic: "
             "{text}\n\nMake it one specific question, not a greeting. Reply with the message only.",
    "text_type": "Write the first message a person might send an AI assistant asking it to write a {text}. Say "
                 "what it should be about and give any details the writer needs. Reply with the message only.",
    "material": "Here is a text:\n\n{text}\n\nWrite the first message a person might send an AI assistant about "
                "this text: a request to summarize, rewrite, continue or explain it, or a question about it. Do not "
                "repeat the text. Reply with the message only.",
}

FOLLOW_UP = ("Here is your conversation with an AI assistant so far (\"You\" is you):\n\n{transcript}\n\n"
             "Write your next message to the assistant: a natural follow-up to its last answer, such as a request "
             "for more detail or an example, a related question, or a new task on the same subject. Reply with the "
             "message only.")

# Labels a user model tends to put before the message (markdown emphasis allowed around them), and the point where
# it starts writing the answer too.
LABEL_RE = re.compile(r"^[*_#\s]{0,3}(?:you|user|human|person|me|message|question|follow-?up|next message)[*_]{0,3}"
                      r"\s*:\s*[*_]{0,2}\s*", re.IGNORECASE)
ANSWER_RE = re.compile(r"\n\s*[*_#]{0,3}(?:assistant|ai)[*_]{0,3}\s*:", re.IGNORECASE)
QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d"}


def _unquoted(text):
    if len(text) >= 2 and QUOTES.get(text[0]) == text[-1] and text[0] not in text[1:-1]:
        return text[1:-1].strip()
    return text


def user_message(text):
    """The user role's reply -> (the message: without a leading label, quotes around it all, or an answer it went
    on to write; whether it went on, i.e. the message itself is complete even if the reply hit the token limit)."""
    head, *rest = ANSWER_RE.split(text, maxsplit=1)
    text = _unquoted(head.strip())
    return _unquoted(LABEL_RE.sub("", text, count=1).strip()), bool(rest)


def transcript(messages):
    return "\n\n".join(f"{'You' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


def user_chat(dialogue, messages):
    # What the user role sees before writing the next user message of `dialogue` (messages: the rounds so far).
    ask = FOLLOW_UP.format(transcript=transcript(messages)) if messages else \
        OPENERS[dialogue["seed_kind"]].format(text=dialogue["text"])
    return [{"role": "system", "content": USER_SYSTEM}, {"role": "user", "content": ask}]


# -----------------------------------------------------------------------------
# Seeds

SEED_KINDS = ("prompt", "topic", "text_type", "material")


def parse_seed_row(row, default_source):
    """A row -> dict(seed_kind, text, seed_id, source); ValueError naming the field otherwise."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    kinds = [k for k in SEED_KINDS if row.get(k) is not None]
    if len(kinds) != 1:
        raise ValueError(f"expected exactly one of {', '.join(map(repr, SEED_KINDS))}, got "
                         f"{', '.join(map(repr, kinds)) or 'none'}")
    kind = kinds[0]
    text = row[kind]
    if not isinstance(text, str):
        raise ValueError(f"'{kind}': expected a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"'{kind}' is empty")
    check_utf8(text, kind)
    sid = row.get("id")
    if sid is None:
        sid = hashlib.sha256(f"{kind}\n{text}".encode("utf-8")).hexdigest()[:16]
    elif isinstance(sid, bool) or not isinstance(sid, (str, int)) or sid == "":
        raise ValueError(f"'id': expected a non-empty string or an integer, got {sid!r:.40}")
    source = row.get("source") if isinstance(row.get("source"), str) else default_source
    check_utf8(str(sid), "id")
    check_utf8(source, "source")
    return dict(seed_kind=kind, text=text, seed_id=str(sid), source=source)


def read_seeds(path, openers_per_seed, strict=False, max_seeds=-1):
    """The dialogues to write, in input order (each with its `index` and `dialogue_id`), the number of seed rows,
    and one message per malformed row skipped."""
    seeds, malformed = parse_rows(path, parse_seed_row, "seeds", strict, max_seeds)
    dialogues = []
    for seed in seeds:
        for k in range(1 if seed["seed_kind"] == "prompt" else openers_per_seed):
            dialogues.append(dict(index=len(dialogues), dialogue_id=f"{seed['seed_id']}/{k}", **seed))
    return dialogues, len(seeds), malformed


def rounds_planned(dialogue, cfg):
    return random.Random(generation.seed_of(cfg.seed, dialogue["dialogue_id"], "rounds")).randint(cfg.min_rounds,
                                                                                                  cfg.max_rounds)


# -----------------------------------------------------------------------------
# Dialogues


def problem(reply, text, cfg):
    # Why a reply cannot be a turn, or None.
    if reply["error"] is not None:
        return "failed", reply["error"]
    if not text.strip():
        return "empty", None
    if reply["finish_reason"] == "length" and not cfg.keep_truncated:
        return "truncated", "stopped at the token limit"
    return None


def write_dialogues(batch, j, user, assistant, names, cfg, device):
    """The records of a batch of dialogues, written round by round: in each round one batched call of the user
    role writes the next user message of every dialogue still going, then one of the assistant answers them.
    names: what the records call the two roles. Returns (records, tokens generated)."""
    plans = [rounds_planned(x, cfg) for x in batch]
    messages = [[] for _ in batch]             # the finished rounds of each dialogue
    ended = [None] * len(batch)                # (why, error) once a dialogue stops early
    tokens = 0

    def call(role, chats, max_new_tokens, temperature, r, tag):
        nonlocal tokens
        gen = torch.Generator(device=device).manual_seed(generation.seed_of(cfg.seed, "generate", j, r, tag))
        replies = role.generate(chats, max_new_tokens, temperature, cfg.top_p, gen)
        tokens += sum(x["tokens"] for x in replies)
        return replies

    system = [{"role": "system", "content": cfg.assistant_system}] if cfg.assistant_system else []
    for r in range(max(plans)):
        going = [i for i in range(len(batch)) if ended[i] is None and plans[i] > r]
        asked = {}  # i -> this round's user message
        for i in going:
            if r == 0 and batch[i]["seed_kind"] == "prompt":
                asked[i] = batch[i]["text"]
        need = [i for i in going if i not in asked]
        if need:
            writer = assistant if r == 0 and cfg.openers_by == "assistant" else user
            replies = call(writer, [user_chat(batch[i], messages[i]) for i in need], cfg.user_max_new_tokens,
                           cfg.user_temperature, r, "user")
            for i, reply in zip(need, replies):
                text, went_on = user_message(reply["text"] or "")
                if went_on:  # the message ended where the model started on the answer: not cut off
                    reply = dict(reply, finish_reason="stop")
                if (why := problem(reply, text, cfg)) is not None:
                    ended[i] = (("opener " if r == 0 else "user ") + why[0], why[1])
                elif r == 0 and batch[i]["seed_kind"] == "material":
                    asked[i] = f"{text}\n\n{batch[i]['text']}"
                else:
                    asked[i] = text
        going = sorted(asked)
        chats = [system + messages[i] + [{"role": "user", "content": asked[i]}] for i in going]
        replies = call(assistant, chats, cfg.max_new_tokens, cfg.temperature, r, "assistant") if going else []
        for i, reply in zip(going, replies):
            text = (reply["text"] or "").strip()
            if (why := problem(reply, text, cfg)) is not None:
                ended[i] = ("assistant " + why[0], why[1])
            else:
                messages[i] += [{"role": "user", "content": asked[i]}, {"role": "assistant", "content": text}]

    records = [{"dialogue_id": x["dialogue_id"], "source": x["source"], "seed_kind": x["seed_kind"],
                "user_model": names["user"], "assistant_model": names["assistant"],
                "opener_model": None if x["seed_kind"] == "prompt" else names[cfg.openers_by], "rounds_planned": plans[i],
                "rounds": len(messages[i]) // 2, "end": ended[i][0] if ended[i] else "complete",
                "error": ended[i][1] if ended[i] else None, "messages": messages[i]} for i, x in enumerate(batch)]
    return records, tokens


def ultrachat_row(messages):
    prompt = messages[0]["content"]
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(), "messages": messages}


def merge(cfg, dialogues, n_seeds, malformed, run_stats):
    """Rank 0, after every rank is done: raw.jsonl, dialogues.jsonl, clean.jsonl (+ stats) and summary.json."""
    raw = generation.read_finished(cfg, dialogues, "dialogue_id")
    rows = [ultrachat_row(r["messages"]) for r in raw if r["rounds"] > 0]
    write_jsonl(os.path.join(cfg.out_dir, "raw.jsonl"), raw)
    write_jsonl(os.path.join(cfg.out_dir, "dialogues.jsonl"), rows)
    summary = {"seeds": n_seeds, "malformed_rows": len(malformed), "dialogues": len(raw),
               "dialogues_written": len(rows), "no_round_finished": len(raw) - len(rows),
               "rounds": sum(r["rounds"] for r in raw),
               "rounds_histogram": dict(sorted(Counter(r["rounds"] for r in raw).items())),
               "ended": dict(Counter(r["end"] for r in raw).most_common()),
               "assistant_words_per_answer": round(sum(len(m["content"].split()) for r in rows for m in r["messages"]
                                                       if m["role"] == "assistant") / max(1, sum(
                                                           r["rounds"] for r in raw)), 1)}
    if cfg.clean:
        # clean.py's steps on our own output; a row it cannot read would be our bug, so it is not silenced.
        cleaned, stats = clean.clean_rows(rows, source=os.path.join(cfg.out_dir, "dialogues.jsonl"))
        write_jsonl(os.path.join(cfg.out_dir, "clean.jsonl"), cleaned)
        write_json(os.path.join(cfg.out_dir, "clean.stats.json"), stats)
        summary["clean"] = {k: stats[k] for k in ("rows_written", "turns_truecased", "refusal_removed",
                                                  "refusal_kept_because_asked", "duplicates_removed")}
        print(clean.summary(stats))
    summary.update(run_stats)
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    return summary


# -----------------------------------------------------------------------------


def check_config(cfg):
    if not cfg.assistant.strip():
        raise ValueError("config assistant: empty; name a PATH or URL|model=NAME")
    for key in ("openers_per_seed", "min_rounds", "batch_size", "max_new_tokens", "user_max_new_tokens",
                "max_attempts", "concurrency"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"config {key}: {getattr(cfg, key)} must be >= 1")
    generation.check_dtype(cfg)
    if cfg.openers_by not in ("user", "assistant"):
        raise ValueError(f"config openers_by: {cfg.openers_by!r}; choose user or assistant")
    if cfg.max_rounds < cfg.min_rounds:
        raise ValueError(f"config max_rounds: {cfg.max_rounds} is below min_rounds={cfg.min_rounds}")


def main(argv):
    cfg = common.parse_config(Config, argv)
    check_config(cfg)
    specs = {}
    for role in ("assistant", "user"):
        spec = generation.parse_spec(getattr(cfg, role) or cfg.assistant, role)
        if spec["kind"] == "function":
            raise ValueError(f"config {role}: {spec['target']!r}: a role is a local directory or an endpoint, "
                             "not module:function")
        specs[role] = spec
    names = {role: spec["name"] for role, spec in specs.items()}
    d = common.setup_dist(cfg.device)
    t_start = time.time()
    dialogues, n_seeds, malformed = read_seeds(cfg.seeds, cfg.openers_per_seed, cfg.strict, cfg.max_seeds)
    if d.main:
        for line in malformed[:20]:
            print(line, file=sys.stderr)
        if len(malformed) > 20:
            print(f"... and {len(malformed) - 20} more malformed rows", file=sys.stderr)
        print(f"{n_seeds} seeds ({len(malformed)} malformed rows skipped) -> {len(dialogues)} dialogues of "
              f"{cfg.min_rounds}-{cfg.max_rounds} rounds; assistant {specs['assistant']['kind']} "
              f"{names['assistant']}, user {specs['user']['kind']} {names['user']}")

    def start_worker():
        loaded = {}  # one copy of a local model that plays both roles
        user, assistant = (generation.load_client(specs[role], cfg, d, loaded) for role in ("user", "assistant"))

        def work(batch, j):
            t0 = time.time()
            records, tokens = write_dialogues(batch, j, user, assistant, names, cfg, d.device)
            return records, tokens, time.time() - t0
        return work

    totals = generation.run_in_parts(cfg, d, dialogues, "dialogue_id", RESUME_FREE, start_worker, "dialogue",
                                     generation.local_device(list(specs.values()), d))
    if d.main:
        stats = generation.run_stats(totals, time.time() - t_start, "dialogue")
        s = merge(cfg, dialogues, n_seeds, malformed, stats)
        print(f"{s['dialogues_written']} of {s['dialogues']} dialogues written ({s['rounds']} rounds; ended: "
              f"{', '.join(f'{k} {v}' for k, v in s['ended'].items())}); wrote {cfg.out_dir}/raw.jsonl, "
              f"dialogues.jsonl{', clean.jsonl' if cfg.clean else ''}, summary.json")
    common.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
