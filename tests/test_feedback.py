# feedback.py: answers from an ensemble, ratings from a judge, Zephyr's binarization; under torchrun, through
# failing endpoints, and across a SIGKILL. Models are tiny random Mistrals; the judge is a function of the text.
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time

import pytest
import torch

from conftest import ROOT, ChatServer, kill_after_lines, read_jsonl, run, torchrun
import feedback
from files import write_json
import generation
from data.tokenizer import render_chat

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}  # the subprocesses import judge_len from this module


def judge_len(prompt, answer):
    """The test judge: 0, 1 or 2 from the answer's length, so ties and pairs both occur. Sleeps when asked,
    to slow a run down enough to be killed midway."""
    time.sleep(float(os.environ.get("FB_TEST_JUDGE_SLEEP", "0")))
    return float(len(answer) % 3)


PROMPT_ROWS = [{"instruction": f"Sort these numbers in ascending order: {i}, {2 * i + 1}, 7", "source": "tiny/sort"}
               for i in range(10)]
PROMPT_ROWS.insert(3, {"prompt": "Say hi", "prompt_id": "given-id"})
PROMPT_ROWS.insert(6, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                    {"role": "user", "content": "Count to 3"},
                                    {"role": "assistant", "content": "1 2 3"}]})


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [json.dumps(r) for r in PROMPT_ROWS]
    lines.insert(5, '{"instruction": "broken')  # line 6: malformed, skipped and counted
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def args(prompts, model, out, **kw):
    base = dict(prompts=prompts, out_dir=out, models=model, models_per_prompt=0, answers_per_member=3,
                principles="false", temperature=0.7, max_new_tokens=8, judge="test_feedback:judge_len",
                batch_size=2, seed=3)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def one_rank(prompts_file, tiny_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one_rank"))
    p = run([sys.executable, "feedback.py", *args(prompts_file, tiny_model, out)], env=ENV)
    return out, p


def test_two_ranks_write_both_schemas_and_match_one_rank(one_rank, prompts_file, tiny_model, tmp_path):
    ref, p = one_rank
    assert f"{prompts_file}:6: not valid JSON" in p.stderr
    out = str(tmp_path / "two")
    torchrun("feedback.py", args(prompts_file, tiny_model, out), nproc=2, env=ENV)
    assert sorted(os.listdir(os.path.join(out, "parts"))) == ["rank0.jsonl", "rank1.jsonl"]
    for name in ("raw.jsonl", "pairs.jsonl"):  # batches, not ranks, decide the randomness
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(ref, name), "rb").read(), name

    raw, pairs = read_jsonl(os.path.join(out, "raw.jsonl")), read_jsonl(os.path.join(out, "pairs.jsonl"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert len(raw) == summary["prompts"] == 12 and summary["malformed_rows"] == 1
    assert [r["instruction"] for r in raw] == [r.get("instruction") or r.get("prompt") or "Count to 3"
                                               for r in PROMPT_ROWS]  # input order
    assert raw[3]["prompt_id"] == "given-id"
    for row in raw:
        assert set(row) == {"instruction", "source", "prompt_id", "completions"}
        assert len(row["completions"]) == 3
        for c in row["completions"]:
            assert c["model"] == tiny_model and c["principle"] is None and isinstance(c["response"], str)
            assert c["annotations"]["score"]["Rating"] == judge_len(None, c["response"]) == c["mean_score"]
    assert summary["answers"] == 36 and summary["failed_answers"] == 0
    assert summary["pairs"] == len(pairs) > 0 and summary["ties_dropped"] > 0
    assert summary["pairs"] + summary["ties_dropped"] + summary["too_few_rated"] == 12
    by_id = {r["prompt_id"]: r for r in raw}
    for pair in pairs:
        assert set(pair) == {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}
        row = by_id[pair["prompt_id"]]
        assert pair["score_chosen"] == max(c["mean_score"] for c in row["completions"]) > pair["score_rejected"]
        assert pair["messages"] == pair["chosen"] and pair["chosen"][-1]["role"] == "assistant"
        assert pair["chosen"][:-1] == pair["rejected"][:-1]
        answers = {c["response"] for c in row["completions"]}
        assert {pair["chosen"][-1]["content"], pair["rejected"][-1]["content"]} <= answers
    multi = [p for p in pairs if p["prompt"] == "Count to 3"]
    if multi:  # the context is every turn up to the last user turn
        assert [m["content"] for m in multi[0]["chosen"][:-1]] == ["Hi", "Hello", "Count to 3"]


def test_killed_run_resumes_to_identical_output(one_rank, prompts_file, tiny_model, tmp_path):
    ref, _ = one_rank
    out = str(tmp_path / "killed")
    part = os.path.join(out, "parts", "rank0.jsonl")
    cmd = [sys.executable, "feedback.py", *args(prompts_file, tiny_model, out)]
    n_done = kill_after_lines(cmd, part, 1, env={**ENV, "FB_TEST_JUDGE_SLEEP": "0.1"})
    assert 1 <= n_done < 12 and not os.path.exists(os.path.join(out, "raw.jsonl"))
    with open(part, "ab") as f:
        f.write(b'{"index": 11, "instruction": "Sort th')  # and a torn last line, as a kill mid-write leaves

    p = run(cmd, env=ENV)
    assert "torn last line" in p.stdout and f"{n_done} already done" in p.stdout
    for name in ("raw.jsonl", "pairs.jsonl"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(ref, name), "rb").read(), name
    assert sorted(r["index"] for r in read_jsonl(part)) == list(range(12))  # each prompt once, no torn line


def test_resume_refuses_other_settings(tmp_path):
    cfg = feedback.Config(out_dir=str(tmp_path), models="m", judge="a:b")
    write_json(str(tmp_path / "config.json"), dataclasses.asdict(cfg))
    speed_only = dataclasses.replace(cfg, concurrency=2, request_timeout=5.0)
    generation.check_resumable(speed_only, feedback.RESUME_FREE)
    with pytest.raises(ValueError, match=r"temperature: 1.0 -> 0.5"):
        generation.check_resumable(dataclasses.replace(cfg, temperature=0.5), feedback.RESUME_FREE)
    # A field the saved config lacks (added to the code since) counts as its default.
    saved = json.load(open(tmp_path / "config.json"))
    del saved["judge_mode"]
    write_json(str(tmp_path / "config.json"), {**saved, "local_device": "cuda"})
    with pytest.raises(ValueError, match=r"judge_mode: 'digits' -> 'parse'"):
        generation.check_resumable(dataclasses.replace(cfg, judge_mode="parse"), feedback.RESUME_FREE)
    # What device=auto resolved to is compared too: bf16 on CUDA and fp32 on CPU sample differently.
    generation.check_resumable(cfg, feedback.RESUME_FREE, {"local_device": "cuda"})
    with pytest.raises(ValueError, match=r"local_device: 'cuda' -> 'cpu'"):
        generation.check_resumable(cfg, feedback.RESUME_FREE, {"local_device": "cpu"})


# ---------------------------------------------------------------------------------------------
# Prompts


def test_malformed_rows_are_reported_with_line_numbers_and_skipped(tmp_path):
    lines = [
        '{"instruction": "ok 1"}',
        'not json',
        '[1, 2]',
        '{"text": "no known field"}',
        '{"instruction": 7}',
        '',                                                           # blank: not a row
        '{"prompt": "   "}',
        '{"messages": [{"role": "robot", "content": "x"}]}',
        '{"messages": [{"role": "assistant", "content": "x"}]}',
        '{"prompt": "ok 2", "prompt_id": 5}',
        '{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "ok 3"}]}',
        '{"prompt": "ok 4", "prompt_id": "p4"}',
        '{"prompt": "bad \\ud800"}',
        '{"prompt": "ok", "source": "\\udfff"}',
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prompts, malformed = feedback.read_prompts(str(path))
    assert [p["prompt"] for p in prompts] == ["ok 1", "ok 3", "ok 4"] and [p["index"] for p in prompts] == [0, 1, 2]
    assert prompts[1]["context"][0] == {"role": "system", "content": "S"}
    assert prompts[2]["prompt_id"] == "p4"
    assert prompts[0]["prompt_id"] == hashlib.sha256(b"ok 1").hexdigest()  # none given: sha256 of the prompt
    where = [m.split(": ")[0] for m in malformed]
    assert where == [f"{path}:{n}" for n in (2, 3, 4, 5, 7, 8, 9, 10, 13, 14)]
    assert malformed[8].endswith("'prompt': lone surrogate at 4; skipped")
    assert malformed[9].endswith("'source': lone surrogate at 0; skipped")
    assert "'instruction': expected a string" in malformed[3] and "messages[0]['role']" in malformed[5]
    assert "'prompt_id'" in malformed[7] and all(m.endswith("skipped") for m in malformed)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        feedback.read_prompts(str(path), strict=True)


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"instruction": "first"}\n{"instruction": "second"}\n')
    prompts, malformed = feedback.read_prompts(str(path))
    assert [p["prompt"] for p in prompts] == ["first", "second"] and malformed == []


def test_parquet_rows_read_like_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    rows = [{"instruction": "a", "source": "s"}, {"instruction": "b", "source": "s"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert feedback.read_prompts(str(tmp_path / "p.parquet"))[0] == feedback.read_prompts(str(tmp_path / "p.jsonl"))[0]


# ---------------------------------------------------------------------------------------------
# Ratings


def test_expected_rating_from_constructed_digit_probabilities():
    # p over the digits (renormalized) = 0.1, 0.2, 0.3, 0.2, 0.2 -> 0.1 + 0.4 + 0.9 + 0.8 + 1.0 = 3.2; the other
    # tokens hold the rest of the mass and must not matter.
    digit_ids = [3, 5, 6, 8, 9]
    logits = torch.full((2, 11), 0.0)
    logits[0, digit_ids] = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2]).log() + 4.0
    logits[0, [0, 1, 2]] = torch.tensor([5.0, -3.0, 2.0])
    logits[1, digit_ids[4]] = 50.0  # all mass on "5"
    rating, mass = feedback.expected_rating(logits, digit_ids)
    assert rating.tolist() == pytest.approx([3.2, 5.0], abs=1e-6)
    z = sum(math.exp(x) for x in logits[0].tolist())
    assert mass[0].item() == pytest.approx(math.exp(4.0) / z, rel=1e-5)


def test_local_judge_digit_scores_equal_hand_computation(tiny_model):
    judge = feedback.LocalModel(tiny_model, torch.device("cpu"), torch.float32)
    cfg = feedback.Config(judge_batch_size=3)  # uneven chunks of different lengths: padding is exercised
    batch = [{"prompt_id": "a", "prompt": "Say hi", "context": [{"role": "user", "content": "Say hi"}]},
             {"prompt_id": "b", "prompt": "Add 2 and 3.", "context": [{"role": "user", "content": "Add 2 and 3."}]}]
    answers = [["hello there", "h"], ["5", "The answer is five, I think."]]
    completions = [[{"response": a, "annotations": {}} for a in row] for row in answers]
    completions[1].append({"response": None, "annotations": {}})  # a failed answer is not rated
    feedback.rate_local(judge, batch, completions, 0, cfg)
    assert completions[1][2]["annotations"] == {}
    tok, model = judge.tok, judge.model
    for p, row in enumerate(answers):
        for c, answer in enumerate(row):
            for aspect in feedback.ASPECTS:
                # By hand: one unpadded sequence, full logits, the five digit continuations compared directly.
                chat = [{"role": "user", "content": feedback.rating_prompt(batch[p]["context"], answer, aspect)}]
                text = render_chat(chat, add_generation_prompt=True) + "Rating: "
                full = [tok.encode(text + k, bos=True) for k in "12345"]
                ctx = full[0][:-1]
                assert all(f[:-1] == ctx for f in full)
                with torch.no_grad():
                    logits = model(torch.tensor([ctx]))[0, -1].double()
                e = [math.exp(logits[f[-1]].item()) for f in full]
                want = sum((k + 1) * e[k] for k in range(5)) / sum(e)
                got = completions[p][c]["annotations"][aspect]
                assert got["Rating"] == pytest.approx(want, abs=2e-6), (p, c, aspect)
                assert got["digit_mass"] == pytest.approx(sum(e) / logits.exp().sum().item(), rel=1e-4)
    ratings = {completions[p][c]["annotations"]["helpfulness"]["Rating"] for p in range(2) for c in range(2)}
    assert len(ratings) > 1  # the answer reaches the last position


# ---------------------------------------------------------------------------------------------
# Binarization


def row_with(scores, pid="p"):
    comps = [{"response": None if s == "failed" else f"answer {i}", "mean_score": None if s == "failed" else s}
             for i, s in enumerate(scores)]
    return {"instruction": "Q", "prompt_id": pid, "completions": comps}


CTX = [{"role": "user", "content": "Q"}]


def test_binarization_chosen_is_max_mean_rejected_seeded_among_others():
    row = row_with([2.0, 5.0, 3.0, 1.0])
    rejected = {}
    for seed in range(20):
        pair, why = feedback.binarize(row, CTX, seed)
        assert why == "pair" and pair["chosen"] == CTX + [{"role": "assistant", "content": "answer 1"}]
        assert pair["messages"] == pair["chosen"] and pair["score_chosen"] == 5.0 and pair["prompt"] == "Q"
        assert feedback.binarize(row, CTX, seed)[0] == pair  # the same seed draws the same
        rejected[seed] = pair["rejected"][-1]["content"]
        assert pair["score_rejected"] == {"answer 0": 2.0, "answer 2": 3.0, "answer 3": 1.0}[rejected[seed]]
    assert set(rejected.values()) == {"answer 0", "answer 2", "answer 3"}  # another seed, another draw
    # The draw is per prompt_id, not a stream: another prompt before it changes nothing.
    assert feedback.binarize(row_with([2.0, 5.0, 3.0, 1.0], "p"), CTX, 7)[0]["rejected"][-1]["content"] == rejected[7]


def test_binarization_drops_ties_and_prompts_with_fewer_than_two_rated_answers():
    assert feedback.binarize(row_with([4.0, 4.0]), CTX, 0) == (None, "tie")
    assert feedback.binarize(row_with([4.0, None, "failed"]), CTX, 0) == (None, "too_few_rated")
    assert feedback.binarize(row_with([]), CTX, 0) == (None, "too_few_rated")
    # Two answers share the top score: the first is chosen; drawing the other as rejected is a tie (dropped).
    outcomes = set()
    for seed in range(20):
        pair, why = feedback.binarize(row_with([1.0, 4.0, 4.0]), CTX, seed)
        outcomes.add(why)
        if pair:
            assert pair["chosen"][-1]["content"] == "answer 1" and pair["score_rejected"] == 1.0
    assert outcomes == {"pair", "tie"}


# ---------------------------------------------------------------------------------------------
# Endpoints: a local OpenAI-compatible server that fails in the ways real ones do


class FakeServer(ChatServer):
    """Answers by prompt text: "flaky" gets one HTTP 500 first, "slow" one reply slower than the client's
    timeout, "garbage" always a non-JSON body. The judge rates each shown text by a function of its content
    (so the test can check that shuffled ratings map back), and answers "norating" prompts without ratings."""

    def __init__(self):
        self.auth, self.judge_orders, self.failed_once, self.count = [], [], set(), 0
        super().__init__()

    def respond(self, body, headers):
        with self.lock:
            self.auth.append(headers.get("Authorization"))
        content = body["messages"][-1]["content"]
        if body["model"] == "fake-judge":
            shown = re.findall(r"Text \d+:\n(.*?)\n\n", content, re.S)
            with self.lock:
                self.judge_orders.append(shown)
            if "norating" in content:
                return 200, "I would rather not rate these."
            return 200, "\n".join(f"Text {i + 1}: Rating: {rating_of(t)}" for i, t in enumerate(shown))
        for word in ("flaky", "slow"):
            if word in content:
                with self.lock:
                    first = word not in self.failed_once
                    self.failed_once.add(word)
                if first and word == "flaky":
                    return 500, b"overloaded"
                if first:
                    time.sleep(2.5)
        if "garbage" in content:
            return 200, b"<html>not json</html>"
        n = sum(m["role"] == "system" for m in body["messages"])
        with self.lock:
            self.count += 1  # every answer different, so the judge's shuffle shows
            count = self.count
        return 200, f"reply to {content} (system turns: {n}, t={body['temperature']}) #{count}"


def rating_of(text):
    return 1 + sum(map(ord, text)) % 5


def test_endpoint_retries_records_failures_and_keeps_the_key_secret(tmp_path):
    server = FakeServer()
    key = "sk-test-7f3a9c1e5b"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": t}) + "\n"
                               for t in ("alpha", "flaky one", "slow one", "garbage", "norating here", "omega")))
    out = tmp_path / "out"
    p = run([sys.executable, "feedback.py", f"--prompts={prompts}", f"--out_dir={out}",
             f"--models={server.url}|model=fake-gpt|key_env=FB_TEST_KEY", "--answers_per_member=2",
             f"--judge={server.url}|model=fake-judge|key_env=FB_TEST_KEY", "--request_timeout=1.0",
             "--max_attempts=3", "--backoff_s=0.01", "--batch_size=4", "--concurrency=4", "--principles=true"],
            env={**ENV, "FB_TEST_KEY": key}, timeout=120)
    assert server.auth and set(server.auth) == {f"Bearer {key}"}
    for path, _, files in os.walk(out):
        for name in files:
            assert key not in open(os.path.join(path, name), errors="replace").read(), name
    assert key not in p.stdout + p.stderr

    raw = {r["instruction"]: r["completions"] for r in read_jsonl(out / "raw.jsonl")}
    for text in ("alpha", "flaky one", "slow one", "norating here", "omega"):
        for c in raw[text]:  # retried through the 500 and the timeout
            assert c["response"].startswith(f"reply to {text} (system turns: 1, t=1.0)") and c["error"] is None
            assert c["model"] == "fake-gpt" and c["principle"] in feedback.PRINCIPLES
    for c in raw["garbage"]:  # recorded, and the run went on
        assert c["response"] is None and "not a chat completion" in c["error"] and "after 3 attempts" in c["error"]
        assert c["annotations"] == {} and c["mean_score"] is None
    for c in raw["norating here"]:  # unparseable ratings: None, with the judge's text
        assert set(c["annotations"]) == set(feedback.ASPECTS) and c["mean_score"] is None
        assert all(a == {"Rating": None, "raw": "I would rather not rate these."} for a in c["annotations"].values())
    for text in ("alpha", "flaky one", "slow one", "omega"):
        for c in raw[text]:  # ratings found their answers through the shuffle
            assert {a["Rating"] for a in c["annotations"].values()} == {rating_of(c["response"])}
            assert c["mean_score"] == rating_of(c["response"])
    # All answers of a prompt were shown together, in a shuffled order at least sometimes.
    shown = [o for o in server.judge_orders if len(o) == 2]
    order_in_raw = {tuple(c["response"] for c in comps) for comps in raw.values()}
    assert len(shown) == 5 * 4 and any(tuple(o) not in order_in_raw for o in shown)
    summary = json.load(open(out / "summary.json"))
    assert summary["failed_answers"] == 2 and summary["unrated_answers"] == 2 and summary["too_few_rated"] >= 2


