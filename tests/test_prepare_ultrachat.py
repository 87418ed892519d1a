# data/shards.py and data/ultrachat/prepare.py: small files in ultrachat_200k's schema -> shards -> back.
# References: Tokenizer.encode_chat (tested against transformers in tests/test_tokenizer.py) for the ids,
# and, independently of how encode_chat builds its mask, the decoded text of each loss-masked span.
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import assistant, check_bad_row_report, user, write_jsonl, write_parquet
from data import shards as shards_module
from data.shards import Shards, ShardWriter
from data.tokenizer import Tokenizer
from data.ultrachat import prepare as prep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_FILES = ("ids.bin", "mask.bin", "idx.npy")


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


# Assistant contents never start with a space: decode drops one leading space (the dummy prefix), as
# transformers does, so such a content would not round-trip through decode and the span check below.
CONVERSATIONS = [
    [user("What is 2+2?"), assistant("4.")],
    [{"role": "system", "content": "You are terse."}, user("Name a colour."), assistant("Blue.")],
    [user("Tell me about Paris."), assistant("Paris is the capital of France.\n\nIt has  two  spaces here."),
     user("And Tokyo?"), assistant("Tokyo is Japan's capital: 東京. Café, naïve, 🙂.")],
    [user("Say nothing."), assistant("")],                      # the loss is then on </s> alone
    [user("Code?"), assistant("```python\ndef f(x):\n\treturn x  # trailing\n```\n"), user("Thanks")],
    [user("x" * 300), assistant("y " * 200 + "end")],
]


def rows_of(conversations):
    return [{"prompt": c[-2]["content"] if len(c) > 1 else "", "prompt_id": f"{i:064x}", "messages": c}
            for i, c in enumerate(conversations)]


def spans(mask):
    """[start, end) of each run of 1s."""
    m = np.concatenate([[0], np.asarray(mask, np.int8), [0]])
    edges = np.flatnonzero(np.diff(m))
    return list(zip(edges[::2], edges[1::2]))


def split_bytes(directory, split):
    return {s: open(os.path.join(directory, f"{split}.{s}"), "rb").read() for s in SPLIT_FILES}


# -----------------------------------------------------------------------------
# prepare.py

def test_ids_are_encode_chat_and_loss_mask_covers_exactly_the_assistant_turns(tmp_path, tokenizer_path, tok):
    src = write_jsonl(tmp_path / "a.jsonl", rows_of(CONVERSATIONS))
    report = prep.prepare([src], tokenizer_path, tmp_path / "out", "train")
    s = Shards(tmp_path / "out", "train")
    assert len(s) == len(CONVERSATIONS) == report["n_examples"]
    assert s.meta["n_bad_rows"] == 0 and s.meta["rows_read"] == len(CONVERSATIONS)
    for (ids, mask), conversation in zip((s[i] for i in range(len(s))), CONVERSATIONS):
        want_ids, want_mask = tok.encode_chat(conversation)
        assert ids.tolist() == want_ids and mask.tolist() == want_mask
        # Independent of encode_chat's bookkeeping: each masked span decodes to one assistant content
        # followed by </s>, in order, and nothing else is masked.
        contents = [m["content"] for m in conversation if m["role"] == "assistant"]
        runs = spans(mask)
        assert len(runs) == len(contents)
        for (a, b), content in zip(runs, contents):
            assert ids[b - 1] == tok.eos_id
            assert tok.decode(ids[a:b - 1]) == content
    assert int(s.mask.sum()) == s.meta["n_loss_tokens"]
    assert s.lengths.tolist() == [len(tok.encode_chat(c)[0]) for c in CONVERSATIONS]


