"""The intra-chunk parts of the chunked gated delta rule as Pallas TPU kernels: the [c, c] pair decays,
A, its inverse T and the scores stay in VMEM.

Per (batch, chunk, key head k, value head), with cum the chunk-local cumulative log decay, doc the
count of document starts so far in the chunk, same(l, m) = (doc_l = doc_m), and
from_start_l = exp(cum_l) where no document starts at or before l in the chunk (0 after one):

    1. the UT transform (`gdn_ut_transform`):
        A = strictly lower [beta_l (k_l . k_m) exp(cum_l - cum_m)] where same(l, m)      [c, J]
        T = (I + A)^-1;   u = T (beta v) [c, O];   w = T (beta from_start k) [c, E]
    2. the output (`gdn_chunk_output`), from the new values n = u - w state_in the XLA scan gives:
        o = (q from_start) state_in + (lower [(q_l . k_m) exp(cum_l - cum_m)] where same(l, m)) n

nopejax/mixers/gated_delta.py computes the same in XLA (`ut_transform`, `chunk_output`), which writes
the pair decays, A, T and the scores to HBM per chunk and head (benchmarks/mixers.py,
docs/results/mixers.md); the recurrence over chunk states stays there, an XLA `lax.scan`.

The inverse is the blocked merge of gated_delta.unit_lower_inverse (flash-linear-attention's
`solve_tril`, LAPACK's trtri), done on the whole [c, J] tile with masks: with T_b the inverse of the
b x b diagonal blocks of I + A (T_1 = I), the 2b x 2b ones are
    T_2b = T_b - T_b L_b T_b        (L_b: A's lower-left b x b block inside each 2b x 2b block)
i.e. [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]] for every block at once; log2(c) - 1 rounds of two
matmuls at full fp32 precision (the 2 x 2 blocks are I - A's entries). Each merge uses exact inverses
only, so aligned keys (A entries near 1 or 2 with negative eigenvalues) keep fp32 accuracy where a
series (I - A)(I + A^2)(I + A^4).. does not. Decays are exp of a difference of chunk-local cumsums,
masked to -inf before the exp.

Backward kernels recompute the tiles. With Y = [u | w] = T X: dX = T^T dY and dA = -dX Y^T, whose
entries outside the strictly lower same-document pattern drop out as A is a product with the masked
pair decay there; the gradient of cum is a row sum minus a column sum (as nopejax/kernels/ssd.py).

Grid (batch, key head, chunk, value head in group): the G value heads of a key head share k (and q),
so k k^T and q k^T are computed once per key head and chunk into a VMEM scratch (at the innermost,
sequential axis's first step) and the gradients of k and q are summed over the group in output
blocks that stay resident across that axis. Layout: [B, K, t, c, E] for q and k (moved there by the
wrapper), and per value head gated_delta's own [B, t, K, G, c, O] (and [.., c, E], [.., E, O]) for the
new values, the incoming states, u and w, read and written in place (a block's last two dims are whole
axes: any E and O); only v and the output cross a layout copy. cum and doc travel as [.., c, 1] rows
and [.., 1, c] columns. All accumulation is fp32; the tiles A, T and their products are fp32 whatever the
input dtype. Imports nothing from the rest of nopejax.
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


def _iota(c):
    return lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _decay(cum_r, cum_c, doc_r, doc_c, *, strict: bool):
    """[c, c] fp32: exp(cum_l - cum_m) where m < l (m <= l unless strict) in the same document, 0 elsewhere."""
    row, col = _iota(cum_r.shape[0])
    visible = ((col < row) if strict else (col <= row)) & (doc_r == doc_c)
    return jnp.exp(jnp.where(visible, cum_r - cum_c, -jnp.inf))


def _from_start(cum_r, doc_r):
    """[c, 1] fp32: exp(cum_l) before the chunk's first document start, 0 from it on."""
    return jnp.exp(jnp.where(doc_r == 0, cum_r, -jnp.inf))


_dot, _nt, _nn, _tn = tiles.dot, tiles.nt, tiles.nn, tiles.tn


def _rows(x):  # [c, c] -> [c, 1]
    return jnp.sum(x, axis=1, keepdims=True)


def _cols(x):  # [c, c] -> [1, c]
    return jnp.sum(x, axis=0, keepdims=True)


