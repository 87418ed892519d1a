"""
data/tokenizer.py against transformers' tokenizer, the independent reference: our save_pretrained writes a
directory, transformers' AutoTokenizer loads it offline, and the two must agree token for token on the
real Mistral v1 vocabulary (shipped in mistral_common's wheel) and on a small vocabulary trained here.
The reference is built by transformers from tokenizer.model alone (our tokenizer.json removed), so it does
not depend on the tokenizer.json we write; that file is then checked against ours in a model directory
(config.json with model_type mistral), through AutoTokenizer and through `tokenizers` directly.
"""

import json
import os
import random
import stat
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
mistral_common = pytest.importorskip("mistral_common")
pytest.importorskip("google.protobuf")  # transformers needs it to read a sentencepiece tokenizer.model
import sentencepiece as spm  # noqa: E402

import tokenizers  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from data.tokenizer import CHAT_TEMPLATE, LEGACY, Tokenizer, load_tokenizer, render_chat, train_tokenizer  # noqa: E402
from files import atomic_write  # noqa: E402

MISTRAL_V1 = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
LEGACY_AND_NOT = {True: Tokenizer(MISTRAL_V1, legacy=True), False: Tokenizer(MISTRAL_V1, legacy=False)}

CONVERSATIONS = {
    "no_system_multi_turn": [
        {"role": "user", "content": "Hi! Can you help me plan a trip?"},
        {"role": "assistant", "content": "Of course. Where would you like to go?"},
        {"role": "user", "content": "Somewhere warm, in March."},
        {"role": "assistant", "content": "Consider the Canary Islands: about 22°C in March."},
    ],
    "with_system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    "non_ascii": [
        {"role": "user", "content": "Crème brûlée, naïve façade, Ångström; 東京の天気は？ 한국어 😀👍🏽 👨‍👩‍👧"},
        {"role": "assistant", "content": "¿Qué tal? Ça va. Привет, мир! 你好，世界。🎉 e\u0301 ﬁ"},
    ],
    "whitespace_heavy": [
        {"role": "system", "content": "   leading and trailing   "},
        {"role": "user", "content": "a  b   c    d\t\ttab\n\n\nnewlines \n  \n"},
        {"role": "assistant", "content": "  two spaces first, one last "},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": " \t \n "},
    ],
    "code_block": [
        {"role": "user", "content": "Fix this:\n```python\ndef f(x):\n  return x+1\n```"},
        {"role": "assistant", "content": "```python\ndef f(x):\n    if x is None:\n        return 0\n"
                                         "\treturn x + 1  # tab\n```\nDone."},
    ],
    "ends_with_user": [
        {"role": "user", "content": "Tell me a joke."},
    ],
}
# Special-token strings inside content: transformers splits them out of the rendered text as their ids,
# and so do we (they are not checked by the mask test, whose decoding cannot tell them from text).
SPECIAL_STRINGS = [
    {"role": "user", "content": "what does </s> mean? and <s>? and <unk>?"},
    {"role": "assistant", "content": "They are special tokens: <s> starts, </s> ends.</s>"},
]


def load_reference(ours, directory):
    """transformers' tokenizer for the directory ours wrote, converted by transformers from tokenizer.model
    and tokenizer_config.json (without our tokenizer.json), as the independent reference."""
    ours.save_pretrained(directory)
    os.remove(os.path.join(directory, "tokenizer.json"))
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "not_legacy"])
def mistral(request, tmp_path_factory):
    """(ours, transformers' reference tokenizer) for the real Mistral vocabulary."""
    ours = Tokenizer(MISTRAL_V1, legacy=request.param)
    return ours, load_reference(ours, tmp_path_factory.mktemp("mistral"))


def random_text(rng):
    """Spaces in runs, tabs, newlines, punctuation, accents, CJK, emoji, '▁' and special-token strings."""
    pools = [
        "abcdefghijklmnopqrstuvwxyz", "ABCXYZ0123456789", " ", "  ", "    ", "\t\n\r", ".,;:!?'\"()[]{}<>/\\|-_=+*&%$#@~`",
        "éàüßñçøÅœ", "中文字日本語한국어", "😀🎉👍🏽👨‍👩‍👧", "\u2581\u200b\u00a0\u0301",
    ]
    words = ["the", " and", "</s>", "<s>", "<unk>", "<0x0A>", "<|user|>", "def ", "\n    return", "▁▁"]
    out = []
    for _ in range(rng.randint(0, 30)):
        out.append(rng.choice(words) if rng.random() < 0.2 else rng.choice(rng.choice(pools)))
    return "".join(out)


