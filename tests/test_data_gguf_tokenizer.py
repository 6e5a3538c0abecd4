"""The tokenizer stored in a GGUF file (tokenizer.ggml.*): a tiny BPE GGUF written here (ids worked out by hand,
and equal to transformers'), and the real SmolLM2-135M-Instruct file against transformers' own GGUF tokenizer."""
import pickle

import pytest
from hypothesis import assume, given, settings, strategies as st

from klong_jax.data.tokenizer import (GGUFTokenizer, byte_alphabet, gguf_tokenizer_json, load_tokenizer,
                                      read_gguf_metadata)
from tokenizer_helpers import (MIXED_CORPUS, TINY_CHAT_TEMPLATE, TINY_CONTROLS, run_reference, smollm2_path,
                               smollm2_reference, tiny_tokens, write_tiny_gguf)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_tokenizer(tiny_path, cache=False)


def _id(token: str) -> int:
    return tiny_tokens()[0].index(token)


def test_byte_alphabet_is_gpt2s():
    a = byte_alphabet()
    assert len(set(a.values())) == 256
    # Printable bytes stand for themselves; the 68 others map to 256.. in byte order: 0x00 -> U+0100,
    # 0x09 (tab) -> U+0109 'ĉ', 0x0a -> U+010A 'Ċ', 0x20 (space) is the 33rd -> U+0120 'Ġ', 0xad -> the 68th.
    assert a[ord("A")] == "A" and a[0xE9] == "é"
    assert (a[0], a[9], a[10], a[32], a[0xAD]) == ("\u0100", "ĉ", "Ċ", "Ġ", chr(256 + 67))


def test_tiny_ids_by_hand(tiny):
    # "hello": h e -> he (merge 0), l l -> ll (1), he ll -> hell (2), hell o -> hello (3): one token.
    # " world": Ġ w -> Ġw (4), o r -> or (5), Ġw or -> Ġwor (6), l d -> ld (7), Ġwor ld -> Ġworld (8).
    assert tiny.encode("hello world") == [_id("hello"), _id("Ġworld")]
    # Merges apply inside a pre-token only: "hello," is "hello" + ","; "he llo" is "he" + " llo", where
    # l l -> ll (merge 1) but no merge joins Ġ with l, nor reaches back across the space to "he".
    assert tiny.encode("hello,") == [_id("hello"), _id(",")]
    assert tiny.encode("he llo") == [_id("he"), _id("Ġ"), _id("ll"), _id("o")]
    # A trailing run of two spaces is one pre-token "ĠĠ" -> merge 9 -> the token the file spells "  ".
    assert tiny.encode("a  ") == [_id("a"), _id("  ")]
    # Non-ASCII: the UTF-8 bytes of 日 (e6 97 a5), each byte's alphabet character.
    alphabet = byte_alphabet()
    assert tiny.encode("日") == [_id(alphabet[b]) for b in "日".encode()]
    assert tiny.vocab_size == len(tiny_tokens()[0]) == 4 + 256 + 9 + 2


