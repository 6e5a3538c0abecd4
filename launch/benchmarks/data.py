"""Data pipeline throughput and packing efficiency.

    .venv/bin/python launch/bench.py data [--n=16 --budget=1024 --seq_len=2048 --epochs=3]

JSONL -> validate -> tokenize (SentencePiece or a byte-level BPE tokenizer.json, trained here on
the same data, untimed) -> split
(ContextPolicy) -> pack -> batch, in one process with one map thread. Reports tokens per CPU-second
(process CPU time, so "per core"), and packing efficiency (real tokens / row tokens) with
shared-prefix and with standard packing over the same windows.

Data: expert trajectories from the embedded task suite (`klong_jax.tasks.generate`) when that
package is present, and synthetic prefix-heavy trajectories (a long "paper" prefix) in every case;
the JSON says which is which.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from klong_jax.data.chat_template import make_chat_template
from klong_jax.data.context import ContextConfig
from klong_jax.data.pipeline import DataConfig, make_dataset, make_rows
from klong_jax.data.synthetic import synthetic_corpus, texts_of
from klong_jax.data.train_tokenizer import (texts_of_file, train_hf_tokenizer_json,
                                            train_sentencepiece)
from klong_jax.data.tokenizer import load_tokenizer
from klong_jax.data.trajectory import read_jsonl, split_turns, write_jsonl


def _task_trajectories(out_dir: str, n: int, length: int) -> str | None:
    try:
        from klong_jax.tasks.generate import generate_dataset
    except ImportError:
        return None
    generate_dataset(out_dir, n, seed=0, split="train", difficulty=2, length=length)
    return os.path.join(out_dir, "trajectories.jsonl")


def _measure(path: str, tokenizer: str, args, packing: str, trajectory_tokens: int) -> dict:
    cfg = DataConfig(tokenizer=tokenizer, paths=(path,), seq_len=args.seq_len,
                     batch_size=args.batch_size, packing=packing, num_epochs=args.epochs,
                     pack_chunk=args.pack_chunk, shard_index=0, shard_count=1, seed=0,
                     drop_remainder=False,
                     context=ContextConfig(budget_tokens=args.budget, reserve_tokens=args.reserve))
    list(make_rows(cfg))   # warm-up: tokenizer load, page cache
    wall, cpu = time.perf_counter(), time.process_time()
    batches = list(make_dataset(cfg))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    real = sum(int((b["doc_ids"] > 0).sum()) for b in batches)
    trained = sum(int(b["loss_mask"].sum()) for b in batches)
    rows_it = iter(make_rows(cfg))
    for _ in rows_it:
        pass
    c = rows_it.counters
    return {
        "batches": len(batches), "rows": c.pack.rows, "windows": c.pack.windows,
        "trajectories": c.trajectories, "real_tokens": real, "trained_tokens": trained,
        "row_tokens": c.pack.row_tokens, "prefix_tokens_saved": c.pack.prefix_tokens_saved,
        "packing_efficiency": round(c.pack.efficiency, 4),
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        # Trajectory tokens: the plain rendering of every trajectory read (comparable across modes).
        "trajectory_tokens_per_cpu_s": round(trajectory_tokens / cpu),
        "real_tokens_per_cpu_s": round(real / cpu),
        "row_tokens_per_cpu_s": round(c.pack.row_tokens / cpu),
    }


def _dataset_report(name: str, path: str, tokenizer: str, args) -> dict:
    trajectories = list(read_jsonl(path))
    turns = [sum(m.role == "assistant" for m in t.messages) for t in trajectories]
    template = make_chat_template(load_tokenizer(tokenizer))
    lengths = [len(template.render(t.messages)) for t in trajectories]
    prefixes = [len(template.render(split_turns(t.messages)[0])) for t in trajectories]
    shared = _measure(path, tokenizer, args, "shared_prefix", sum(lengths) * args.epochs)
    standard = _measure(path, tokenizer, args, "standard", sum(lengths) * args.epochs)
    return {
        "data": name, "trajectories": len(trajectories),
        "assistant_turns_mean": round(sum(turns) / len(turns), 1),
        "trajectory_tokens_mean": round(sum(lengths) / len(lengths)),
        "prefix_tokens_mean": round(sum(prefixes) / len(prefixes)),
        "windows_per_trajectory": round(shared["windows"] / shared["trajectories"], 2),
        "shared_prefix": shared, "standard": standard,
        "rows_saved_by_shared_prefix": round(1 - shared["rows"] / standard["rows"], 4),
    }


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="bench.py data")
    p.add_argument("--n", type=int, default=16, help="trajectories per data set")
    p.add_argument("--task_length", type=int, default=24, help="rubric steps per generated task")
    p.add_argument("--budget", type=int, default=2048, help="context budget C (tokens)")
    p.add_argument("--reserve", type=int, default=256, help="reserve tokens for the next turn")
    p.add_argument("--seq_len", type=int, default=4096, help="row length T")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--pack_chunk", type=int, default=16)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--backend", choices=["sentencepiece", "huggingface"], default="sentencepiece",
                   help="tokenizer backend (trained here on the benchmark data)")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="klong_bench_data_")
    datasets = {}
    tasks_path = _task_trajectories(os.path.join(work, "tasks"), args.n, args.task_length)
    if tasks_path is not None:
        datasets["embedded_tasks"] = tasks_path
    synth = synthetic_corpus(args.n, seed=0, turns=(20, 60), prefix_words=900, tool_words=(5, 60),
                             p_long_tool=0.05, long_tool_words=1500)
    datasets["synthetic_prefix_heavy"] = os.path.join(work, "synthetic.jsonl")
    write_jsonl(datasets["synthetic_prefix_heavy"], synth)
    texts = list(texts_of(synth))
    if tasks_path is not None:
        texts += list(texts_of_file(tasks_path))
    if args.backend == "sentencepiece":
        tokenizer = train_sentencepiece(texts, os.path.join(work, "tok.model"),
                                        vocab_size=args.vocab_size)
    else:
        tokenizer = train_hf_tokenizer_json(texts, os.path.join(work, "tokenizer.json"),
                                            vocab_size=args.vocab_size)
    try:
        results = [_dataset_report(name, path, tokenizer, args) for name, path in datasets.items()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"config": vars(args), "cpu_count": os.cpu_count(),
            "embedded_tasks_available": tasks_path is not None, "results": results}
