# data/ultrachat/generate.py: dialogues from a tiny random local model in both roles (1 and 2 ranks), from a local
# OpenAI-compatible server whose replies the test can predict word for word, and across a SIGKILL.
import hashlib
import json
import os
import re
import sys
import time

import pytest
import torch

from conftest import ChatServer, kill_after_lines, read_jsonl, run, save_tiny_model, torchrun
from data.tokenizer import Tokenizer
from data.ultrachat import generate
from data.ultrachat.prepare import check_row
from model import Mistral

SCRIPT = "data/ultrachat/generate.py"


def write_seeds(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def flags(**kw):
    return [f"--{k}={v}" for k, v in kw.items()]


def check_dialogue_shape(messages):
    # ultrachat_200k: user first, then strictly alternating, ending with the assistant; no system turn.
    assert messages and len(messages) % 2 == 0
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)


# ---------------------------------------------------------------------------------------------
# Local models

LOCAL_SEEDS = [{"id": "p0", "prompt": "Name a prime number."}, {"id": "t0", "topic": "tides"},
               {"id": "w0", "text_type": "haiku"}, {"material": "The cat sat on the mat. It was warm."},
               {"id": 7, "prompt": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("local")
    seeds = write_seeds(tmp / "seeds.jsonl", LOCAL_SEEDS)
    user = save_tiny_model(tmp / "user_model", tiny_tokenizer, seed=2)  # another model plays the user
    args = flags(seeds=seeds, assistant=tiny_model, user=f"{user}|name=sim", openers_per_seed=2, min_rounds=1,
                 max_rounds=3, temperature=0.0, max_new_tokens=12, user_max_new_tokens=10, keep_truncated="true",
                 batch_size=3, seed=5)
    one = str(tmp / "one")
    run([sys.executable, SCRIPT, *args, f"--out_dir={one}"])
    return one, args, seeds


def test_local_models_write_ultrachat_dialogues_the_same_on_two_ranks(local_run, tiny_model, tmp_path):
    one, args, seeds = local_run
    two = str(tmp_path / "two")
    torchrun(SCRIPT, [*args, f"--out_dir={two}"], nproc=2)
    assert sorted(os.listdir(os.path.join(two, "parts"))) == ["rank0.jsonl", "rank1.jsonl"]
    for name in ("raw.jsonl", "dialogues.jsonl", "clean.jsonl"):  # batches, not ranks, decide the sampling
        assert open(os.path.join(two, name), "rb").read() == open(os.path.join(one, name), "rb").read(), name

    raw = read_jsonl(os.path.join(one, "raw.jsonl"))
    # 2 prompt rows -> 1 dialogue each; topic, text_type, material -> openers_per_seed = 2 each
    assert [r["dialogue_id"].rsplit("/", 1)[1] for r in raw] == ["0", "0", "1", "0", "1", "0", "1", "0"]
    assert [r["seed_kind"] for r in raw] == ["prompt"] + ["topic"] * 2 + ["text_type"] * 2 + ["material"] * 2 + \
        ["prompt"]
    assert raw[0]["dialogue_id"] == "p0/0" and raw[-1]["dialogue_id"] == "7/0"
    assert raw[5]["dialogue_id"] == hashlib.sha256(f"material\n{LOCAL_SEEDS[3]['material']}".encode()).hexdigest()[
        :16] + "/0"
    planned = [r["rounds_planned"] for r in raw]
    assert set(planned) <= {1, 2, 3} and len(set(planned)) > 1
    for r in raw:
        assert r["user_model"] == "sim" and r["assistant_model"] == tiny_model and r["source"] == "seeds.jsonl"
        assert r["rounds"] == len(r["messages"]) // 2 <= r["rounds_planned"]
        assert (r["end"] == "complete") == (r["rounds"] == r["rounds_planned"]) and (r["error"] is None) == (
            r["end"] in ("complete", "user empty", "assistant empty"))
        if r["rounds"]:
            check_dialogue_shape(r["messages"])
    assert raw[0]["messages"][0]["content"] == "Name a prime number."
    for r in raw[5:7]:  # material: the user's request, a blank line, then the material
        if r["rounds"]:
            assert r["messages"][0]["content"].endswith("\n\nThe cat sat on the mat. It was warm.")
    openers = [r["messages"][0]["content"] for r in raw[1:3] if r["rounds"]]
    assert len(set(openers)) == len(openers)  # two draws, two openers

    rows = read_jsonl(os.path.join(one, "dialogues.jsonl"))
    assert len(rows) == sum(r["rounds"] > 0 for r in raw) >= 6
    for row in rows:
        assert set(row) == {"prompt", "prompt_id", "messages"}
        assert row["prompt"] == row["messages"][0]["content"]
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert check_row(row) == row["messages"]
    summary = json.load(open(os.path.join(one, "summary.json")))
    assert summary["seeds"] == 5 and summary["dialogues"] == 8 and summary["dialogues_written"] == len(rows)
    assert summary["rounds"] == sum(r["rounds"] for r in raw) and sum(summary["ended"].values()) == 8
    assert summary["clean"]["rows_written"] == len(read_jsonl(os.path.join(one, "clean.jsonl")))


def test_local_assistant_answer_is_the_models_greedy_continuation(local_run, tiny_model):
    # temperature=0: the first answer to "Name a prime number." must be the model's argmax continuation of the
    # Zephyr-rendered prompt, computed here token by token without cache, padding or batching.
    one, _, _ = local_run
    raw = read_jsonl(os.path.join(one, "raw.jsonl"))
    tok = Tokenizer.from_pretrained(tiny_model)
    model = Mistral.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = tok.encode_chat([{"role": "user", "content": "Name a prime number."}], add_generation_prompt=True)[0]
    new = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            new.append(nxt)
    assert raw[0]["messages"][1]["content"] == tok.decode(new).strip()


def test_dialogues_go_through_prepare(local_run, tiny_tokenizer, tmp_path):
    one, _, _ = local_run
    run([sys.executable, "data/ultrachat/prepare.py", f"--tokenizer={tiny_tokenizer}", f"--out={tmp_path}",
         "--train", os.path.join(one, "clean.jsonl")])
    info = json.load(open(tmp_path / "train.json"))
    assert info["n_examples"] == info["rows_read"] == len(read_jsonl(os.path.join(one, "clean.jsonl"))) and info["n_bad_rows"] == 0


# ---------------------------------------------------------------------------------------------
# An OpenAI-compatible server with predictable replies


class TwoRoleServer(ChatServer):
    """Model "sim" plays the user, model "teacher" the assistant. The user's replies come with the wrapping a real
    model adds (a label, quotes, the answer written on), which generate.user_message must strip. Failures by
    content: "flaky" gets one HTTP 500 first, "broken-teacher" always HTTP 400, a follow-up after "broken-user"
    HTTP 400, and "longwinded" stops at the token limit. `delay` slows every reply down."""

    def __init__(self):
        self.requests, self.failed_once, self.delay = [], set(), 0.0
        super().__init__()

    def respond(self, body, headers):
        time.sleep(self.delay)
        with self.lock:
            self.requests.append(body)
        ask = body["messages"][-1]["content"]
        if body["model"] == "sim":
            if m := re.search(r"about this topic: (.*?)\n\nMake it", ask):
                return 200, f"User: What is the most surprising fact about {m.group(1)}?", "stop"
            if m := re.search(r"asking it to write a (.*?)\. Say", ask):
                return 200, f'"Please write a {m.group(1)} about autumn."', "stop"
            if ask.startswith("Here is a text:"):  # runs on into the answer until the token limit
                return 200, "Summarize this text in one sentence.\nAssistant: Sure! The cat", "length"
            assert ask.startswith("Here is your conversation")
            if "broken-user" in ask:
                return 400, b"bad request"
            return 200, f"Why is that so? (round {ask.count(chr(10) + 'Assistant: ') + 1})", "stop"
        assert body["model"] == "teacher"
        users = [m for m in body["messages"] if m["role"] == "user"]
        with self.lock:
            first = ask not in self.failed_once
            self.failed_once.add(ask)
        if "flaky" in ask and first:
            return 500, b"overloaded"
        if "broken-teacher" in ask:
            return 400, b"bad request"
        if "longwinded" in ask:
            return 200, "It all began", "length"
        if "surrogate" in ask:  # JSON-escaped, as a broken server might send it: no valid text
            return 200, b'{"choices": [{"message": {"role": "assistant", "content": "bad \\ud800"}}]}'
        return 200, f"Answer {len(users)} to: {ask}", "stop"


def expected_messages(first, rounds):
    msgs = [{"role": "user", "content": first}, {"role": "assistant", "content": f"Answer 1 to: {first}"}]
    for k in range(2, rounds + 1):
        q = f"Why is that so? (round {k})"
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": f"Answer {k} to: {q}"}]
    return msgs


ENDPOINT_SEEDS = [{"id": "p", "prompt": "Name a prime number."}, {"id": "t", "topic": "tides"},
                  {"id": "w", "text_type": "haiku"}, {"id": "m", "material": "The cat sat on the mat."},
                  {"id": "f", "prompt": "A flaky question"}, {"id": "l", "prompt": "A longwinded question"},
                  {"id": "b", "prompt": "A broken-teacher question"}, {"id": "u", "prompt": "A broken-user start"},
                  {"id": "dup", "prompt": "Name a  prime number."}, {"id": "s", "prompt": "A surrogate reply"}]


def test_endpoint_roles_dialogues_by_hand(tmp_path):
    server = TwoRoleServer()
    seeds = write_seeds(tmp_path / "seeds.jsonl", ENDPOINT_SEEDS)
    out = tmp_path / "out"
    p = run([sys.executable, SCRIPT, *flags(seeds=seeds, out_dir=out, assistant=f"{server.url}|model=teacher",
                                            user=f"{server.url}|model=sim", min_rounds=2, max_rounds=4,
                                            assistant_system="Be brief.", max_new_tokens=64, user_max_new_tokens=32,
                                            max_attempts=3, backoff_s=0.01, batch_size=4, seed=11)], timeout=120)
    raw = {r["dialogue_id"]: r for r in read_jsonl(out / "raw.jsonl")}
    cfg = generate.Config(seed=11, min_rounds=2, max_rounds=4)
    plan = {k: generate.rounds_planned({"dialogue_id": k}, cfg) for k in raw}
    assert set(plan.values()) - {2, 3, 4} == set() and len(set(plan.values())) > 1

    firsts = {"p/0": "Name a prime number.", "t/0": "What is the most surprising fact about tides?",
              "w/0": "Please write a haiku about autumn.",
              "m/0": "Summarize this text in one sentence.\n\nThe cat sat on the mat.",
              "f/0": "A flaky question", "dup/0": "Name a  prime number."}
    for k, first in firsts.items():  # complete; "flaky" went through on the retry
        assert raw[k]["messages"] == expected_messages(first, plan[k]), k
        assert raw[k]["end"] == "complete" and raw[k]["rounds"] == plan[k] and raw[k]["error"] is None
        assert raw[k]["user_model"] == "sim" and raw[k]["assistant_model"] == "teacher"
        assert raw[k]["opener_model"] == (None if ENDPOINT_SEEDS[list(raw).index(k)].get("prompt") else "sim")
    assert raw["l/0"]["end"] == "assistant truncated" and raw["l/0"]["messages"] == []
    assert raw["b/0"]["end"] == "assistant failed" and raw["b/0"]["messages"] == []
    assert "HTTP 400" in raw["b/0"]["error"] and "after 1 attempts" in raw["b/0"]["error"]  # not retried
    assert raw["u/0"]["end"] == "user failed" and raw["u/0"]["messages"] == expected_messages("A broken-user start", 1)
    assert raw["s/0"]["end"] == "assistant failed" and "not a chat completion of valid text" in raw["s/0"]["error"]
    assert "after 3 attempts" in raw["s/0"]["error"]

    # The teacher saw its system prompt, the user role its own; sampling settings went to the right role.
    for body in server.requests:
        if body["model"] == "teacher":
            assert body["messages"][0] == {"role": "system", "content": "Be brief."}
            assert (body["temperature"], body["max_tokens"]) == (0.7, 64)
        else:
            assert body["messages"][0] == {"role": "system", "content": generate.USER_SYSTEM}
            assert (body["temperature"], body["max_tokens"]) == (1.0, 32)

    rows = read_jsonl(out / "dialogues.jsonl")
    assert [r["messages"] for r in rows] == [raw[k]["messages"] for k in raw if raw[k]["rounds"]]
    cleaned = read_jsonl(out / "clean.jsonl")  # the duplicate prompt (up to whitespace) is removed
    assert [r["prompt"] for r in cleaned] == [r["prompt"] for r in rows if r["prompt"] != "Name a  prime number."]
    stats = json.load(open(out / "clean.stats.json"))
    assert stats["duplicates_removed"] == 1 and stats["rows_written"] == len(cleaned)
    summary = json.load(open(out / "summary.json"))
    assert summary["ended"] == {"complete": 6, "assistant failed": 2, "assistant truncated": 1, "user failed": 1}
    assert summary["dialogues_written"] == 7 and summary["no_round_finished"] == 3
    assert summary["rounds"] == sum(plan[k] for k in firsts) + 1
    assert "7 of 10 dialogues written" in p.stdout


def test_the_teacher_can_write_the_openers(tmp_path):
    server = TwoRoleServer()
    seeds = write_seeds(tmp_path / "seeds.jsonl", [{"id": "t", "topic": "tides"}, {"id": "p", "prompt": "Hi there"}])
    out = tmp_path / "out"
    run([sys.executable, SCRIPT, *flags(seeds=seeds, out_dir=out, assistant=f"{server.url}|model=teacher",
                                        user=f"{server.url}|model=sim", openers_by="assistant", min_rounds=1,
                                        max_rounds=1, user_temperature=0.9, user_max_new_tokens=32)])
    raw = {r["dialogue_id"]: r for r in read_jsonl(out / "raw.jsonl")}
    # The opener request went to the teacher (whose test persona answers everything with "Answer n to: ...").
    opener = raw["t/0"]["messages"][0]["content"]
    assert opener.startswith("Answer 1 to: Write the first message a curious person") and "tides" in opener
    assert raw["p/0"]["messages"][0]["content"] == "Hi there"
    assert raw["t/0"]["opener_model"] == "teacher" and raw["p/0"]["opener_model"] is None
    to_teacher = [b for b in server.requests if b["model"] == "teacher"]
    assert len(to_teacher) == 3 and not any(b["model"] == "sim" for b in server.requests)
    ask = next(b for b in to_teacher if b["messages"][0]["content"] == generate.USER_SYSTEM)
    assert (ask["temperature"], ask["max_tokens"]) == (0.9, 32)  # the user role's settings, for a user message


def test_killed_run_resumes_to_identical_output(tmp_path):
    server = TwoRoleServer()
    seeds = write_seeds(tmp_path / "seeds.jsonl", [{"prompt": f"Question {i}"} for i in range(8)] +
                        [{"topic": "rivers"}])
    base = flags(seeds=seeds, assistant=f"{server.url}|model=teacher", user=f"{server.url}|model=sim",
                 min_rounds=2, max_rounds=3, batch_size=1, concurrency=1)
    ref = tmp_path / "ref"
    run([sys.executable, SCRIPT, *base, f"--out_dir={ref}"])

    out = tmp_path / "killed"
    part = out / "parts" / "rank0.jsonl"
    server.delay = 0.1  # slow enough to be killed midway
    cmd = [sys.executable, SCRIPT, *base, f"--out_dir={out}"]
    n_done = kill_after_lines(cmd, part, 2)
    assert 2 <= n_done < 9 and not (out / "raw.jsonl").exists()
    with open(part, "ab") as f:
        f.write(b'{"index": 8, "dialogue_id": "x", "mess')  # a torn last line, as a kill mid-write leaves

    server.delay = 0.0
    p = run(cmd)
    assert "torn last line" in p.stdout and f"{n_done} already done" in p.stdout
    for name in ("raw.jsonl", "dialogues.jsonl", "clean.jsonl"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert sorted(r["index"] for r in read_jsonl(part)) == list(range(9))  # each dialogue once


# ---------------------------------------------------------------------------------------------
# Pieces


def test_user_message_strips_what_models_wrap_around_it():
    cases = {
        "What is a tide?": "What is a tide?",
        "User: What is a tide?": "What is a tide?",
        "**You:** What is a tide?": "What is a tide?",
        "  \"Why does the moon matter?\"  ": "Why does the moon matter?",
        "\u201cWhy?\u201d": "Why?",
        '"User: What is a tide?"': "What is a tide?",           # quotes around a label and its message
        "User: 'Why?'": "Why?",
        # Left alone: quotes that are not around it all, a colon later on, a label-like word not at the start,
        # brackets that belong to the text.
        '"Tides" and "waves": which is which?': '"Tides" and "waves": which is which?',
        "Question 2: is the moon the cause?": "Question 2: is the moon the cause?",
        "Here is my question: why?": "Here is my question: why?",
        "(Question: why?)": "(Question: why?)",
        "Explain this:\n\nx = 1": "Explain this:\n\nx = 1",
        "User:": "",
    }
    for given, want in cases.items():
        assert generate.user_message(given) == (want, False), given
    # The model went on to write the answer: cut there, and the message counts as complete.
    for given in ("Tell me more.\nAssistant: Sure, tides are", "Tell me more.\n\n**AI:** Sure",
                  '"Tell me more."\nassistant : x'):
        assert generate.user_message(given) == ("Tell me more.", True), given


def test_rounds_are_drawn_per_dialogue_in_range():
    cfg = generate.Config(seed=3, min_rounds=2, max_rounds=5)
    draws = [generate.rounds_planned({"dialogue_id": f"d{i}/0"}, cfg) for i in range(400)]
    assert set(draws) == {2, 3, 4, 5} and all(80 - 40 < draws.count(k) < 100 + 40 for k in (2, 3, 4, 5))
    assert draws == [generate.rounds_planned({"dialogue_id": f"d{i}/0"}, cfg) for i in range(400)]
    other = generate.Config(seed=4, min_rounds=2, max_rounds=5)
    assert draws != [generate.rounds_planned({"dialogue_id": f"d{i}/0"}, other) for i in range(400)]


def test_malformed_seed_rows_are_named_and_skipped(tmp_path):
    lines = ['{"topic": "tides"}', 'not json', '{"prompt": "a", "topic": "b"}', '{"text": "x"}',
             '{"material": 5}', '{"prompt": "  "}', '{"prompt": "ok", "id": true}', '[1]',
             '{"prompt": "fine", "id": 12, "source": "mine"}', '{"topic": "x", "source": "\\ud800"}',
             '{"prompt": "ok", "id": "a\\udc00"}', '{"prompt": "\\ud83d"}']
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    dialogues, n_seeds, malformed = generate.read_seeds(str(path), openers_per_seed=3)
    assert n_seeds == 2 and [d["dialogue_id"] for d in dialogues][3:] == ["12/0"]
    assert [d["index"] for d in dialogues] == [0, 1, 2, 3] and dialogues[3]["source"] == "mine"
    assert dialogues[0]["source"] == "s.jsonl" and dialogues[0]["seed_kind"] == "topic"
    assert [m.split(": ")[0] for m in malformed] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8, 10, 11, 12)]
    assert "not valid JSON" in malformed[0] and "got 'prompt', 'topic'" in malformed[1]
    assert "got none" in malformed[2] and "'material': expected a string" in malformed[3]
    assert "'prompt' is empty" in malformed[4] and "'id'" in malformed[5]
    # Lone surrogates (JSON-escaped) in any field: they could never be written out as UTF-8.
    assert [m.split(": ", 1)[1] for m in malformed[7:]] == [
        "'source': lone surrogate at 0; skipped", "'id': lone surrogate at 1; skipped",
        "'prompt': lone surrogate at 0; skipped"]
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        generate.read_seeds(str(path), 1, strict=True)
    assert len(generate.read_seeds(str(path), 1, max_seeds=1)[0]) == 1


def test_bad_config_is_named(tmp_path):
    seeds = write_seeds(tmp_path / "s.jsonl", [{"prompt": "hi"}])
    for args, message in [([], "config assistant: empty"),
                          (["--assistant=http://x/v1|model=t", "--min_rounds=3", "--max_rounds=2"],
                           "max_rounds: 2 is below min_rounds=3"),
                          (["--assistant=http://x/v1"], "an endpoint needs |model=NAME"),
                          (["--assistant=http://x/v1|model=t", "--openers_by=judge"], "openers_by: 'judge'"),
                          (["--assistant=http://x/v1|model=t", "--dtype=bf16"], "config dtype: 'bf16'"),
                          (["--assistant=http://x/v1|model=t", "--user=os:getcwd"], "config user: 'os:getcwd'")]:
        p = run([sys.executable, SCRIPT, f"--seeds={seeds}", f"--out_dir={tmp_path}/o", *args], check=False)
        assert p.returncode != 0 and message in p.stderr, (args, p.stderr[-500:])
