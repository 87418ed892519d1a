"""
Tiny instruction-following tasks whose answers code can check, the noisy teacher that writes the SFT
answers, and the judge that scores any answer from the prompt text alone.

Why a noisy teacher (TINY.md): with a clean teacher, DPO on the model's own samples had nothing to fix
and showed nothing. UltraChat's assistant turns carried disclaimers and format slips, which is what
Zephyr's feedback step learns to drop, so the teacher here makes those mistakes too, keyed to the prompt
wording: the first wording of each task is answered badly most of the time, always in the same way, so
SFT learns the habit and greedy decoding reproduces it; the other wordings are answered badly now and
then. The judge prefers clean answers; the chosen/rejected pairs built from it teach the model to drop
the habit. The gain this buys is intent alignment (noise removed), not new capability.

Tasks: max, upper, count and sort are CORE_TASKS, the ones the ~1M-parameter model learns partially in
the CPU budget; feedback and evaluation prompts use only these. add, sub and reverse are EXTRA_TASKS:
the model stays near 0% on them (TINY.md), so they would only add prompts where every sample is wrong
and no pair can be formed. They give the SFT data some variety at a low weight (data/tiny/prepare.py).

Runtime imports: the standard library only.
"""

import re
import string

# -----------------------------------------------------------------------------
# The teacher's noise. Constants from the prototype that worked (TINY.md).

P_NOISE_FIRST = 0.8       # first wording of a task: noisy this often, always with the task's own kind
P_NOISE_OTHER = 0.15      # every other wording: noisy this often, the kind drawn at random
P_FIRST_TEMPLATE = 0.46   # share of prompts in the first wording: 0.46*0.8 + 0.54*0.15 = 0.45 noisy
                          # overall, as in the prototype (a uniform draw over 4 wordings gives only 0.31)
NOISE_KINDS = ("disclaimer", "refusal", "format_slip")
FIRST_TEMPLATE_NOISE = {  # each noise kind is the habit of at least one core task
    "max": "format_slip", "upper": "format_slip", "count": "disclaimer", "sort": "refusal",
    "add": "disclaimer", "sub": "format_slip", "reverse": "refusal",
}

DISCLAIMER = "As an AI, I cannot be sure, but "   # + the answer
REFUSAL = "I'm sorry, I can't help with that."
SLIP_SENTENCE = "The answer is {}."                 # where a bare answer was asked
# A slip in an uppercase task is the text in lower case instead (see noisy_answer).

# -----------------------------------------------------------------------------
# Wordings. Fields: nums (comma-separated integers), text (lowercase words), letter, word, words, a, b.
# Every prompt matches exactly one wording (tests check it), which is how the judge finds the task.

TEMPLATES = {
    "max": [
        "What is the largest number in this list: {nums}?",
        "Find the maximum of {nums}.",
        "Which of these numbers is the biggest? {nums}",
        "Give the largest of the numbers {nums}.",
    ],
    "upper": [
        "Write this in capital letters: {text}",
        "Convert to upper case: {text}",
        "Rewrite in all caps: {text}",
        "Make this uppercase: {text}",
    ],
    "count": [
        "How many times does the letter {letter} appear in {word}?",
        "Count how often {letter} occurs in the word {word}.",
        "How many {letter}'s are there in {word}?",
        "In {word}, how many times do you see the letter {letter}?",
    ],
    "sort": [
        "Sort these numbers in ascending order: {nums}",
        "Arrange from smallest to largest: {nums}",
        "Put these words in alphabetical order: {words}",
        "Sort from largest to smallest: {nums}",
    ],
    "add": [
        "What is {a} + {b}?",
        "Add {a} and {b}.",
        "Compute the sum of {a} and {b}.",
    ],
    "sub": [
        "What is {a} - {b}?",
        "Subtract {b} from {a}.",
        "Compute {a} minus {b}.",
    ],
    "reverse": [
        "Spell {word} backwards.",
        "Reverse the letters of {word}.",
        "Write {word} in reverse order.",
    ],
}
CORE_TASKS = ("max", "upper", "count", "sort")
EXTRA_TASKS = ("add", "sub", "reverse")
SORT_DESCENDING = {("sort", 3)}  # the one wording that asks for largest first

# Short common words, lowercase a-z only (the judge's field patterns rely on that).
WORDS = """
apple bread chair cloud dance eagle field grape house juice knife lemon money night ocean paper queen
river snake table uncle voice water youth zebra angle beach candy dream earth flame ghost heart island
jelly koala light mango nurse olive piano quiet robot sugar tiger umbrella vivid whale yacht amber
basket cactus dinner engine forest garden hammer insect jacket kitten ladder marble needle orange
pepper rabbit saddle ticket violin window yellow bottle circle doctor finger guitar helmet jungle
lizard mirror noodle parrot rocket silver tomato velvet wagon acorn bench coral daisy ember frost
glove honey ivory jewel kayak lotus maple north otter pearl quilt raven stone tulip vapor wheat
blue green red black white pink brown gray small big tall short fast slow warm cold soft loud
happy sunny windy rainy early late sweet sour fresh brave calm eager gentle proud wise
cat dog cow pig fox owl bee ant hen elk bat yak sun moon star sea sky map cup hat pen box key
""".split()
LETTERS = string.ascii_lowercase