# -- encoding ------------------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", [*CONVERSATIONS, "special_strings"])
def test_encode_chat_equals_transformers_chat_template(mistral, name, add_generation_prompt):
    # Both ways serving stacks tokenize a chat: apply_chat_template(tokenize=True) (transformers) and the
    # template rendered, then encoded without special tokens (vLLM's chat server).
    ours, hf = mistral
    messages = CONVERSATIONS.get(name, SPECIAL_STRINGS)
    ids, mask = ours.encode_chat(messages, add_generation_prompt)
    templated = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                       return_dict=False)
    assert list(templated) == ids == hf(render_chat(messages, add_generation_prompt, bos=True),
                                        add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids) and ids[0] == ours.bos_id and ours.bos_id not in ids[1:] or name == "special_strings"
    # The recipe's way, the rendered text encoded with special tokens (BOS added by the tokenizer), gives the
    # same ids: the template writes out the '▁' transformers puts after a BOS it adds itself.
    assert hf(render_chat(messages, add_generation_prompt))["input_ids"] == ids
    assert hf.convert_ids_to_tokens(ids[:2]) == ["<s>", "\u2581<"]
    # and rendering with the BOS and encoding with special tokens doubles it: the call the README warns about
    assert hf(render_chat(messages, add_generation_prompt, bos=True))["input_ids"][:2] == [1, 1]


def test_fuzz_encode_and_decode_match_transformers(mistral):
    ours, hf = mistral
    rng = random.Random(1234)
    for _ in range(200):
        text = random_text(rng)
        ids = ours.encode(text, bos=True)
        assert ids == hf(text)["input_ids"], repr(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(text)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids), repr(text)


def test_runs_of_spaces_follow_transformers_not_sentencepiece(mistral):
    ours, hf = mistral
    text = "a  and   b"
    expected = hf.convert_tokens_to_ids(["▁a", "▁▁", "and", "▁▁", "▁b"])
    assert ours.encode(text) == expected == hf(text, add_special_tokens=False)["input_ids"]
    # plain sentencepiece ranks '▁▁' last (score -1e9) and gives '▁' '▁and': the difference we undo
    plain = spm.SentencePieceProcessor(model_file=MISTRAL_V1).encode(text, out_type=str)
    assert plain == ["▁a", "▁", "▁and", "▁▁", "▁b"]


def test_special_token_strings_become_their_ids(mistral):
    ours, hf = mistral
    ids = ours.encode("x</s>y<s>z<unk>")
    assert [i for i in ids if i in (0, 1, 2)] == [2, 1, 0]
    assert ids == hf("x</s>y<s>z<unk>", add_special_tokens=False)["input_ids"]


def test_bos_and_eos_flags(mistral):
    ours, _ = mistral
    assert ours.encode("hi", bos=True, eos=True) == [ours.bos_id, *ours.encode("hi"), ours.eos_id]
    assert ours.encode("") == [] and ours.encode("", bos=True) == [1]
    assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id, ours.vocab_size) == (1, 2, 0, 0, 32000)


# -- the chat template and the loss mask -------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", [*CONVERSATIONS, "special_strings"])
def test_apply_chat_template_renders_like_render_chat(mistral, name, add_generation_prompt):
    ours, hf = mistral
    messages = CONVERSATIONS.get(name, SPECIAL_STRINGS)
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert rendered == render_chat(messages, add_generation_prompt, bos=True)


def test_render_chat_is_the_zephyr_format():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render_chat(messages) == "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n"
    assert render_chat(messages[:1], add_generation_prompt=True) == "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert render_chat(messages, bos=True) == "<s> " + render_chat(messages)
    assert "raise_exception" in CHAT_TEMPLATE  # bad roles fail in transformers too, as in check_messages


def test_chat_template_rejects_bad_roles_in_transformers_too(mistral):
    _, hf = mistral
    for messages in ([{"role": "bot", "content": "x"}],
                     [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]):
        with pytest.raises(Exception, match="role|system"):
            hf.apply_chat_template(messages, tokenize=False)


