"""transformers side of the GGUF parity tests. Runs in the Python 3.11 reference env (.venv-hfref: torch CPU,
transformers 5.x, gguf, accelerate) — never in the project env (no torch there).

  python tools/gguf_reference.py GGUF OUT_DIR --ids=IDS.npy [--new_tokens=N] [--float64_logits]
  python tools/gguf_reference.py GGUF OUT_DIR --chat=TEXT --prompt_len=P [--new_tokens=N] [--float64_logits]
  python tools/gguf_reference.py HF_DIR OUT_DIR --ids=IDS.npy          (a HF checkpoint directory instead)

Loads GGUF with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)`
(transformers dequantizes it and undoes llama.cpp's Q/K row order itself), or a HF directory with
`AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)`, and writes to OUT_DIR:
  ids.npy        [B, T] int32, the inputs: IDS, or (--chat) the GGUF tokenizer's ChatML rendering of one user
                 message TEXT with the generation prompt, cut to its last P tokens (B = 1)
  logits.npy     [B, T, V] float32 logits of one forward pass over ids
  logits64.npy   [B, T, V] float64 logits of the same pass in float64 (with --float64_logits)
  generated.npy  [B, N] int32, with N > 0: greedy `generate` (do_sample=False, max_new_tokens=N, the model's
                 eos stops a row) from each row alone; -1 after a row stopped
  info.json      versions, the model class, timings
"""
import argparse
import copy
import json
import os
import time

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", help="a .gguf file, or a HF checkpoint directory")
    p.add_argument("out_dir")
    p.add_argument("--ids", help="[B, T] int .npy of input ids")
    p.add_argument("--chat", help="a user message, rendered with the GGUF's chat template")
    p.add_argument("--prompt_len", type=int, default=0, help="with --chat: keep the last P tokens")
    p.add_argument("--new_tokens", type=int, default=0, help="greedy tokens to generate per row (0: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: a shared 2-core machine decodes ~10x faster than with 2)")
    p.add_argument("--float64_logits", action="store_true",
                   help="also write logits64.npy: the same forward pass in float64 (the fp32 error bound)")
    args = p.parse_args()
    if (args.ids is None) == (args.chat is None):
        p.error("give exactly one of --ids and --chat")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    if os.path.isdir(args.gguf):
        folder, name, kw = args.gguf, None, {}
    else:
        folder, name = os.path.split(os.path.abspath(args.gguf))
        kw = {"gguf_file": name}
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    load_s = time.time() - t0
    if args.chat is not None:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        ids = tok.apply_chat_template([{"role": "user", "content": args.chat}], add_generation_prompt=True,
                                      return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        if len(ids) < args.prompt_len:
            raise SystemExit(f"--chat renders to {len(ids)} tokens, fewer than --prompt_len={args.prompt_len}")
        ids = np.asarray([ids[-args.prompt_len:] if args.prompt_len else ids], np.int32)
    else:
        ids = np.load(args.ids).astype(np.int32)
    np.save(os.path.join(args.out_dir, "ids.npy"), ids)
    t0 = time.time()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).long()).logits.float().numpy()
    np.save(os.path.join(args.out_dir, "logits.npy"), logits)
    forward_s = time.time() - t0
    if args.float64_logits:  # the same (dequantized) weights, every operation in float64
        model64 = copy.deepcopy(model).to(torch.float64)
        with torch.no_grad():
            np.save(os.path.join(args.out_dir, "logits64.npy"),
                    model64(torch.from_numpy(ids).long()).logits.double().numpy())
        del model64
    t0 = time.time()
    if args.new_tokens:
        gen = np.full((ids.shape[0], args.new_tokens), -1, np.int32)
        for b in range(ids.shape[0]):
            prompt = torch.from_numpy(ids[b:b + 1]).long()
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=args.new_tokens,
                                     pad_token_id=model.config.pad_token_id)
            new = out[0, ids.shape[1]:].numpy()
            gen[b, :len(new)] = new
        np.save(os.path.join(args.out_dir, "generated.npy"), gen)
    with open(os.path.join(args.out_dir, "info.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "model_class": type(model).__name__, "load_s": load_s,
                   "forward_s": forward_s, "generate_s": time.time() - t0,
                   "eos_token_id": model.generation_config.eos_token_id}, f, indent=2)


if __name__ == "__main__":
    main()
