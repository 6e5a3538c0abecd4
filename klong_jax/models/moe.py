"""Mixture of experts: sigmoid router with a selection-only bias, group-limited top-k, dropless experts.

Dispatch is dropless: every (token, expert) pair is computed. Pairs are sorted by expert and run as
one grouped matmul (`jax.lax.ragged_dot`). With an `expert` mesh axis > 1 the experts are split over
it inside `jax.shard_map`: each device gathers the tokens of its expert group, computes the pairs that
belong to its local experts, and a reduce-scatter returns each token's sum to its owner.
`moe_impl="dense"` computes every expert for every token: the test reference, never the fast path.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from klong_jax.models.layers import MLP, RouterBias, param
from klong_jax.sharding import active_rules, constrain, logical_to_spec


def route(x_ND, router_kernel_DE, bias_E, cfg, forced_experts_NK=None):
    """Top-k experts and their weights for each token, as the reference computes them (fp32).

    forced_experts_NK: routing replay; the given experts are used instead of the top-k choice, and their
    weights come from the current router scores (so gradients still reach the router). Rows holding -1
    (tokens whose sampling-time routing is unknown) choose freely.
    """
    logits_NE = x_ND.astype(jnp.float32) @ router_kernel_DE.astype(jnp.float32)
    scores_NE = jax.nn.sigmoid(logits_NE)
    choice_NE = scores_NE + bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        N, E = choice_NE.shape
        grouped = choice_NE.reshape(N, cfg.n_group, E // cfg.n_group)
        group_scores_NG = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, keep_NG = jax.lax.top_k(group_scores_NG, cfg.topk_group)
        group_mask_NG = jnp.zeros_like(group_scores_NG, dtype=bool).at[
            jnp.arange(N)[:, None], keep_NG].set(True)
        expert_mask_NE = jnp.repeat(group_mask_NG, E // cfg.n_group, axis=1)
        choice_NE = jnp.where(expert_mask_NE, choice_NE, -jnp.inf)
    _, experts_NK = jax.lax.top_k(choice_NE, cfg.num_experts_per_tok)
    if forced_experts_NK is not None:
        forced_NK = forced_experts_NK.astype(jnp.int32)
        free_N1 = jnp.any(forced_NK < 0, axis=-1, keepdims=True)
        experts_NK = jnp.where(free_N1, experts_NK, forced_NK)
    weights_NK = jnp.take_along_axis(scores_NE, experts_NK, axis=1)
    if cfg.norm_topk_prob:
        weights_NK = weights_NK / (weights_NK.sum(-1, keepdims=True) + 1e-20)
    return experts_NK.astype(jnp.int32), weights_NK * cfg.routed_scaling_factor


def _grouped_swiglu(x_MD, group_sizes_G, w_gate_GDF, w_up_GDF, w_down_GFD, impl):
    """SwiGLU over rows already sorted by group; rows past sum(group_sizes) come out as zeros."""
    if impl == "megablox":
        from jax.experimental.pallas.ops.tpu.megablox import gmm  # TPU grouped matmul kernel
        mm = lambda a, b: gmm(a, b, group_sizes_G, preferred_element_type=a.dtype)  # noqa: E731
    else:
        mm = lambda a, b: jax.lax.ragged_dot(a, b, group_sizes_G)  # noqa: E731
    h_MF = jax.nn.silu(mm(x_MD, w_gate_GDF)) * mm(x_MD, w_up_GDF)
    return mm(h_MF, w_down_GFD)


def experts_ragged(x_ND, experts_NK, weights_NK, w_gate, w_up, w_down, *, first_expert=0, impl="ragged"):
    """Dropless expert compute for the experts [first_expert, first_expert + E_local) held in w_*.

    Pairs routed to other experts are sorted past the local groups and contribute nothing.
    """
    N, K = experts_NK.shape
    E_local = w_gate.shape[0]
    local_NK = experts_NK - first_expert
    local_NK = jnp.where((local_NK >= 0) & (local_NK < E_local), local_NK, E_local)
    flat_M = local_NK.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True)
    group_sizes_G = jnp.bincount(flat_M, length=E_local + 1)[:E_local].astype(jnp.int32)
    x_sorted_MD = x_ND[order_M // K]
    y_sorted_MD = _grouped_swiglu(x_sorted_MD, group_sizes_G, w_gate, w_up, w_down, impl)
    y_MD = jnp.zeros_like(y_sorted_MD).at[order_M].set(y_sorted_MD)
    y_NKD = y_MD.reshape(N, K, -1).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y_NKD, weights_NK.astype(jnp.float32))


def experts_dense(x_ND, experts_NK, weights_NK, w_gate, w_up, w_down):
    """Every expert on every token, combined with a dense [N, E] weight matrix. Test reference only."""
    E = w_gate.shape[0]
    combine_NE = jnp.zeros((x_ND.shape[0], E), jnp.float32).at[
        jnp.arange(x_ND.shape[0])[:, None], experts_NK].add(weights_NK.astype(jnp.float32))
    h_NEF = jax.nn.silu(jnp.einsum("nd,edf->nef", x_ND, w_gate)) * jnp.einsum("nd,edf->nef", x_ND, w_up)
    y_NED = jnp.einsum("nef,efd->ned", h_NEF, w_down).astype(jnp.float32)
    return jnp.einsum("ned,ne->nd", y_NED, combine_NE)


def _in_chunks(fn, chunk: int, *arrays_N):
    """fn over token chunks (rematerialised, so only one chunk's dispatch buffers live at a time)."""
    n = arrays_N[0].shape[0]
    if chunk <= 0 or n <= chunk or n % chunk:
        return fn(*arrays_N)
    chunked = [a.reshape((n // chunk, chunk) + a.shape[1:]) for a in arrays_N]
    out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), chunked)
    return out.reshape((n,) + out.shape[2:])


def _expert_parallel(x_BTD, experts_BTK, weights_BTK, w_gate, w_up, w_down, impl, chunk=0):
    """Experts split over the `expert` mesh axis; tokens exchanged with all_gather / psum_scatter."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = active_rules()
    tok_spec = logical_to_spec(("batch", "seq", None), x_BTD.shape, mesh, rules)
    tokens_sharded_over_expert = any(
        "expert" in ((a,) if isinstance(a, str) else (a or ())) for a in tok_spec)
    E, ep = w_gate.shape[0], mesh.shape["expert"]
    if E % ep:
        raise ValueError(f"n_routed_experts={E} is not divisible by the expert mesh axis ({ep})")
    w_in_spec, w_out_spec = P("expert", None, None), P("expert", None, None)

    def local(x_btd, e_btk, w_btk, wg, wu, wd):
        b, t, d = x_btd.shape
        flat = (x_btd.reshape(b * t, d), e_btk.reshape(b * t, -1), w_btk.reshape(b * t, -1))
        return _in_chunks(lambda x, e, w: dispatch(x, e, w, wg, wu, wd), chunk, *flat).reshape(b, t, d)

    def dispatch(x_nd, e_nk, w_nk, wg, wu, wd):
        if tokens_sharded_over_expert:
            x_nd = jax.lax.all_gather(x_nd, "expert", tiled=True)
            e_nk = jax.lax.all_gather(e_nk, "expert", tiled=True)
            w_nk = jax.lax.all_gather(w_nk, "expert", tiled=True)
        first = jax.lax.axis_index("expert") * wg.shape[0]
        y_nd = experts_ragged(x_nd, e_nk, w_nk, wg, wu, wd, first_expert=first, impl=impl)
        if tokens_sharded_over_expert:
            y_nd = jax.lax.psum_scatter(y_nd, "expert", scatter_dimension=0, tiled=True)
        else:
            y_nd = jax.lax.psum(y_nd, "expert")
        return y_nd

    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, w_in_spec, w_in_spec, w_out_spec),
        out_specs=tok_spec, check_vma=False,
    )(x_BTD, experts_BTK, weights_BTK, w_gate, w_up, w_down)


class MoE(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std = cfg.initializer_range
        # Router weights stay fp32 whatever param_dtype is, as in the reference.
        self.router = param(rngs, (D, E), ("embed", None), jnp.float32, std=std)
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=(None,))
        self.w_gate = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), param_dtype, std=std)
        self.w_up = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), param_dtype, std=std)
        self.w_down = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), param_dtype, std=std)
        self.shared = MLP(D, F * cfg.n_shared_experts, dtype=dtype, param_dtype=param_dtype, std=std,
                          rngs=rngs) if cfg.n_shared_experts else None
        self.cfg, self.dtype = cfg, dtype

    @jax.named_scope("moe")
    def __call__(self, x_BTD, forced_experts_BTK=None):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        forced_NK = None if forced_experts_BTK is None else forced_experts_BTK.reshape(B * T, -1)
        experts_NK, weights_NK = route(x_ND, self.router[...], self.router_bias[...], self.cfg, forced_NK)
        xc = x_BTD.astype(self.dtype)
        wg, wu, wd = (w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        mesh = jax.sharding.get_abstract_mesh()
        impl = self.cfg.moe_impl
        if impl == "dense":
            y_BTD = experts_dense(xc.reshape(B * T, D), experts_NK, weights_NK, wg, wu, wd).reshape(B, T, D)
        elif mesh is not None and not mesh.empty and mesh.shape.get("expert", 1) > 1:
            y_BTD = _expert_parallel(xc, experts_NK.reshape(B, T, -1), weights_NK.reshape(B, T, -1),
                                     wg, wu, wd, impl, self.cfg.moe_token_chunk)
        else:
            y_BTD = _in_chunks(lambda x, e, w: experts_ragged(x, e, w, wg, wu, wd, impl=impl),
                               self.cfg.moe_token_chunk, xc.reshape(B * T, D), experts_NK,
                               weights_NK).reshape(B, T, D)
        y_BTD = constrain(y_BTD.astype(self.dtype), ("batch", "seq", "act_embed"))
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        return y_BTD, experts_NK.reshape(B, T, -1)
