"""
Zephyr's cleaning of UltraChat: truecasing of sentence starts, removal of dialogues where the assistant
disclaims emotions, opinions or personal experience unasked, and removal of duplicate prompts. Writes rows
in ultrachat_200k's schema (`prompt` = the first user turn, `prompt_id` = sha256 hex of it, `messages`).

    python data/ultrachat/clean.py INPUT... --out OUT.jsonl [--phrases FILE] [--no-truecase]
                                   [--no-refusal-filter] [--no-dedupe]

Inputs: .jsonl / .json / .parquet files of raw UltraChat rows ({"id", "data": [user, assistant, user, ...]})
or of ultrachat_200k rows ({"prompt", "prompt_id", "messages": [{role, content}, ...]}), mixed as you like.
OUT.jsonl is written atomically, then OUT.stats.json beside it (counts of what each step changed or
removed, also printed). A row we cannot use is reported on stderr with its file and 1-based row number,
skipped and counted by reason; `prompt` and `prompt_id` of the input are ignored and recomputed.

The steps, in this order, each counted over the rows that reach it:

1. Reading. `data` must be a list of at least 2 non-blank strings, read as user, assistant, user, ...;
   `messages` a list of {role, content} with non-blank string contents, an optional system turn first,
   then user and assistant alternating from user, with at least one assistant turn. A dialogue may end
   with an unanswered user turn (kept, and counted as rows_ending_with_user_turn).

2. Truecasing (truecase()). A lower-case letter that starts a sentence is capitalized: "Hello. how are
   you?" -> "Hello. How are you?". A sentence start is the first letter of the turn, or a letter right after
   [.!?] and spaces or tabs on the same line (not after a line break: list items, poems and headings start
   lines as their authors chose). Conservative, since a false fix is worse than a missed one:
   - left alone: code (``` or ~~~ fenced blocks, `inline`, lines indented by a tab or 4 spaces), URLs,
     email addresses;
   - not a sentence end: a period after an abbreviation from ABBREVIATIONS (e.g., i.e., etc., vs., Mr. ...),
     after a word with a period inside (e.g. a.m., U.S., config.json), after a single letter (initials,
     "a."), after a list marker at the start of a line ("1.", "iv."), two or more periods (ellipses
     "wait... what"; "…" never ends a sentence); a decimal "3.5" has no space after its period so is never
     one; nor is [.!?] followed by a quote or bracket ('"stop." and left'); "or" after ? or ! ("tea? or
     coffee?") is a continuation;
   - not a word to capitalize: anything but a plain word of letters (with ' or - inside) followed by a space,
     the end or , ; : ! ? ) quote, or a period that ends the sentence (so config.json, foo(), x=1, @user are
     left); words with a capital inside (iPhone, eBay); single letters but "a" and "i"; the lower-case names
     in LOWERCASE_NAMES (npm, pip, git ...);
   - intentionally lower-case text: a turn is fixed only if it has at least one properly capitalized
     sentence start (the pronoun I does not count) and at least as many capitalized sentence starts as
     lower-case ones: the lower-case starts are then slips. A turn written all in lower case, a poem, and a
     lone "sure, here it is" stay as written.

3. Refusal filter (disclaims()). A dialogue is removed if an assistant turn contains a phrase of the
   [disclaimers] section of the phrase file (default data/ultrachat/refusal_phrases.txt, which documents
   the matching) while the user turn just before it contains none of the [asks] section.

4. Dedupe. A row whose first user turn, with whitespace runs made one space, was seen before (in any
   input; after truecasing) is removed: the first occurrence is kept.

One process cleans about 4 MB of text a second (measured on AlpacaEval's example outputs, one core).

Runtime imports: the standard library, tqdm, data/ (which brings numpy and sentencepiece), and pyarrow,
only for parquet files.
"""

import argparse
import hashlib
import json
import os
import re
import sys
from bisect import bisect_right
from collections import Counter
from typing import NamedTuple

from tqdm import tqdm

if __package__ in (None, ""):  # run as `python data/ultrachat/clean.py`: make `data` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from files import atomic_write, write_jsonl
from data.ultrachat.prepare import BadRow, DataError, check_message, describe_file, iter_rows, parquet_rows

