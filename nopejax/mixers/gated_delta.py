"""The gated delta rule of Gated DeltaNet in chunked WY (UT transform) form: intra-chunk matmuls and one
unit lower triangular inverse per chunk (from matmuls too), a recurrence over chunk states.

Source: Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule";
flash-linear-attention's `chunk_gated_delta_rule`. Numerical reference: transformers'
`torch_recurrent_gated_delta_rule` / `torch_chunk_gated_delta_rule` (Qwen3-Next, OLMo Hybrid).

Shape letters (docs/reference/shapes.md): B batch, S sequence, K query/key heads, H value heads (each
key head serves the G = H / K consecutive value heads, transformers' `repeat_interleave`), E key head
dim, O value head dim, t chunks, c and J positions inside one chunk (c long), v the O value columns
and E identity columns `summarize` runs together, a any leading axes.

The recurrence, per value head, with q scaled by 1/sqrt(E) (after an L2 norm of q and k where
`normalize_qk`, transformers' `use_qk_l2norm_in_kernel`) and g_t <= 0:
    state_t = exp(g_t) (I - beta_t k_t k_t^T) state_{t-1} + beta_t k_t v_t^T      [E, O]
    o_t     = state_t^T q_t                                                        [O]
Chunked: the c delta updates of a chunk are condensed by the UT transform T = (I + A)^-1, A the
strictly lower [c, J] matrix beta_l (k_l . k_m) exp(g_{m+1} + ... + g_l): u = T (beta v) are the
chunk's values and w = T (beta k exp(g_1 + ... + g_l)) the keys that read the incoming state; the
new values written are u - w state_in. A `lax.scan` over the t chunk states carries the state;
memory is O(S c), never S x S, so autodiff needs no rematerialisation to stay linear in S. States,
decays and the inverse are fp32 whatever the input dtype. The two intra-chunk parts, the UT transform
(`ut_transform`) and the chunk outputs (`chunk_output`), are `gated_delta`'s `intra` hook: XLA's here,
or the Pallas kernels of nopejax/kernels/gdn.py (model.gdn_impl "pallas"); the scan stays here.

Packed documents: a token whose segment id differs from the previous one and is not 0 starts a
document, where the state resets (as if g were -inf there: every decay across a start is 0).
Padding (segment id 0) gets g = 0 and beta = 0, so it leaves the state as it is.

Context parallelism: the state leaving a piece is linear in the state entering it,
    state_out = transition @ state_in + state_from_zero        (transition [E, E] per head)
with transition = prod_t exp(g_t) (I - beta_t k_t k_t^T) (0 if a document starts in the piece).
Each column of the state evolves alone, so `summarize` gets both from one run over values padded
with E zero columns from the initial state [0 | I]; `combine` chains pieces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nopejax.mixers.ssd import chunked, document_starts

F32 = jnp.float32


def l2norm(x, eps=1e-6):
    """x / sqrt(|x|^2 + eps) over the last axis, in fp32 (transformers' and FLA's `l2norm`)."""
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _inputs(q_aKE, k_aKE, g_aH, beta_aH, normalize_qk):
    """q, k in fp32, normalised where asked, q scaled by 1/sqrt(E); g and beta in fp32."""
    q_aKE, k_aKE = q_aKE.astype(F32), k_aKE.astype(F32)
    if normalize_qk:
        q_aKE, k_aKE = l2norm(q_aKE), l2norm(k_aKE)
    return q_aKE * q_aKE.shape[-1] ** -0.5, k_aKE, g_aH.astype(F32), beta_aH.astype(F32)


def unit_lower_inverse(A_acJ):
    """(I + A)^-1 for A strictly lower triangular [..., c, c], from matmuls alone: exact, in fp32.

    The blocked triangular inverse of flash-linear-attention's `solve_tril` (and LAPACK's trtri): the
    inverse of a block lower triangular matrix [[L11, 0], [L21, L22]] is
    [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]], so the inverses of the 1 x 1 diagonal blocks (all 1)
    merge in pairs, log2(c) rounds of small batched matmuls, every pair of a round at once. Not
    `lax.linalg.triangular_solve`: on TPU a TriangularSolve is slow where matmuls are fast, and on CPU it
    is jaxlib's LAPACK custom call (lapack_strsm_ffi), which splits its batch into tasks on XLA:CPU's
    intra-op thread pool and blocks until they are done, from a thread of that same pool. A program on
    several CPU devices runs each device's copy on a pool thread; when all of them reach the call at once,
    no thread is left to run the tasks and the step hangs at 0 % CPU (8 devices, 8 pool threads). The
    matmuls are at HIGHEST precision: TPUs otherwise round fp32 operands to bf16, and the rounds compound.
    """
    c = A_acJ.shape[-1]
    size = 1 << (c - 1).bit_length()  # the next power of two: (I + A) padded with an identity block
    A_acJ = jnp.pad(A_acJ.astype(F32), [(0, 0)] * (A_acJ.ndim - 2) + [(0, size - c)] * 2)
    lead = A_acJ.shape[:-2]
    # top down: the diagonal blocks of each size and the lower-left block under each one's middle
    diagonal_anbb, lower_left = A_acJ[..., None, :, :], []
    while diagonal_anbb.shape[-1] > 1:
        half = diagonal_anbb.shape[-1] // 2
        lower_left.append(diagonal_anbb[..., half:, :half])
        diagonal_anbb = jnp.stack([diagonal_anbb[..., :half, :half], diagonal_anbb[..., half:, half:]], axis=-3)
        diagonal_anbb = diagonal_anbb.reshape(*lead, -1, half, half)
    # bottom up: the inverses of the 1 x 1 blocks are 1; merge pairs of block inverses into their parent's
    inverse_anbb = jnp.ones((*lead, size, 1, 1), F32)
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    for L21_anbb in reversed(lower_left):
        b = inverse_anbb.shape[-1]
        pairs = inverse_anbb.reshape(*lead, -1, 2, b, b)
        first_anbb, second_anbb = pairs[..., 0, :, :], pairs[..., 1, :, :]
        below_anbb = -dot(dot(second_anbb, L21_anbb), first_anbb)
        top_anbB = jnp.concatenate([first_anbb, jnp.zeros_like(first_anbb)], axis=-1)
        bottom_anbB = jnp.concatenate([below_anbb, second_anbb], axis=-1)
        inverse_anbb = jnp.concatenate([top_anbB, bottom_anbB], axis=-2)
    return inverse_anbb[..., 0, :c, :c]


def _from_start(cum_BtKGc, doc_Btc):
    """exp(cum) before each chunk's first document start, 0 from it on: the decay of the incoming state."""
    return jnp.exp(jnp.where((doc_Btc == 0)[:, :, None, None], cum_BtKGc, -jnp.inf))


