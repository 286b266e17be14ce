"""The Gated DeltaNet mixer layer (Yang, Kautz & Hatamizadeh 2024), as transformers' OLMo Hybrid computes it.

Numerical reference: transformers' `OlmoHybridGatedDeltaNet.forward` on its torch path (`causal_conv1d_fn`,
`torch_chunk_gated_delta_rule` with `use_qk_l2norm_in_kernel=True`, `OlmoHybridRMSNormGated`). Qwen3-Next's
`Qwen3NextGatedDeltaNet` computes the same layer from fused projections (`QWEN3_NEXT_TENSORS` maps them).

    q, k, v = h @ q_proj, h @ k_proj, h @ v_proj
    q, k, v = split(silu(causal_conv(q | k | v)))     one depthwise conv over the E = 2 G K + H V channels
    beta    = sigmoid(h @ b_proj)   (x 2 where allow_neg_eigval: eigenvalues of I - beta k k^T in (-1, 1))
    g       = -exp(A_log) * softplus(h @ a_proj + dt_bias)
    o       = gated_delta(q, k, v, g, beta)           (gated_delta.py: q, k L2-normalised, q / sqrt(K); fp32)
    out     = (rms_norm_per_head(o) * o_norm * silu(h @ g_proj)) @ o_proj

Shape letters: B batch, S sequence, D model width, G key heads, H value heads, K key head dim, V value
head dim, E = 2 G K + H V conv channels, C conv kernel, W = C - 1.

Parameters map 1:1 onto OLMo Hybrid's (`HF_TENSORS`); ours are [in, out] where torch's Linear is [out, in],
and the conv weight is [C, E] where torch's depthwise Conv1d is [E, 1, C]. The conv has no bias in either family.

Decode carries a `GatedDeltaNetCache` per layer: the conv window (last W conv inputs) and the state.
`gated_deltanet` on S tokens takes and returns it; `gated_deltanet_step` advances it by one token in O(1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nopejax.mixers.conv import causal_conv, conv_step
from nopejax.mixers.gated_delta import gated_delta, gated_delta_step

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetDims:
    """One layer's sizes and constants (transformers' OlmoHybridConfig names in comments)."""

    d_model: int  # hidden_size
    key_heads: int  # linear_num_key_heads
    value_heads: int  # linear_num_value_heads
    key_head_dim: int  # linear_key_head_dim
    value_head_dim: int  # linear_value_head_dim
    conv_kernel: int = 4  # linear_conv_kernel_dim
    chunk: int = 64  # transformers' chunk_size default
    allow_neg_eigval: bool = False  # linear_allow_neg_eigval
    norm_eps: float = 1e-5  # OLMo Hybrid's o_norm: 1e-5 fixed; Qwen3-Next's norm: rms_norm_eps

    def __post_init__(self):
        if self.value_heads % self.key_heads:
            raise ValueError(
                f"gated_deltanet value_heads={self.value_heads} must be a multiple of key_heads={self.key_heads}:"
                " change either"
            )

    @property
    def key_dim(self) -> int:
        return self.key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


# name -> (shape given the dims, logical axes)
GATED_DELTANET_PARAMS = {
    "q_proj": (lambda d: (d.d_model, d.key_dim), ("embed", None)),
    "k_proj": (lambda d: (d.d_model, d.key_dim), ("embed", None)),
    "v_proj": (lambda d: (d.d_model, d.value_dim), ("embed", None)),
    "a_proj": (lambda d: (d.d_model, d.value_heads), ("embed", None)),
    "b_proj": (lambda d: (d.d_model, d.value_heads), ("embed", None)),
    "g_proj": (lambda d: (d.d_model, d.value_dim), ("embed", None)),
    "conv1d_weight": (lambda d: (d.conv_kernel, d.conv_dim), (None, None)),
    "A_log": (lambda d: (d.value_heads,), (None,)),
    "dt_bias": (lambda d: (d.value_heads,), (None,)),
    "o_norm": (lambda d: (d.value_head_dim,), (None,)),
    "o_proj": (lambda d: (d.value_dim, d.d_model), (None, "embed")),
}


def _linear(t, d):
    return t.T


# ours -> (OLMo Hybrid's name inside the mixer, (torch tensor, dims) -> ours); the inverse is the same transpose
HF_TENSORS = {
    "q_proj": ("q_proj.weight", _linear),
    "k_proj": ("k_proj.weight", _linear),
    "v_proj": ("v_proj.weight", _linear),
    "a_proj": ("a_proj.weight", _linear),
    "b_proj": ("b_proj.weight", _linear),
    "g_proj": ("g_proj.weight", _linear),
    "conv1d_weight": ("conv1d.weight", lambda t, d: t[:, 0, :].T),
    "A_log": ("A_log", lambda t, d: t),
    "dt_bias": ("dt_bias", lambda t, d: t),
    "o_norm": ("o_norm.weight", lambda t, d: t),
    "o_proj": ("o_proj.weight", _linear),
}


def _qkvz(part):
    """Qwen3-Next's `in_proj_qkvz` [G (K + K + R V + R V), D], grouped per key head -> one of our projections."""

    def take(t, d):
        R = d.value_heads // d.key_heads
        sizes = [d.key_head_dim, d.key_head_dim, R * d.value_head_dim, R * d.value_head_dim]
        bounds = np.cumsum([0, *sizes])
        t_DGX = t.T.reshape(t.shape[1], d.key_heads, bounds[-1])
        return t_DGX[..., bounds[part] : bounds[part + 1]].reshape(t.shape[1], -1)

    return take


