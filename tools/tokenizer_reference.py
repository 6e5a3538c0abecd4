"""Hugging Face reference side of the GGUF tokenizer and ChatML template tests. Runs in the Python 3.11
reference env (transformers 5.x + gguf), never in the project env:

  python tools/tokenizer_reference.py GGUF_FILE REQUEST.json OUT.json

loads `AutoTokenizer.from_pretrained(dir, gguf_file=name)` and answers the request
`{"texts": [str, ...], "conversations": [[{"role", "content"}, ...], ...]}` with

  {"class": tokenizer class name, "vocab_size": len(tokenizer),
   "special": {"bos": id, "eos": id, "unk": id, "pad": id},
   "special_tokens": {token: id for every added token marked special},
   "chat_template": the template string,
   "encode": [ids of each text, split_special_tokens=True (special-token strings stay text)],
   "encode_matching_specials": [ids of each text as transformers encodes it by default],
   "decode": [decode(encode[i]) for each text],
   "chat": [{"plain": apply_chat_template(c, tokenize=True),
             "generation": apply_chat_template(c, tokenize=True, add_generation_prompt=True)}, ...]}

No special tokens are added around texts (add_special_tokens=False); the chat ids are what the model's own
template writes.
"""
import json
import os
import sys


def _ids(value) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding holding input_ids, depending on the version."""
    if isinstance(value, dict) or hasattr(value, "keys"):
        value = value["input_ids"]
    return [int(i) for i in value]


def main(gguf_path: str, request_path: str, out_path: str) -> None:
    from transformers import AutoTokenizer
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    directory, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    texts = request.get("texts", [])
    encoded = [tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in texts]
    out = {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "special": {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id,
                    "pad": tok.pad_token_id},
        "special_tokens": {t.content: int(i) for i, t in tok.added_tokens_decoder.items() if t.special},
        "chat_template": tok.chat_template,
        "encode": encoded,
        "encode_matching_specials": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
        "decode": [tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                   for ids in encoded],
        "chat": [{"plain": _ids(tok.apply_chat_template(c, tokenize=True)),
                  "generation": _ids(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True))}
                 for c in request.get("conversations", [])],
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
