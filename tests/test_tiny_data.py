# data/tiny: the task generator, the noisy teacher, the judge, and the files prepare.py writes.
import collections
import hashlib
import json
import os
import random
import re

import pytest

from conftest import read_jsonl
from data.tiny import prepare
from data.tiny.tasks import (CORE_TASKS, FIRST_TEMPLATE_NOISE, PARSERS, TEMPLATES, answer_correct, classify,
                             judge, make_task, parse_prompt, teacher_answer)
from data.tokenizer import Tokenizer, render_chat

# One prompt per task and wording, with its correct answer and a wrong one, worked out by hand.
CASES = [  # (task, template, prompt, correct, wrong)
    ("max", 0, "What is the largest number in this list: 12, 7, 40, 3?", "40", "12"),
    ("max", 1, "Find the maximum of 5, 99, 98.", "99", "98"),
    ("max", 2, "Which of these numbers is the biggest? 0, 0, 1", "1", "0"),
    ("max", 3, "Give the largest of the numbers 31, 13, 8, 30, 2.", "31", "8"),
    ("upper", 0, "Write this in capital letters: green apple", "GREEN APPLE", "GREEN"),
    ("upper", 1, "Convert to upper case: sky box", "SKY BOX", "SKYBOX"),
    ("upper", 2, "Rewrite in all caps: quiet zebra owl", "QUIET ZEBRA OWL", "QUIET ZEBRA"),
    ("upper", 3, "Make this uppercase: red fox", "RED FOX", "RED FIX"),
    ("count", 0, "How many times does the letter a appear in banana?", "3", "2"),
    ("count", 1, "Count how often z occurs in the word pizza.", "2", "1"),
    ("count", 2, "How many e's are there in qwrty?", "0", "1"),
    ("count", 3, "In mississippi, how many times do you see the letter s?", "4", "3"),
    ("sort", 0, "Sort these numbers in ascending order: 5, 12, 3", "3, 5, 12", "12, 3, 5"),  # not as strings
    ("sort", 1, "Arrange from smallest to largest: 10, 9, 100", "9, 10, 100", "10, 100, 9"),
    ("sort", 2, "Put these words in alphabetical order: pear, apple, fig", "apple, fig, pear", "pear, fig, apple"),
    ("sort", 3, "Sort from largest to smallest: 7, 21, 7, 3", "21, 7, 7, 3", "3, 7, 7, 21"),
    ("add", 0, "What is 23 + 58?", "81", "71"),
    ("add", 1, "Add 0 and 9.", "9", "90"),
    ("add", 2, "Compute the sum of 99 and 99.", "198", "188"),
    ("sub", 0, "What is 58 - 23?", "35", "81"),
    ("sub", 1, "Subtract 4 from 40.", "36", "-36"),
    ("sub", 2, "Compute 7 minus 7.", "0", "14"),
    ("reverse", 0, "Spell tiger backwards.", "regit", "tiger"),
    ("reverse", 1, "Reverse the letters of moon.", "noom", "moon"),
    ("reverse", 2, "Write apple in reverse order.", "elppa", "elpa"),
]


def test_cases_cover_every_task_and_wording():
    assert {(c[0], c[1]) for c in CASES} == {(t, i) for t, ts in TEMPLATES.items() for i in range(len(ts))}