def _unit_lower_inverse(A):
    """(I + A)^-1 for a strictly lower [c, J] fp32 tile: the blocked merge, every block of a size at once."""
    c = A.shape[0]
    row, col = _iota(c)
    # the 2 x 2 blocks need no matmul: [[1, 0], [a, 1]]^-1 = [[1, 0], [-a, 1]]
    T = (row == col).astype(F32) - jnp.where((row >> 1 == col >> 1) & (row != col), A, 0.0)
    shift = 1
    while (1 << shift) < c:
        # A's lower-left block of each 2b x 2b diagonal block (b = 2^shift): same 2b block, other b block
        lower = ((row >> (shift + 1)) == (col >> (shift + 1))) & ((row >> shift) != (col >> shift))
        T = T - _nn(T, _nn(jnp.where(lower, A, 0.0), T))
        shift += 1
    return T


# ----------------------------------------------------------------------------- 1. the UT transform


def _ut_tiles(k, kk, beta, cum_r, cum_c, doc_r, doc_c):
    """-> (pair, A, T, from_start) of one value head, all fp32."""
    pair = _decay(cum_r, cum_c, doc_r, doc_c, strict=True)
    A = beta * kk * pair
    return pair, A, _unit_lower_inverse(A), _from_start(cum_r, doc_r)


def _ut_fwd_kernel(k_ref, v_ref, b_ref, cr_ref, cc_ref, dr_ref, dc_ref, u_ref, w_ref, kk_ref):
    k = k_ref[...].astype(F32)

    @pl.when(pl.program_id(3) == 0)
    def _keys():  # once per (batch, key head, chunk): shared by the group's value heads
        kk_ref[...] = _nt(k, k)

    beta = b_ref[...]
    _, _, T, from_start = _ut_tiles(k, kk_ref[...], beta, cr_ref[...], cc_ref[...], dr_ref[...], dc_ref[...])
    u_ref[...] = _nn(T, beta * v_ref[...].astype(F32)).astype(u_ref.dtype)
    w_ref[...] = _nn(T, (beta * from_start) * k).astype(w_ref.dtype)


def _ut_bwd_kernel(k_ref, v_ref, b_ref, cr_ref, cc_ref, dr_ref, dc_ref, du_ref, dw_ref,
                   dk_ref, dv_ref, db_ref, dcr_ref, dcc_ref, kk_ref):  # fmt: skip
    k = k_ref[...].astype(F32)

    @pl.when(pl.program_id(3) == 0)
    def _init():
        kk_ref[...] = _nt(k, k)
        dk_ref[...] = jnp.zeros(dk_ref.shape, dk_ref.dtype)

    kk, beta, v = kk_ref[...], b_ref[...], v_ref[...].astype(F32)
    pair, A, T, from_start = _ut_tiles(k, kk, beta, cr_ref[...], cc_ref[...], dr_ref[...], dc_ref[...])
    xk = (beta * from_start) * k
    u, w = _nn(T, beta * v), _nn(T, xk)
    du, dw = du_ref[...].astype(F32), dw_ref[...].astype(F32)
    dxv, dxk = _tn(T, du), _tn(T, dw)  # T^T dY: the gradients of the right-hand sides beta v, beta from_start k
    dA = -(_nt(dxv, u) + _nt(dxk, w))  # -dX Y^T; A = beta (k k^T) pair masks it to the strictly lower pattern
    dAp = dA * pair
    dkk = beta * dAp
    dk_ref[...] += _nn(dkk, k) + _tn(dkk, k) + (beta * from_start) * dxk  # summed over the group's heads
    dv_ref[...] = (beta * dxv).astype(dv_ref.dtype)
    dxk_k = jnp.sum(dxk * k, axis=1, keepdims=True)
    db_ref[...] = _rows(dAp * kk) + jnp.sum(dxv * v, axis=1, keepdims=True) + from_start * dxk_k
    dz = dA * A  # d(cum_l - cum_m) = dA o A
    dcr_ref[...] = _rows(dz) + beta * dxk_k * from_start  # d from_start_l = beta_l (dxk_l . k_l)
    dcc_ref[...] = _cols(dz)


# ----------------------------------------------------------------------------- 2. the output


