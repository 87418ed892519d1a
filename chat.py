"""Talk to an exported model in a terminal, as a user would right after run.sh.

    python chat.py out/tiny/dpo/hf                                  # multi-turn; /reset, /exit
    python chat.py out/tiny/dpo/hf --system "You are terse." --temperature 0
    python chat.py out/tiny/dpo/hf --prompt "Name a prime number."   # one answer on stdout, then exit
    python chat.py "http://localhost:8000/v1|model=zephyr|key_env=API_KEY" --prompt "Hi"   # e.g. vLLM

The model is what feedback.py takes (generation.parse_spec): an exported Hugging Face directory, run here with
model.py, or an OpenAI-compatible chat-completions endpoint. A local model sees exactly the ids it was trained
on: Tokenizer.encode_chat, the exported chat template's tokens (tests/test_tokenizer.py). Its answer is
streamed token by token; an endpoint's arrives whole. Flags take --key=value or --key value.
"""

import sys
from dataclasses import dataclass

import torch

import common
import generation


@dataclass
class Config:
    model: str = ""                   # PATH (exported HF directory) | URL|model=NAME|key_env=VAR
    system: str = ""                  # a system prompt, kept across /reset
    prompt: str = ""                  # one-shot: answer this, print the answer, exit
    temperature: float = 0.7          # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0                     # local sampling: the session's answers are reproducible
    dtype: str = "auto"               # local: auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    request_timeout: float = 120.0    # endpoint: seconds per HTTP request, attempts, backoff (as feedback.py)
    max_attempts: int = 3
    backoff_s: float = 1.0
    concurrency: int = 1


def parse_args(argv):
    """`MODEL [--key=value | --key value ...]` -> Config; the model may also come as --model."""
    flags = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if not arg.startswith("--"):
            flags.append(f"--model={arg}")
        elif "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags.append(f"{arg}={argv[i + 1]}")
            i += 1
        else:
            flags.append(arg)
        i += 1
    cfg = common.parse_config(Config, flags)
    if not cfg.model:
        raise ValueError("command line: name a model: python chat.py PATH|URL|model=NAME [--prompt TEXT]")
    if cfg.max_new_tokens < 1 or cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"config: need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got "
                         f"{cfg.max_new_tokens}, {cfg.temperature}, {cfg.top_p}")
    generation.check_dtype(cfg)
    return cfg


class Streamer:
    """Prints a row's text as its ids arrive. The text is decoded whole each time (the tokenizer's decode drops
    the dummy-prefix space and joins byte-fallback pieces), and only what is new is written; a text ending in
    U+FFFD is an incomplete UTF-8 character, held back until its next byte arrives."""

    def __init__(self, tok, out):
        self.tok, self.out, self.ids, self.shown = tok, out, [], ""

    def __call__(self, new):
        if new[0] is None or new[0] == self.tok.eos_id:
            return
        self.ids.append(new[0])
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self, text):
        """Write whatever of the final `text` is not shown yet (held-back bytes)."""
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        self.out.flush()


class Chat:
    """One model, local or endpoint; answer(messages) -> (text, finish_reason), streamed to `out` when local."""

    def __init__(self, cfg):
        spec = generation.parse_spec(cfg.model, "model")
        if spec["kind"] == "function":
            raise ValueError(f"config model: {cfg.model!r}: a local directory or an endpoint, not module:function")
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        d = common.Dist(0, 1, 0, torch.device(device))  # no process group: nothing here is distributed
        self.cfg, self.client = cfg, generation.load_client(spec, cfg, d, {})
        self.local = isinstance(self.client, generation.LocalModel)
        if self.local:
            self.generator = torch.Generator(device=d.device).manual_seed(cfg.seed)

    def answer(self, messages, out):
        cfg = self.cfg
        if not self.local:
            r = self.client.chat(messages, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
            if r["error"]:
                raise RuntimeError(f"{cfg.model}: {r['error']}")
            out.write(r["text"])
            out.flush()
            return r["text"], r["finish_reason"]
        tok, model = self.client.tok, self.client.model
        ids = tok.encode_chat(messages, add_generation_prompt=True)[0]
        if len(ids) + cfg.max_new_tokens > self.client.max_len:
            raise ValueError(f"the conversation is {len(ids)} tokens; with max_new_tokens={cfg.max_new_tokens} it "
                             f"exceeds the model's {self.client.max_len} (max_position_embeddings): /reset")
        stream = Streamer(tok, out)
        row = model.generate([ids], cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p if cfg.top_p < 1.0 else None, generator=self.generator,
                             eos_id=tok.eos_id, pad_id=tok.pad_id, on_token=stream)[0]
        stop = bool(row) and row[-1] == tok.eos_id
        text = tok.decode(row[:-1] if stop else row)
        stream.finish(text)
        return text, "stop" if stop else "length"


def main(argv):
    cfg = parse_args(argv)
    chat = Chat(cfg)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    if cfg.prompt:
        text, finish = chat.answer(start + [{"role": "user", "content": cfg.prompt}], sys.stdout)
        sys.stdout.write("\n")
        if finish == "length":
            print(f"[stopped at max_new_tokens={cfg.max_new_tokens}]", file=sys.stderr)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {cfg.model}; /reset starts over, /exit (or Ctrl-D) ends", file=sys.stderr)
    messages = list(start)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(start)
            print("[conversation reset]", file=sys.stderr)
            continue
        if not command:
            continue
        sys.stdout.write("model> ")
        try:
            text, finish = chat.answer(messages + [{"role": "user", "content": line}], sys.stdout)
        except (ValueError, RuntimeError) as e:
            print(f"\n[{e}]", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        if finish == "length":
            print(f"[stopped at max_new_tokens={cfg.max_new_tokens}]", file=sys.stderr)
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
        print(f"chat.py: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
