"""The SSD scan of Mamba2 in chunked form: intra-chunk matmuls, a recurrence over chunk states.

Source: Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality", section 6 and its "SSD minimal" listing; transformers' Mamba2
`torch_forward` (`mamba2_chunk_scan`) is the numerical reference.

Shape letters: B batch, S sequence, H heads, P head dim, G groups (B and C are shared by the
H / G = R heads of a group), N state size, C chunks, L and M positions inside one chunk (Q long).

The recurrence, per head h with a_t = dt_t * A_h (A_h < 0, dt_t >= 0):
    state_t = exp(a_t) * state_{t-1} + dt_t * x_t B_t^T        [P, N]
    y_t     = state_t C_t + D_h * x_t                          [P]
Chunked: inside a chunk the outputs are a masked "attention" (C_l . B_m) * exp(sum a_{m+1..l}) * dt_m x_m
(the segsum decay mask, Q x Q per chunk); each chunk's end state from a zero start is one matmul;
a scan over the C chunk states carries the state across chunks; each position adds the incoming
state read out by C_l, decayed from the chunk start. Memory is O(S * Q) (never S x S), so autodiff
through this form needs no rematerialisation to stay linear in S. States and decays are fp32.

Packed documents: a token whose segment id differs from the previous one and is not 0 starts a
document, where the state resets (its decay is 0: the segsum mask is -inf across a start, and a
chunk holding a start passes 0 of its incoming state). Padding (segment id 0) gets dt = 0, so it
neither decays nor feeds the state: padding at a row's end leaves the last document's state.

Context parallelism: a piece of the sequence is summarised by (decay_BH, state_BHPN) = (total
decay over the piece, its end state from a zero start); pieces chain by `combine`, and a piece is
run from its incoming state with `initial_state_BHPN`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def document_starts(segment_ids_BS, segment_id_before_B=None):
    """[B, S] bool: the tokens where a document starts (the state and the conv window reset).

    A token starts a document when its id differs from the previous token's and is not padding (0).
    `segment_id_before_B` is the id of the token before position 0 (the previous piece's last one);
    without it position 0 continues whatever state the caller passes in.
    """
    before_B = segment_ids_BS[:, 0] if segment_id_before_B is None else segment_id_before_B
    prev_BS = jnp.concatenate([before_B[:, None].astype(segment_ids_BS.dtype), segment_ids_BS[:, :-1]], axis=1)
    return (segment_ids_BS != prev_BS) & (segment_ids_BS != 0)


def _gated_dt(dt_BSH, segment_ids_BS, segment_id_before_B):
    """dt in fp32 with padding at 0, and the document starts (all False without segment ids)."""
    dt_BSH = dt_BSH.astype(F32)
    if segment_ids_BS is None:
        return dt_BSH, jnp.zeros(dt_BSH.shape[:2], bool)
    dt_BSH = jnp.where((segment_ids_BS != 0)[..., None], dt_BSH, 0.0)
    return dt_BSH, document_starts(segment_ids_BS, segment_id_before_B)


def _segsum(a_XL):
    """[..., L] -> [..., L, L]: entry [l, m] = a_{m+1} + ... + a_l for m <= l, -inf above the diagonal.

    Summed per entry from a masked cumsum, not as a difference of two cumsums: no cancellation.
    """
    Q = a_XL.shape[-1]
    a_XLM = jnp.broadcast_to(a_XL[..., :, None], (*a_XL.shape, Q))
    a_XLM = jnp.where(jnp.tril(jnp.ones((Q, Q), bool), -1), a_XLM, 0.0)
    seg_XLM = jnp.cumsum(a_XLM, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((Q, Q), bool)), seg_XLM, -jnp.inf)


def ssd(
    x_BSHP,
    dt_BSH,
    A_H,
    B_BSGN,
    C_BSGN,
    *,
    chunk: int,
    D_H=None,
    segment_ids_BS=None,
    segment_id_before_B=None,
    initial_state_BHPN=None,
):
    """The scan over S positions -> (y_BSHP in x's dtype, final_state_BHPN in fp32).

    dt is the discretisation step after softplus and clamping; A_H the (negative) decay rate.
    S need not be a multiple of `chunk`: the tail is padded with dt = 0 (state unmoved) and sliced off.
    """
    Bsz, S, H, P = x_BSHP.shape
    G, N = B_BSGN.shape[-2:]
    if H % G or chunk < 1:
        raise ValueError(f"ssd: heads={H} must be a multiple of groups={G} and chunk={chunk} at least 1")
    R = H // G
    Q = min(chunk, S)
    pad = -S % Q
    Cn = (S + pad) // Q

    dt_BSH, start_BS = _gated_dt(dt_BSH, segment_ids_BS, segment_id_before_B)

    def chunks(t, fill=0.0):  # [B, S, ...] -> [B, C, Q, ...], padded at the end
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2), constant_values=fill)
        return t.reshape(Bsz, Cn, Q, *t.shape[2:])

    x_BCLGRP = chunks(x_BSHP.astype(F32)).reshape(Bsz, Cn, Q, G, R, P)
    dt_BCLGR = chunks(dt_BSH).reshape(Bsz, Cn, Q, G, R)
    B_BCLGN = chunks(B_BSGN.astype(F32))
    C_BCLGN = chunks(C_BSGN.astype(F32))
    start_BCL = chunks(start_BS, False)

    a_BCGRL = jnp.moveaxis(dt_BCLGR * A_H.astype(F32).reshape(G, R), 2, -1)
    xdt_BCLGRP = x_BCLGRP * dt_BCLGR[..., None]
    # documents seen so far inside the chunk: l and m share a document iff their counts are equal
    doc_BCL = jnp.cumsum(start_BCL, axis=-1)
    same_BCLM = doc_BCL[..., :, None] == doc_BCL[..., None, :]
    seg_BCGRLM = jnp.where(same_BCLM[:, :, None, None], _segsum(a_BCGRL), -jnp.inf)
    decay_BCGRLM = jnp.exp(seg_BCGRLM)

    # 1. inside each chunk: masked (C . B) "attention" over the chunk's own inputs
    scores_BCGLM = jnp.einsum("bclgn,bcmgn->bcglm", C_BCLGN, B_BCLGN)
    y_BCLGRP = jnp.einsum("bcglm,bcgrlm,bcmgrp->bclgrp", scores_BCGLM, decay_BCGRLM, xdt_BCLGRP)

    # 2. each chunk's end state from a zero start: row l = Q - 1 of the decay mask
    states_BCGRPN = jnp.einsum("bclgn,bcgrl,bclgrp->bcgrpn", B_BCLGN, decay_BCGRLM[..., -1, :], xdt_BCLGRP)

    # 3. the state entering each chunk: a scan over chunks (0 across a document start)
    from_start_BCGRL = jnp.exp(jnp.where((doc_BCL == 0)[:, :, None, None], jnp.cumsum(a_BCGRL, axis=-1), -jnp.inf))
    chunk_decay_BCGR = from_start_BCGRL[..., -1]

    def step(state_BGRPN, inputs):
        decay_BGR, new_BGRPN = inputs
        return decay_BGR[..., None, None] * state_BGRPN + new_BGRPN, state_BGRPN

    state0_BGRPN = (
        jnp.zeros((Bsz, G, R, P, N), F32)
        if initial_state_BHPN is None
        else initial_state_BHPN.astype(F32).reshape(Bsz, G, R, P, N)
    )
    final_BGRPN, incoming_CBGRPN = jax.lax.scan(
        step, state0_BGRPN, (jnp.moveaxis(chunk_decay_BCGR, 1, 0), jnp.moveaxis(states_BCGRPN, 1, 0))
    )

    # 4. the incoming state read out at each position, decayed from the chunk start
    y_BCLGRP += jnp.einsum("bclgn,bcgrl,cbgrpn->bclgrp", C_BCLGN, from_start_BCGRL, incoming_CBGRPN)

    y_BSHP = y_BCLGRP.reshape(Bsz, Cn * Q, H, P)[:, :S]
    if D_H is not None:
        y_BSHP += D_H.astype(F32)[:, None] * x_BSHP.astype(F32)
    return y_BSHP.astype(x_BSHP.dtype), final_BGRPN.reshape(Bsz, H, P, N)


def ssd_step(x_BHP, dt_BH, A_H, B_BGN, C_BGN, state_BHPN, *, D_H=None):
    """One token of the recurrence, O(1) in the position -> (y_BHP in x's dtype, state_BHPN in fp32)."""
    H, G = x_BHP.shape[1], B_BGN.shape[1]
    R = H // G
    dt_BH = dt_BH.astype(F32)
    B_BHN = jnp.repeat(B_BGN.astype(F32), R, axis=1)
    C_BHN = jnp.repeat(C_BGN.astype(F32), R, axis=1)
    decay_BH = jnp.exp(dt_BH * A_H.astype(F32))
    x_BHP32 = x_BHP.astype(F32)
    state_BHPN = decay_BH[..., None, None] * state_BHPN.astype(F32) + jnp.einsum(
        "bh,bhp,bhn->bhpn", dt_BH, x_BHP32, B_BHN
    )
    y_BHP = jnp.einsum("bhpn,bhn->bhp", state_BHPN, C_BHN)
    if D_H is not None:
        y_BHP += D_H.astype(F32)[:, None] * x_BHP32
    return y_BHP.astype(x_BHP.dtype), state_BHPN


def piece_decay(dt_BSH, A_H, *, segment_ids_BS=None, segment_id_before_B=None):
    """[B, H] fp32: the factor a piece applies to its incoming state (0 if a document starts in it)."""
    dt_BSH, start_BS = _gated_dt(dt_BSH, segment_ids_BS, segment_id_before_B)
    total_BH = jnp.exp(jnp.sum(dt_BSH * A_H.astype(F32), axis=1))
    return jnp.where(jnp.any(start_BS, axis=1)[:, None], 0.0, total_BH)


def summarize(x_BSHP, dt_BSH, A_H, B_BSGN, C_BSGN, *, chunk: int, segment_ids_BS=None, segment_id_before_B=None):
    """A piece's (decay_BH, state_from_zero_BHPN): all `combine` needs to chain pieces."""
    segments = dict(segment_ids_BS=segment_ids_BS, segment_id_before_B=segment_id_before_B)
    _, state_BHPN = ssd(x_BSHP, dt_BSH, A_H, B_BSGN, C_BSGN, chunk=chunk, **segments)
    return piece_decay(dt_BSH, A_H, **segments), state_BHPN


def combine(decay_BH, state_in_BHPN, state_from_zero_BHPN):
    """The state leaving a piece, given the state entering it and the piece's summary."""
    return decay_BH[..., None, None] * state_in_BHPN + state_from_zero_BHPN