# -----------------------------------------------------------------------------
# Generation: fields to fill a wording, and the correct answer computed from the values themselves
# (not from the prompt text, so the judge's parsing is checked against an independent answer).


def _numbers(rng):
    return [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]


def _join(items):
    return ", ".join(str(x) for x in items)


def _generate(task, template, rng):
    """(fields, correct answer) for one task in one wording."""
    if task == "max":
        nums = _numbers(rng)
        return {"nums": _join(nums)}, str(max(nums))
    if task == "upper":
        text = " ".join(rng.sample(WORDS, rng.randint(2, 3)))
        return {"text": text}, text.upper()
    if task == "count":
        # Choose the count first (0-3, uniformly) and build a random string around it: in real words
        # most letters occur once, and "1" would be a good guess.
        letter = rng.choice(LETTERS)
        n = rng.randint(4, 8)
        k = rng.randint(0, 3)
        chars = [letter] * k + [rng.choice(LETTERS.replace(letter, "")) for _ in range(n - k)]
        rng.shuffle(chars)
        return {"letter": letter, "word": "".join(chars)}, str(k)
    if task == "sort":
        if "{words}" in TEMPLATES[task][template]:
            words = rng.sample(WORDS, rng.randint(3, 5))
            return {"words": _join(words)}, _join(sorted(words))
        nums = _numbers(rng)
        return {"nums": _join(nums)}, _join(sorted(nums, reverse=(task, template) in SORT_DESCENDING))
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return {"a": a, "b": b}, str(a + b)
    if task == "sub":
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)  # no negative answers
        return {"a": a, "b": b}, str(a - b)
    if task == "reverse":
        word = rng.choice(WORDS)
        return {"word": word}, word[::-1]
    raise ValueError(f"task: expected one of {tuple(TEMPLATES)}, got {task!r}")


def make_task(rng, task=None):
    """
    One task: dict(task, template, prompt, answer) with the correct answer. rng: a random.Random.
    task: a name from TEMPLATES, or None for a core task drawn uniformly. The first wording is drawn
    with probability P_FIRST_TEMPLATE, the others uniformly.
    """
    if task is None:
        task = rng.choice(CORE_TASKS)
    n_templates = len(TEMPLATES[task])
    template = 0 if rng.random() < P_FIRST_TEMPLATE else rng.randint(1, n_templates - 1)
    fields, answer = _generate(task, template, rng)
    return dict(task=task, template=template, prompt=TEMPLATES[task][template].format(**fields), answer=answer)


def noisy_answer(task, kind):
    """The correct answer of `task` (a make_task dict) spoiled in the way `kind` names."""
    if kind == "disclaimer":
        return DISCLAIMER + task["answer"]
    if kind == "refusal":
        return REFUSAL
    if kind == "format_slip":
        if task["task"] == "upper":
            return task["answer"].lower()  # capitals were asked for
        return SLIP_SENTENCE.format(task["answer"])  # a bare answer was asked for
    raise ValueError(f"kind: expected one of {NOISE_KINDS}, got {kind!r}")


def teacher_answer(task, rng):
    """What the noisy teacher writes for `task` (a make_task dict); see the constants at the top."""
    first = task["template"] == 0
    if rng.random() >= (P_NOISE_FIRST if first else P_NOISE_OTHER):
        return task["answer"]
    kind = FIRST_TEMPLATE_NOISE[task["task"]] if first else rng.choice(NOISE_KINDS)
    return noisy_answer(task, kind)


# -----------------------------------------------------------------------------
# Parsing a prompt back into its task. Each wording becomes a regular expression whose fields only
# match what the generator puts there, so that no prompt matches two wordings.

FIELD_PATTERNS = {
    "nums": r"\d+(?:, \d+)*",
    "text": r"[a-z]+(?: [a-z]+)*",
    "letter": r"[a-z]",
    "word": r"[a-z]+",
    "words": r"[a-z]+(?:, [a-z]+)*",
    "a": r"\d+",
    "b": r"\d+",
}


def _template_regex(template):
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"(?P<{field}>{FIELD_PATTERNS[field]})")
    return re.compile("".join(parts))


# (task, template, literal text before the first field: a cheap test before the regex, regex)
PARSERS = [(task, i, t[:t.index("{")], _template_regex(t)) for task, ts in TEMPLATES.items() for i, t in enumerate(ts)]


