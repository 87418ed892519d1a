# data/ultrachat/clean.py: Zephyr's cleaning of UltraChat. References are hand-written: expected truecasing
# of each sentence, which dialogues the refusal filter removes, and exact counts on a small hand-made file.
import hashlib
import json
import os
import sys

import pytest

from conftest import assistant, run, user
from data.ultrachat import clean
from data.ultrachat.clean import clean_rows, disclaims, load_phrases, truecase


def sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def phrases():
    return load_phrases()


# -----------------------------------------------------------------------------
# Truecasing

@pytest.mark.parametrize("text, expected", [
    ("Hello. how are you?", "Hello. How are you?"),
    ("sure, here it is. It has two parts.", "Sure, here it is. It has two parts."),   # the turn's first letter
    ("Great! let me explain. The idea is simple.", "Great! Let me explain. The idea is simple."),
    ("Is it ready? yes, it is. Good.", "Is it ready? Yes, it is. Good."),
    ("It was built in 1889. the tower is tall.", "It was built in 1889. The tower is tall."),
    ("Done. i think so. Yes.", "Done. I think so. Yes."),
    ("Paris is big.  it has\tmany parks. It is old.", "Paris is big.  It has\tmany parks. It is old."),
    ("Café time. élan matters. Yes.", "Café time. Élan matters. Yes."),               # not only ASCII
    ("Use `x. y` here. then run it. Done.", "Use `x. y` here. Then run it. Done."),   # code left, prose fixed
    ("First line.\nSecond. it continues. Fine.", "First line.\nSecond. It continues. Fine."),
    ("It's fine. don't worry. See config.json for more.", "It's fine. Don't worry. See config.json for more."),
])
def test_truecase_capitalizes_slips(text, expected):
    assert truecase(text) == expected


@pytest.mark.parametrize("text", [
    # code: fenced (closed or not), ~~~, inline, indented
    "Here it is.\n```python\nx = 1. y = 2\nprint('a. b')\n```\nDone. It works.",
    "Here it is. ```js\nlet a = 1. b = 2",
    "Try this.\n~~~\nfoo. bar\n~~~\nOK.",
    "Call `os.path. join` now. It works.",
    "Run:\n    make all. then install\nIt works.",
    # URLs, email addresses, file names and identifiers after a period
    "Visit https://example.com/a. b?x=1 now. It helps.",
    "See www.example.org. then call. It works.",
    "Write to john.doe@example.com. Thanks.",
    "Mail me. john@example.com is fine. Thanks.",
    "See config.json for details. It is short.",
    "Open it. config.json holds the settings. It is short.",
    "Edit it. main.py runs it. Then call it. foo() returns. Also x=1 is set. So is snake_case. Done.",
    # abbreviations, initials, decimals, ellipses, list markers
    "Fruit, e.g. apples. Others, i.e. pears. Apples, etc. and more. Cats vs. dogs. Mr. smith came.",
    "It weighs 3.5 kg. The price is 2.75 euros. Fine.",
    "J. doe wrote it. At 5 p.m. we left. In the U.S. many do. Fine.",
    "Wait... what? Well… maybe. Hmm.. okay. Sure.",
    "Steps:\n1. mix the flour.\n2. bake it.\niv. eat it.\na. or this. OK.",
    "Choose one. a) first b) second. Tea? or coffee? Fine.",
    # words we do not capitalize
    "Buy one. iPhone is nice. eBay sells it. It is fine.",
    "Install it. npm is needed. git too. Done.",
    "Let y = 2. x is 5. Fine.",
    # intentionally lower-case text
    "hello. how are you? i am fine, thanks. what about you?",
    "sure, here it is",
    "the rain falls. the river runs.\nthe night is long. and i wait.",
    "Paris. the city. the light. the river. it sleeps.",                  # mostly lower case: a style
    "hey. I think so. what about you?",                                   # "I" is not evidence
    # quotes and brackets after the period: often a continuation
    'He said "stop." and left. It was late.',
    "It ended (mostly.) and then. It was over.",
])
def test_truecase_leaves_alone(text):
    assert truecase(text) == text


