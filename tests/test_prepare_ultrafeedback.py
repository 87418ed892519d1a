# data/ultrafeedback/prepare.py: small files in ultrafeedback_binarized's schema -> preference shards.
# The reference for the ids is transformers' tokenizer (loaded from the directory Tokenizer.save_pretrained
# writes) applied as TRL builds a DPO example: the rendered prompt with its generation prompt, then the
# answer, then EOS, tokenized as one string; the prompt's length is that of the rendered prompt alone.
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import assistant, check_bad_row_report, system, user, write_jsonl, write_parquet
from data.shards import Shards
from data.tokenizer import Tokenizer, render_chat
from data.ultrafeedback import prepare as prep

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_FILES = ("ids.bin", "mask.bin", "idx.npy", "prompt_ids.json")


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


def pair_row(prompt, chosen, rejected, i=0, scores=(8.0, 3.5)):
    return {"prompt": prompt[-1]["content"] if prompt else "", "prompt_id": f"{i:064x}",
            "chosen": prompt + [assistant(chosen)], "rejected": prompt + [assistant(rejected)],
            "messages": prompt + [assistant(chosen)], "score_chosen": scores[0], "score_rejected": scores[1]}


PAIRS = [  # (prompt turns, chosen answer, rejected answer)
    ([user("What is 2+2?")], "4.", "5, probably."),
    ([system("You are terse."), user("Name a colour.")], "Blue.", "I like many colours, for example green."),
    # Multi-turn: the earlier assistant turn is prompt, so it must not be trained on.
    ([user("Tell me about Paris."), assistant("Paris is the capital of France."), user("And Tokyo?")],
     "Tokyo is Japan's capital: 東京. Café, naïve, 🙂.", "No idea."),
    ([user("Code?")], "```python\ndef f(x):\n\treturn x  # trailing\n```\n", "  two  spaces first"),
    ([user("What ends a turn?")], "The token </s>", "It ends.</s>"),  # special-token strings in the answer
    ([user("x " * 150)], "y " * 120 + "end", "z"),
]
ROWS = [pair_row(p, c, r, i, scores=(5.0 + i, 1.0 + i / 2)) for i, (p, c, r) in enumerate(PAIRS)]


def split_bytes(directory, split):
    return {s: open(os.path.join(directory, f"{split}.{s}"), "rb").read() for s in SPLIT_FILES}


def trl_example(hf, prompt_turns, answer):
    """(ids, prompt length) as TRL builds them, from transformers' tokenizer alone."""
    prompt_text = render_chat(prompt_turns, add_generation_prompt=True)
    ids = hf(prompt_text + answer + "</s>")["input_ids"]
    return ids, len(hf(prompt_text)["input_ids"])


# -----------------------------------------------------------------------------
# The examples, against transformers

