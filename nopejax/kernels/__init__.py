"""Pallas flash attention with RoPE fused in for RoPE layers (TPU: Mosaic, GPU: Triton).

Imports nothing from the rest of nopejax, so the kernels can be tested and
benchmarked on their own.
"""

from nopejax.kernels.flash import SUPPORTED_HEAD_DIMS, describe, flash_attention, grid_steps
from nopejax.kernels.reference import reference_attention

__all__ = ["SUPPORTED_HEAD_DIMS", "describe", "flash_attention", "grid_steps", "reference_attention"]
