"""Plain-JAX building blocks of the reference steps in benchmarks/step_overhead.py and moe.py.

Written straight from the formulas (no nopejax code), so those scripts measure nopejax's
overhead against what a user would write by hand.
"""

import jax
import jax.numpy as jnp


def rms_norm_fn(m):
    """x, w -> RMSNorm(x) * w with the model's eps."""

    def norm(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + m.rms_norm_eps) * w

    return norm


def rope_fn(m):
    """x [B, S, H, E], positions [B, S] -> x rotated (half layout, full head)."""
    E = m.head_dim
    inv = 1.0 / (m.rope_theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E))

    def rope(x, pos):
        ang = pos[..., None] * inv
        cos, sin = jnp.cos(jnp.concatenate([ang, ang], -1)), jnp.sin(jnp.concatenate([ang, ang], -1))
        x1, x2 = jnp.split(x, 2, -1)
        return x * cos[:, :, None] + jnp.concatenate([-x2, x1], -1) * sin[:, :, None]

    return rope
