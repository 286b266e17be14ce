"""Plain-jnp attention the flash kernels are tested against.

Deliberately naive and independent of the kernel code: fp32 throughout, RoPE
applied to explicit copies of q and k (HF half-split convention, as
transformers' LlamaRotaryEmbedding / apply_rotary_pos_emb), GQA by repeating
k and v, and the full [S, S] score matrix. Shape letters: B batch, S sequence,
H heads (Hq query, Hkv key/value), D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _rotate_half(x):  # [..., D]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _apply_rope(x_BSHD, positions_BS, inv_freq_H, factor):
    angle_BSH = positions_BS.astype(jnp.float32)[..., None] * inv_freq_H
    emb_BSD = jnp.concatenate([angle_BSH, angle_BSH], axis=-1)
    cos = (jnp.cos(emb_BSD) * factor)[:, :, None, :]
    sin = (jnp.sin(emb_BSD) * factor)[:, :, None, :]
    return x_BSHD * cos + _rotate_half(x_BSHD) * sin


def reference_attention(
    q,  # [B, S, Hq, D]
    k,  # [B, S, Hkv, D]
    v,  # [B, S, Hkv, D]
    *,
    segment_ids=None,  # [B, S] int
    positions=None,  # [B, S] int
    rope: bool = True,
    rope_theta: float = 10000.0,
    causal: bool = True,
    sm_scale: float | None = None,
    inv_freq=None,  # [D // 2] fp32
    rope_attention_factor: float = 1.0,
):
    """Softmax attention with optional RoPE, causal and document masks; returns [B, S, Hq, D] in q's dtype."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    if sm_scale is None:
        sm_scale = D**-0.5
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    if rope:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        if inv_freq is None:
            inv_freq = 1.0 / (rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
        inv_freq = jnp.asarray(inv_freq, jnp.float32)
        q32 = _apply_rope(q32, positions, inv_freq, rope_attention_factor)
        k32 = _apply_rope(k32, positions, inv_freq, rope_attention_factor)
    k32 = jnp.repeat(k32, Hq // Hkv, axis=2)
    v32 = jnp.repeat(v32, Hq // Hkv, axis=2)
    logits_BHSS = jnp.einsum("bqhd,bkhd->bhqk", q32, k32, precision=_HIGHEST) * sm_scale
    mask = jnp.ones((B, 1, S, S), bool)
    if causal:
        mask &= jnp.tril(jnp.ones((S, S), bool))[None, None]
    if segment_ids is not None:
        mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    logits_BHSS = jnp.where(mask, logits_BHSS, -jnp.inf)
    weights = jax.nn.softmax(logits_BHSS, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v32, precision=_HIGHEST)
    return out.astype(q.dtype)
