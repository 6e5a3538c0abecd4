"""The whole KLong recipe in one run: SFT, RL stages 1-3 (growing timeouts), held-out evaluation.

  python launch/train.py --config=configs/klong.py:tiny --workdir=runs/klong
Sub-configs are the stage configs themselves (`--config.rl_stage2.rl.steps=8`, `--config.sft.train.steps=50`);
the model, mesh and data sections are shared by all stages (`--config.sft.model.num_hidden_layers=2`);
rerunning the command after an interruption resumes where it stopped.
"""
from ml_collections import ConfigDict

from configs.rl_common import rl_config
from configs.sft import get_config as sft_config


def get_config(variant: str = "tiny") -> ConfigDict:
    c = ConfigDict()
    c.kind = "pipeline"
    c.variant = variant
    c.sft = sft_config(variant)
    c.cpu_devices = c.sft.cpu_devices
    for stage in (1, 2, 3):
        c[f"rl_stage{stage}"] = rl_config(stage, variant)
        # One model, mesh and data section for every stage (the same objects): `--config.sft.model.x=...`
        # changes the model of the whole recipe, so stage checkpoints always fit the next stage.
        for section in ("model", "mesh", "data"):
            c[f"rl_stage{stage}"][section] = c.sft[section]
    last = c.rl_stage3.agent
    c.eval = ConfigDict(dict(n_tasks=c.rl_stage3.eval.n_tasks, n_per_task=1, seed=123,
                             agent=dict(timeout_s=last.timeout_s, max_turns=last.max_turns,
                                        max_total_tokens=last.max_total_tokens,
                                        max_new_tokens_per_turn=last.max_new_tokens_per_turn,
                                        temperature=0.0)))
    c.data = c.sft.data   # the pipeline prepares the embedded data once for every stage
    return c
