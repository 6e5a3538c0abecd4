"""One progressive-RL stage. Reads top to bottom: load the previous stage's weights, then per step:
roll out G episodes per task with the current policy, grade, compute group advantages, split episodes
into the windows they were generated in, update, and hand the new weights to the sampler.

Restart semantics: the same command resumes from the latest checkpoint of this stage; a finished stage
(summary.json present) is not run again by the pipeline.

Multi-host (several jax.distributed processes; rl/multihost.py states the contract): each process rolls out a
contiguous block of the step's tasks (whole groups, so advantages are computed locally and exactly) with its own
sampler, sandboxes and episodes directory (episodes/step{k}/process{p}); the update takes batch_rows / P rows of
every batch from each process and is the same SPMD program everywhere; the step's episode records are gathered so
every process computes the same metrics and process 0 writes metrics.jsonl, episodes/step{k}.jsonl (every process's
episodes, in task order) and summary.json. Checkpoints are written by all processes together (Orbax).
"""
import dataclasses
import json
import logging
import os
import shutil
import time

import jax
import numpy as np
from flax import nnx

from klong_jax.agent import AgentConfig, RolloutConfig, run_episodes
from klong_jax.agent.evaluate import pooled_leaf_pass_rate
from klong_jax.agent.sampler_policy import SamplerPolicy
from klong_jax.data.chat_template import ChatTemplate, make_chat_template
from klong_jax.data.tokenizer import load_tokenizer
from klong_jax.models.from_config import model_config_from, upcycle_config_from
from klong_jax.rl import multihost
from klong_jax.rl.advantages import advantage_stats, group_advantages
from klong_jax.rl.batch import build_rows, to_batches
from klong_jax.rl.config import RLConfig
from klong_jax.rl.step import jit_rl_fns, jit_rl_minibatch_update
from klong_jax.sandbox import SandboxPool
from klong_jax.sharding import logical_to_spec, make_mesh
from klong_jax.tasks import load_task
from klong_jax.training.checkpoint import Checkpointer, abstract_with_shardings
from klong_jax.training.metrics import MetricsWriter
from klong_jax.training.state import initial_model, load_trained_model, split_model
from klong_jax.training.trainable import TrainLayout, run_layout

log = logging.getLogger(__name__)


def agent_config(cfg) -> AgentConfig:
    return AgentConfig.from_mapping(cfg.agent, context=cfg.data.pipeline.context)


def load_tasks(directory: str, limit: int | None = None):
    names = sorted(os.listdir(directory))[:limit]
    return [load_task(os.path.join(directory, n)) for n in names]


def resolve_init(cfg, workdir: str) -> str:
    """init_from relative to the pipeline directory (the workdir's parent), e.g. '../sft' -> sibling;
    `pretrained:NAME` (a registered base: klong_jax/hf/pretrained.py) -> its fetched file."""
    if not cfg.init_from:
        return ""
    if cfg.init_from.startswith("pretrained:"):
        from klong_jax.hf.pretrained import resolve_source
        return resolve_source(cfg.init_from)
    return os.path.normpath(os.path.join(workdir, cfg.init_from)) if not os.path.isabs(cfg.init_from) else cfg.init_from


def initial_policy_model(cfg, workdir, model_cfg, mesh):
    source = resolve_init(cfg, workdir)
    if source and os.path.isdir(os.path.join(source, "checkpoints")):
        model, step = load_trained_model(source, model_cfg, mesh)
        print(f"stage {cfg.stage}: starting from {source} (step {step})", flush=True)
        return model
    if source and not os.path.exists(os.path.join(source, "config.json")) and not source.endswith(".gguf"):
        raise FileNotFoundError(f"init_from={cfg.init_from!r} -> {source}: no training checkpoint, HF model or "
                                f"GGUF file there; run the previous stage first")
    return initial_model(model_cfg, mesh, init_from=source, seed=cfg.seed, upcycle=upcycle_config_from(cfg.model))


