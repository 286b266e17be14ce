"""Plain-jnp attention the flash kernels are tested against.

Deliberately naive and independent of the kernel code: fp32 throughout, RoPE
applied to explicit copies of q and k (HF half-split convention, as
transformers' LlamaRotaryEmbedding / apply_rotary_pos_emb, or HF Cohere's
interleaved pairs; partial rotary as HF: first rot_dim dims rotated, the rest
passed), GQA by repeating k and v, and the full [S, S] score matrix with
every mask (causal, window, chunk, document) written out densely. Shape letters: B batch, S sequence,
H heads (Hq query, Hkv key/value), E head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _rotate_half(x):  # [..., R]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _rotate_interleaved(x):  # [..., R]: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...), as HF Cohere
    x1, x2 = x[..., ::2], x[..., 1::2]
    return jnp.stack([-x2, x1], axis=-1).reshape(x.shape)


def _apply_rope(x_BSHE, positions_BS, inv_freq_r, factor, rot_dim, layout):
    """Rotate the first rot_dim dims of each head (HF partial rotary); the rest pass through."""
    angle_BSr = positions_BS.astype(jnp.float32)[..., None] * inv_freq_r
    if layout == "half":
        emb_BSR = jnp.concatenate([angle_BSr, angle_BSr], axis=-1)
        rotate = _rotate_half
    else:
        emb_BSR = jnp.repeat(angle_BSr, 2, axis=-1)
        rotate = _rotate_interleaved
    cos = (jnp.cos(emb_BSR) * factor)[:, :, None, :]
    sin = (jnp.sin(emb_BSR) * factor)[:, :, None, :]
    x_rot, x_pass = x_BSHE[..., :rot_dim], x_BSHE[..., rot_dim:]
    return jnp.concatenate([x_rot * cos + rotate(x_rot) * sin, x_pass], axis=-1)


def reference_attention(
    q,  # [B, S, Hq, E]
    k,  # [B, S, Hkv, E]
    v,  # [B, S, Hkv, E]
    *,
    segment_ids=None,  # [B, S] int
    positions=None,  # [B, S] int
    rope: bool = True,
    rope_theta: float = 10000.0,
    causal: bool = True,
    sm_scale: float | None = None,
    inv_freq=None,  # [rot_dim // 2] fp32
    rope_attention_factor: float = 1.0,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    partial_rotary_factor: float = 1.0,
    rope_layout: str = "half",
    nope_temperature: tuple[float, float] | None = None,
):
    """Softmax attention with optional RoPE, causal, window, chunk and document masks; [B, S, Hq, E] in q's dtype.

    Windows and chunks compare positions (arange(S) when not given), within a document:
    key j visible to query i iff pos_i - W < pos_j <= pos_i, or pos_i // C == pos_j // C, and j <= i.
    """
    B, S, Hq, E = q.shape
    Hkv = k.shape[2]
    if sm_scale is None:
        sm_scale = E**-0.5
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    if rope:
        rot_dim = int(E * partial_rotary_factor)
        if inv_freq is None:
            inv_freq = 1.0 / (rope_theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
        inv_freq = jnp.asarray(inv_freq, jnp.float32)
        q32 = _apply_rope(q32, positions, inv_freq, rope_attention_factor, rot_dim, rope_layout)
        k32 = _apply_rope(k32, positions, inv_freq, rope_attention_factor, rot_dim, rope_layout)
    if nope_temperature is not None:
        floor_scale, attn_scale = nope_temperature
        scale_BS = jnp.log1p(jnp.floor((positions.astype(jnp.float32) + 1.0) / floor_scale)) * attn_scale + 1.0
        q32 = q32 * scale_BS[:, :, None, None]
    k32 = jnp.repeat(k32, Hq // Hkv, axis=2)
    v32 = jnp.repeat(v32, Hq // Hkv, axis=2)
    logits_BHSS = jnp.einsum("bqhd,bkhd->bhqk", q32, k32, precision=_HIGHEST) * sm_scale
    mask = jnp.ones((B, 1, S, S), bool)
    if causal:
        mask &= jnp.tril(jnp.ones((S, S), bool))[None, None]
    pos_q, pos_k = positions[:, None, :, None], positions[:, None, None, :]
    if sliding_window is not None:
        mask &= (pos_q - sliding_window < pos_k) & (pos_k <= pos_q)
    if chunk_size is not None:
        mask &= pos_q // chunk_size == pos_k // chunk_size
    if segment_ids is not None:
        mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    logits_BHSS = jnp.where(mask, logits_BHSS, -jnp.inf)
    weights = jax.nn.softmax(logits_BHSS, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v32, precision=_HIGHEST)
    return out.astype(q.dtype)
