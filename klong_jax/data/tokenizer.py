"""One Tokenizer interface, three backends: SentencePiece (.model, the tiny models), Hugging Face
`tokenizer.json` (what GLM-4.5-Air ships) and the tokenizer stored in a GGUF file's `tokenizer.ggml.*`
metadata (SmolLM2-135M-Instruct, a byte-level BPE), rebuilt as a `tokenizers.Tokenizer`.

`encode(text)` treats text as text: a special-token string inside it (a paper that quotes
`<|user|>`) is encoded as ordinary characters, never as the special id. Only the chat template puts
special ids into a sequence, by `special_id(token)`. `decode(ids)` writes special ids as their strings.

Tokenizers pickle by content (not by path), so Grain worker processes get the same vocabulary.
"""
from __future__ import annotations

import abc
import os
import re
from collections.abc import Sequence


class Tokenizer(abc.ABC):
    """Text <-> ids. Special tokens are single ids that text never encodes to."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def pad_id(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of plain text; special-token strings in it are encoded as ordinary characters."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; special ids are written as their token strings."""

    @abc.abstractmethod
    def special_id(self, token: str) -> int | None:
        """The single id of a special token, or None when the vocabulary has no such special token."""

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template when the tokenizer file carries one (GGUF), else None."""
        return None

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Every special id (constrained decoding never writes one as text)."""
        return frozenset()

    def special_ids(self, tokens: Sequence[str]) -> dict[str, int]:
        """Ids of the given special tokens; a clear error names every one that is missing."""
        found = {t: self.special_id(t) for t in tokens}
        missing = [t for t, i in found.items() if i is None]
        if missing:
            raise ValueError(f"{self!r} has no special token(s) {missing}: the chat template needs each "
                             "as a single id (train the SentencePiece model with them as "
                             "user_defined_symbols, or add them to tokenizer.json's added_tokens)")
        return found  # type: ignore[return-value]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose special tokens are user-defined symbols (single ids)."""

    def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
        if (model_path is None) == (model_proto is None):
            raise ValueError("give exactly one of model_path, model_proto")
        if model_proto is None:
            if not os.path.exists(model_path):
                raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist")
            with open(model_path, "rb") as f:
                model_proto = f.read()
        self._path = model_path
        self._load(model_proto)

    def _load(self, model_proto: bytes) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_proto)
        kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
        # User-defined symbols are the GLM role and tag tokens, "\n", and (embedded tokenizers) atomic task
        # words (train_tokenizer.atomic_words): ordinary text that always encodes to one id, not special.
        user = {p.piece for p in proto.pieces if p.type == kinds.USER_DEFINED and not p.piece.isalnum()}
        self._special = {p.piece: i for i, p in enumerate(proto.pieces)
                         if p.piece in user or p.type == kinds.CONTROL}
        # User-defined symbols match inside any text; the tag tokens are split out of text before
        # encoding, so text cannot forge them.
        escaped = sorted((p for p in user if p.strip()), key=len, reverse=True)
        self._escape_re = re.compile("|".join(re.escape(p) for p in escaped)) if escaped else None
        pad = self._sp.pad_id()
        self._pad = pad if pad >= 0 else 0

    def __getstate__(self):
        return {"path": self._path, "proto": self._proto}

    def __setstate__(self, state):
        self._path = state["path"]
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self._path or '<proto>'}, vocab={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        if self._escape_re is None or not self._escape_re.search(text):
            return self._sp.encode(text)
        ids: list[int] = []
        pos = 0
        for match in self._escape_re.finditer(text):
            ids += self._sp.encode(text[pos:match.start()])
            literal = match.group()
            # Encoding the literal in two parts keeps the symbol from matching as a whole.
            ids += self._sp.encode(literal[:1]) + self._sp.encode(literal[1:])
            pos = match.end()
        return ids + self._sp.encode(text[pos:])

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def special_id(self, token: str) -> int | None:
        return self._special.get(token)

    @property
    def special_token_ids(self) -> frozenset[int]:
        # Whitespace symbols ("\n") are text (encode makes them); unk decodes to " \u2047 ", not to its text.
        unk = self._sp.unk_id()
        return frozenset(i for p, i in self._special.items() if p.strip()) | ({unk} if unk >= 0 else set())


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizer.json` read with the `tokenizers` package; special tokens are its added tokens."""

    def __init__(self, path: str | None = None, *, json_str: str | None = None,
                 pad_token: str | None = None):
        if (path is None) == (json_str is None):
            raise ValueError("give exactly one of path, json_str")
        if json_str is None:
            if not os.path.exists(path):
                raise FileNotFoundError(f"tokenizer.json {path!r} does not exist")
            with open(path, encoding="utf-8") as f:
                json_str = f.read()
        self._path = path
        self._pad_token = pad_token
        self._load(json_str)

    def _load(self, json_str: str) -> None:
        from tokenizers import Tokenizer as _HFTokenizer
        self._json = json_str
        self._tok = _HFTokenizer.from_str(json_str)
        # Not saved in tokenizer.json: without it, added-token strings inside text become special ids.
        self._tok.encode_special_tokens = True
        # Added tokens that are not special (e.g. a `<think>` marked normal) are matched inside text by
        # `encode`, so they are ordinary text here, not special ids.
        self._special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._pad = self._choose_pad()

    def _choose_pad(self) -> int:
        """The padding id: pad_token's, else <|endoftext|>'s when the vocabulary has it, else 0."""
        pad_token = self._pad_token or ("<|endoftext|>" if "<|endoftext|>" in self._special else None)
        if pad_token is not None and pad_token not in self._special:
            raise ValueError(f"pad_token {pad_token!r} is not an added token of {self._path}")
        return self._special[pad_token] if pad_token is not None else 0

    def __getstate__(self):
        return {"path": self._path, "json": self._json, "pad_token": self._pad_token}

    def __setstate__(self, state):
        self._path = state["path"]
        self._pad_token = state["pad_token"]
        self._load(state["json"])

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self._path or '<json>'}, vocab={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def special_id(self, token: str) -> int | None:
        return self._special.get(token)

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self._special.values())


# ------------------------------------------------------------------------------------------------
# GGUF

GGUF_TOKEN_NORMAL, GGUF_TOKEN_UNKNOWN, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 2, 3, 4
# `tokenizer.ggml.pre` values whose text split is the GPT-2 one (what `pre_tokenizers.ByteLevel(use_regex=True)`
# does). transformers builds exactly this for every `pre` it has no regex of its own for; llama.cpp's "smollm"
# also splits digits one by one first, which gives the same ids for SmolLM2 because its merges never join digits.
GGUF_GPT2_SPLIT_PRES = ("default", "gpt-2", "gpt2", "smollm")


def read_gguf_metadata(path: str, prefix: str = "") -> dict:
    """The metadata fields of a GGUF file whose key starts with `prefix`, as Python values (strings
    decoded as UTF-8, arrays as lists). Reads the header only; tensors stay on disk."""
    import gguf
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:   # a truncated or non-GGUF file: say which
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith(prefix)}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map of byte-level BPE: printable Latin-1 bytes stand for themselves,
    the other 68 bytes (controls, space, 0x7f-0xa0, 0xad) for the characters 256, 257, ... in byte order."""
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def gguf_tokenizer_json(fields: dict, *, source: str = "<gguf>") -> str:
    """A `tokenizer.json` string equivalent to the byte-level BPE tokenizer described by a GGUF's
    `tokenizer.ggml.*` fields (the same tokenizer transformers builds for `from_pretrained(dir, gguf_file=...)`):

    - model: BPE over `tokens` (ids = positions) and `merges` ("left right" strings, best first), no unk
      token, no continuing-subword prefix; a token written with characters outside the byte alphabet is
      respelled as the alphabet characters of its UTF-8 bytes;
    - pre-tokenizer: ByteLevel with the GPT-2 split regex and no prefix space; decoder: ByteLevel;
    - added tokens: `token_type` CONTROL (3) as special tokens (never produced by `encode`; a control token
      spelled outside the byte alphabet is a converter's mislabel and is left out, as transformers does),
      USER_DEFINED (4) as non-special added tokens (matched whole inside text, as llama.cpp does).
    """
    from tokenizers import AddedToken, Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers

    def need(key):
        if key not in fields:
            raise ValueError(f"{source}: no metadata field {key!r}; a byte-level BPE GGUF tokenizer needs "
                             "tokenizer.ggml.tokens and tokenizer.ggml.merges")
        return fields[key]

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model = {kind!r}; only byte-level BPE ('gpt2') GGUF "
                         "tokenizers are supported: load the model's tokenizer.json instead")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_GPT2_SPLIT_PRES:
        raise ValueError(f"{source}: tokenizer.ggml.pre = {pre!r} splits text with its own regex, which is not "
                         f"implemented (supported: {list(GGUF_GPT2_SPLIT_PRES)}): load the model's "
                         "tokenizer.json instead")
    tokens = list(need("tokenizer.ggml.tokens"))
    merges = list(need("tokenizer.ggml.merges"))
    types = list(fields.get("tokenizer.ggml.token_type") or [GGUF_TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    alphabet = byte_alphabet()
    letters = set(alphabet.values())
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab: dict[str, int] = {}
    for i, t in enumerate(spelled):
        vocab.setdefault(t, i)
    pairs = []
    for k, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{source}: tokenizer.ggml.merges[{k}] = {m!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
               if kind == GGUF_TOKEN_CONTROL and set(t) <= letters]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
            if kind == GGUF_TOKEN_USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    return tok.to_str()


class GGUFTokenizer(HuggingFaceTokenizer):
    """The tokenizer of a GGUF file (`tokenizer.ggml.*`), as a `tokenizers.Tokenizer` built by
    `gguf_tokenizer_json`. Special tokens are the CONTROL tokens; `pad_id` is `padding_token_id` (else
    `eos_token_id`, else 0); `bos_id`/`eos_id`/`unk_id` are the file's ids (None when absent);
    `chat_template` is `tokenizer.chat_template` (None when absent). The file's `add_bos_token` is kept as
    `add_bos_token`: `encode` never adds one (the chat template decides what a sequence starts with).

    A byte whose alphabet character is not in the vocabulary cannot be encoded: BPE without an unknown
    token drops it, as transformers does for the same file (mapping it to `unk_id` would put a special id
    into text). `missing_bytes` lists them; SmolLM2 lacks 21 of the 256: 0x04 0x06 0x13 0x14 0x16 0x1d,
    0xc0 0xc1 (never in UTF-8) and 0xf1 0xf2 0xf5..0xff (lead bytes of planes 4-15 and invalid ones), so
    `decode(encode(text)) == text` for any text without those control characters or plane 4-11 characters.
    """

    def __init__(self, path: str | None = None, *, fields: dict | None = None):
        if (path is None) == (fields is None):
            raise ValueError("give exactly one of path, fields")
        if fields is None:
            fields = read_gguf_metadata(path, "tokenizer.")
        source = path or "<gguf fields>"
        json_str = gguf_tokenizer_json(fields, source=source)
        n = len(fields["tokenizer.ggml.tokens"])
        ids = {}
        for name in ("bos", "eos", "unknown", "padding"):
            value = fields.get(f"tokenizer.ggml.{name}_token_id")
            if value is not None and not 0 <= int(value) < n:
                raise ValueError(f"{source}: tokenizer.ggml.{name}_token_id = {value} is outside the "
                                 f"{n}-token vocabulary")
            ids[name] = None if value is None else int(value)
        self._meta = {"ids": ids, "chat_template": fields.get("tokenizer.chat_template"),
                      "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False))}
        self._path = path
        self._pad_token = None
        self._load(json_str)

    def _choose_pad(self) -> int:
        """The file's padding id, else its eos id, else 0."""
        ids = self._meta["ids"]
        return next((i for i in (ids["padding"], ids["eos"]) if i is not None), 0)

    def __getstate__(self):
        return {"path": self._path, "json": self._json, "meta": self._meta}

    def __setstate__(self, state):
        self._path = state["path"]
        self._meta = state["meta"]
        self._pad_token = None
        self._load(state["json"])

    def __repr__(self) -> str:
        return f"GGUFTokenizer({self._path or '<fields>'}, vocab={self.vocab_size})"

    @property
    def chat_template(self) -> str | None:
        return self._meta["chat_template"]

    @property
    def missing_bytes(self) -> tuple[int, ...]:
        """Bytes the vocabulary has no token for (dropped by `encode`)."""
        vocab = self._tok.get_vocab(with_added_tokens=False)
        return tuple(b for b, c in sorted(byte_alphabet().items()) if c not in vocab)

    @property
    def add_bos_token(self) -> bool:
        return self._meta["add_bos_token"]

    @property
    def bos_id(self) -> int | None:
        return self._meta["ids"]["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._meta["ids"]["eos"]

    @property
    def unk_id(self) -> int | None:
        return self._meta["ids"]["unknown"]


_CACHE: dict[str, Tokenizer] = {}


def load_tokenizer(path: str, *, cache: bool = True) -> Tokenizer:
    """`*.model` -> SentencePiece; `*.json` or a directory holding tokenizer.json -> Hugging Face;
    `*.gguf` -> the GGUF file's own tokenizer (GGUFTokenizer)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    path = os.path.abspath(path)
    if cache and path in _CACHE:
        return _CACHE[path]
    if path.endswith(".model"):
        tok: Tokenizer = SentencePieceTokenizer(path)
    elif path.endswith(".json"):
        tok = HuggingFaceTokenizer(path)
    elif path.endswith(".gguf"):
        tok = GGUFTokenizer(path)
    else:
        raise ValueError(f"tokenizer {path!r}: expected a SentencePiece .model, a tokenizer.json, a "
                         "directory holding tokenizer.json, or a .gguf model file")
    if cache:
        _CACHE[path] = tok
    return tok