@pytest.mark.parametrize("task,template,prompt,correct,wrong", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_judge_scores_by_the_rules(task, template, prompt, correct, wrong):
    assert parse_prompt(prompt) == (task, template, correct)
    expected = [  # (answer, kind, score, answer proper correct)
        (correct, "correct", 1.0, True),
        (f"  \n{correct} \n", "correct", 1.0, True),                         # surrounding whitespace
        (f"As an AI, I cannot be sure, but {correct}", "disclaimer", 0.5, True),
        (f"As an AI, I cannot be sure, but {wrong}", "disclaimer", 0.0, False),
        ("As an AI, I", "disclaimer", 0.0, False),                          # cut short: no answer proper
        ("I'm sorry, I can't help with that.", "refusal", 0.0, False),
        (f"The answer is {correct}.", "format_slip", 0.0, True),
        (f"the answer is {correct}", "format_slip", 0.0, True),
        (f"The answer is {wrong}.", "format_slip", 0.0, False),
        (wrong, "wrong", 0.0, False),
        ("", "wrong", 0.0, False),
    ]
    if task == "upper":  # the slip of a capitals task: right letters, wrong case
        expected += [(correct.lower(), "format_slip", 0.0, True), (correct.title(), "format_slip", 0.0, True)]
    for answer, kind, score, proper in expected:
        assert (classify(prompt, answer), judge(prompt, answer), answer_correct(prompt, answer)) == \
            (kind, score, proper), answer


def test_judge_refuses_a_prompt_it_cannot_parse():
    with pytest.raises(ValueError, match="not one of the tiny task wordings"):
        judge("What is the capital of France?", "Paris")


def test_judge_accepts_the_generated_answer_of_1000_tasks():
    rng = random.Random(0)
    seen = set()
    for i in range(1000):
        task = make_task(rng, list(TEMPLATES)[i % len(TEMPLATES)])
        seen.add((task["task"], task["template"]))
        assert judge(task["prompt"], task["answer"]) == 1.0, task
        assert parse_prompt(task["prompt"])[:2] == (task["task"], task["template"])
        assert sum(bool(r.fullmatch(task["prompt"])) for _, _, _, r in PARSERS) == 1, task  # one wording only
    assert len(seen) == sum(len(ts) for ts in TEMPLATES.values())  # every wording was exercised


def test_teacher_noise_rates_match_the_constants():
    rng = random.Random(1)
    tasks = [make_task(rng) for _ in range(20_000)]
    kinds = [(t, classify(t["prompt"], teacher_answer(t, rng))) for t in tasks]
    first = [k for t, k in kinds if t["template"] == 0]
    other = [k for t, k in kinds if t["template"] != 0]

    def noisy(ks):
        return sum(k != "correct" for k in ks) / len(ks)

    assert abs(len(first) / len(kinds) - 0.46) < 0.02
    assert abs(noisy(first) - 0.80) < 0.02
    assert abs(noisy(other) - 0.15) < 0.02
    assert abs(noisy([k for _, k in kinds]) - 0.45) < 0.02
    assert {k for _, k in kinds} <= {"correct", "disclaimer", "refusal", "format_slip"}  # never wrong
    # First wording: one kind per task. Other wordings: the three kinds equally often (0.05 each).
    for name in CORE_TASKS:
        assert {k for t, k in kinds if t["task"] == name and t["template"] == 0} == {"correct", FIRST_TEMPLATE_NOISE[name]}
    counts = collections.Counter(other)
    for kind in ("disclaimer", "refusal", "format_slip"):
        assert abs(counts[kind] / len(other) - 0.05) < 0.01


def test_pool_writers_play_their_parts_on_2000_tasks():
    # The AI-feedback pool's function members (data/tiny/pool.py): the teacher is the dSFT data's teacher (the
    # same answer for the same seed), the expert is always right, the sloppy writer always wrong in the asked form.
    from data.tiny import pool
    rng = random.Random(4)
    teacher_kinds = collections.Counter()
    for i in range(2000):
        t = make_task(rng)
        msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": t["prompt"]}]
        assert pool.teacher(msgs, i) == teacher_answer(t, random.Random(i))
        teacher_kinds[classify(t["prompt"], pool.teacher(msgs, i))] += 1
        assert pool.expert(msgs) == t["answer"] and judge(t["prompt"], pool.expert(msgs)) == 1.0
        s = pool.sloppy(msgs)
        assert classify(t["prompt"], s) == "wrong" and not answer_correct(t["prompt"], s), (t["prompt"], s)
        form = {"upper": r"[A-Z]+( [A-Z]+)*", "sort": r"\w+(, \w+)*"}.get(t["task"], r"\d+")
        assert re.fullmatch(form, s), (t["prompt"], s)
    assert abs(1 - teacher_kinds["correct"] / 2000 - 0.45) < 0.03  # the teacher's 45% noise (TINY.md)
    with pytest.raises(ValueError, match="not one of the tiny task wordings"):
        pool.expert([{"role": "user", "content": "Hello"}])


# -----------------------------------------------------------------------------
# The files

SIZES = dict(n_sft=3000, n_sft_test=200, n_feedback=300, n_eval=200, vocab_size=512)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    prepare.write_all(str(out), seed=0, **SIZES)
    return out


def file_bytes(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def test_generation_is_deterministic_for_a_seed_and_differs_across_seeds(data_dir, tmp_path):
    prepare.write_all(str(tmp_path / "again"), seed=0, **SIZES)
    prepare.write_all(str(tmp_path / "seed1"), seed=1, **SIZES)
    first, again, other = file_bytes(data_dir), file_bytes(tmp_path / "again"), file_bytes(tmp_path / "seed1")
    assert set(first) == {"sft_train.jsonl", "sft_test.jsonl", "feedback_prompts.jsonl", "eval_prompts.jsonl",
                          "tokenizer.model", "tiny.json"}  # and no temporary files left behind
    assert first == again
    for name in ("sft_train.jsonl", "sft_test.jsonl", "feedback_prompts.jsonl", "eval_prompts.jsonl"):
        assert first[name] != other[name], name


def test_files_follow_the_public_schemas(data_dir):
    sha = lambda s: hashlib.sha256(s.encode("utf-8")).hexdigest()  # noqa: E731
    for name, n in (("sft_train", SIZES["n_sft"]), ("sft_test", SIZES["n_sft_test"])):
        rows = read_jsonl(data_dir / f"{name}.jsonl")
        assert len(rows) == n
        for row in rows:  # ultrachat_200k
            assert set(row) == {"prompt", "prompt_id", "messages"}
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert row["messages"][0]["content"] == row["prompt"] and row["prompt_id"] == sha(row["prompt"])
            assert isinstance(row["messages"][1]["content"], str)
    for name, n in (("feedback_prompts", SIZES["n_feedback"]), ("eval_prompts", SIZES["n_eval"])):
        rows = read_jsonl(data_dir / f"{name}.jsonl")
        assert len(rows) == n
        for row in rows:  # UltraFeedback's prompt fields
            assert set(row) == {"instruction", "source", "prompt_id"}
            task = parse_prompt(row["instruction"])[0]
            assert task in CORE_TASKS and row["source"] == f"tiny/{task}"
            assert row["prompt_id"] == sha(row["instruction"])
    meta = json.loads((data_dir / "tiny.json").read_text())
    assert meta["seed"] == 0 and meta["n_sft"] == SIZES["n_sft"] and meta["judge"] == "data.tiny.tasks:judge"


def test_prompt_sets_are_disjoint_and_eval_prompts_distinct(data_dir):
    sets = {
        "sft_train": {r["prompt"] for r in read_jsonl(data_dir / "sft_train.jsonl")},
        "sft_test": {r["prompt"] for r in read_jsonl(data_dir / "sft_test.jsonl")},
        "feedback": [r["instruction"] for r in read_jsonl(data_dir / "feedback_prompts.jsonl")],
        "eval": [r["instruction"] for r in read_jsonl(data_dir / "eval_prompts.jsonl")],
    }
    assert len(set(sets["eval"])) == len(sets["eval"]) and len(set(sets["feedback"])) == len(sets["feedback"])
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(sets[a]) & set(sets[b]), (a, b)


def test_tokenizer_round_trips_the_chats_without_unk_or_byte_pieces(data_dir):
    tok = Tokenizer(str(data_dir / "tokenizer.model"))
    assert tok.vocab_size == SIZES["vocab_size"]
    texts = [render_chat(r["messages"]) for r in read_jsonl(data_dir / "sft_test.jsonl")]
    texts += [render_chat([{"role": "user", "content": r["instruction"]}], add_generation_prompt=True)
              for r in read_jsonl(data_dir / "eval_prompts.jsonl")]
    newline = tok.sp.piece_to_id("<0x0A>")
    for text in texts:
        # Decoding puts a space for the dummy prefix after each </s> (as transformers does), so the round
        # trip is checked on the stretches between them, which is all that sentencepiece sees.
        for stretch in text.split("</s>"):
            assert tok.decode(tok.encode(stretch)) == stretch
        ids = tok.encode(text, bos=True)
        assert tok.unk_id not in ids and ids.count(tok.eos_id) == text.count("</s>")
        # Every character has a piece of its own; only '\n' falls back to bytes, by design (see Tokenizer).
        assert all(i == newline or not tok.sp.is_byte(i) for i in ids), text
    # The chat markers come out compact: '<|', 'user', '|>'.
    assert len(tok.encode("\n<|user|>\n")) <= 6


def test_committed_sample_matches_the_generator():
    path = os.path.join(os.path.dirname(prepare.__file__), "sample.jsonl")
    expected = [prepare.sft_row(*e) for e in prepare.generate(0, n_sft=prepare.SAMPLE_ROWS)["sft_train"]]
    assert read_jsonl(path) == expected


# -----------------------------------------------------------------------------
# The base model's plain text (run.sh tiny, step 2/7)

BASE_SIZES = dict(SIZES, n_base=400, n_base_test=50)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_base")
    prepare.write_all(str(out), seed=0, **BASE_SIZES)
    return out


def test_base_text_is_clean_task_world_text_without_held_out_prompts(base_dir):
    held_out = {r["instruction"] for name in ("feedback_prompts", "eval_prompts")
                for r in read_jsonl(base_dir / f"{name}.jsonl")}
    held_out |= {r["prompt"] for r in read_jsonl(base_dir / "sft_test.jsonl")}
    n_task_passages = 0
    for name, n in (("base_train", BASE_SIZES["n_base"]), ("base_test", BASE_SIZES["n_base_test"])):
        rows = read_jsonl(base_dir / f"{name}.jsonl")
        assert len(rows) == n and all(set(r) == {"text"} for r in rows)
        for row in rows:
            assert "<|" not in row["text"] and "</s>" not in row["text"]  # no chat template
            passages = row["text"].split("\n\n")
            assert 1 <= len(passages) <= 4
            for passage in passages:
                prompt, _, answer = passage.partition("\n")
                try:
                    parse_prompt(prompt)
                except ValueError:
                    continue  # the generator's other text
                n_task_passages += 1
                assert prompt not in held_out
                assert classify(prompt, answer) == "correct", passage  # the teacher's noise is not in it
    assert n_task_passages > 0.6 * 2.5 * (BASE_SIZES["n_base"] + BASE_SIZES["n_base_test"])  # ~75% of ~2.5 per row
    assert json.loads((base_dir / "tiny.json").read_text())["n_base"] == BASE_SIZES["n_base"]


def test_text_rows_tokenize_with_loss_on_every_token(base_dir, tmp_path):
    from data.shards import Shards
    from data.ultrachat import prepare as prepare_chats
    rows = read_jsonl(base_dir / "base_test.jsonl")[:20]
    chat = read_jsonl(base_dir / "sft_test.jsonl")[0]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows + [chat, {"text": ""}, {"text": 3}]))
    info = prepare_chats.prepare([str(src)], str(base_dir / "tokenizer.model"), str(tmp_path / "out"), "train")
    assert info["bad_rows"] == {"bad_text": 2}
    shards = Shards(str(tmp_path / "out"), "train")
    assert len(shards) == len(rows) + 1
    tok = Tokenizer(str(base_dir / "tokenizer.model"))
    for i, row in enumerate(rows):
        ids, mask = shards[i]
        assert ids.tolist() == [tok.bos_id] + tok.encode(row["text"]) + [tok.eos_id]
        assert mask.tolist() == [1] * len(ids)
    ids, mask = shards[len(rows)]  # a chat row beside them keeps its assistant-only mask
    assert (ids.tolist(), mask.tolist()) == tuple(map(list, tok.encode_chat(chat["messages"])))


