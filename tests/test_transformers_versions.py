"""
The exported tokenizer gives training's ids in the transformers versions people serve with: 4.46 and 4.57
(many serving stacks), 5.20 (vLLM 0.33 pins transformers < 5.21) and 5.24. Each version lives in its own venv
(transformers, tokenizers, sentencepiece, protobuf, jinja2; no torch), created on first use and cached under
${XDG_CACHE_HOME:-~/.cache}/zephyr-from-scratch/venvs (about 20-40 s each the first time). tests/hf_tokenize.py
runs inside it and loads our export with AutoTokenizer; the reference is what training saw: Tokenizer.encode
(plain text, BOS first) and Tokenizer.encode_chat (conversations), themselves checked against transformers in
tests/test_tokenizer.py. Set TOKENIZER_VENVS=skip to skip these tests on a machine without PyPI.
"""

import concurrent.futures
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from data.tokenizer import Tokenizer, render_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The newest patch of each line, and the tokenizers release pip resolves it with; all have Python 3.11 wheels.
VERSIONS = {
    "4.46": ["transformers==4.46.3", "tokenizers==0.20.3"],
    "4.57": ["transformers==4.57.6", "tokenizers==0.22.2"],
    "5.20": ["transformers==5.20.2", "tokenizers==0.23.3"],
    "5.24": ["transformers==5.24.0", "tokenizers==0.23.3"],
}
COMMON = ["sentencepiece==0.2.3", "protobuf==7.36.2", "jinja2==3.1.6"]

CODE = "def mean(xs):\n    if not xs:\n        return 0.0\n    total = 0\n    for x in xs:\n        total += x\n" \
       "    return total / len(xs)\n"
CONVERSATIONS = [
    [{"role": "user", "content": "Fix the indentation:\n```python\n" + CODE.replace("    ", "  ") + "```"},
     {"role": "assistant", "content": "Here it is:\n\n```python\n" + CODE + "```\n"},
     {"role": "user", "content": "And with tabs?"},
     {"role": "assistant", "content": "```go\nfunc f() {\n\tif x {\n\t\treturn  1\n\t}\n}\n```"}],
    [{"role": "system", "content": "  You answer   in columns.  "},
     {"role": "user", "content": "a  b   c    d     e\n  x\t\ty \t z\n\n\n   "},
     {"role": "assistant", "content": "|  a  |   b   |\n|-----|-------|\n|  1  |   22  |"}],
    [{"role": "user", "content": "Crème brûlée, naïve façade, Ångström; 東京の天気は？ 한국어 😀👍🏽 👨‍👩‍👧 e\u0301 ﬁ"},
     {"role": "assistant", "content": "¿Qué tal? Привет, мир! 你好，世界。🎉\u00a0\u200b nbsp"}],
    [{"role": "user", "content": "What do </s> and <s> mean in `<s>[INST] hi [/INST]</s>`? And <unk>?"},
     {"role": "assistant", "content": "<s> starts a sequence, </s> ends it:</s> see?<s>"},
     {"role": "user", "content": "</s>"}],
    [{"role": "user", "content": "    four leading spaces, trailing tab\t"},
     {"role": "assistant", "content": " one leading space"}],
    [{"role": "user", "content": ""}],
]
TEXTS = [CODE, "a  b   c    d\t\te", "  two leading spaces", "Ångström 東京 😀", "x</s>y<s>z <unk>",
         "<|user|>\nHi</s>\n", "\n\n\tindented\n    more", "trailing   "]
CHATS = [(m, agp) for m in CONVERSATIONS for agp in ((False, True) if m[-1]["role"] == "user" else (False,))]


