"""Trajectory splitting: windows = the contexts the ContextPolicy gives, with the KLong loss mask.

Window k is `prefix + turns[s_k .. e_k-1] + assistant message of turn e_k`, where s_k is the start
the policy used for turns g_k..e_k (the turns "generated here"). The observations of turn e_k are not
in window k: nothing in it attends to them, and they may be what overflowed the budget. Turns
s_k..g_k-1 are the overlap with the previous window: context only, unless train_overlap.

Arrays are [L] with positions 0..L-1 as if the window were the whole sequence. targets[t] is the
token after t (the last position has none: pad, no loss); loss_mask[t] is 1 when that next token is
a generated token (assistant body or end of turn) of a turn trained in this window.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from klong_jax.data.template_base import ChatTemplate
from klong_jax.data.context import ContextPolicy, Episode
from klong_jax.data.trajectory import Message, Trajectory


@dataclass(frozen=True)
class Window:
    index: int                     # k within its trajectory
    start_turn: int                # s_k
    end_turn: int                  # e_k (only its assistant message is in the window)
    generated_turns: tuple[int, ...]   # g_k..e_k: the turns generated with this context
    trained_turns: tuple[int, ...]     # turns with loss: generated_turns (+ overlap if train_overlap)
    prefix_len: int
    input_ids: np.ndarray          # int32 [L]
    targets: np.ndarray            # int32 [L]
    loss_mask: np.ndarray          # int32 [L]
    positions: np.ndarray          # int32 [L]
    turn_ids: np.ndarray           # int32 [L]: -1 prefix, else the turn index
    token_offsets: np.ndarray      # int32 [L]: offset inside the prefix or inside its turn
    roles: np.ndarray              # int8 [L]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def example_arrays(ids: np.ndarray, loss_tokens: np.ndarray, pad_id: int):
    """(targets, loss_mask) for next-token prediction over one causal sequence."""
    targets = np.empty_like(ids)
    targets[:-1] = ids[1:]
    targets[-1:] = pad_id
    loss_mask = np.zeros(ids.shape, np.int32)
    loss_mask[:-1] = loss_tokens[1:]
    return targets, loss_mask


def windows_from_episode(episode: Episode, *, train_overlap: bool = False,
                         pad_id: int | None = None) -> list[Window]:
    """The windows of every turn added so far, grouped by the start they were generated with."""
    pad = episode.template.tokenizer.pad_id if pad_id is None else pad_id
    starts, turns, P = episode.starts, episode.turns, episode.prefix_len
    windows: list[Window] = []
    g = 0
    while g < len(turns):
        e = g
        while e + 1 < len(turns) and starts[e + 1] == starts[g]:
            e += 1
        s = starts[g]
        trained = set(range(s if train_overlap else g, e + 1))
        ids = [episode.prefix_ids]
        loss_tokens = [np.zeros(P, bool)]
        turn_ids = [np.full(P, -1, np.int32)]
        offsets = [np.arange(P, dtype=np.int32)]
        roles = [episode.prefix_roles]
        for t in range(s, e + 1):
            n = turns[t].action_len if t == e else len(turns[t])
            ids.append(turns[t].ids[:n])
            loss_tokens.append(turns[t].trainable[:n] & (t in trained))
            turn_ids.append(np.full(n, t, np.int32))
            offsets.append(np.arange(n, dtype=np.int32))
            roles.append(turns[t].roles[:n])
        input_ids = np.concatenate(ids).astype(np.int32)
        targets, loss_mask = example_arrays(input_ids, np.concatenate(loss_tokens), pad)
        windows.append(Window(
            index=len(windows), start_turn=s, end_turn=e, generated_turns=tuple(range(g, e + 1)),
            trained_turns=tuple(sorted(trained)),
            prefix_len=P, input_ids=input_ids, targets=targets, loss_mask=loss_mask,
            positions=np.arange(len(input_ids), dtype=np.int32), turn_ids=np.concatenate(turn_ids),
            token_offsets=np.concatenate(offsets), roles=np.concatenate(roles)))
        g = e + 1
    return windows


def split(trajectory: Trajectory | Sequence[Message], policy: ContextPolicy, *,
          train_overlap: bool = False) -> list[Window]:
    """Replays the policy over a recorded trajectory and returns its windows."""
    messages = trajectory.messages if isinstance(trajectory, Trajectory) else trajectory
    return windows_from_episode(policy.replay(messages), train_overlap=train_overlap)


def sft_example(template: ChatTemplate, messages: Sequence[Message]) -> dict[str, np.ndarray]:
    """Plain SFT tokenisation of a whole conversation (no context policy), cut after its last
    generated token: what follows the last assistant message carries no loss."""
    rendered = template.render(messages)
    last = int(np.flatnonzero(rendered.trainable)[-1]) + 1 if rendered.trainable.any() else 0
    ids = rendered.input_ids[:last]
    targets, loss_mask = example_arrays(ids, rendered.trainable[:last],
                                        template.tokenizer.pad_id)
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask,
            "positions": np.arange(last, dtype=np.int32)}
