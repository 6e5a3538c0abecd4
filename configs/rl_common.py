"""Shared shape of the progressive RL stage configs (rl_stage1..3): the model, mesh, data and trainable
sections are SFT's; the stage number sets the episode timeout and the turn/token budgets, which grow stage by stage."""
from ml_collections import ConfigDict

from configs.sft import get_config as sft_config

# Per stage: (episode timeout seconds, max assistant turns, max generated tokens per episode).
STAGES = {
    # The embedded tiny tasks take the expert ~13 turns: stage 1's budget stops short of that, so the curriculum
    # starts on truncated episodes; stage 2's fits the work, stage 3's leaves room to repair mistakes.
    "tiny": {1: (30.0, 8, 1200), 2: (60.0, 16, 2400), 3: (120.0, 24, 4800)},
    # The same tasks for the 135M model, whose turns take seconds to sample on 2 CPU cores. The expert needs 12-18
    # turns (median 13): stage 1's 6 turns stop it in its first section, stage 2's 11 in its second, stage 3's 16
    # fit most tasks (the expert replayed under each budget shows it); tokens: 96 per turn; the timeouts leave room.
    "smol": {1: (300.0, 6, 576), 2: (600.0, 11, 1056), 3: (1200.0, 16, 1536)},
    "small": {1: (600.0, 50, 20_000), 2: (1800.0, 150, 60_000), 3: (3600.0, 300, 120_000)},
    # GLM-4.5-Air agent runs of hours, as in KLong: 2 h, 6 h, 12 h.
    "glm45_air": {1: (7200.0, 400, 400_000), 2: (21600.0, 1000, 1_000_000), 3: (43200.0, 2000, 2_000_000)},
}


# Per variant: optimizer, RL loop sizes and agent sampling limits (stage-independent).
# smol: its top 8 layers train (config.trainable), so a larger lr than full-parameter RL: SFT's final lr (2e-5), as
# each stage has only 2 steps.
OPTIMIZER = {"tiny": dict(lr=1e-4), "smol": dict(lr=2e-5), "small": dict(lr=1e-6), "glm45_air": dict(lr=1e-6)}
# loss_chunk: tokens per logits chunk of the update's log-probs (0: the whole row at once). Tiny and smol: off, their
# rows' logits are small (2048 x 2048 x 4 B = 16 MiB, 2048 x 49152 x 4 B = 384 MiB). The large variants: 2048, half
# SFT's 4096, because the RL pass keeps more [tokens, V] fp32 arrays alive per chunk than the SFT loss (the tempered
# logits, and the entropy's log_softmax and softmax): glm45_air's 131072-token rows hold 131072 x 151552 x 4 B =
# 79.5 GB of logits unchunked, a chunk 2048 x 151552 x 4 B = 1.24 GB per array (64 chunks, no padding); small's
# 8192 x 32000 x 4 B = 1.05 GB per row becomes 0.26 GB per array.
LOOP = {
    "tiny": dict(steps=4, tasks_per_step=2, group_size=4, ppo_epochs=2, seq_len_factor=2, max_concurrent_episodes=8,
                 replay_gap=True, minibatches=2, loss_chunk=0),
    "smol": dict(steps=2, tasks_per_step=2, group_size=4, ppo_epochs=1, seq_len_factor=2, max_concurrent_episodes=8,
                 replay_gap=False, minibatches=0, loss_chunk=0),
    "small": dict(steps=200, tasks_per_step=64, group_size=16, ppo_epochs=1, seq_len_factor=1,
                  max_concurrent_episodes=64, replay_gap=True, minibatches=0, loss_chunk=2048),
    "glm45_air": dict(steps=200, tasks_per_step=64, group_size=16, ppo_epochs=1, seq_len_factor=1,
                      max_concurrent_episodes=64, replay_gap=True, minibatches=0, loss_chunk=2048),
}
# max_new_tokens_per_turn (None: the episode's token budget); disk_mib: episode directory space (tiny tasks write a
# few KiB; an ML experiment writes data and checkpoints); eval_tasks: held-out tasks per stage evaluation.
AGENT = {
    "tiny": dict(max_new_tokens_per_turn=160, disk_mib=64, eval_tasks=8, one_call_per_turn=False),
    # smol: the expert's longest turn is 82 tokens (ChatML, the SmolLM2 tokenizer).
    # one_call_per_turn: a turn ends after its first complete tool call (ChatML), as the expert's turns do.
    "smol": dict(max_new_tokens_per_turn=96, disk_mib=64, eval_tasks=8, one_call_per_turn=True),
    "small": dict(max_new_tokens_per_turn=None, disk_mib=200 * 1024, eval_tasks=32, one_call_per_turn=False),
    "glm45_air": dict(max_new_tokens_per_turn=None, disk_mib=200 * 1024, eval_tasks=32, one_call_per_turn=False),
}


