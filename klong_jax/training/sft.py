"""The trajectory-splitting SFT loop. Reads top to bottom: set up, restore or init, train, evaluate, save.

Restart semantics: the same command on the same workdir resumes from the latest complete checkpoint
(params, optimizer, step, data iterator), so a run killed at any point ends bitwise identical to an
uninterrupted one. SIGTERM (TPU VM preemption) checkpoints the current step and exits cleanly.
"""
import logging
import os
import signal
import time

import jax
import numpy as np

from klong_jax.data.pipeline import DataConfig, make_dataset
from klong_jax.data.tokenizer import load_tokenizer
from klong_jax.models.from_config import model_config_from, upcycle_config_from
from klong_jax.sharding import make_mesh
from klong_jax.tasks import vocab
from klong_jax.training.checkpoint import Checkpointer, abstract_with_shardings
from klong_jax.training.data_iter import LookaheadIterator
from klong_jax.training.metrics import MetricsWriter
from klong_jax.training.mfu import device_peak_flops, train_flops_per_token
from klong_jax.training.state import initial_model, split_model
from klong_jax.training.step import batch_shardings, eval_step, jit_train_step
from klong_jax.training.trainable import run_layout

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints at the end of the current step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def data_config(cfg, *, split: str, paths, tokenizer_path: str, batch_size: int) -> DataConfig:
    section = dict(cfg.data.pipeline.to_dict())
    section.update(tokenizer=tokenizer_path, paths=tuple(paths), seq_len=cfg.train.seq_len, batch_size=batch_size,
                   seed=cfg.seed, split=split, chat_template=cfg.data.get("chat_template", "auto"))
    if split != "train":
        section.update(shuffle=False, num_epochs=1, drop_remainder=False, rename_prob=0.0)
    elif section.get("rename_prob") and not section.get("rename_words") and not cfg.data.get("train_paths"):
        section["rename_words"] = vocab.TASK_WORDS   # the embedded suite's names
    return DataConfig.from_mapping(section)


