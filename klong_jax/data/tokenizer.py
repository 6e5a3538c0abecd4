"""One Tokenizer interface, two backends: SentencePiece (.model, the tiny models) and Hugging Face
`tokenizer.json` (what GLM-4.5-Air ships).

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
        self._special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        pad_token = self._pad_token or ("<|endoftext|>" if "<|endoftext|>" in self._special else None)
        if pad_token is not None and pad_token not in self._special:
            raise ValueError(f"pad_token {pad_token!r} is not an added token of {self._path}")
        self._pad = self._special[pad_token] if pad_token is not None else 0

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


_CACHE: dict[str, Tokenizer] = {}


def load_tokenizer(path: str, *, cache: bool = True) -> Tokenizer:
    """`*.model` -> SentencePiece; `*.json` or a directory holding tokenizer.json -> Hugging Face."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    path = os.path.abspath(path)
    if cache and path in _CACHE:
        return _CACHE[path]
    if path.endswith(".model"):
        tok: Tokenizer = SentencePieceTokenizer(path)
    elif path.endswith(".json"):
        tok = HuggingFaceTokenizer(path)
    else:
        raise ValueError(f"tokenizer {path!r}: expected a SentencePiece .model, a tokenizer.json, or a "
                         "directory holding tokenizer.json")
    if cache:
        _CACHE[path] = tok
    return tok

