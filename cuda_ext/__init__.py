"""CUDA sources of skyfall's own kernels, installed as ``skyfall.cuda_ext`` (see README there)."""

from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