@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "not_legacy"])
def test_pairs_equal_transformers_and_the_mask_covers_exactly_the_answer(tmp_path, tokenizer_path, legacy):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers needs it to read a sentencepiece tokenizer.model
    Tokenizer(tokenizer_path, legacy=legacy).save_pretrained(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")

    src = write_jsonl(tmp_path / "a.jsonl", ROWS)
    report = prep.prepare([src], str(tmp_path / "tok"), tmp_path / "out", "train", max_length=4096)
    s = Shards(tmp_path / "out", "train")
    assert report["n_pairs"] == len(PAIRS) and len(s) == 2 * len(PAIRS) and report["n_bad_rows"] == 0
    assert s.meta["tokenizer"]["legacy"] is legacy
    for i, (prompt, chosen, rejected) in enumerate(PAIRS):
        for j, answer in enumerate((chosen, rejected)):  # example 2i is chosen, 2i+1 rejected
            ids, mask = s[2 * i + j]
            want, p = trl_example(hf, prompt, answer)
            assert ids.tolist() == want, (i, j)
            assert mask.tolist() == [0] * p + [1] * (len(want) - p), (i, j)
            assert ids[-1] == hf.eos_token_id
            # What is trained on reads back as the answer and its </s>, and nothing of the prompt.
            assert hf.decode(ids[mask == 1]).strip() == (answer + "</s>").strip()


def test_multi_turn_prompt_keeps_earlier_assistant_turns_out_of_the_loss(tok):
    prompt = [user("Hi"), assistant("Hello! How can I help?"), user("A fact, please.")]
    out = prep.encode_pair(pair_row(prompt, "Water is wet.", "No."), tok)
    ids, mask = out["chosen"]
    # encode_chat's own mask also marks the earlier assistant turn; ours must not.
    full_ids, full_mask = tok.encode_chat(prompt + [assistant("Water is wet.")])
    assert ids.tolist() == full_ids[:len(ids)]
    assert sum(full_mask) > int(mask.sum()) == len(tok.encode("Water is wet.")) + 1
    assert tok.decode(ids[mask == 1]) == "Water is wet."


# -----------------------------------------------------------------------------
# Truncation, TRL's rules, lengths worked out from the untruncated pair

LONG_PROMPT = [user("one two three four five six seven eight nine ten " * 5)]


@pytest.fixture(scope="module")
def long_pair(tok):
    row = pair_row(LONG_PROMPT, "alpha beta gamma delta epsilon zeta eta theta", "alpha beta gamma")
    full = prep.encode_pair(row, tok, max_prompt_length=4000, max_length=8000)
    prompt_len = int((full["chosen"][1] == 0).sum())
    chosen_len, rejected_len = len(full["chosen"][0]) - prompt_len, len(full["rejected"][0]) - prompt_len
    assert prompt_len > 60 and chosen_len > rejected_len + 4 and rejected_len > 3  # what the cases below rely on
    return row, full, prompt_len, chosen_len, rejected_len


def lengths(out, name):
    ids, mask = out[name]
    return int((mask == 0).sum()), int(mask.sum())


# (max_prompt_length, max_length) -> lengths kept (prompt, chosen, rejected), from P, C, R: the untruncated
# prompt (BOS included), chosen and rejected answer (</s> included), C > R + 4. Worked out by hand from the rule
# in prepare.py's docstring (the handbook-era TRL DPOTrainer's, BOS kept).
TRUNCATION_CASES = {
    "fits exactly": (lambda P, C, R: (P, P + C), lambda P, C, R: (P, C, R)),
    "fits; a prompt over max_prompt_length alone is no reason": (lambda P, C, R: (P - 1, P + C),
                                                                 lambda P, C, R: (P, C, R)),
    "one too long: the prompt is cut, then both answers fit": (lambda P, C, R: (P - 1, P + C - 1),
                                                               lambda P, C, R: (P - 1, C, R)),
    "a prompt of exactly max_prompt_length is kept; the longer answer is cut": (
        lambda P, C, R: (P, P + C - 1), lambda P, C, R: (P, C - 1, R)),
    "a short prompt: answers cut to max_length - max_prompt_length, not to what would fit": (
        lambda P, C, R: (P + 10, P + 13), lambda P, C, R: (P, 3, 3)),
    "prompt cut to 20 and then the pair fits": (lambda P, C, R: (20, 20 + C), lambda P, C, R: (20, C, R)),
    "prompt cut to 20, the longer answer still too long": (lambda P, C, R: (20, 20 + C - 1),
                                                           lambda P, C, R: (20, C - 1, R)),
    "prompt cut to 20, both answers too long": (lambda P, C, R: (20, 20 + R - 1), lambda P, C, R: (20, R - 1, R - 1)),
}


@pytest.mark.parametrize("case", TRUNCATION_CASES)
def test_truncation_follows_the_handbook_era_trl_rule_keeping_bos(tok, long_pair, case):
    row, full, P, C, R = long_pair
    limits, expected = TRUNCATION_CASES[case]
    max_prompt_length, max_length = limits(P, C, R)
    kept_p, kept_c, kept_r = expected(P, C, R)
    out = prep.encode_pair(row, tok, max_prompt_length=max_prompt_length, max_length=max_length)
    assert (lengths(out, "chosen"), lengths(out, "rejected")) == ((kept_p, kept_c), (kept_p, kept_r))
    assert out["truncated"] == {"prompt": kept_p < P, "chosen": kept_c < C, "rejected": kept_r < R}
    prompt = full["chosen"][0][:P].tolist()
    for name, kept in (("chosen", kept_c), ("rejected", kept_r)):
        ids = out[name][0].tolist()
        assert len(ids) <= max_length
        assert ids[:kept_p] == [tok.bos_id] + prompt[P - kept_p + 1:]  # BOS, then the prompt's last tokens
        assert ids[kept_p:] == full[name][0][P:P + kept].tolist()     # the answer's first tokens
        assert (ids[-1] == tok.eos_id) == (kept == len(full[name][0]) - P)  # a cut answer has no </s>


def test_truncation_counts_reach_the_meta(tmp_path, tokenizer_path, tok, long_pair):
    row, full, P, C, R = long_pair
    max_prompt_length, max_length = 50, 50 + R + 1
    short = prep.encode_pair(ROWS[0], tok)
    short_lengths = [len(short["chosen"][0]), len(short["rejected"][0])]
    assert max(short_lengths) <= max_length  # ROWS[0] fits: not truncated
    src = write_jsonl(tmp_path / "a.jsonl", [row, ROWS[0], row])
    report = prep.prepare([src], tokenizer_path, tmp_path / "out", "train", max_prompt_length=max_prompt_length,
                          max_length=max_length)
    assert report["n_truncated"] == {"prompt": 2, "chosen": 2, "rejected": 0}
    assert Shards(tmp_path / "out", "train").lengths.tolist() == [max_length, 50 + R, *short_lengths,
                                                                  max_length, 50 + R]
    with pytest.raises(ValueError, match="max_prompt_length"):
        prep.prepare([src], tokenizer_path, tmp_path / "out", "train", max_prompt_length=1024, max_length=1024)


# -----------------------------------------------------------------------------
# Files, meta and side file

def test_parquet_json_and_jsonl_give_identical_shards(tmp_path, tokenizer_path):
    outputs = []
    json_list = tmp_path / "list.json"
    json_list.write_text(json.dumps(ROWS), encoding="utf-8")
    sources = [write_parquet(tmp_path / "a.parquet", ROWS), write_jsonl(tmp_path / "a.jsonl", ROWS),
               str(json_list), write_jsonl(tmp_path / "lines.json", ROWS)]  # to_json writes lines as .json
    for i, src in enumerate(sources):
        prep.prepare([src], tokenizer_path, tmp_path / f"out{i}", "train")
        outputs.append(split_bytes(tmp_path / f"out{i}", "train"))
    assert all(o == outputs[0] for o in outputs[1:])


def test_meta_and_prompt_ids_record_the_run(tmp_path, tokenizer_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:4])
    b = write_parquet(tmp_path / "b.parquet", ROWS[4:])
    prep.prepare([a, b], tokenizer_path, tmp_path / "out", "test", max_prompt_length=300, max_length=700)
    meta = Shards(tmp_path / "out", "test").meta
    assert meta["n_pairs"] == len(ROWS) and meta["n_examples"] == 2 * len(ROWS)
    assert (meta["max_prompt_length"], meta["max_length"]) == (300, 700)
    assert meta["score_chosen_mean"] == pytest.approx(np.mean([r["score_chosen"] for r in ROWS]))
    assert meta["score_rejected_mean"] == pytest.approx(np.mean([r["score_rejected"] for r in ROWS]))
    assert meta["n_bad_rows"] == 0 and meta["bad_rows"] == {} and meta["rows_read"] == len(ROWS)
    assert meta["n_truncated"] == {"prompt": 0, "chosen": 0, "rejected": 0}
    with open(tokenizer_path, "rb") as f:
        assert meta["tokenizer"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert [x["path"] for x in meta["sources"]] == [os.path.abspath(a), os.path.abspath(b)]

    side = tmp_path / "out" / "test.prompt_ids.json"
    assert json.loads(side.read_text()) == [r["prompt_id"] for r in ROWS]
    assert meta["prompt_ids"] == {"file": "test.prompt_ids.json",
                                  "sha256": hashlib.sha256(side.read_bytes()).hexdigest()}
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".")]  # no temporary files left


