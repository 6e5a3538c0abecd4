"""SFT training: optimizer, loss, jit'd sharded step, checkpoints, metrics, the loop."""