def _out_fwd_kernel(q_ref, k_ref, n_ref, s_ref, cr_ref, cc_ref, dr_ref, dc_ref, o_ref, qk_ref):
    q = q_ref[...]

    @pl.when(pl.program_id(3) == 0)
    def _scores():
        qk_ref[...] = _nt(q, k_ref[...])

    cum_r, doc_r = cr_ref[...], dr_ref[...]
    p = qk_ref[...] * _decay(cum_r, cc_ref[...], doc_r, dc_ref[...], strict=False)
    n, state = n_ref[...], s_ref[...]
    qs = (q.astype(F32) * _from_start(cum_r, doc_r)).astype(state.dtype)
    o_ref[...] = (_nn(qs, state) + _nn(p.astype(n.dtype), n)).astype(o_ref.dtype)


def _out_bwd_kernel(q_ref, k_ref, n_ref, s_ref, cr_ref, cc_ref, dr_ref, dc_ref, do_ref,
                    dq_ref, dk_ref, dn_ref, ds_ref, dcr_ref, dcc_ref, qk_ref):  # fmt: skip
    q, k = q_ref[...], k_ref[...]

    @pl.when(pl.program_id(3) == 0)
    def _init():
        qk_ref[...] = _nt(q, k)
        dq_ref[...] = jnp.zeros(dq_ref.shape, dq_ref.dtype)
        dk_ref[...] = jnp.zeros(dk_ref.shape, dk_ref.dtype)

    cum_r, doc_r = cr_ref[...], dr_ref[...]
    qk = qk_ref[...]
    pair = _decay(cum_r, cc_ref[...], doc_r, dc_ref[...], strict=False)
    from_start = _from_start(cum_r, doc_r)
    n, state, do = n_ref[...], s_ref[...], do_ref[...]
    q32 = q.astype(F32)
    dn_ref[...] = _tn((qk * pair).astype(do.dtype), do).astype(dn_ref.dtype)  # P^T do
    ds_ref[...] = _tn((q32 * from_start).astype(do.dtype), do).astype(ds_ref.dtype)  # (q from_start)^T do
    dqs = _nt(do, state)  # the gradient of q from_start [c, E]
    dqk = _nt(do, n) * pair  # masked to the lower same-document pattern
    dq_ref[...] += from_start * dqs + _nn(dqk.astype(k.dtype), k)  # summed over the group's heads
    dk_ref[...] += _tn(dqk.astype(q.dtype), q)
    dz = dqk * qk
    dcr_ref[...] = _rows(dz) + jnp.sum(dqs * q32, axis=1, keepdims=True) * from_start
    dcc_ref[...] = _cols(dz)


# ----------------------------------------------------------------------------- pallas_call plumbing


def _group(c, E):
    return pl.BlockSpec((None, None, None, c, E), lambda b, k, t, g: (b, k, t, 0, 0))


def _head(rows, cols):
    """A value head's [rows, cols] tile of a [B, t, K, G, rows, cols] array (gated_delta's own layout)."""
    return pl.BlockSpec((None, None, None, None, rows, cols), lambda b, k, t, g: (b, t, k, g, 0, 0))


def _cum_doc_specs(c):
    """BlockSpecs of cum rows/cols (per value head) and doc rows/cols (per batch and chunk)."""
    doc_r = pl.BlockSpec((None, None, c, 1), lambda b, k, t, g: (b, t, 0, 0))
    doc_c = pl.BlockSpec((None, None, 1, c), lambda b, k, t, g: (b, t, 0, 0))
    return [_head(c, 1), _head(1, c), doc_r, doc_c]


def _compiler(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )


def _cum_doc(cum_BtKGc, doc_Btc):
    """cum rows/cols [B, t, K, G, c, 1] / [.., 1, c] (fp32) and doc rows/cols [B, t, c, 1] / [B, t, 1, c] (int32)."""
    cum_BtKGc = cum_BtKGc.astype(F32)
    doc_Btc = doc_Btc.astype(jnp.int32)
    return [cum_BtKGc[..., :, None], cum_BtKGc[..., None, :], doc_Btc[..., :, None], doc_Btc[..., None, :]]


def _dcum(dcum_r, dcum_c):
    return dcum_r[..., 0] - dcum_c[..., 0, :]


