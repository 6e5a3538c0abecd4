"""Progressive RL: group-relative advantages, the clipped policy objective, rollouts and the RL step."""
