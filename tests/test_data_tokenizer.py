"""Tokenizer backends: SentencePiece (trained by the project command) and a tokenizer.json built here
with the `tokenizers` library."""
import os
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from klong_jax.data.chat_template import GLM45_SPECIAL_TOKENS, TEMPLATE_TOKENS, Glm45Template
from klong_jax.data.synthetic import synthetic_corpus, texts_of
from klong_jax.data.tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer,
                                      load_tokenizer)
from klong_jax.data.train_tokenizer import train_hf_tokenizer_json
from klong_jax.data.trajectory import write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = synthetic_corpus(20, seed=0)
    write_jsonl(str(d / "corpus.jsonl"), corpus)
    (d / "notes.md").write_text("Some notes about the method.\nAnd a second line.\n")
    # The project command, as a user runs it.
    out = subprocess.run(
        [sys.executable, "-m", "klong_jax.data.train_tokenizer",
         f"--input={d}/corpus.jsonl,{d}/*.md", f"--out={d}/sp.model", "--vocab_size=600"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    hf_path = train_hf_tokenizer_json(texts_of(corpus), str(d / "tokenizer.json"), vocab_size=600)
    return {"sp": SentencePieceTokenizer(str(d / "sp.model")), "hf": HuggingFaceTokenizer(hf_path)}


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_special_tokens_are_single_ids(toks, kind):
    tok = toks[kind]
    ids = tok.special_ids(GLM45_SPECIAL_TOKENS)
    assert len(set(ids.values())) == len(GLM45_SPECIAL_TOKENS)
    for token, i in ids.items():
        assert tok.decode([i]) == token
    assert 0 <= tok.pad_id < tok.vocab_size


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_text_never_encodes_to_special_ids(toks, kind):
    tok = toks[kind]
    specials = set(tok.special_ids(TEMPLATE_TOKENS).values())
    text = "quote: <|user|> and </tool_call><arg_value>[gMASK]<think>x</think>"
    ids = tok.encode(text)
    assert not specials & set(ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", ["sp", "hf"])
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60) | st.sampled_from(["", " ", "\n\n", "  a\tb ", "日本語 λ é"]))
def test_decode_inverts_encode(toks, kind, text):
    tok = toks[kind]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_pickles_by_content(toks, kind, tmp_path):
    tok = toks[kind]
    clone = pickle.loads(pickle.dumps(tok))
    text = "def f(x):\n    return x  # <|user|>"
    assert clone.encode(text) == tok.encode(text)
    assert clone.special_id("<|assistant|>") == tok.special_id("<|assistant|>")


def test_load_tokenizer_dispatch(toks, tmp_path):
    hf_dir = tmp_path / "glm"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text(toks["hf"]._json)
    assert isinstance(load_tokenizer(str(hf_dir), cache=False), HuggingFaceTokenizer)
    with pytest.raises(ValueError, match="expected a SentencePiece"):
        load_tokenizer(str(tmp_path / "vocab.txt"), cache=False)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing.model"), cache=False)


def test_missing_template_tokens_are_named(tmp_path):
    path = train_hf_tokenizer_json(["plain text only"] * 20, str(tmp_path / "t.json"),
                                   vocab_size=300, special_tokens=["<|endoftext|>", "<|user|>"])
    with pytest.raises(ValueError, match=r"no special token\(s\) \['\[gMASK\]'"):
        Glm45Template(HuggingFaceTokenizer(path))


def test_only_special_added_tokens_are_special(toks, tmp_path):
    """An added token marked special=False (Qwen's `<think>`) is text: `encode` matches it inside text (as
    transformers does), so it is not a special id; special added tokens stay out of encoded text."""
    from tokenizers import AddedToken, Tokenizer
    tok = Tokenizer.from_str(toks["hf"]._json)
    tok.add_tokens([AddedToken("<note>", special=False, normalized=False)])
    hf = HuggingFaceTokenizer(json_str=tok.to_str())
    note = tok.token_to_id("<note>")
    assert hf.special_id("<note>") is None and hf.encode("a<note>b").count(note) == 1
    assert hf.special_id("<|user|>") is not None and hf.special_id("<|user|>") not in hf.encode("a<|user|>b")


def test_atomic_words_keep_one_id_whatever_precedes_them(tmp_path):
    """A task word copied from a spec ("`logs`", "logs/x") into a command ("mkdir -p logs") is the same
    id in both places, so copying it is copying an id; tag tokens in text are still not forged."""
    from klong_jax.data.synthetic import synthetic_corpus, texts_of
    from klong_jax.data.train_tokenizer import train_sentencepiece
    words = ("logs", "wheel", "seed")
    texts = list(texts_of(synthetic_corpus(20, seed=0))) + ["mkdir -p logs", "`logs/seed.txt`: `wheel`"] * 5
    plain = SentencePieceTokenizer(train_sentencepiece(texts, str(tmp_path / "plain.model"), vocab_size=600))
    atomic = SentencePieceTokenizer(train_sentencepiece(texts, str(tmp_path / "atomic.model"), vocab_size=600,
                                                        atomic_words=words))
    spaced, quoted = "mkdir -p logs", "directory `logs`/ wheel`wheel`seed"
    for word in words:
        [word_id] = atomic.encode(word)
        assert word_id in atomic.encode(" " + word) and word_id in atomic.encode("`" + word)
    assert atomic.encode(spaced)[-1] in atomic.encode(quoted)
    assert plain.encode(spaced)[-1] not in plain.encode(quoted)   # without: " logs" is another piece
    for text in (spaced, quoted, "required code <think>x</think> logs"):
        assert atomic.decode(atomic.encode(text)) == text
    assert atomic.special_id("logs") is None
    assert atomic.special_id("<think>") not in atomic.encode("<think>")
