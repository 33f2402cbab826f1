"""``ragr1-eval``: exact match and retrieval cost of any checkpoint with the training rollout."""