def test_parquet_json_and_jsonl_give_identical_shards(tmp_path, tokenizer_path):
    rows = rows_of(CONVERSATIONS)
    parquet = write_parquet(tmp_path / "a.parquet", rows)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    json_list = tmp_path / "list.json"
    json_list.write_text(json.dumps(rows), encoding="utf-8")
    json_lines = write_jsonl(tmp_path / "lines.json", rows)  # what HF datasets' to_json writes
    outputs = []
    for i, src in enumerate([parquet, jsonl, str(json_list), json_lines]):
        prep.prepare([src], tokenizer_path, tmp_path / f"out{i}", "train")
        outputs.append(split_bytes(tmp_path / f"out{i}", "train"))
    assert all(o == outputs[0] for o in outputs[1:])


def test_workers_give_the_same_shards_as_one_process(tmp_path, tokenizer_path):
    src = write_jsonl(tmp_path / "a.jsonl", rows_of(CONVERSATIONS * 7) + [{"messages": []}])
    prep.prepare([src], tokenizer_path, tmp_path / "one", "train", workers=1)
    report = prep.prepare([src], tokenizer_path, tmp_path / "two", "train", workers=2)
    assert report["bad_rows"] == {"empty_conversation": 1}
    assert split_bytes(tmp_path / "one", "train") == split_bytes(tmp_path / "two", "train")


BAD_LINES = [  # (jsonl line, the reason it is counted under, or None for a good row)
    (json.dumps({"messages": [user("first"), assistant("good")]}).encode(), None),
    (b'{"messages": [', "invalid_json"),
    ('{"messages": [{"role": "user", "content": "café"}, {"role": "assistant", "content": "ok"}]}'
     .encode("latin-1"), "invalid_utf8"),
    (json.dumps({"prompt": "no messages"}).encode(), "missing_field"),
    (json.dumps({"messages": "hello"}).encode(), "messages_not_a_list"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}, assistant("x")]}).encode(), "unknown_role"),
    (json.dumps({"messages": [user("hi"), {"role": "assistant", "content": 3}]}).encode(), "content_not_a_string"),
    (json.dumps({"messages": [user("hi"), {"role": "assistant"}]}).encode(), "missing_field"),
    (json.dumps({"messages": []}).encode(), "empty_conversation"),
    (json.dumps({"messages": [user("only a question")]}).encode(), "no_assistant_turn"),
    (json.dumps({"messages": [user("hi"), {"role": "system", "content": "late"}, assistant("x")]}).encode(),
     "system_not_first"),
    (json.dumps({"messages": [user("hi"), "not a dict", assistant("x")]}).encode(), "bad_message"),
    (b"", None),  # a blank line is not a row: neither read nor counted
    (b"[1, 2]", "not_an_object"),
    (json.dumps({"messages": [user("last"), assistant("also good")]}).encode(), None),
]


def write_bad_jsonl(path):
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    return str(path)


def test_bad_rows_are_reported_with_their_line_numbers_and_skipped(tmp_path, tokenizer_path, tok, capsys):
    src = write_bad_jsonl(tmp_path / "bad.jsonl")
    report = prep.prepare([src], tokenizer_path, tmp_path / "out", "train")
    err = capsys.readouterr().err
    expected = check_bad_row_report(report, err, src, BAD_LINES)

    s = Shards(tmp_path / "out", "train")
    assert s.meta["bad_rows"] == expected  # the json keeps the counts
    good = [json.loads(line)["messages"] for line, reason in BAD_LINES if line and reason is None]
    assert [s[i][0].tolist() for i in range(len(s))] == [tok.encode_chat(m)[0] for m in good]


def test_null_and_empty_messages_in_parquet_are_reported_by_row(tmp_path, tokenizer_path, capsys):
    rows = rows_of(CONVERSATIONS[:2]) + [{"prompt": "", "prompt_id": "", "messages": None},
                                         {"prompt": "", "prompt_id": "", "messages": []}]
    src = write_parquet(tmp_path / "a.parquet", rows)
    report = prep.prepare([src], tokenizer_path, tmp_path / "out", "train")
    err = capsys.readouterr().err
    assert report["bad_rows"] == {"missing_field": 1, "empty_conversation": 1}
    assert f"{src}: row 3: missing_field" in err and f"{src}: row 4: empty_conversation" in err
    assert len(Shards(tmp_path / "out", "train")) == 2


