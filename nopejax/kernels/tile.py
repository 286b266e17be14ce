"""Tile math shared by the TPU (Mosaic) and GPU (Triton) flash-attention kernels.

Everything here acts on one [rows, cols] tile already in fast memory; the
backend modules only decide how tiles are walked (a grid axis with scratch
accumulators on TPU, an in-kernel loop on GPU). Row vectors are kept 2-D,
[rows, 1], and column vectors [1, cols], which both Mosaic and Triton lower.

RoPE is applied while a q or k tile is loaded: its two halves are read from
the ref, rotated in fp32 (HF half-split convention:
x*cos + rotate_half(x)*sin, rotate_half(x) = concat(-x2, x1)) and cast back
to the input dtype for the matrix unit. A tile is carried as a tuple of
"parts" whose dot products add up to the full one: (x,) for a NoPE tile or a
rotated tile re-joined on TPU, (x1, x2) for a rotated tile on GPU, where
Triton cannot concatenate along lanes. Gradients with respect to the rotated
tiles are rotated back with the transposed rotation before they are stored.

Softmax runs in base 2 (exp2, log2(e) folded into the score scale), as in
JAX's GPU kernel; the saved log-sum-exp is in the same base.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

# Finite, so a row whose first tile is fully masked gives exp2(0) = 1 instead
# of NaN; the next unmasked tile's rescale factor exp2(MASK - m) wipes it.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Static facts every kernel needs; hashable so it can be a custom_vjp static argument."""

    causal: bool
    sm_scale: float
    rope: bool
    rope_factor: float
    head_dim: int
    num_groups: int  # Hq // Hkv; q head h reads kv head h // num_groups
    seq_len: int  # unpadded length; keys at or past it are masked when the input was padded
    padded_len: int
    has_segments: bool
    join_halves: bool  # re-join rotated halves into one tile (TPU); keep two parts (GPU)

    @property
    def mask_padding(self) -> bool:
        # Causal masking already hides padded keys from every real query.
        return self.padded_len != self.seq_len and not self.causal


# ----------------------------------------------------------------------------- RoPE


def rope_cos_sin(pos_R1, inv_freq_1H, factor: float):
    """cos and sin of position * inv_freq, [R, D/2] fp32, scaled by the attention factor."""
    angle_RH = pos_R1.astype(jnp.float32) * inv_freq_1H
    cos, sin = jnp.cos(angle_RH), jnp.sin(angle_RH)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos, sin


def load_tile(ref, rows, col0: int, cfg: TileConfig, rot=None):
    """Read a [R, D] tile (columns col0:col0+D of ref) as parts; rotate it when rot = (cos, sin)."""
    D = cfg.head_dim
    if rot is None:
        return (ref[rows, pl_slice(col0, D)],)
    half = D // 2
    cos, sin = rot
    x1 = ref[rows, pl_slice(col0, half)].astype(jnp.float32)
    x2 = ref[rows, pl_slice(col0 + half, half)].astype(jnp.float32)
    y1 = (x1 * cos - x2 * sin).astype(ref.dtype)
    y2 = (x2 * cos + x1 * sin).astype(ref.dtype)
    if cfg.join_halves:
        return (jnp.concatenate([y1, y2], axis=1),)
    return (y1, y2)


def store_tile(ref, rows, col0: int, parts, cfg: TileConfig, rot=None):
    """Write fp32 parts of a gradient tile to ref, first undoing the rotation when rot is given."""
    D = cfg.head_dim
    if rot is None:
        (g,) = parts
        ref[rows, pl_slice(col0, D)] = g.astype(ref.dtype)
        return
    half = D // 2
    cos, sin = rot
    g1, g2 = parts if len(parts) == 2 else (parts[0][:, :half], parts[0][:, half:])
    # Transpose of [[cos, -sin], [sin, cos]] acting on (x1, x2).
    ref[rows, pl_slice(col0, half)] = (g1 * cos + g2 * sin).astype(ref.dtype)
    ref[rows, pl_slice(col0 + half, half)] = (g2 * cos - g1 * sin).astype(ref.dtype)


