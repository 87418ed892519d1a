"""
The tokenizer: a sentencepiece vocabulary (Mistral's tokenizer.model, or a small one trained here) that
encodes exactly as transformers does, plus the Zephyr chat template and its loss mask.

Why not plain `sentencepiece.encode`: the recipe trained with transformers' tokenizer and people serve
with it (transformers, vLLM), and the two disagree. transformers 5.x builds a `tokenizers` BPE from
tokenizer.model whose merge ranks follow piece ids, with no normalizer, a Metaspace dummy prefix and the
special tokens split out of the raw text. sentencepiece ranks merges by piece score, and Mistral scores its
whitespace-only pieces ('▁▁', '▁▁▁▁', ...) at -1e9 although their ids are 259, 260, ...: hence
'▁' '▁and' from sentencepiece where transformers gives '▁▁' 'and'. We keep sentencepiece's C++ doing the
work and change only its inputs: the model proto is edited in memory (score = -id for normal pieces, an
identity normalizer without dummy prefix) and the dummy prefix and the special tokens are handled here,
as transformers handles them. tests/test_tokenizer.py checks this token for token against transformers.

save_pretrained also writes the `tokenizers` library's tokenizer.json (what Mistral's own checkpoints ship
and what transformers' TokenizersBackend and vLLM load as is), built here from the same vocabulary, so
every loader encodes as we do, whichever tokenizer class it picks.

Runtime imports: sentencepiece, numpy, the standard library and files.py (no torch).
"""

import io
import json
import os
import re
import struct

import numpy as np
import sentencepiece as spm

from files import atomic_write

# Mistral's layout, which train_tokenizer reproduces.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# The one default for `legacy` (see Tokenizer), wherever a tokenizer.model comes without a tokenizer_config.json
# that sets it: Mistral-7B-v0.1's setting. save_pretrained always writes it, so no loader has to guess.
LEGACY = True

# -----------------------------------------------------------------------------
# The Zephyr chat template

ROLES = ("system", "user", "assistant")

# The format has one definition: this template, which renders exactly as render_chat(..., bos=True) below, and
# whose tokenization without special tokens is encode_chat's ids (tests/test_tokenizer.py checks all three
# against each other, through transformers and through jinja2 alone). It starts with bos_token, so both ways
# serving stacks tokenize a chat give training's ids: apply_chat_template(tokenize=True) and render-then-encode
# with add_special_tokens=False (vLLM's chat server). Render-then-encode WITH special tokens adds a second BOS.
# The space after bos_token is the dummy prefix that tokenizer(text) puts after the BOS it adds itself ('▁<'):
# written out, it gives the recipe's ids (BOS + tokenizer(rendered text)) with legacy and without, where
# transformers' Metaspace(prepend_scheme="first") adds no prefix after a BOS that comes as text.
# Written with {%- -%} everywhere so the output does not depend on the renderer's trim_blocks/lstrip_blocks.
CHAT_TEMPLATE = (
    "{{- bos_token + ' ' -}}"
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|system|>\\n</s>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role must be system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{- raise_exception('a system message may only come first') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- endif -%}"
)


def check_messages(messages):
    """Raise ValueError naming the message index and field unless `messages` is a valid conversation."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages: expected a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise ValueError(f"messages[{i}]['{field}']: missing")
            if not isinstance(m[field], str):
                raise ValueError(f"messages[{i}]['{field}']: expected a string, got {type(m[field]).__name__}")
            try:
                m[field].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate, e.g. a JSON-escaped "\ud800"
                raise ValueError(f"messages[{i}]['{field}']: not valid Unicode (lone surrogate at {e.start})") from None
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]['role']: expected one of {ROLES}, got {m['role']!r:.40}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}]['role']: a system message may only come first")


def _turns(messages):
    """(role, content) per turn, with the empty system turn the recipe inserts when there is none."""
    check_messages(messages)
    turns = [(m["role"], m["content"]) for m in messages]
    if turns[0][0] != "system":
        turns.insert(0, ("system", ""))
    return turns


def render_chat(messages, add_generation_prompt=False, bos=False):
    """
    `<|role|>\\n{content}</s>\\n` per turn; `<|assistant|>\\n` after them to ask for a reply. With bos, `<s> `
    first: exactly what CHAT_TEMPLATE renders; tokenize that without special tokens. Without it, tokenize with
    special tokens (they add the BOS); never both. Either way the ids are encode_chat's.
    """
    text = "".join(f"<|{role}|>\n{content}{EOS}\n" for role, content in _turns(messages))
    return (BOS + " " if bos else "") + text + ("<|assistant|>\n" if add_generation_prompt else "")


# -----------------------------------------------------------------------------
# Editing the sentencepiece model proto in memory
#
# Parsing tokenizer.model with protobuf would need the protobuf package at run time, and sentencepiece's
# generated code pins a protobuf version. The part of the wire format we touch is tiny: a message is a
# sequence of (tag varint, value) fields, tag = field_number << 3 | wire_type, and we need wire types
# 0 (varint), 2 (length-delimited) and 5 (fixed 32 bit). Field numbers from sentencepiece_model.proto:
#   ModelProto: 1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec,
#               4 self_test_data, 5 denormalizer_spec
#   SentencePiece: 1 piece (string), 2 score (float), 3 type (enum; absent means NORMAL)
#   NormalizerSpec: 1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf, pos):
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _encode_varint(value):
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf):
    """Yield (field_number, wire_type, value) for each field; value is an int or a bytes slice."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"tokenizer.model: unsupported protobuf wire type {wire} in field {number}")
        yield number, wire, value