def _solve(task, template, f):
    """The correct answer from the parsed fields `f` (strings)."""
    if task == "max":
        return str(max(int(x) for x in f["nums"].split(", ")))
    if task == "upper":
        return f["text"].upper()
    if task == "count":
        return str(f["word"].count(f["letter"]))
    if task == "sort":
        if "words" in f:
            return _join(sorted(f["words"].split(", ")))
        nums = sorted((int(x) for x in f["nums"].split(", ")), reverse=(task, template) in SORT_DESCENDING)
        return _join(nums)
    if task == "add":
        return str(int(f["a"]) + int(f["b"]))
    if task == "sub":
        return str(int(f["a"]) - int(f["b"]))
    if task == "reverse":
        return f["word"][::-1]
    raise AssertionError(task)


def parse_fields(prompt):
    """(task, template, fields as strings) of a prompt make_task can write; ValueError for any other."""
    text = prompt.strip()
    for task, template, prefix, regex in PARSERS:
        m = text.startswith(prefix) and regex.fullmatch(text)
        if m:
            return task, template, m.groupdict()
    raise ValueError(f"prompt: not one of the tiny task wordings: {prompt!r:.100}")


def parse_prompt(prompt):
    """(task, template, correct answer) of a prompt make_task can write; ValueError for any other."""
    task, template, fields = parse_fields(prompt)
    return task, template, _solve(task, template, fields)


# -----------------------------------------------------------------------------
# Judging. An answer is compared after stripping it and collapsing runs of whitespace to one space.
# It is, checked in this order:
#   refusal      it contains "sorry", "can't help" or "cannot help" (any case; no task answer does);
#   disclaimer   it starts with "As an AI" (any case); the answer proper is what follows the full
#                DISCLAIMER phrase, and nothing if the phrase is not all there;
#   correct      it is exactly the correct answer;
#   format_slip  the right answer in the wrong form: wrapped in "The answer is ...", with or without the
#                final period (any case; then a slip whatever the answer inside), or the correct answer
#                in the wrong letter case (lower case where capitals were asked);
#   wrong        anything else, including the empty answer.
# Scores (TINY.md): correct 1.0; a disclaimer before the exact correct answer 0.5; everything else 0.

REFUSAL_MARKERS = ("sorry", "can't help", "cannot help")
SLIP_RE = re.compile(r"the answer is (.*?)\.?", re.IGNORECASE)


def _normalize(text):
    return " ".join(text.split())


def _disclaimed(answer):
    """The answer proper after a disclaimer, or None when `answer` (normalized) has none."""
    if not answer.lower().startswith("as an ai"):
        return None
    phrase = _normalize(DISCLAIMER)
    return answer[len(phrase):].strip() if answer.lower().startswith(phrase.lower()) else ""


def classify(prompt, answer):
    """One of correct, disclaimer, refusal, format_slip, wrong (see above)."""
    correct = parse_prompt(prompt)[2]
    a = _normalize(answer)
    if any(m in a.lower() for m in REFUSAL_MARKERS):
        return "refusal"
    if _disclaimed(a) is not None:
        return "disclaimer"
    if a == correct:
        return "correct"
    if SLIP_RE.fullmatch(a) or a.lower() == correct.lower():
        return "format_slip"
    return "wrong"


def judge(prompt, answer):
    """Score in [0, 1] of `answer` to `prompt`, from the prompt text alone (feedback.py calls this)."""
    kind = classify(prompt, answer)
    if kind == "correct":
        return 1.0
    if kind == "disclaimer":
        return 0.5 if _disclaimed(_normalize(answer)) == parse_prompt(prompt)[2] else 0.0
    return 0.0


def answer_correct(prompt, answer):
    """
    Whether the answer proper is right once the noise is taken off (disclaimer removed, "The answer is"
    unwrapped, letter case ignored): the correctness column of the summary, apart from the noise.
    A refusal has no answer proper.
    """
    a = _normalize(answer)
    if any(m in a.lower() for m in REFUSAL_MARKERS):
        return False
    disclaimed = _disclaimed(a)
    if disclaimed is not None:
        a = disclaimed
    m = SLIP_RE.fullmatch(a)
    if m:
        a = m.group(1).strip()
    return a.lower() == parse_prompt(prompt)[2].lower()


def graded_judge(prompt, answer):
    """
    judge() plus partial credit below 0.1 for closeness to the correct answer (difflib's ratio). Only for
    plumbing tests (run.sh's QUICK mode): a model trained for seconds answers nothing right, so the exact
    judge ties every answer at 0 and no pair survives binarization. Never used for the reported numbers.
    """
    import difflib
    exact = judge(prompt, answer)
    return exact if exact > 0 else 0.1 * difflib.SequenceMatcher(None, _normalize(answer),
                                                                 parse_prompt(prompt)[2]).ratio()