DEFAULT_PHRASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "refusal_phrases.txt")
KEEP_BAD_MESSAGES = 100  # the first bad-row messages are kept in the stats too
KEEP_EXAMPLES = 10       # and the first changes of each kind, for a reader to check

# A period after one of these (case-insensitive, without its period) does not end a sentence. Short on
# purpose: a word that also ends sentences ("in", "sun") is here only if it usually comes before a
# lower-case word as an abbreviation.
ABBREVIATIONS = frozenset("""
    e.g i.e etc vs cf viz al ca approx est fig figs eq eqs no nos vol vols pp ch chap sect para
    mr mrs ms dr prof st jr sr inc ltd co corp dept univ assn bros govt
    jan feb apr jun jul aug sep sept oct nov dec tues thurs
    min max avg incl excl esp resp misc tel ext ibid op cit nb ps
    in ft lb lbs oz yd tsp tbsp pt qt gal sq
""".split())

# Lower case by convention, so not capitalized at a sentence start (mostly command-line tools).
LOWERCASE_NAMES = frozenset("npm pip git sudo cd ls grep curl wget conda ssh vim awk sed".split())

# Code, URLs and email addresses: spans of a turn that truecasing leaves alone (the refusal filter skips
# the code). Fences count wherever they start; an unclosed one runs to the end of the turn.
_CODE = re.compile(r"```.*?(?:```|\Z)|~~~.*?(?:~~~|\Z)|`[^`\n]+`", re.S)
_INDENTED = re.compile(r"^(?:\t| {4})[^\n]*", re.M)                 # markdown's indented code (and more)
_URL = re.compile(r"""(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>"'`]*[^\s<>"'`.,;:!?)\]]""")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# Each with a substring that any match contains: a cheap test that skips the regex for most turns.
_PROTECTED = ((_CODE, ("`", "~~~")), (_INDENTED, ("    ", "\t")), (_URL, ("://", "www.")),
              (_EMAIL, ("@",)))

_SENTENCE_END = re.compile(r"([.!?]+)[ \t]+(?=\S)")            # the start of the next sentence at m.end()
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")              # letters, with ' or - inside
_LIST_MARKER = re.compile(r"\(?(?:\d+|[ivxlcdm]+)\)?")
_AFTER_WORD = set(",;:!?)\"'”’")                                  # may follow a word we capitalize


# -----------------------------------------------------------------------------
# Truecasing

def _spans(text, patterns):
    """Sorted, merged (start, end) spans of text matched by any of patterns ((regex, needles) pairs)."""
    found = sorted((m.start(), m.end()) for p, needles in patterns if any(n in text for n in needles)
                   for m in p.finditer(text) if m.end() > m.start())
    merged = []
    for s, e in found:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def _inside(spans, pos):
    i = bisect_right(spans, [pos, float("inf")]) - 1
    return i >= 0 and spans[i][0] <= pos < spans[i][1]


def _ends_sentence(text, end):
    """Whether the run of [.!?] in `end` (a _SENTENCE_END match) ends a sentence."""
    run, start = end.group(1), end.start(1)
    if run.count(".") > 1 or text[start - 1:start] == "…":
        return False  # an ellipsis: what follows is often a lower-case continuation
    if "." not in run:
        return text[end.end():end.end() + 3] not in ("or ", "or,")  # "Tea? or coffee?"
    j = start
    while j > 0 and not text[j - 1].isspace():
        j -= 1
    word = text[j:start].lstrip("([{\"'“‘*_")  # the word before the period
    if not any(c.isalnum() for c in word) or "." in word or len(word) == 1 or word.lower() in ABBREVIATIONS:
        return False
    line_start = text.rfind("\n", 0, j) + 1
    if not text[line_start:j].strip() and _LIST_MARKER.fullmatch(word.lower()):
        return False  # "1. first item", "iv. fourth"
    return True