@dataclasses.dataclass
class StageSetup:
    """What one RL stage is built from: the tokenizer and tasks, the agent config, the optimizer and the
    jit'd update / old-log-prob functions with their shardings."""
    model_cfg: object
    mesh: object
    tokenizer: object
    template: ChatTemplate
    tasks: list
    agent_cfg: AgentConfig
    rollout_cfg: RolloutConfig       # the sampler's devices, dtype and session chunk (config.rollout)
    tx: object
    graphdef: object
    abs_params: object
    abs_rest: object
    state_sh: object
    rest_sh: object
    update_fn: object
    old_fn: object
    batch_spec: object
    layout: TrainLayout = None    # what trains (config.trainable): state["params"] is its trainable subset
    minibatch_fn: object = None   # the mini-batch step when rl.minibatches > 0 (jit_rl_minibatch_update)

    def initial_train_state(self, cfg, workdir):
        """(state, rest, frozen) at the start of the stage: init_from's weights and a fresh optimizer over the
        trainable params."""
        _, params, rest = split_model(initial_policy_model(cfg, workdir, self.model_cfg, self.mesh))
        state, frozen = self.layout.initial(params, self.tx)
        return state, jax.device_put(rest, self.rest_sh), frozen

    def initial_state(self, cfg, workdir):
        """(state, rest) of `initial_train_state` for a stage where every parameter trains (no frozen part)."""
        state, rest, frozen = self.initial_train_state(cfg, workdir)
        if frozen:
            raise ValueError(f"config.trainable={self.layout.plan.config.spec()} freezes parameters: use "
                             f"initial_train_state, which returns them")
        return state, rest

    def policy(self, cfg, state, rest, frozen=None) -> SamplerPolicy:
        """This process's rollout sampler. Several processes: each one's sampler holds the whole policy on its own
        local devices (multihost.sampler_inputs) and is sized for its share of the step's episodes."""
        rl = cfg.rl
        episodes = rl.tasks_per_step * rl.group_size // jax.process_count()
        buckets = SamplerPolicy.rollout_buckets(self.agent_cfg, min(rl.max_concurrent_episodes, episodes),
                                                self.template)
        params, rest, mesh, rollout = multihost.sampler_inputs(self.layout.full_params(state, frozen), rest,
                                                                self.mesh, self.rollout_cfg)
        return SamplerPolicy.from_model(nnx.merge(self.graphdef, params, rest), mesh, seed=cfg.seed,
                                        rollout=rollout, **buckets)

    def sync_params(self, state, frozen):
        """What the sampler gets after an update: the variables that train (a stack cut by the plan whole); as
        numpy on every process when there are several (each one's sampler is process-local)."""
        return multihost.host_copy(self.layout.plan.sync_params(state["params"], frozen))


def setup_stage(cfg, data_paths: dict) -> StageSetup:
    rl = RLConfig.from_mapping(cfg.rl)
    model_cfg = model_config_from(cfg.model)
    mesh = make_mesh(dict(cfg.mesh.shape))
    tokenizer = load_tokenizer(data_paths["tokenizer"])
    run = run_layout(cfg, model_cfg, mesh, rl.steps)
    tx, lr_schedule, graphdef, abs_rest, rest_sh, layout = (run.tx, run.lr_schedule, run.graphdef, run.abs_rest,
                                                            run.rest_sh, run.layout)
    plan, abs_params, state_sh = layout.plan, layout.abs_params, layout.state_sh
    agent_cfg = agent_config(cfg)
    if agent_cfg.top_k or agent_cfg.top_p < 1.0:
        # The trainer reproduces softmax(logits / T), not a truncated distribution.
        raise ValueError(f"agent.top_k={agent_cfg.top_k}, agent.top_p={agent_cfg.top_p}: RL rollouts sample the "
                         "full tempered distribution (top_k=0, top_p=1.0)")
    update_fn, old_fn = jit_rl_fns(graphdef, tx, rl, lr_schedule, state_sh, rest_sh, mesh,
                                   temperature=agent_cfg.temperature, plan=plan, frozen_sh=layout.frozen_sh)
    minibatch_fn = None
    if rl.minibatches:
        minibatch_fn = jit_rl_minibatch_update(graphdef, tx, rl, lr_schedule, state_sh, rest_sh, mesh,
                                               temperature=agent_cfg.temperature, plan=plan,
                                               frozen_sh=layout.frozen_sh)
    template = make_chat_template(tokenizer, cfg.data.get("chat_template", "auto"))
    return StageSetup(model_cfg=model_cfg, mesh=mesh, tokenizer=tokenizer, template=template,
                      tasks=load_tasks(data_paths["train_tasks"]), agent_cfg=agent_cfg,
                      rollout_cfg=RolloutConfig.from_mapping(cfg.get("rollout")), tx=tx,
                      graphdef=graphdef, abs_params=abs_params, abs_rest=abs_rest, state_sh=state_sh,
                      rest_sh=rest_sh, update_fn=update_fn, old_fn=old_fn, minibatch_fn=minibatch_fn,
                      batch_spec=logical_to_spec(("batch", "seq"), (rl.batch_rows, rl.seq_len), mesh), layout=layout)