def _field(number, wire, value):
    tag = _encode_varint(number << 3 | wire)
    if wire == 0:
        return tag + _encode_varint(value)
    if wire == 2:
        return tag + _encode_varint(len(value)) + value
    return tag + value  # fixed 32/64 bit, already bytes


def _transformers_compatible_proto(model_bytes):
    """
    Return (edited model proto bytes, [(piece, type)] by id); see the module docstring for why.
    With score = -id, sentencepiece merges in transformers' order. One tie is broken differently: two
    splits of the same piece competing for a shared middle symbol ([X][Y][Z] with XY == YZ) go to the
    leftmost in sentencepiece and to the shorter left part in transformers. It needs |Y| < |X|, e.g.
    [▁▁][▁][▁▁], which BPE never builds from Mistral's whitespace pieces; the fuzz tests have not met it.
    """
    out, pieces = [], []
    for number, wire, value in _fields(model_bytes):
        if number == 1:  # a piece: rank normal pieces by id, as transformers' merges do
            piece, kind = "", NORMAL
            for n, w, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 3:
                    kind = v
            i = len(pieces)
            pieces.append((piece, kind))
            # Other types keep score 0: sentencepiece never merges into control, unknown or byte pieces.
            score = -float(i) if kind == NORMAL else 0.0
            body = _field(1, 2, piece.encode("utf-8")) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, kind)
            out.append(_field(1, 2, body))
        elif number == 2:  # trainer_spec: ids of specials, byte_fallback; kept
            out.append(_field(number, wire, value))
        elif number == 3:  # normalizer_spec: transformers' LlamaTokenizer ignores it; so do we
            spec = (_field(1, 2, b"identity") + _field(3, 0, 0)   # no dummy prefix: added in _encode_chunks
                    + _field(4, 0, 0) + _field(5, 0, 1))           # keep runs of spaces; ' ' -> '▁'
            out.append(_field(3, 2, spec))
        # 4 self_test_data is dropped (its expectations assume the original scores), and so is
        # 5 denormalizer_spec, which transformers ignores too.
    if len(pieces) > 2 ** 24:
        raise ValueError("tokenizer.model: too many pieces for float32 scores to rank them exactly")
    return b"".join(out), pieces


# -----------------------------------------------------------------------------
# The tokenizer

