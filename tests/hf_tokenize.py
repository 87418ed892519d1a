"""
Run inside a venv holding one transformers version (and no torch): load tokenizer directories with
AutoTokenizer, as a user serving an exported model would, and print the ids they give as JSON.

    python hf_tokenize.py < request.json > reply.json

request: {"dirs": [...], "texts": [...], "chats": [[messages, add_generation_prompt], ...]}
reply:   {"transformers": version, "tokenizers": version,
          "results": {dir: {"class": name, "texts": [ids], "templated": [ids], "rendered": [text],
                            "render_encoded": [ids]}}}
texts: tokenizer(text)["input_ids"] (BOS added by the tokenizer); templated: apply_chat_template(tokenize=True),
what transformers' generate pipelines feed the model; render_encoded: the template rendered to text, then
encoded with add_special_tokens=False, what vLLM's chat server does.
Standard library and transformers only, so it runs in any of the test venvs.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import tokenizers  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()


def main():
    request = json.load(sys.stdin)
    results = {}
    for directory in request["dirs"]:
        tok = transformers.AutoTokenizer.from_pretrained(directory)
        out = {"class": type(tok).__name__, "texts": [tok(t)["input_ids"] for t in request["texts"]],
               "templated": [], "rendered": [], "render_encoded": []}
        for messages, add_generation_prompt in request["chats"]:
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          return_dict=False)
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            out["templated"].append([int(i) for i in ids])
            out["rendered"].append(text)
            out["render_encoded"].append(tok(text, add_special_tokens=False)["input_ids"])
        results[directory] = out
    json.dump({"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
               "results": results}, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
