"""CommandJudge: grades leaves that carry a `check` shell command by running it in the sandbox.

The check runs in the episode directory after the episode (as the agent would have, confined: a check
written by a task author still runs on training hosts). Exit status 0: satisfied (1); any other exit
status: not satisfied (0). A timeout or a sandbox failure is an invalid grading, never a silent 0.
"""
from __future__ import annotations

import os
import threading

from klong_jax.rubric.grading import GradingContext, LeafVerdict
from klong_jax.rubric.tree import RubricNode
from klong_jax.sandbox import Sandbox, SandboxLimits

_OUTPUT_IN_EXPLANATION = 2000  # characters of the check's output kept in the explanation


class CommandJudge:
    name = "command"

    def __init__(self, sandbox: Sandbox | None = None, *, timeout_s: float = 60.0,
                 limits: SandboxLimits | None = None, **sandbox_kwargs):
        """sandbox: run checks in this sandbox (its episode directory must be the graded one);
        otherwise the judge opens one sandbox per episode directory (with `limits` and
        `sandbox_kwargs`) on first use and keeps it until close()."""
        self.timeout_s = timeout_s
        self._given = sandbox
        self._limits = limits
        self._sandbox_kwargs = sandbox_kwargs
        self._own: dict[str, Sandbox] = {}
        self._lock = threading.Lock()

    def accepts(self, leaf: RubricNode) -> bool:
        return leaf.check is not None

    def judge(self, leaf: RubricNode, context: GradingContext) -> LeafVerdict:
        try:
            sandbox = self._sandbox_for(context.episode_dir)
            result = sandbox.run(leaf.check, timeout_s=self.timeout_s)
        except Exception as e:  # sandbox unavailable, closed, or failed to start
            return LeafVerdict(0.0, False,
                               f"sandbox failure running the check: {type(e).__name__}: {e}",
                               self.name, {"check": leaf.check})
        output = result.output[-_OUTPUT_IN_EXPLANATION:]
        metadata = {"check": leaf.check, "exit_code": result.exit_code, "wall_s": result.wall_s}
        if result.timed_out:
            return LeafVerdict(0.0, False, f"check timed out after {self.timeout_s:g}s: {leaf.check}\n"
                               f"{output}", self.name, metadata)
        if result.exit_code == 0:
            return LeafVerdict(1.0, True, f"check passed: {leaf.check}\n{output}", self.name, metadata)
        return LeafVerdict(0.0, True, f"check failed (exit {result.exit_code}): {leaf.check}\n{output}",
                           self.name, metadata)

    def _sandbox_for(self, episode_dir: str) -> Sandbox:
        if self._given is not None:
            if os.path.realpath(episode_dir) != self._given.episode_dir:
                raise ValueError(f"this CommandJudge's sandbox is for {self._given.episode_dir}, "
                                 f"not {episode_dir}")
            return self._given
        key = os.path.realpath(episode_dir)
        with self._lock:
            if key not in self._own:
                self._own[key] = Sandbox(key, limits=self._limits, **self._sandbox_kwargs)
            return self._own[key]

    def close(self) -> None:
        with self._lock:
            for sandbox in self._own.values():
                sandbox.close()
            self._own.clear()

    def __enter__(self) -> "CommandJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