def jinja_render(messages, add_generation_prompt):
    """CHAT_TEMPLATE rendered by jinja2 alone, as transformers and vLLM set it up (sandboxed, with
    raise_exception): the template checked without transformers' own rendering code."""
    import jinja2.sandbox

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token="<s>", eos_token="</s>")


chat_text = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", " ", "  x", "\t\tdef f():\n    return  1", "</s>", "<s>", "a</s>b", "<|user|>\n", "\n\n", "é 東京 😀"])
conversations = st.tuples(st.booleans(), st.lists(st.tuples(chat_text, chat_text), min_size=1, max_size=3),
                          st.booleans(), chat_text).map(
    lambda t: ([{"role": "system", "content": t[3]}] if t[0] else [])
    + [{"role": r, "content": c} for u, a in t[1] for r, c in (("user", u), ("assistant", a))]
    + ([{"role": "user", "content": t[3]}] if t[2] else []))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations, add_generation_prompt=st.booleans())
def test_template_render_chat_and_encode_chat_are_one_format(messages, add_generation_prompt):
    # The three definitions of the format against each other: the template (jinja2 alone) renders as
    # render_chat(bos=True), and encode_chat's ids are that text encoded whole, its mask a 0/1 list beside them.
    for legacy in (True, False):
        tok = LEGACY_AND_NOT[legacy]
        text = render_chat(messages, add_generation_prompt, bos=True)
        assert jinja_render(messages, add_generation_prompt) == text
        ids, mask = tok.encode_chat(messages, add_generation_prompt)
        assert ids == tok.encode(text) and len(mask) == len(ids) and set(mask) <= {0, 1}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_loss_mask_is_exactly_assistant_contents_and_their_eos(mistral, name):
    ours, hf = mistral
    messages = CONVERSATIONS[name]
    ids, mask = ours.encode_chat(messages, add_generation_prompt=False)
    assert set(mask) <= {0, 1} and mask[0] == 0
    # the masked positions, as maximal runs
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(ids[start:i])
            start = None
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(contents)
    newline = hf.convert_tokens_to_ids("<0x0A>")
    for run, content in zip(runs, contents):
        assert run[-1] == ours.eos_id and ours.eos_id not in run[:-1]
        # Decoded after the header's '\n' (so that no leading space is taken for the dummy prefix),
        # by transformers, the run must be exactly the content: nothing of the header, nothing missing.
        assert hf.decode([newline, *run[:-1]]) == "\n" + content


def test_no_token_straddles_role_header_and_content(mistral):
    # With Mistral's vocabulary no piece contains '\n', so the '\n' ending each header is its own token.
    # Independently: transformers' tokens for the text up to each assistant header are a prefix of its
    # tokens for the whole conversation, i.e. the content starts on a token boundary.
    ours, hf = mistral
    assert ours.newline_is_barrier
    for messages in CONVERSATIONS.values():
        full = hf(render_chat(messages))["input_ids"]
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                head = hf(render_chat(messages[:k], add_generation_prompt=True))["input_ids"]
                assert full[:len(head)] == head


def test_vocabulary_with_newline_pieces_is_refused_by_encode_chat(tmp_path):
    # sentencepiece's trainer keeps '\n' inside sentences under the identity normalizer (train_tokenizer
    # splits lines to avoid it); then a token could straddle a header and its content.
    path = str(tmp_path / "nl.model")
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["a\nb c\n\nd", "ab\n\nab ab"] * 50), model_writer=f, model_type="bpe",
            vocab_size=268, byte_fallback=True, character_coverage=1.0, pad_id=-1,
            normalization_rule_name="identity", minloglevel=2)
    tok = Tokenizer(path)
    assert not tok.newline_is_barrier
    with pytest.raises(ValueError, match="straddle"):
        tok.encode_chat(CONVERSATIONS["with_system"])


@pytest.mark.parametrize("messages, match", [
    ([], r"messages: expected a non-empty list"),
    ("hi", r"messages: expected a non-empty list"),
    ([["user", "hi"]], r"messages\[0\]: expected a dict"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\]: missing"),
    ([{"role": "user"}], r"messages\[0\]\['content'\]: missing"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hi"}], r"messages\[1\]\['role'\]: expected one of"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\]: expected a string"),
    ([{"role": 3, "content": "x"}], r"messages\[0\]\['role'\]: expected a string"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], r"messages\[1\]\['role'\]: a system"),
])
def test_bad_messages_raise_naming_index_and_field(messages, match):
    with pytest.raises(ValueError, match=match):
        render_chat(messages)
    with pytest.raises(ValueError, match=match):
        Tokenizer(MISTRAL_V1).encode_chat(messages)


