"""Training: pure steps, optimizer, metrics, and the loop shared by every family."""

from jaxalign.train.loop import evaluate_checkpoint, setup, train

__all__ = ["evaluate_checkpoint", "setup", "train"]
