"""Progressive RL, stage 2 of 3: longer episodes. Starts from stage 1's final checkpoint.

  python launch/train.py --config=configs/rl_stage2.py:tiny --workdir=runs/klong/rl_stage2
`init_from` is relative to the workdir: '../rl_stage1' is stage 1 beside this stage's workdir.
"""
from configs.rl_common import rl_config


def get_config(variant: str = "tiny"):
    return rl_config(stage=2, variant=variant)