def run_rl(cfg, workdir: str, data_paths: dict) -> dict:
    os.makedirs(workdir, exist_ok=True)
    rl = RLConfig.from_mapping(cfg.rl)
    multihost.process_share(range(rl.tasks_per_step))   # checked before anything is built
    multihost.local_rows(rl.batch_rows)
    st = setup_stage(cfg, data_paths)
    P, tag = jax.process_count(), (f" process {jax.process_index()}" if jax.process_count() > 1 else "")

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=2, async_save=False)
    start = ckpt.latest_step()
    with jax.set_mesh(st.mesh):
        if start is not None:
            st.layout.check_meta(ckpt.meta(start), f"RL checkpoint step {start} of {workdir}")
            target = {"train": st.layout.abstract_checkpoint_state(st.tx),
                      "rest": abstract_with_shardings(st.abs_rest, st.rest_sh)}
            restored, _ = ckpt.restore(start, target)
            (state, frozen), rest = st.layout.from_checkpoint(restored["train"]), restored["rest"]
            print(f"stage {cfg.stage}: resumed from step {start}", flush=True)
        else:
            (state, rest, frozen), start = st.initial_train_state(cfg, workdir), 0
        # The KL reference: the stage-start trainable params (the frozen ones are shared and never move).
        ref_params = jax.tree.map(lambda x: x.copy(), state["params"]) if rl.kl_coef else state["params"]
        policy = st.policy(cfg, state, rest, frozen)
        metrics_out = MetricsWriter(workdir, rl.steps, prefix="rl", start_step=start)
        pool = SandboxPool(max_concurrent=rl.max_concurrent_episodes)   # this process's sandboxes
        try:
            for step in range(start, rl.steps):
                order = step_tasks(cfg.seed, step, len(st.tasks), rl.tasks_per_step)
                t0, phases = time.perf_counter(), {}
                episodes_dir = os.path.join(workdir, "episodes", f"step{step}")
                if P > 1:
                    episodes_dir = os.path.join(episodes_dir, f"process{jax.process_index()}")
                # A step killed before its checkpoint is rolled out again from scratch.
                shutil.rmtree(episodes_dir, ignore_errors=True)
                results = run_episodes([st.tasks[i] for i in multihost.process_share(order)], policy,
                                       n_per_task=rl.group_size, template=st.template, config=st.agent_cfg,
                                       pool=pool, workdir=episodes_dir, tag=f"s{step}-",
                                       return_routing=True, return_prompt_routing=True, timings=phases,
                                       on_step=lambda p, k=step: print(
                                           f"[rl stage {cfg.stage}{tag}] step {k + 1}/{rl.steps} rollout: {p.line()}",
                                           flush=True))
                # Over the processes: times of the slowest one (the step waits for it), token counts summed.
                timing = {"rollout_time_s": time.perf_counter() - t0, **{f"rollout_{k}": v for k, v in phases.items()}}
                gathered = multihost.allgather_objects(timing)
                timing = {k: (max if k.endswith("_s") else sum)(t.get(k, 0) for t in gathered)
                          for k in dict.fromkeys(k for t in gathered for k in t)}
                t1 = time.perf_counter()
                state, metrics = learn_from_episodes(st, rl, state, rest, ref_params, frozen, results,
                                                     rollouts_path=os.path.join(workdir, "episodes",
                                                                                f"step{step}.jsonl"))
                if "windows" in metrics:   # the policy moved: the sampler gets the new weights
                    policy.update_params(st.sync_params(state, frozen))
                metrics.update(update_time_s=time.perf_counter() - t1, **timing)
                metrics_out.write(step + 1, metrics)
                ckpt.save(step + 1, {"train": st.layout.checkpoint_state(state, frozen), "rest": rest},
                          meta={"stage": cfg.stage, "step": step + 1, "trainable": st.layout.plan.config.spec()},
                          force=True)
        finally:
            ckpt.close()
            metrics_out.close()
    summary = {"stage": cfg.stage, "steps": rl.steps, "timeout_s": st.agent_cfg.timeout_s}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return {"summary": summary}


def step_tasks(seed: int, step: int, num_tasks: int, tasks_per_step: int) -> np.ndarray:
    """The indices of a step's tasks (the same on every process; multihost.process_share cuts them)."""
    return np.random.default_rng([seed, step]).permutation(num_tasks)[:tasks_per_step]