# -- decoding -------------------------------------------------------------------

def test_decode_round_trips_text(mistral):
    ours, _ = mistral
    for text in ["Hello, world!", "a  b\t\tc\n\nd ", "Crème brûlée 東京 😀👍🏽", "```\n    code\n```"]:
        assert ours.decode(ours.encode(text)) == text
    # legacy puts a dummy-prefix '▁' after each special token, which decodes as a space (as in transformers)
    assert ours.decode(ours.encode("x</s>y"), skip_special_tokens=False) == ("x</s> y" if ours.legacy else "x</s>y")
    ids = ours.encode_chat(CONVERSATIONS["with_system"])[0]
    assert ours.decode(np.array(ids)) == ours.decode(ids)  # numpy input
    with pytest.raises(ValueError, match=r"ids\[1\]: 32000 is outside"):
        ours.decode([5, 32000])


# -- export and training ----------------------------------------------------------

def test_save_pretrained_writes_a_directory_transformers_loads(tmp_path):
    ours = Tokenizer(MISTRAL_V1, legacy=True)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                            "tokenizer_config.json"]
    assert (tmp_path / "tokenizer.model").read_bytes() == open(MISTRAL_V1, "rb").read()
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, 0)
    assert hf.chat_template == CHAT_TEMPLATE and hf.padding_side == "left"
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.legacy is True and again.encode("a </s>\nb") == ours.encode("a </s>\nb")
    # transformers 4.x takes "add_prefix_space" as an order to rebuild the tokenizer from tokenizer.model,
    # sentencepiece's way (tests/test_transformers_versions.py); "legacy" must be there for every loader.
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "add_prefix_space" not in config and config["legacy"] is True


def test_load_tokenizer_has_one_legacy_default(tmp_path):
    # A bare tokenizer.model, and a directory whose tokenizer_config.json does not say, get LEGACY; a directory
    # that says gets what it says. Every script loads through load_tokenizer (common.load_tokenizer wraps it).
    assert LEGACY is True and load_tokenizer(MISTRAL_V1).legacy is LEGACY
    Tokenizer(MISTRAL_V1, legacy=False).save_pretrained(tmp_path / "no")
    assert load_tokenizer(str(tmp_path / "no")).legacy is False
    (tmp_path / "no" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_tokenizer(str(tmp_path / "no")).legacy is LEGACY
    (tmp_path / "no" / "tokenizer_config.json").write_text(json.dumps({"legacy": "yes"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: \"legacy\" must be true or false"):
        load_tokenizer(str(tmp_path / "no"))
    with pytest.raises(FileNotFoundError, match="no such tokenizer"):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match="directory without a tokenizer.model"):
        load_tokenizer(str(tmp_path))


def generated_corpus(seed, n=300):
    rng = random.Random(seed)
    words = ("the of and to in is it that for on with as was at by be this are from or have not but what "
             "all were when we there can your which their said if do will each about how up out them then "
             "café naïve 東京 😀 def return x y 0 1 2 3 42 2023").split()
    lines = []
    for _ in range(n):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
        line = rng.choice(["", "  ", "    ", "\t"]) + line + rng.choice([".", "?", "!", ":", "  ", ""])
        lines.append(line.capitalize())
    return ["\n".join(lines[i:i + 5]) for i in range(0, n, 5)]


def test_trained_tokenizer_is_deterministic_and_matches_transformers(tmp_path):
    corpus = generated_corpus(seed=0)
    path = train_tokenizer(corpus, str(tmp_path / "a" / "tiny"), vocab_size=400)
    assert open(path, "rb").read() == open(train_tokenizer(corpus, str(tmp_path / "b"), 400), "rb").read()
    ours = Tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=path)
    assert ours.vocab_size == 400 and ours.newline_is_barrier
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert all(sp.is_byte(i) for i in range(3, 259))

    hf = load_reference(ours, tmp_path / "hf")
    rng = random.Random(5)
    for text in generated_corpus(seed=1, n=100) + [random_text(rng) for _ in range(100)]:
        assert ours.encode(text, bos=True) == hf(text)["input_ids"], repr(text)
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)
    for messages in CONVERSATIONS.values():
        assert ours.encode_chat(messages)[0] == hf(render_chat(messages))["input_ids"]