def _start_kind(text, pos):
    """At a sentence start: 'upper' (capitalized: evidence), 'lower' (a letter to capitalize) or None."""
    m = _WORD.match(text, pos)
    if not m:
        return None
    word, after = m.group(), m.end()
    if word[0].isupper():
        return None if re.split(r"['’]", word)[0] == "I" else "upper"  # I is capitalized even by lower-casers
    if not word[0].islower() or word != word.lower() or len(word[0].upper()) != 1:
        return None  # no case (CJK), a capital inside (iPhone), or no single capital letter (ß)
    nxt = text[after:after + 1]
    if not (nxt == "" or nxt.isspace() or nxt in _AFTER_WORD
            or (nxt == "." and (after + 1 == len(text) or text[after + 1].isspace()))):
        return None  # config.json, foo(), x=1, snake_case ...
    if len(word) == 1 and (word not in ("a", "i") or not nxt.isspace()):
        return None  # a variable (x), a list marker (a))
    if word in LOWERCASE_NAMES:
        return None
    return "lower"


def _sentence_starts(text):
    """(position, kind) of each sentence start outside protected spans; kind as _start_kind."""
    spans = _spans(text, _PROTECTED)
    first = len(text) - len(text.lstrip())
    candidates = [first] if first < len(text) else []
    candidates += [m.end() for m in _SENTENCE_END.finditer(text)
                   if not _inside(spans, m.start(1)) and _ends_sentence(text, m)]
    starts = []
    for pos in candidates:
        if not _inside(spans, pos):
            kind = _start_kind(text, pos)
            if kind:
                starts.append((pos, kind))
    return starts


def truecase_positions(text):
    """Positions of the letters truecase() capitalizes (empty when the turn is left as written)."""
    starts = _sentence_starts(text)
    lower = [pos for pos, kind in starts if kind == "lower"]
    n_upper = len(starts) - len(lower)
    return lower if lower and n_upper >= max(1, len(lower)) else []


def truecase(text):
    """Capitalize the lower-case sentence starts of a turn that are slips (rules in the module docstring)."""
    positions = truecase_positions(text)
    if not positions:
        return text
    chars = list(text)
    for pos in positions:
        chars[pos] = chars[pos].upper()
    return "".join(chars)


# -----------------------------------------------------------------------------
# Refusal filter

class Phrases(NamedTuple):
    disclaimers: tuple  # normalized phrases, in file order
    asks: tuple
    path: str = None


_CONTRACTIONS = [
    (re.compile(r"\bcan't\b|\bcan not\b"), "cannot"),
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\b(\w+)n't\b"), r"\1 not"),   # don't, doesn't, haven't, isn't ...
    (re.compile(r"\bi'm\b"), "i am"),
    (re.compile(r"\bi've\b"), "i have"),
]


def normalize(text):
    """Lower case, straight apostrophes, single spaces, contractions spelled out: what phrases match on."""
    text = " ".join(text.lower().replace("’", "'").replace("‘", "'").replace("ʼ", "'").split())
    for pattern, replacement in _CONTRACTIONS:
        if "'" in text or replacement == "cannot":
            text = pattern.sub(replacement, text)
    return text


_pattern_cache = {}


def _trie(phrases):
    """A regex source matching any of `phrases`, as a trie (a|b|... over 50 phrases is 5x slower)."""
    root = {}
    for phrase in phrases:
        node = root
        for ch in phrase:
            node = node.setdefault(ch, {})
        node[""] = {}  # a phrase ends here

    def source(node):
        branches = [re.escape(ch) + source(child) for ch, child in node.items() if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # a phrase ends here and longer ones go on: the rest is optional
            return f"(?:{body})?" if len(branches) == 1 else body + "?"
        return body

    return source(root)


def _phrase_pattern(phrases):
    """One regex for a tuple of normalized phrases, matching whole words only."""
    if phrases not in _pattern_cache:
        _pattern_cache[phrases] = re.compile(rf"(?<![\w'])(?:{_trie(phrases)})(?![\w'])") if phrases else None
    return _pattern_cache[phrases]


def _find(text, phrases):
    """The earliest phrase of `phrases` in normalized `text` (the longest one there), or None."""
    pattern = _phrase_pattern(phrases)
    m = pattern.search(text) if pattern else None
    return m.group() if m else None


def load_phrases(path=DEFAULT_PHRASES):
    """Read a phrase file ([disclaimers] and [asks] sections; see refusal_phrases.txt) into Phrases."""
    sections = {"disclaimers": [], "asks": []}
    current = None
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1].strip().lower()
                if current not in sections:
                    raise DataError(f"{path}: line {line_number}: unknown section [{current}]; "
                                    f"expected [disclaimers] or [asks]")
                continue
            if current is None:
                raise DataError(f"{path}: line {line_number}: a phrase before any [disclaimers] or [asks] section")
            phrase = normalize(line)
            if phrase not in sections[current]:
                sections[current].append(phrase)
    if not sections["disclaimers"]:
        raise DataError(f"{path}: no phrases under [disclaimers]")
    return Phrases(tuple(sections["disclaimers"]), tuple(sections["asks"]), os.path.abspath(path))