def test_workers_give_the_same_output_as_one_process(tmp_path, tokenizer_path):
    rows = [dict(r, prompt_id=f"{k}-{r['prompt_id']}") for k in range(6) for r in ROWS] + [{"chosen": []}]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    prep.prepare([src], tokenizer_path, tmp_path / "one", "train", workers=1)
    report = prep.prepare([src], tokenizer_path, tmp_path / "two", "train", workers=2)
    assert report["bad_rows"] == {"missing_field": 1}
    assert split_bytes(tmp_path / "one", "train") == split_bytes(tmp_path / "two", "train")


# -----------------------------------------------------------------------------
# Bad rows

GOOD = pair_row([user("Q1")], "A good answer.", "A worse one.", i=1)
BAD_LINES = [  # (jsonl line, the reason it is counted under, or None for a good row)
    (json.dumps(GOOD).encode(), None),
    (json.dumps(pair_row([user("Q")], "  \n ", "fine")).encode(), "empty_answer"),
    (json.dumps(pair_row([user("Q")], "fine", "")).encode(), "empty_answer"),
    (json.dumps(pair_row([user("Q")], "Same.", "Same. ")).encode(), "identical_answers"),
    (json.dumps(dict(GOOD, rejected=[user("Another Q"), assistant("x")])).encode(), "prompt_mismatch"),
    (json.dumps(dict(GOOD, chosen=[user("Q1"), assistant("a"), user("more?")])).encode(), "last_turn_not_assistant"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "rejected"}).encode(), "missing_field"),
    (json.dumps(dict(GOOD, score_chosen=None)).encode(), "missing_field"),
    (json.dumps(dict(GOOD, score_chosen="high")).encode(), "wrong_type"),
    (json.dumps(dict(GOOD, prompt_id=7)).encode(), "wrong_type"),
    (json.dumps(dict(GOOD, chosen=[{"role": "robot", "content": "Q1"}, assistant("a")])).encode(), "invalid_messages"),
    (json.dumps(dict(GOOD, rejected=[user("Q1"), {"role": "assistant"}])).encode(), "invalid_messages"),
    (json.dumps(dict(GOOD, chosen="not a list")).encode(), "invalid_messages"),
    (json.dumps(pair_row([], "a", "b")).encode(), "prompt_not_ending_with_user"),
    (b'{"chosen": [', "invalid_json"),
    (json.dumps(GOOD, ensure_ascii=False).replace("Q1", "caf\u00e9").encode("latin-1"), "invalid_utf8"),
    (b"", None),  # a blank line is not a row: neither read nor counted
    (b'"just a string"', "not_an_object"),
    (json.dumps(pair_row([system("s"), user("Q2")], "Yes.", "No.", i=2)).encode(), None),
]


