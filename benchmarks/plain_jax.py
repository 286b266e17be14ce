"""Plain-JAX building blocks of the reference steps in benchmarks/step_overhead.py and moe.py.

Written straight from the formulas (no nopejax code), so those scripts measure nopejax's
overhead against what a user would write by hand.
"""

import time

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


def attention_fn(m):
    """h [B, S, D] (normed), one layer's params, mask [B, S, S], positions [B, S], RoPE or not ->
    the attention sublayer's output [B, S, D]: GQA, dense scores, softmax over the mask."""
    H, K, E = m.num_heads, m.num_kv_heads, m.head_dim
    rope = rope_fn(m)

    def attention(h, L, mask, positions, use_rope):
        B, S = h.shape[:2]
        q, k, v = (jnp.einsum("bsd,dhe->bshe", h, L[w]) for w in ("wq", "wk", "wv"))
        if use_rope:
            q, k = rope(q, positions), rope(k, positions)
        q = q.reshape(B, S, K, H // K, E)
        s = jnp.einsum("bskge,btke->bkgst", q, k) * E**-0.5
        s = jnp.where(mask[:, None, None], s, -1e30)
        o = jnp.einsum("bkgst,btke->bskge", jax.nn.softmax(s, -1), v).reshape(B, S, H, E)
        return jnp.einsum("bshe,hed->bsd", o, L["wo"])

    return attention


def step_timer(plain, tx, params, batch, steps: int):
    """A function timing `steps` plain-JAX steps from a copy of `params`: seconds per step. Each call
    continues from the params and optimizer state the previous one left."""
    carry = {"params": jax.tree.map(jnp.copy, params)}
    carry["opt"] = tx.init(carry["params"])

    def run():
        t0 = time.perf_counter()
        for _ in range(steps):
            carry["params"], carry["opt"], loss = plain(carry["params"], carry["opt"], batch)
        jax.block_until_ready(loss)
        return (time.perf_counter() - t0) / steps

    return run
