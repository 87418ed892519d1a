"""The benchmark files eval.py reads, in their reference tools' formats, each row checked and a bad one named:
FastChat's MT-Bench questions, answer files and judge prompts (judge_prompts.jsonl), alpaca_eval's instructions,
outputs files, per-instruction difficulty and annotator prompt files. Our own judge prompts sit beside this file.
"""

import os
import re
import string

import files

NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")   # MT-Bench categories judged with a reference answer

# -----------------------------------------------------------------------------
# MT-Bench (FastChat llm_judge)


def parse_question(row, _):
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    qid, cat, turns = row.get("question_id"), row.get("category"), row.get("turns")
    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
        raise ValueError(f"'question_id': expected an int or a string, got {qid!r:.40}")
    if not isinstance(cat, str):
        raise ValueError(f"'category': expected a string, got {cat!r:.40}")
    if not (isinstance(turns, list) and 1 <= len(turns) <= 2 and all(isinstance(t, str) and t.strip() for t in turns)):
        raise ValueError("'turns': expected a list of one or two non-empty strings")
    for t in turns:
        files.check_utf8(t, "turns")
    ref = row.get("reference")
    if ref is not None and not (isinstance(ref, list) and all(isinstance(t, str) for t in ref)):
        raise ValueError("'reference': expected a list of strings")
    return dict(question_id=qid, category=cat, turns=turns, reference=ref)


def read_answer_turns(path, field):
    """FastChat's answer file -> {question_id: (model_id, turns of choice 0)}; the last row of a question wins, as
    FastChat's load_model_answers has it."""
    out = {}
    for where, row, error in files.read_rows(path):
        try:
            if error:
                raise ValueError(error)
            turns = row["choices"][0]["turns"]
            if not all(isinstance(t, str) for t in turns):
                raise TypeError
            out[row["question_id"]] = (row.get("model_id"), turns)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"config {field}: {where}: not a FastChat answer row (question_id, choices[0].turns): "
                             f"{e}") from None
    return out


def read_judge_prompts(path, questions):
    """{name: FastChat judge-prompt row} for the prompts these questions need, their placeholders checked."""
    rows = {}
    for where, row, error in files.read_rows(path):
        if error or not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise ValueError(f"config judge_prompts: {where}: not a judge-prompt row ({error or 'no name'})")
        rows[row["name"]] = row
    needed = {}
    for q in questions:
        for turn in range(1, len(q["turns"]) + 1):
            name = prompt_name(q["category"], turn)
            needed[name] = set(template_fields(q["category"], turn))
    for name, fields in needed.items():
        if name not in rows:
            raise ValueError(f"config judge_prompts: {path} has no prompt named {name!r}")
        row = rows[name]
        for key in ("system_prompt", "prompt_template", "output_format"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"config judge_prompts: {path}: {name}: '{key}' missing or not a string")
        used = {f for _, f, _, _ in string.Formatter().parse(row["prompt_template"]) if f}
        if not used <= fields:
            raise ValueError(f"config judge_prompts: {path}: {name} uses {sorted(used - fields)}; it may use "
                             f"{sorted(fields)}")
    return rows


def prompt_name(category, turn):
    return ("single-math-v1" if category in NEED_REF_CATS else "single-v1") + ("-multi-turn" if turn == 2 else "")


def template_fields(category, turn):
    base = ["question", "answer"] if turn == 1 else ["question_1", "answer_1", "question_2", "answer_2"]
    refs = (["ref_answer_1"] if turn == 1 else ["ref_answer_1", "ref_answer_2"]) if category in NEED_REF_CATS else []
    return base + refs


# -----------------------------------------------------------------------------
# AlpacaEval (alpaca_eval)


def parse_instruction(row, name):
    if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
        raise ValueError("expected an object with a non-empty 'instruction' string")
    files.check_utf8(row["instruction"], "instruction")
    dataset = row.get("dataset") if isinstance(row.get("dataset"), str) else name
    return dict(instruction=row["instruction"], dataset=dataset)


def read_outputs(path, field):
    """alpaca_eval's outputs file -> {instruction: (output, generator)}; the first row of an instruction wins."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config {field}: {path} not found")
    out = {}
    for where, row, error in files.read_rows(path):
        if error or not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                or not isinstance(row.get("output"), str):
            raise ValueError(f"config {field}: {where}: expected an object with 'instruction' and 'output' strings"
                             + (f" ({error})" if error else ""))
        out.setdefault(row["instruction"], (row["output"], row.get("generator")))
    return out


def read_difficulty(path, instructions):
    """alpaca_eval's per-instruction difficulty -> one float per instruction, in order. Rows name their
    instruction by `instruction` text or by `index` (its 0-based row among the instructions read, as alpaca_eval's
    df_gamed.csv does; repeated rows of an index, one per model there, carry the same value)."""
    if path.endswith(".csv"):
        import csv
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        where = [f"{path} row {i + 2}" for i in range(len(rows))]
    else:
        rows, where = [], []
        for w, row, error in files.read_rows(path):
            if error:
                raise ValueError(f"config instruction_difficulty: {w}: {error}")
            rows.append(row)
            where.append(w)
    by_text, by_index = {}, {}
    for w, row in zip(where, rows):
        try:
            value = float(row["instruction_difficulty"])
            if row.get("instruction") not in (None, ""):
                by_text.setdefault(row["instruction"], value)
            else:
                by_index.setdefault(int(float(row["index"])), value)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"config instruction_difficulty: {w}: expected instruction_difficulty and an "
                             "instruction or index") from None
    out = []
    for x in instructions:
        value = by_text.get(x["instruction"], by_index.get(x["index"]))
        if value is None:
            raise ValueError(f"config instruction_difficulty: {path} has no difficulty for instruction "
                             f"{x['index']} ({x['instruction'][:60]!r})")
        out.append(value)
    return out


def read_prompt_file(path):
    """alpaca_eval's prompt file format -> [(role, template)]: <|im_start|>ROLE ... <|im_end|> blocks; a file
    without them is one user message."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"<\|im_start\|>(\w+)\s*\n(.*?)<\|im_end\|>", text, re.S)
    msgs = [(role, body.strip()) for role, body in blocks] or [("user", text.strip())]
    placeholders = set(re.findall(r"\{(instruction|output_1|output_2)\}", text))
    if placeholders != {"instruction", "output_1", "output_2"}:
        raise ValueError(f"config judge_prompt: {path} must contain {{instruction}}, {{output_1}} and {{output_2}}")
    return msgs
