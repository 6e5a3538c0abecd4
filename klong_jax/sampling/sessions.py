"""Sessions: a KV cache kept from call to call, so that a context that grows turn by turn is prefilled once.

    completions = sampler.generate(prompts, params, session_ids=[episode_id, ...])
    sampler.end_session(episode_id)

A Sampler owns one SessionCache (it shares the sampler's weights, lock and compiled decode loop). Its device
state is one persistent decode batch: a cache of R rows x S slots, and ONE write index w common to all rows.
Each row holds at most one session; on the host each row keeps
  tokens_r    the token ids whose k/v are in its cache, in context order (token j has RoPE position j),
  slots_r     the slot of each of them (increasing), and valid_RS (True exactly at those slots, all < w),
  routing_r   [L_moe, len(tokens_r), k] the experts each cached token was routed to when it was computed.

A call, for each requested session (row r, prompt p of length L):
  1. keep = the longest common prefix of tokens_r and p, at most L - 1 (the last prompt token is always run:
     its logits sample token 0); the slots of tokens_r[keep:] are marked invalid (a ContextPolicy drop, a
     forced end-of-turn token: everything from the first changed token is recomputed).
  2. the m = L - keep new tokens go into k = ceil(max_r m_r / C) chunk calls of C columns each
     (decode.append_chunk at slots [w + jC, w + (j+1)C)); each row's new tokens are right-aligned in the kC
     columns (left padding marked invalid), so every row's last prompt token is the last column of the last
     call and its logits are those of that column. Positions are explicit (keep, ..., L - 1), so a row's
     tokens compute exactly what a fresh prefill of p computes: the same keys at the same positions,
     masked by validity and slot order (a query at slot s sees the valid slots <= s).
  3. decode.start_decode samples token 0 and the Sampler's decode loop generates token i at slot
     w' + i (w' = w + kC). A row keeps the generated tokens that were fed (their k/v written): token i with
     i < fed (fed = the columns written: the last sampled token of the longest row is never fed unless
     routing asks for it); slots of finished rows' later (garbage) writes stay invalid. w = w' + fed.
Before step 2, when w + kC + N > S (N: the new-token bucket), the cache is compacted (decode.gather_slots:
each row's valid slots gathered to the front, in order; a copy, so exact; w = max_r len(tokens_r)); if it still
does not fit, the rows holding the most cached tokens lose their cache (recomputed from scratch) until it fits.
R, S and C are fixed, so a rollout compiles append / start / gather / decode once each; a request that needs
a bigger R or S (more sessions in one call than rows, a longer prompt) grows them and drops every cache.

Sessions not in a call keep their rows and caches untouched (their chunk columns are padding, their decode
rows are done from the start, and nothing of theirs below w is written). When all rows are taken, a new
session takes the row of the least recently used session not in the call.
Prompt routing (return_prompt_routing) is routing_r of the prompt's tokens: cached ones as computed when
they entered the cache (prefill chunk, or fed while generating), new ones from this call's chunks.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from klong_jax.sampling import decode
from klong_jax.sampling.buckets import batch_bucket, length_bucket


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-d integer arrays."""
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