def _ut_cost(Bz, K, G, t, c, E, P, itemsize, backward):
    heads, groups = Bz * K * G * t, Bz * K * t
    levels = max(0, (c - 1).bit_length() - 1)
    # A, the log2(c) - 1 merges of two [c, c] matmuls, T [beta v | beta from_start k]
    flops = groups * 2 * c * c * E + heads * (6 * c * c + levels * 4 * c**3 + 2 * c * c * (P + E))
    io = groups * c * E * itemsize + heads * (c * P * itemsize + 16 * c + c * (P + E) * 4)
    if backward:  # recompute, T^T dY, dX Y^T, dk (two [c, c] x [c, E]), the elementwise gradients
        flops += heads * (levels * 4 * c**3 + 6 * c * c * (P + E) + 4 * c * c * E + 12 * c * c)
        io = 2 * io + groups * c * E * 4 + heads * (c * P * 4 + 12 * c)
    return pl.CostEstimate(flops=flops, transcendentals=heads * (c * c + c), bytes_accessed=io)


def _out_cost(Bz, K, G, t, c, E, P, itemsize, backward):
    heads, groups = Bz * K * G * t, Bz * K * t
    flops = groups * 2 * c * c * E + heads * (3 * c * c + c * E + 2 * c * E * P + 2 * c * c * P)
    io = groups * 2 * c * E * itemsize + heads * ((2 * c * P + E * P) * itemsize + 16 * c)
    if backward:  # dn, dstate, dq (two), dk, dqk
        flops += heads * (2 * c * c * P + 2 * c * E * P + 2 * c * E * P + 4 * c * c * E + 2 * c * c * P + 6 * c * c)
        io = 2 * io + groups * 2 * c * E * 4 + heads * ((c * P + E * P) * 4 + 8 * c)
    return pl.CostEstimate(flops=flops, transcendentals=heads * (c * c + c), bytes_accessed=io)


def _ut_forward(k_BtcKE, v_BtcKGO, beta_BtKGc, cum_BtKGc, doc_Btc, interpret):
    Bz, t, c, K, G, P = v_BtcKGO.shape
    E = k_BtcKE.shape[-1]
    k_BKtcE = jnp.moveaxis(k_BtcKE, 3, 1)
    v_BtKGcP = jnp.moveaxis(v_BtcKGO, 2, 4)
    beta_r = beta_BtKGc.astype(F32)[..., None]
    group, head_c1 = _group(c, E), _head(c, 1)
    u, w = pl.pallas_call(
        _ut_fwd_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(Bz, K, t, G),
            in_specs=[group, _head(c, P), head_c1, *_cum_doc_specs(c)],
            out_specs=[_head(c, P), _head(c, E)],
            scratch_shapes=[pltpu.VMEM((c, c), F32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((Bz, t, K, G, c, P), F32), jax.ShapeDtypeStruct((Bz, t, K, G, c, E), F32)],
        cost_estimate=_ut_cost(Bz, K, G, t, c, E, P, v_BtcKGO.dtype.itemsize, backward=False),
        name="nopejax_gdn_ut_transform_fwd",
        **_compiler(interpret),
    )(k_BKtcE, v_BtKGcP, beta_r, *_cum_doc(cum_BtKGc, doc_Btc))
    return u, w


def _ut_backward(k_BtcKE, v_BtcKGO, beta_BtKGc, cum_BtKGc, doc_Btc, du_BtKGcO, dw_BtKGcE, interpret):
    Bz, t, c, K, G, P = v_BtcKGO.shape
    E = k_BtcKE.shape[-1]
    k_BKtcE = jnp.moveaxis(k_BtcKE, 3, 1)
    v_BtKGcP = jnp.moveaxis(v_BtcKGO, 2, 4)
    beta_r = beta_BtKGc.astype(F32)[..., None]
    group, head_c1 = _group(c, E), _head(c, 1)
    dk, dv, dbeta, dcum_r, dcum_c = pl.pallas_call(
        _ut_bwd_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(Bz, K, t, G),
            in_specs=[group, _head(c, P), head_c1, *_cum_doc_specs(c), _head(c, P), _head(c, E)],
            out_specs=[group, _head(c, P), head_c1, head_c1, _head(1, c)],
            scratch_shapes=[pltpu.VMEM((c, c), F32)],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(k_BKtcE.shape, F32),
            jax.ShapeDtypeStruct((Bz, t, K, G, c, P), F32),
            jax.ShapeDtypeStruct((Bz, t, K, G, c, 1), F32),
            jax.ShapeDtypeStruct((Bz, t, K, G, c, 1), F32),
            jax.ShapeDtypeStruct((Bz, t, K, G, 1, c), F32),
        ],
        cost_estimate=_ut_cost(Bz, K, G, t, c, E, P, v_BtcKGO.dtype.itemsize, backward=True),
        name="nopejax_gdn_ut_transform_bwd",
        **_compiler(interpret),
    )(k_BKtcE, v_BtKGcP, beta_r, *_cum_doc(cum_BtKGc, doc_Btc), du_BtKGcO, dw_BtKGcE)
    return jnp.moveaxis(dk, 1, 3), jnp.moveaxis(dv, 4, 2), dbeta[..., 0], _dcum(dcum_r, dcum_c)


