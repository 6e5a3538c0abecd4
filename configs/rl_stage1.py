"""Progressive RL, stage 1 of 3: the shortest episode timeout and budgets. Starts from the SFT checkpoint.

  python launch/train.py --config=configs/rl_stage1.py:tiny --workdir=runs/klong/rl_stage1
`init_from` is relative to the workdir: '../sft' is the SFT run beside this stage's workdir.
"""
from configs.rl_common import rl_config


def get_config(variant: str = "tiny"):
    return rl_config(stage=1, variant=variant)
