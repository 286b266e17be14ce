"""The Gated DeltaNet mixer layer (Yang, Kautz & Hatamizadeh 2024), as transformers' OLMo Hybrid computes it.

Numerical reference: transformers' `OlmoHybridGatedDeltaNet.forward` on its torch path (`causal_conv1d_fn`,
`torch_chunk_gated_delta_rule` with `use_qk_l2norm_in_kernel=True`, `OlmoHybridRMSNormGated`). Qwen3-Next's
`Qwen3NextGatedDeltaNet` computes the same layer from fused projections (`QWEN3_NEXT_TENSORS` maps them),
Qwen3.5's `Qwen3_5GatedDeltaNet` from q, k, v in one projection and z (our g), b, a apart (`QWEN3_5_TENSORS`).

    q, k, v = h @ q_proj, h @ k_proj, h @ v_proj
    q, k, v = split(silu(causal_conv(q | k | v)))     one depthwise conv over the u = 2 K E + H O channels
    beta    = sigmoid(h @ b_proj)   (x 2 where allow_neg_eigval: eigenvalues of I - beta k k^T in (-1, 1))
    g       = -exp(A_log) * softplus(h @ a_proj + dt_bias)
    o       = gated_delta(q, k, v, g, beta)           (gated_delta.py: q, k L2-normalised, q / sqrt(E); fp32)
    out     = (rms_norm_per_head(o) * o_norm * silu(h @ g_proj)) @ o_proj

Shape letters (docs/reference/shapes.md): B batch, S sequence, D model width, K key heads, H value heads,
G = H / K value heads per key head, E key head dim, O value head dim, u = 2 K E + H O conv channels, k conv
kernel, w = k - 1, i heads x head dim flattened, z a fused projection's output, a any leading axes.

Parameters map 1:1 onto OLMo Hybrid's (`HF_TENSORS`); ours are [in, out] where torch's Linear is [out, in],
and the conv weight is [k, u] where torch's depthwise Conv1d is [u, 1, k]. The conv has no bias in either family.

Decode carries a `GatedDeltaNetCache` per layer: the conv window (last w conv inputs) and the state.
`gated_deltanet` on S tokens takes and returns it; `gated_deltanet_step` advances it by one token in O(1).

`GatedDeltaNetDims.impl` (model.gdn_impl) picks the rule's intra-chunk parts (`intra_fns`): XLA's
(gated_delta.py) or the Pallas kernels of nopejax/kernels/gdn.py, the same in training, context shards
and prefill (a context piece's summary too); the scan over chunk states and the decode step are XLA.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nopejax import context, sharding
from nopejax.config import GDN_IMPLS
from nopejax.mixers import gated_delta as gated_delta_lib
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
    impl: str = "xla"  # the intra-chunk parts: "xla" (gated_delta.py) or "pallas" (nopejax/kernels/gdn.py)

    def __post_init__(self):
        if self.value_heads % self.key_heads:
            raise ValueError(
                f"gated_deltanet value_heads={self.value_heads} must be a multiple of key_heads={self.key_heads}:"
                " change either"
            )
        if self.impl not in GDN_IMPLS:
            raise ValueError(f"gated_deltanet impl={self.impl!r}: use one of {GDN_IMPLS}")

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


# rows both layouts share: the depthwise conv (torch [u, 1, k] -> [k, u]) and the decay parameters
_CONV_AND_DECAY = {
    "conv1d_weight": ("conv1d.weight", lambda t, d: t[:, 0, :].T),
    "A_log": ("A_log", lambda t, d: t),
    "dt_bias": ("dt_bias", lambda t, d: t),
}

# ours -> (OLMo Hybrid's name inside the mixer, (torch tensor, dims) -> ours); the inverse is the same transpose
HF_TENSORS = {
    "q_proj": ("q_proj.weight", _linear),
    "k_proj": ("k_proj.weight", _linear),
    "v_proj": ("v_proj.weight", _linear),
    "a_proj": ("a_proj.weight", _linear),
    "b_proj": ("b_proj.weight", _linear),
    "g_proj": ("g_proj.weight", _linear),
    **_CONV_AND_DECAY,
    "o_norm": ("o_norm.weight", lambda t, d: t),
    "o_proj": ("o_proj.weight", _linear),
}


def _qkvz(part):
    """Qwen3-Next's `in_proj_qkvz` [K (E + E + G O + G O), D], grouped per key head -> one of our projections."""

    def take(t, d):
        G = d.value_heads // d.key_heads
        sizes = [d.key_head_dim, d.key_head_dim, G * d.value_head_dim, G * d.value_head_dim]
        bounds = np.cumsum([0, *sizes])
        t_DKz = t.T.reshape(t.shape[1], d.key_heads, bounds[-1])
        return t_DKz[..., bounds[part] : bounds[part + 1]].reshape(t.shape[1], -1)

    return take