def _out_forward(q_BtcKE, k_BtcKE, new_BtKGcO, state_BtKGEO, cum_BtKGc, doc_Btc, interpret):
    Bz, t, K, G, c, P = new_BtKGcO.shape
    E = q_BtcKE.shape[-1]
    group = _group(c, E)
    o = pl.pallas_call(
        _out_fwd_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(Bz, K, t, G),
            in_specs=[group, group, _head(c, P), _head(E, P), *_cum_doc_specs(c)],
            out_specs=_head(c, P),
            scratch_shapes=[pltpu.VMEM((c, c), F32)],
        ),
        out_shape=jax.ShapeDtypeStruct((Bz, t, K, G, c, P), F32),
        cost_estimate=_out_cost(Bz, K, G, t, c, E, P, new_BtKGcO.dtype.itemsize, backward=False),
        name="nopejax_gdn_chunk_output_fwd",
        **_compiler(interpret),
    )(jnp.moveaxis(q_BtcKE, 3, 1), jnp.moveaxis(k_BtcKE, 3, 1), new_BtKGcO, state_BtKGEO,
      *_cum_doc(cum_BtKGc, doc_Btc))  # fmt: skip
    return jnp.moveaxis(o, 4, 2)  # [B, t, c, K, G, O]


def _out_backward(q_BtcKE, k_BtcKE, new_BtKGcO, state_BtKGEO, cum_BtKGc, doc_Btc, do_BtcKGO, interpret):
    Bz, t, K, G, c, P = new_BtKGcO.shape
    E = q_BtcKE.shape[-1]
    group = _group(c, E)
    do_BtKGcP = jnp.moveaxis(do_BtcKGO, 2, 4).astype(new_BtKGcO.dtype)
    dq, dk, dn, ds, dcum_r, dcum_c = pl.pallas_call(
        _out_bwd_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(Bz, K, t, G),
            in_specs=[group, group, _head(c, P), _head(E, P), *_cum_doc_specs(c), _head(c, P)],
            out_specs=[group, group, _head(c, P), _head(E, P), _head(c, 1), _head(1, c)],
            scratch_shapes=[pltpu.VMEM((c, c), F32)],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((Bz, K, t, c, E), F32),
            jax.ShapeDtypeStruct((Bz, K, t, c, E), F32),
            jax.ShapeDtypeStruct((Bz, t, K, G, c, P), F32),
            jax.ShapeDtypeStruct((Bz, t, K, G, E, P), F32),
            jax.ShapeDtypeStruct((Bz, t, K, G, c, 1), F32),
            jax.ShapeDtypeStruct((Bz, t, K, G, 1, c), F32),
        ],
        cost_estimate=_out_cost(Bz, K, G, t, c, E, P, new_BtKGcO.dtype.itemsize, backward=True),
        name="nopejax_gdn_chunk_output_bwd",
        **_compiler(interpret),
    )(jnp.moveaxis(q_BtcKE, 3, 1), jnp.moveaxis(k_BtcKE, 3, 1), new_BtKGcO, state_BtKGEO,
      *_cum_doc(cum_BtKGc, doc_Btc), do_BtKGcP)  # fmt: skip
    return jnp.moveaxis(dq, 1, 3), jnp.moveaxis(dk, 1, 3), dn, ds, _dcum(dcum_r, dcum_c)


def _float0(x):
    return jnp.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ut(k, v, beta, cum, doc, interpret):
    return _ut_forward(k, v, beta, cum, doc, interpret)


def _ut_fwd(k, v, beta, cum, doc, interpret):
    return _ut_forward(k, v, beta, cum, doc, interpret), (k, v, beta, cum, doc)