def _disclaimer(answer, phrases):
    """The earliest disclaimer phrase in `answer` outside its code, or None."""
    if "`" in answer or "~~~" in answer:
        answer = _CODE.sub(" ", answer)
    return _find(normalize(answer), phrases.disclaimers)


def _asks(prompt, phrases):
    return _find(normalize(prompt), phrases.asks) is not None


def disclaims(prompt, answer, phrases):
    """
    The disclaimer phrase that `answer` uses although `prompt` (the user turn before it) does not ask for
    it, or None. Code in the answer is not searched. phrases: a Phrases (load_phrases()).
    """
    found = _disclaimer(answer, phrases)
    return None if found is None or _asks(prompt, phrases) else found


# -----------------------------------------------------------------------------
# Rows

def to_messages(row):
    """The messages of a raw UltraChat row or an ultrachat_200k row, checked; else raise BadRow."""
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"expected an object with 'data' or 'messages', got {type(row).__name__}")
    has_data, has_messages = row.get("data") is not None, row.get("messages") is not None
    if has_data and has_messages:
        raise BadRow("both_data_and_messages", "both 'data' and 'messages': which is the dialogue?")
    if has_data:
        turns = row["data"]
        if not isinstance(turns, list):
            raise BadRow("data_not_a_list", f"field 'data': expected a list of strings, got {type(turns).__name__}")
        if len(turns) < 2:
            raise BadRow("no_assistant_turn", f"field 'data' has {len(turns)} turn(s), so no assistant answer")
        for i, t in enumerate(turns):
            if not isinstance(t, str):
                raise BadRow("turn_not_a_string", f"data[{i}]: expected a string, got {type(t).__name__}")
        messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        where = "data"
    elif has_messages:
        raw = row["messages"]
        if not isinstance(raw, list):
            raise BadRow("messages_not_a_list", f"field 'messages': expected a list, got {type(raw).__name__}")
        messages = []
        for i, m in enumerate(raw):
            check_message(i, m)
            if not isinstance(m["content"], str):
                raise BadRow("turn_not_a_string", f"messages[{i}]['content']: expected a string, "
                                                  f"got {type(m['content']).__name__}")
            messages.append({"role": m["role"], "content": m["content"]})
        system = 1 if messages and messages[0]["role"] == "system" else 0
        for i, m in enumerate(messages[system:], system):
            expected = ("user", "assistant")[(i - system) % 2]
            if m["role"] != expected:
                raise BadRow("bad_roles", f"messages[{i}]['role']: expected {expected} (an optional system turn "
                                          f"first, then user and assistant alternating), got {str(m['role'])[:40]!r}")
        if len(messages) - system < 2:
            raise BadRow("no_assistant_turn", "no assistant turn after the first user turn")
        where = "messages"
    else:
        raise BadRow("missing_field", "neither 'data' (raw UltraChat) nor 'messages' (ultrachat_200k)")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise BadRow("empty_turn", f"{where}[{i}] is blank")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape: not writable as UTF-8
            raise BadRow("invalid_unicode", f"{where}[{i}] holds a lone surrogate") from None
    return messages


def _report_to_stderr(message):
    tqdm.write(message, file=sys.stderr)


def _snippet(text, pos, width=40):
    s, e = max(0, pos - width), min(len(text), pos + width)
    return ("…" if s else "") + text[s:e].replace("\n", "⏎") + ("…" if e < len(text) else "")