def global_batch(local: dict, shardings: dict) -> dict:
    """Per-process numpy rows -> global jax arrays laid out on the mesh."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k]).astype(np.int32))
            for k in shardings}


def evaluate(eval_fn, params, rest, cfg, paths, tok_path, local_bs, batch_sh, max_batches):
    ds = make_dataset(data_config(cfg, split="eval", paths=paths, tokenizer_path=tok_path, batch_size=local_bs))
    sums = {"loss_sum": 0.0, "correct_sum": 0.0, "tokens": 0.0}
    for i, local in enumerate(ds):
        if i >= max_batches:
            break
        rows = local["input_ids"].shape[0]
        if rows < local_bs:  # pad the last partial batch with empty rows (no loss tokens)
            local = {k: np.concatenate([v, np.zeros((local_bs - rows,) + v.shape[1:], v.dtype)]) for k, v in local.items()}
        out = eval_fn(params, rest, global_batch(local, batch_sh))
        sums = {k: sums[k] + float(out[k]) for k in sums}
    tokens = max(sums["tokens"], 1.0)
    return {"loss": sums["loss_sum"] / tokens, "accuracy": sums["correct_sum"] / tokens, "tokens": sums["tokens"]}


def unigram_baseline(cfg, data_paths, local_bs: int, vocab_size: int, n_train_batches: int = 20) -> float:
    """Cross-entropy of held-out loss tokens under the add-one unigram distribution of training loss
    tokens: the loss a model that ignores context would reach. SFT must end clearly below it."""
    counts = np.ones(vocab_size)
    train = make_dataset(data_config(cfg, split="train", paths=data_paths["train"],
                                     tokenizer_path=data_paths["tokenizer"], batch_size=local_bs))
    for i, b in enumerate(train):
        if i >= n_train_batches:
            break
        np.add.at(counts, b["targets"][b["loss_mask"] > 0], 1)
    logp = np.log(counts / counts.sum())
    total = n = 0.0
    held = make_dataset(data_config(cfg, split="eval", paths=data_paths["eval"],
                                    tokenizer_path=data_paths["tokenizer"], batch_size=local_bs))
    for i, b in enumerate(held):
        if i >= cfg.train.eval_batches:
            break
        t = b["targets"][b["loss_mask"] > 0]
        total -= logp[t].sum()
        n += t.size
    return float(total / max(n, 1))


def run_sft(cfg, workdir: str, data_paths: dict) -> dict:
    """Train; returns the final summary. data_paths: {"train": [...], "eval": [...], "tokenizer": path}."""
    os.makedirs(workdir, exist_ok=True)
    model_cfg = model_config_from(cfg.model)
    mesh = make_mesh(dict(cfg.mesh.shape))
    tcfg = cfg.train
    if tcfg.global_batch % (jax.process_count() * tcfg.micro_batches):
        raise ValueError(f"train.global_batch={tcfg.global_batch} must divide by processes x micro_batches")
    local_bs = tcfg.global_batch // jax.process_count()
    tokenizer = load_tokenizer(data_paths["tokenizer"])
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens > model.vocab_size={model_cfg.vocab_size}")

    # --- model, optimizer and their shardings ---
    # What trains (config.trainable, checked here): the state holds the trainable params, `frozen` the others.
    run = run_layout(cfg, model_cfg, mesh, tcfg.steps)
    tx, lr_schedule, graphdef, abs_rest, rest_sh, layout = (run.tx, run.lr_schedule, run.graphdef, run.abs_rest,
                                                            run.rest_sh, run.layout)
    plan = layout.plan
    batch_sh = batch_shardings(mesh, (tcfg.global_batch, tcfg.seq_len))
    step_fn = jit_train_step(graphdef, tx, lr_schedule, layout.state_sh, rest_sh, batch_sh,
                             micro_batches=tcfg.micro_batches, z_loss_weight=tcfg.z_loss,
                             loss_chunk=tcfg.loss_chunk, plan=plan, frozen_sh=layout.frozen_sh)
    eval_fn = jax.jit(lambda p, r, b, f: eval_step(p, r, b, graphdef=graphdef, frozen=f, plan=plan))

    # --- data ---
    train_ds = make_dataset(data_config(cfg, split="train", paths=data_paths["train"],
                                        tokenizer_path=data_paths["tokenizer"], batch_size=local_bs))
    data_iter = LookaheadIterator(iter(train_ds))

    # --- restore the latest checkpoint, or start fresh ---
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=cfg.checkpoint.keep_last,
                        keep_every=cfg.checkpoint.keep_every, async_save=cfg.checkpoint.async_save)
    start = ckpt.latest_step()
    with jax.set_mesh(mesh):
        if start is not None:
            # The router bias (`rest`) is saved beside the train state: it is part of the model. The saved
            # params are the full model's; the optimizer state is the trainable subset's.
            layout.check_meta(ckpt.meta(start), f"checkpoint step {start} of {workdir}")
            target = {"train": layout.abstract_checkpoint_state(tx),
                      "rest": abstract_with_shardings(abs_rest, rest_sh)}
            restored, _ = ckpt.restore(start, target, data_iter=data_iter)
            (state, frozen), rest = layout.from_checkpoint(restored["train"]), restored["rest"]
            print(f"resumed from step {start} in {workdir}", flush=True)
        else:
            model = initial_model(model_cfg, mesh, init_from=cfg.init_from, seed=cfg.seed,
                                  upcycle=upcycle_config_from(cfg.model))
            _, params, rest = split_model(model)
            del model
            state, frozen = layout.initial(params, tx)
            del params
            rest = jax.device_put(rest, rest_sh)
            start = 0
        if not plan.all:
            print(f"trainable={plan.config.spec()}: {layout.describe()}", flush=True)

        metrics_out = MetricsWriter(workdir, tcfg.steps, start_step=start)
        preempt = _Preemption()
        summary, step = {}, start
        try:
            step, summary = _train_loop(cfg, workdir, data_paths, step_fn, eval_fn, state, rest, data_iter, batch_sh,
                                        ckpt, metrics_out, preempt, start, local_bs, frozen, layout)
        finally:
            preempt.restore()
            ckpt.close()
            metrics_out.close()
    summary.update(final_step=step, preempted=preempt.requested,
                   unigram_baseline_loss=unigram_baseline(cfg, data_paths, local_bs, model_cfg.vocab_size))
    if "eval" in summary:
        print(f"held-out assistant-token loss {summary['eval']['loss']:.4f} (accuracy {summary['eval']['accuracy']:.3f}) "
              f"vs unigram baseline {summary['unigram_baseline_loss']:.4f}", flush=True)
    return {"graphdef": graphdef, "summary": summary}


def _train_loop(cfg, workdir, data_paths, step_fn, eval_fn, state, rest, data_iter, batch_sh, ckpt, metrics_out,
                preempt, start, local_bs, frozen, layout):
    tcfg = cfg.train
    summary, step = {}, start
    if start >= tcfg.steps:
        return step, summary
    def fetch():
        local = next(data_iter)
        # Real (non-padding) tokens of the global batch, for tokens/s; hosts hold equal shares.
        return global_batch(local, batch_sh), int(np.sum(local["doc_ids"] != 0)) * jax.process_count()

    batch, real_tokens = fetch()
    compiled = step_fn.lower(state, rest, batch, frozen).compile()
    # MFU from model FLOPs of the real (non-padding) tokens over the peak of every device.
    flops_per_token = train_flops_per_token(model_config_from(cfg.model), tcfg.seq_len)
    peak = device_peak_flops() * jax.device_count()
    pending = None  # metrics of the previous step, fetched one step late
    nonfinite_streak = 0
    while step < tcfg.steps:
        t0 = time.perf_counter()
        state, metrics = compiled(state, rest, batch, frozen)
        data_iter.consumed()
        if pending is not None:
            nonfinite_streak = _log(metrics_out, pending, nonfinite_streak, tcfg)
        step += 1
        step_tokens = real_tokens
        if step < tcfg.steps:
            batch, real_tokens = fetch()
        jax.block_until_ready(metrics)
        dt = time.perf_counter() - t0
        pending = (step, metrics, {"tokens_per_s": step_tokens / dt, "step_time_s": dt,
                                   "mfu": flops_per_token * step_tokens / dt / peak})
        if step % tcfg.eval_every == 0 or step == tcfg.steps:
            ev = evaluate(lambda p, r, b: eval_fn(p, r, b, frozen), state["params"], rest, cfg, data_paths["eval"], data_paths["tokenizer"],
                          local_bs, batch_sh, tcfg.eval_batches)
            metrics_out.write(step, ev, prefix="eval")
            summary["eval"] = ev
        if (step % cfg.checkpoint.every == 0 or step == tcfg.steps or preempt.requested) \
                and not int(metrics["nonfinite"]):
            ckpt.save(step, {"train": layout.checkpoint_state(state, frozen), "rest": rest}, data_iter=data_iter,
                      meta={"step": step, "config": cfg.variant, "trainable": layout.plan.config.spec()}, force=True)
        if preempt.requested:
            print(f"SIGTERM: checkpointed step {step}, exiting", flush=True)
            break
    if pending is not None:
        _log(metrics_out, pending, nonfinite_streak, tcfg)
    return step, summary


def _log(metrics_out, pending, nonfinite_streak, tcfg):
    step, metrics, host = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    nonfinite_streak = nonfinite_streak + 1 if values["nonfinite"] else 0
    if step % tcfg.log_every == 0 or step == tcfg.steps or values["nonfinite"]:
        metrics_out.write(step, {**values, **host})
    if nonfinite_streak >= tcfg.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{nonfinite_streak} non-finite steps in a row (last at step {step}); stopping. The last good "
            f"checkpoint is intact; lower the learning rate or inspect the data, then rerun to resume.")
    return nonfinite_streak