def _ut_bwd(interpret, res, cotangents):
    k, v, beta, cum, doc = res
    du, dw = cotangents
    dk, dv, dbeta, dcum = _ut_backward(k, v, beta, cum, doc, du, dw, interpret)
    return dk.astype(k.dtype), dv.astype(v.dtype), dbeta.astype(beta.dtype), dcum.astype(cum.dtype), _float0(doc)


_ut.defvjp(_ut_fwd, _ut_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _out(q, k, new, state, cum, doc, interpret):
    return _out_forward(q, k, new, state, cum, doc, interpret)


def _out_fwd(q, k, new, state, cum, doc, interpret):
    return _out_forward(q, k, new, state, cum, doc, interpret), (q, k, new, state, cum, doc)


def _out_bwd(interpret, res, do):
    q, k, new, state, cum, doc = res
    dq, dk, dn, ds, dcum = _out_backward(q, k, new, state, cum, doc, do, interpret)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dn.astype(new.dtype), ds.astype(state.dtype),
            dcum.astype(cum.dtype), _float0(doc))  # fmt: skip


_out.defvjp(_out_fwd, _out_bwd)


def _check_backend(name, interpret, backend):
    if backend not in (None, "tpu"):
        raise ValueError(f"{name}: backend must be 'tpu' or None, got {backend!r}")
    if backend is None and not interpret and jax.default_backend() != "tpu":
        raise ValueError(f"{name} has no compiled lowering for platform {jax.default_backend()!r}; pass "
                         "interpret=True (slow, for tests) or use nopejax.mixers.gated_delta's XLA form")  # fmt: skip


def gdn_ut_transform(k_BtcKE, v_BtcKGO, beta_BtKGc, cum_BtKGc, doc_Btc, *, interpret: bool = False, backend=None):
    """The UT transform -> (u_BtKGcO, w_BtKGcE) in fp32, as nopejax.mixers.gated_delta.ut_transform.

    k [B, t, c, K, E] (L2-normalised); v [B, t, c, K, G, O]; beta and cum (the chunk-local cumsum of
    the log decays) [B, t, K, G, c]; doc [B, t, c] int, the document starts so far in each chunk.
    Differentiable in k, v, beta and cum (a custom VJP with a backward kernel). `interpret=True` runs
    the kernels in Pallas's HLO interpreter (any backend, for tests); otherwise they lower for TPU
    (Mosaic): on a TPU host, or with backend="tpu" to compile ahead of time for one elsewhere.
    """
    if k_BtcKE.shape[:4] != v_BtcKGO.shape[:4] or beta_BtKGc.shape != cum_BtKGc.shape:
        raise ValueError(f"gdn_ut_transform: k {k_BtcKE.shape}, v {v_BtcKGO.shape} must share [batch, chunks, "
                         f"chunk, key heads] and beta {beta_BtKGc.shape}, cum {cum_BtKGc.shape} one shape")  # fmt: skip
    _check_backend("gdn_ut_transform", interpret, backend)
    return _ut(k_BtcKE, v_BtcKGO, beta_BtKGc, cum_BtKGc, doc_Btc, interpret)


def gdn_chunk_output(q_BtcKE, k_BtcKE, new_BtKGcO, state_BtKGEO, cum_BtKGc, doc_Btc, *, interpret: bool = False,
                     backend=None):  # fmt: skip
    """A chunk's outputs o_BtcKGO (fp32), as nopejax.mixers.gated_delta.chunk_output.

    q (scaled) and k [B, t, c, K, E]; new [B, t, K, G, c, O] the new values u - w state_in; state
    [B, t, K, G, E, O] the state entering each chunk; cum [B, t, K, G, c]; doc [B, t, c].
    Differentiable in q, k, new, state and cum; `interpret` and `backend` as gdn_ut_transform.
    """
    if q_BtcKE.shape != k_BtcKE.shape or new_BtKGcO.shape[:4] != state_BtKGEO.shape[:4]:
        raise ValueError(f"gdn_chunk_output: q {q_BtcKE.shape}, k {k_BtcKE.shape} must have one shape and new "
                         f"{new_BtKGcO.shape}, state {state_BtKGEO.shape} share [batch, chunks, heads]")  # fmt: skip
    _check_backend("gdn_chunk_output", interpret, backend)
    return _out(q_BtcKE, k_BtcKE, new_BtKGcO, state_BtKGEO, cum_BtKGc, doc_Btc, interpret)