class SessionCache:
    """The persistent decode batch of a Sampler (see the module docstring). Use it through
    `Sampler.generate(..., session_ids=...)`, `Sampler.end_session` and `Sampler.update_params`."""

    def __init__(self, sampler, *, chunk: int, slots: int | None):
        self.sampler = sampler
        self.cfg = sampler.cfg
        self.C = int(chunk)
        self._slots_asked = slots
        self.R = 0                                # rows (0: nothing allocated yet)
        self.S = 0                                # slots per row
        self.w = 0                                # the common write index: every valid slot is < w
        self.cache = None
        self.valid_RS = np.zeros((0, 0), bool)
        self.session_of: list = []                # row -> session id or None
        self.row_of: dict = {}                    # session id -> row
        self.tokens: list[np.ndarray] = []
        self.slots: list[np.ndarray] = []
        self.routing: list[np.ndarray | None] = []
        self.last_used: list[int] = []
        self._calls = 0
        self.has_moe = self.cfg.num_moe_layers > 0
        self._r_dtype = decode.routing_dtype(self.cfg.n_routed_experts) if self.has_moe else None
        g = sampler.graphdef
        self.append_fn = jax.jit(lambda params, cache, chunk, w: decode.append_chunk(g, params, cache, chunk, w),
                                 donate_argnums=(1,))
        self.start_fn = jax.jit(
            lambda params, cache, logits, batch, w, max_new, routing: decode.start_decode(
                g, params, cache, logits, batch, w, max_new=max_new, routing=routing),
            static_argnums=(5, 6), donate_argnums=(1,))
        self.gather_fn = jax.jit(decode.gather_slots, donate_argnums=(0,))
        self.init_fn = jax.jit(lambda params, R, S: nnx.merge(g, params).init_cache(R, S), static_argnums=(1, 2))

    # ------------------------------------------------------------------------------------------
    # Host bookkeeping

    def default_slots(self) -> int:
        """S when not given: C * ceil((3/2 P0 + N0) / C) + C, P0 / N0 the sampler's prompt / new-token floors."""
        if self._slots_asked is not None:
            return int(self._slots_asked)
        s = self.sampler
        return self.C * math.ceil((3 * s.min_prompt_bucket // 2 + s.min_new_bucket) / self.C) + self.C

    def _clear_row(self, r: int) -> None:
        self.tokens[r] = np.zeros(0, np.int32)
        self.slots[r] = np.zeros(0, np.int32)
        self.routing[r] = None
        self.valid_RS[r] = False

    def _truncate(self, r: int, keep: int) -> None:
        """Row r keeps its first `keep` cached tokens; the slots of the others become invalid."""
        self.valid_RS[r, self.slots[r][keep:]] = False
        self.tokens[r], self.slots[r] = self.tokens[r][:keep], self.slots[r][:keep]
        if self.routing[r] is not None:
            self.routing[r] = self.routing[r][:, :keep]

    def invalidate_all(self) -> None:
        """Every session keeps its row but loses its cached tokens (new weights: the k/v are stale)."""
        for r in range(self.R):
            self._clear_row(r)
        self.w = 0
        self.sampler.stats["invalidations"] += 1

    def end(self, session_id) -> None:
        r = self.row_of.pop(session_id, None)
        if r is not None:
            self.session_of[r] = None
            self._clear_row(r)

    def _allocate(self, R: int, S: int) -> None:
        """A fresh cache of R rows x S slots; sessions keep rows < R, every cache is dropped."""
        old = self.session_of
        self.R, self.S, self.w = R, S, 0
        self.valid_RS = np.zeros((R, S), bool)
        self.session_of = [old[r] if r < len(old) else None for r in range(R)]
        self.row_of = {sid: r for r, sid in enumerate(self.session_of) if sid is not None}
        self.tokens = [np.zeros(0, np.int32) for _ in range(R)]
        self.slots = [np.zeros(0, np.int32) for _ in range(R)]
        self.routing = [None] * R
        self.last_used = [0] * R
        self.cache = None      # free the old buffers before the new ones are made
        with self.sampler._mesh_context():
            self.cache = self.init_fn(self.sampler.state, R, S)

    def _row_for(self, sid, in_call: set) -> int:
        if sid in self.row_of:
            return self.row_of[sid]
        free = [r for r in range(self.R) if self.session_of[r] is None]
        if free:
            r = free[0]
        else:   # the least recently used session not in this call gives its row up
            r = min((r for r in range(self.R) if self.session_of[r] not in in_call), key=lambda r: self.last_used[r])
            del self.row_of[self.session_of[r]]
            self._clear_row(r)
            self.sampler.stats["evicted_sessions"] += 1
        self.session_of[r], self.row_of[sid] = sid, r
        return r

    def _compact(self) -> None:
        """Each row's valid slots gathered to slots [0, n_r) in order; w = max_r n_r."""
        src_RS = np.zeros((self.R, self.S), np.int32)
        for r in range(self.R):
            n = len(self.slots[r])
            src_RS[r, :n] = self.slots[r]
            self.slots[r] = np.arange(n, dtype=np.int32)
        self.valid_RS = np.arange(self.S)[None, :] < np.array([len(s) for s in self.slots])[:, None]
        with self.sampler._mesh_context():
            self.cache = self.gather_fn(self.cache, self.sampler._put({"src_BS": src_RS})["src_BS"])
        self.w = max(len(s) for s in self.slots)
        self.sampler.stats["compactions"] += 1

    # ------------------------------------------------------------------------------------------
    # Generation

    def generate(self, prompts, per_row, session_ids) -> list:
        s = self.sampler
        n = len(prompts)
        if len(session_ids) != n:
            raise ValueError(f"session_ids has {len(session_ids)} ids for {n} prompts: give one per prompt")
        if len(set(session_ids)) != n:
            dup = sorted({str(x) for x in session_ids if session_ids.count(x) > 1})
            raise ValueError(f"session_ids={dup} appear more than once in one call: a session has one context")
        C = self.C
        N = length_bucket(max(sp.max_new_tokens for sp in per_row), s.min_new_bucket)
        # Room for the longest prompt alone (every cache dropped, w = 0) and its turn.
        need_S = C * math.ceil(max(len(p) for p in prompts) / C) + N
        R = max(self.R, batch_bucket(n, s.min_batch))
        if R != self.R or need_S > self.S:
            S = max(self.S, self.default_slots())
            if need_S > S:
                S = need_S + C * math.ceil(S // 2 / C)
            if self.R:
                s.stats["regrows"] += 1
            self._allocate(R, S)
        self._calls += 1
        in_call = set(session_ids)
        rows = [self._row_for(sid, in_call) for sid in session_ids]
        arrays = [np.asarray(p, np.int32) for p in prompts]
        keep = {}
        for r, p in zip(rows, arrays):
            self.last_used[r] = self._calls
            keep[r] = min(common_prefix(self.tokens[r], p), len(p) - 1)
            self._truncate(r, keep[r])

        def fits():
            k = math.ceil(max(len(p) - keep[r] for r, p in zip(rows, arrays)) / C)
            return self.w + k * C + N <= self.S

        if not fits():
            self._compact()
            while not fits():    # drop the largest caches (need_S guarantees that all dropped fits)
                r = max(range(self.R), key=lambda r: len(self.slots[r]))
                if not len(self.slots[r]):
                    raise RuntimeError(f"session cache: {self.S} slots hold no turn of this call (a bug)")
                if r in keep:
                    keep[r] = 0
                self._clear_row(r)
                self.w = max(len(x) for x in self.slots)
                s.stats["evicted_caches"] += 1
        k = math.ceil(max(len(p) - keep[r] for r, p in zip(rows, arrays)) / C)
        K = k * C
        w0 = self.w
        ids_RK = np.full((self.R, K), self.cfg.pad_token_id or 0, np.int32)
        pos_RK = np.zeros((self.R, K), np.int32)
        valid_RS = self.valid_RS.copy()
        for r, p in zip(rows, arrays):
            m = len(p) - keep[r]
            ids_RK[r, K - m:] = p[keep[r]:]
            pos_RK[r, K - m:] = np.arange(keep[r], len(p))
            valid_RS[r, w0 + K - m:w0 + K] = True
        routed = []
        with s._mesh_context():
            for j in range(k):
                chunk = s._put({"input_ids_BC": ids_RK[:, j * C:(j + 1) * C],
                                "positions_BC": pos_RK[:, j * C:(j + 1) * C], "kv_valid_BS": valid_RS})
                self.cache, logits_BV, routed_LBCK = self.append_fn(s.state, self.cache, chunk,
                                                                    np.int32(w0 + j * C))
                routed.append(routed_LBCK)
            routed_LRKK = np.concatenate(jax.device_get(routed), axis=2) if self.has_moe else None
        self.valid_RS = valid_RS
        self.w = w0 + K
        for r, p in zip(rows, arrays):
            m = len(p) - keep[r]
            self.tokens[r] = p.copy()
            self.slots[r] = np.concatenate([self.slots[r], np.arange(w0 + K - m, w0 + K, dtype=np.int32)])
            if self.has_moe:
                new = routed_LRKK[:, r, K - m:]
                self.routing[r] = new if self.routing[r] is None else np.concatenate([self.routing[r], new], 1)
        prompt_routed = {r: self.routing[r] for r in rows}     # [L_moe, L, k]: the whole prompt's
        s.stats.update(prompt_tokens=sum(len(p) for p in arrays), prefill_tokens=sum(len(p) - keep[r] for r, p in
                                                                                     zip(rows, arrays)),
                       reused_tokens=sum(keep.values()), chunk_calls=k, prefill_columns=self.R * K)

        # Generation: the Sampler's decode loop on this cache, from slot w.
        stop_ids = [s._stop_ids(sp) for sp in per_row]
        row_list = list(zip(rows, prompts, per_row, stop_ids))
        guides = s._guides(row_list)
        settings = s._row_settings(row_list, self.R, guides)
        per_row_R = [None] * self.R
        for r, sp in zip(rows, per_row):
            per_row_R[r] = sp
        with s._mesh_context():
            st = self.start_fn(s.state, self.cache, logits_BV, s._put({**settings, "kv_valid_BS": self.valid_RS}),
                               np.int32(self.w), N, self.has_moe)
            self.cache = None                  # donated: the state holds it now
            st, cut, out, fed = s._decode_to_end(st, per_row_R, N, any(sp.return_routing for sp in per_row),
                                                 guides)
            self.cache = st.pop("cache")
        del st
        completions = [s._completion(r, prompts[i], per_row[i], stop_ids[i], out, prompt_routed[r], cut.get(r))
                       for i, r in enumerate(rows)]
        w1 = self.w
        for r, c in zip(rows, completions):
            n_keep = min(len(c.tokens), fed)
            self.tokens[r] = np.concatenate([self.tokens[r], np.asarray(c.tokens[:n_keep], np.int32)])
            self.slots[r] = np.concatenate([self.slots[r], np.arange(w1, w1 + n_keep, dtype=np.int32)])
            self.valid_RS[r, w1:w1 + n_keep] = True
            if self.has_moe:
                self.routing[r] = np.concatenate([self.routing[r], out["routed_LBNK"][:, r, :n_keep]], axis=1)
        self.w = w1 + max(fed, 0)
        return completions

    def describe(self) -> dict:
        """Rows, slots, chunk, write index and cached tokens per live session (for logs and tests)."""
        return {"rows": self.R, "slots": self.S, "chunk": self.C, "write_index": self.w,
                "sessions": {str(sid): len(self.tokens[r]) for sid, r in self.row_of.items()}}


__all__ = ["SessionCache", "common_prefix"]