def test_truecase_only_changes_letter_case():
    text = "First. second line here. Third is `code. x`. fourth, at https://a.b/c. fifth. End."
    out = truecase(text)
    assert out.lower() == text.lower() and len(out) == len(text)
    assert out == "First. Second line here. Third is `code. x`. Fourth, at https://a.b/c. fifth. End."


# -----------------------------------------------------------------------------
# Refusal filter

@pytest.mark.parametrize("answer, phrase", [
    ("As an AI language model, I do not have personal opinions, but Paris is lovely.",
     "i do not have personal opinions"),
    ("As an AI language model, I don’t have personal opinions. Paris is big.", "i do not have personal opinions"),
    ("I don't have emotions, but here is the answer: 4.", "i do not have emotions"),
    ("As an AI, I cannot feel anything, but here goes.", "i cannot feel"),
    ("As an AI, I can’t feel pain.", "i cannot feel"),
    ("Well, I’m not capable of feeling sadness. Still, the answer is 4.", "i am not capable of feeling"),
    ("Sorry, I do not have personal\n  experiences with hiking. Trails vary.", "i do not have personal experiences"),
    ("AS AN AI, I DO NOT HAVE FEELINGS. The capital is Paris.", "i do not have feelings"),
    ("I'm an AI. I have no personal experience of Rome, but Rome is old.", "i have no personal experience"),
])
def test_disclaims_unasked(phrases, answer, phrase):
    assert disclaims("What is the capital of France?", answer, phrases) == phrase


@pytest.mark.parametrize("prompt, answer", [
    # the user asked for an opinion, a feeling or an experience
    ("What's your opinion on jazz?", "As an AI language model, I don't have personal opinions. Jazz is varied."),
    ("How do you feel today?", "I do not have feelings, but thanks for asking!"),
    ("What do you think about Rome?", "I don't have personal opinions, but Rome is old."),
    ("Have you ever been to Rome?", "I do not have personal experiences, but Rome is old."),
    ("What’s your favourite song?", "I don’t have preferences."),
    ("Can an AI feel emotions?", "As an AI, I cannot feel emotions."),
    # no disclaimer: emotions and opinions mentioned as facts
    ("How does music affect people?", "Music can evoke emotions and shape opinions."),
    ("Describe the character.", "She does not have emotions she can name; I do not doubt it."),
    ("Why do people disagree?", "People have personal opinions shaped by experience."),
    # quoted in code only
    ("Write a chatbot reply function.", "```python\ndef reply():\n    return \"I don't have emotions.\"\n```"),
    ("Show a string.", "Use `\"I do not have feelings\"` as the text."),
    # a phrase inside a longer word is not that phrase
    ("Tell me.", "I do not have emotionsless robots in stock."),
])
def test_disclaims_not(phrases, prompt, answer):
    assert disclaims(prompt, answer, phrases) is None


def test_phrase_file_rules(tmp_path):
    path = tmp_path / "phrases.txt"
    path.write_text("# comment\n[disclaimers]\nI don’t  have FEELINGS   # trailing comment\n\n[asks]\nYour mood\n",
                    encoding="utf-8")
    p = load_phrases(str(path))
    assert p.disclaimers == ("i do not have feelings",) and p.asks == ("your mood",)
    assert disclaims("Hi", "I do not have feelings.", p) == "i do not have feelings"
    assert disclaims("What is your mood?", "I don't have feelings.", p) is None
    # the earliest phrase in the answer is reported, the longest one where several start at one place
    path.write_text("[disclaimers]\ni have no emotions\ni have no emotions or feelings\ni cannot feel\n",
                    encoding="utf-8")
    p = load_phrases(str(path))
    assert disclaims("Hi", "I cannot feel. I have no emotions.", p) == "i cannot feel"
    assert disclaims("Hi", "I have no emotions or feelings; I cannot feel.", p) == "i have no emotions or feelings"
    assert disclaims("Hi", "I have no emotions or feeling.", p) == "i have no emotions"
    assert disclaims("Hi", "I have no emotionsx.", p) is None
    path.write_text("i do not have feelings\n", encoding="utf-8")
    with pytest.raises(clean.DataError, match="line 1: a phrase before any"):
        load_phrases(str(path))
    path.write_text("[disclaimer]\nx\n", encoding="utf-8")
    with pytest.raises(clean.DataError, match=r"unknown section \[disclaimer\]"):
        load_phrases(str(path))


