# eval.py: MT-Bench and AlpacaEval with judges that answer by rules the tests know (a local OpenAI-compatible
# server: a rating from the answer's length, a preference for the longer output with logprobs), so that every
# summary figure is checked against a computation written out here; then ranks, SIGKILL and the local judge.
import json
import math
import os
import re
import statistics
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, ChatServer, kill_after_lines, read_jsonl, run, torchrun, write_jsonl
import eval as ev

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}

CATEGORIES = ["writing", "roleplay", "math", "stem", "coding", "reasoning", "humanities", "extraction", "poetry"]
QUESTIONS = [{"question_id": 81 + i, "category": CATEGORIES[i % len(CATEGORIES)],
              "turns": [f"Question {i}: tell me about {'x' * (i % 5)}?", f"Follow-up {i}, shorter{'.' * (i % 3)}"]}
             for i in range(14)]
QUESTIONS[13]["turns"] = QUESTIONS[13]["turns"][:1]  # one-turn questions are judged on turn 1 only
REFS = {q["question_id"]: [f"ref one {q['question_id']}", f"ref two {q['question_id']}"]
        for q in QUESTIONS if q["category"] in ev.NEED_REF_CATS}


def rule_rating(answer):
    """What the test judge replies for an answer, and the score FastChat's parse makes of it (independently)."""
    n = len(answer)
    if n % 4 == 0:
        return "I cannot decide.", -1                                  # parse failure
    if n % 4 == 1:
        return f"Hmm. Rating: [{n % 9 + 1}]", n % 9 + 1                 # only the backup pattern
    return f"Rating: [[{n % 9 + 1}]] (not [2])", n % 9 + 1             # [[N]] wins over [N]


def p_model_wins(len_model, len_base):
    return 1 / (1 + math.exp(-(len_model - len_base) / 8))


class RuleServer(ChatServer):
    """writer: answers by rule, echoing its temperature; judge: MT-Bench ratings by rule_rating; pairjudge: one token
    with top-5 logprobs preferring the longer output; textjudge: the same verdict as plain text, no logprobs."""

    def __init__(self):
        self.requests = []
        super().__init__()

    def respond(self, body, headers):
        with self.lock:
            self.requests.append(body)
        msgs, content = body["messages"], body["messages"][-1]["content"]
        if body["model"] == "writer":
            return 200, f"reply to [{content}] with {len(msgs)} messages at t={body['temperature']}"
        if body["model"] == "judge":
            if "### End of answer" in content:
                answer = re.search(r"### Answer\n(.*)\n\n### End of answer", content, re.S).group(1)
            else:
                answer = content.rsplit("### Assistant A\n", 1)[1].rsplit("\n\n### End of conversation", 1)[0]
            return 200, rule_rating(answer)[0]
        m = re.search(r"## Answer of model m\n(.*)\n\n## Answer of model M\n(.*)\n\n## Your verdict", content, re.S)
        if "no verdict" in content:
            tops = [{"token": "x", "logprob": -0.1}, {"token": "y", "logprob": -3.0}]
            p_first = None
        else:
            p_first = 1 / (1 + math.exp(-(len(m.group(1)) - len(m.group(2))) / 8))
            tops = [{"token": "m", "logprob": math.log(p_first)}, {"token": "M", "logprob": math.log(1 - p_first)},
                    {"token": "Model", "logprob": -9.0}]
        text = "x" if p_first is None else ("m" if p_first >= 0.5 else "M")
        if body["model"] == "textjudge":
            return 200, text
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 5
        reply = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "length",
                              "logprobs": {"content": [{"token": text, "logprob": -0.1, "top_logprobs": tops}]}}]}
        return 200, json.dumps(reply).encode()


@pytest.fixture(scope="module")
def server():
    return RuleServer()


@pytest.fixture(scope="module")
def mt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mt")
    q = write_jsonl(d / "question.jsonl", QUESTIONS)
    ref = write_jsonl(d / "gpt-4.jsonl", [{"question_id": k, "model_id": "gpt-4", "choices": [{"index": 0, "turns": v}]}
                                          for k, v in REFS.items()])
    return q, ref


