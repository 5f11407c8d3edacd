"""The Flower ServerApp side: per-expert strategy, reply checks, round loop, checkpoints."""
