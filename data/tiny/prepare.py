"""
Write the tiny pipeline's data for one seed, in the public datasets' schemas, and train its tokenizer:

    base_train.jsonl, base_test.jsonl plain-text rows {"text"} for pre-training the base model: task prompts of
                                      every wording with their correct answers, and other text of the
                                      generator, without the chat template (the "web text" of the task world)
    sft_train.jsonl, sft_test.jsonl   ultrachat_200k rows: prompt, prompt_id, messages (user, teacher answer)
    feedback_prompts.jsonl            UltraFeedback-style prompts: instruction, source ("tiny/<task>"), prompt_id
    eval_prompts.jsonl                held-out prompts, same fields
    tokenizer.model                   a small BPE vocabulary trained on the rendered SFT chats
    tiny.json                         the arguments, the counts and the teacher's measured noise, written last

    python data/tiny/prepare.py --out out/tiny/data --seed 0

Everything is a function of the seed and the sizes, and takes seconds, so only the generator and a small
sample (data/tiny/sample.jsonl, `--sample PATH` rewrites it) are committed. Default sizes follow
TINY.md: ~70k SFT examples (1,100 steps of batch 64), 2,000 feedback prompts, 500 evaluation prompts.

The four prompt sets are disjoint. Evaluation prompts are drawn first and every later set skips them, so
the evaluation set is an unbiased sample of the task distribution that the model never saw; the SFT
training set may repeat a prompt, with the teacher's answers drawn independently, as real data does.
Each set has its own random stream, so changing one size leaves the prompts of the sets before it as
they were (eval, then feedback, then SFT test, then SFT train, then base).

The base text is clean: the teacher's noise (disclaimers, refusals, format slips) is what the distillation
data adds, as UltraChat's assistant turns added it to a base model that had not learnt it from the web.

Runtime imports: the standard library, and data/ (sentencepiece for the tokenizer).
"""

import argparse
import collections
import hashlib
import json
import os
import random
import string
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.tiny.tasks import (CORE_TASKS, DISCLAIMER, EXTRA_TASKS, REFUSAL, SLIP_SENTENCE, TEMPLATES,  # noqa: E402
                             WORDS, classify, make_task, teacher_answer)
from data.tokenizer import EOS, render_chat, train_tokenizer  # noqa: E402
from files import atomic_write, write_jsonl  # noqa: E402

# SFT mixture: the core tasks share 90%, the extra tasks (add, sub, reverse) 10%. The model stays near 0%
# on the extras in budget, so they are there for variety, at a weight that costs the core tasks little.
SFT_WEIGHTS = {**{t: 0.9 / len(CORE_TASKS) for t in CORE_TASKS}, **{t: 0.1 / len(EXTRA_TASKS) for t in EXTRA_TASKS}}
SAMPLE_ROWS = 48
TOKENIZER_ROWS = 10_000


def prompt_id(prompt):
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()  # as ultrachat_200k's prompt_id


def _rng(seed, stream):
    return random.Random(f"tiny/{seed}/{stream}")  # str seeds go through sha512: stable across runs


def draw_prompts(rng, n, exclude):
    """n distinct core-task dicts whose prompts are not in `exclude` (a set, extended in place)."""
    tasks = []
    while len(tasks) < n:
        task = make_task(rng)
        if task["prompt"] not in exclude:
            exclude.add(task["prompt"])
            tasks.append(task)
    return tasks


def draw_sft(rng, n, exclude):
    """n (task, teacher answer) pairs from the SFT mixture, prompts not in `exclude`; repeats allowed."""
    names, weights = list(SFT_WEIGHTS), list(SFT_WEIGHTS.values())
    examples = []
    while len(examples) < n:
        task = make_task(rng, rng.choices(names, weights)[0])
        if task["prompt"] not in exclude:
            examples.append((task, teacher_answer(task, rng)))
    return examples


def base_document(rng, exclude):
    """
    One plain-text document of the task world: 1-4 passages separated by a blank line, each a prompt of the
    SFT mixture (any wording, not in `exclude`) on one line and its correct answer on the next, or, one time
    in four, other text the generator writes (a list of words and the same words in capitals, sorted, or a
    word and its letters counted). No chat template, no noise.
    """
    names, weights = list(SFT_WEIGHTS), list(SFT_WEIGHTS.values())
    passages = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.25:
            words = rng.sample(WORDS, rng.randint(2, 4))
            kind = rng.randrange(3)
            if kind == 0:
                passages.append(f"{' '.join(words)}\n{' '.join(words).upper()}")
            elif kind == 1:
                passages.append(f"{', '.join(words)}\n{', '.join(sorted(words))}")
            else:
                passages.append(f"{words[0]}: {len(words[0])} letters, {len(set(words[0]))} different")
            continue
        task = make_task(rng, rng.choices(names, weights)[0])
        while task["prompt"] in exclude:
            task = make_task(rng, task["task"])
        passages.append(f"{task['prompt']}\n{task['answer']}")
    return {"text": "\n\n".join(passages)}


def sft_row(task, answer):
    messages = [{"role": "user", "content": task["prompt"]}, {"role": "assistant", "content": answer}]
    return {"prompt": task["prompt"], "prompt_id": prompt_id(task["prompt"]), "messages": messages}


def prompt_row(task):
    return {"instruction": task["prompt"], "source": f"tiny/{task['task']}", "prompt_id": prompt_id(task["prompt"])}