def test_strict_stops_at_the_first_bad_row_and_writes_nothing(tmp_path, tokenizer_path):
    src = write_bad_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(prep.DataError, match=r"bad\.jsonl: row 2: invalid_json"):
        prep.prepare([src], tokenizer_path, tmp_path / "out", "train", strict=True)
    assert os.listdir(tmp_path / "out") == []  # not even temporary files

    # The command line: a nonzero exit with that message, run as the README runs it.
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "data", "ultrachat", "prepare.py"), "--tokenizer", tokenizer_path,
         "--out", str(tmp_path / "cli"), "--train", src, "--strict"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert f"{src}: row 2: invalid_json" in result.stderr
    with pytest.raises(FileNotFoundError):
        Shards(tmp_path / "cli", "train")


def test_input_directory_maps_train_sft_to_train_and_test_sft_to_test(tmp_path, tokenizer_path):
    hub = tmp_path / "ultrachat_200k" / "data"
    hub.mkdir(parents=True)
    rows = rows_of(CONVERSATIONS)
    write_parquet(hub / "train_sft-00000-of-00002-abc.parquet", rows[:3])
    write_parquet(hub / "train_sft-00001-of-00002-def.parquet", rows[3:])
    write_parquet(hub / "test_sft-00000-of-00001-ghi.parquet", rows[:2])
    write_parquet(hub / "train_gen-00000-of-00001-jkl.parquet", rows)  # not an SFT split: ignored
    prep.main(["--tokenizer", tokenizer_path, "--out", str(tmp_path / "out"),
               "--input", str(tmp_path / "ultrachat_200k")])
    train, test = Shards(tmp_path / "out", "train"), Shards(tmp_path / "out", "test")
    assert (len(train), len(test)) == (len(rows), 2)
    assert [os.path.basename(x["path"]) for x in train.meta["sources"]] == [
        "train_sft-00000-of-00002-abc.parquet", "train_sft-00001-of-00002-def.parquet"]


def test_max_examples_stops_after_that_many_examples(tmp_path, tokenizer_path, tok):
    src = write_jsonl(tmp_path / "a.jsonl", rows_of(CONVERSATIONS))
    prep.prepare([src], tokenizer_path, tmp_path / "out", "train", max_examples=2)
    s = Shards(tmp_path / "out", "train")
    assert len(s) == 2 and s[1][0].tolist() == tok.encode_chat(CONVERSATIONS[1])[0]


def test_module_imports_without_side_effects():
    # Importing must not parse arguments or touch the disk: run scripts and tests call prepare() directly.
    code = "import sys; sys.argv = ['x', '--bogus']; import data.ultrachat.prepare"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# -----------------------------------------------------------------------------
# shards.py