def test_mt_bench_follows_fastchat_and_every_figure_matches_a_hand_computation(server, mt_files, tmp_path):
    questions, refs = mt_files
    out = tmp_path / "mt"
    run([sys.executable, "eval.py", "--bench=mt_bench", f"--model={server.url}|model=writer", "--model_id=w",
         f"--questions={questions}", f"--reference_answers={refs}", f"--judge={server.url}|model=judge",
         f"--out_dir={out}", "--batch_size=3"], env=ENV)
    answers = read_jsonl(out / "answers.jsonl")
    judgments = read_jsonl(out / "judgments.jsonl")
    summary = json.load(open(out / "summary.json"))
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in QUESTIONS]
    writes = [r for r in server.requests if r["model"] == "writer"]
    for q, a in zip(QUESTIONS, answers):
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and a["model_id"] == "w"
        turns = a["choices"][0]["turns"]
        assert a["choices"][0]["index"] == 0 and len(turns) == len(q["turns"])
        t = {"writing": 0.7, "roleplay": 0.7, "math": 0.0, "stem": 0.1, "coding": 0.0, "reasoning": 0.0,
             "humanities": 0.1, "extraction": 0.0}.get(q["category"], 0.7)
        for k, text in enumerate(turns):
            assert text == f"reply to [{q['turns'][k]}] with {2 * k + 1} messages at t={t}"
        if len(turns) == 2:  # turn 2 was asked with turn 1 and its answer in context
            second = [r for r in writes if r["messages"][-1]["content"] == q["turns"][1]]
            assert [m["content"] for m in second[0]["messages"]] == [q["turns"][0], turns[0], q["turns"][1]]

    # Judgments: FastChat's schema, the right prompt per category and turn, the score parsed as FastChat does.
    assert len(judgments) == 27
    by_q = {q["question_id"]: q for q in QUESTIONS}
    expected = []
    for r in judgments:
        assert set(r) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
        q, a = by_q[r["question_id"]], answers[QUESTIONS.index(by_q[r["question_id"]])]["choices"][0]["turns"]
        math_cat = q["category"] in ("math", "coding", "reasoning")
        assert r["judge"] == ["judge", ("single-math-v1" if math_cat else "single-v1")
                              + ("-multi-turn" if r["turn"] == 2 else "")]
        assert r["model"] == "w" and a[r["turn"] - 1] in r["user_prompt"]
        assert (f"ref {'one' if r['turn'] == 1 else 'two'} {q['question_id']}" in r["user_prompt"]) == math_cat
        reply, score = rule_rating(a[r["turn"] - 1])
        assert r["judgment"] == reply and r["score"] == score
        expected.append((q["category"], r["turn"], score))
    ok = [e for e in expected if e[2] != -1]
    assert 0 < len(ok) < len(expected)  # both parse failures and scores occurred
    replies = {rule_rating(x)[0][:4] for a in answers for x in a["choices"][0]["turns"]}
    assert replies >= {"I ca", "Hmm.", "Rati"}  # every branch of the parse was taken
    assert summary["n_failed"] == len(expected) - len(ok) and summary["n_judged"] == len(ok)
    assert summary["score"] == pytest.approx(statistics.mean(e[2] for e in ok), abs=1e-6)
    for turn in (1, 2):
        assert summary[f"turn_{turn}"] == pytest.approx(statistics.mean(e[2] for e in ok if e[1] == turn), abs=1e-6)
    cats = {c: statistics.mean(e[2] for e in ok if e[0] == c) for c in {e[0] for e in ok}}
    assert summary["categories"] == pytest.approx(cats, abs=1e-6) and summary["bench"] == "mt_bench"

    # --answers: FastChat's answer file judged as is; the same judgments (tstamps aside).
    out2 = tmp_path / "given"
    run([sys.executable, "eval.py", "--bench=mt_bench", f"--answers={out / 'answers.jsonl'}",
         f"--questions={questions}", f"--reference_answers={refs}", f"--judge={server.url}|model=judge",
         f"--out_dir={out2}"], env=ENV)
    assert json.load(open(out2 / "summary.json")) == summary
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tstamp"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(out2 / "judgments.jsonl")) == strip(judgments)