# -----------------------------------------------------------------------------
# The ablation table (data/tiny/report.py ablation) and the pictures (plot.py)

def fake_eval(run_dir, name, questions_path, answers):
    d = run_dir / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"questions": str(questions_path)}))
    (d / "answers.jsonl").write_text("".join(json.dumps({"question_id": i + 1, "model_id": name,
                                                         "choices": [{"index": 0, "turns": [a]}]}) + "\n"
                                             for i, a in enumerate(answers)))
    prompts = [json.loads(line)["turns"][0] for line in open(questions_path)]
    scores = [judge(p, a) for p, a in zip(prompts, answers)]
    (d / "summary.json").write_text(json.dumps({"score": sum(scores) / len(scores), "n_failed": 0}))


def test_ablation_intervals_match_the_normal_approximation(tmp_path):
    import math
    from data.tiny import report
    rng = random.Random(3)
    tasks = [make_task(rng) for _ in range(400)]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i + 1, "turns": [t["prompt"]]}) + "\n"
                                 for i, t in enumerate(tasks)))
    # Row a: 100 of 400 right (score 0.25); row b: the same answers plus 40 more right; row c: a's answers.
    a = [t["answer"] if i % 4 == 0 else "I'm sorry, I can't help with that." for i, t in enumerate(tasks)]
    b = [t["answer"] if i % 4 == 0 or i % 10 == 1 else x for i, (t, x) in enumerate(zip(tasks, a))]
    for name, answers in (("eval_a", a), ("eval_b", b), ("eval_c", a)):
        fake_eval(tmp_path, name, questions, answers)
    (tmp_path / "summary.json").write_text(json.dumps({"sft_score": 0.25}))
    out = report.ablation(str(tmp_path), 12.0, [("dSFT", "eval_a"), ("better", "eval_b"), ("same", "eval_c")])
    rows = {r["name"]: r for r in out["rows"]}
    assert rows["dSFT"]["score"] == 0.25 and rows["better"]["score"] == 0.35 and rows["dSFT"]["refusal_rate"] == 0.75
    for name, p in (("dSFT", 0.25), ("better", 0.35)):
        half = 1.96 * math.sqrt(p * (1 - p) / 400)  # the normal approximation of the percentile interval
        lo, hi = rows[name]["score_ci95"]
        assert abs(lo - (p - half)) < 0.01 and abs(hi - (p + half)) < 0.01, (name, lo, hi)
    # Paired: b - a is 0.1 on 40 prompts in 400 (a sum of 0/1 differences), a's rerun differs by exactly 0.
    assert abs(rows["better"]["minus_dSFT"] - 0.1) < 1e-12
    lo, hi = rows["better"]["minus_dSFT_ci95"]
    half = 1.96 * math.sqrt(0.1 * 0.9 / 400)
    assert abs(lo - (0.1 - half)) < 0.01 and abs(hi - (0.1 + half)) < 0.01
    assert rows["same"]["minus_dSFT_ci95"] == [0.0, 0.0]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["rows"] == out["rows"] and saved["tiny"] == {"sft_score": 0.25} and saved["seconds"] == 12.0


