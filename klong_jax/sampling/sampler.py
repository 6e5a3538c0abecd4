"""Sampler: batched generation with a KV cache, sharded on a mesh, with per-request settings.

    sampler = Sampler(model, tokenizer, mesh=None)
    completions = sampler.generate(prompt_token_lists, SamplingParams(max_new_tokens=64, temperature=0))

Shapes are bucketed (prompt length P, new-token budget N, batch B; see buckets.py), so requests of
other lengths within a bucket reuse the compiled prefill / decode functions. The decode loop runs on
device in chunks of `decode_chunk` steps; between chunks the host checks stop strings and stops early
when every row is done.

Sessions (multi-turn contexts that grow by appending): `generate(prompts, params, session_ids=[...])` keeps
each session's KV cache from call to call and prefills only what its prompt adds to the tokens cached
(from the first token that differs); `end_session(id)` frees its row; `update_params` invalidates every
session. Same outputs as without sessions (sessions.py). `stats` counts prompt tokens asked, tokens
prefilled and tokens reused, in both modes.

Constrained rows (`SamplingParams.constraint`, constraint.py): token 0 is sampled under the start state's mask in
the prefill; then the batch decodes one token per decode call and the host advances each constrained row's state
and puts the next masks (allowed_BV) into the decode state. Unconstrained rows in the same batch are unaffected
(their mask is all true); a batch without constraints carries no mask and decodes in chunks as before.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from klong_jax.sampling import decode
from klong_jax.sampling.buckets import batch_bucket, length_bucket
from klong_jax.sampling.sessions import SessionCache
from klong_jax.sampling.stops import find_stop_string
from klong_jax.sampling.types import Completion, SamplingParams
from klong_jax.sharding import DEFAULT_RULES, logical_to_spec, state_shardings


def _cast_all(xs, dtypes):
    return [x.astype(dt) for x, dt in zip(xs, dtypes)]


def _on_device_order(x, mesh) -> bool:
    """x is a jax.Array laid out on a mesh over exactly `mesh`'s devices in the same order (one jit may then read
    it and write `mesh`'s shardings)."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(x, jax.Array) or not isinstance(sharding, NamedSharding):
        return False
    return [d.id for d in sharding.mesh.devices.flat] == [d.id for d in mesh.devices.flat]


