"""Constrained decoding: which tokens may come next, as a mask over the vocabulary, for the Sampler.

    vocab = TokenVocab.from_tokenizer(tokenizer, size=model.cfg.vocab_size)        # once per tokenizer
    guide = JsonConstraint(compile_schema(schema), vocab, stop_ids=template.stop_ids)
    sampler.generate([prompt], SamplingParams(max_new_tokens=512, constraint=guide))

The Sampler calls the TokenConstraint protocol: `start()` -> state (hashable), `allowed(state)` -> bool [V], and
`advance(state, token)` -> the state after a sampled token. Token 0 is sampled under `allowed(start())` inside the
prefill; after that a constrained batch decodes one token per device call and the host computes each row's next
mask (sampler.py). Masked logits are -inf before temperature, top-k and top-p; a Completion's `logprobs` stay those
of the unconstrained model (what RL's ratios use) and its `sampling_logprobs` those of the masked distribution.

JsonConstraint: the grammar of a JSON schema (json_schema.py) over a tokenizer's vocabulary. A token is allowed iff
its text, read character by character from the current state, leaves a live state; a stop token iff the text so
far is a whole value. If no token is allowed (cannot happen for a schema the grammar compiles, but a guard against
a dead end) the stop tokens are allowed, so the row ends instead of sampling from nothing. Masks are computed by a
walk over a character trie of the vocabulary that prunes at the first rejected character, with a fast path inside
free strings (tokens of plain string characters all stay inside: one vectorised mask, and only the tokens
with a quote, backslash or control character are read through the grammar: 358 of SmolLM2's 49,152); they are
cached per state.

TokenVocab: each token's text is what it adds after a reference token (decode([r, t]) minus decode([r])), so
tokenizers that drop a word's leading space when it starts the text (SentencePiece) are read right. Tokens whose
text is empty, holds a replacement character (a byte-level token that is part of a multi-byte character) or is a
special token are never allowed in constrained text: such characters are generated from whole-character tokens.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Hashable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from klong_jax.sampling.json_schema import JsonGrammar


@runtime_checkable
class TokenConstraint(Protocol):
    """What the Sampler needs from a constraint (module docstring)."""

    def start(self) -> Hashable: ...

    def allowed(self, state) -> np.ndarray: ...

    def advance(self, state, token: int): ...


class TokenVocab:
    """Each token id's text (None: never allowed), as a character trie, plus the arrays of the fast path.

    children[k]: char -> trie node of node k (node 0 is the root); ids_at[k]: the tokens whose text ends at k;
    plain_V: tokens made only of characters a JSON string takes as they are (no quote, backslash, control);
    lengths_V: characters per token; special_ids: the other tokens that have a text."""

    def __init__(self, strings: Sequence[str | None]):
        self.strings = list(strings)
        self.size = V = len(self.strings)
        self.children: list[dict[str, int]] = [{}]
        self.ids_at: list[list[int]] = [[]]
        self.plain_V = np.zeros(V, bool)
        self.lengths_V = np.zeros(V, np.int64)
        special = []
        for t, s in enumerate(self.strings):
            if not s:
                continue
            node = 0
            for ch in s:
                nxt = self.children[node].get(ch)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][ch] = nxt
                    self.children.append({})
                    self.ids_at.append([])
                node = nxt
            self.ids_at[node].append(t)
            self.lengths_V[t] = len(s)
            if all(c != '"' and c != "\\" and ord(c) >= 0x20 for c in s):
                self.plain_V[t] = True
            else:
                special.append(t)
        self.special_ids = np.asarray(special, np.int64)

    @classmethod
    def from_tokenizer(cls, tokenizer, size: int | None = None) -> TokenVocab:
        """The texts of ids [0, size) (size: the model's vocab_size; ids the tokenizer lacks get None).
        tokenizer: `decode(ids)`, `encode(text)`, `vocab_size`, optionally `special_token_ids`."""
        n = tokenizer.vocab_size
        size = n if size is None else size
        special = set(int(i) for i in getattr(tokenizer, "special_token_ids", ()))
        ref = tokenizer.encode("a")
        if len(ref) != 1:
            raise ValueError(f"TokenVocab: the tokenizer encodes 'a' as {ref}; one token was expected")
        r = ref[0]
        base = tokenizer.decode([r])
        strings: list[str | None] = []
        for t in range(size):
            if t >= n or t in special:
                strings.append(None)
                continue
            text = tokenizer.decode([r, t])
            s = text[len(base):] if text.startswith(base) else None
            strings.append(s if s and "\ufffd" not in s else None)
        return cls(strings)


class JsonConstraint:
    """A JSON grammar over a vocabulary (module docstring). Thread-safe; one instance may serve many rows and
    requests (the mask cache is shared: the same schema's states recur)."""

    def __init__(self, grammar: JsonGrammar, vocab: TokenVocab, stop_ids: Sequence[int], *, cache_size: int = 4096):
        self.grammar, self.vocab = grammar, vocab
        self.stop_ids = tuple(int(t) for t in stop_ids)
        if not self.stop_ids:
            raise ValueError("JsonConstraint needs at least one stop token id (the text ends with one)")
        bad = [t for t in self.stop_ids if not 0 <= t < vocab.size]
        if bad:
            raise ValueError(f"JsonConstraint stop_ids {bad} are outside the vocabulary [0, {vocab.size})")
        self.cache_size = cache_size
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.stats = collections.Counter()      # masks computed / served from the cache

    def start(self):
        return self.grammar.start()

    def advance(self, state, token: int):
        """The state after `token`; a stop token leaves it as it is (the row is over). ValueError for a token
        the mask did not allow."""
        token = int(token)
        if token in self.stop_ids:
            if not (self.grammar.is_complete(state) or self._dead_end(state)):
                raise ValueError(f"stop token {token} before the JSON value is complete")
            return state
        text = self.vocab.strings[token] if 0 <= token < self.vocab.size else None
        new = self.grammar.feed(state, text) if text else None
        if new is None:
            raise ValueError(f"token {token} ({text!r}) is not allowed by the JSON grammar here")
        return new

    def allowed(self, state) -> np.ndarray:
        """bool [V]: the tokens that may come next."""
        return self._mask(state).copy()

    def _dead_end(self, state) -> bool:
        return not self._grammar_mask(state).any()

    def _mask(self, state) -> np.ndarray:
        with self._lock:
            packed = self._cache.get(state)
            if packed is not None:
                self._cache.move_to_end(state)
                self.stats["cached"] += 1
                return np.unpackbits(packed, count=self.vocab.size).astype(bool)
        mask = self._grammar_mask(state)
        if self.grammar.is_complete(state) or not mask.any():
            mask[list(self.stop_ids)] = True
        with self._lock:
            self.stats["computed"] += 1
            self._cache[state] = np.packbits(mask)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return mask

    def _grammar_mask(self, state) -> np.ndarray:
        """The non-stop tokens whose whole text the grammar reads from `state`."""
        v, g = self.vocab, self.grammar
        fast = g.free_string_top(state)
        if fast is not None:
            node, n, _, _ = fast
            mask = v.plain_V.copy()
            if node.max_len is not None:
                mask &= v.lengths_V <= node.max_len - n
            for t in v.special_ids.tolist():
                if g.feed(state, v.strings[t]) is not None:
                    mask[t] = True
            return mask
        mask = np.zeros(v.size, bool)
        todo = [(0, state)]
        while todo:
            k, st = todo.pop()
            for ch, child in v.children[k].items():
                nxt = g.step(st, ch)
                if nxt is None:
                    continue
                if v.ids_at[child]:
                    mask[v.ids_at[child]] = True
                if v.children[child]:
                    todo.append((child, nxt))
        return mask


__all__ = ["TokenConstraint", "TokenVocab", "JsonConstraint"]