def test_feedback_breakdown_counts_contrasts_members_and_answer_kinds(tmp_path):
    from data.tiny import report
    rng = random.Random(5)
    tasks = [make_task(rng, "max") for _ in range(3)]
    wrong = [str(int(t["answer"]) + 1) for t in tasks]
    raw = [{"instruction": t["prompt"], "completions": [
        {"model": "expert", "response": t["answer"]}, {"model": "sloppy", "response": w},
        {"model": "teacher", "response": "I'm sorry, I can't help with that."}, {"model": "base", "response": None}]}
        for t, w in zip(tasks, wrong)]
    def pair(t, a, b):
        return {"prompt": t["prompt"], "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": b}]}
    pairs = [pair(tasks[0], tasks[0]["answer"], wrong[0]), pair(tasks[1], tasks[1]["answer"], wrong[1]),
             pair(tasks[2], tasks[2]["answer"], "I'm sorry, I can't help with that.")]
    members = {"expert": {"answers": 3, "failed": 0, "mean_score": 1.0, "chosen": 3, "rejected": 0},
               "sloppy": {"answers": 3, "failed": 0, "mean_score": 0.0, "chosen": 0, "rejected": 2},
               "teacher": {"answers": 3, "failed": 0, "mean_score": 0.0, "chosen": 0, "rejected": 1},
               "base": {"answers": 3, "failed": 3, "mean_score": None, "chosen": 0, "rejected": 0}}
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "summary.json").write_text(json.dumps({"prompts": 3, "pairs": 3, "ties_dropped": 0,
                                                       "members": members}))
    b = report.feedback_breakdown(str(tmp_path))
    assert b["contrasts"] == {"correct > wrong": 2, "correct > refusal": 1}
    assert b["answer_kind_rates"] == {"correct": round(1 / 3, 4), "disclaimer": 0.0, "refusal": round(1 / 3, 4),
                                      "format_slip": 0.0, "wrong": round(1 / 3, 4)}  # 9 answers; 3 failed ones left out
    assert b["members"]["expert"]["chosen_share"] == 1.0 and b["members"]["sloppy"]["rejected_share"] == 0.6667


