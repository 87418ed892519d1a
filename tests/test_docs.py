"""The docs say what the code takes: every key of every preset and every flag written beside a stage in a command
line of README.md, docs/*.md, run.sh or BENCHMARKS.md is a field of that stage's Config; every preset named exists
and is handed to the stage its name says; README's docs/ index lists exactly the files in docs/; and every link
between the Markdown files reaches an existing file and heading. Pure text and dataclass fields: no training."""

import dataclasses
import glob
import importlib
import json
import os
import re
import shlex

import pytest

from conftest import ROOT

# Each command-line program that reads its Config through common.parse_config (chat.py through its own parse_args,
# which also takes `--key value`), by how it is written in a command line.
STAGES = {
    "sft.py": "sft",
    "dpo.py": "dpo",
    "feedback.py": "feedback",
    "eval.py": "eval",
    "chat.py": "chat",
    "data/ultrachat/generate.py": "data.ultrachat.generate",
}
# A preset's stage, from its file name (run.sh hands each preset to this stage; test_presets_go_to_their_stage).
PRESET_PREFIXES = {
    "sft_": "sft.py",
    "base_": "sft.py",      # the tiny base model is pre-trained by sft.py on `text` rows
    "dpo_": "dpo.py",
    "feedback_": "feedback.py",
    "eval_": "eval.py",
    "generate_": "data/ultrachat/generate.py",
}
# Flags a stage reads before parse_config, with where they are documented: --memplan=WORLD,GPU_GB[,MODEL] prints the
# memory plan and exits (docs/memory.md).
EXTRA_FLAGS = {"sft.py": {"memplan"}, "dpo.py": {"memplan"}}
# chat.py takes `--key value` as well as `--key=value`, and -h/--help.
SPACE_SEPARATED = {"chat.py"}


