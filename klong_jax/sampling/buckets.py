"""Static shapes: lengths and batch sizes rounded up to a few buckets, so requests reuse compilations."""
import math


def length_bucket(n: int, minimum: int = 16) -> int:
    """The smallest of {minimum} and {2^k, 3 * 2^(k-1)} (16, 24, 32, 48, 64, 96, ...) that holds n.

    At most a third of a bucket is padding, with two buckets per doubling.
    """
    if n < 1:
        raise ValueError(f"length {n} must be >= 1")
    if n <= minimum:
        return minimum
    p = 1 << (n - 1).bit_length()      # next power of two >= n
    three_quarters = 3 * p // 4
    return three_quarters if n <= three_quarters and three_quarters >= minimum else p


def batch_bucket(n: int, minimum: int = 1) -> int:
    """A power of two >= n, and a multiple of `minimum` (the devices the batch is sharded over)."""
    if n < 1:
        raise ValueError(f"batch size {n} must be >= 1")
    b = 1 << (n - 1).bit_length()
    return max(b, minimum) if max(b, minimum) % minimum == 0 else math.lcm(b, minimum)