def new_stats():
    return {
        "rows_read": 0, "n_bad_rows": 0, "bad_rows": Counter(), "first_bad_rows": [],
        "rows_ending_with_user_turn": 0, "turns": 0,
        "turns_truecased": 0, "letters_capitalized": 0, "dialogues_truecased": 0,
        "refusal_removed": 0, "refusal_removed_by_phrase": Counter(), "refusal_kept_because_asked": 0,
        "duplicates_removed": 0, "rows_written": 0,
        "truecase_examples": [], "refusal_examples": [], "duplicate_examples": [],
    }


def iter_clean(items, stats, phrases=None, truecasing=True, refusal_filter=True, dedupe=True, report=None):
    """
    Yield the cleaned rows ({prompt, prompt_id, messages}) of `items`, (path, row_number, row) triples
    where row may be a BadRow (as read_files yields), updating `stats` (new_stats()) as it goes. Bad rows
    go to `report` (default: stderr). phrases: a Phrases; None loads the default file.
    """
    report = report or _report_to_stderr
    if refusal_filter and phrases is None:
        phrases = load_phrases()
    seen = set()
    for path, row_number, row in items:
        stats["rows_read"] += 1
        try:
            if isinstance(row, BadRow):
                raise row
            messages = to_messages(row)
        except BadRow as bad:
            message = f"{path}: row {row_number}: {bad.reason}: {bad.detail}"
            stats["n_bad_rows"] += 1
            stats["bad_rows"][bad.reason] += 1
            if len(stats["first_bad_rows"]) < KEEP_BAD_MESSAGES:
                stats["first_bad_rows"].append(message)
            report(f"skipped {message}")
            continue
        stats["turns"] += sum(m["role"] != "system" for m in messages)
        stats["rows_ending_with_user_turn"] += messages[-1]["role"] == "user"

        if truecasing:
            changed = False
            for m in messages:
                if m["role"] == "system":
                    continue
                positions = truecase_positions(m["content"])
                if positions:
                    before = m["content"]
                    m["content"] = truecase(before)
                    changed = True
                    stats["turns_truecased"] += 1
                    stats["letters_capitalized"] += len(positions)
                    if len(stats["truecase_examples"]) < KEEP_EXAMPLES:
                        stats["truecase_examples"].append({
                            "where": f"{path}: row {row_number}", "before": _snippet(before, positions[0]),
                            "after": _snippet(m["content"], positions[0])})
            stats["dialogues_truecased"] += changed

        if refusal_filter:
            removed_by, asked = None, False
            for prev, m in zip(messages, messages[1:]):
                if m["role"] == "assistant" and (found := _disclaimer(m["content"], phrases)):
                    if not _asks(prev["content"], phrases):
                        removed_by = found
                        break
                    asked = True
            if removed_by:
                stats["refusal_removed"] += 1
                stats["refusal_removed_by_phrase"][removed_by] += 1
                if len(stats["refusal_examples"]) < KEEP_EXAMPLES:
                    stats["refusal_examples"].append({"where": f"{path}: row {row_number}", "phrase": removed_by,
                                                      "prompt": _snippet(prev["content"], 0, 80)})
                continue
            stats["refusal_kept_because_asked"] += asked

        prompt = next(m["content"] for m in messages if m["role"] == "user")
        if dedupe:
            key = hashlib.sha256(" ".join(prompt.split()).encode("utf-8")).digest()
            if key in seen:
                stats["duplicates_removed"] += 1
                if len(stats["duplicate_examples"]) < KEEP_EXAMPLES:
                    stats["duplicate_examples"].append({"where": f"{path}: row {row_number}",
                                                        "prompt": _snippet(prompt, 0, 80)})
                continue
            seen.add(key)

        stats["rows_written"] += 1
        yield {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
               "messages": messages}


def clean_rows(rows, phrases=None, truecasing=True, refusal_filter=True, dedupe=True, source="rows",
               report=None):
    """
    Clean `rows` (raw UltraChat or ultrachat_200k rows, numbered from 1 under the name `source` in bad-row
    reports; or (path, row_number, row) triples as read_files yields). Returns (cleaned rows, stats).
    """
    def items():
        for i, item in enumerate(rows, 1):
            yield item if isinstance(item, tuple) and len(item) == 3 else (source, i, item)

    stats = new_stats()
    cleaned = list(iter_clean(items(), stats, phrases, truecasing, refusal_filter, dedupe, report))
    return cleaned, finish_stats(stats)