@pytest.mark.parametrize("vocab_size, dtype", [(1003, "<u2"), (65536, "<u2"), (70001, "<u4")])
def test_shards_read_back_what_was_written(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    examples = [(rng.integers(0, vocab_size, n), rng.integers(0, 2, n)) for n in (1, 17, 5, 300, 2)]
    examples.append((np.array([vocab_size - 1]), np.array([1])))  # the largest id survives the dtype
    with ShardWriter(tmp_path, "train", vocab_size) as w:
        for ids, mask in examples:
            w.add(ids, mask)
        w.close({"note": "hi"})
    s = Shards(tmp_path, "train")
    assert s.meta["dtype"] == dtype and s.meta["note"] == "hi"
    assert len(s) == len(examples)
    assert s.lengths.tolist() == [len(ids) for ids, _ in examples]
    for i, (ids, mask) in enumerate(examples):
        assert s[i][0].tolist() == ids.tolist() and s[i][1].tolist() == mask.tolist()
    assert s[-1][0].tolist() == [vocab_size - 1]
    assert s.meta["n_loss_tokens"] == sum(int(m.sum()) for _, m in examples)
    with pytest.raises(IndexError):
        s[len(examples)]
    assert sorted(os.listdir(tmp_path)) == sorted(f"train.{x}" for x in (*SPLIT_FILES, "json"))


def test_an_empty_split_reads_as_zero_examples(tmp_path):
    with ShardWriter(tmp_path, "test", 32000) as w:
        w.close()
    assert len(Shards(tmp_path, "test")) == 0


@pytest.mark.parametrize("ids, mask, message", [
    ([5, 1003], [0, 1], r"example 1: ids: 1003 is outside the vocabulary \[0, 1003\)"),
    ([5, -1], [0, 1], r"example 1: ids: -1 is outside"),
    ([5, 6], [1], r"example 1: loss_mask: expected 2 values"),
    ([5, 6], [1, 2], r"example 1: loss_mask: expected only 0 and 1"),
    ([], [], r"example 1: ids: expected a non-empty 1-D integer sequence"),
])
def test_writer_refuses_bad_examples_naming_them(tmp_path, ids, mask, message):
    with ShardWriter(tmp_path, "train", 1003) as w:
        w.add([1, 2], [0, 1])
        with pytest.raises(ValueError, match=message):
            w.add(ids, mask)
        w.close()


def write_small_split(directory, split="train", n=3):
    with ShardWriter(directory, split, 1003) as w:
        for i in range(n):
            w.add(np.arange(i + 1) + 10 * n, np.ones(i + 1))
        w.close()


@pytest.mark.parametrize("damage", ["truncate ids.bin", "truncate mask.bin", "truncate idx.npy",
                                    "remove ids.bin", "remove idx.npy", "remove json"])
def test_a_truncated_or_missing_file_is_refused_naming_it(tmp_path, damage):
    write_small_split(tmp_path)
    action, suffix = damage.split()
    path = os.path.join(tmp_path, f"train.{suffix}")
    if action == "truncate":
        os.truncate(path, os.path.getsize(path) - 2)
    else:
        os.remove(path)
    with pytest.raises((ValueError, FileNotFoundError), match=f"train.{suffix}".replace(".", r"\.")):
        Shards(tmp_path, "train")


def test_an_exception_before_close_leaves_no_split_and_no_temp_files(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, "train", 1003) as w:
            w.add([1, 2, 3], [0, 1, 1])
            raise KeyboardInterrupt  # e.g. ctrl-C mid-prepare
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match=r"train\.json"):
        Shards(tmp_path, "train")


def test_leaving_the_writer_without_close_is_an_error_not_a_split(tmp_path):
    with pytest.raises(RuntimeError, match="without close"):
        with ShardWriter(tmp_path, "train", 1003) as w:
            w.add([1, 2, 3], [0, 1, 1])
    assert os.listdir(tmp_path) == []


def test_a_crash_while_renaming_over_an_old_split_leaves_nothing_the_reader_accepts(tmp_path, monkeypatch):
    write_small_split(tmp_path, n=3)  # an earlier, complete split of the same name
    renames = []

    def crashing_replace(src, dst):
        if len(renames) == 2:
            raise OSError("simulated crash between renames")
        renames.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(shards_module.os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_small_split(tmp_path, n=5)
    # New ids.bin and mask.bin, old idx.npy: without the json the mix is refused, not misread.
    with pytest.raises(FileNotFoundError, match=r"train\.json"):
        Shards(tmp_path, "train")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_crash_before_close_keeps_the_old_split_intact(tmp_path):
    write_small_split(tmp_path, n=3)
    before = split_bytes(tmp_path, "train")
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path, "train", 1003) as w:
            w.add([1, 2], [0, 1])
            w.add([5000], [1])  # out of vocabulary: the prepare run dies here
    assert split_bytes(tmp_path, "train") == before
    assert len(Shards(tmp_path, "train")) == 3
