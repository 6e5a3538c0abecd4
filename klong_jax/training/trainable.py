"""What trains: every parameter (the default), or the top N decoder layers plus the final norm.

Config (`config.trainable`, shared by SFT and every RL stage; `TrainableConfig`):
  top_layers  N: 0 = every parameter trains (the historical step, bit for bit); N > 0 = the top N decoder
              layers (counted down from the last, across the dense and MoE stacks) and the final norm train.
  embeddings  with top_layers > 0: embed_tokens and lm_head (tied or not) train too (default off: frozen).

The partition (`TrainablePlan`): the model's L = L_d + L_moe layers are stacked per kind (`dense_layers`
[L_d, ...] then `moe_layers` [L_moe, ...], bottom to top). The top N layers are the last N of that order, so
a stack may be cut at a boundary k: its layers [0, k) are frozen, [k, n) train. The params pure dict is split
into `trainable` (what the optimizer sees: gradients and Adam moments exist for it alone, so the optimizer
state's size is 2 x its parameter count) and `frozen` (constants, passed to the step beside `rest`, never
donated); a cut stack has its bottom slice [0, k) in `frozen` and its top slice [k, n) in `trainable`.

No backward pass below the lowest trainable layer: the forward runs a cut stack as two scans (the model's
`stack_pieces`), the bottom one over frozen arrays only. With the embeddings frozen, the hidden state
entering layer L - N, x_{L-N} = f_{<L-N}(embed(ids)), depends on no differentiated input, so autodiff
carries no tangent through it: the step computes x_{L-N} once, forward only, and transposes only the top N
layers (test: the reverse scans of the gradient cover exactly N layers). With `embeddings` on, embed_tokens
is differentiated through the input lookup, so the activation cotangent runs down every layer (the frozen
layers still get no weight gradient).

Equivalence (test): k restricted steps equal k full steps whose frozen gradients are zeroed before the
optimizer and whose frozen updates are zeroed after it: clipping sees the same global norm
||g_trainable||, Adam the same moments, and weight decay never touches a frozen weight.

Checkpoints keep the full model params ("train"/"params" = merge(trainable, frozen)): eval,
load_trained_model, the pipeline and the weight sync read them unchanged; the optimizer state saved beside
them is the trainable subset's, so a run resumes only with the same setting (checked, from the checkpoint
meta "trainable").
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# The layer stacks of Glm4MoeForCausalLM, bottom to top, and the model's `stack_pieces` key of each.
STACKS = (("dense_layers", "dense"), ("moe_layers", "moe"))
EMBEDDINGS = ("embed_tokens", "lm_head")
TOP = ("norm",)


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """top_layers: N top decoder layers (+ final norm) train; 0 = every parameter trains.
    embeddings: with top_layers > 0, embed_tokens and lm_head train too (off: frozen)."""
    top_layers: int = 0
    embeddings: bool = False

    def __post_init__(self):
        if isinstance(self.top_layers, bool) or not isinstance(self.top_layers, int):
            raise ValueError(f"trainable.top_layers={self.top_layers!r} must be an integer (0 = every parameter "
                             f"trains; N > 0 = the top N decoder layers and the final norm)")
        if self.top_layers < 0:
            raise ValueError(f"trainable.top_layers={self.top_layers} must be >= 0 (0 = every parameter trains)")
        if not isinstance(self.embeddings, bool):
            raise ValueError(f"trainable.embeddings={self.embeddings!r} must be true or false")
        if self.embeddings and self.top_layers == 0:
            raise ValueError("trainable.embeddings=True needs trainable.top_layers > 0 (with top_layers=0 every "
                             "parameter, the embeddings included, trains already): set top_layers or drop "
                             "embeddings")

    @property
    def all(self) -> bool:
        return self.top_layers == 0

    def spec(self) -> str:
        """'all' | 'top:N' | 'top:N+embeddings' (the bench's --trainable syntax; checkpoint meta)."""
        if self.all:
            return "all"
        return f"top:{self.top_layers}" + ("+embeddings" if self.embeddings else "")

    @classmethod
    def from_spec(cls, spec: str) -> "TrainableConfig":
        s = spec.strip()
        if s == "all":
            return cls()
        head, _, flag = s.partition("+")
        kind, _, n = head.partition(":")
        if kind != "top" or not n.isdigit() or flag not in ("", "embeddings"):
            raise ValueError(f"trainable spec {spec!r}: expected 'all', 'top:N' or 'top:N+embeddings'")
        return cls(top_layers=int(n), embeddings=flag == "embeddings")


def trainable_config_from(section) -> TrainableConfig:
    """The TrainableConfig of a config.trainable section; None or an absent section (configs written before
    it existed) means every parameter trains. Unknown fields are an error listing the valid ones."""
    if section is None:
        return TrainableConfig()
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    valid = {f.name for f in dataclasses.fields(TrainableConfig)}
    unknown = set(d) - valid
    if unknown:
        raise ValueError(f"config.trainable has unknown fields {sorted(unknown)}; valid: {sorted(valid)}")
    return TrainableConfig(**d)


def _cut(leaf, lo, hi):
    """Layers [lo, hi) of a stacked leaf: an array slice, a ShapeDtypeStruct of that shape; anything else
    (a sharding: the layers axis is never sharded) is shared by both pieces."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((hi - lo,) + tuple(leaf.shape[1:]), leaf.dtype, sharding=leaf.sharding)
    if hasattr(leaf, "shape"):
        return leaf[lo:hi]
    return leaf


@dataclasses.dataclass(frozen=True)
class TrainablePlan:
    """The partition of one model's params. cut[stack] = k: layers [0, k) of that stack are frozen, [k, n)
    train (0: the whole stack trains; n: it is frozen). Build with `plan_for`."""
    config: TrainableConfig
    sizes: tuple     # ((stack, n_layers), ...) of the stacks the model has
    cut: tuple       # ((stack, k), ...)

    @property
    def all(self) -> bool:
        return self.config.all

    def _k(self, stack):
        return dict(self.cut)[stack]

    def _n(self, stack):
        return dict(self.sizes)[stack]

    def _split_stacks(self):
        """The stacks cut strictly inside (both pieces non-empty)."""
        return [s for s, n in self.sizes if 0 < self._k(s) < n]

    def trainable_layers(self) -> int:
        return sum(n - self._k(s) for s, n in self.sizes)

    # ---- params <-> (trainable, frozen) ----

    def split(self, params):
        """(trainable, frozen) pure dicts of a params pure dict (arrays, abstract arrays or shardings).
        With every parameter training: (params, {}) -- the same object, nothing copied."""
        if self.all:
            return params, {}
        trainable, frozen = {}, {}
        for key, value in params.items():
            if key in dict(self.sizes):
                k, n = self._k(key), self._n(key)
                if k == 0:
                    trainable[key] = value
                elif k == n:
                    frozen[key] = value
                else:
                    frozen[key] = jax.tree.map(lambda a: _cut(a, 0, k), value)
                    trainable[key] = jax.tree.map(lambda a: _cut(a, k, n), value)
            elif key in TOP:
                trainable[key] = value
            elif key in EMBEDDINGS:
                (trainable if self.config.embeddings else frozen)[key] = value
            else:
                raise ValueError(f"trainable: the model has a parameter {key!r} that the top-layers partition does "
                                 f"not know; add it to klong_jax/training/trainable.py")
        return trainable, frozen

    def merge(self, trainable, frozen):
        """The full params pure dict: the inverse of `split` (a cut stack's pieces concatenated along layers)."""
        if self.all:
            return trainable
        out = {**frozen, **trainable}
        for key in self._split_stacks():
            out[key] = jax.tree.map(lambda f, t: jnp.concatenate([f, t], axis=0), frozen[key], trainable[key])
        return out

    def sync_params(self, trainable, frozen):
        """The variables the trainer changes, whole (a cut stack concatenated): what the RL weight sync sends
        (Sampler.update_params takes a subset). All of them when every parameter trains."""
        if self.all:
            return trainable
        merged = self.merge(trainable, frozen)
        return {key: merged[key] for key in trainable}

    # ---- the model over (trainable, frozen, rest) ----

    def bind(self, graphdef, trainable, frozen, rest):
        """(model, stack_pieces) for `model(..., stack_pieces=...)` / `model.hidden_states`: the model holds
        the frozen bottom piece of a cut stack, stack_pieces lists [bottom, top] for it (each its own scan)."""
        if self.all:
            return nnx.merge(graphdef, trainable, rest), None
        params = {**frozen, **trainable}
        slot_rest = dict(rest)
        split = self._split_stacks()
        for key in split:
            k = self._k(key)
            params[key] = frozen[key]
            if key in rest:
                slot_rest[key] = jax.tree.map(lambda a: a[:k], rest[key])
        model = nnx.merge(graphdef, params, slot_rest)
        pieces = {}
        for key, name in STACKS:
            if key not in split:
                continue
            k, n = self._k(key), self._n(key)
            bottom = getattr(model, key)
            top_rest = jax.tree.map(lambda a: a[k:n], rest[key]) if key in rest else {}
            pieces[name] = [bottom, nnx.merge(nnx.graphdef(bottom), trainable[key], top_rest)]
        return model, (pieces or None)


def plan_for(config: TrainableConfig, model_cfg) -> TrainablePlan:
    """The partition of `model_cfg`'s params for `config`; ValueError when top_layers exceeds its layers."""
    sizes = tuple((key, n) for key, n in (("dense_layers", model_cfg.num_dense_layers),
                                          ("moe_layers", model_cfg.num_moe_layers)) if n)
    total = sum(n for _, n in sizes)
    if config.top_layers > total:
        raise ValueError(f"trainable.top_layers={config.top_layers} exceeds the model's {total} decoder layers; "
                         f"use at most {total} (or 0: every parameter trains)")
    cut, left = [], config.top_layers if not config.all else total
    for key, n in reversed(sizes):          # top stack first
        take = min(left, n)
        cut.append((key, n - take))
        left -= take
    return TrainablePlan(config=config, sizes=sizes, cut=tuple(reversed(cut)))


def bind_model(graphdef, params, rest, frozen=None, plan=None):
    """(model, stack_pieces) of the step's arguments; without a plan (or with every parameter training)
    exactly nnx.merge(graphdef, params, rest), None."""
    if plan is None or plan.all:
        return nnx.merge(graphdef, params, rest), None
    return plan.bind(graphdef, params, frozen, rest)


def param_count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class TrainLayout:
    """A run's state layout for a plan: the abstract trainable / frozen trees and their shardings, the train
    state's shardings (params = the trainable subset), and the conversions to and from the checkpointed
    state (which holds the FULL params)."""
    plan: TrainablePlan
    abs_params: dict       # full, abstract
    param_sh: dict         # full
    abs_trainable: dict
    abs_frozen: dict
    trainable_sh: dict
    frozen_sh: dict
    state_sh: dict         # {"params": trainable_sh, "opt_state": ..., "step": ...}

    def describe(self) -> str:
        t, f = param_count(self.abs_trainable), param_count(self.abs_frozen)
        return f"{t:,} of {t + f:,} parameters train (top {self.plan.trainable_layers()} decoder layers)"

    def initial(self, params, tx):
        """(state over the trainable params with a fresh optimizer, frozen) from full params."""
        from klong_jax.training.state import new_state
        trainable, frozen = self.plan.split(params)
        trainable = jax.device_put(trainable, self.trainable_sh)
        return new_state(trainable, tx, self.state_sh), jax.device_put(frozen, self.frozen_sh)

    def full_params(self, state, frozen):
        """The full params (laid out as the model's), e.g. for evaluation or a sampler."""
        if self.plan.all:
            return state["params"]
        return jax.jit(self.plan.merge, out_shardings=self.param_sh)(state["params"], frozen)

    def checkpoint_state(self, state, frozen):
        """What is saved as "train": {"params": FULL params, "opt_state", "step"} (the state itself when every
        parameter trains)."""
        if self.plan.all:
            return state
        return {"params": self.full_params(state, frozen), "opt_state": state["opt_state"], "step": state["step"]}

    def abstract_checkpoint_state(self, tx):
        from klong_jax.training.checkpoint import abstract_with_shardings
        abstract = {"params": self.abs_params, "opt_state": jax.eval_shape(tx.init, self.abs_trainable),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}
        return abstract_with_shardings(abstract, {**self.state_sh, "params": self.param_sh})

    def from_checkpoint(self, train):
        """(state, frozen) of a restored "train" entry."""
        if self.plan.all:
            return train, {}
        trainable, frozen = self.plan.split(train["params"])
        state = {"params": jax.device_put(trainable, self.trainable_sh), "opt_state": train["opt_state"],
                 "step": train["step"]}
        return state, jax.device_put(frozen, self.frozen_sh)

    def check_meta(self, meta: dict, where: str) -> None:
        """ValueError when the checkpoint was trained with another setting (its optimizer state covers other
        parameters). Checkpoints without the key predate the setting: every parameter trained."""
        saved = (meta or {}).get("trainable", "all")
        if saved != self.plan.config.spec():
            raise ValueError(f"{where} was trained with trainable={saved}, but config.trainable says "
                             f"{self.plan.config.spec()}: its optimizer state covers other parameters. Resume with "
                             f"the same config.trainable, or start a new workdir with init_from pointing at this one")


def train_layout(plan: TrainablePlan, abs_params, param_sh, tx, mesh) -> TrainLayout:
    from klong_jax.training.step import state_shardings
    abs_trainable, abs_frozen = plan.split(abs_params)
    trainable_sh, frozen_sh = plan.split(param_sh)
    return TrainLayout(plan=plan, abs_params=abs_params, param_sh=param_sh, abs_trainable=abs_trainable,
                       abs_frozen=abs_frozen, trainable_sh=trainable_sh, frozen_sh=frozen_sh,
                       state_sh=state_shardings(tx, trainable_sh, abs_trainable, mesh))


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """What a run (SFT, an RL stage, the AOT plan of either) is laid out with before its first step: the optimizer
    and its schedule over `steps`, the model's graph and abstract non-trainable variables with their shardings, and
    what trains (`layout`; `layout.plan` the TrainablePlan, `layout.abs_params` / `param_sh` the whole model's)."""
    tx: object
    lr_schedule: object
    graphdef: object
    abs_rest: object
    rest_sh: object
    layout: TrainLayout


def run_layout(cfg, model_cfg, mesh, steps: int) -> RunLayout:
    """The run of `cfg` (its optimizer and trainable sections; `config.trainable` checked here) on `mesh`."""
    from klong_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from klong_jax.training.state import abstract_layout
    tx = make_optimizer(cfg.optimizer, steps)
    plan = plan_for(trainable_config_from(cfg.get("trainable")), model_cfg)
    graphdef, abs_params, abs_rest, param_sh, rest_sh = abstract_layout(model_cfg, mesh)
    return RunLayout(tx=tx, lr_schedule=learning_rate_schedule(cfg.optimizer, steps), graphdef=graphdef,
                     abs_rest=abs_rest, rest_sh=rest_sh, layout=train_layout(plan, abs_params, param_sh, tx, mesh))
