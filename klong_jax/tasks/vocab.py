"""The small closed vocabulary that every task is drawn from.

A tiny SentencePiece model (vocab ~2048) is trained on the generated corpus, so names, words and
numbers come from short fixed lists: the tokenizer then covers them with whole pieces, and a tiny
model sees each word often enough to learn to copy it from the spec into its commands.
"""
import random

COLORS = ("red", "blue", "green", "gold", "gray", "pink", "teal", "plum", "navy", "lime")
ANIMALS = ("fox", "owl", "cat", "dog", "elk", "bee", "ant", "yak", "emu", "eel", "cod", "ram")
FRUITS = ("apple", "pear", "plum", "fig", "lime", "kiwi", "mango", "grape", "melon", "peach")
THINGS = ("stone", "river", "cloud", "lamp", "book", "wheel", "seed", "bell", "coin", "leaf")
DIRECTORIES = ("notes", "docs", "logs", "cards", "items", "parts", "pages", "boxes", "sheets", "trays")
COLUMNS = ("size", "count", "score", "price", "level", "speed", "depth", "width")
MODULES = ("calc", "ops", "utils", "mathx", "tools", "rules")
SEPARATORS = ("-", "_", "+", ":", "/")

# Words used as file names and contents; one pool so spellings repeat across task kinds.
WORDS = tuple(sorted(set(COLORS + ANIMALS + FRUITS + THINGS)))
# Every word a task draws: the embedded tokenizer makes each one a single id (train_tokenizer.atomic_words).
TASK_WORDS = tuple(sorted(set(WORDS + DIRECTORIES + COLUMNS + MODULES)))


def pick(rng: random.Random, pool: tuple[str, ...], k: int) -> list[str]:
    """k distinct entries of `pool` (k <= len(pool)), in random order."""
    if k > len(pool):
        raise ValueError(f"asked for {k} distinct names from a pool of {len(pool)}")
    return rng.sample(pool, k)


def small_int(rng: random.Random, low: int = 1, high: int = 99) -> int:
    return rng.randint(low, high)