def _ba(part):
    """Qwen3-Next's `in_proj_ba` [G (R + R), D], grouped per key head -> b_proj (0) or a_proj (1)."""

    def take(t, d):
        R = d.value_heads // d.key_heads
        return t.T.reshape(t.shape[1], d.key_heads, 2 * R)[..., part * R : (part + 1) * R].reshape(t.shape[1], -1)

    return take


# Qwen3-Next's fused layout: value heads are ordered key head major, as ours (value head h reads key head h // R)
QWEN3_NEXT_TENSORS = {
    "q_proj": ("in_proj_qkvz.weight", _qkvz(0)),
    "k_proj": ("in_proj_qkvz.weight", _qkvz(1)),
    "v_proj": ("in_proj_qkvz.weight", _qkvz(2)),
    "g_proj": ("in_proj_qkvz.weight", _qkvz(3)),
    "b_proj": ("in_proj_ba.weight", _ba(0)),
    "a_proj": ("in_proj_ba.weight", _ba(1)),
    "conv1d_weight": ("conv1d.weight", lambda t, d: t[:, 0, :].T),
    "A_log": ("A_log", lambda t, d: t),
    "dt_bias": ("dt_bias", lambda t, d: t),
    "o_norm": ("norm.weight", lambda t, d: t),
    "o_proj": ("out_proj.weight", _linear),
}


class GatedDeltaNetCache(NamedTuple):
    conv_window_BWE: jax.Array
    state_BHKV: jax.Array  # fp32


def empty_cache(d: GatedDeltaNetDims, batch: int, dtype=F32) -> GatedDeltaNetCache:
    return GatedDeltaNetCache(
        jnp.zeros((batch, d.conv_kernel - 1, d.conv_dim), dtype),
        jnp.zeros((batch, d.value_heads, d.key_head_dim, d.value_head_dim), F32),
    )


def _gates(p, h_XD, d: GatedDeltaNetDims):
    """beta and g (the log decay) per value head, fp32."""
    beta_XH = jax.nn.sigmoid((h_XD @ p["b_proj"].astype(h_XD.dtype)).astype(F32))
    if d.allow_neg_eigval:
        beta_XH = 2.0 * beta_XH
    a_XH = (h_XD @ p["a_proj"].astype(h_XD.dtype)).astype(F32)
    g_XH = -jnp.exp(p["A_log"].astype(F32)) * jax.nn.softplus(a_XH + p["dt_bias"].astype(F32))
    return g_XH, beta_XH


def _split_heads(qkv_XE, d: GatedDeltaNetDims):
    """silu'd conv output -> q, k [.., G, K], v [.., H, V]."""
    q_XI, k_XI, v_XI = jnp.split(jax.nn.silu(qkv_XE), [d.key_dim, 2 * d.key_dim], axis=-1)
    lead = qkv_XE.shape[:-1]
    return (
        q_XI.reshape(*lead, d.key_heads, d.key_head_dim),
        k_XI.reshape(*lead, d.key_heads, d.key_head_dim),
        v_XI.reshape(*lead, d.value_heads, d.value_head_dim),
    )


def _out(p, o_XHV, h_XD, d: GatedDeltaNetDims):
    """Gated RMSNorm per value head (norm in fp32, weight in the input dtype, then silu(gate)), then o_proj."""
    dtype = h_XD.dtype
    lead = o_XHV.shape[:-2]
    gate_XHV = (h_XD @ p["g_proj"].astype(dtype)).reshape(*lead, d.value_heads, d.value_head_dim)
    o_XHV = o_XHV.astype(F32)
    normed_XHV = (o_XHV * jax.lax.rsqrt(jnp.mean(o_XHV * o_XHV, axis=-1, keepdims=True) + d.norm_eps)).astype(dtype)
    y_XHV = (p["o_norm"].astype(dtype) * normed_XHV).astype(F32) * jax.nn.silu(gate_XHV.astype(F32))
    return y_XHV.astype(dtype).reshape(*lead, d.value_dim) @ p["o_proj"].astype(dtype)


def _qkv(p, h_XD):
    dtype = h_XD.dtype
    return jnp.concatenate([h_XD @ p[name].astype(dtype) for name in ("q_proj", "k_proj", "v_proj")], axis=-1)