def test_stage_seconds_run_from_each_mark_to_the_next(tmp_path):
    from data.tiny import report
    (tmp_path / "stages.tsv").write_text("data\t100.0\nbase\t103.5\ndsft\t110.0\nsummary\t1e12\n")
    s = report.stage_seconds(str(tmp_path / "stages.tsv"))
    assert list(s) == ["data", "base", "dsft", "summary"] and (s["data"], s["base"]) == (3.5, 6.5)
    assert s["dsft"] == round(1e12 - 110.0, 1)


def test_plot_reads_training_curves_and_draws_them(tmp_path):
    import plot
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    sft.mkdir(), dpo.mkdir()
    (sft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "eval_loss": 2.5},
        {"step": 2, "loss": 1.5, "eval_loss": 2.25}]))  # a resumed run rewrote step 2
    (dpo / "metrics.jsonl").write_text(json.dumps({"step": 1, "rewards/margins": 0.5, "rewards/accuracies": 0.75,
                                                   "eval_rewards/margins": 0.25}) + "\n")
    (tmp_path / "eval_x").mkdir()
    (tmp_path / "eval_x" / "metrics.jsonl").write_text(json.dumps({"batch": 0, "tokens": 9}) + "\n")  # not a stage
    stages = plot.find_stages([str(tmp_path)])
    names = {os.path.basename(n): rows for n, rows in stages.items()}
    assert set(names) == {"sft", "dpo"}
    assert plot.kind(names["sft"]) == "sft" and plot.kind(names["dpo"]) == "dpo"
    assert plot.series(names["sft"], "loss") == ([1, 2], [3.0, 1.5])
    assert plot.series(names["sft"], "eval_loss") == ([2], [2.25])
    assert plot.series(names["dpo"], "eval_rewards/margins") == ([1], [0.25])
    pytest.importorskip("matplotlib")
    (tmp_path / "summary.json").write_text(json.dumps({"rows": [{"name": "dSFT", "score": 0.3,
                                                                  "score_ci95": [0.25, 0.35], "n": 500}]}))
    runs = plot.ablation_rows([str(tmp_path), str(sft)])
    assert runs == [(tmp_path.name, [{"name": "dSFT", "score": 0.3, "score_ci95": [0.25, 0.35], "n": 500}])]
    written = plot.draw(stages, runs, str(tmp_path / "plots"))
    assert sorted(os.path.basename(w) for w in written) == ["ablation.png", "dpo_rewards.png", "sft_loss.png"]
    for w in written:
        assert open(w, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