def generate(seed, n_sft=70_000, n_sft_test=1_000, n_feedback=2_000, n_eval=500, n_base=0, n_base_test=0):
    """The sets, in the order that makes them disjoint: dict name -> list of rows. The base text skips the
    evaluation, feedback and SFT test prompts (it may share prompts with the SFT training set, as a web crawl
    and a distillation set may)."""
    seen = set()
    eval_tasks = draw_prompts(_rng(seed, "eval"), n_eval, seen)
    feedback_tasks = draw_prompts(_rng(seed, "feedback"), n_feedback, seen)
    sft_test = draw_sft(_rng(seed, "sft_test"), n_sft_test, seen)
    seen.update(task["prompt"] for task, _ in sft_test)
    sft_train = draw_sft(_rng(seed, "sft_train"), n_sft, seen)
    rng = _rng(seed, "base_test")
    base_test = [base_document(rng, seen) for _ in range(n_base_test)]
    rng = _rng(seed, "base_train")
    base_train = [base_document(rng, seen) for _ in range(n_base)]
    return {"eval": eval_tasks, "feedback": feedback_tasks, "sft_test": sft_test, "sft_train": sft_train,
            "base_test": base_test, "base_train": base_train}


def tokenizer_texts(rows):
    """
    The rendered chats as the tokenizer will see them. At encode time Tokenizer splits </s> out before
    sentencepiece sees the text, so it is cut out here too rather than spending merges on '</', 's>'.
    One line holds every character the generator can write, so that each gets a piece however few
    rows there are (a 'Q' is rare), rather than leaving it to byte fallback.
    """
    wordings = "".join(t for ts in TEMPLATES.values() for t in ts)
    chars = set(string.ascii_letters + string.digits + wordings + DISCLAIMER + REFUSAL + SLIP_SENTENCE)
    yield "".join(sorted(chars - set("{}")))
    for row in rows:
        yield render_chat(row["messages"]).replace(EOS, "\n")


def noise_report(examples):
    """Teacher answers by kind, overall and on the first wording, as fractions."""
    report = {}
    for name, subset in (("all", examples), ("first_template", [e for e in examples if e[0]["template"] == 0]),
                         ("other_templates", [e for e in examples if e[0]["template"] != 0])):
        kinds = collections.Counter(classify(task["prompt"], answer) for task, answer in subset)
        report[name] = {k: round(v / max(len(subset), 1), 4) for k, v in sorted(kinds.items())}
    return report


def write_all(out_dir, seed, n_sft=70_000, n_sft_test=1_000, n_feedback=2_000, n_eval=500, vocab_size=512,
              n_base=0, n_base_test=500):
    os.makedirs(out_dir, exist_ok=True)
    sets = generate(seed, n_sft, n_sft_test, n_feedback, n_eval, n_base, n_base_test if n_base else 0)
    if n_base:
        write_jsonl(os.path.join(out_dir, "base_train.jsonl"), sets["base_train"])
        write_jsonl(os.path.join(out_dir, "base_test.jsonl"), sets["base_test"])
    sft_train = [sft_row(*e) for e in sets["sft_train"]]
    write_jsonl(os.path.join(out_dir, "sft_train.jsonl"), sft_train)
    write_jsonl(os.path.join(out_dir, "sft_test.jsonl"), [sft_row(*e) for e in sets["sft_test"]])
    write_jsonl(os.path.join(out_dir, "feedback_prompts.jsonl"), [prompt_row(t) for t in sets["feedback"]])
    write_jsonl(os.path.join(out_dir, "eval_prompts.jsonl"), [prompt_row(t) for t in sets["eval"]])
    # 259 of the pieces are <unk>, <s>, </s> and the 256 bytes; the ~75 characters take a piece each
    # (tokenizer_texts) and the remaining ~180 are merges, mostly the wordings' words and the chat
    # markers. 10k rows give nearly the same merges as 70k (16 of 253 pieces differ) in a sixth of the time.
    train_tokenizer(tokenizer_texts(sft_train[:TOKENIZER_ROWS]), os.path.join(out_dir, "tokenizer"), vocab_size)
    meta = {
        "seed": seed, "n_sft": n_sft, "n_sft_test": n_sft_test, "n_feedback": n_feedback, "n_eval": n_eval,
        "n_base": n_base, "n_base_test": n_base_test if n_base else 0,
        "vocab_size": vocab_size, "sft_weights": SFT_WEIGHTS,
        "judge": "data.tiny.tasks:judge",
        "teacher_noise_sft_train": noise_report(sets["sft_train"]),
    }
    # Written last: its presence marks a complete directory.
    atomic_write(os.path.join(out_dir, "tiny.json"), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def write_sample(path, seed=0, n=SAMPLE_ROWS):
    """The first n SFT training rows for `seed` at the default sizes (the committed sample for readers)."""
    rows = [sft_row(*e) for e in generate(seed, n_sft=n)["sft_train"]]
    write_jsonl(path, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_sft", type=int, default=70_000)
    p.add_argument("--n_sft_test", type=int, default=1_000)
    p.add_argument("--n_feedback", type=int, default=2_000)
    p.add_argument("--n_eval", type=int, default=500)
    p.add_argument("--n_base", type=int, default=0, help="plain-text documents for the base model (0: none)")
    p.add_argument("--n_base_test", type=int, default=500)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--sample", metavar="PATH", help="write the committed sample to PATH instead")
    args = p.parse_args(argv)
    if args.sample:
        write_sample(args.sample, args.seed)
        return
    if not args.out:
        p.error("--out is required (or --sample PATH)")
    meta = write_all(args.out, args.seed, args.n_sft, args.n_sft_test, args.n_feedback, args.n_eval, args.vocab_size,
                     args.n_base, args.n_base_test)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