def venv_python(version):
    """The python of a cached venv holding transformers `version`, created if missing."""
    pins = VERSIONS[version] + COMMON
    key = hashlib.sha256(json.dumps([pins, sys.version]).encode()).hexdigest()[:12]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    final = os.path.join(cache, "zephyr-from-scratch", "venvs", f"transformers-{version}-{key}")
    python = os.path.join(final, "bin", "python")
    if os.path.exists(python):
        return python
    # Built beside its final place and renamed into it, so an interrupted build is never taken for a venv.
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True, capture_output=True, timeout=300)
        p = subprocess.run([os.path.join(tmp, "bin", "python"), "-m", "pip", "install", "-q", "--no-compile",
                            "--disable-pip-version-check", *pins], capture_output=True, text=True, timeout=900)
        if p.returncode:
            pytest.fail(f"pip install {' '.join(pins)} into {tmp} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same venv first
            if not os.path.exists(python):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return python


def hf_ids(version, dirs, python=None):
    """tests/hf_tokenize.py's reply for `dirs`, run in the venv of `version`."""
    request = {"dirs": dirs, "texts": TEXTS, "chats": CHATS}
    p = subprocess.run([python or venv_python(version), os.path.join(ROOT, "tests", "hf_tokenize.py")],
                       input=json.dumps(request),
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout)


def export(tokenizer_path, directory, legacy, model_dir):
    """Our export, as a tokenizer directory or as the tokenizer files of a model directory (what sft.py and
    dpo.py write: config.json with model_type mistral, which some loaders go by)."""
    tok = Tokenizer(tokenizer_path, legacy=legacy)
    tok.save_pretrained(directory)
    if model_dir:
        config = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": tok.vocab_size}
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
    return tok


def expected_ids(tok):
    """What training saw: texts with BOS first, conversations as encode_chat gives them."""
    return {"texts": [tok.encode(t, bos=True) for t in TEXTS],
            "chats": [tok.encode_chat(m, agp)[0] for m, agp in CHATS]}


def mismatched_ids(want, got):
    """Ids of `want` and `got` outside their longest common matching blocks (0 when equal)."""
    matched = sum(b.size for b in difflib.SequenceMatcher(None, want, got, autojunk=False).get_matching_blocks())
    return max(len(want), len(got)) - matched


@pytest.fixture(scope="module")
def venvs():
    """{version: python}, the missing venvs created at once (pip mostly waits on the network)."""
    if os.environ.get("TOKENIZER_VENVS") == "skip":
        pytest.skip("TOKENIZER_VENVS=skip")
    with concurrent.futures.ThreadPoolExecutor(len(VERSIONS)) as pool:
        return dict(zip(VERSIONS, pool.map(venv_python, VERSIONS)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_path):
    """{directory: (legacy, expected ids)} for the real Mistral v1 tokenizer, legacy and not, in both layouts."""
    out = {}
    for legacy in (True, False):
        for model_dir in (False, True):
            d = str(tmp_path_factory.mktemp(f"{'legacy' if legacy else 'not_legacy'}-{'model' if model_dir else 'tok'}"))
            out[d] = (legacy, expected_ids(export(tokenizer_path, d, legacy, model_dir)))
    return out


@pytest.mark.parametrize("version", list(VERSIONS))
def test_autotokenizer_gives_training_ids(venvs, exported, version):
    reply = hf_ids(version, list(exported), venvs[version])
    assert reply["transformers"] == VERSIONS[version][0].split("==")[1]
    for d, (legacy, want) in exported.items():
        got = reply["results"][d]
        where = f"transformers {version}, legacy={legacy}, {os.path.basename(d)}, {got['class']}"
        for text, w, g in zip(TEXTS, want["texts"], got["texts"]):
            assert g == w, f"{where}: tokenizer({text!r}) differs by {mismatched_ids(w, g)} ids"
        for (m, agp), w, text, templated, encoded in zip(CHATS, want["chats"], got["rendered"], got["templated"],
                                                          got["render_encoded"]):
            assert text == render_chat(m, agp, bos=True), where
            assert templated == w, f"{where}: apply_chat_template differs by {mismatched_ids(w, templated)} ids"
            assert encoded == w, f"{where}: render, then encode differs by {mismatched_ids(w, encoded)} ids"


def test_mismatched_ids_counts_what_differs():
    assert mismatched_ids([1, 2, 3], [1, 2, 3]) == 0
    assert mismatched_ids([1, 2, 3], [2, 3]) == 1       # a dropped BOS
    assert mismatched_ids([1, 5, 5, 9], [1, 5, 6, 9]) == 1
    assert mismatched_ids([1, 2], [1, 2, 2]) == 1       # a doubled one