def learn_from_episodes(st: StageSetup, rl, state, rest, ref_params, frozen, results, *,
                        rollouts_path: str | None = None):
    """Everything a step does after its rollouts: group advantages, the step's metrics, the episodes file, the
    rows and the update. Returns (state, metrics); metrics carry the update's figures and `windows` when the
    policy was updated (some group had signal).

    results: THIS process's episodes, whole groups of rl.group_size in task order (run_episodes' order); with
    several processes, process p holds the p-th block of the step's tasks (multihost.process_share). Every
    process must call this with the same state (a collective). Advantages are computed per group, locally; the
    metrics (rollout figures, reward mean/std, groups skipped, windows) are over the episodes of ALL processes and
    the same on each; process 0 writes `rollouts_path` (one line per episode of every process, in task order)."""
    if len(results) % rl.group_size:
        raise ValueError(f"{len(results)} episodes are not whole groups of rl.group_size={rl.group_size}")
    rewards = np.array([r.reward or 0.0 for r in results], np.float64).reshape(-1, rl.group_size)
    adv, _ = group_advantages(rewards, rl.advantage)
    by_episode = {r.episode_id: float(adv.reshape(-1)[i]) for i, r in enumerate(results)}
    records = [rec for part in multihost.allgather_objects([_episode_record(r, by_episode[r.episode_id])
                                                            for r in results]) for rec in part]
    metrics = _metrics_from_records(records)
    all_rewards = np.array([rec["line"]["reward"] or 0.0 for rec in records], np.float64).reshape(-1, rl.group_size)
    _, valid = group_advantages(all_rewards, rl.advantage)
    metrics.update({k: v for k, v in advantage_stats(all_rewards, valid).items()
                    if k in ("groups_total", "groups_skipped", "reward_mean", "reward_std")})
    if rollouts_path and jax.process_index() == 0:
        _write_lines(rollouts_path, [rec["line"] for rec in records])
    rows, stats = build_rows(results, by_episode, seq_len=rl.seq_len, pad_id=st.tokenizer.pad_id,
                             num_moe_layers=st.model_cfg.num_moe_layers,
                             top_k=st.model_cfg.num_experts_per_tok, packing=rl.packing)
    windows = multihost.process_sum(stats.windows if rows else 0)
    if windows:   # some process has rows: all update together (the others with masked rows)
        state, update_metrics = update_policy(
            st.update_fn, st.old_fn, state, rest, ref_params, rows, rl, st.mesh, st.batch_spec, frozen=frozen,
            minibatch_fn=st.minibatch_fn,
            pad_row=multihost.empty_row(rl.seq_len, st.model_cfg.num_moe_layers, st.model_cfg.num_experts_per_tok))
        metrics.update(update_metrics)
        metrics["windows"] = int(windows)
    return state, metrics


def _episode_line(r, advantage: float) -> dict:
    """An episode's line in episodes/step{k}.jsonl: its summary, the advantage it trained with, and each turn's
    tool calls, so which behaviour the step rewarded can be read back (e.g. the turn of a submit against the
    episode's reward)."""
    return {**r.summary(), "group_index": r.group_index, "advantage": advantage,
            "tools": [list(t.tools) for t in r.turns]}


def _episode_record(r, advantage: float) -> dict:
    """What the step's file and metrics need of one episode, as JSON (gathered over the processes)."""
    grade = {"passed": r.grade["passed"], "graded": r.grade["graded"]} if r.grade else None
    return {"line": _episode_line(r, advantage), "windows": len(r.windows()), "grade": grade}


def _write_lines(path: str, lines) -> None:
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def _metrics_from_records(records) -> dict:
    """Episodes, mean turns / sampled tokens / windows per episode, the rate of each finish reason and the rubric
    leaf pass rate (leaves passed / graded, pooled over the graded episodes) of `_episode_record`s."""
    reasons = [rec["line"]["finish_reason"] for rec in records]
    out = {"episodes": len(records), "turns_mean": float(np.mean([rec["line"]["turns"] for rec in records])),
           "tokens_mean": float(np.mean([rec["line"]["sampled_tokens"] for rec in records])),
           "windows_per_episode": float(np.mean([rec["windows"] for rec in records]))}
    for reason in sorted(set(reasons)):
        out[f"finish_{reason}_rate"] = reasons.count(reason) / len(reasons)
    rate = pooled_leaf_pass_rate([rec["grade"] for rec in records])
    if rate is not None:
        out["rubric_leaf_pass_rate"] = rate
    return out