def _pair_decay(cum_BtKGc, doc_Btc, *, strict: bool):
    """[B, t, K, G, c, J]: exp(cum_l - cum_m) where m < l (m <= l unless strict) in one document, else 0."""
    c = doc_Btc.shape[-1]
    visible_cJ = jnp.tril(jnp.ones((c, c), bool), -1 if strict else 0)
    same_Bt11cJ = ((doc_Btc[..., :, None] == doc_Btc[..., None, :]) & visible_cJ)[:, :, None, None]
    return jnp.exp(jnp.where(same_Bt11cJ, cum_BtKGc[..., :, None] - cum_BtKGc[..., None, :], -jnp.inf))


def ut_transform(k_BtcKE, v_BtcKGO, beta_BtKGc, cum_BtKGc, doc_Btc):
    """The UT transform of every chunk and value head -> (u_BtKGcO, w_BtKGcE), fp32:
    [u | w] = (I + A)^-1 [beta v | beta exp(cum) k], A the strictly lower beta_l (k_l . k_m) exp(cum_l - cum_m)
    within a document (exp(cum) is 0 from the chunk's first document start on).

    cum is the chunk-local cumsum of the log decays, doc [B, t, c] the document starts so far in each
    chunk. XLA writes the [c, J] tiles to HBM per chunk and head; nopejax/kernels/gdn.py's
    `gdn_ut_transform` computes the same in VMEM (model.gdn_impl "pallas").
    """
    vdim = v_BtcKGO.shape[-1]
    kk_BtKcJ = jnp.einsum("bclgk,bcmgk->bcglm", k_BtcKE, k_BtcKE)
    A_BtKGcJ = beta_BtKGc[..., :, None] * kk_BtKcJ[:, :, :, None] * _pair_decay(cum_BtKGc, doc_Btc, strict=True)
    k_BtKGcE = jnp.moveaxis(k_BtcKE, 2, -2)[:, :, :, None].astype(F32)
    rhs_BtKGcv = jnp.concatenate(
        [
            beta_BtKGc[..., None] * jnp.moveaxis(v_BtcKGO.astype(F32), 2, -2),
            (beta_BtKGc * _from_start(cum_BtKGc, doc_Btc))[..., None] * k_BtKGcE,
        ],
        axis=-1,
    )
    uw_BtKGcv = jnp.einsum("...lm,...mv->...lv", unit_lower_inverse(A_BtKGcJ), rhs_BtKGcv)
    return uw_BtKGcv[..., :vdim], uw_BtKGcv[..., vdim:]


