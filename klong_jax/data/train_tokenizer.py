"""Trains the SentencePiece tokenizer of the tiny models on the embedded corpus.

    python -m klong_jax.data.train_tokenizer --input='corpus/*.jsonl,notes/*.md' --out=tok.model \
        --vocab_size=2048

JSONL trajectories contribute every text the chat template renders (contents, reasoning, tool names,
argument keys and values); other files contribute their text. The GLM-4.5 special tokens are
user-defined symbols, so each is a single id; "\\n" is one too. Normalisation is the identity, with
byte fallback and no dummy prefix, so decode(encode(text)) == text for any text and text runs encode
independently (the chat template relies on both).
"""
from __future__ import annotations

import glob
import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

from klong_jax.data.chat_template import GLM45_SPECIAL_TOKENS, encode_argument
from klong_jax.data.trajectory import Trajectory, read_jsonl

_MAX_PIECE_CHARS = 2000   # SentencePiece skips training sentences over max_sentence_length bytes


def trajectory_texts(trajectories: Iterable[Trajectory]) -> Iterator[str]:
    """Every text the chat template renders from these trajectories."""
    for t in trajectories:
        for m in t.messages:
            yield m.content
            if m.reasoning:
                yield m.reasoning
            for call in m.tool_calls:
                yield call.name
                for key, value in call.arguments.items():
                    yield key
                    yield encode_argument(value)


def texts_of_file(path: str) -> Iterator[str]:
    """Texts of a JSONL trajectory file (validated: a bad line is an error naming it) or of a
    text file."""
    if path.endswith(".jsonl"):
        yield from trajectory_texts(read_jsonl(path))
    else:
        with open(path, encoding="utf-8") as f:
            yield f.read()


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Lines of at most _MAX_PIECE_CHARS characters ("\\n" is a symbol of its own anyway)."""
    for text in texts:
        for line in text.split("\n"):
            for i in range(0, len(line), _MAX_PIECE_CHARS):
                piece = line[i:i + _MAX_PIECE_CHARS]
                if piece.strip():
                    yield piece


def train_sentencepiece(texts: Iterable[str], out_path: str, *, vocab_size: int = 2048,
                        model_type: str = "bpe", special_tokens: Sequence[str] = GLM45_SPECIAL_TOKENS,
                        atomic_words: Sequence[str] = ()) -> str:
    """Trains and writes `out_path` (a .model file); returns its path.

    atomic_words: words that are always one id of their own, whatever precedes them. A BPE piece
    carries its leading space ("▁logs" after a space, "logs" after a backtick or a slash), so without
    this a name copied from a spec into a command changes id on the way, and a small model must learn
    every such pair before it can copy at all. Matching is by substring, so a longer word that contains
    one splits around it; decode(encode(text)) == text still holds."""
    import sentencepiece as spm
    if not out_path.endswith(".model"):
        out_path += ".model"
    sentences = list(_sentences(texts))
    if not sentences:
        raise ValueError("no training text: the input files hold no text")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, user_defined_symbols=list(special_tokens) + ["\n"] + sorted(set(atomic_words)),
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, hard_vocab_limit=False,
        max_sentence_length=4 * _MAX_PIECE_CHARS + 16, num_threads=1, minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
    return out_path


def train_hf_tokenizer_json(texts: Iterable[str], out_path: str, *, vocab_size: int = 2048,
                            special_tokens: Sequence[str] = GLM45_SPECIAL_TOKENS) -> str:
    """A byte-level BPE `tokenizer.json` (the kind GLM-4.5 ships) with the special tokens as added
    tokens; for tests and experiments with the Hugging Face backend."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_sentences(texts), trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tok.save(out_path)
    return out_path


def expand_inputs(spec: str) -> list[str]:
    paths: list[str] = []
    for pattern in (p for p in spec.split(",") if p):
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"--input pattern {pattern!r} matches no file")
        paths += matched
    return paths


def main(argv: Sequence[str]) -> None:
    from absl import flags
    del argv
    f = flags.FLAGS
    paths = expand_inputs(f.input)
    out = train_sentencepiece((t for p in paths for t in texts_of_file(p)), f.out,
                              vocab_size=f.vocab_size, model_type=f.model_type)
    from klong_jax.data.tokenizer import SentencePieceTokenizer
    logging.info("wrote %s (%d pieces) from %d file(s)", out,
                 SentencePieceTokenizer(out).vocab_size, len(paths))
    print(f"wrote {out} ({SentencePieceTokenizer(out).vocab_size} pieces) from {len(paths)} file(s)")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("input", None, "comma-separated files or globs (.jsonl trajectories or text)")
    flags.DEFINE_string("out", None, "output SentencePiece model path (.model)")
    flags.DEFINE_integer("vocab_size", 2048, "target vocabulary size (smaller on a small corpus)")
    flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type")
    flags.mark_flags_as_required(["input", "out"])
    app.run(main)