def update_policy(update_fn, old_fn, state, rest, ref_params, rows, rl, mesh, batch_spec, frozen=None,
                  minibatch_fn=None, pad_row=None):
    """ppo_epochs passes over the packed rows; returns the new state and the mean update metrics.
    frozen: the params the run's TrainablePlan freezes ({} / None: every parameter trains).

    rows: THIS process's rows. With P processes every batch of `rl.batch_rows` rows holds batch_rows / P rows of
    each process (multihost.global_rows); the processes agree on the number of batches, a process with fewer rows
    filling its part with `pad_row` (a fully masked row, multihost.empty_row; needed when a process may have no
    rows at all, else its own rows' shapes are used). Every process calls this with the same state: a collective.

    Optimizer steps per pass: `rl.minibatches` (> 0: the rows split into that many mini-batches of whole
    batches, each one step on the exact sum of its micro-batches' gradients, every loss normalised by the
    mini-batch's loss tokens; needs `minibatch_fn`, jit_rl_minibatch_update: the micro-batches summed in-graph by
    SFT's accumulate_gradients) or, with 0 (off), one step per
    batch of `rl.batch_rows` rows (`update_fn`). Metrics: per optimizer step (a mini-batch's additive metrics
    summed, `*_max` maxed), then the mean over steps.

    The trainer's log-probs of the rollout policy ("old", the clipping reference) are computed for every
    batch before the first update: computed batch by batch between updates they would already be those of
    a partly updated policy. They stay on the devices (laid out as the batch) until the batch's update."""
    from jax.sharding import NamedSharding, PartitionSpec
    sharding = NamedSharding(mesh, batch_spec)
    routed_sharding = NamedSharding(mesh, PartitionSpec(*batch_spec, None, None))

    def put(host_batch):   # (in the same key order on every process)
        return {k: multihost.global_rows(host_batch[k], sharding if host_batch[k].ndim == 2 else routed_sharding)
                for k in sorted(host_batch)}

    frozen = {} if frozen is None else frozen
    totals = {}
    per_process = multihost.local_rows(rl.batch_rows)
    batches = to_batches(list(rows), per_process)
    missing = int(multihost.process_max(len(batches))) - len(batches)
    if missing:   # another process has more batches: this one's part of them is masked rows
        if not rows and pad_row is None:
            raise ValueError("update_policy: a process without rows needs pad_row (multihost.empty_row)")
        batches += [multihost.masked_batch(pad_row if pad_row is not None else rows[0], per_process)] * missing
    old, tokens = [], []
    for host_batch in batches:
        batch = put(host_batch)
        with_replay, without = old_fn(state["params"], rest, batch, frozen)
        old.append(jax.device_put(with_replay if rl.routing_replay else without, sharding))
        tokens.append(multihost.loss_tokens(mesh, batch))
        for name, logprobs in (("mismatch_with_replay", with_replay), ("mismatch_without_replay", without)):
            if logprobs is None:    # rl.replay_gap=False: only the log-probs the update uses
                continue
            totals.setdefault(name, []).append(multihost.mean_gap(mesh, batch, logprobs))
    minibatches = int(getattr(rl, "minibatches", 0))   # an RLConfig; a mapping without the key: off
    if minibatches and minibatch_fn is None:
        raise ValueError(f"rl.minibatches={minibatches} needs the mini-batch update (jit_rl_minibatch_update)")
    groups = (np.array_split(np.arange(len(batches)), min(minibatches, len(batches))) if minibatches
              else [[i] for i in range(len(batches))])

    def batch_for_update(i):
        return {**put(batches[i]), "old_logprobs": old[i]}

    for _ in range(rl.ppo_epochs):
        for group in groups:
            if not minibatches:
                state, m = update_fn(state, rest, ref_params, batch_for_update(group[0]), frozen)
                metrics = {k: float(v) for k, v in jax.device_get(m).items()}
            else:
                total = np.float32(max(sum(float(tokens[i]) for i in group), 1.0))
                state, m = minibatch_fn(state, rest, ref_params, tuple(batch_for_update(i) for i in group), total,
                                        frozen)
                metrics = {k: float(v) for k, v in jax.device_get(m).items()}
            for k, v in metrics.items():
                totals.setdefault(k, []).append(v)
    return state, {k: float(np.mean(v)) for k, v in totals.items()}