def pl_slice(start: int, size: int):
    return slice(start, start + size)


# ----------------------------------------------------------------------------- products


def _dot(a, b, dims):
    # Explicit precision: a global jax_default_matmul_precision="highest" would otherwise ask Mosaic
    # for an fp32 contraction of bf16 operands, which it rejects. fp32 inputs stay exact.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def scores(q_parts, k_parts, cfg: TileConfig):
    """Scaled logits in base 2, [Rq, Rk] fp32: (q . k) * sm_scale * log2(e)."""
    s = None
    for qp, kp in zip(q_parts, k_parts):
        d = _dot(qp, kp, _NT)
        s = d if s is None else s + d
    return s * (cfg.sm_scale * LOG2_E)


def dot_parts(a, parts):
    """a @ part for each part, fp32: [R, C] x [C, d] -> [R, d]."""
    return tuple(_dot(a.astype(p.dtype), p, _NN) for p in parts)


def dot_t_parts(a, parts):
    """a.T @ part for each part, fp32: [R, C] x [R, d] -> [C, d]."""
    return tuple(_dot(a.astype(p.dtype), p, _TN) for p in parts)


def add_parts(acc, new):
    return tuple(a + n for a, n in zip(acc, new))


# ----------------------------------------------------------------------------- masks


def needs_run(q_start, q_rows: int, k_start, cfg: TileConfig):
    """False for a tile wholly above the causal diagonal: it is skipped, not computed and masked."""
    if not cfg.causal:
        return True
    return k_start <= q_start + (q_rows - 1)


def mask_tile(s, q_start, k_start, cfg: TileConfig, q_seg_R1=None, k_seg_1C=None):
    """Set masked logits to MASK_VALUE: causal, document (segment ids) and padded keys."""
    R, C = s.shape
    keep = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if cfg.causal or cfg.mask_padding:
        cols = k_start + lax.broadcasted_iota(jnp.int32, (1, C), 1)
        if cfg.causal:
            rows = q_start + lax.broadcasted_iota(jnp.int32, (R, 1), 0)
            keep = both(keep, cols <= rows)
        if cfg.mask_padding:
            keep = both(keep, cols < cfg.seq_len)
    if q_seg_R1 is not None:
        keep = both(keep, q_seg_R1 == k_seg_1C)
    if keep is None:
        return s
    return jnp.where(keep, s, MASK_VALUE)


# ----------------------------------------------------------------------------- softmax


def online_softmax_step(s, m_prev, denom_prev, acc_prev, v):
    """One flash-attention update with a masked base-2 logit tile s [Rq, Rk]; returns (m, l, acc)."""
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [Rq, 1]
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next)
    denom_next = alpha * denom_prev + jnp.sum(p, axis=1, keepdims=True)
    (pv,) = dot_parts(p, (v,))
    return m_next, denom_next, acc_prev * alpha + pv


def finish_softmax(m, denom, acc):
    """Normalised output [Rq, D] fp32 and the base-2 log-sum-exp [Rq, 1]."""
    return acc / denom, m + jnp.log2(denom)


def probs_and_dlogits(s, lse_R1, do, v, di_R1):
    """Backward of one tile: p = softmax probs and ds = dL/d(q.k) / sm_scale, both [Rq, Rk] fp32."""
    p = jnp.exp2(s - lse_R1)
    dp = _dot(do, v, _NT)
    return p, p * (dp - di_R1)


def zeros_parts(rows: int, cfg: TileConfig, rope: bool):
    """fp32 accumulators shaped like the parts a (possibly rotated) tile is carried as."""
    D = cfg.head_dim
    if rope and not cfg.join_halves:
        return (jnp.zeros((rows, D // 2), jnp.float32), jnp.zeros((rows, D // 2), jnp.float32))
    return (jnp.zeros((rows, D), jnp.float32),)
