"""
The function members of the tiny AI-feedback pool (run.sh tiny; docs/tiny.md "The AI-feedback pool").

UltraFeedback had each prompt answered by 4 models drawn from a pool of 17 of mixed quality (GPT-4, GPT-3.5,
LLaMA-2, Falcon, ...), none of them the student Zephyr then aligned. The tiny pool plays that: two local
models (the base model, an early dSFT checkpoint) and the three writers below, which feedback.py calls as
`data.tiny.pool:NAME` members with the chat messages (and a seed) and which return the answer text:

  teacher   the noisy teacher that wrote the dSFT dialogues, with the same noise (data/tiny/tasks.py): the
            role of GPT-3.5-turbo, which wrote UltraChat and sat in UltraFeedback's pool
  expert    the correct answer in the form asked for, never noisy: the strongest member, as GPT-4 was
  sloppy    the form asked for, with the answer a near miss (the second largest number, a count off by one,
            two items swapped, a word dropped): a fluent model that is often wrong

Runtime imports: the standard library only.
"""

import random

from data.tiny.tasks import parse_fields, parse_prompt, teacher_answer


def _prompt(messages):
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def teacher(messages, seed):
    task, template, answer = parse_prompt(_prompt(messages))  # ValueError for a prompt that is no tiny task
    return teacher_answer(dict(task=task, template=template, answer=answer), random.Random(seed))


def expert(messages):
    return parse_prompt(_prompt(messages))[2]


def near_miss(prompt):
    """The answer to a tiny-task prompt changed in one detail, in the form the prompt asks for; never correct."""
    task, template, fields = parse_fields(prompt)
    answer = parse_prompt(prompt)[2]
    if task == "max":
        below = [n for n in map(int, fields["nums"].split(", ")) if n < int(answer)]
        return str(max(below)) if below else str(int(answer) + 1)
    if task in ("count", "add", "sub"):
        return str(int(answer) + 1)
    if task == "upper":
        words = answer.split(" ")
        return " ".join(words[:-1]) if len(words) > 1 else answer[:-1] or "A"
    if task == "sort":
        items = answer.split(", ")
        for i in range(len(items) - 1):
            if items[i] != items[i + 1]:
                items[i], items[i + 1] = items[i + 1], items[i]
                return ", ".join(items)
        return ", ".join(items[:-1])  # all equal: one dropped
    return answer[1:] + answer[0] if len(set(answer)) > 1 else answer + answer[0]  # reverse


def sloppy(messages):
    return near_miss(_prompt(messages))
