"""Builders for attention test inputs: random q/k/v and packed / shared-prefix id rows.

Used by tests/test_kernels_*.py and launch/benchmarks/attention.py; also handy for model-level tests.
Shape letters (klong_jax/models/__init__.py): N query heads, K kv heads, H head dim.
"""
import jax
import jax.numpy as jnp
import numpy as np


def random_qkv(seed: int, B: int, T: int, N: int, K: int, H: int, dtype=jnp.float32):
    """q [B, T, N, H], k and v [B, T, K, H]."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32).astype(dtype)
    return q, k, v


def packed_row(T: int, docs) -> tuple[np.ndarray, np.ndarray]:
    """doc_ids and window_ids [T] for one packed row; the tail after the documents is padding (doc 0).

    docs: a list of (prefix_len, [window_len, ...]) per document, laid out as
    [prefix][window 1][window 2]... with doc ids 1, 2, ... and window ids 0 (prefix), 1, 2, ...
    A document without windows, (length, []), is an ordinary packed example.
    """
    doc = np.zeros(T, np.int32)
    win = np.zeros(T, np.int32)
    at = 0
    for d, (prefix, windows) in enumerate(docs, start=1):
        doc[at:at + prefix] = d
        at += prefix
        for w, length in enumerate(windows, start=1):
            doc[at:at + length] = d
            win[at:at + length] = w
            at += length
    if at > T:
        raise ValueError(f"documents take {at} tokens, more than the row's {T}")
    return doc, win


def packed_batch(T: int, rows) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[B, T] doc_ids and window_ids from one `docs` list (see packed_row) per row."""
    built = [packed_row(T, docs) for docs in rows]
    return jnp.asarray(np.stack([d for d, _ in built])), jnp.asarray(np.stack([w for _, w in built]))


class Case:
    """One attention test configuration (shapes, mask, block sizes)."""

    def __init__(self, name, *, B, T, N, K, H, causal=True, rows=None, windows=False, block_q=128, block_k=128):
        self.name, self.B, self.T, self.N, self.K, self.H = name, B, T, N, K, H
        self.causal, self.rows, self.windows = causal, rows, windows
        self.block_q, self.block_k = block_q, block_k

    def __repr__(self):
        return self.name

    def inputs(self, dtype=jnp.float32, seed=0):
        """(q, k, v, mask kwargs) for this case."""
        q, k, v = random_qkv(seed, self.B, self.T, self.N, self.K, self.H, dtype)
        kw = dict(causal=self.causal)
        if self.rows is not None:
            doc, win = packed_batch(self.T, self.rows)
            kw["doc_ids"] = doc
            if self.windows:
                kw["window_ids"] = win
        return q, k, v, kw


def value_and_grads(attention_fn, q, k, v, **kw):
    """(o, (dq, dk, dv)) of a fixed random projection of the output, under jit, all in fp32."""
    weight = jax.random.normal(jax.random.key(7), q.shape[1:], jnp.float32)

    def loss(q, k, v):
        o = attention_fn(q, k, v, **kw).astype(jnp.float32)
        return jnp.sum(o * weight), o

    grads, o = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, tuple(g.astype(jnp.float32) for g in grads)