def test_math_questions_without_reference_answers_are_refused(mt_files, tmp_path):
    questions, _ = mt_files
    with pytest.raises(ValueError, match=r"questions \[83, 85, 86, 92, 94\] \(5 in all\) need reference answers"):
        ev.main(["--bench=mt_bench", "--answers=x.jsonl", f"--questions={questions}", "--judge=m:f",
                 f"--out_dir={tmp_path}"])


def outputs(n, gen, lengths):
    return [{"instruction": f"Instruction {i}" + (" no verdict" if i == 5 else ""), "output": "o" * lengths[i],
             "generator": gen, "dataset": "toy"} for i in range(n)]


def test_alpaca_eval_preference_from_logprobs_through_the_order_flip(server, tmp_path):
    n = 16
    base = outputs(n, "base", [5 + (7 * i) % 23 for i in range(n)])
    model = outputs(n, "mine", [3 + (11 * i) % 29 for i in range(n)])
    files = {name: tmp_path / f"{name}.json" for name in ("instructions", "baseline", "answers")}
    json.dump([{"instruction": r["instruction"], "dataset": "toy"} for r in base], open(files["instructions"], "w"))
    json.dump(base, open(files["baseline"], "w"))
    json.dump(model, open(files["answers"], "w"))
    common_args = [f"--{k}={v}" for k, v in files.items()] + ["--bench=alpaca_eval", "--batch_size=5"]
    out = tmp_path / "lp"
    run([sys.executable, "eval.py", *common_args, f"--judge={server.url}|model=pairjudge", f"--out_dir={out}"], env=ENV)
    ann = json.load(open(out / "annotations.json"))
    summary = json.load(open(out / "summary.json"))
    assert json.load(open(out / "model_outputs.json")) == model  # alpaca_eval's schema, input order
    flips = [ev.is_flipped(r["instruction"]) for r in base]
    assert 0 < sum(flips) < n  # both orders occur
    shown = {r["messages"][-1]["content"].split("## Instruction\n")[1].split("\n")[0]: r["messages"][-1]["content"]
             for r in server.requests if r["model"] == "pairjudge"}
    prefs = []
    for i, a in enumerate(ann):
        assert a["output_1"] == base[i]["output"] and a["output_2"] == model[i]["output"]
        assert a["generator_1"] == "base" and a["generator_2"] == "mine" and a["flipped"] == flips[i]
        first = shown[base[i]["instruction"]].split("## Answer of model m\n")[1].split("\n")[0]
        assert first == (model[i]["output"] if flips[i] else base[i]["output"])  # the model shown first iff flipped
        if i == 5:
            assert a["preference"] is None  # neither m nor M among the logprobs, nor in the text: counted
            continue
        want = 1 + p_model_wins(len(model[i]["output"]), len(base[i]["output"]))
        assert a["preference"] == pytest.approx(want, abs=1e-9)
        prefs.append(want)
    assert summary["n"] == n - 1 and summary["n_failed"] == 1
    wins = [p - 1 for p in prefs]
    assert summary["win_rate"] == pytest.approx(100 * statistics.mean(wins), abs=1e-5)
    assert summary["standard_error"] == pytest.approx(100 * statistics.stdev(wins) / math.sqrt(len(wins)), abs=1e-5)
    assert summary["avg_length"] == round(statistics.mean(len(r["output"]) for r in model))
    assert 0 < summary["length_controlled_win_rate"] < 100

    # A judge without logprobs: the first m or M of its text, 1 or 2, through the same flip.
    out2 = tmp_path / "text"
    run([sys.executable, "eval.py", *common_args, f"--judge={server.url}|model=textjudge", f"--out_dir={out2}"],
        env=ENV)
    ann2 = json.load(open(out2 / "annotations.json"))
    for i, a in enumerate(ann2):
        if i != 5:
            assert a["preference"] == (2.0 if p_model_wins(len(model[i]["output"]), len(base[i]["output"])) >= 0.5
                                       else 1.0) and a["top_logprobs"] is None


