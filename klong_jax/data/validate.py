"""Validates trajectory JSONL files: `python -m klong_jax.data.validate FILE.jsonl ...` prints every
problem as `file:line: field: message` and exits 1 if there is any."""
import sys

from klong_jax.data.trajectory import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
