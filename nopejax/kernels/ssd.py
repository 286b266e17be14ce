"""Mamba2's intra-chunk SSD (Y_diag) as Pallas TPU kernels: the [c, c] score and decay tiles stay in VMEM.

Per (batch, chunk, head), with cum the chunk-local cumulative log decay (cumsum of dt * A) and doc
the count of document starts so far in the chunk:

    y_l = sum_{m <= l, doc_m = doc_l} (C_l . B_m) exp(cum_l - cum_m) xdt_m          (y = (C B^T o L) xdt)

nopejax/mixers/ssd.py `intra_chunk` computes the same in XLA, which writes the [c, J] decay mask,
scores and their product to HBM per head and chunk: at c = 256 that is ~18x the bytes of its
inputs and output (benchmarks/mixers.py, docs/results/mixers.md). Here they are built in VMEM and
never leave it. The decay is exp of a difference of chunk-local cumsums (as Mamba2's own Triton
kernel `_chunk_scan_fwd_kernel` does), masked to -inf before the exp so nothing above the diagonal
or across a document start can overflow; all accumulation is fp32.

Grid (batch, group, chunk, head in group): the heads of a group share C and B, so the scores C B^T
are computed once per group and chunk into a VMEM scratch (at head 0, the innermost, sequential
axis) and reused by the group's other heads. The backward kernel recomputes the tiles and gives
d xdt, dC and dB (summed over the group's heads in their output blocks, which stay resident across
the head axis) and the gradient of cum as a row sum minus a column sum of dP o P.

Layout: the wrapper moves chunks and heads in front, [B, K, t, c, E] for C and B and [B, H, t, c, O]
for xdt, so a block's last two dims are whole axes (any E and O; Mosaic wants whole axes or
multiples of (8, 128)). cum and doc travel as [.., c, 1] rows and [.., 1, c] columns, never
broadcast to [c, c] in HBM. Imports nothing from the rest of nopejax but its sibling tiles.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from nopejax.kernels import tiles

F32 = jnp.float32


def _decay(cum_r, cum_c, doc_r, doc_c):
    """[c, c] fp32: exp(cum_l - cum_m) where m <= l in the same document, 0 elsewhere."""
    c = cum_r.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
    visible = (col <= row) & (doc_r == doc_c)
    return jnp.exp(jnp.where(visible, cum_r - cum_c, -jnp.inf))


_dot, _nt, _nn, _tn = tiles.dot, tiles.nt, tiles.nn, tiles.tn


def _fwd_kernel(c_ref, b_ref, x_ref, cr_ref, cc_ref, dr_ref, dc_ref, y_ref, s_ref):
    @pl.when(pl.program_id(3) == 0)
    def _scores():  # once per (batch, group, chunk): shared by the group's heads
        s_ref[...] = _nt(c_ref[...], b_ref[...])

    p = s_ref[...] * _decay(cr_ref[...], cc_ref[...], dr_ref[...], dc_ref[...])
    y_ref[...] = _nn(p.astype(x_ref.dtype), x_ref[...]).astype(y_ref.dtype)


def _bwd_kernel(c_ref, b_ref, x_ref, cr_ref, cc_ref, dr_ref, dc_ref, dy_ref,
                dx_ref, dcm_ref, dbm_ref, dcr_ref, dcc_ref, s_ref):  # fmt: skip
    g = pl.program_id(3)
    C, B = c_ref[...], b_ref[...]

    @pl.when(g == 0)
    def _init():
        s_ref[...] = _nt(C, B)
        dcm_ref[...] = jnp.zeros(dcm_ref.shape, dcm_ref.dtype)
        dbm_ref[...] = jnp.zeros(dbm_ref.shape, dbm_ref.dtype)

    s = s_ref[...]
    decay = _decay(cr_ref[...], cc_ref[...], dr_ref[...], dc_ref[...])
    x, dy = x_ref[...], dy_ref[...]
    dx_ref[...] = _tn((s * decay).astype(dy.dtype), dy).astype(dx_ref.dtype)  # P^T dy
    dp = _nt(dy, x)  # dy xdt^T [c, c]
    ds = dp * decay
    dcm_ref[...] += _nn(ds.astype(B.dtype), B)  # summed over the group's heads
    dbm_ref[...] += _tn(ds.astype(C.dtype), C)
    dz = ds * s  # d(cum_l - cum_m) = dP o P
    dcr_ref[...] = jnp.sum(dz, axis=1, keepdims=True)
    dcc_ref[...] = jnp.sum(dz, axis=0, keepdims=True)


def _specs(K, G, c, E, P):
    """BlockSpecs over the grid (b, k, t, g): group tiles, head tiles, cum rows/cols, doc rows/cols."""
    group = pl.BlockSpec((None, None, None, c, E), lambda b, k, t, g: (b, k, t, 0, 0))
    head = pl.BlockSpec((None, None, None, c, P), lambda b, k, t, g: (b, k * G + g, t, 0, 0))
    cum_r = pl.BlockSpec((None, None, None, c, 1), lambda b, k, t, g: (b, k * G + g, t, 0, 0))
    cum_c = pl.BlockSpec((None, None, None, 1, c), lambda b, k, t, g: (b, k * G + g, t, 0, 0))
    doc_r = pl.BlockSpec((None, None, c, 1), lambda b, k, t, g: (b, t, 0, 0))
    doc_c = pl.BlockSpec((None, None, 1, c), lambda b, k, t, g: (b, t, 0, 0))
    return group, head, cum_r, cum_c, doc_r, doc_c


def _compiler(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )


def _cost(Bz, K, G, t, c, E, P, itemsize, backward):
    heads = Bz * K * G * t
    flops = heads * (3 * c * c + 2 * c * c * P) + Bz * K * t * 2 * c * c * E
    io = Bz * K * t * 2 * c * E * itemsize + heads * (2 * c * P * itemsize + 8 * c)
    if backward:
        flops += heads * (4 * c * c * P + 4 * c * c * E + 3 * c * c)
        io = 2 * io + heads * c * P * itemsize + Bz * K * t * 2 * c * E * 4
    return pl.CostEstimate(flops=flops, transcendentals=heads * c * c, bytes_accessed=io)


def _layout(C_BtcKE, B_BtcKE, xdt_BtcKGO, cum_BtKGc, doc_Btc):
    """The kernel layout: [B, K, t, c, E], [B, H, t, c, O], cum rows/cols [B, H, t, c, 1] / [.., 1, c],
    doc rows/cols [B, t, c, 1] / [B, t, 1, c]."""
    Bz, t, c, K, G, P = xdt_BtcKGO.shape
    C_BKtcE = jnp.moveaxis(C_BtcKE, 3, 1)
    B_BKtcE = jnp.moveaxis(B_BtcKE, 3, 1)
    x_BHtcO = jnp.moveaxis(xdt_BtcKGO, (3, 4), (1, 2)).reshape(Bz, K * G, t, c, P)
    cum_BHtc = jnp.moveaxis(cum_BtKGc, 1, 3).reshape(Bz, K * G, t, c).astype(F32)
    doc_Btc = doc_Btc.astype(jnp.int32)
    return (C_BKtcE, B_BKtcE, x_BHtcO, cum_BHtc[..., :, None], cum_BHtc[..., None, :],
            doc_Btc[..., :, None], doc_Btc[..., None, :])  # fmt: skip


def _forward(C_BtcKE, B_BtcKE, xdt_BtcKGO, cum_BtKGc, doc_Btc, interpret):
    Bz, t, c, K, G, P = xdt_BtcKGO.shape
    E = C_BtcKE.shape[-1]
    args = _layout(C_BtcKE, B_BtcKE, xdt_BtcKGO, cum_BtKGc, doc_Btc)
    group, head, cum_r, cum_c, doc_r, doc_c = _specs(K, G, c, E, P)
    y_BHtcO = pl.pallas_call(
        _fwd_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(Bz, K, t, G),
            in_specs=[group, group, head, cum_r, cum_c, doc_r, doc_c],
            out_specs=head,
            scratch_shapes=[pltpu.VMEM((c, c), F32)],
        ),
        out_shape=jax.ShapeDtypeStruct(args[2].shape, F32),
        cost_estimate=_cost(Bz, K, G, t, c, E, P, xdt_BtcKGO.dtype.itemsize, backward=False),
        name="nopejax_ssd_intra_chunk_fwd",
        **_compiler(interpret),
    )(*args)
    return jnp.moveaxis(y_BHtcO.reshape(Bz, K, G, t, c, P), (1, 2), (3, 4))


def _backward(C_BtcKE, B_BtcKE, xdt_BtcKGO, cum_BtKGc, doc_Btc, dy_BtcKGO, interpret):
    Bz, t, c, K, G, P = xdt_BtcKGO.shape
    E = C_BtcKE.shape[-1]
    args = _layout(C_BtcKE, B_BtcKE, xdt_BtcKGO, cum_BtKGc, doc_Btc)
    dy_BHtcO = _layout(C_BtcKE, B_BtcKE, dy_BtcKGO.astype(xdt_BtcKGO.dtype), cum_BtKGc, doc_Btc)[2]
    group, head, cum_r, cum_c, doc_r, doc_c = _specs(K, G, c, E, P)
    H = K * G
    out_shape = [
        jax.ShapeDtypeStruct(args[2].shape, F32),
        jax.ShapeDtypeStruct(args[0].shape, F32),
        jax.ShapeDtypeStruct(args[1].shape, F32),
        jax.ShapeDtypeStruct((Bz, H, t, c, 1), F32),
        jax.ShapeDtypeStruct((Bz, H, t, 1, c), F32),
    ]
    dx, dC, dB, dcum_r, dcum_c = pl.pallas_call(
        _bwd_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(Bz, K, t, G),
            in_specs=[group, group, head, cum_r, cum_c, doc_r, doc_c, head],
            out_specs=[head, group, group, cum_r, cum_c],
            scratch_shapes=[pltpu.VMEM((c, c), F32)],
        ),
        out_shape=out_shape,
        cost_estimate=_cost(Bz, K, G, t, c, E, P, xdt_BtcKGO.dtype.itemsize, backward=True),
        name="nopejax_ssd_intra_chunk_bwd",
        **_compiler(interpret),
    )(*args, dy_BHtcO)
    dx_BtcKGO = jnp.moveaxis(dx.reshape(Bz, K, G, t, c, P), (1, 2), (3, 4))
    dcum_BHtc = dcum_r[..., 0] - dcum_c[..., 0, :]
    dcum_BtKGc = jnp.moveaxis(dcum_BHtc.reshape(Bz, K, G, t, c), 3, 1)
    return jnp.moveaxis(dC, 1, 3), jnp.moveaxis(dB, 1, 3), dx_BtcKGO, dcum_BtKGc


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _intra(C, B, xdt, cum, doc, interpret):
    return _forward(C, B, xdt, cum, doc, interpret)


def _intra_fwd(C, B, xdt, cum, doc, interpret):
    return _forward(C, B, xdt, cum, doc, interpret), (C, B, xdt, cum, doc)


def _intra_bwd(interpret, res, dy):
    C, B, xdt, cum, doc = res
    dC, dB, dxdt, dcum = _backward(C, B, xdt, cum, doc, dy, interpret)
    ddoc = jnp.zeros(doc.shape, jax.dtypes.float0)
    return dC.astype(C.dtype), dB.astype(B.dtype), dxdt.astype(xdt.dtype), dcum.astype(cum.dtype), ddoc


_intra.defvjp(_intra_fwd, _intra_bwd)


def ssd_intra_chunk(C_BtcKE, B_BtcKE, xdt_BtcKGO, a_BtKGc, doc_Btc, *, interpret: bool = False, backend=None):
    """The intra-chunk outputs y_BtcKGO (fp32), as nopejax.mixers.ssd.intra_chunk, from Pallas kernels.

    C, B [B, t, c, K, E]; xdt [B, t, c, K, G, O] (x * dt); a [B, t, K, G, c] the log decays dt * A;
    doc [B, t, c] int, the document starts so far in each chunk (all 0 without packing).
    Differentiable in C, B, xdt and a (a custom VJP with a backward kernel). `interpret=True` runs
    the kernels in Pallas's HLO interpreter (any backend, for tests); otherwise they lower for TPU
    (Mosaic): on a TPU host, or with backend="tpu" to compile ahead of time for one elsewhere.
    """
    if C_BtcKE.shape != B_BtcKE.shape or C_BtcKE.shape[:4] != xdt_BtcKGO.shape[:4]:
        raise ValueError(f"ssd_intra_chunk: C {C_BtcKE.shape}, B {B_BtcKE.shape} and xdt {xdt_BtcKGO.shape} "
                         "must share [batch, chunks, chunk, groups]")  # fmt: skip
    if backend not in (None, "tpu"):
        raise ValueError(f"ssd_intra_chunk: backend must be 'tpu' or None, got {backend!r}")
    if backend is None and not interpret and jax.default_backend() != "tpu":
        raise ValueError(f"ssd_intra_chunk has no compiled lowering for platform {jax.default_backend()!r}; "
                         "pass interpret=True (slow, for tests) or use nopejax.mixers.ssd.intra_chunk")  # fmt: skip
    cum_BtKGc = jnp.cumsum(a_BtKGc.astype(F32), axis=-1)
    return _intra(C_BtcKE, B_BtcKE, xdt_BtcKGO, cum_BtKGc, doc_Btc, interpret)