# -- tokenizer.json: what loaders use in a model directory ------------------------------

def model_directory(ours, directory, vocab_size):
    """save_pretrained's files plus a config.json like model.py's: AutoTokenizer then goes by model_type
    mistral (TokenizersBackend reading tokenizer.json as is), not by tokenizer_config's LlamaTokenizer."""
    ours.save_pretrained(directory)
    config = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": vocab_size}
    (directory / "config.json").write_text(json.dumps(config))
    return (transformers.AutoTokenizer.from_pretrained(directory),
            tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")))


@pytest.fixture(scope="module", params=["mistral-legacy", "mistral-not_legacy", "trained-legacy", "trained-not_legacy"])
def saved(request, tmp_path_factory):
    """(ours, AutoTokenizer of a model directory, tokenizers.Tokenizer of its tokenizer.json)."""
    vocabulary, legacy = request.param.split("-")
    if vocabulary == "mistral":
        path = MISTRAL_V1
    else:
        path = train_tokenizer(generated_corpus(seed=0), str(tmp_path_factory.mktemp("trained") / "tiny"), 400)
    ours = Tokenizer(path, legacy=legacy == "legacy")
    return (ours, *model_directory(ours, tmp_path_factory.mktemp("model"), ours.vocab_size))


def test_model_directory_loaders_encode_runs_of_spaces_like_ours(saved):
    ours, hf, raw = saved
    text = "Name  three   primes"
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text) == raw.encode(text, add_special_tokens=False).ids
    if ours.vocab_size == 32000:  # transformers' own conversion of tokenizer.model gives '▁' '▁three' here
        assert hf.convert_ids_to_tokens(ours.encode(text))[:4] == ["▁Name", "▁▁", "three", "▁▁"]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_model_directory_loaders_encode_conversations_like_ours(saved, add_generation_prompt):
    ours, hf, raw = saved
    for messages in [*CONVERSATIONS.values(), SPECIAL_STRINGS]:
        ids = ours.encode_chat(messages, add_generation_prompt)[0]
        rendered = render_chat(messages, add_generation_prompt, bos=True)
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt) == rendered
        assert hf(rendered, add_special_tokens=False)["input_ids"] == ids == raw.encode(rendered, add_special_tokens=False).ids
        templated = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                           return_dict=False)
        assert list(templated) == ids
        assert hf.decode(ids) == ours.decode(ids, skip_special_tokens=False) == raw.decode(ids, skip_special_tokens=False)