def test_bad_rows_are_reported_with_their_line_numbers_and_good_rows_come_through(tmp_path, tokenizer_path, tok,
                                                                                    capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    src = str(src)
    report = prep.prepare([src], tokenizer_path, tmp_path / "out", "train")
    err = capsys.readouterr().err
    expected = check_bad_row_report(report, err, src, BAD_LINES)
    assert "field 'rejected': messages[1]['content']: missing" in err  # check_messages names index and field

    good = [json.loads(line) for line, reason in BAD_LINES if line and reason is None]
    s = Shards(tmp_path / "out", "train")
    assert s.meta["bad_rows"] == expected and len(s) == 2 * len(good)
    for i, row in enumerate(good):
        out = prep.encode_pair(row, tok)
        assert s[2 * i][0].tolist() == out["chosen"][0].tolist()
        assert s[2 * i + 1][0].tolist() == out["rejected"][0].tolist()
    assert json.loads((tmp_path / "out" / "train.prompt_ids.json").read_text()) == [r["prompt_id"] for r in good]


def test_null_cells_in_parquet_are_reported_by_row(tmp_path, tokenizer_path, capsys):
    rows = ROWS[:2] + [dict(ROWS[2], rejected=None), dict(ROWS[3], prompt_id=None)]
    src = write_parquet(tmp_path / "a.parquet", rows)
    report = prep.prepare([src], tokenizer_path, tmp_path / "out", "train")
    err = capsys.readouterr().err
    assert report["bad_rows"] == {"missing_field": 2} and report["n_pairs"] == 2
    assert f"{src}: row 3: missing_field: field 'rejected'" in err and f"{src}: row 4: missing_field" in err


def test_a_parquet_file_without_a_needed_column_is_refused_naming_it(tmp_path, tokenizer_path):
    src = write_parquet(tmp_path / "a.parquet", [{k: v for k, v in r.items() if k != "score_rejected"} for r in ROWS])
    with pytest.raises(prep.DataError, match=r"a\.parquet: no column 'score_rejected'"):
        prep.prepare([src], tokenizer_path, tmp_path / "out", "train")


def test_strict_stops_at_the_first_bad_row_and_writes_nothing(tmp_path, tokenizer_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    with pytest.raises(prep.DataError, match=r"bad\.jsonl: row 2: empty_answer"):
        prep.prepare([str(src)], tokenizer_path, tmp_path / "out", "train", strict=True)
    assert os.listdir(tmp_path / "out") == []  # not even temporary files


# -----------------------------------------------------------------------------
# Command line

def test_input_directory_maps_train_prefs_to_train_and_test_prefs_to_test(tmp_path, tokenizer_path):
    hub = tmp_path / "ultrafeedback_binarized" / "data"
    hub.mkdir(parents=True)
    write_parquet(hub / "train_prefs-00000-of-00002-abc.parquet", ROWS[:3])
    write_parquet(hub / "train_prefs-00001-of-00002-def.parquet", ROWS[3:])
    write_parquet(hub / "test_prefs-00000-of-00001-ghi.parquet", ROWS[:2])
    write_parquet(hub / "train_gen-00000-of-00001-jkl.parquet", ROWS)  # not a preference split: ignored
    # As the README runs it: a script path, from another directory.
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "data", "ultrafeedback", "prepare.py"), "--tokenizer", tokenizer_path,
         "--out", str(tmp_path / "out"), "--input", str(tmp_path / "ultrafeedback_binarized"),
         "--max_prompt_length", "100", "--max_length", "200"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    train, test = Shards(tmp_path / "out", "train"), Shards(tmp_path / "out", "test")
    assert (train.meta["n_pairs"], test.meta["n_pairs"]) == (len(ROWS), 2)
    assert train.meta["max_length"] == 200 and train.lengths.max() <= 200
    assert [os.path.basename(x["path"]) for x in train.meta["sources"]] == [
        "train_prefs-00000-of-00002-abc.parquet", "train_prefs-00001-of-00002-def.parquet"]


def test_module_imports_without_side_effects(tmp_path):
    # Importing must not parse arguments or touch the disk: run scripts and tests call prepare() directly.
    code = "import sys; sys.argv = ['x', '--bogus']; import data.ultrafeedback.prepare"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "" and os.listdir(tmp_path) == [], p.stderr
