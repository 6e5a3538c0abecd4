"""Per-command overhead of the sandbox: the median wall time of `Sandbox.run("true")`, per backend.

    sudo .venv/bin/python tools/sandbox_overhead.py [--n=100] [--backends=bwrap,unshare] [--disk_mib=0]

Runs from any checkout (it imports the klong_jax next to this file), so the same script measures an older
commit from a git worktree. Prints one line per backend: median, p10, p90 in milliseconds, and the time to
create and close a sandbox.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from klong_jax.sandbox import Sandbox, SandboxLimits  # noqa: E402


def measure(backend: str, n: int, disk_mib: int) -> dict:
    limits = SandboxLimits(disk_bytes=disk_mib << 20) if disk_mib else SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="klong_overhead_") as scratch:
        started = time.perf_counter()
        sb = Sandbox(os.path.join(scratch, "ep"), limits=limits, backend=backend)
        create_s = time.perf_counter() - started
        try:
            for _ in range(5):  # warm-up: page cache, first-use imports
                sb.run("true")
            times = []
            for _ in range(n):
                res = sb.run("true")
                if res.exit_code != 0:
                    raise RuntimeError(f"`true` failed in the {backend} sandbox: {res}")
                times.append(res.wall_s)
        finally:
            started = time.perf_counter()
            sb.close()
            close_s = time.perf_counter() - started
    q = statistics.quantiles(times, n=10)
    return {"backend": backend, "median_ms": 1e3 * statistics.median(times), "p10_ms": 1e3 * q[0],
            "p90_ms": 1e3 * q[-1], "create_ms": 1e3 * create_s, "close_ms": 1e3 * close_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="commands per backend")
    parser.add_argument("--backends", default="bwrap,unshare")
    parser.add_argument("--disk_mib", type=int, default=0, help="episode disk limit (0: none)")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        r = measure(backend, args.n, args.disk_mib)
        print(f"{r['backend']:8s} median {r['median_ms']:6.1f} ms  p10 {r['p10_ms']:6.1f}  "
              f"p90 {r['p90_ms']:6.1f}  (n={args.n}; create {r['create_ms']:.0f} ms, "
              f"close {r['close_ms']:.0f} ms)", flush=True)


if __name__ == "__main__":
    main()