class Tokenizer:
    """
    A sentencepiece vocabulary that encodes and decodes as transformers' LlamaTokenizer does for the
    tokenizer_config.json that save_pretrained writes.

    legacy: what transformers calls `legacy` in tokenizer_config.json, and save_pretrained writes it there.
    True puts the dummy-prefix '▁' at the start of every stretch of text between special tokens, so each
    `</s>\\n` of the chat template becomes `</s>` '▁' '\\n'; False puts it only at the start of the text.
    The default is True: it is Mistral-7B-v0.1's tokenizer_config, and it gives the ids Zephyr was trained
    on (transformers 4.x's fast tokenizer prefixed every stretch: `</s> ▁ <0x0A>` in REFERENCE.md), so a
    Zephyr checkpoint tokenizes here as in its training and ours chat like it. The price: one lone '▁'
    per turn. transformers 5.24 maps legacy=True to Metaspace(prepend_scheme="always"), False to "first".

    pad_id: the unk id (0). Mistral has no pad token. Byte fallback means <unk> never comes out of encode,
    so `ids == pad_id` marks padding exactly; padding with EOS, the common alternative, makes code that
    masks labels by `ids != pad_id` drop the real EOS and the model never learns to stop.
    """

    def __init__(self, model_path, legacy=LEGACY):
        with open(model_path, "rb") as f:
            self.model_bytes = f.read()
        self.model_path, self.legacy = model_path, bool(legacy)
        proto, pieces = _transformers_compatible_proto(self.model_bytes)
        self.pieces = pieces  # [(piece, type)] by id
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.get_piece_size()
        if self.vocab_size != len(pieces):
            raise ValueError(f"{model_path}: sentencepiece reads {self.vocab_size} pieces, the proto holds {len(pieces)}")

        # The layout everything below relies on (Mistral's, and train_tokenizer's).
        expected = {UNK_ID: (UNK, UNKNOWN), BOS_ID: (BOS, CONTROL), EOS_ID: (EOS, CONTROL)}
        for i, want in expected.items():
            if pieces[i] != want:
                raise ValueError(f"{model_path}: piece {i} is {pieces[i]}, expected {want} (piece, type)")
        bad = [(i, p, k) for i, (p, k) in enumerate(pieces) if k in (USER_DEFINED, UNUSED)]
        if bad:
            raise ValueError(f"{model_path}: user-defined/unused pieces are not supported (transformers makes "
                             f"them added tokens or merges into them; sentencepiece does neither): {bad[:5]}")
        extra = [(i, p) for i, (p, k) in enumerate(pieces) if k in (CONTROL, UNKNOWN) and i not in expected]
        if extra:
            raise ValueError(f"{model_path}: control pieces other than <unk>, <s>, </s> are not supported "
                             f"(transformers splits them out of the text as special tokens; we do not): {extra[:5]}")
        # transformers' merges are every split of every piece into two pieces, so it would build a byte
        # piece like '<0x0A>' out of the text "<0x0A>" if '<0x' and '0A>' were pieces; sentencepiece never
        # does. No such pair exists in Mistral's vocabulary; refuse one where it does.
        vocab = {p for p, _ in pieces}
        for p, k in pieces:
            if k == BYTE and any(p[:j] in vocab and p[j:] in vocab for j in range(1, len(p))):
                raise ValueError(f"{model_path}: byte piece {p!r} can be merged from two pieces by transformers")
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = BOS_ID, EOS_ID, UNK_ID, UNK_ID
        self.special_ids = frozenset((UNK_ID, BOS_ID, EOS_ID))
        # transformers splits its special tokens out of the raw text before BPE.
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in (UNK, BOS, EOS)) + ")")
        self._special_to_id = {UNK: UNK_ID, BOS: BOS_ID, EOS: EOS_ID}

        # encode_chat encodes the role header and the content separately (to know where the content
        # starts) and relies on this giving the same ids as encoding them together. It does when no piece
        # contains '\n': the header ends in '\n', which is then byte-fallback <0x0A>, and no merge can take
        # it, so no token can straddle the header/content boundary. True for Mistral's vocabulary and for
        # train_tokenizer's; a vocabulary where a token could straddle is refused by encode_chat rather
        # than given a masking rule that training would silently depend on.
        self.newline_is_barrier = not any("\n" in p for p, k in pieces if k == NORMAL)

    # -- encoding ------------------------------------------------------------

    def _encode_chunks(self, parts):
        """
        parts: [(text, tag)] in order, whose concatenation is the text to encode. Returns [(ids, tag)].
        Special-token strings inside a text become their ids (tagged like the text around them). The
        dummy prefix goes where transformers' Metaspace(prepend_scheme=...) puts it: at the start of each
        stretch between special tokens (legacy) or only at the very start (not legacy), and not when
        that stretch already starts with a space.
        """
        plain, layout = [], []  # texts for one batched sentencepiece call; where their ids go
        at_start = at_chunk_start = True
        for text, tag in parts:
            for j, s in enumerate(self._special_re.split(text)):
                if j % 2:  # the split's odd entries are the special tokens
                    layout.append(([self._special_to_id[s]], tag))
                    at_start = False
                    at_chunk_start = True
                elif s:
                    prefix = at_chunk_start and (self.legacy or at_start) and s[0] not in " \u2581"
                    plain.append(" " + s if prefix else s)
                    layout.append((len(plain) - 1, tag))
                    at_start = at_chunk_start = False
        encoded = self.sp.encode(plain, num_threads=1) if plain else []
        return [(encoded[x] if isinstance(x, int) else x, tag) for x, tag in layout]

    def encode(self, text, bos=False, eos=False):
        """Token ids of `text`, as transformers' tokenizer(text, add_special_tokens=False) gives them."""
        if not isinstance(text, str):
            raise ValueError(f"text: expected a string, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for chunk, _ in self._encode_chunks([(text, None)]):
            ids.extend(chunk)
        return ids + [self.eos_id] if eos else ids

    def encode_chat(self, messages, add_generation_prompt=False):
        """
        (ids, loss_mask) for a conversation: CHAT_TEMPLATE's text (`<s> ` first) tokenized as a whole, as
        transformers' apply_chat_template(tokenize=True) does, i.e. tokenizer(render_chat(messages, bos=True),
        add_special_tokens=False) in transformers; equal to tokenizer(render_chat(messages)), the BOS added
        by the tokenizer, which is how the recipe tokenized. loss_mask is 1 exactly
        on each assistant turn's content and its </s>, 0 on BOS, role headers, the '\\n' (and with legacy
        the '▁') after each </s>, and system/user turns. Both are lists of ints of the same length.
        """
        if not self.newline_is_barrier:
            raise ValueError(f"{self.model_path}: a piece contains '\\n', so a token could straddle a role "
                             "header and its content; encode_chat needs a vocabulary without such pieces")
        parts = []  # (text, 1 if trained on) in rendered order: render_chat(messages, bos=True) cut at turns
        for i, (role, content) in enumerate(_turns(messages)):
            trained = int(role == "assistant")
            parts.append(((BOS + " " if i == 0 else "\n") + f"<|{role}|>\n", 0))  # "\n" ends the previous turn
            parts.append((content + EOS, trained))
        parts.append(("\n<|assistant|>\n" if add_generation_prompt else "\n", 0))

        ids, mask = [], []
        for chunk, trained in self._encode_chunks(parts):
            ids.extend(chunk)
            mask.extend([trained] * len(chunk))
        return ids, mask

    # -- decoding ------------------------------------------------------------

    def decode(self, ids, skip_special_tokens=True):
        """
        Text of `ids` as transformers' decode gives it: '▁' -> ' ', byte pieces -> UTF-8, one leading
        space (the dummy prefix) dropped. Special tokens are left out, or written as '<s>' etc. when
        skip_special_tokens is False.
        """
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        for j, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids[{j}]: {i} is outside the vocabulary [0, {self.vocab_size})")
        pieces, run = [], []
        for i in ids:
            if i in self.special_ids:
                if run:
                    pieces.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    pieces.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            pieces.append(self.sp.decode(run))
        text = "".join(pieces)
        return text[1:] if text.startswith(" ") else text

    # -- export --------------------------------------------------------------

    def save_pretrained(self, directory, model_max_length=32768):
        """
        Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json so that
        transformers' AutoTokenizer.from_pretrained(directory) encodes, decodes and applies the chat
        template as we do, whichever class it picks: LlamaTokenizer (named here), or, in a model directory
        whose config.json says model_type mistral, TokenizersBackend, which reads tokenizer.json as is
        (without one it would convert tokenizer.model its own way, sentencepiece's on runs of spaces).
        tokenizers.Tokenizer.from_file(directory/tokenizer.json), what vLLM uses, encodes as we do too.
        model_max_length: the model's context length (Mistral's max_position_embeddings by default).
        """
        os.makedirs(directory, exist_ok=True)
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": UNK}
        config = {
            # LlamaTokenizer builds its BPE from tokenizer.model (merges ranked by piece id, Metaspace
            # prefix) and reads `legacy` from here: that is the behaviour encode reproduces. No
            # "add_prefix_space": transformers 4.x takes its presence as an order to rebuild the tokenizer
            # from tokenizer.model with sentencepiece's merge order ('▁▁▁' '▁return' for training's
            # '▁▁▁▁' 'return') instead of reading tokenizer.json; 5.x defaults it to true anyway.
            "tokenizer_class": "LlamaTokenizer",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": self.legacy,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "padding_side": "left",  # for batched generation; our training code pads on its own
            "chat_template": CHAT_TEMPLATE,
        }
        atomic_write(os.path.join(directory, "tokenizer.model"), self.model_bytes)
        atomic_write(os.path.join(directory, "tokenizer.json"), _json_bytes(self.tokenizers_json()))
        atomic_write(os.path.join(directory, "tokenizer_config.json"), _json_bytes(config))
        atomic_write(os.path.join(directory, "special_tokens_map.json"), _json_bytes(special))

    def tokenizers_json(self):
        """
        The `tokenizers` library's serialization (tokenizer.json) of this tokenizer, as a dict; it equals
        the one transformers' LlamaTokenizer saves after loading our tokenizer.model and tokenizer_config,
        except for the BPE model's unk_token ('<unk>' here, sentencepiece's unknown piece; None there):
        the same ids either way while all 256 byte pieces exist, as byte fallback then leaves nothing unknown.
        A BPE with byte fallback over the vocabulary (piece -> id) whose merges are every split of every
        piece into two pieces, ranked by the piece's id, then by the length of the left part (transformers'
        generate_merges for a sentencepiece BPE); no normalizer; a Metaspace pre-tokenizer adding the dummy
        prefix to each stretch between special tokens (legacy: "always") or only to the first ("first");
        <unk>, <s>, </s> as special added tokens matched on the raw text; BOS added by the post-processor
        (add_bos_token); and the decoder that turns '▁' back into spaces, bytes into UTF-8 and drops the
        one leading space.
        """
        vocab = {piece: i for i, (piece, _) in enumerate(self.pieces)}
        # Generated in (id, split position) order, which is the order transformers sorts them into.
        merges = [[piece[:j], piece[j:]] for piece, _ in self.pieces
                  for j in range(1, len(piece)) if piece[:j] in vocab and piece[j:] in vocab]
        added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for i, token in ((UNK_ID, UNK), (BOS_ID, BOS), (EOS_ID, EOS))]
        bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                              "prepend_scheme": "always" if self.legacy else "first", "split": False},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {BOS: {"id": BOS, "ids": [BOS_ID], "tokens": [BOS]}},
            },
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                "vocab": vocab, "merges": merges,
            },
        }

    @classmethod
    def from_pretrained(cls, directory):
        """Load a directory save_pretrained wrote (or an HF model directory with tokenizer.model): `legacy`
        from its tokenizer_config.json, LEGACY where that does not set it."""
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = {}
        if os.path.exists(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        # Where the key is missing transformers disagrees with itself (4.x reads it as true, 5.x as false): we
        # take the one default, and our exports always write the key.
        legacy = config.get("legacy", LEGACY)
        if not isinstance(legacy, bool):
            raise ValueError(f"{config_path}: \"legacy\" must be true or false, got {legacy!r}")
        return cls(os.path.join(directory, "tokenizer.model"), legacy=legacy)


def load_tokenizer(path):
    """
    The one way every script loads a tokenizer: a tokenizer.model file (legacy = LEGACY), or a directory
    holding one, a model directory or what save_pretrained wrote (legacy from its tokenizer_config.json).
    """
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "tokenizer.model")):
            raise FileNotFoundError(f"{path}: directory without a tokenizer.model")
        return Tokenizer.from_pretrained(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    return Tokenizer(path)


def _json_bytes(obj):
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# -----------------------------------------------------------------------------
# Training a small vocabulary

def train_tokenizer(texts_or_file, model_prefix, vocab_size, character_coverage=1.0, **options):
    """
    Train a BPE sentencepiece model laid out like Mistral's (<unk>=0, <s>=1, </s>=2, then the 256 byte
    pieces for byte fallback) and write it to `model_prefix + ".model"`; returns that path.
    texts_or_file: a path to a UTF-8 text file, or an iterable of strings. Deterministic for a fixed input:
    every sentence is used, in order, with one thread. Newlines only separate sentences, so no piece
    contains '\\n' (encode_chat needs that; see Tokenizer). `options` go to sentencepiece's trainer.
    """
    if isinstance(texts_or_file, (str, os.PathLike)):
        with open(texts_or_file, encoding="utf-8") as f:
            texts = f.read().split("\n")
    else:
        texts = [line for t in texts_or_file for line in t.split("\n")]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("texts_or_file: no text to train on")
    model = io.BytesIO()
    settings = dict(
        model_type="bpe", vocab_size=vocab_size, character_coverage=character_coverage,
        byte_fallback=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        # Mistral's settings. The normalizer ones matter only to plain sentencepiece (Tokenizer, like
        # transformers, ignores them), but they make plain sentencepiece read the file much as we do.
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        max_sentence_length=1 << 20, minloglevel=2,
    )
    settings.update(options)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, **settings)
    path = model_prefix + ".model"
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, model.getvalue())
    return path