def test_win_rate_and_length_controlled_win_rate_equal_hand_computations():
    # Two length groups (baseline 10 characters longer / shorter): the GLM tanh(z) a + c is saturated, so it
    # fits each group's mean preference exactly, and LC = sigmoid(c) with c the mean of the two groups' logits.
    y_long = [1.0, 0.5, 1.0, 0.0]     # baseline longer: model wins
    y_short = [0.0, 0.25, 0.5, 0.25]  # baseline shorter
    prefs = [1 + y for y in y_long + y_short]
    len_base, len_model = [30] * 4 + [20] * 4, [20] * 4 + [30] * 4
    out = ev.win_rates(prefs, len_base, len_model)
    y = [p - 1 for p in prefs]
    assert out["win_rate"] == pytest.approx(100 * sum(y) / 8)
    assert out["standard_error"] == pytest.approx(100 * statistics.stdev(y) / math.sqrt(8))
    assert (out["n_wins"], out["n_wins_base"], out["n_draws"]) == (2, 4, 2)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    c = (logit(statistics.mean(y_long)) + logit(statistics.mean(y_short))) / 2
    assert out["length_controlled_win_rate"] == pytest.approx(100 / (1 + math.exp(-c)), abs=1e-4)
    # The model won more where the baseline was longer: a positive weight on tanh((baseline - model) / std).
    a = math.tanh(10 / statistics.stdev([10] * 4 + [-10] * 4))
    w = (logit(statistics.mean(y_long)) - logit(statistics.mean(y_short))) / (2 * a)
    assert out["glm_weights"]["tanh(std_delta_len)"] == pytest.approx(w, abs=1e-4)

    # With instruction difficulty: three cells (length sign, difficulty) make the 3-term GLM saturated again; its
    # weights solve the 3 x 3 system of the cells' logits; LC averages sigmoid(b d_i + c) over the rows.
    cells = [(+10, 0.0, [1.0, 0.5, 0.5]), (-10, 0.0, [0.0, 0.5, 0.25]), (+10, 1.0, [1.0, 1.0, 0.5])]
    deltas = [d for d, _, ys in cells for _ in ys]
    diff = [k for _, k, ys in cells for _ in ys]
    ys = [v for _, _, vs in cells for v in vs]
    a = math.tanh(10 / statistics.stdev(deltas))
    A = np.array([[a * np.sign(d), k, 1.0] for d, k, _ in cells])
    wa, wb, wc = np.linalg.solve(A, [logit(statistics.mean(v)) for _, _, v in cells])
    out = ev.win_rates([1 + v for v in ys], [20 + d for d in deltas], [20] * len(deltas), diff)
    lc = 100 * statistics.mean(1 / (1 + math.exp(-(wb * k + wc))) for k in diff)
    assert out["length_controlled_win_rate"] == pytest.approx(lc, abs=1e-4)
    assert list(out["glm_weights"].values()) == pytest.approx([wa, wb, wc], abs=1e-3)
    # alpaca_eval's other draw encoding, 0, counts as 1.5.
    assert ev.win_rates([0, 2.0], [1, 2], [1, 3])["win_rate"] == pytest.approx(75.0)


def test_score_parsing_is_fastchats():
    assert [ev.parse_score(t) for t in ("Rating: [[8]]", "[[7.5]]", "so [6] it is", "no score", "[[x]] then [3]",
                                        "[4] but [[9]]")] == [8, 7.5, 6, -1, 3, 9]


