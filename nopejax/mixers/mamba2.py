"""The Mamba2 mixer layer (Dao & Gu 2024, "Transformers are SSMs"), as transformers computes it.

Numerical reference: transformers' `Mamba2Mixer.forward` on its torch path (`causal_conv1d_fn`,
`mamba2_chunk_scan`, `Mamba2RMSNormGated`); GraniteMoeHybrid and NemotronH use the same layer.

    zxbcdt = h @ in_proj                       split into z [i], xBC [i + 2 K E], dt [H]
    xBC    = silu(causal_conv(xBC))            split into x [H, O], B [K, E], C [K, E]
    dt     = clip(softplus(dt + dt_bias), time_step_limit);  A = -exp(A_log)
    y      = ssd(x, dt, A, B, C) + D x         (ssd.py, fp32)
    out    = (rms_norm_per_group(y * silu(z)) * norm) @ out_proj      (K groups of i / K, fp32)

Shape letters (docs/reference/shapes.md): B batch, S sequence, D model width, H heads, O head dim,
i = H O inner width, K groups, E state size, k conv kernel, w = k - 1, u = i + 2 K E conv channels,
z = i + u + H the fused in_proj output, a any leading axes ([B, S] or [B]).

Parameters map 1:1 onto transformers' (`HF_TENSORS`); ours are [in, out] where torch's Linear is
[out, in], and the conv weight is [k, u] where torch's depthwise Conv1d is [u, 1, k].

Decode carries a `Mamba2Cache` per layer: the conv window (last w conv inputs) and the SSM state.
`mamba2` on S tokens (a prefill, or a chunk of one) takes and returns it; `mamba2_step` advances
it by one token in O(1). Batched prompts of different lengths are left-padded (segment id 0), so
every row's cache describes its last position. Unlike transformers' decode path, the step clamps dt
to `time_step_limit` as the chunked form does, so a step equals the chunked forward.

Under context parallelism (a `context` mesh axis, rows in zig-zag order) the conv and the scan run
per zig-zag chunk inside `shard_map`, each chunk after the K - 1 conv inputs before it, with the
SSM state carried across shards by `context.recurrence` (summaries from `ssd.summarize`, chained by
`ssd.combine`); the projections and the gated norm are per token and stay outside.

`Mamba2Dims.impl` (model.mamba_impl) picks the intra-chunk part of the SSD: XLA's `ssd.intra_chunk`
or the Pallas kernels of nopejax/kernels/ssd.py (`intra_chunk_fn`), the same in every path above
(training, context shards, prefill); the recurrence over chunks and the decode step are XLA.
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
from nopejax.config import MAMBA_IMPLS
from nopejax.mixers import ssd as ssd_lib
from nopejax.mixers.conv import causal_conv, conv_step
from nopejax.mixers.ssd import ssd, ssd_step

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Mamba2Dims:
    """One Mamba2 layer's sizes and constants (transformers' Mamba2Config names in comments)."""

    d_model: int  # hidden_size
    heads: int  # num_heads
    head_dim: int  # head_dim; heads * head_dim = expand * hidden_size
    groups: int  # n_groups
    state: int  # state_size
    conv_kernel: int = 4  # conv_kernel
    chunk: int = 256  # chunk_size
    time_step_limit: tuple[float, float] = (0.0, math.inf)  # time_step_limit
    norm_eps: float = 1e-5  # layer_norm_epsilon
    use_bias: bool = False  # use_bias: in_proj and out_proj
    conv_bias: bool = True  # use_conv_bias
    impl: str = "xla"  # the intra-chunk SSD: "xla" (ssd.intra_chunk) or "pallas" (nopejax/kernels/ssd.py)

    def __post_init__(self):
        if self.heads % self.groups:
            raise ValueError(f"mamba2 heads={self.heads} must be a multiple of groups={self.groups}: change either")
        if self.impl not in MAMBA_IMPLS:
            raise ValueError(f"mamba2 impl={self.impl!r}: use one of {MAMBA_IMPLS}")

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.groups * self.state

    @property
    def proj_dim(self) -> int:
        return self.inner + self.conv_dim + self.heads


# name -> (shape given the dims, logical axes)
MAMBA2_PARAMS = {
    "in_proj": (lambda d: (d.d_model, d.proj_dim), ("embed", None)),
    "conv1d_weight": (lambda d: (d.conv_kernel, d.conv_dim), (None, None)),
    "dt_bias": (lambda d: (d.heads,), (None,)),
    "A_log": (lambda d: (d.heads,), (None,)),
    "D": (lambda d: (d.heads,), (None,)),
    "norm": (lambda d: (d.inner,), (None,)),
    "out_proj": (lambda d: (d.inner, d.d_model), (None, "embed")),
}
BIAS_PARAMS = {
    "in_proj_bias": (lambda d: (d.proj_dim,), (None,)),
    "out_proj_bias": (lambda d: (d.d_model,), ("embed",)),
}
CONV_BIAS_PARAMS = {"conv1d_bias": (lambda d: (d.conv_dim,), (None,))}

# ours -> (transformers' name inside the mixer, torch tensor -> ours); the inverse is the same transpose
HF_TENSORS = {
    "in_proj": ("in_proj.weight", lambda t: t.T),
    "in_proj_bias": ("in_proj.bias", lambda t: t),
    "conv1d_weight": ("conv1d.weight", lambda t: t[:, 0, :].T),
    "conv1d_bias": ("conv1d.bias", lambda t: t),
    "dt_bias": ("dt_bias", lambda t: t),
    "A_log": ("A_log", lambda t: t),
    "D": ("D", lambda t: t),
    "norm": ("norm.weight", lambda t: t),
    "out_proj": ("out_proj.weight", lambda t: t.T),
    "out_proj_bias": ("out_proj.bias", lambda t: t),
}


def mamba2_params(d: Mamba2Dims) -> dict:
    """The params of one Mamba2 layer for these dims: name -> (shape fn, logical axes)."""
    return {**MAMBA2_PARAMS, **(BIAS_PARAMS if d.use_bias else {}), **(CONV_BIAS_PARAMS if d.conv_bias else {})}


class Mamba2Cache(NamedTuple):
    conv_window_Bwu: jax.Array
    ssm_state_BHOE: jax.Array  # fp32


def empty_cache(d: Mamba2Dims, batch: int, dtype=F32) -> Mamba2Cache:
    return Mamba2Cache(
        jnp.zeros((batch, d.conv_kernel - 1, d.conv_dim), dtype), jnp.zeros((batch, d.heads, d.head_dim, d.state), F32)
    )


def _in_proj(p, h_aD, d: Mamba2Dims):
    zxbcdt_az = h_aD @ p["in_proj"].astype(h_aD.dtype)
    if "in_proj_bias" in p:
        zxbcdt_az += p["in_proj_bias"].astype(h_aD.dtype)
    return jnp.split(zxbcdt_az, [d.inner, d.inner + d.conv_dim], axis=-1)  # z, xBC, dt


def _ssm_inputs(p, xbc_au, dt_aH, d: Mamba2Dims):
    """silu'd conv output -> x [.., H, O], B, C [.., K, E] in fp32; dt after softplus and clamp; A."""
    x_ai, B_aKE, C_aKE = jnp.split(jax.nn.silu(xbc_au.astype(F32)), [d.inner, d.inner + d.groups * d.state], -1)
    lead = x_ai.shape[:-1]
    dt_aH = jax.nn.softplus(dt_aH.astype(F32) + p["dt_bias"].astype(F32))
    dt_aH = jnp.clip(dt_aH, *d.time_step_limit)
    A_H = -jnp.exp(p["A_log"].astype(F32))
    x_aHO = x_ai.reshape(*lead, d.heads, d.head_dim)
    return x_aHO, dt_aH, A_H, B_aKE.reshape(*lead, d.groups, d.state), C_aKE.reshape(*lead, d.groups, d.state)


