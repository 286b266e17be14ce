"""Rotary position embeddings: HF's half-split (`rotate_half`) or interleaved-pair layout.

A NoPE layer is simply a layer that does not call `apply_rope`: the causal mask alone carries
token order there (Kazemnejad et al. 2023; SmolLM3 drops RoPE from every 4th layer).
Positions are always passed in, so packed documents can restart at 0.

Scaling follows HF `rope_scaling` (`modeling_rope_utils.py`): `linear` divides every frequency by
`factor`; `yarn` (Peng et al. 2023) blends interpolated and original frequencies by wavelength and
multiplies cos/sin by an attention factor; `llama3` (Llama 3.1 / Llama 4) divides the long
wavelengths by `factor`, keeps the short ones and interpolates smoothly in between. Each applies
to RoPE layers only, by construction.

Partial RoPE (HF `partial_rotary_factor`, "default" semantics) rotates the first
R = int(f * head_dim) dims with frequencies over R and passes the rest through unchanged: the
rotated width is simply the width of cos/sin. The interleaved layout (Cohere2, Llama 4) pairs
dims (0, 1), (2, 3), ... instead of (i, i + R/2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Rope(NamedTuple):
    inv_freq: np.ndarray  # [E/2] float32
    attention_factor: float  # multiplies cos and sin (YaRN); 1.0 otherwise


def default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    # float32 exactly as HF: 1 / theta ** (arange(0, E, 2) / E) in torch.float
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def make_rope(head_dim: int, theta: float, scaling: dict | None = None, partial_rotary_factor: float = 1.0) -> Rope:
    head_dim = int(head_dim * partial_rotary_factor)  # the rotated width R; HF computes it the same way
    inv_freq = default_inv_freq(head_dim, theta)
    if not scaling:
        return Rope(inv_freq, 1.0)
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return Rope((inv_freq / np.float32(factor)).astype(np.float32), 1.0)
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, factor)
    if kind == "llama3":
        return Rope(_llama3(inv_freq, scaling, factor), 1.0)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; use 'linear', 'yarn' or 'llama3'")


def _llama3(inv_freq: np.ndarray, scaling: dict, factor: float) -> np.ndarray:
    """HF's `_compute_llama3_parameters`: float32 frequencies, python-float wavelength bounds."""
    low_freq_factor = scaling["low_freq_factor"]  # 1 in Llama 3.1
    high_freq_factor = scaling["high_freq_factor"]  # 4 in Llama 3.1
    old_context_len = scaling["original_max_position_embeddings"]  # 8192 in Llama 3.1
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    # longer than the original context: interpolate (divide by factor); shorter than the high bound: keep
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    if high_freq_factor == low_freq_factor:  # Llama 4 Scout: no band to interpolate (HF's 0/0 there is unused)
        return scaled
    smooth = ((old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(head_dim: int, theta: float, scaling: dict, factor: float) -> Rope:
    """HF's `_compute_yarn_parameters`, in numpy (float32 where HF uses torch.float)."""
    original_max = scaling.get("original_max_position_embeddings")
    if original_max is None:
        raise ValueError("yarn rope_scaling needs original_max_position_embeddings (the training length)")
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    truncate = scaling.get("truncate", True)

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations):
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as HF does
    pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return Rope(inv_freq.astype(np.float32), float(attention_factor))


def cos_sin(positions, rope: Rope, layout: str = "half"):
    """positions [B, S] int -> (cos, sin), each [B, S, R] float32 (R = rotated width)."""
    angles_BSr = positions[..., None].astype(jnp.float32) * jnp.asarray(rope.inv_freq)
    if layout == "interleaved":  # pair i is dims (2i, 2i + 1)
        angles_BSR = jnp.repeat(angles_BSr, 2, axis=-1)
    else:  # pair i is dims (i, i + R/2)
        angles_BSR = jnp.concatenate([angles_BSr, angles_BSr], axis=-1)
    return jnp.cos(angles_BSR) * rope.attention_factor, jnp.sin(angles_BSR) * rope.attention_factor


def apply_rope(x_BSHE, cos_BSR, sin_BSR, layout: str = "half"):
    """x * cos + rotate(x) * sin on the first R dims, in float32; the other E - R pass through."""
    R = cos_BSR.shape[-1]
    x = x_BSHE.astype(jnp.float32)
    x_rot, x_pass = x[..., :R], x[..., R:]
    if layout == "interleaved":
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = jnp.stack([-x2, x1], axis=-1).reshape(x_rot.shape)
    else:
        x1, x2 = jnp.split(x_rot, 2, axis=-1)
        rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_rot * cos_BSR[:, :, None, :] + rotated * sin_BSR[:, :, None, :]
    return jnp.concatenate([out, x_pass], axis=-1).astype(x_BSHE.dtype)