def rl_config(stage: int, variant: str) -> ConfigDict:
    base = sft_config(variant)
    timeout_s, max_turns, max_tokens = STAGES[variant][stage]
    loop, agent = LOOP[variant], AGENT[variant]
    c = ConfigDict()
    c.kind = "rl"
    c.stage = stage
    c.variant = variant
    c.seed = base.seed + stage
    c.cpu_devices = base.cpu_devices
    c.init_from = "../sft" if stage == 1 else f"../rl_stage{stage - 1}"
    c.model = base.model
    c.mesh = base.mesh
    c.data = base.data
    c.trainable = base.trainable   # what trains: SFT's section (klong_jax/training/trainable.py)
    c.rollout = base.rollout       # the rollout sampler's devices and dtype: SFT's section (its eval uses it too)
    c.optimizer = ConfigDict(dict(**OPTIMIZER[variant], warmup_steps=0, final_lr_fraction=1.0, b1=0.9, b2=0.99,
                                  eps=1e-8, weight_decay=0.0, clip_norm=1.0))
    c.rl = ConfigDict(dict(
        steps=loop["steps"], tasks_per_step=loop["tasks_per_step"], group_size=loop["group_size"],
        advantage="grpo",              # grpo | dr_grpo | rloo
        eps_low=0.2, eps_high=0.28,    # asymmetric clipping
        kl_coef=0.0,                   # k3 KL to the frozen stage-start policy (0: off)
        tis_cap=2.0,                   # truncated importance weight cap (0: off)
        routing_replay=True,           # force the sampler's experts in the training forward pass
        # Also compute the old log-probs without replay and log the sampler-trainer gap both ways (one more forward
        # pass per batch). smol: off, the demo's updates cost as much as its rollouts.
        replay_gap=loop["replay_gap"],
        ppo_epochs=loop["ppo_epochs"],
        # Optimizer steps per pass over a step's rows: each over a mini-batch of whole batches whose gradients
        # are summed exactly (0, off: one step per batch of batch_rows rows, a step on 1-2 episodes).
        minibatches=loop["minibatches"],
        seq_len=base.train.seq_len * loop["seq_len_factor"], batch_rows=base.train.global_batch,
        packing="shared_prefix", max_concurrent_episodes=loop["max_concurrent_episodes"],
        loss_chunk=loop["loss_chunk"]))   # tokens per logits chunk of the log-probs (0: whole row; LOOP says why)
    c.agent = ConfigDict(dict(timeout_s=timeout_s, max_turns=max_turns, max_total_tokens=max_tokens,
                              max_new_tokens_per_turn=agent["max_new_tokens_per_turn"], temperature=1.0, top_p=1.0,
                              top_k=0, reminder_every=10, disk_mib=agent["disk_mib"],
                              one_call_per_turn=agent["one_call_per_turn"], submit_ends_episode=True))
    c.eval = ConfigDict(dict(n_tasks=agent["eval_tasks"], timeout_s=timeout_s, max_turns=max_turns))
    return c
