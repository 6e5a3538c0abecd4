"""Mixture of experts: sigmoid router with a selection-only bias, group-limited top-k, dropless experts.

Dispatch is dropless: every (token, expert) pair is computed. Pairs are sorted by expert and run as
one grouped matmul (`jax.lax.ragged_dot`). With an `expert` mesh axis > 1 the experts are split over
it inside `jax.shard_map`: each device gathers the tokens of its expert group, computes the pairs that
belong to its local experts, and a reduce-scatter returns each token's sum to its owner.
`moe_impl="dense"` computes every expert for every token: the test reference, never the fast path.

Shape letters (klong_jax/models/__init__.py): M tokens (B * T flattened), X experts per token, P
(token, expert) pairs (M * X), E experts, A the router's expert groups, F expert width.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from klong_jax.models.layers import MLP, RouterBias, param
from klong_jax.sharding import active_rules, constrain, logical_to_spec


def route(x_MD, router_kernel_DE, bias_E, cfg, forced_experts_MX=None):
    """Top-k experts and their weights for each token, as the reference computes them (fp32): [M, X] each.

    forced_experts_MX: routing replay; the given experts are used instead of the top-k choice, and their
    weights come from the current router scores (so gradients still reach the router). Rows holding -1
    (tokens whose sampling-time routing is unknown) choose freely.
    """
    logits_ME = x_MD.astype(jnp.float32) @ router_kernel_DE.astype(jnp.float32)
    scores_ME = jax.nn.sigmoid(logits_ME)
    choice_ME = scores_ME + bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        M, E = choice_ME.shape
        grouped = choice_ME.reshape(M, cfg.n_group, E // cfg.n_group)  # [M, A, E/A]
        group_scores_MA = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, kept_groups = jax.lax.top_k(group_scores_MA, cfg.topk_group)  # [M, topk_group] group ids
        group_mask_MA = jnp.zeros_like(group_scores_MA, dtype=bool).at[
            jnp.arange(M)[:, None], kept_groups].set(True)
        expert_mask_ME = jnp.repeat(group_mask_MA, E // cfg.n_group, axis=1)
        choice_ME = jnp.where(expert_mask_ME, choice_ME, -jnp.inf)
    _, experts_MX = jax.lax.top_k(choice_ME, cfg.num_experts_per_tok)
    if forced_experts_MX is not None:
        forced_MX = forced_experts_MX.astype(jnp.int32)
        free_M1 = jnp.any(forced_MX < 0, axis=-1, keepdims=True)
        experts_MX = jnp.where(free_M1, experts_MX, forced_MX)
    weights_MX = jnp.take_along_axis(scores_ME, experts_MX, axis=1)
    if cfg.norm_topk_prob:
        weights_MX = weights_MX / (weights_MX.sum(-1, keepdims=True) + 1e-20)
    return experts_MX.astype(jnp.int32), weights_MX * cfg.routed_scaling_factor


def _grouped_swiglu(x_PD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, impl):
    """SwiGLU over pair rows already sorted by expert (one group per expert of w_*); rows past
    sum(group_sizes) come out as zeros."""
    if impl == "megablox":
        from jax.experimental.pallas.ops.tpu.megablox import gmm  # TPU grouped matmul kernel
        mm = lambda a, b: gmm(a, b, group_sizes_E, preferred_element_type=a.dtype)  # noqa: E731
    else:
        mm = lambda a, b: jax.lax.ragged_dot(a, b, group_sizes_E)  # noqa: E731
    h_PF = jax.nn.silu(mm(x_PD, w_gate_EDF)) * mm(x_PD, w_up_EDF)
    return mm(h_PF, w_down_EFD)


def experts_ragged(x_MD, experts_MX, weights_MX, w_gate, w_up, w_down, *, first_expert=0, impl="ragged"):
    """Dropless expert compute for the experts [first_expert, first_expert + E_local) held in w_*
    ([E_local, D, F] and [E_local, F, D]); returns y_MD in fp32.

    Pairs routed to other experts are sorted past the local groups and contribute nothing.
    """
    M, X = experts_MX.shape
    E_local = w_gate.shape[0]
    local_MX = experts_MX - first_expert
    local_MX = jnp.where((local_MX >= 0) & (local_MX < E_local), local_MX, E_local)
    flat_P = local_MX.reshape(-1)
    order_P = jnp.argsort(flat_P, stable=True)
    group_sizes_E = jnp.bincount(flat_P, length=E_local + 1)[:E_local].astype(jnp.int32)
    x_sorted_PD = x_MD[order_P // X]
    y_sorted_PD = _grouped_swiglu(x_sorted_PD, group_sizes_E, w_gate, w_up, w_down, impl)
    y_PD = jnp.zeros_like(y_sorted_PD).at[order_P].set(y_sorted_PD)
    y_MXD = y_PD.reshape(M, X, -1).astype(jnp.float32)
    return jnp.einsum("MXD,MX->MD", y_MXD, weights_MX.astype(jnp.float32))


def experts_dense(x_MD, experts_MX, weights_MX, w_gate, w_up, w_down):
    """Every expert on every token, combined with a dense [M, E] weight matrix. Test reference only."""
    E = w_gate.shape[0]
    combine_ME = jnp.zeros((x_MD.shape[0], E), jnp.float32).at[
        jnp.arange(x_MD.shape[0])[:, None], experts_MX].add(weights_MX.astype(jnp.float32))
    h_MEF = jax.nn.silu(jnp.einsum("MD,EDF->MEF", x_MD, w_gate)) * jnp.einsum("MD,EDF->MEF", x_MD, w_up)
    y_MED = jnp.einsum("MEF,EFD->MED", h_MEF, w_down).astype(jnp.float32)
    return jnp.einsum("MED,ME->MD", y_MED, combine_ME)


def _in_chunks(fn, chunk: int, *arrays_M):
    """fn over chunks of C = chunk tokens (rematerialised, so only one chunk's dispatch buffers live at a
    time); each array [M, ...] is cut into [M / C, C, ...]."""
    n = arrays_M[0].shape[0]
    if chunk <= 0 or n <= chunk or n % chunk:
        return fn(*arrays_M)
    chunked = [a.reshape((n // chunk, chunk) + a.shape[1:]) for a in arrays_M]
    out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), chunked)
    return out.reshape((n,) + out.shape[2:])


def _expert_parallel(x_BTD, experts_BTX, weights_BTX, w_gate, w_up, w_down, impl, chunk=0):
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

    def local(x_BTD, e_BTX, w_BTX, wg, wu, wd):  # this device's shards
        B, T, D = x_BTD.shape
        flat = (x_BTD.reshape(B * T, D), e_BTX.reshape(B * T, -1), w_BTX.reshape(B * T, -1))
        return _in_chunks(lambda x, e, w: dispatch(x, e, w, wg, wu, wd), chunk, *flat).reshape(B, T, D)

    def dispatch(x_MD, e_MX, w_MX, wg, wu, wd):
        if tokens_sharded_over_expert:
            x_MD = jax.lax.all_gather(x_MD, "expert", tiled=True)
            e_MX = jax.lax.all_gather(e_MX, "expert", tiled=True)
            w_MX = jax.lax.all_gather(w_MX, "expert", tiled=True)
        first = jax.lax.axis_index("expert") * wg.shape[0]
        y_MD = experts_ragged(x_MD, e_MX, w_MX, wg, wu, wd, first_expert=first, impl=impl)
        if tokens_sharded_over_expert:
            y_MD = jax.lax.psum_scatter(y_MD, "expert", scatter_dimension=0, tiled=True)
        else:
            y_MD = jax.lax.psum(y_MD, "expert")
        return y_MD

    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, w_in_spec, w_in_spec, w_out_spec),
        out_specs=tok_spec, check_vma=False,
    )(x_BTD, experts_BTX, weights_BTX, w_gate, w_up, w_down)


class MoE(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std = cfg.initializer_range
        # Router weights stay fp32 whatever param_dtype is, as in the reference. router [D, E],
        # w_gate / w_up [E, D, F], w_down [E, F, D].
        self.router = param(rngs, (D, E), ("embed", None), jnp.float32, std=std)
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=(None,))
        self.w_gate = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), param_dtype, std=std)
        self.w_up = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), param_dtype, std=std)
        self.w_down = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), param_dtype, std=std)
        self.shared = MLP(D, F * cfg.n_shared_experts, dtype=dtype, param_dtype=param_dtype, std=std,
                          rngs=rngs) if cfg.n_shared_experts else None
        self.cfg, self.dtype = cfg, dtype

    @jax.named_scope("moe")
    def __call__(self, x_BTD, forced_experts_BTX=None):
        """(y_BTD, routed experts [B, T, X])."""
        B, T, D = x_BTD.shape
        x_MD = x_BTD.reshape(B * T, D)
        forced_MX = None if forced_experts_BTX is None else forced_experts_BTX.reshape(B * T, -1)
        experts_MX, weights_MX = route(x_MD, self.router[...], self.router_bias[...], self.cfg, forced_MX)
        xc = x_BTD.astype(self.dtype)
        wg, wu, wd = (w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        mesh = jax.sharding.get_abstract_mesh()
        impl = self.cfg.moe_impl
        if impl == "dense":
            y_BTD = experts_dense(xc.reshape(B * T, D), experts_MX, weights_MX, wg, wu, wd).reshape(B, T, D)
        elif mesh is not None and not mesh.empty and mesh.shape.get("expert", 1) > 1:
            y_BTD = _expert_parallel(xc, experts_MX.reshape(B, T, -1), weights_MX.reshape(B, T, -1),
                                     wg, wu, wd, impl, self.cfg.moe_token_chunk)
        else:
            y_BTD = _in_chunks(lambda x, e, w: experts_ragged(x, e, w, wg, wu, wd, impl=impl),
                               self.cfg.moe_token_chunk, xc.reshape(B * T, D), experts_MX,
                               weights_MX).reshape(B, T, D)
        y_BTD = constrain(y_BTD.astype(self.dtype), ("batch", "seq", "act_embed"))
        if self.shared is not None:
            y_BTD = y_BTD + self.shared(x_BTD)
        return y_BTD, experts_MX.reshape(B, T, -1)