def _out(p, y_aHO, z_ai, d: Mamba2Dims, dtype):
    """Gated RMSNorm over groups of i / K (transformers' Mamba2RMSNormGated, fp32), then out_proj."""
    lead = y_aHO.shape[:-2]
    g_ai = y_aHO.reshape(*lead, d.inner).astype(F32) * jax.nn.silu(z_ai.astype(F32))
    g_aKi = g_ai.reshape(*lead, d.groups, d.inner // d.groups)
    g_aKi = g_aKi * jax.lax.rsqrt(jnp.mean(g_aKi * g_aKi, axis=-1, keepdims=True) + d.norm_eps)
    out_aD = (g_aKi.reshape(*lead, d.inner) * p["norm"].astype(F32)).astype(dtype) @ p["out_proj"].astype(dtype)
    if "out_proj_bias" in p:
        out_aD += p["out_proj_bias"].astype(dtype)
    return out_aD


def mamba2(p: dict, h_BSD, d: Mamba2Dims, *, segment_ids_BS=None, cache: Mamba2Cache | None = None):
    """The mixer over S positions (after `cache`, if given) -> (out_BSD, the cache after position S - 1).

    Under a `context` mesh axis (zig-zag-ordered rows, no cache) the conv and the scan run per
    device with the state carried across shards (`_context_scan`); the cache returned is None.
    """
    z_BSi, xbc_BSu, dt_BSH = _in_proj(p, h_BSD, d)
    if cache is None and sharding.context_size() > 1:
        y_BSHO = _context_scan(p, xbc_BSu, dt_BSH, d, segment_ids_BS)
        return _out(p, y_BSHO, z_BSi, d, h_BSD.dtype), None
    window = None if cache is None else cache.conv_window_Bwu
    intra = intra_chunk_fn(d.impl, per_device=False)
    xbc_BSu, window_Bwu = causal_conv(
        xbc_BSu, p["conv1d_weight"], p.get("conv1d_bias"), segment_ids_BS=segment_ids_BS, window_Bwu=window
    )
    x_BSHO, dt_BSH, A_H, B_BSKE, C_BSKE = _ssm_inputs(p, xbc_BSu, dt_BSH, d)
    y_BSHO, state_BHOE = ssd(
        x_BSHO,
        dt_BSH,
        A_H,
        B_BSKE,
        C_BSKE,
        chunk=d.chunk,
        D_H=p["D"],
        segment_ids_BS=segment_ids_BS,
        initial_state_BHOE=None if cache is None else cache.ssm_state_BHOE,
        intra=intra,
    )
    return _out(p, y_BSHO, z_BSi, d, h_BSD.dtype), Mamba2Cache(window_Bwu, state_BHOE)


def _context_scan(p, xbc_BSu, dt_BSH, d: Mamba2Dims, segment_ids_BS):
    """Conv and SSD (with its D x) of zig-zag-ordered rows under context parallelism -> y_BSHO.

    Each chunk is seen after its halo of L = max(K - 1, 1) tokens (`context.recurrence`): the conv
    reads its W = K - 1 taps back into the halo, the halo's last segment id says whether the chunk
    starts a document. A chunk's summary is (total decay, end state from zero) (`ssd.summarize`,
    whose y XLA drops); the chunk then reruns the scan from the state the chained summaries give.
    """
    L = max(d.conv_kernel - 1, 1)
    conv_params = {name: p[name] for name in ("conv1d_weight", "conv1d_bias", "dt_bias", "A_log", "D") if name in p}

    def inputs(q, xs, seg_BT):  # T = L + c: the halo, then the chunk
        xbc_BTu, dt_BTH = xs
        xbc_BTu, _ = causal_conv(xbc_BTu, q["conv1d_weight"], q.get("conv1d_bias"), segment_ids_BS=seg_BT)
        args = _ssm_inputs(q, xbc_BTu[:, L:], dt_BTH[:, L:], d)
        return args, dict(segment_ids_BS=seg_BT[:, L:], segment_id_before_B=seg_BT[:, L - 1])

    def summarize(q, xs, seg_BT):
        args, segments = inputs(q, xs, seg_BT)
        return ssd_lib.summarize(*args, chunk=d.chunk, **segments)

    intra = intra_chunk_fn(d.impl, per_device=True)  # run below is already inside shard_map

    def run(q, xs, seg_BT, state_BHOE):
        args, segments = inputs(q, xs, seg_BT)
        return ssd(*args, chunk=d.chunk, D_H=q["D"], initial_state_BHOE=state_BHOE, intra=intra, **segments)[0]

    return context.recurrence(
        summarize, run, ssd_lib.combine, conv_params, (xbc_BSu, dt_BSH), segment_ids_BS, lookback=L
    )


def intra_chunk_fn(impl: str, *, per_device: bool):
    """The intra-chunk SSD (`ssd.intra_chunk`'s signature) for model.mamba_impl `impl`.

    "pallas": nopejax/kernels/ssd.py through `sharding.pallas_on_mesh` (Mosaic for TPU, Pallas's
    interpreter on CPU; validation refuses GPUs), inside `shard_map` under a mesh of several devices,
    groups or heads split over `tensor` where it divides them; `per_device`: the caller is inside
    `shard_map` already.
    """
    if impl == "xla":
        return ssd_lib.intra_chunk
    from nopejax.kernels.ssd import ssd_intra_chunk

    def dims(C_BtcKE, B_BtcKE, xdt_BtcKGO, a_BtKGc, doc_Btc):
        return xdt_BtcKGO.shape[0], *xdt_BtcKGO.shape[3:5]

    def specs(batch, on_K, on_G):
        group = jax.P(batch, None, None, on_K, None)
        head = jax.P(batch, None, None, on_K, on_G, None)
        return (group, group, head, jax.P(batch, None, on_K, on_G, None), jax.P(batch, None, None)), head

    return sharding.pallas_on_mesh(ssd_intra_chunk, dims, specs, per_device=per_device)


def mamba2_step(p: dict, h_BD, d: Mamba2Dims, cache: Mamba2Cache):
    """One decode token per row -> (out_BD, cache), O(1) in the position."""
    z_Bi, xbc_Bu, dt_BH = _in_proj(p, h_BD, d)
    xbc_Bu, window_Bwu = conv_step(xbc_Bu, p["conv1d_weight"], p.get("conv1d_bias"), cache.conv_window_Bwu)
    x_BHO, dt_BH, A_H, B_BKE, C_BKE = _ssm_inputs(p, xbc_Bu, dt_BH, d)
    y_BHO, state_BHOE = ssd_step(x_BHO, dt_BH, A_H, B_BKE, C_BKE, cache.ssm_state_BHOE, D_H=p["D"])
    return _out(p, y_BHO, z_Bi, d, h_BD.dtype), Mamba2Cache(window_Bwu, state_BHOE)


def init_params(d: Mamba2Dims, key, dtype=F32, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4) -> dict:
    """transformers' Mamba2 init: A = 1..H, D = 1, dt log-uniform in [dt_min, dt_max] through dt_bias,
    projections normal(0.02), conv uniform(+-1/sqrt(k)) as torch's Conv1d default."""
    k_in, k_out, k_conv, k_cb, k_dt = jax.random.split(key, 5)
    dt_H = jnp.exp(jax.random.uniform(k_dt, (d.heads,)) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt_H = jnp.maximum(dt_H, dt_floor)
    bound = 1 / math.sqrt(d.conv_kernel)
    values = {
        "in_proj": 0.02 * jax.random.normal(k_in, (d.d_model, d.proj_dim)),
        "conv1d_weight": jax.random.uniform(k_conv, (d.conv_kernel, d.conv_dim), minval=-bound, maxval=bound),
        "dt_bias": dt_H + jnp.log(-jnp.expm1(-dt_H)),  # softplus^-1
        "A_log": jnp.log(jnp.arange(1, d.heads + 1, dtype=F32)),
        "D": jnp.ones((d.heads,)),
        "norm": jnp.ones((d.inner,)),
        "out_proj": 0.02 * jax.random.normal(k_out, (d.inner, d.d_model)),
        "in_proj_bias": jnp.zeros((d.proj_dim,)),
        "out_proj_bias": jnp.zeros((d.d_model,)),
        "conv1d_bias": jax.random.uniform(k_cb, (d.conv_dim,), minval=-bound, maxval=bound),
    }
    return {name: values[name].astype(dtype) for name in mamba2_params(d)}


class Mamba2(nnx.Module):
    """The mixer as an NNX module: one `nnx.Param` per `mamba2_params` entry, with its logical axes."""

    def __init__(self, dims: Mamba2Dims, *, rngs: nnx.Rngs, param_dtype=F32):
        self.dims = dims
        values = init_params(dims, rngs.params(), param_dtype)
        for name, (_, logical) in mamba2_params(dims).items():
            setattr(self, name, nnx.Param(values[name], logical_axes=logical))

    def params(self) -> dict:
        return {name: getattr(self, name)[...] for name in mamba2_params(self.dims)}

    def __call__(self, h_BSD, segment_ids_BS=None, cache: Mamba2Cache | None = None):
        return mamba2(self.params(), h_BSD, self.dims, segment_ids_BS=segment_ids_BS, cache=cache)

    def step(self, h_BD, cache: Mamba2Cache):
        return mamba2_step(self.params(), h_BD, self.dims, cache)


def from_hf(state_dict: dict, d: Mamba2Dims, prefix: str = "") -> dict:
    """A transformers mixer's tensors (numpy or torch, names under `prefix`) -> our params."""
    out = {}
    for name in mamba2_params(d):
        hf_name, to_ours = HF_TENSORS[name]
        out[name] = jnp.asarray(to_ours(np.asarray(state_dict[prefix + hf_name], dtype=np.float32)))
    return out
