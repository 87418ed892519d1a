"""
chat.py and the streaming hook of model.generate. References: transformers (its AutoTokenizer's chat template
and its greedy generate on the exported directory) for what the one-shot command prints; the non-streamed
generate for the streamed ids; tests/conftest.py's ChatServer for what reaches an endpoint.
"""

import io
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, ChatServer

from data.tokenizer import Tokenizer
from model import Mistral


def run(args, stdin=None, check=True):
    """chat.py with `args`, stdin from a string (not a terminal: no prompts, as when piped)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "chat.py", *args], cwd=ROOT, env=env, input=stdin or "",
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, f"chat.py {args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def hf_greedy(directory, messages, max_new_tokens):
    """transformers on the exported directory, as a user would run it: the chat template, greedy generate."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = hf.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2,
                      pad_token_id=0)[0, ids["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True)


def test_streamed_ids_equal_the_returned_ids(tiny_model):
    model = Mistral.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [[1, 5, 9, 300, 17], [1, 44], [1, 7, 7, 7, 7, 7, 7, 7, 200]]
    # An EOS the greedy run meets early in row 0, so rows stop at different steps (and finished rows get pads).
    free = model.generate(prompts, 12, temperature=0, eos_id=-1)
    eos = free[0][2]
    for temperature in (0, 1.0):
        kw = dict(temperature=temperature, top_p=0.9 if temperature else None, eos_id=eos, pad_id=0)
        plain = model.generate(prompts, 12, generator=torch.Generator().manual_seed(3), **kw)
        steps = []
        streamed = model.generate(prompts, 12, generator=torch.Generator().manual_seed(3), on_token=steps.append, **kw)
        assert streamed == plain
        assert plain[0][-1] == eos and len(plain[0]) <= 3 and len({len(r) for r in plain}) > 1 or temperature
        assert all(len(s) == len(prompts) for s in steps)
        per_row = [[s[b] for s in steps if s[b] is not None] for b in range(len(prompts))]
        assert per_row == plain


def test_streamer_writes_the_final_text_piece_by_piece(tokenizer_path):
    # Byte-fallback characters arrive a byte at a time; the dummy-prefix space is dropped as decode drops it.
    import chat
    tok = Tokenizer(tokenizer_path)
    text = "Crème brûlée 東京 😀👍🏽🎉 𝔘𝔫𝔦 ꙮ  two  spaces\n\tdone"
    ids = tok.encode(text)
    assert sum(1 for i in ids if tok.pieces[i][1] == 6) > 8  # many byte pieces
    out = io.StringIO()
    stream = chat.Streamer(tok, out)
    for i in ids:
        stream([i])
        assert "\ufffd" not in out.getvalue()
    stream([tok.eos_id])
    stream.finish(tok.decode(ids))
    assert out.getvalue() == tok.decode(ids) == text


def test_one_shot_prints_what_transformers_generates(tiny_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}]
    want = hf_greedy(tiny_model, messages, 12)
    p = run([tiny_model, "--system", "Be brief.", "--prompt", "Name a prime number.", "--temperature=0",
             "--max_new_tokens", "12"])
    assert p.stdout == want + "\n" and want.strip()


class Recorder(ChatServer):
    def __init__(self):
        super().__init__()
        self.bodies = []

    def respond(self, body, headers):
        with self.lock:
            self.bodies.append(body)
            return 200, f"reply {len(self.bodies)}"


def test_one_shot_against_an_endpoint():
    server = Recorder()
    p = run([f"{server.url}|model=zephyr", "--prompt", "Hi there", "--temperature", "0.3",
             "--top_p=0.8", "--max_new_tokens", "64", "--system", "S"])
    assert p.stdout == "reply 1\n"
    assert server.bodies == [{"model": "zephyr", "messages": [{"role": "system", "content": "S"},
                                                              {"role": "user", "content": "Hi there"}],
                              "temperature": 0.3, "top_p": 0.8, "max_tokens": 64}]


def test_multi_turn_keeps_history_and_reset_clears_it():
    server = Recorder()
    stdin = "first\nsecond\n\n/reset\nthird\n/exit\nnever sent\n"
    p = run([f"{server.url}|model=m", "--system", "S"], stdin=stdin)
    assert p.stdout == "model> reply 1\nmodel> reply 2\nmodel> reply 3\n"
    assert "[conversation reset]" in p.stderr
    sys_, u, a = {"role": "system", "content": "S"}, (lambda t: {"role": "user", "content": t}), \
        (lambda t: {"role": "assistant", "content": t})
    assert [b["messages"] for b in server.bodies] == [
        [sys_, u("first")],
        [sys_, u("first"), a("reply 1"), u("second")],
        [sys_, u("third")],
    ]


def test_multi_turn_local_answers_from_the_whole_conversation(tiny_model):
    # The second answer is transformers' greedy answer to the conversation so far, the first answer included.
    p = run([tiny_model, "--temperature=0", "--max_new_tokens=6"], stdin="a\nb\n/exit\n")
    first = hf_greedy(tiny_model, [{"role": "user", "content": "a"}], 6)
    second = hf_greedy(tiny_model, [{"role": "user", "content": "a"}, {"role": "assistant", "content": first},
                                    {"role": "user", "content": "b"}], 6)
    assert p.stdout == f"model> {first}\nmodel> {second}\n"


def test_bad_arguments_name_the_problem(tmp_path):
    p = run([str(tmp_path), "--prompt", "x"], check=False)
    assert p.returncode == 1 and "is not a Hugging Face directory" in p.stderr
    p = run(["--prompt", "x"], check=False)
    assert p.returncode == 1 and "name a model" in p.stderr
    p = run(["http://127.0.0.1:1/v1|model=m", "--temprature=0"], check=False)
    assert p.returncode == 1 and "did you mean 'temperature'" in p.stderr


def test_an_unreachable_endpoint_is_an_error_not_an_answer():
    p = run(["http://127.0.0.1:9/v1|model=m", "--prompt", "x", "--max_attempts=1", "--request_timeout=5"],
            check=False)
    assert p.returncode == 1 and "http://127.0.0.1:9/v1" in p.stderr and p.stdout == ""
