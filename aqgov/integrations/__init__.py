"""Surfaces for experiment trackers.

wandb  Weights & Biases: governance metrics per step, manifest and output artifacts, and
       `check_logged`, which checks an offline W&B run against the signed lineage (extra `wandb`)
"""

__all__ = ["wandb"]
