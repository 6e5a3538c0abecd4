"""Metrics out: a console progress line with ETA, TensorBoard event files, and a metrics JSONL.

Only process 0 writes. Values are fetched one step late by the caller so logging never stalls the device.
"""
import json
import os
import time

import jax
import numpy as np


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, *, prefix: str = "train", start_step: int = 0):
        """start_step: the step this process resumes from, so the ETA is paced by the steps it has run itself."""
        self.enabled = jax.process_index() == 0
        self.total_steps, self.prefix, self.start_step = total_steps, prefix, start_step
        self._t_start = time.time()
        self._tb = self._jsonl = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, metrics: dict, *, console: bool = True, prefix: str | None = None) -> None:
        if not self.enabled:
            return
        prefix = prefix or self.prefix
        clean = {k: (float(np.asarray(v)) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}
        for k, v in clean.items():
            if isinstance(v, float):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
        self._jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if console:
            print(self.progress_line(step, clean, prefix), flush=True)

    def progress_line(self, step: int, m: dict, prefix: str) -> str:
        elapsed = time.time() - self._t_start
        done = max(step - self.start_step, 1)
        eta = elapsed / done * max(self.total_steps - step, 0)
        parts = [f"[{prefix}] step {step}/{self.total_steps}"]
        for key, fmt in (("loss", "{:.4f}"), ("accuracy", "{:.3f}"), ("grad_norm", "{:.3f}"), ("lr", "{:.2e}"),
                         ("tokens_per_s", "{:.0f}"), ("step_time_s", "{:.3f}"), ("mfu", "{:.2%}"),
                         ("reward_mean", "{:.3f}"), ("rubric_leaf_pass_rate", "{:.3f}"), ("clip_frac", "{:.3f}"),
                         ("approx_kl_mean", "{:.4f}"), ("entropy", "{:.3f}"), ("rollout_time_s", "{:.1f}"),
                         ("update_time_s", "{:.1f}")):
            if key in m and isinstance(m[key], float):
                parts.append(f"{key} {fmt.format(m[key])}")
        if prefix == self.prefix:
            parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
        return " | ".join(parts)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
