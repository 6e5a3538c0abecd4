"""Benchmarks: `python launch/bench.py NAME [--flags]` prints one JSON object (and --out=FILE writes it).

Each benchmark lives in launch/benchmarks/NAME.py and exposes `run(argv) -> dict`; ratios are always
against a baseline measured in the same run.
"""
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BENCHMARKS = ("attention", "data", "train_step", "sampler", "rl_step")


def main(argv):
    if len(argv) < 2 or argv[1] not in BENCHMARKS:
        print(f"usage: bench.py {{{'|'.join(BENCHMARKS)}}} [--out=FILE] [benchmark flags]")
        return 2
    name, rest = argv[1], argv[2:]
    out = None
    for a in list(rest):
        if a.startswith("--out="):
            out = a.split("=", 1)[1]
            rest.remove(a)
    try:
        module = importlib.import_module(f"launch.benchmarks.{name}")
    except ModuleNotFoundError as e:
        print(f"benchmark {name!r} is not built yet ({e})")
        return 2
    result = {"benchmark": name, **module.run(rest)}
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