def _ba(part):
    """Qwen3-Next's `in_proj_ba` [K (G + G), D], grouped per key head -> b_proj (0) or a_proj (1)."""

    def take(t, d):
        G = d.value_heads // d.key_heads
        return t.T.reshape(t.shape[1], d.key_heads, 2 * G)[..., part * G : (part + 1) * G].reshape(t.shape[1], -1)

    return take


# Qwen3-Next's fused layout: value heads are ordered key head major, as ours (value head h reads key head h // G)
QWEN3_NEXT_TENSORS = {
    "q_proj": ("in_proj_qkvz.weight", _qkvz(0)),
    "k_proj": ("in_proj_qkvz.weight", _qkvz(1)),
    "v_proj": ("in_proj_qkvz.weight", _qkvz(2)),
    "g_proj": ("in_proj_qkvz.weight", _qkvz(3)),
    "b_proj": ("in_proj_ba.weight", _ba(0)),
    "a_proj": ("in_proj_ba.weight", _ba(1)),
    **_CONV_AND_DECAY,
    "o_norm": ("norm.weight", lambda t, d: t),
    "o_proj": ("out_proj.weight", _linear),
}


def _fuse_per_key_head(parts_Di, d: GatedDeltaNetDims):
    """Our projections [D, K * w_j] -> one fused Qwen3-Next weight [K (w_0 + w_1 + ..), D], grouped per key head."""
    D = parts_Di[0].shape[0]
    grouped_DKz = np.concatenate([a.reshape(D, d.key_heads, -1) for a in parts_Di], axis=-1)
    return grouped_DKz.reshape(D, -1).T


# ours -> Qwen3-Next's fused tensors: the exact inverse of QWEN3_NEXT_TENSORS (to_qwen3_next)
QWEN3_NEXT_FUSED = {
    "in_proj_qkvz.weight": ("q_proj", "k_proj", "v_proj", "g_proj"),
    "in_proj_ba.weight": ("b_proj", "a_proj"),
}


def qwen3_next_shapes(d: GatedDeltaNetDims) -> dict:
    """Qwen3-Next's tensors of one mixer (names inside it) with their torch shapes."""
    return {
        "in_proj_qkvz.weight": (2 * d.key_dim + 2 * d.value_dim, d.d_model),
        "in_proj_ba.weight": (2 * d.value_heads, d.d_model),
        "conv1d.weight": (d.conv_dim, 1, d.conv_kernel),
        "A_log": (d.value_heads,),
        "dt_bias": (d.value_heads,),
        "norm.weight": (d.value_head_dim,),
        "out_proj.weight": (d.d_model, d.value_dim),
    }


def _conv_decay_norm_out(p: dict) -> dict:
    """The tensors Qwen3-Next and Qwen3.5 name alike, from our params of one layer (numpy)."""
    return {
        "conv1d.weight": p["conv1d_weight"].T[:, None, :],  # [k, u] -> depthwise Conv1d [u, 1, k]
        "A_log": p["A_log"],
        "dt_bias": p["dt_bias"],
        "norm.weight": p["o_norm"],
        "out_proj.weight": p["o_proj"].T,
    }


def to_qwen3_next(p: dict, d: GatedDeltaNetDims) -> dict:
    """Our params of one layer (numpy) -> Qwen3-Next's tensors (names inside the mixer), bit for bit."""
    fused = {name: _fuse_per_key_head([p[k] for k in keys], d) for name, keys in QWEN3_NEXT_FUSED.items()}
    return {**fused, **_conv_decay_norm_out(p)}