def test_refusal_filter_judges_each_answer_by_the_turn_before_it(phrases):
    asked_later = [user("Tell me about Rome."), assistant("Rome is old."),
                   user("What do you think of it?"), assistant("I don't have personal opinions, but it is old.")]
    unasked_later = [user("What do you think of Rome?"), assistant("It is old."),
                     user("And its population?"), assistant("I don't have personal opinions; it has 2.8M people.")]
    out, stats = clean_rows([{"messages": asked_later}, {"messages": unasked_later}], phrases)
    assert [r["messages"] for r in out] == [asked_later]
    assert stats["refusal_removed"] == 1 and stats["refusal_kept_because_asked"] == 1
    assert stats["refusal_removed_by_phrase"] == {"i do not have personal opinions": 1}


# -----------------------------------------------------------------------------
# Rows: conversion, dedupe, bad rows

def test_raw_ultrachat_row_is_converted():
    row = {"id": "7", "data": ["what is 2+2? Tell me.", "It is 4.", "And 3+3?", "6."]}
    out, stats = clean_rows([row])
    prompt = "What is 2+2? Tell me."  # truecased
    assert out == [{"prompt": prompt, "prompt_id": sha(prompt),
                    "messages": [user(prompt), assistant("It is 4."), user("And 3+3?"), assistant("6.")]}]
    assert row["data"][0] == "what is 2+2? Tell me."  # the input is not modified
    assert stats["turns"] == 4 and stats["turns_truecased"] == 1 and stats["rows_written"] == 1