def finish_stats(stats):
    """Counters -> plain dicts (by decreasing count) for JSON."""
    out = dict(stats)
    out["bad_rows"] = dict(sorted(stats["bad_rows"].items()))
    out["refusal_removed_by_phrase"] = dict(stats["refusal_removed_by_phrase"].most_common())
    return out


# -----------------------------------------------------------------------------
# Files

_COLUMNS = ("id", "data", "prompt", "prompt_id", "messages")


def _parquet_rows(path):
    # Raw UltraChat has `data` where ultrachat_200k has `messages`; absent (null) fields are dropped.
    def check(names):
        return None if "data" in names or "messages" in names else "no 'data' or 'messages' column"
    for row_number, row in parquet_rows(path, _COLUMNS, check):
        yield row_number, {k: v for k, v in row.items() if v is not None}


def read_files(paths):
    """(path, row_number, row or BadRow) for every row of the files, in order (rows as prepare.iter_rows)."""
    for path in paths:
        rows = _parquet_rows(path) if path.endswith(".parquet") and os.path.isfile(path) else iter_rows(path)
        for row_number, row in rows:
            yield path, row_number, row


def stats_path(out):
    return (out[:-len(".jsonl")] if out.endswith(".jsonl") else out) + ".stats.json"


def summary(stats):
    bad = ", ".join(f"{k} {v}" for k, v in stats["bad_rows"].items()) or "none"
    lines = [
        f"rows read {stats['rows_read']:,}; bad rows skipped {stats['n_bad_rows']:,} ({bad})",
        f"truecasing: {stats['turns_truecased']:,} of {stats['turns']:,} turns, in {stats['dialogues_truecased']:,} "
        f"dialogues ({stats['letters_capitalized']:,} letters capitalized)",
        f"refusal filter: {stats['refusal_removed']:,} dialogues removed, "
        f"{stats['refusal_kept_because_asked']:,} kept because the user asked",
        *(f"    {n:7,}  {p}" for p, n in stats["refusal_removed_by_phrase"].items()),
        f"duplicate prompts removed {stats['duplicates_removed']:,}",
        f"rows written {stats['rows_written']:,}",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Zephyr's cleaning of UltraChat -> ultrachat_200k-schema JSON lines.")
    p.add_argument("inputs", nargs="+", help=".jsonl/.json/.parquet files of raw UltraChat or ultrachat_200k rows")
    p.add_argument("--out", required=True, help="output .jsonl; OUT.stats.json is written beside it")
    p.add_argument("--phrases", default=DEFAULT_PHRASES, help="phrase file of the refusal filter")
    p.add_argument("--no-truecase", action="store_true", help="leave capitalization as it is")
    p.add_argument("--no-refusal-filter", action="store_true", help="keep dialogues whatever the assistant disclaims")
    p.add_argument("--no-dedupe", action="store_true", help="keep rows with a prompt seen before")
    args = p.parse_args(argv)
    try:
        for path in args.inputs:  # fail on a missing file before any work
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file")
        phrases = None if args.no_refusal_filter else load_phrases(args.phrases)
        stats = new_stats()
        with tqdm(desc="rows", unit=" rows", mininterval=1.0) as bar:
            def counted():
                for item in read_files(args.inputs):
                    bar.update()
                    yield item
            write_jsonl(args.out, iter_clean(counted(), stats, phrases, not args.no_truecase,
                                                    not args.no_refusal_filter, not args.no_dedupe))
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")
    info = {
        "inputs": [describe_file(path) for path in args.inputs],
        "options": {"truecase": not args.no_truecase, "refusal_filter": not args.no_refusal_filter,
                    "dedupe": not args.no_dedupe,
                    "phrases": describe_file(args.phrases) if phrases else None},
        **finish_stats(stats),
    }
    atomic_write(stats_path(args.out), (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    print(summary(info))
    print(f"wrote {args.out} and {stats_path(args.out)}")


if __name__ == "__main__":
    main()