def _qkv_rows(part):
    """Qwen3.5's `in_proj_qkv` [K E + K E + H O, D], q, k, v stacked in the conv's channel order -> q_proj (0),
    k_proj (1) or v_proj (2)."""

    def take(t, d):
        bounds = np.cumsum([0, d.key_dim, d.key_dim, d.value_dim])
        return t[bounds[part] : bounds[part + 1]].T

    return take


# Qwen3.5's layout: value heads key head major as ours, and the conv's channels q | k | v as ours
QWEN3_5_TENSORS = {
    "q_proj": ("in_proj_qkv.weight", _qkv_rows(0)),
    "k_proj": ("in_proj_qkv.weight", _qkv_rows(1)),
    "v_proj": ("in_proj_qkv.weight", _qkv_rows(2)),
    "g_proj": ("in_proj_z.weight", _linear),
    "b_proj": ("in_proj_b.weight", _linear),
    "a_proj": ("in_proj_a.weight", _linear),
    **_CONV_AND_DECAY,
    "o_norm": ("norm.weight", lambda t, d: t),
    "o_proj": ("out_proj.weight", _linear),
}


def qwen3_5_shapes(d: GatedDeltaNetDims) -> dict:
    """Qwen3.5's tensors of one mixer (names inside it) with their torch shapes."""
    return {
        "in_proj_qkv.weight": (d.conv_dim, d.d_model),
        "in_proj_z.weight": (d.value_dim, d.d_model),
        "in_proj_b.weight": (d.value_heads, d.d_model),
        "in_proj_a.weight": (d.value_heads, d.d_model),
        **{name: shape for name, shape in qwen3_next_shapes(d).items() if not name.startswith("in_proj")},
    }


def to_qwen3_5(p: dict, d: GatedDeltaNetDims) -> dict:
    """Our params of one layer (numpy) -> Qwen3.5's tensors (names inside the mixer), bit for bit: the inverse
    of QWEN3_5_TENSORS."""
    return {
        "in_proj_qkv.weight": np.concatenate([p["q_proj"], p["k_proj"], p["v_proj"]], axis=1).T,
        "in_proj_z.weight": p["g_proj"].T,
        "in_proj_b.weight": p["b_proj"].T,
        "in_proj_a.weight": p["a_proj"].T,
        **_conv_decay_norm_out(p),
    }


class GatedDeltaNetCache(NamedTuple):
    conv_window_Bwu: jax.Array
    state_BHEO: jax.Array  # fp32


def empty_cache(d: GatedDeltaNetDims, batch: int, dtype=F32) -> GatedDeltaNetCache:
    return GatedDeltaNetCache(
        jnp.zeros((batch, d.conv_kernel - 1, d.conv_dim), dtype),
        jnp.zeros((batch, d.value_heads, d.key_head_dim, d.value_head_dim), F32),
    )


def _gates(p, h_aD, d: GatedDeltaNetDims):
    """beta and g (the log decay) per value head, fp32."""
    beta_aH = jax.nn.sigmoid((h_aD @ p["b_proj"].astype(h_aD.dtype)).astype(F32))
    if d.allow_neg_eigval:
        beta_aH = 2.0 * beta_aH
    a_aH = (h_aD @ p["a_proj"].astype(h_aD.dtype)).astype(F32)
    g_aH = -jnp.exp(p["A_log"].astype(F32)) * jax.nn.softplus(a_aH + p["dt_bias"].astype(F32))
    return g_aH, beta_aH


def _split_heads(qkv_au, d: GatedDeltaNetDims):
    """silu'd conv output -> q, k [.., K, E], v [.., H, O]."""
    q_ai, k_ai, v_ai = jnp.split(jax.nn.silu(qkv_au), [d.key_dim, 2 * d.key_dim], axis=-1)
    lead = qkv_au.shape[:-1]
    return (
        q_ai.reshape(*lead, d.key_heads, d.key_head_dim),
        k_ai.reshape(*lead, d.key_heads, d.key_head_dim),
        v_ai.reshape(*lead, d.value_heads, d.value_head_dim),
    )


