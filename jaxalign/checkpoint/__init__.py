"""Checkpoints: Orbax run checkpoints (manager.py) and Hugging Face import/export (hf.py)."""

from jaxalign.checkpoint.hf import load_hf, load_hf_config, save_hf

__all__ = ["load_hf", "load_hf_config", "save_hf"]