def batch_devices(mesh, rules=DEFAULT_RULES) -> int:
    """Devices the `batch` logical axis spreads over on `mesh` (None: 1): a Sampler's batch bucket is a multiple of
    it (launch/plan.py's rollout plan rounds its cache rows the same way)."""
    if mesh is None:
        return 1
    big = math.prod(mesh.devices.shape) * 1024
    spec = logical_to_spec(("batch",), (big,), mesh, rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(mesh.shape[a] for a in axes)


def _as_tuple(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    return (int(ids),) if isinstance(ids, (int, np.integer)) else tuple(int(i) for i in ids)


class Sampler:
    """Generation from a Glm4MoeForCausalLM (see Completion for what comes back).

    model: the NNX model; its weights are taken over (device_put onto `mesh` by the sharding rules).
    tokenizer: anything with `decode(ids) -> str` (klong_jax.data Tokenizer); needed for stop strings
      and Completion.text, optional otherwise.
    default_stop_token_ids: stop tokens of every request (default: the model config's eos_token_id).
    decode_chunk: decode steps between host checks (stop strings, all rows done).
    min_batch: the smallest batch bucket (rounded to a multiple of the devices the batch spreads over):
      raise it to make small and large calls share one compilation.
    max_batch: larger request lists are generated in consecutive batches of at most this many.
    session_chunk: C, the tokens per row of one prefill call of a session (sessions.py).
    session_slots: S, cache slots per session row (None: C * ceil((3/2 min_prompt_bucket + min_new_bucket) / C)
      + C: a prompt of the prompt bucket, a turn of the new-token bucket, one chunk and half a prompt of room
      for appends between compactions). Grown (one more compilation) if a request needs more.
    """

    def __init__(self, model, tokenizer=None, mesh=None, *, rules=DEFAULT_RULES,
                 default_stop_token_ids=None, decode_chunk: int = 32, min_prompt_bucket: int = 16,
                 min_new_bucket: int = 16, min_batch: int = 1, max_batch: int = 64, seed: int = 0,
                 session_chunk: int = 128, session_slots: int | None = None):
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.mesh, self.rules = mesh, rules
        self.default_stop_token_ids = _as_tuple(self.cfg.eos_token_id if default_stop_token_ids is None
                                                else default_stop_token_ids)
        if decode_chunk < 1 or max_batch < 1:
            raise ValueError(f"decode_chunk={decode_chunk} and max_batch={max_batch} must be >= 1")
        if session_chunk < 1:
            raise ValueError(f"session_chunk={session_chunk}: must be >= 1 (e.g. 128)")
        self.decode_chunk, self.max_batch = decode_chunk, max_batch
        self.min_prompt_bucket, self.min_new_bucket = min_prompt_bucket, min_new_bucket
        self._rng = np.random.default_rng(seed)
        # One generation or weight swap at a time (callers may share a sampler across threads).
        self._lock = threading.RLock()
        self._copy_fns: dict = {}
        graphdef, state = nnx.split(model)
        self.graphdef = graphdef
        self.shardings = state_shardings(state, mesh, rules) if mesh is not None else None
        self.state = jax.device_put(state, self.shardings) if mesh is not None else state
        devices = self._batch_devices()
        self.min_batch = math.lcm(devices, min_batch)
        g = graphdef
        self.prefill_fn = jax.jit(
            lambda params, batch, cache_len, max_new, routing, prompt_routing: decode.prefill(
                g, params, batch, cache_len=cache_len, max_new=max_new, routing=routing,
                prompt_routing=prompt_routing),
            static_argnums=(2, 3, 4, 5))
        self.decode_fn = jax.jit(lambda params, st, stop_at: decode.decode_chunk(g, params, st, stop_at),
                                 donate_argnums=(1,))
        self.feed_fn = jax.jit(lambda params, st: decode.feed_pending(g, params, st), donate_argnums=(1,))
        # prompt_tokens: tokens of all prompts asked; prefill_tokens: those run through the model (all of them
        # without sessions); reused_tokens: those whose cached k/v a session kept; prefill_columns: token
        # columns computed to prefill them, padding included (sessions.py for the rest).
        self.stats: collections.Counter = collections.Counter()
        self.sessions = SessionCache(self, chunk=session_chunk, slots=session_slots)

    # ------------------------------------------------------------------------------------------
    # Weights

    def update_params(self, params, *, copy: bool = True) -> None:
        """Swaps in new weights (RL weight sync) without a host round trip.

        params: a model, or an nnx.State (or its pure dict) of all or some of its variables (e.g. only
          nnx.Param).
        Each array is cast to the sampler's dtype and resharded onto this sampler's sharding: one compiled
        program when the arrays already live on the sampler's devices in its mesh's order (colocated: the trainer's
        mesh or another mesh over the same chips; stats["fused_weight_syncs"] counts these), else device_put to
        the sampler's devices first (other chips, host arrays), then the cast. copy=False lets unchanged arrays
        alias the caller's buffers:
        only safe when the caller will not donate or delete them (a training step that donates its
        params would leave the sampler with deleted arrays).
        """
        # Under the sampler's own mesh: the caller's (a trainer's, with jax.set_mesh) may span other devices.
        with self._lock, self._mesh_context():
            self._update_params(params, copy)
            self.sessions.invalidate_all()     # cached k/v were computed with the old weights

    def _update_params(self, params, copy: bool) -> None:
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        current = nnx.to_pure_dict(self.state)
        incoming = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
        cur_flat = dict(jax.tree_util.tree_flatten_with_path(current)[0])
        sh_flat = (dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(self.shardings))[0])
                   if self.shardings is not None else {})
        new_flat, targets = {}, {}
        for path, value in jax.tree_util.tree_flatten_with_path(incoming)[0]:
            name = jax.tree_util.keystr(path)
            if path not in cur_flat:
                raise KeyError(f"update_params: {name} is not a variable of the sampler's model")
            old = cur_flat[path]
            if tuple(value.shape) != tuple(old.shape):
                raise ValueError(f"update_params: {name} has shape {tuple(value.shape)}, the sampler's "
                                 f"model has {tuple(old.shape)}")
            new_flat[path] = value
            targets[path] = sh_flat.get(path, old.sharding if isinstance(old, jax.Array) else None)
        paths = list(new_flat)
        target_list = [targets[p] for p in paths]
        dtypes = [cur_flat[p].dtype for p in paths]
        values = [new_flat[p] for p in paths]
        if copy or any(jnp.dtype(v.dtype) != dt for v, dt in zip(values, dtypes)):
            # A jit output never aliases its (undonated) inputs: fresh buffers, cast in the same pass.
            # (device_put alone may keep a shard of the caller's buffer even when asked not to alias.)
            key = tuple(paths)
            if key not in self._copy_fns:     # one compilation per set of updated variables (and input layout)
                self._copy_fns[key] = jax.jit(functools.partial(_cast_all, dtypes=tuple(dtypes)),
                                              out_shardings=target_list)
            if self.mesh is not None and all(_on_device_order(v, self.mesh) for v in values):
                # The caller's arrays on the sampler's devices in the sampler mesh's order (the trainer's mesh, or
                # another mesh over the same chips): cast and reshard are one compiled program, as
                # klong_jax/rl/rollout_aot.py plans it.
                moved = self._copy_fns[key](values)
                self.stats["fused_weight_syncs"] += 1
            else:
                # A jit reads and writes one device order only: arrays on other devices (another sampler's chips,
                # another order, the host) are first moved by device_put, then cast.
                moved = self._copy_fns[key](jax.device_put(values, target_list))
        else:
            moved = jax.device_put(values, target_list)
        for p, arr in zip(paths, moved):
            cur_flat[p] = arr
        treedef = jax.tree_util.tree_structure(current)
        leaves = [cur_flat[p] for p, _ in jax.tree_util.tree_flatten_with_path(current)[0]]
        nnx.replace_by_pure_dict(self.state, jax.tree_util.tree_unflatten(treedef, leaves))

    # ------------------------------------------------------------------------------------------
    # Generation

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
                 session_ids: Sequence | None = None) -> list[Completion]:
        """One Completion per prompt (token ids), in order. params: one for all, or one per prompt.

        session_ids: one hashable id per prompt (distinct within a call): each session's KV cache is kept
        for its next call, whose prompt is prefilled only from the first token that differs from the
        tokens cached (sessions.py); the outputs are those of a call without sessions (up to float
        rounding: other summation orders). All requests of a call are then one batch (no max_batch split).
        """
        prompts = [[int(t) for t in p] for p in prompts]
        per_row = list(params) if not isinstance(params, SamplingParams) else [params] * len(prompts)
        if len(per_row) != len(prompts):
            raise ValueError(f"{len(per_row)} SamplingParams for {len(prompts)} prompts")
        for i, (p, sp) in enumerate(zip(prompts, per_row)):
            self.check_request(p, sp, index=i)
        out: list[Completion] = []
        with self._lock:
            if session_ids is not None:
                return self.sessions.generate(prompts, per_row, list(session_ids))
            for start in range(0, len(prompts), self.max_batch):
                out += self._generate_batch(prompts[start:start + self.max_batch],
                                            per_row[start:start + self.max_batch])
            n_tokens = sum(len(p) for p in prompts)
            self.stats.update(prompt_tokens=n_tokens, prefill_tokens=n_tokens)
        return out

    def end_session(self, session_id) -> None:
        """Frees a session's row and cache (unknown ids are ignored: ending twice is harmless)."""
        with self._lock:
            self.sessions.end(session_id)

    def check_request(self, prompt: Sequence[int], sp: SamplingParams, *, index: int = 0) -> None:
        """ValueError (naming prompt `index`) when generate would reject this request."""
        i, V = index, self.cfg.vocab_size
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {V}): {bad[:5]}")
        if len(prompt) + sp.max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt {i}: {len(prompt)} tokens + max_new_tokens={sp.max_new_tokens} exceed "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        if sp.stop_strings and self.tokenizer is None:
            raise ValueError(f"prompt {i}: stop_strings need a Sampler built with a tokenizer")
        if sp.constraint is not None and not self._stop_ids(sp):
            raise ValueError(f"prompt {i}: a constrained request needs a stop token (the text ends with one)")

    def _stop_ids(self, sp: SamplingParams) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.default_stop_token_ids if sp.use_default_stop_tokens else ())
                                   + sp.stop_token_ids))

    def _batch_devices(self) -> int:
        """Devices the `batch` logical axis spreads over: the batch bucket is a multiple of it."""
        return batch_devices(self.mesh, self.rules)

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _put(self, batch: dict) -> dict:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return {k: jax.device_put(v, NamedSharding(self.mesh, logical_to_spec(
            ("batch",) + (None,) * (v.ndim - 1), v.shape, self.mesh, self.rules))) for k, v in batch.items()}

    def _guides(self, rows) -> dict[int, list]:
        """{row: [constraint, state, tokens read]} of the constrained rows among `rows` (as in _row_settings)."""
        return {i: [sp.constraint, sp.constraint.start(), 0] for i, _, sp, _ in rows if sp.constraint is not None}

    def _guide_masks(self, guides: dict, B: int) -> np.ndarray:
        """allowed_BV: each constrained row's mask at its current state; every token for the other rows."""
        V = self.cfg.vocab_size
        mask = np.ones((B, V), bool)
        for i, (constraint, state, _) in guides.items():
            m = np.asarray(constraint.allowed(state), bool)
            if m.shape != (V,):
                raise ValueError(f"row {i}: the constraint's mask has shape {m.shape}; the model has {V} tokens "
                                 "(build its TokenVocab with size=model.cfg.vocab_size)")
            mask[i] = m
        return mask

    def _advance_guides(self, st, guides: dict, n_gen) -> None:
        """Reads each constrained row's new tokens into its state and puts the next masks into `st`."""
        tokens = np.asarray(jax.device_get(st["tokens_BN"]))
        for i, g in guides.items():
            while g[2] < int(n_gen[i]):
                try:
                    g[1] = g[0].advance(g[1], int(tokens[i, g[2]]))
                except ValueError as e:      # the mask allowed it: a constraint whose masks and steps disagree
                    raise RuntimeError(f"row {i}: sampled token {int(tokens[i, g[2]])} at column {g[2]} was "
                                       f"allowed by the mask but rejected by the constraint: {e}") from e
                g[2] += 1
        st["allowed_BV"] = self._put({"allowed_BV": self._guide_masks(guides, len(n_gen))})["allowed_BV"]

    def _row_settings(self, rows, B: int, guides: dict | None = None) -> dict:
        """Per-row settings of a batch of B rows; rows: (row index, prompt, SamplingParams, stop ids) of the
        active rows (the others stay inactive: done from the start); guides (`_guides`): adds allowed_BV."""
        Z = max(4, 1 << (max(len(r[3]) for r in rows) - 1).bit_length()) if any(r[3] for r in rows) else 4
        b = dict(lengths_B=np.zeros(B, np.int32), active_B=np.zeros(B, bool),
                 temperature_B=np.zeros(B, np.float32), top_k_B=np.zeros(B, np.int32),
                 top_p_B=np.ones(B, np.float32), seeds_B=np.zeros(B, np.int32),
                 stop_ids_BZ=np.full((B, Z), -1, np.int32), max_new_B=np.ones(B, np.int32))
        for i, p, sp, stops in rows:
            b["lengths_B"][i], b["active_B"][i] = len(p), True
            b["temperature_B"][i], b["top_k_B"][i], b["top_p_B"][i] = sp.temperature, sp.top_k, sp.top_p
            b["seeds_B"][i] = sp.seed if sp.seed is not None else self._rng.integers(0, 2**31 - 1)
            b["stop_ids_BZ"][i, :len(stops)] = stops
            b["max_new_B"][i] = sp.max_new_tokens
        if guides:
            b["allowed_BV"] = self._guide_masks(guides, B)
        return b

    def _host_batch(self, prompts, per_row, stop_ids, B: int, P: int, guides: dict | None = None) -> dict:
        b = dict(input_ids_BP=np.full((B, P), self.cfg.pad_token_id or 0, np.int32),
                 valid_BP=np.zeros((B, P), bool), positions_BP=np.zeros((B, P), np.int32),
                 **self._row_settings(list(zip(range(len(prompts)), prompts, per_row, stop_ids)), B, guides))
        for i, p in enumerate(prompts):
            pad = P - len(p)
            b["input_ids_BP"][i, pad:] = p
            b["valid_BP"][i, pad:] = True
            b["positions_BP"][i, pad:] = np.arange(len(p))
        return b

    def _generate_batch(self, prompts, per_row) -> list[Completion]:
        n = len(prompts)
        stop_ids = [self._stop_ids(sp) for sp in per_row]
        P = length_bucket(max(len(p) for p in prompts), self.min_prompt_bucket)
        N = length_bucket(max(sp.max_new_tokens for sp in per_row), self.min_new_bucket)
        B = batch_bucket(n, self.min_batch)
        routing = any(sp.return_routing for sp in per_row)
        prompt_routing = any(sp.return_prompt_routing for sp in per_row)
        guides = self._guides(list(zip(range(n), prompts, per_row, stop_ids)))
        batch = self._put(self._host_batch(prompts, per_row, stop_ids, B, P, guides))
        self.stats["prefill_columns"] += B * P        # token columns the prefill computes, padding included
        with self._mesh_context():
            st, prompt_routed = self.prefill_fn(self.state, batch, P + N, N, routing, prompt_routing)
            st, cut, out, _ = self._decode_to_end(st, per_row + [None] * (B - n), N, routing, guides)
            prompt_routed = None if prompt_routed is None else np.asarray(jax.device_get(prompt_routed))
        return [self._completion(i, prompts[i], per_row[i], stop_ids[i], out,
                                 None if prompt_routed is None else prompt_routed[:, i, P - len(prompts[i]):],
                                 cut.get(i))
                for i in range(n)]

    def _decode_to_end(self, st, per_row, N: int, routing: bool, guides: dict | None = None):
        """Decodes until every row is done (per_row: the B rows' SamplingParams, None for inactive rows),
        then feeds the last sampled tokens when routing is asked for. With guides (constrained rows) it decodes
        one token per call and refreshes their masks in between. Returns (state, stop-string cuts by
        row, the outputs on the host, fed: the columns whose tokens were fed, i.e. written to the cache at
        slot prompt_slots + column: generated token i of a row has valid k/v iff i < fed)."""
        B = len(per_row)
        cut: dict[int, tuple[int, str, str]] = {}
        scanned = [0] * B
        while True:
            step, done, n_gen = jax.device_get((st["step"], st["done_B"], st["n_gen_B"]))
            newly = self._scan_stop_strings(st, per_row, n_gen, scanned, cut)
            if newly:
                mark = np.zeros(B, bool)
                mark[newly] = True
                st["done_B"] = st["done_B"] | jnp.asarray(mark)
                done = done | mark
            if done.all():        # inactive rows are done from the start
                break
            if int(step) >= N:    # cannot happen: every row stops by max_new_tokens <= N
                raise RuntimeError(f"decode reached its {N} columns with rows still running")
            chunk = self.decode_chunk
            if guides:
                self._advance_guides(st, guides, n_gen)
                chunk = 1
            st = self.decode_fn(self.state, st, np.int32(min(int(step) + chunk, N)))
        fed = int(step) - 1
        if routing and st["routed_LBNK"] is not None:
            st = self.feed_fn(self.state, st)
            fed += 1
        out = jax.device_get({k: st[k] for k in ("tokens_BN", "logprobs_BN", "sampling_logprobs_BN",
                                                 "n_gen_B", "routed_LBNK")})
        return st, cut, out, fed

    def _scan_stop_strings(self, st, per_row, n_gen, scanned, cut) -> list[int]:
        """Rows whose new tokens complete a stop string (recorded in `cut`)."""
        rows = [i for i, sp in enumerate(per_row)
                if sp is not None and sp.stop_strings and i not in cut and n_gen[i] > scanned[i]]
        if not rows:
            return []
        tokens = np.asarray(jax.device_get(st["tokens_BN"]))
        newly = []
        for i in rows:
            hit = find_stop_string(self.tokenizer, tokens[i, :n_gen[i]].tolist(), per_row[i].stop_strings,
                                   scanned[i])
            scanned[i] = int(n_gen[i])
            if hit is not None:
                cut[i] = hit
                newly.append(i)
        return newly

    def _completion(self, i, prompt, sp, stop_ids, out, prompt_routed_LPK, cut) -> Completion:
        """Row i's Completion; prompt_routed_LPK: the routing of its prompt tokens, or None."""
        n = int(out["n_gen_B"][i]) if cut is None else cut[0]
        tokens = out["tokens_BN"][i, :n].tolist()
        stop = None
        if cut is not None:
            finish, stop, text = "stop", cut[1], cut[2]
        elif tokens and tokens[-1] in stop_ids:
            finish, stop = "stop", tokens[-1]
            text = self.tokenizer.decode(tokens[:-1]) if self.tokenizer is not None else None
        else:
            finish = "length"
            text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        routed = None
        if sp.return_routing and out["routed_LBNK"] is not None:
            routed = out["routed_LBNK"][:, i, :n].astype(np.int32)
        p_routed = None
        if sp.return_prompt_routing and prompt_routed_LPK is not None:
            p_routed = np.asarray(prompt_routed_LPK).astype(np.int32)
        return Completion(tokens=tokens, logprobs=out["logprobs_BN"][i, :n].astype(np.float32),
                          sampling_logprobs=out["sampling_logprobs_BN"][i, :n].astype(np.float32),
                          finish_reason=finish, routed_experts=routed, prompt_routed_experts=p_routed,
                          stop=stop, text=text, prompt_len=len(prompt))