def test_tiny_special_and_user_defined_tokens(tiny):
    # Control tokens are special: their ids from special_id, never from text.
    assert [tiny.special_id(t) for t in TINY_CONTROLS[:3]] == [0, 1, 2]
    assert tiny.decode([1, _id("hello"), 2]) == "<|im_start|>hello<|im_end|>"
    text_ids = tiny.encode("<|im_start|>hello")
    assert 1 not in text_ids and text_ids[-1] == _id("hello")
    assert tiny.decode(text_ids) == "<|im_start|>hello"
    # A control token spelled with a space is a converter's mislabel: not special (transformers skips it too).
    assert tiny.special_id("<ctrl x>") is None
    # User-defined tokens are matched whole inside text (as llama.cpp and transformers do): not special.
    assert tiny.encode("a<think>b") == [_id("a"), _id("<think>"), _id("b")]
    assert tiny.special_id("<think>") is None
    # The file's special ids.
    assert (tiny.bos_id, tiny.eos_id, tiny.unk_id, tiny.pad_id) == (1, 2, 0, 2)
    assert tiny.add_bos_token is False and tiny.chat_template == TINY_CHAT_TEMPLATE


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=60) | st.sampled_from(MIXED_CORPUS))
def test_tiny_decode_inverts_encode(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_tiny_pickles_by_content_and_loads_by_extension(tiny, tiny_path, tmp_path):
    clone = pickle.loads(pickle.dumps(tiny))
    assert isinstance(clone, GGUFTokenizer) and isinstance(load_tokenizer(tiny_path, cache=False), GGUFTokenizer)
    for text in MIXED_CORPUS:
        assert clone.encode(text) == tiny.encode(text)
    assert (clone.pad_id, clone.special_id("<|im_end|>"), clone.chat_template) == \
        (tiny.pad_id, tiny.special_id("<|im_end|>"), tiny.chat_template)
    # Pickled by content: the file may be gone in the worker.
    moved = tmp_path / "moved.gguf"
    moved.write_bytes(open(tiny_path, "rb").read())
    tok = GGUFTokenizer(str(moved))
    moved.unlink()
    assert pickle.loads(pickle.dumps(tok)).encode("hello world") == tiny.encode("hello world")


def test_tiny_equals_transformers(tiny, tiny_path):
    texts = MIXED_CORPUS + ["hello world", "a  ", "a<think>b", "x <ctrl x> y"]
    ref = run_reference(tiny_path, texts, [])
    assert ref["vocab_size"] == tiny.vocab_size
    assert ref["special_tokens"] == {t: tiny.special_id(t) for t in TINY_CONTROLS[:3]}
    for text, ids, decoded in zip(texts, ref["encode"], ref["decode"]):
        assert tiny.encode(text) == ids, text
        assert tiny.decode(ids) == decoded == text


def test_unsupported_gguf_tokenizers_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model = 'llama'.*only byte-level BPE"):
        GGUFTokenizer(write_tiny_gguf(str(tmp_path / "spm.gguf"), model="llama"))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre = 'llama-bpe'.*supported: \['default'"):
        GGUFTokenizer(write_tiny_gguf(str(tmp_path / "l3.gguf"), pre="llama-bpe"))
    with pytest.raises(ValueError, match=r"no metadata field 'tokenizer.ggml.merges'"):
        GGUFTokenizer(write_tiny_gguf(str(tmp_path / "nomerges.gguf"), merges=False))
    with pytest.raises(ValueError, match=r"merges\[0\] = 'abc' is not two tokens"):
        gguf_tokenizer_json({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                             "tokenizer.ggml.merges": ["abc"]}, source="x.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        read_gguf_metadata(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_tokenizer(str(tmp_path / "missing.gguf"), cache=False)


# ---------------------------------------------------------------------------------------------
# The real file


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(smollm2_path(), cache=False)


def test_smollm2_fields(smollm2):
    fields = read_gguf_metadata(smollm2_path(), "tokenizer.ggml.")
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert len(fields["tokenizer.ggml.tokens"]) == smollm2.vocab_size == 49152
    assert len(fields["tokenizer.ggml.merges"]) == 48900
    # The 17 control tokens (ids 0..16) are the special tokens.
    controls = [t for t, kind in zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"])
                if kind == 3]
    assert {t: smollm2.special_id(t) for t in controls} == {t: i for i, t in enumerate(controls)}
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.unk_id, smollm2.pad_id) == (1, 2, 0, 2)
    assert smollm2.special_id("<|im_start|>") == 1 and smollm2.special_id("<|im_end|>") == 2
    assert "<|im_start|>" in smollm2.chat_template and smollm2.add_bos_token is False


def test_smollm2_equals_transformers(smollm2):
    ref = smollm2_reference()
    assert ref["vocab_size"] == smollm2.vocab_size
    assert ref["special"] == {"bos": smollm2.bos_id, "eos": smollm2.eos_id, "unk": smollm2.unk_id,
                              "pad": smollm2.pad_id}
    assert ref["special_tokens"] == {t: smollm2.special_id(t) for t in ref["special_tokens"]}
    assert ref["chat_template"] == smollm2.chat_template
    missing = set(smollm2.missing_bytes)
    for text, ids, decoded, matching in zip(MIXED_CORPUS, ref["encode"], ref["decode"],
                                            ref["encode_matching_specials"]):
        assert smollm2.encode(text) == ids, text
        assert smollm2.decode(ids) == decoded
        if not missing & set(text.encode()):
            assert decoded == text
        else:   # both drop the bytes the vocabulary lacks
            kept = bytes(b for b in text.encode() if b not in missing).decode(errors="replace")
            assert decoded == kept
        # transformers' default encode turns special-token strings into special ids; ours never does.
        specials = set(ref["special_tokens"].values())
        if any(t in text for t in ref["special_tokens"]):
            assert specials & set(matching) and not specials & set(ids)
        else:
            assert matching == ids


def test_smollm2_missing_bytes_are_dropped(smollm2):
    # 21 bytes have no token: six ASCII controls, 0xc0 0xc1, 0xf1 0xf2 and 0xf5..0xff (11): 6 + 2 + 2 + 11.
    assert smollm2.missing_bytes == (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2) + \
        tuple(range(0xF5, 0x100))
    # The byte still splits the text into pre-tokens ("a", "\x04", "b") before BPE drops it: "a" and "b" stay apart.
    assert smollm2.encode("\x16") == [] and smollm2.encode("a\x04b") == smollm2.encode("a") + smollm2.encode("b")
    assert len(smollm2.encode("ab")) == 1


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_smollm2_decode_inverts_encode(smollm2, text):
    assume(not set(smollm2.missing_bytes) & set(text.encode()))
    assert smollm2.decode(smollm2.encode(text)) == text
