"""The gated delta rule of Gated DeltaNet in chunked WY (UT transform) form: intra-chunk matmuls and one
triangular solve per chunk, a recurrence over chunk states.

Source: Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule";
flash-linear-attention's `chunk_gated_delta_rule`. Numerical reference: transformers'
`torch_recurrent_gated_delta_rule` / `torch_chunk_gated_delta_rule` (Qwen3-Next, OLMo Hybrid).

Shape letters: B batch, S sequence, G query/key heads, H value heads (each key head serves the
R = H / G consecutive value heads, transformers' `repeat_interleave`), K key head dim, V value head
dim, C chunks, L and M positions inside one chunk (Q long).

The recurrence, per value head, with q scaled by 1/sqrt(K) (after an L2 norm of q and k where
`normalize_qk`, transformers' `use_qk_l2norm_in_kernel`) and g_t <= 0:
    state_t = exp(g_t) (I - beta_t k_t k_t^T) state_{t-1} + beta_t k_t v_t^T      [K, V]
    o_t     = state_t^T q_t                                                        [V]
Chunked: the Q delta updates of a chunk are condensed by the UT transform T = (I + A)^-1, A the
strictly lower [L, M] matrix beta_l (k_l . k_m) exp(g_{m+1} + ... + g_l): u = T (beta v) are the
chunk's values and w = T (beta k exp(g_1 + ... + g_l)) the keys that read the incoming state; the
new values written are u - w state_in. A `lax.scan` over the C chunk states carries the state;
memory is O(S Q), never S x S, so autodiff needs no rematerialisation to stay linear in S. States,
decays and the solve are fp32 whatever the input dtype.

Packed documents: a token whose segment id differs from the previous one and is not 0 starts a
document, where the state resets (as if g were -inf there: every decay across a start is 0).
Padding (segment id 0) gets g = 0 and beta = 0, so it leaves the state as it is.

Context parallelism: the state leaving a piece is linear in the state entering it,
    state_out = transition @ state_in + state_from_zero        (transition [K, K] per head)
with transition = prod_t exp(g_t) (I - beta_t k_t k_t^T) (0 if a document starts in the piece).
Each column of the state evolves alone, so `summarize` gets both from one run over values padded
with K zero columns from the initial state [0 | I]; `combine` chains pieces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nopejax.mixers.ssd import document_starts

F32 = jnp.float32


def l2norm(x, eps=1e-6):
    """x / sqrt(|x|^2 + eps) over the last axis, in fp32 (transformers' and FLA's `l2norm`)."""
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _inputs(q_XGK, k_XGK, g_XH, beta_XH, normalize_qk):
    """q, k in fp32, normalised where asked, q scaled by 1/sqrt(K); g and beta in fp32."""
    q_XGK, k_XGK = q_XGK.astype(F32), k_XGK.astype(F32)
    if normalize_qk:
        q_XGK, k_XGK = l2norm(q_XGK), l2norm(k_XGK)
    return q_XGK * q_XGK.shape[-1] ** -0.5, k_XGK, g_XH.astype(F32), beta_XH.astype(F32)


def gated_delta(
    q_BSGK,
    k_BSGK,
    v_BSHV,
    g_BSH,
    beta_BSH,
    *,
    chunk: int,
    normalize_qk: bool = False,
    segment_ids_BS=None,
    segment_id_before_B=None,
    initial_state_BHKV=None,
):
    """The rule over S positions -> (o_BSHV in v's dtype, final_state_BHKV in fp32).

    g is the log decay (<= 0), beta the write strength (in (0, 1), or (0, 2) with negative eigenvalues).
    S need not be a multiple of `chunk`: the tail is padded with g = 0, beta = 0 (state unmoved) and cut off.
    `segment_id_before_B` is the id of the token before position 0 (the previous piece's last one).
    """
    Bsz, S, G, K = k_BSGK.shape
    H, V = v_BSHV.shape[-2:]
    if H % G or chunk < 1:
        raise ValueError(f"gated_delta: value heads={H} must be a multiple of key heads={G}, chunk={chunk} at least 1")
    R = H // G
    Q = min(chunk, S)
    pad = -S % Q
    Cn = (S + pad) // Q

    q_BSGK, k_BSGK, g_BSH, beta_BSH = _inputs(q_BSGK, k_BSGK, g_BSH, beta_BSH, normalize_qk)
    if segment_ids_BS is None:
        start_BS = jnp.zeros((Bsz, S), bool)
    else:
        real_BS1 = (segment_ids_BS != 0)[..., None]
        g_BSH, beta_BSH = jnp.where(real_BS1, g_BSH, 0.0), jnp.where(real_BS1, beta_BSH, 0.0)
        start_BS = document_starts(segment_ids_BS, segment_id_before_B)

    def chunks(t, fill=0.0):  # [B, S, ...] -> [B, C, Q, ...], padded at the end
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2), constant_values=fill)
        return t.reshape(Bsz, Cn, Q, *t.shape[2:])

    q_BCLGK, k_BCLGK = chunks(q_BSGK), chunks(k_BSGK)
    v_BCLGRV = chunks(v_BSHV.astype(F32)).reshape(Bsz, Cn, Q, G, R, V)
    g_BCGRL = jnp.moveaxis(chunks(g_BSH).reshape(Bsz, Cn, Q, G, R), 2, -1)
    beta_BCGRL = jnp.moveaxis(chunks(beta_BSH).reshape(Bsz, Cn, Q, G, R), 2, -1)
    start_BCL = chunks(start_BS, False)

    # decays inside a chunk; a document start makes every decay across it 0
    doc_BCL = jnp.cumsum(start_BCL, axis=-1)  # l and m share a document iff their counts are equal
    cum_BCGRL = jnp.cumsum(g_BCGRL, axis=-1)
    causal_LM = jnp.tril(jnp.ones((Q, Q), bool))
    same_BC11LM = ((doc_BCL[..., :, None] == doc_BCL[..., None, :]) & causal_LM)[:, :, None, None]
    pair_BCGRLM = jnp.exp(jnp.where(same_BC11LM, cum_BCGRL[..., :, None] - cum_BCGRL[..., None, :], -jnp.inf))
    no_start_BC11L = (doc_BCL == 0)[:, :, None, None]
    from_start_BCGRL = jnp.exp(jnp.where(no_start_BC11L, cum_BCGRL, -jnp.inf))
    to_end_BCGRL = jnp.exp(
        jnp.where((doc_BCL == doc_BCL[..., -1:])[:, :, None, None], cum_BCGRL[..., -1:] - cum_BCGRL, -jnp.inf)
    )
    chunk_decay_BCGR = from_start_BCGRL[..., -1]

    # 1. the UT transform: solve (I + A) [u | w] = [beta v | beta k exp(cum)] per chunk and head
    kk_BCGLM = jnp.einsum("bclgk,bcmgk->bcglm", k_BCLGK, k_BCLGK)
    A_BCGRLM = beta_BCGRL[..., :, None] * kk_BCGLM[:, :, :, None] * pair_BCGRLM
    A_BCGRLM = jnp.where(jnp.tril(jnp.ones((Q, Q), bool), -1), A_BCGRLM, 0.0) + jnp.eye(Q, dtype=F32)
    k_BCGRLK = jnp.moveaxis(k_BCLGK, 2, -2)[:, :, :, None]
    rhs_BCGRLX = jnp.concatenate(
        [
            beta_BCGRL[..., None] * jnp.moveaxis(v_BCLGRV, 2, -2),
            (beta_BCGRL * from_start_BCGRL)[..., None] * k_BCGRLK,
        ],
        axis=-1,
    )
    uw_BCGRLX = jax.lax.linalg.triangular_solve(A_BCGRLM, rhs_BCGRLX, left_side=True, lower=True, unit_diagonal=True)
    u_BCGRLV, w_BCGRLK = uw_BCGRLX[..., :V], uw_BCGRLX[..., V:]

    # 2. the scan over chunks: new values u - w state_in, state_out = decay state_in + k~^T (new values)
    kend_BCGRLK = to_end_BCGRL[..., None] * k_BCGRLK

    def step(state_BGRKV, inputs):
        decay_BGR, u_BGRLV, w_BGRLK, kend_BGRLK = inputs
        new_BGRLV = u_BGRLV - jnp.einsum("bgrlk,bgrkv->bgrlv", w_BGRLK, state_BGRKV)
        out_BGRKV = decay_BGR[..., None, None] * state_BGRKV + jnp.einsum("bgrlk,bgrlv->bgrkv", kend_BGRLK, new_BGRLV)
        return out_BGRKV, (state_BGRKV, new_BGRLV)

    state0_BGRKV = (
        jnp.zeros((Bsz, G, R, K, V), F32)
        if initial_state_BHKV is None
        else initial_state_BHKV.astype(F32).reshape(Bsz, G, R, K, V)
    )
    final_BGRKV, (incoming_CBGRKV, new_CBGRLV) = jax.lax.scan(
        step, state0_BGRKV, [jnp.moveaxis(t, 1, 0) for t in (chunk_decay_BCGR, u_BCGRLV, w_BCGRLK, kend_BCGRLK)]
    )

    # 3. outputs: the incoming state read by the decayed queries, plus the chunk's own new values
    scores_BCGLM = jnp.einsum("bclgk,bcmgk->bcglm", q_BCLGK, k_BCLGK)
    o_BCLGRV = jnp.einsum("bclgk,bcgrl,cbgrkv->bclgrv", q_BCLGK, from_start_BCGRL, incoming_CBGRKV)
    o_BCLGRV += jnp.einsum("bcglm,bcgrlm,cbgrmv->bclgrv", scores_BCGLM, pair_BCGRLM, new_CBGRLV)
    o_BSHV = o_BCLGRV.reshape(Bsz, Cn * Q, H, V)[:, :S]
    return o_BSHV.astype(v_BSHV.dtype), final_BGRKV.reshape(Bsz, H, K, V)


def gated_delta_step(q_BGK, k_BGK, v_BHV, g_BH, beta_BH, state_BHKV, *, normalize_qk: bool = False):
    """One token of the recurrence, O(1) in the position -> (o_BHV in v's dtype, state_BHKV in fp32)."""
    H, G = v_BHV.shape[1], k_BGK.shape[1]
    q_BGK, k_BGK, g_BH, beta_BH = _inputs(q_BGK, k_BGK, g_BH, beta_BH, normalize_qk)
    q_BHK, k_BHK = jnp.repeat(q_BGK, H // G, axis=1), jnp.repeat(k_BGK, H // G, axis=1)
    state_BHKV = jnp.exp(g_BH)[..., None, None] * state_BHKV.astype(F32)
    predicted_BHV = jnp.einsum("bhkv,bhk->bhv", state_BHKV, k_BHK)
    delta_BHV = beta_BH[..., None] * (v_BHV.astype(F32) - predicted_BHV)
    state_BHKV = state_BHKV + jnp.einsum("bhk,bhv->bhkv", k_BHK, delta_BHV)
    return jnp.einsum("bhkv,bhk->bhv", state_BHKV, q_BHK).astype(v_BHV.dtype), state_BHKV


def summarize(
    q_BSGK,
    k_BSGK,
    v_BSHV,
    g_BSH,
    beta_BSH,
    *,
    chunk: int,
    normalize_qk: bool = False,
    segment_ids_BS=None,
    segment_id_before_B=None,
):
    """A piece's (transition_BHKK, state_from_zero_BHKV): all `combine` needs to chain pieces."""
    Bsz, S, H, V = v_BSHV.shape
    K = k_BSGK.shape[-1]
    # the columns of the state evolve independently: K extra zero-valued columns started at the identity
    # come out as the transition itself
    v_BSHX = jnp.concatenate([v_BSHV.astype(F32), jnp.zeros((Bsz, S, H, K), F32)], axis=-1)
    eye_BHKK = jnp.broadcast_to(jnp.eye(K, dtype=F32), (Bsz, H, K, K))
    init_BHKX = jnp.concatenate([jnp.zeros((Bsz, H, K, V), F32), eye_BHKK], axis=-1)
    _, final_BHKX = gated_delta(
        q_BSGK,
        k_BSGK,
        v_BSHX,
        g_BSH,
        beta_BSH,
        chunk=chunk,
        normalize_qk=normalize_qk,
        segment_ids_BS=segment_ids_BS,
        segment_id_before_B=segment_id_before_B,
        initial_state_BHKV=init_BHKX,
    )
    return final_BHKX[..., V:], final_BHKX[..., :V]


def combine(transition_BHKK, state_in_BHKV, state_from_zero_BHKV):
    """The state leaving a piece, given the state entering it and the piece's summary."""
    return jnp.einsum("bhkj,bhjv->bhkv", transition_BHKK, state_in_BHKV.astype(F32)) + state_from_zero_BHKV