def _out(p, o_aHO, h_aD, d: GatedDeltaNetDims):
    """Gated RMSNorm per value head (norm in fp32, weight in the input dtype, then silu(gate)), then o_proj."""
    dtype = h_aD.dtype
    lead = o_aHO.shape[:-2]
    gate_aHO = (h_aD @ p["g_proj"].astype(dtype)).reshape(*lead, d.value_heads, d.value_head_dim)
    o_aHO = o_aHO.astype(F32)
    normed_aHO = (o_aHO * jax.lax.rsqrt(jnp.mean(o_aHO * o_aHO, axis=-1, keepdims=True) + d.norm_eps)).astype(dtype)
    y_aHO = (p["o_norm"].astype(dtype) * normed_aHO).astype(F32) * jax.nn.silu(gate_aHO.astype(F32))
    return y_aHO.astype(dtype).reshape(*lead, d.value_dim) @ p["o_proj"].astype(dtype)


def _qkv(p, h_aD):
    dtype = h_aD.dtype
    return jnp.concatenate([h_aD @ p[name].astype(dtype) for name in ("q_proj", "k_proj", "v_proj")], axis=-1)


def gated_deltanet(
    p: dict, h_BSD, d: GatedDeltaNetDims, *, segment_ids_BS=None, cache: GatedDeltaNetCache | None = None
):
    """The mixer over S positions (after `cache`, if given) -> (out_BSD, the cache after position S - 1).

    Under a `context` mesh axis (zig-zag-ordered rows, no cache) the conv and the rule run per
    device with the state carried across shards (`_context_rule`); the cache returned is None.
    """
    if cache is None and sharding.context_size() > 1:
        g_BSH, beta_BSH = _gates(p, h_BSD, d)
        o_BSHO = _context_rule(p, _qkv(p, h_BSD), g_BSH, beta_BSH, d, segment_ids_BS)
        return _out(p, o_BSHO, h_BSD, d), None
    window = None if cache is None else cache.conv_window_Bwu
    qkv_BSu, window_Bwu = causal_conv(_qkv(p, h_BSD), p["conv1d_weight"], segment_ids_BS=segment_ids_BS,
                                      window_Bwu=window)  # fmt: skip
    q_BSKE, k_BSKE, v_BSHO = _split_heads(qkv_BSu, d)
    g_BSH, beta_BSH = _gates(p, h_BSD, d)
    o_BSHO, state_BHEO = gated_delta(
        q_BSKE,
        k_BSKE,
        v_BSHO,
        g_BSH,
        beta_BSH,
        chunk=d.chunk,
        normalize_qk=True,
        segment_ids_BS=segment_ids_BS,
        initial_state_BHEO=None if cache is None else cache.state_BHEO,
        intra=intra_fns(d.impl, per_device=False),
    )
    return _out(p, o_BSHO, h_BSD, d), GatedDeltaNetCache(window_Bwu, state_BHEO)


def _context_rule(p, qkv_BSu, g_BSH, beta_BSH, d: GatedDeltaNetDims, segment_ids_BS):
    """Conv and gated delta rule of zig-zag-ordered rows under context parallelism -> o_BSHO.

    As Mamba2's (`mamba2._context_scan`): each chunk is seen after its halo of L = max(K - 1, 1)
    tokens (`context.recurrence`), which feeds the conv's taps and says whether the chunk starts a
    document; a chunk's summary is (transition [E, E] per head, end state from zero)
    (`gated_delta.summarize`); the chunk then reruns the rule from the state the chained summaries give.
    """
    L = max(d.conv_kernel - 1, 1)

    def inputs(q, xs, seg_BT):  # T = L + c: the halo, then the chunk
        qkv_BTu, g_BTH, beta_BTH = xs
        qkv_BTu, _ = causal_conv(qkv_BTu, q["conv1d_weight"], segment_ids_BS=seg_BT)
        q_BcKE, k_BcKE, v_BcHO = _split_heads(qkv_BTu[:, L:], d)
        rule = dict(
            chunk=d.chunk, normalize_qk=True, segment_ids_BS=seg_BT[:, L:], segment_id_before_B=seg_BT[:, L - 1]
        )
        return (q_BcKE, k_BcKE, v_BcHO, g_BTH[:, L:], beta_BTH[:, L:]), rule

    intra = intra_fns(d.impl, per_device=True)  # summarize and run are already inside shard_map

    def summarize(q, xs, seg_BT):
        args, rule = inputs(q, xs, seg_BT)
        return gated_delta_lib.summarize(*args, intra=intra, **rule)

    def run(q, xs, seg_BT, state_BHEO):
        args, rule = inputs(q, xs, seg_BT)
        return gated_delta(*args, initial_state_BHEO=state_BHEO, intra=intra, **rule)[0]

    consts = {"conv1d_weight": p["conv1d_weight"]}
    return context.recurrence(
        summarize, run, gated_delta_lib.combine, consts, (qkv_BSu, g_BSH, beta_BSH), segment_ids_BS, lookback=L
    )