def test_ultrachat_200k_row_gets_recomputed_prompt_and_id():
    messages = [{"role": "system", "content": "Be brief."}, user("Hi there. what is up?"), assistant("Not much.")]
    out, _ = clean_rows([{"prompt": "stale", "prompt_id": "0" * 64, "messages": messages, "extra": 1}])
    assert out[0]["prompt"] == "Hi there. What is up?" and out[0]["prompt_id"] == sha("Hi there. What is up?")
    assert out[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_dedupe_keeps_the_first():
    rows = [{"data": ["Name a  colour.", "Blue."]}, {"data": ["Name a fruit.", "Apple."]},
            {"data": [" Name a\ncolour. ", "Red."]}, {"data": ["Name a colour!", "Green."]}]
    out, stats = clean_rows(rows)
    assert [r["messages"][1]["content"] for r in out] == ["Blue.", "Apple.", "Green."]
    assert stats["duplicates_removed"] == 1
    out, stats = clean_rows(rows, dedupe=False)
    assert len(out) == 4 and stats["duplicates_removed"] == 0


def test_bad_rows_are_reported_with_row_numbers():
    rows = [
        {"data": ["Hi.", "Hello."]},                                             # 1 good
        ["not", "an", "object"],                                                 # 2
        {"id": 3},                                                               # 3
        {"data": "Hi."},                                                         # 4
        {"data": ["Hi."]},                                                       # 5
        {"data": ["Hi.", 5]},                                                    # 6
        {"data": ["Hi.", "   "]},                                                # 7
        {"messages": [assistant("Hello."), user("Hi.")]},                        # 8
        {"messages": [user("Hi."), user("Hi again."), assistant("Hello.")]},     # 9
        {"messages": [user("Hi.")]},                                             # 10
        {"messages": [user("Hi."), {"role": "assistant"}]},                      # 11
        {"data": ["Hi.", "Hello."], "messages": [user("Hi."), assistant("Hello.")]},  # 12
        {"data": ["Hi.", "\ud800"]},                                             # 13
        {"data": ["Bye.", "Bye.", "Wait."]},                                     # 14 good, ends with user
    ]
    messages = []
    out, stats = clean_rows(rows, source="hand", report=messages.append)
    assert len(out) == 2 and stats["rows_read"] == 14 and stats["n_bad_rows"] == 12
    assert stats["bad_rows"] == {"not_an_object": 1, "missing_field": 2, "data_not_a_list": 1,
                                 "no_assistant_turn": 2, "turn_not_a_string": 1, "empty_turn": 1,
                                 "bad_roles": 2, "both_data_and_messages": 1, "invalid_unicode": 1}
    assert [m.split(":")[:3] for m in messages][:3] == [
        ["skipped hand", " row 2", " not_an_object"], ["skipped hand", " row 3", " missing_field"],
        ["skipped hand", " row 4", " data_not_a_list"]]
    assert [int(m.split(": row ")[1].split(":")[0]) for m in messages] == list(range(2, 14))
    assert stats["rows_ending_with_user_turn"] == 1


# -----------------------------------------------------------------------------
# The command line, on a small hand-made file

def test_cli_writes_rows_and_exact_stats(tmp_path):
    rows = [
        {"id": 0, "data": ["Tell me a joke. make it short.", "Why did the chicken cross? to get across."]},
        {"id": 1, "data": ["What is the capital of France?", "As an AI, I don’t have emotions. Paris.",
                           "Thanks!", "You are welcome."]},
        {"id": 2, "data": ["How do you feel about rain?", "I do not have feelings, but rain is wet."]},
        {"prompt": "x", "prompt_id": "y", "messages": [user("tell me a joke. Make it short."), assistant("No.")]},
        {"data": ["Tell me a joke.  Make it short.", "Knock knock."]},      # duplicate of row 1 after truecasing
        {"data": []},
        {"data": ["hello. all lower case here.", "ok. fine."]},
    ]
    src = tmp_path / "in.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(3, "{not json")                                          # line 4
    src.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    p = run([sys.executable, "data/ultrachat/clean.py", str(src), "--out", str(out)])
    assert f"{src}: row 4: invalid_json" in p.stderr and f"{src}: row 7: no_assistant_turn" in p.stderr

    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in written] == ["Tell me a joke. Make it short.", "How do you feel about rain?",
                                              "hello. all lower case here."]
    assert written[0]["messages"][1]["content"] == "Why did the chicken cross? To get across."
    assert all(r["prompt_id"] == sha(r["prompt"]) and set(r) == {"prompt", "prompt_id", "messages"} for r in written)

    stats = json.loads((tmp_path / "out.stats.json").read_text(encoding="utf-8"))
    expected = {
        "rows_read": 8, "n_bad_rows": 2, "bad_rows": {"invalid_json": 1, "no_assistant_turn": 1},
        "rows_ending_with_user_turn": 0, "turns": 14,
        "turns_truecased": 3, "letters_capitalized": 3, "dialogues_truecased": 2,
        "refusal_removed": 1, "refusal_removed_by_phrase": {"i do not have emotions": 1},
        "refusal_kept_because_asked": 1, "duplicates_removed": 2, "rows_written": 3,
    }
    assert {k: stats[k] for k in expected} == expected
    assert stats["options"]["truecase"] and stats["options"]["phrases"]["sha256"]
    assert stats["inputs"][0]["path"] == str(src)
    assert "rows written 3" in p.stdout
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl", "out.stats.json"]  # no temp files left

    run([sys.executable, "data/ultrachat/clean.py", str(src), "--out", str(out),
         "--no-truecase", "--no-refusal-filter", "--no-dedupe"])
    stats = json.loads((tmp_path / "out.stats.json").read_text(encoding="utf-8"))
    assert (stats["turns_truecased"], stats["refusal_removed"], stats["duplicates_removed"], stats["rows_written"]) \
        == (0, 0, 0, 6)
    assert stats["options"]["phrases"] is None


def test_reads_raw_rows_from_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": ["a", "b"], "data": [["Hi. how are you?", "Fine."], ["Hi."]]}),
                   tmp_path / "raw.parquet")
    items = list(clean.read_files([str(tmp_path / "raw.parquet")]))
    assert [(n, r) for _, n, r in items] == [(1, {"id": "a", "data": ["Hi. how are you?", "Fine."]}),
                                            (2, {"id": "b", "data": ["Hi."]})]
    out, stats = clean_rows(items, report=lambda m: None)
    assert out[0]["prompt"] == "Hi. How are you?"
    assert stats["first_bad_rows"] == [f"{tmp_path / 'raw.parquet'}: row 2: no_assistant_turn: "
                                       "field 'data' has 1 turn(s), so no assistant answer"]