def test_parse_spec_forms(tiny_model):
    assert generation.parse_spec(" http://h:8/v1|model=m|key_env=K|name=lbl ", "models") == {
        "kind": "endpoint", "target": "http://h:8/v1", "model": "m", "key_env": "K", "name": "lbl", "field": "models"}
    assert generation.parse_spec("https://h/v1|model=m", "judge")["name"] == "m"
    assert generation.parse_spec(f"{tiny_model}|name=x", "user") == {"kind": "local", "target": tiny_model,
                                                                      "name": "x", "field": "user"}
    assert generation.parse_spec("test_feedback:judge_len", "judge")["kind"] == "function"
    for spec, message in [("http://h/v1", "needs |model=NAME"), ("http://h/v1|model=m|temp=1", "option 'temp=1'"),
                          ("/no/such/dir", "not a Hugging Face directory")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            generation.parse_spec(spec, "models")


# ---------------------------------------------------------------------------------------------
# Function members and the per-prompt draw from the pool (UltraFeedback: 4 of 17 members per prompt)


def member_fixed(messages):
    return "fixed: " + messages[-1]["content"][:12]


def member_seeded(messages, seed):
    # Samples: its answer is a function of the seed feedback.py hands it.
    return f"seeded {seed % 100_003}"


def member_broken(messages):
    if "Say hi" in messages[-1]["content"]:
        raise RuntimeError("cannot say hi")
    return "fine"


def member_not_text(messages):
    return 42


POOL = ";".join(["test_feedback:member_fixed|name=fixed", "test_feedback:member_seeded|name=seeded",
                 "test_feedback:member_broken|name=broken", "test_feedback:member_seeded|name=seeded-2"])


def test_function_members_answer_under_their_labels_and_failures_are_recorded():
    spec = generation.parse_spec("test_feedback:member_seeded|name=lbl", "models")
    client = generation.load_client(spec, None, None, {}, answers=True)
    gen = torch.Generator().manual_seed(5)
    chats = [[{"role": "user", "content": "Q"}]] * 3
    out = client.generate(chats, 8, 1.0, 1.0, gen)
    draws = torch.randint(2**62, (3,), generator=torch.Generator().manual_seed(5))  # one seed per chat, in order
    assert [o["text"] for o in out] == [f"seeded {int(s) % 100_003}" for s in draws]
    assert all(o["error"] is None and o["finish_reason"] == "stop" for o in out)
    assert generation.load_client(spec, None, None, {}) is member_seeded  # as a judge: the function itself
    for name, fn, message in (("broken", member_broken, "RuntimeError: cannot say hi"),
                              ("not-text", member_not_text, "returned int, not a string")):
        r = generation.FunctionModel(fn, name).generate([[{"role": "user", "content": "Say hi"}]], 8, 1.0, 1.0)[0]
        assert r["text"] is None and r["error"] == f"{name}: {message}"


def pool_args(prompts, model, out, **kw):
    return args(prompts, f"{POOL};{model}|name=local", out, models_per_prompt=4, answers_per_member=1, **kw)


@pytest.fixture(scope="module")
def pool_run(prompts_file, tiny_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pool"))
    run([sys.executable, "feedback.py", *pool_args(prompts_file, tiny_model, out)], env=ENV)
    return out


def test_four_distinct_members_per_prompt_every_member_used_and_counted(pool_run):
    raw = read_jsonl(os.path.join(pool_run, "raw.jsonl"))
    names = {"fixed", "seeded", "broken", "seeded-2", "local"}
    for row in raw:
        drawn = [c["model"] for c in row["completions"]]
        assert len(drawn) == 4 and len(set(drawn)) == 4 and set(drawn) <= names, drawn  # no member twice
    assert {c["model"] for row in raw for c in row["completions"]} == names  # every member of the pool answers
    by_member = {}
    for row in raw:
        for c in row["completions"]:
            by_member.setdefault(c["model"], []).append(c)
            if c["model"] == "fixed":
                assert c["response"] == "fixed: " + row["instruction"][:12]
            if c["model"] == "broken" and row["instruction"] == "Say hi":
                assert c["response"] is None and "cannot say hi" in c["error"]
    # Two members running the same function draw their own seeds: their answers differ.
    both = [row for row in raw if {"seeded", "seeded-2"} <= {c["model"] for c in row["completions"]}]
    assert both and all(len({c["response"] for c in row["completions"] if c["model"].startswith("seeded")}) == 2
                        for row in both)
    # The summary counts each member's answers, and how often Zephyr's binarization chose and rejected it.
    summary = json.load(open(os.path.join(pool_run, "summary.json")))
    pairs = read_jsonl(os.path.join(pool_run, "pairs.jsonl"))
    stats = summary["members"]
    assert {m: s["answers"] for m, s in stats.items()} == {m: len(cs) for m, cs in by_member.items()}
    assert sum(s["chosen"] for s in stats.values()) == sum(s["rejected"] for s in stats.values()) == len(pairs)
    for m, cs in by_member.items():
        scores = [c["mean_score"] for c in cs if c["mean_score"] is not None]
        assert stats[m]["mean_score"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
        assert stats[m]["failed"] == sum(c["response"] is None for c in cs)
    for row in raw:  # each pair's chosen and rejected answers were written by the members counted for them
        pair = next((p for p in pairs if p["prompt_id"] == row["prompt_id"]), None)
        chosen, rejected, why = feedback.pick(row, 3)
        assert (pair is not None) == (why == "pair")
        if pair:
            assert (chosen["response"], rejected["response"]) == (pair["chosen"][-1]["content"],
                                                                  pair["rejected"][-1]["content"])


def test_the_draw_is_a_function_of_the_prompt_the_same_on_two_ranks_and_after_a_kill(pool_run, prompts_file, tiny_model,
                                                                                       tmp_path):
    ref = read_jsonl(os.path.join(pool_run, "raw.jsonl"))
    two = str(tmp_path / "two")
    torchrun("feedback.py", pool_args(prompts_file, tiny_model, two), nproc=2, env=ENV)
    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "feedback.py", *pool_args(prompts_file, tiny_model, killed)]
    assert kill_after_lines(cmd, os.path.join(killed, "parts", "rank0.jsonl"), 1,
                            env={**ENV, "FB_TEST_JUDGE_SLEEP": "0.1"}) < 12
    run(cmd, env=ENV)
    for out in (two, killed):
        for name in ("raw.jsonl", "pairs.jsonl"):
            assert open(os.path.join(out, name), "rb").read() == open(os.path.join(pool_run, name), "rb").read()
    # The draw is plan_answers' of (seed, prompt_id) alone, and the members are in the pool's order.
    cfg = feedback.Config(models_per_prompt=4, answers_per_member=1, principles=False, seed=3)
    prompts, _ = feedback.read_prompts(prompts_file)
    names = ["fixed", "seeded", "broken", "seeded-2", "local"]
    for p, row in zip(reversed(prompts), reversed(ref)):
        assert [names[m] for m, _ in feedback.plan_answers(p, 5, cfg)] == [c["model"] for c in row["completions"]]