def test_model_directory_loaders_fuzz_encode_and_decode_like_ours(saved):
    ours, hf, raw = saved
    rng = random.Random(4321)
    texts = [random_text(rng) for _ in range(150)] + generated_corpus(seed=2, n=50)
    encoded = raw.encode_batch(texts)
    for text, enc in zip(texts, encoded):
        ids = ours.encode(text, bos=True)
        assert ids == hf(text)["input_ids"] == enc.ids, repr(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == raw.decode(ids), repr(text)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids) == raw.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_json_equals_what_transformers_saves(tmp_path, legacy):
    # transformers' LlamaTokenizer converts tokenizer.model (with our tokenizer_config) and saves its own
    # tokenizer.json: ours must be the same document, bar the BPE's unk_token, which we name (no id
    # depends on it: byte fallback leaves nothing unknown).
    ours = Tokenizer(MISTRAL_V1, legacy=legacy)
    hf = load_reference(ours, tmp_path / "in")
    assert type(hf).__name__ == "LlamaTokenizer"
    hf.save_pretrained(tmp_path / "out")
    theirs = json.loads((tmp_path / "out" / "tokenizer.json").read_text(encoding="utf-8"))
    mine = ours.tokenizers_json()
    assert mine["model"].pop("unk_token") == "<unk>" and theirs["model"].pop("unk_token") is None
    assert mine == theirs
    ours.save_pretrained(tmp_path / "mine")
    assert json.loads((tmp_path / "mine" / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"] == \
        theirs["model"]["merges"]


def test_tokenizer_json_in_a_tokenizer_directory_loads_as_llama_tokenizer(tmp_path):
    # Without config.json, AutoTokenizer takes tokenizer_config's LlamaTokenizer, which reads the vocabulary
    # and merges from our tokenizer.json and builds its Metaspace from `legacy`.
    ours = Tokenizer(MISTRAL_V1, legacy=True)
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ == "LlamaTokenizer"
    rng = random.Random(99)
    for text in [random_text(rng) for _ in range(50)] + [render_chat(m) for m in CONVERSATIONS.values()]:
        assert hf(text)["input_ids"] == ours.encode(text, bos=True), repr(text)


def test_saved_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        Tokenizer(MISTRAL_V1).save_pretrained(tmp_path / "a")
        path = train_tokenizer(generated_corpus(seed=0), str(tmp_path / "t" / "tiny"), vocab_size=400)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()}
        assert modes == dict.fromkeys(modes, 0o644) and len(modes) == 4
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.umask(0o077)
        atomic_write(str(tmp_path / "private"), b"x")
        assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
        atomic_write(str(tmp_path / "private"), b"y")  # replacing keeps the atomic rename and the mode
        assert (tmp_path / "private").read_bytes() == b"y" and sorted(os.listdir(tmp_path)) == ["a", "private", "t"]
    finally:
        os.umask(old)


# -- data and exported tokenizer agree (common.load_tokenizer, used by sft.py and dpo.py) --------------------

def prepared_split(tmp_path, tokenizer, name="data"):
    """A train and a test split written by data/ultrachat/prepare.py with `tokenizer` (a file or a directory)."""
    from conftest import write_jsonl
    from data.ultrachat import prepare as ultrachat
    rows = [{"prompt_id": str(i), "messages": [{"role": "user", "content": f"Count to {i}."},
                                               {"role": "assistant", "content": " ".join(map(str, range(i + 2)))}]}
            for i in range(12)]
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    for split in ("train", "test"):
        ultrachat.prepare([src], str(tokenizer), str(tmp_path / name), split)
    return tmp_path / name


def test_load_tokenizer_refuses_a_tokenizer_the_data_was_not_prepared_with(tmp_path, tiny_tokenizer):
    import types

    import common
    from data.shards import Shards
    data = prepared_split(tmp_path, tiny_tokenizer)
    splits = [Shards(data, "train"), Shards(data, "test")]
    assert splits[0].meta["tokenizer"]["legacy"] is LEGACY
    mcfg = types.SimpleNamespace(vocab_size=512)
    assert common.load_tokenizer(tiny_tokenizer, mcfg, splits).legacy is LEGACY
    # The same vocabulary exported with the other `legacy`: named by its tokenizer_config.json.
    Tokenizer(tiny_tokenizer, legacy=not LEGACY).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError) as e:
        common.load_tokenizer(str(tmp_path / "other"), mcfg, splits)
    msg = str(e.value)
    assert str(data / "train.json") in msg and str(tmp_path / "other" / "tokenizer_config.json") in msg
    assert f"legacy {LEGACY}" in msg and f"legacy {not LEGACY}" in msg
    # Another vocabulary of the same size: named by its tokenizer.model and sha256.
    other = train_tokenizer(generated_corpus(seed=3), str(tmp_path / "v2" / "tok"), vocab_size=512)
    with pytest.raises(ValueError, match=r"sha256") as e:
        common.load_tokenizer(other, mcfg, splits)
    assert str(data / "train.json") in str(e.value) and other in str(e.value) and tiny_tokenizer in str(e.value)
    # Splits that record no tokenizer (written by other tools) are not checked.
    assert common.load_tokenizer(other, mcfg, [Shards(prepared_split(tmp_path, other, "d2"), "train")])


def test_sft_stops_before_training_when_the_tokenizer_differs_from_the_data(tmp_path, tiny_tokenizer):
    from conftest import run
    data = prepared_split(tmp_path, tiny_tokenizer)
    Tokenizer(tiny_tokenizer, legacy=not LEGACY).save_pretrained(tmp_path / "other")
    args = ["--init_from=scratch", "--model_preset=tiny", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}",
            "--seq_len=64", "--global_batch_size=4", "--micro_batch_size=2", "--max_steps=1", "--eval_every=0"]
    p = run([sys.executable, "sft.py", *args, f"--tokenizer={tmp_path / 'other'}"], check=False)
    assert p.returncode != 0 and str(data / "train.json") in p.stderr and "tokenizer_config.json" in p.stderr
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")  # stopped before the first step
