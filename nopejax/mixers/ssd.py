"""The SSD scan of Mamba2 in chunked form: intra-chunk matmuls, a recurrence over chunk states.

Source: Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality", section 6 and its "SSD minimal" listing; transformers' Mamba2
`torch_forward` (`mamba2_chunk_scan`) is the numerical reference.

Shape letters (docs/reference/shapes.md): B batch, S sequence, H heads, O head dim (x's, Mamba2's
head_dim), K groups (B and C are shared by the H / K = G heads of a group), E state size (the axis
C . B contracts, as q . k in attention), t chunks, c and J positions inside one chunk (c long).

The recurrence, per head h with a_t = dt_t * A_h (A_h < 0, dt_t >= 0):
    state_t = exp(a_t) * state_{t-1} + dt_t * x_t B_t^T        [O, E]
    y_t     = state_t C_t + D_h * x_t                          [O]
Chunked: inside a chunk the outputs are a masked "attention" (C_l . B_m) * exp(sum a_{m+1..l}) * dt_m x_m
(the segsum decay mask, c x c per chunk); each chunk's end state from a zero start is one matmul;
a scan over the t chunk states carries the state across chunks; each position adds the incoming
state read out by C_l, decayed from the chunk start. Memory is O(S * c) (never S x S), so autodiff
through this form needs no rematerialisation to stay linear in S. States and decays are fp32.

Packed documents: a token whose segment id differs from the previous one and is not 0 starts a
document, where the state resets (its decay is 0: the segsum mask is -inf across a start, and a
chunk holding a start passes 0 of its incoming state). Padding (segment id 0) gets dt = 0, so it
neither decays nor feeds the state: padding at a row's end leaves the last document's state.

Context parallelism: a piece of the sequence is summarised by (decay_BH, state_BHOE) = (total
decay over the piece, its end state from a zero start); pieces chain by `combine`, and a piece is
run from its incoming state with `initial_state_BHOE`.
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


def chunked(S: int, chunk: int):
    """-> (c, to_chunks): the chunk length min(chunk, S), and [B, S, ...] -> [B, t, c, ...] with the tail
    padded by `fill` up to t = ceil(S / c) chunks (Mamba2's and Gated DeltaNet's chunked scans)."""
    c = min(chunk, S)
    pad = -S % c

    def to_chunks(x, fill=0.0):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(x.shape[0], -1, c, *x.shape[2:])

    return c, to_chunks


def _gated_dt(dt_BSH, segment_ids_BS, segment_id_before_B):
    """dt in fp32 with padding at 0, and the document starts (all False without segment ids)."""
    dt_BSH = dt_BSH.astype(F32)
    if segment_ids_BS is None:
        return dt_BSH, jnp.zeros(dt_BSH.shape[:2], bool)
    dt_BSH = jnp.where((segment_ids_BS != 0)[..., None], dt_BSH, 0.0)
    return dt_BSH, document_starts(segment_ids_BS, segment_id_before_B)


def _segsum(a_ac):
    """[..., c] -> [..., c, J]: entry [l, m] = a_{m+1} + ... + a_l for m <= l, -inf above the diagonal.

    Summed per entry from a masked cumsum, not as a difference of two cumsums: no cancellation.
    """
    c = a_ac.shape[-1]
    a_acJ = jnp.broadcast_to(a_ac[..., :, None], (*a_ac.shape, c))
    a_acJ = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), a_acJ, 0.0)
    seg_acJ = jnp.cumsum(a_acJ, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((c, c), bool)), seg_acJ, -jnp.inf)


def intra_chunk(C_BtcKE, B_BtcKE, xdt_BtcKGO, a_BtKGc, doc_Btc):
    """The outputs of each chunk from its own inputs alone (Y_diag of the SSD paper) -> y_BtcKGO, fp32.

    y_l = sum_{m <= l, same document} (C_l . B_m) exp(a_{m+1} + ... + a_l) xdt_m. `a` are the log
    decays dt * A, `xdt` = x * dt, `doc` the count of document starts so far in the chunk (l and m
    share a document iff their counts are equal). XLA materialises the [c, J] decay mask and scores
    per head and chunk; nopejax/kernels/ssd.py computes the same inside VMEM.
    """
    same_BtcJ = doc_Btc[..., :, None] == doc_Btc[..., None, :]
    decay_BtKGcJ = jnp.exp(jnp.where(same_BtcJ[:, :, None, None], _segsum(a_BtKGc), -jnp.inf))
    scores_BtKcJ = jnp.einsum("bclgn,bcmgn->bcglm", C_BtcKE, B_BtcKE)
    return jnp.einsum("bcglm,bcgrlm,bcmgrp->bclgrp", scores_BtKcJ, decay_BtKGcJ, xdt_BtcKGO)


def ssd(
    x_BSHO,
    dt_BSH,
    A_H,
    B_BSKE,
    C_BSKE,
    *,
    chunk: int,
    D_H=None,
    segment_ids_BS=None,
    segment_id_before_B=None,
    initial_state_BHOE=None,
    intra=intra_chunk,
):
    """The scan over S positions -> (y_BSHO in x's dtype, final_state_BHOE in fp32).

    dt is the discretisation step after softplus and clamping; A_H the (negative) decay rate.
    S need not be a multiple of `chunk`: the tail is padded with dt = 0 (state unmoved) and sliced off.
    `intra` computes step 1, `intra_chunk`'s signature and result (nopejax/kernels/ssd.py's kernel
    for model.mamba_impl "pallas"); the recurrence over chunks stays here, in XLA.
    """
    Bsz, S, H, head_dim = x_BSHO.shape
    K, E = B_BSKE.shape[-2:]
    if H % K or chunk < 1:
        raise ValueError(f"ssd: heads={H} must be a multiple of groups={K} and chunk={chunk} at least 1")
    G = H // K
    c, chunks = chunked(S, chunk)
    dt_BSH, start_BS = _gated_dt(dt_BSH, segment_ids_BS, segment_id_before_B)

    x_BtcKGO = chunks(x_BSHO.astype(F32)).reshape(Bsz, -1, c, K, G, head_dim)
    dt_BtcKG = chunks(dt_BSH).reshape(Bsz, -1, c, K, G)
    B_BtcKE = chunks(B_BSKE.astype(F32))
    C_BtcKE = chunks(C_BSKE.astype(F32))
    start_Btc = chunks(start_BS, False)

    a_BtKGc = jnp.moveaxis(dt_BtcKG * A_H.astype(F32).reshape(K, G), 2, -1)
    xdt_BtcKGO = x_BtcKGO * dt_BtcKG[..., None]
    # documents seen so far inside the chunk: l and m share a document iff their counts are equal
    doc_Btc = jnp.cumsum(start_Btc, axis=-1)

    # 1. inside each chunk: masked (C . B) "attention" over the chunk's own inputs
    y_BtcKGO = intra(C_BtcKE, B_BtcKE, xdt_BtcKGO, a_BtKGc, doc_Btc)

    # 2. each chunk's end state from a zero start: decays from each position to the chunk's end
    # (row c - 1 of the segsum mask), 0 before the chunk's last document start
    # a_{m+1} + ... + a_{c-1} as a reversed cumsum shifted by one (no difference of two cumsums)
    after_BtKGc = jnp.cumsum(a_BtKGc[..., ::-1], axis=-1)[..., ::-1]
    after_BtKGc = jnp.concatenate([after_BtKGc[..., 1:], jnp.zeros_like(after_BtKGc[..., :1])], axis=-1)
    last_doc_Bt11c = (doc_Btc == doc_Btc[..., -1:])[:, :, None, None]
    to_end_BtKGc = jnp.exp(jnp.where(last_doc_Bt11c, after_BtKGc, -jnp.inf))
    states_BtKGOE = jnp.einsum("bclgn,bcgrl,bclgrp->bcgrpn", B_BtcKE, to_end_BtKGc, xdt_BtcKGO)

    # 3. the state entering each chunk: a scan over chunks (0 across a document start)
    from_start_BtKGc = jnp.exp(jnp.where((doc_Btc == 0)[:, :, None, None], jnp.cumsum(a_BtKGc, axis=-1), -jnp.inf))
    chunk_decay_BtKG = from_start_BtKGc[..., -1]

    def step(state_BKGOE, inputs):
        decay_BKG, new_BKGOE = inputs
        return decay_BKG[..., None, None] * state_BKGOE + new_BKGOE, state_BKGOE

    state0_BKGOE = (
        jnp.zeros((Bsz, K, G, head_dim, E), F32)
        if initial_state_BHOE is None
        else initial_state_BHOE.astype(F32).reshape(Bsz, K, G, head_dim, E)
    )
    final_BKGOE, incoming_tBKGOE = jax.lax.scan(
        step, state0_BKGOE, (jnp.moveaxis(chunk_decay_BtKG, 1, 0), jnp.moveaxis(states_BtKGOE, 1, 0))
    )

    # 4. the incoming state read out at each position, decayed from the chunk start
    y_BtcKGO += jnp.einsum("bclgn,bcgrl,cbgrpn->bclgrp", C_BtcKE, from_start_BtKGc, incoming_tBKGOE)

    y_BSHO = y_BtcKGO.reshape(Bsz, -1, H, head_dim)[:, :S]
    if D_H is not None:
        y_BSHO += D_H.astype(F32)[:, None] * x_BSHO.astype(F32)
    return y_BSHO.astype(x_BSHO.dtype), final_BKGOE.reshape(Bsz, H, head_dim, E)


def ssd_step(x_BHO, dt_BH, A_H, B_BKE, C_BKE, state_BHOE, *, D_H=None):
    """One token of the recurrence, O(1) in the position -> (y_BHO in x's dtype, state_BHOE in fp32)."""
    H, K = x_BHO.shape[1], B_BKE.shape[1]
    G = H // K
    dt_BH = dt_BH.astype(F32)
    B_BHE = jnp.repeat(B_BKE.astype(F32), G, axis=1)
    C_BHE = jnp.repeat(C_BKE.astype(F32), G, axis=1)
    decay_BH = jnp.exp(dt_BH * A_H.astype(F32))
    x_BHO32 = x_BHO.astype(F32)
    state_BHOE = decay_BH[..., None, None] * state_BHOE.astype(F32) + jnp.einsum(
        "bh,bhp,bhn->bhpn", dt_BH, x_BHO32, B_BHE
    )
    y_BHO = jnp.einsum("bhpn,bhn->bhp", state_BHOE, C_BHE)
    if D_H is not None:
        y_BHO += D_H.astype(F32)[:, None] * x_BHO32
    return y_BHO.astype(x_BHO.dtype), state_BHOE


def piece_decay(dt_BSH, A_H, *, segment_ids_BS=None, segment_id_before_B=None):
    """[B, H] fp32: the factor a piece applies to its incoming state (0 if a document starts in it)."""
    dt_BSH, start_BS = _gated_dt(dt_BSH, segment_ids_BS, segment_id_before_B)
    total_BH = jnp.exp(jnp.sum(dt_BSH * A_H.astype(F32), axis=1))
    return jnp.where(jnp.any(start_BS, axis=1)[:, None], 0.0, total_BH)


def summarize(x_BSHO, dt_BSH, A_H, B_BSKE, C_BSKE, *, chunk: int, segment_ids_BS=None, segment_id_before_B=None):
    """A piece's (decay_BH, state_from_zero_BHOE): all `combine` needs to chain pieces."""
    segments = dict(segment_ids_BS=segment_ids_BS, segment_id_before_B=segment_id_before_B)
    _, state_BHOE = ssd(x_BSHO, dt_BSH, A_H, B_BSKE, C_BSKE, chunk=chunk, **segments)
    return piece_decay(dt_BSH, A_H, **segments), state_BHOE


def combine(decay_BH, state_in_BHOE, state_from_zero_BHOE):
    """The state leaving a piece, given the state entering it and the piece's summary."""
    return decay_BH[..., None, None] * state_in_BHOE + state_from_zero_BHOE