def gated_deltanet(
    p: dict, h_BSD, d: GatedDeltaNetDims, *, segment_ids_BS=None, cache: GatedDeltaNetCache | None = None
):
    """The mixer over S positions (after `cache`, if given) -> (out_BSD, the cache after position S - 1)."""
    window = None if cache is None else cache.conv_window_BWE
    qkv_BSE, window_BWE = causal_conv(_qkv(p, h_BSD), p["conv1d_weight"], segment_ids_BS=segment_ids_BS,
                                      window_BWE=window)  # fmt: skip
    q_BSGK, k_BSGK, v_BSHV = _split_heads(qkv_BSE, d)
    g_BSH, beta_BSH = _gates(p, h_BSD, d)
    o_BSHV, state_BHKV = gated_delta(
        q_BSGK,
        k_BSGK,
        v_BSHV,
        g_BSH,
        beta_BSH,
        chunk=d.chunk,
        normalize_qk=True,
        segment_ids_BS=segment_ids_BS,
        initial_state_BHKV=None if cache is None else cache.state_BHKV,
    )
    return _out(p, o_BSHV, h_BSD, d), GatedDeltaNetCache(window_BWE, state_BHKV)


def gated_deltanet_step(p: dict, h_BD, d: GatedDeltaNetDims, cache: GatedDeltaNetCache):
    """One decode token per row -> (out_BD, cache), O(1) in the position."""
    qkv_BE, window_BWE = conv_step(_qkv(p, h_BD), p["conv1d_weight"], None, cache.conv_window_BWE)
    q_BGK, k_BGK, v_BHV = _split_heads(qkv_BE, d)
    g_BH, beta_BH = _gates(p, h_BD, d)
    o_BHV, state_BHKV = gated_delta_step(q_BGK, k_BGK, v_BHV, g_BH, beta_BH, cache.state_BHKV, normalize_qk=True)
    return _out(p, o_BHV, h_BD, d), GatedDeltaNetCache(window_BWE, state_BHKV)


def init_params(
    d: GatedDeltaNetDims, key, dtype=F32, a_min=0.0, a_max=16.0, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4
) -> dict:
    """OLMo Hybrid's init: A uniform in [a_min, a_max], dt log-uniform in [dt_min, dt_max] through dt_bias,
    projections normal(0.02), conv uniform(+-1/sqrt(C)) as torch's Conv1d default, o_norm ones."""
    ks = jax.random.split(key, 10)
    A_H = jax.random.uniform(ks[0], (d.value_heads,), minval=a_min, maxval=a_max)
    dt_H = jnp.exp(jax.random.uniform(ks[1], (d.value_heads,)) * (math.log(dt_max) - math.log(dt_min)))
    dt_H = jnp.maximum(dt_H * dt_min, dt_floor)
    bound = 1 / math.sqrt(d.conv_kernel)
    values = {
        "conv1d_weight": jax.random.uniform(ks[2], (d.conv_kernel, d.conv_dim), minval=-bound, maxval=bound),
        "A_log": jnp.log(A_H),
        "dt_bias": dt_H + jnp.log(-jnp.expm1(-dt_H)),  # softplus^-1
        "o_norm": jnp.ones((d.value_head_dim,)),
    }
    projections = ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj")
    for name, k in zip(projections, ks[3:]):
        values[name] = 0.02 * jax.random.normal(k, GATED_DELTANET_PARAMS[name][0](d))
    return {name: values[name].astype(dtype) for name in GATED_DELTANET_PARAMS}


class GatedDeltaNet(nnx.Module):
    """The mixer as an NNX module: one `nnx.Param` per `GATED_DELTANET_PARAMS` entry, with its logical axes."""

    def __init__(self, dims: GatedDeltaNetDims, *, rngs: nnx.Rngs, param_dtype=F32):
        self.dims = dims
        values = init_params(dims, rngs.params(), param_dtype)
        for name, (_, logical) in GATED_DELTANET_PARAMS.items():
            setattr(self, name, nnx.Param(values[name], logical_axes=logical))

    def params(self) -> dict:
        return {name: getattr(self, name)[...] for name in GATED_DELTANET_PARAMS}

    def __call__(self, h_BSD, segment_ids_BS=None, cache: GatedDeltaNetCache | None = None):
        return gated_deltanet(self.params(), h_BSD, self.dims, segment_ids_BS=segment_ids_BS, cache=cache)

    def step(self, h_BD, cache: GatedDeltaNetCache):
        return gated_deltanet_step(self.params(), h_BD, self.dims, cache)


def from_hf(state_dict: dict, d: GatedDeltaNetDims, prefix: str = "", tensors: dict = HF_TENSORS) -> dict:
    """A transformers mixer's tensors (numpy or torch, names under `prefix`) -> our params.

    `tensors` is `HF_TENSORS` (OLMo Hybrid) or `QWEN3_NEXT_TENSORS`.
    """
    out = {}
    for name in GATED_DELTANET_PARAMS:
        hf_name, to_ours = tensors[name]
        out[name] = jnp.asarray(to_ours(np.asarray(state_dict[prefix + hf_name], dtype=np.float32), d))
    return out
