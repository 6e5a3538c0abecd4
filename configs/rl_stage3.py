"""Progressive RL, stage 3 of 3: the longest episodes. Starts from stage 2's final checkpoint.

  python launch/train.py --config=configs/rl_stage3.py:tiny --workdir=runs/klong/rl_stage3
`init_from` is relative to the workdir: '../rl_stage2' is stage 2 beside this stage's workdir.
"""
from configs.rl_common import rl_config


def get_config(variant: str = "tiny"):
    return rl_config(stage=3, variant=variant)