def intra_fns(impl: str, *, per_device: bool) -> gated_delta_lib.Intra:
    """The intra-chunk parts of the rule (UT transform, chunk outputs) for model.gdn_impl `impl`.

    "pallas": nopejax/kernels/gdn.py through `sharding.pallas_on_mesh` (Mosaic for TPU, Pallas's
    interpreter on CPU; validation refuses GPUs), inside `shard_map` under a mesh of several devices,
    key heads or the value heads of one key head split over `tensor` where it divides them;
    `per_device`: the caller is inside `shard_map` already.
    """
    if impl == "xla":
        return gated_delta_lib.XLA_INTRA
    from nopejax.kernels.gdn import gdn_chunk_output, gdn_ut_transform

    def ut_dims(k_BtcKE, v_BtcKGO, beta_BtKGc, cum_BtKGc, doc_Btc):
        return v_BtcKGO.shape[0], *v_BtcKGO.shape[3:5]

    def ut_specs(batch, on_K, on_G):
        head_c = jax.P(batch, None, on_K, on_G, None)
        ins = (jax.P(batch, None, None, on_K, None), jax.P(batch, None, None, on_K, on_G, None), head_c, head_c,
               jax.P(batch, None, None))  # fmt: skip
        return ins, (jax.P(batch, None, on_K, on_G, None, None),) * 2

    def out_dims(q_BtcKE, k_BtcKE, new_BtKGcO, state_BtKGEO, cum_BtKGc, doc_Btc):
        return new_BtKGcO.shape[0], *new_BtKGcO.shape[2:4]

    def out_specs(batch, on_K, on_G):
        group = jax.P(batch, None, None, on_K, None)
        per_head = jax.P(batch, None, on_K, on_G, None, None)
        ins = (group, group, per_head, per_head, jax.P(batch, None, on_K, on_G, None), jax.P(batch, None, None))
        return ins, jax.P(batch, None, None, on_K, on_G, None)

    return gated_delta_lib.Intra(
        sharding.pallas_on_mesh(gdn_ut_transform, ut_dims, ut_specs, per_device=per_device),
        sharding.pallas_on_mesh(gdn_chunk_output, out_dims, out_specs, per_device=per_device),
    )


def gated_deltanet_step(p: dict, h_BD, d: GatedDeltaNetDims, cache: GatedDeltaNetCache):
    """One decode token per row -> (out_BD, cache), O(1) in the position."""
    qkv_Bu, window_Bwu = conv_step(_qkv(p, h_BD), p["conv1d_weight"], None, cache.conv_window_Bwu)
    q_BKE, k_BKE, v_BHO = _split_heads(qkv_Bu, d)
    g_BH, beta_BH = _gates(p, h_BD, d)
    o_BHO, state_BHEO = gated_delta_step(q_BKE, k_BKE, v_BHO, g_BH, beta_BH, cache.state_BHEO, normalize_qk=True)
    return _out(p, o_BHO, h_BD, d), GatedDeltaNetCache(window_Bwu, state_BHEO)


def init_params(
    d: GatedDeltaNetDims, key, dtype=F32, a_min=0.0, a_max=16.0, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4
) -> dict:
    """OLMo Hybrid's init: A uniform in [a_min, a_max], dt log-uniform in [dt_min, dt_max] through dt_bias,
    projections normal(0.02), conv uniform(+-1/sqrt(k)) as torch's Conv1d default, o_norm ones."""
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

    `tensors` is `HF_TENSORS` (OLMo Hybrid), `QWEN3_NEXT_TENSORS` or `QWEN3_5_TENSORS`.
    """
    out = {}
    for name in GATED_DELTANET_PARAMS:
        hf_name, to_ours = tensors[name]
        out[name] = jnp.asarray(to_ours(np.asarray(state_dict[prefix + hf_name], dtype=np.float32), d))
    return out
