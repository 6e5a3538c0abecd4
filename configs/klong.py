"""The whole KLong recipe in one run: zero-shot evaluation of the base, SFT, RL stages 1-3 (growing budgets), each
stage's checkpoint evaluated on held-out tasks, and the expert's ceiling under each stage's budget.

  python launch/train.py --config=configs/klong.py:smol --workdir=runs/klong            (the README's `make demo`)
  python launch/train.py --config=configs/klong.py:smol,stage3_only --workdir=runs/s3    (ablation: SFT, then stage
                                                                                        3's budget alone)
  python launch/train.py --config=configs/klong.py:smol --config.seed=1 --workdir=...     (another seed)
Sub-configs are the stage configs themselves (`--config.rl_stage2.rl.steps=8`, `--config.sft.train.steps=50`);
the model, mesh, data, trainable and rollout sections are shared by all stages (`--config.sft.model.num_hidden_layers=2`,
`--config.sft.trainable.top_layers=4`);
rerunning the command after an interruption resumes where it stopped.

`seed` drives every stage's own seed (SFT data order: seed; RL stage s: seed + s, its task order and sampling):
the base model, the data and the held-out tasks do not change with it. `schedule`: `progressive` (stages 1 -> 2 -> 3)
or `stage3_only`: SFT, then RL at stage 3's budget only, for as many steps (rollout episodes) as the three
progressive stages together, starting from the SFT checkpoint.
"""
from ml_collections import ConfigDict

from configs.rl_common import rl_config
from configs.sft import get_config as sft_config

SCHEDULES = ("progressive", "stage3_only")


def get_config(arg: str = "tiny") -> ConfigDict:
    variant, _, schedule = arg.partition(",")
    schedule = schedule or "progressive"
    if schedule not in SCHEDULES:
        raise ValueError(f"configs/klong.py:{arg}: schedule {schedule!r} is not one of {SCHEDULES} "
                         "(e.g. configs/klong.py:smol,stage3_only)")
    c = ConfigDict()
    c.kind = "pipeline"
    c.variant = variant
    c.schedule = schedule
    c.seed = 0
    c.sft = sft_config(variant)
    c.sft.seed = c.get_ref("seed")
    c.cpu_devices = c.sft.cpu_devices
    for stage in (1, 2, 3):
        c[f"rl_stage{stage}"] = rl_config(stage, variant)
        c[f"rl_stage{stage}"].seed = c.get_ref("seed") + stage
        # One model, mesh, data and trainable section for every stage (the same objects): `--config.sft.model.x=...`
        # changes the model of the whole recipe, so stage checkpoints always fit the next stage;
        # `--config.sft.trainable.top_layers=4` trains the top 4 layers in SFT and every RL stage.
        for section in ("model", "mesh", "data", "trainable", "rollout"):
            c[f"rl_stage{stage}"][section] = c.sft[section]
    if schedule == "stage3_only":
        c.rl_stage3.init_from = "../sft"
        c.rl_stage3.rl.steps = sum(c[f"rl_stage{s}"].rl.steps for s in (1, 2, 3))
    last = c.rl_stage3.agent
    c.eval = ConfigDict(dict(n_tasks=c.rl_stage3.eval.n_tasks, n_per_task=1, seed=123,
                             agent=dict(timeout_s=last.timeout_s, max_turns=last.max_turns,
                                        max_total_tokens=last.max_total_tokens,
                                        max_new_tokens_per_turn=last.max_new_tokens_per_turn,
                                        one_call_per_turn=last.one_call_per_turn, temperature=0.0)))
    c.data = c.sft.data   # the pipeline prepares the embedded data once for every stage
    return c
