import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # tests/run.sh runs 2 pytest-xdist workers on CI's 2 cores: one thread each (torch reads this when imported,
    # after this file); OpenMP threads beyond the cores spin and slow every process that shares them.
    os.environ["OMP_NUM_THREADS"] = "1"

# The longest files first, so that under xdist (tests/run.sh: --dist loadfile --no-loadscope-reorder) none of
# them starts last and runs alone.
LONGEST_FIRST = ("test_pipeline.py", "test_kernels_compile.py", "test_rehearsal.py", "test_memplan.py")


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(os.path.basename(str(item.path)), len(first)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The stage scripts that run() starts through the fork server (tests/zygote.py) rather than a fresh interpreter.
FORKED = {"sft.py", "dpo.py", "eval.py", "feedback.py", "data/ultrachat/generate.py"}


class Zygote:
    """Fork servers of this test process (tests/zygote.py), started on first use: each `python STAGE.py ARGS`
    becomes a child forked from a process that has already imported torch, FSDP2 and dynamo. One server per
    value of TRITON_INTERPRET: dynamo imports triton, which decides on import whether it interprets."""

    procs = {}

    @classmethod
    def run(cls, cmd, env, timeout):
        import tempfile
        key = env.get("TRITON_INTERPRET")
        proc = cls.procs.get(key)
        if proc is None or proc.poll() is not None:
            e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            e.setdefault("OMP_NUM_THREADS", "1")
            if key is not None:
                e["TRITON_INTERPRET"] = key
            proc = cls.procs[key] = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "zygote.py")],
                                                     cwd=ROOT, env=e, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     text=True, bufsize=1)
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            proc.stdin.write(json.dumps({"argv": [str(c) for c in cmd[1:]], "env": env, "cwd": ROOT,
                                         "stdout": out, "stderr": err}) + "\n")
            proc.stdin.flush()
            pid = json.loads(proc.stdout.readline())["pid"]
            killed = []

            def kill():
                killed.append(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended meanwhile
                    pass

            timer = threading.Timer(timeout, kill)
            timer.start()
            rc = json.loads(proc.stdout.readline())["rc"]  # the server reaps the child, so pid stays valid
            timer.cancel()
            stdout, stderr = (open(path, encoding="utf-8", errors="replace").read() for path in (out, err))
        if killed and rc == -signal.SIGKILL:
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, rc, stdout, stderr)


def run(cmd, timeout=300, env=None, check=True):
    """Run a command from the repo root; on failure show its output (the assertion message is the log). The stage
    scripts (FORKED) run in a child of the fork server: the same process, argv, environment and output, without
    paying torch's imports again."""
    e = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    if cmd[0] == sys.executable and len(cmd) > 1 and str(cmd[1]) in FORKED and hasattr(os, "fork"):
        p = Zygote.run(cmd, e, timeout)
    else:
        p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p


def torchrun(script, args, nproc=1, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", script, *map(str, args)]
    return run(cmd, **kw)


@pytest.fixture(scope="session")
def tokenizer_path():
    """The real Mistral v1 tokenizer.model (32000 pieces), from the mistral-common wheel."""
    mistral_common = pytest.importorskip("mistral_common")
    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def check_bad_row_report(report, err, src, bad_lines):
    """A prepare script's report and stderr for the file `src` of bad_lines, (line bytes, reason or None) pairs:
    each bad row named on stderr by row number and reason, and counted by reason. Returns the counts."""
    expected = {}
    for line_number, (line, reason) in enumerate(bad_lines, 1):
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
            assert f"{src}: row {line_number}: {reason}:" in err
    assert report["bad_rows"] == expected
    assert report["n_bad_rows"] == sum(expected.values()) == len(report["first_bad_rows"])
    assert report["rows_read"] == sum(1 for line, _ in bad_lines if line)
    return expected


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)  # several row groups
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-piece sentencepiece model (the tiny preset's vocab size), trained on generated text."""
    from data.tokenizer import train_tokenizer
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.?!")
    texts = ["<|user|> " + " ".join("".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(12))
             for _ in range(3000)]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=512)


def save_tiny_model(path, tokenizer_model, seed=1):
    """A random one-layer Mistral with the tiny tokenizer, saved as a Hugging Face directory; returns its path.
    No sliding window: a one-layer model with a window would see only the fixed tail of a long prompt."""
    from data.tokenizer import Tokenizer
    from model import Mistral, MistralConfig
    cfg = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                        max_position_embeddings=2048, dtype="float32")
    model = Mistral(cfg)
    model.init_weights(seed=seed)
    model.save_pretrained(path, tokenizer=Tokenizer(tokenizer_model))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "hf", tiny_tokenizer)


class ChatServer:
    """A local OpenAI-compatible server (POST {url}/chat/completions) in a daemon thread. Subclasses answer in
    respond(body, headers) -> (HTTP status, reply): a str reply is sent as a chat completion with
    finish_reason, a bytes reply as the raw body (errors, garbage). self.lock guards their bookkeeping."""

    def __init__(self):
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                assert self.path == "/v1/chat/completions"
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, reply, *finish = server.respond(body, self.headers)
                if isinstance(reply, str):
                    reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply},
                                                     "finish_reason": finish[0] if finish else "stop"}],
                                        "usage": {"completion_tokens": 5}}).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, body, headers):
        raise NotImplementedError


def kill_after_lines(cmd, part, lines, env=None, timeout=120):
    """Start `cmd` from the repo root, SIGKILL its process group once the part file `part` holds `lines` finished
    lines, and return how many it holds then: a resumable run's state after a hard kill."""
    e = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (os.path.exists(part) and open(part, "rb").read().count(b"\n") >= lines):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return open(part, "rb").read().count(b"\n")
