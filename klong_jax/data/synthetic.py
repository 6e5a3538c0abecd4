"""Synthetic agent trajectories: random but valid episodes with a long prefix (a "paper") and
tool-calling turns. Used by the property tests and by the data benchmark when the embedded task
suite is not available. Deterministic in the seed.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from klong_jax.data.trajectory import Message, ToolCall, Trajectory

WORDS = ("the", "model", "agent", "trains", "paper", "result", "table", "loss", "python", "def",
         "return", "import", "numpy", "as", "np", "for", "in", "range", "experiment", "baseline",
         "accuracy", "figure", "we", "show", "that", "our", "method", "improves", "over", "(", ")",
         "=", ":", ",", ".", "0.5", "42", "x", "y", "data", "train", "test", "é", "λ", "日本")
# Text that quotes the template's own tags must stay text.
TRICKY = ("<|user|>", "</tool_call>", "<arg_value>", "[gMASK]", "<think>", "\t", "  ", "\n\n")
TOOLS = ("bash", "python", "read_file_chunk", "search_file")


def random_text(rng: np.random.Generator, n_words: int, *, tricky: float = 0.02) -> str:
    out = []
    for _ in range(n_words):
        r = rng.random()
        if r < tricky:
            out.append(TRICKY[rng.integers(len(TRICKY))])
        elif r < 0.1:
            out.append("\n")
        else:
            out.append(WORDS[rng.integers(len(WORDS))])
    return " ".join(out)


def _arguments(rng: np.random.Generator, tool: str) -> dict:
    if tool == "bash":
        return {"cmd": random_text(rng, int(rng.integers(1, 8)))}
    if tool == "python":
        return {"code": random_text(rng, int(rng.integers(1, 20)))}
    if tool == "read_file_chunk":
        return {"file": "paper.md", "start_line": int(rng.integers(1, 500)),
                "max_lines": int(rng.integers(1, 50))}
    return {"file": "paper.md", "query": random_text(rng, 2), "context_lines": 2,
            "max_matches": 5, "page": 1, "regex": bool(rng.integers(2))}


def synthetic_trajectory(rng: np.random.Generator, *, traj_id: str = "t0", n_turns: int = 8,
                         prefix_words: int = 200, tool_words: tuple[int, int] = (5, 80),
                         reasoning_words: tuple[int, int] = (0, 30), p_nudge: float = 0.1,
                         p_long_tool: float = 0.05, long_tool_words: int = 2000,
                         submit: bool = True) -> Trajectory:
    """A valid trajectory: system, user (task + paper), then n_turns assistant turns calling 0..2
    tools each (a no-call turn is followed by a user nudge), ending with a submit call."""
    msgs = [Message("system", "You are a research agent. " + random_text(rng, 20)),
            Message("user", f"Task {traj_id}: reproduce the paper.\n" + random_text(rng, prefix_words))]
    call_no = 0
    for j in range(n_turns):
        last = j == n_turns - 1
        reasoning = random_text(rng, int(rng.integers(*reasoning_words))) or None
        content = random_text(rng, int(rng.integers(0, 12)))
        if last and submit:
            calls = (ToolCall(f"call_{call_no}", "submit", {"end_message": random_text(rng, 5)}),)
        elif rng.random() < p_nudge:
            calls = ()
        else:
            calls = tuple(ToolCall(f"call_{call_no + k}", str(tool), _arguments(rng, str(tool)))
                          for k, tool in enumerate(rng.choice(TOOLS, int(rng.integers(1, 3)))))
        call_no += len(calls)
        msgs.append(Message("assistant", content, reasoning, calls))
        for call in calls:
            n = long_tool_words if rng.random() < p_long_tool else int(rng.integers(*tool_words))
            msgs.append(Message("tool", random_text(rng, n), tool_call_id=call.id))
        if not calls and not last:
            msgs.append(Message("user", "Continue: call a tool or submit."))
    return Trajectory(traj_id, f"task_{traj_id}", tuple(msgs), meta={"synthetic": True})


def synthetic_corpus(n: int, *, seed: int = 0, turns: tuple[int, int] = (2, 30),
                     **kwargs) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    return [synthetic_trajectory(rng, traj_id=f"t{i}", n_turns=int(rng.integers(*turns)), **kwargs)
            for i in range(n)]


def texts_of(trajectories: Sequence[Trajectory]) -> Iterator[str]:
    """Every text a tokenizer should learn from (what the chat template renders)."""
    from klong_jax.data.train_tokenizer import trajectory_texts
    return trajectory_texts(trajectories)


def build_tokenizers(directory: str, *, vocab_size: int = 600, n_trajectories: int = 20,
                     seed: int = 0) -> dict:
    """A SentencePiece model and a byte-level BPE tokenizer.json trained on a synthetic corpus:
    {"sp": SentencePieceTokenizer, "hf": HuggingFaceTokenizer}."""
    import os

    from klong_jax.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer
    from klong_jax.data.train_tokenizer import train_hf_tokenizer_json, train_sentencepiece
    texts = list(texts_of(synthetic_corpus(n_trajectories, seed=seed)))
    sp = train_sentencepiece(texts, os.path.join(directory, "sp.model"), vocab_size=vocab_size)
    hf = train_hf_tokenizer_json(texts, os.path.join(directory, "tokenizer.json"),
                                 vocab_size=vocab_size)
    return {"sp": SentencePieceTokenizer(sp), "hf": HuggingFaceTokenizer(hf)}