def chunk_output(q_BtcKE, k_BtcKE, new_BtKGcO, state_BtKGEO, cum_BtKGc, doc_Btc):
    """The outputs of every chunk o_BtcKGO (fp32): the incoming state read by the decayed queries, plus
    the chunk's own new values n = u - w state_in through the masked, decayed scores q k^T.

    nopejax/kernels/gdn.py's `gdn_chunk_output` computes the same in VMEM (model.gdn_impl "pallas").
    """
    scores_BtKcJ = jnp.einsum("bclgk,bcmgk->bcglm", q_BtcKE, k_BtcKE)
    from_start_BtKGc = _from_start(cum_BtKGc, doc_Btc)
    o_BtcKGO = jnp.einsum("bclgk,bcgrl,bcgrkv->bclgrv", q_BtcKE, from_start_BtKGc, state_BtKGEO)
    pair_BtKGcJ = _pair_decay(cum_BtKGc, doc_Btc, strict=False)
    return o_BtcKGO + jnp.einsum("bcglm,bcgrlm,bcgrmv->bclgrv", scores_BtKcJ, pair_BtKGcJ, new_BtKGcO)


class Intra(NamedTuple):
    """The two intra-chunk parts `gated_delta` calls, with `ut_transform`'s and `chunk_output`'s signatures."""

    ut: Callable
    output: Callable


XLA_INTRA = Intra(ut_transform, chunk_output)


def gated_delta(
    q_BSKE,
    k_BSKE,
    v_BSHO,
    g_BSH,
    beta_BSH,
    *,
    chunk: int,
    normalize_qk: bool = False,
    segment_ids_BS=None,
    segment_id_before_B=None,
    initial_state_BHEO=None,
    intra: Intra = XLA_INTRA,
):
    """The rule over S positions -> (o_BSHO in v's dtype, final_state_BHEO in fp32).

    g is the log decay (<= 0), beta the write strength (in (0, 1), or (0, 2) with negative eigenvalues).
    S need not be a multiple of `chunk`: the tail is padded with g = 0, beta = 0 (state unmoved) and cut off.
    `segment_id_before_B` is the id of the token before position 0 (the previous piece's last one).
    `intra` computes the UT transform (step 1) and the chunk outputs (step 3): XLA's by default, the
    Pallas kernels of nopejax/kernels/gdn.py for model.gdn_impl "pallas"; the scan over chunks stays here.
    """
    Bsz, S, K, E = k_BSKE.shape
    H, vdim = v_BSHO.shape[-2:]
    if H % K or chunk < 1:
        raise ValueError(f"gated_delta: value heads={H} must be a multiple of key heads={K}, chunk={chunk} at least 1")
    G = H // K
    c, chunks = chunked(S, chunk)

    q_BSKE, k_BSKE, g_BSH, beta_BSH = _inputs(q_BSKE, k_BSKE, g_BSH, beta_BSH, normalize_qk)
    if segment_ids_BS is None:
        start_BS = jnp.zeros((Bsz, S), bool)
    else:
        real_BS1 = (segment_ids_BS != 0)[..., None]
        g_BSH, beta_BSH = jnp.where(real_BS1, g_BSH, 0.0), jnp.where(real_BS1, beta_BSH, 0.0)
        start_BS = document_starts(segment_ids_BS, segment_id_before_B)

    q_BtcKE, k_BtcKE = chunks(q_BSKE), chunks(k_BSKE)
    v_BtcKGO = chunks(v_BSHO.astype(F32)).reshape(Bsz, -1, c, K, G, vdim)
    g_BtKGc = jnp.moveaxis(chunks(g_BSH).reshape(Bsz, -1, c, K, G), 2, -1)
    beta_BtKGc = jnp.moveaxis(chunks(beta_BSH).reshape(Bsz, -1, c, K, G), 2, -1)
    start_Btc = chunks(start_BS, False)
    # decays inside a chunk; a document start makes every decay across it 0
    doc_Btc = jnp.cumsum(start_Btc, axis=-1)  # l and m share a document iff their counts are equal
    cum_BtKGc = jnp.cumsum(g_BtKGc, axis=-1)
    to_end_BtKGc = jnp.exp(
        jnp.where((doc_Btc == doc_Btc[..., -1:])[:, :, None, None], cum_BtKGc[..., -1:] - cum_BtKGc, -jnp.inf)
    )
    chunk_decay_BtKG = _from_start(cum_BtKGc, doc_Btc)[..., -1]

    # 1. the UT transform: [u | w] = (I + A)^-1 [beta v | beta k exp(cum)] per chunk and head
    u_BtKGcO, w_BtKGcE = intra.ut(k_BtcKE, v_BtcKGO, beta_BtKGc, cum_BtKGc, doc_Btc)

    # 2. the scan over chunks: new values u - w state_in, state_out = decay state_in + k~^T (new values)
    kend_BtKGcE = to_end_BtKGc[..., None] * jnp.moveaxis(k_BtcKE, 2, -2)[:, :, :, None]

    def step(state_BKGEO, inputs):
        decay_BKG, u_BKGcO, w_BKGcE, kend_BKGcE = inputs
        new_BKGcO = u_BKGcO - jnp.einsum("bgrlk,bgrkv->bgrlv", w_BKGcE, state_BKGEO)
        out_BKGEO = decay_BKG[..., None, None] * state_BKGEO + jnp.einsum("bgrlk,bgrlv->bgrkv", kend_BKGcE, new_BKGcO)
        return out_BKGEO, (state_BKGEO, new_BKGcO)

    state0_BKGEO = (
        jnp.zeros((Bsz, K, G, E, vdim), F32)
        if initial_state_BHEO is None
        else initial_state_BHEO.astype(F32).reshape(Bsz, K, G, E, vdim)
    )
    final_BKGEO, (incoming_tBKGEO, new_tBKGcO) = jax.lax.scan(
        step, state0_BKGEO, [jnp.moveaxis(t, 1, 0) for t in (chunk_decay_BtKG, u_BtKGcO, w_BtKGcE, kend_BtKGcE)]
    )

    # 3. outputs: the incoming state read by the decayed queries, plus the chunk's own new values
    new_BtKGcO, incoming_BtKGEO = jnp.moveaxis(new_tBKGcO, 0, 1), jnp.moveaxis(incoming_tBKGEO, 0, 1)
    o_BtcKGO = intra.output(q_BtcKE, k_BtcKE, new_BtKGcO, incoming_BtKGEO, cum_BtKGc, doc_Btc)
    o_BSHO = o_BtcKGO.reshape(Bsz, -1, H, vdim)[:, :S]
    return o_BSHO.astype(v_BSHO.dtype), final_BKGEO.reshape(Bsz, H, E, vdim)