def test_alpaca_prompt_file_format_and_only_our_placeholders_are_filled(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('<|im_start|>system\nBe fair.\n<|im_end|>\n<|im_start|>user\n{"model": "m"} {instruction}\n'
                    '[{output_1}] [{output_2}] {other}\n<|im_end|>\n')
    msgs = ev.fill_prompt(ev.read_prompt_file(str(path)), "do {output_2}", "A", "B")
    assert msgs == [{"role": "system", "content": "Be fair."},
                    {"role": "user", "content": '{"model": "m"} do {output_2}\n[A] [B] {other}'}]
    assert ev.shown_preference({"text": "Model M is better", "top_logprobs": None}) == 2.0
    assert ev.shown_preference({"text": "x", "top_logprobs": {"m": math.log(0.2), "M": math.log(0.6)}}) == \
        pytest.approx(2 - 0.25)
    assert ev.shown_preference({"text": "x", "top_logprobs": {"M": -1.0}}) == 2.0


# ---------------------------------------------------------------------------------------------
# Local models: ranks, SIGKILL, the local judge's next-token verdict


def judge_slow(messages):
    """A function judge: a rating from the length of the prompt; sleeps when asked, so a run can be killed."""
    time.sleep(float(os.environ.get("EV_TEST_SLEEP", "0")))
    return f"[[{len(messages[-1]['content']) % 10 + 1}]]"


def pair_by_length(messages):
    m = re.search(r"## Answer of model m\n(.*)\n\n## Answer of model M\n(.*)\n\n## Your verdict",
                  messages[-1]["content"], re.S)
    time.sleep(float(os.environ.get("EV_TEST_SLEEP", "0")))
    return "m" if len(m.group(1)) >= len(m.group(2)) else "M"


def test_mt_bench_two_ranks_match_one_rank(tiny_model, mt_files, tmp_path):
    questions, refs = mt_files
    args = [f"--model={tiny_model}", f"--questions={questions}", f"--reference_answers={refs}",
            "--judge=test_eval:judge_slow", "--max_new_tokens=6", "--batch_size=3", "--bench=mt_bench"]
    run([sys.executable, "eval.py", *args, f"--out_dir={tmp_path / 'one'}"], env=ENV)
    torchrun("eval.py", [*args, f"--out_dir={tmp_path / 'two'}"], nproc=2, env=ENV)
    assert sorted(os.listdir(tmp_path / "two" / "parts")) == ["rank0.jsonl", "rank1.jsonl"]
    for name in ("answers.jsonl", "judgments.jsonl"):  # equal but for the wall-clock tstamps
        one, two = (read_jsonl(tmp_path / d / name) for d in ("one", "two"))
        assert [{k: v for k, v in r.items() if k != "tstamp"} for r in one] == \
            [{k: v for k, v in r.items() if k != "tstamp"} for r in two]
    assert open(tmp_path / "one" / "summary.json", "rb").read() == open(tmp_path / "two" / "summary.json", "rb").read()


@pytest.fixture(scope="module")
def alpaca_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ae")
    rows = [{"instruction": f"Say something about topic {i}{'!' * (i % 3)}", "dataset": "toy"} for i in range(12)]
    json.dump(rows, open(d / "ins.json", "w"))
    json.dump([{**r, "output": "b" * (2 + i % 9), "generator": "base"} for i, r in enumerate(rows)],
              open(d / "base.json", "w"))
    return str(d / "ins.json"), str(d / "base.json")


def test_alpaca_eval_killed_run_resumes_byte_identical_and_ranks_agree(tiny_model, alpaca_files, tmp_path):
    ins, base = alpaca_files
    args = ["--bench=alpaca_eval", f"--model={tiny_model}", f"--instructions={ins}", f"--baseline={base}",
            "--judge=test_eval:pair_by_length", "--max_new_tokens=8", "--batch_size=2"]
    ref = tmp_path / "ref"
    run([sys.executable, "eval.py", *args, f"--out_dir={ref}"], env=ENV)
    torchrun("eval.py", [*args, f"--out_dir={tmp_path / 'two'}"], nproc=2, env=ENV)
    names = ("model_outputs.json", "annotations.json", "summary.json")
    for name in names:
        assert open(ref / name, "rb").read() == open(tmp_path / "two" / name, "rb").read(), name

    out = tmp_path / "killed"
    part = out / "parts" / "rank0.jsonl"
    cmd = [sys.executable, "eval.py", *args, f"--out_dir={out}"]
    n_done = kill_after_lines(cmd, part, 1, env={**ENV, "EV_TEST_SLEEP": "0.2"})
    assert 1 <= n_done < 12 and not (out / "annotations.json").exists()
    with open(part, "ab") as f:
        f.write(b'{"index": 11, "instruction": "Say som')  # a torn last line, as a kill mid-write leaves
    p = run(cmd, env=ENV)
    assert "torn last line" in p.stdout and f"{n_done} already done" in p.stdout
    for name in names:
        assert open(ref / name, "rb").read() == open(out / name, "rb").read(), name
    summary = json.load(open(ref / "summary.json"))
    ann = json.load(open(ref / "annotations.json"))
    wins = [1.0 if len(a["output_2"]) > len(a["output_1"]) else 0.0 for a in ann]  # the judge's rule, by hand
    assert [a["preference"] - 1 for a in ann] == wins
    assert summary["win_rate"] == pytest.approx(100 * statistics.mean(wins), abs=1e-5)


def test_local_judge_preference_is_its_next_token_odds_of_m_against_M(tiny_model, alpaca_files, tmp_path):
    ins, base = alpaca_files
    out = tmp_path / "local"
    run([sys.executable, "eval.py", "--bench=alpaca_eval", f"--answers={base}", f"--instructions={ins}",
         f"--baseline={base}", f"--judge={tiny_model}", f"--out_dir={out}", "--batch_size=5", "--model_id=same"],
        env=ENV)
    ann = json.load(open(out / "annotations.json"))
    from generation import LocalModel
    judge = LocalModel(tiny_model, torch.device("cpu"), torch.float32)
    template = ev.read_prompt_file(os.path.join(ROOT, "data/eval/alpaca_eval_judge.txt"))
    for a in ann:
        first, second = (a["output_2"], a["output_1"]) if a["flipped"] else (a["output_1"], a["output_2"])
        chat = ev.fill_prompt(template, a["instruction"], first, second)
        ids = judge.tok.encode_chat(chat, add_generation_prompt=True)[0]
        with torch.no_grad():  # one unpadded sequence, full logits
            lp = judge.model(torch.tensor([ids]))[0, -1].double().log_softmax(-1)
        pm, pM = (lp[judge.tok.encode(ev.render_chat([{"role": "user", "content": "x"}], True) + k, bos=True)[-1]].exp()
                  .item() for k in "mM")
        want = 2 - pm / (pm + pM)
        assert a["preference"] == pytest.approx(3 - want if a["flipped"] else want, abs=1e-5)
    # The model's outputs are the baseline's: the preference is pure position bias, and the flip averages it out.
    assert len({a["flipped"] for a in ann}) == 2


def test_instruction_difficulty_by_index_or_by_text(tmp_path):
    items = [{"index": i, "instruction": f"ins {i}"} for i in range(3)]
    csv = tmp_path / "d.csv"
    csv.write_text("index,model,instruction_difficulty\n2,a,0.5\n0,a,-1.25\n2,b,0.5\n1,a,3\n")  # df_gamed.csv's shape
    assert ev.read_difficulty(str(csv), items) == [-1.25, 3.0, 0.5]
    js = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"ins {i}", "instruction_difficulty": i / 4}
                                            for i in (2, 1)])
    with pytest.raises(ValueError, match="no difficulty for instruction 0"):
        ev.read_difficulty(js, items)
    assert ev.read_difficulty(js, items[1:]) == [0.25, 0.5]


def test_rows_of_a_json_list_and_of_json_lines_named_json(tmp_path):
    import files
    rows = [{"instruction": "a"}, {"instruction": "b"}]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # Hugging Face's json export
    for name, where in (("list.json", "item 2"), ("lines.json", ":2")):
        got = list(files.read_rows(str(tmp_path / name)))
        assert [r for _, r, _ in got] == rows and got[1][0].endswith(where)