def doc_files():
    return ["README.md", "BENCHMARKS.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def config_fields(script):
    module = importlib.import_module(STAGES[script])
    return {f.name for f in dataclasses.fields(module.Config)}


def preset_stage(name):
    """The stage script of config/NAME (a file name), or None when no prefix claims it."""
    return next((s for prefix, s in PRESET_PREFIXES.items() if name.startswith(prefix)), None)


FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def split_markdown(text):
    """(code blocks, the text outside them)."""
    return FENCE.findall(text), FENCE.sub("", text)


def command_lines(text, shell=False):
    """Command lines of a Markdown text (its code blocks, and inline code spans outside them) or of a shell script:
    lines with their backslash continuations joined."""
    if shell:
        chunks = [text]
    else:
        blocks, prose = split_markdown(text)
        chunks = blocks + [m.group(1) for m in re.finditer(r"`([^`]+)`", prose)]
    lines = []
    for chunk in chunks:
        lines += re.sub(r"\\\n\s*", " ", chunk).split("\n")
    return lines


def stage_flags(line):
    """[(script, flag, raw token)] for each --flag written after a stage script in one command line."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose-like code: plain words are enough to find flags
        tokens = line.split()
    out, script, i = [], None, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in STAGES:
            script = tok
        elif tok in ("|", ";", "&&", "||", ">", "2>&1") or tok.endswith(".py"):
            script = None  # another program's arguments from here
        elif script and tok.startswith("--") and len(tok) > 2:
            key, eq, _ = tok[2:].partition("=")
            out.append((script, key, tok))
            if not eq and script in SPACE_SEPARATED and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                i += 1  # chat.py's `--key value`
        i += 1
    return out


def documented_flags():
    """{(file, script, flag token)} for every stage flag in the docs' and run.sh's command lines."""
    found = []
    for rel in doc_files() + ["run.sh"]:
        for line in command_lines(read(rel), shell=rel.endswith(".sh")):
            found += [(rel, script, key, tok) for script, key, tok in stage_flags(line)]
    return found


# -----------------------------------------------------------------------------
# Presets


def test_every_preset_key_is_a_field_of_its_stage_config():
    presets = sorted(glob.glob(f"{ROOT}/config/*.json"))
    assert presets
    bad = []
    for path in presets:
        name = os.path.basename(path)
        script = preset_stage(name)
        assert script, f"config/{name}: no stage claims this name (PRESET_PREFIXES in {__file__})"
        fields = config_fields(script)
        with open(path) as f:
            keys = [k for k in json.load(f) if not k.startswith("_")]
        bad += [f"config/{name}: {k!r} is no field of {script}'s Config" for k in keys if k not in fields]
    assert not bad, "\n".join(bad)


def test_presets_go_to_their_stage():
    # Where a command line hands a preset to a script, it is the script the preset's name says; run.sh's
    # feedback_pairs() hands its first argument to feedback.py.
    seen, bad = 0, []
    for rel in doc_files() + ["run.sh"]:
        for line in command_lines(read(rel), shell=rel.endswith(".sh")):
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                tokens = line.split()
            script = None
            for tok in tokens:
                if tok in STAGES or tok == "memplan.py":
                    script = tok
                elif tok == "feedback_pairs":
                    script = "feedback.py"
                elif tok.endswith(".py"):
                    script = None
                m = re.fullmatch(r"config/([\w.-]+\.json)", tok)
                if m and script and script != "memplan.py":
                    seen += 1
                    if preset_stage(m.group(1)) != script:
                        bad.append(f"{rel}: {tok} handed to {script}: {line.strip()[:100]}")
    assert seen >= 10, seen  # run.sh alone hands over every tiny preset
    assert not bad, "\n".join(bad)


def test_every_named_preset_exists():
    names = set()
    for rel in doc_files() + ["run.sh"]:
        text = read(rel)
        names |= {(rel, n) for n in re.findall(r"config/([\w.-]+\.json)(?!\w)", text)}
        # Presets named without their directory, as `dpo_tiny.json`.
        prefixes = "|".join(p.rstrip("_") for p in PRESET_PREFIXES)
        names |= {(rel, n) for n in re.findall(rf"(?<![\w/.-])((?:{prefixes})_[\w-]+\.json)(?!\w)", text)}
    assert len(names) >= 10
    missing = sorted(f"{rel}: config/{n}" for rel, n in names if not os.path.exists(f"{ROOT}/config/{n}"))
    assert not missing, "named but not in config/:\n" + "\n".join(missing)


# -----------------------------------------------------------------------------
# Flags


def test_every_documented_flag_is_a_field_of_its_stage_config():
    flags = documented_flags()
    scripts = {script for _, script, _, _ in flags}
    assert {"sft.py", "dpo.py", "feedback.py", "eval.py"} <= scripts, scripts  # the parser finds each stage's flags
    fields = {script: config_fields(script) | EXTRA_FLAGS.get(script, set()) for script in scripts}
    bad = [f"{rel}: {script} {tok}: {key!r} is no field of its Config"
           for rel, script, key, tok in flags if key not in fields[script] and key != "help"]
    assert not bad, "\n".join(bad)


def test_parse_config_stages_are_given_key_equals_value():
    # common.parse_config refuses `--key value` ("expected --key=value"); only chat.py rewrites it.
    bad = [f"{rel}: {script} {tok}" for rel, script, key, tok in documented_flags()
           if script not in SPACE_SEPARATED and "=" not in tok and key != "help"]
    assert not bad, "\n".join(bad)


def test_flag_parser_reads_command_lines():
    # The extraction the two tests above rely on, on lines of the shapes the docs use.
    line = ('TRITON_INTERPRET=1 torchrun --nproc_per_node=2 sft.py config/sft_tiny.json --seq_len=64 --lr=1e-3 '
            '# --not_a_flag=1')
    assert stage_flags(line) == [("sft.py", "seq_len", "--seq_len=64"), ("sft.py", "lr", "--lr=1e-3")]
    assert stage_flags('python chat.py "http://x/v1|model=z" --prompt "a b" --temperature 0') == [
        ("chat.py", "prompt", "--prompt"), ("chat.py", "temperature", "--temperature")]
    assert stage_flags("python data/ultrachat/prepare.py --out x && python eval.py --bench=mt_bench") == [
        ("eval.py", "bench", "--bench=mt_bench")]
    md = "text `dpo.py --packing=false` text\n```bash\npython sft.py \\\n    --lr=2e-4 ...\n```\n"
    assert [stage_flags(x) for x in command_lines(md) if stage_flags(x)] == [
        [("sft.py", "lr", "--lr=2e-4")], [("dpo.py", "packing", "--packing=false")]]


# -----------------------------------------------------------------------------
# docs/ and links


def test_readme_links_every_docs_file_and_only_existing_ones():
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", read("README.md")))
    present = {os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md")}
    assert present, "docs/ holds no Markdown file"
    assert not linked - present, f"README links missing files: {sorted(linked - present)}"
    assert not present - linked, f"docs/ files the README does not link: {sorted(present - linked)}"


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_markdown_links_reach_files_and_headings():
    bad, anchors = [], {}
    for rel in doc_files():
        _, prose = split_markdown(read(rel))
        anchors[rel] = {slug(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}
    for rel in doc_files():
        _, prose = split_markdown(read(rel))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
            if not os.path.exists(os.path.join(ROOT, dest)):
                bad.append(f"{rel}: ({target}): no file {dest}")
            elif anchor and dest.endswith(".md") and anchor not in anchors.get(dest, set()):
                bad.append(f"{rel}: ({target}): no heading #{anchor} in {dest}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("heading, anchor", [
    ("Running the 7B recipe on GPUs", "running-the-7b-recipe-on-gpus"),
    ("Packed DPO (issue 27)", "packed-dpo-issue-27"),
    ("Checkpoints, run directories and resume", "checkpoints-run-directories-and-resume"),
    ("`docs/`", "docs"),
])
def test_slug_is_githubs(heading, anchor):
    assert slug(heading) == anchor