def gated_delta_step(q_BKE, k_BKE, v_BHO, g_BH, beta_BH, state_BHEO, *, normalize_qk: bool = False):
    """One token of the recurrence, O(1) in the position -> (o_BHO in v's dtype, state_BHEO in fp32)."""
    H, K = v_BHO.shape[1], k_BKE.shape[1]
    q_BKE, k_BKE, g_BH, beta_BH = _inputs(q_BKE, k_BKE, g_BH, beta_BH, normalize_qk)
    q_BHE, k_BHE = jnp.repeat(q_BKE, H // K, axis=1), jnp.repeat(k_BKE, H // K, axis=1)
    state_BHEO = jnp.exp(g_BH)[..., None, None] * state_BHEO.astype(F32)
    predicted_BHO = jnp.einsum("bhkv,bhk->bhv", state_BHEO, k_BHE)
    delta_BHO = beta_BH[..., None] * (v_BHO.astype(F32) - predicted_BHO)
    state_BHEO = state_BHEO + jnp.einsum("bhk,bhv->bhkv", k_BHE, delta_BHO)
    return jnp.einsum("bhkv,bhk->bhv", state_BHEO, q_BHE).astype(v_BHO.dtype), state_BHEO


def summarize(q_BSKE, k_BSKE, v_BSHO, g_BSH, beta_BSH, **rule):
    """A piece's (transition_BHEE, state_from_zero_BHEO): all `combine` needs to chain pieces.

    `rule`: `gated_delta`'s keywords (chunk, normalize_qk, segment_ids_BS, segment_id_before_B, intra); the
    piece runs from the state [0 | I] (no initial_state_BHEO of its own).
    """
    Bsz, S, H, vdim = v_BSHO.shape
    E = k_BSKE.shape[-1]
    # the columns of the state evolve independently: E extra zero-valued columns started at the identity
    # come out as the transition itself
    v_BSHv = jnp.concatenate([v_BSHO.astype(F32), jnp.zeros((Bsz, S, H, E), F32)], axis=-1)
    eye_BHEE = jnp.broadcast_to(jnp.eye(E, dtype=F32), (Bsz, H, E, E))
    init_BHEv = jnp.concatenate([jnp.zeros((Bsz, H, E, vdim), F32), eye_BHEE], axis=-1)
    _, final_BHEv = gated_delta(q_BSKE, k_BSKE, v_BSHv, g_BSH, beta_BSH, initial_state_BHEO=init_BHEv, **rule)
    return final_BHEv[..., vdim:], final_BHEv[..., :vdim]


def combine(transition_BHEE, state_in_BHEO, state_from_zero_BHEO):
    """The state leaving a piece, given the state entering it and the piece's summary."""
    return jnp.einsum("bhkj,bhjv->bhkv", transition_BHEE, state_in_BHEO.astype(F32)) + state_from_zero_BHEO
