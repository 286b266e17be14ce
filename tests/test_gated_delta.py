"""The chunked gated delta rule (nopejax/mixers/gated_delta.py) against a plain token-by-token recurrence.

Reference, as transformers' `torch_recurrent_gated_delta_rule`: q, k L2-normalised, q / sqrt(K), then per
token  S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q.
Tiny odd sizes: 2 key heads serving 6 value heads, key dim 5, value dim 3, S = 13 with chunks that do and
do not divide it; beta in (0, 1) and in (0, 2) (negative eigenvalues).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mixer_checks import check_gradient_memory_is_linear, check_gradients_match, check_packed_scan, check_pieces_combine

from nopejax.mixers import gated_delta as gd

# jitted: one compile per shape instead of one per primitive
gated_delta = jax.jit(gd.gated_delta, static_argnames=("chunk", "normalize_qk"))
summarize = jax.jit(gd.summarize, static_argnames=("chunk", "normalize_qk"))
step = jax.jit(gd.gated_delta_step, static_argnames="normalize_qk")

Bsz, G, H, K, V = 2, 2, 6, 5, 3


def inputs(S, seed=0, batch=Bsz, neg_eigval=False):
    ks = jax.random.split(jax.random.key(seed), 6)
    return dict(
        q_BSKE=jax.random.normal(ks[0], (batch, S, G, K)),
        k_BSKE=jax.random.normal(ks[1], (batch, S, G, K)),
        v_BSHO=jax.random.normal(ks[2], (batch, S, H, V)),
        g_BSH=-jax.nn.softplus(jax.random.normal(ks[3], (batch, S, H))),
        beta_BSH=jax.nn.sigmoid(jax.random.normal(ks[4], (batch, S, H))) * (2.0 if neg_eigval else 1.0),
        initial_state_BHEO=jax.random.normal(ks[5], (batch, H, K, V)),
    )


def recurrence(q_BSKE, k_BSKE, v_BSHO, g_BSH, beta_BSH, initial_state_BHEO):
    def norm(x):
        return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)

    q_BSHK = jnp.repeat(norm(q_BSKE), H // G, axis=2) / jnp.sqrt(K)
    k_BSHK = jnp.repeat(norm(k_BSKE), H // G, axis=2)

    def tok(s_BHKV, t):
        q, k, v, g, beta = t
        s_BHKV = jnp.exp(g)[..., None, None] * s_BHKV
        delta_BHV = beta[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", s_BHKV, k))
        s_BHKV = s_BHKV + k[..., None] * delta_BHV[..., None, :]
        return s_BHKV, jnp.einsum("bhkv,bhk->bhv", s_BHKV, q)

    seq = [jnp.moveaxis(t, 1, 0) for t in (q_BSHK, k_BSHK, v_BSHO, g_BSH, beta_BSH)]
    final, o_SBHV = jax.lax.scan(tok, initial_state_BHEO, seq)
    return jnp.moveaxis(o_SBHV, 0, 1), final


def _chunked(chunk):
    return lambda *a: gated_delta(*a[:5], chunk=chunk, normalize_qk=True, initial_state_BHEO=a[5])


@pytest.mark.parametrize("chunk, neg_eigval", [(4, False), (5, True), (13, False), (16, True)])
def test_forward_matches_recurrence(chunk, neg_eigval):
    args = tuple(inputs(13, neg_eigval=neg_eigval).values())
    o, final = _chunked(chunk)(*args)
    o_ref, final_ref = jax.jit(recurrence)(*args)
    np.testing.assert_allclose(o, o_ref, atol=3e-6, rtol=0)
    np.testing.assert_allclose(final, final_ref, atol=3e-6, rtol=0)


@pytest.mark.parametrize("chunk, neg_eigval", [(4, True), (5, False)])
def test_gradients_match_recurrence(chunk, neg_eigval):
    check_gradients_match(_chunked(chunk), recurrence, inputs(13, neg_eigval=neg_eigval), tol=3e-6)


def test_step_matches_recurrence():
    args = inputs(3)
    o_ref, final_ref = jax.jit(recurrence)(*args.values())
    state = args["initial_state_BHEO"]
    for t in range(3):
        piece = [args[k][:, t] for k in ("q_BSKE", "k_BSKE", "v_BSHO", "g_BSH", "beta_BSH")]
        o, state = step(*piece, state, normalize_qk=True)
        np.testing.assert_allclose(o, o_ref[:, t], atol=1e-6, rtol=0)
    np.testing.assert_allclose(state, final_ref, atol=1e-6, rtol=0)


def _alone(args, b, start, stop, chunk):
    piece = {k: v[b : b + 1, start:stop] for k, v in args.items()}
    return gated_delta(**piece, chunk=chunk, normalize_qk=True)


def test_packed_row_equals_documents_alone(chunk=4):
    # row 0: documents of 4, 4 (boundaries on chunk edges) and 5 tokens, then 4 of padding;
    # row 1: 2 of left padding, then three documents of 5 (boundaries inside chunks);
    # two document lengths, so the documents alone compile twice
    docs = [[(1, 0, 4), (2, 4, 8), (3, 8, 13)], [(5, 2, 7), (6, 7, 12), (7, 12, 17)]]
    args = inputs(17, neg_eigval=True)
    del args["initial_state_BHEO"]
    run = lambda seg: gated_delta(**args, chunk=chunk, normalize_qk=True, segment_ids_BS=seg)
    check_packed_scan(run, lambda b, start, stop: _alone(args, b, start, stop, chunk), docs, 17, atol=3e-6)


@pytest.mark.parametrize("cuts", [(8,), (4, 8, 12)])
def test_pieces_combine_to_the_whole(cuts):
    # documents 1 (0..6), 2 (7..11, starting inside a piece), 3 (12..15, starting exactly on the last cut);
    # pieces of equal length, as context shards are
    seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 5 + [3] * 4], Bsz, 0), jnp.int32)
    args = inputs(16, neg_eigval=True)
    q, k, v, g, beta, state_in = args.values()
    whole = gated_delta(q, k, v, g, beta, chunk=4, normalize_qk=True, segment_ids_BS=seg, initial_state_BHEO=state_in)

    def piece(a, b):
        segments = dict(segment_ids_BS=seg[:, a:b], segment_id_before_B=None if a == 0 else seg[:, a - 1])
        return [t[:, a:b] for t in (q, k, v, g, beta)], dict(chunk=4, normalize_qk=True, **segments)

    def summarize_piece(a, b):  # on its own, as a context shard would
        inputs_, rule = piece(a, b)
        return summarize(*inputs_, **rule)

    def run_piece(a, b, state):
        inputs_, rule = piece(a, b)
        return gated_delta(*inputs_, initial_state_BHEO=state, **rule)

    check_pieces_combine(whole, summarize_piece, run_piece, gd.combine, state_in, (0, *cuts, 16), atol=3e-6)


def test_bf16_inputs_keep_an_fp32_state():
    args = inputs(13)
    low = {name: t.astype(jnp.bfloat16) for name, t in args.items()}
    o, final = gated_delta(**low, chunk=4, normalize_qk=True)
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    _, final_ref = jax.jit(recurrence)(*(t.astype(jnp.float32) for t in low.values()))
    np.testing.assert_allclose(final, final_ref, atol=3e-6, rtol=0)


def test_gradient_memory_is_linear_in_sequence():
    def one_row(S):
        args = inputs(S, batch=1)
        del args["initial_state_BHEO"]
        return args

    check_gradient_memory_is_linear(functools.partial(gd.gated_delta, chunk=8, normalize_qk=True), one_row)


@pytest.mark.parametrize("c", [1, 2, 5, 32, 48])
def test_unit_lower_inverse_matches_float64(c):
    """(I + A)^-1 from matmuls, on A as the rule builds it (beta in (0, 2), unit keys, decays <= 1), against
    numpy's float64 inverse; c = 5 and 48 are padded to the next power of two. Measured: 3.3e-8."""
    rng = np.random.default_rng(c)
    k_acE = rng.normal(size=(4, c, 8))
    k_acE /= np.linalg.norm(k_acE, axis=-1, keepdims=True)
    beta_ac1 = rng.uniform(0, 2, (4, c, 1))
    cum_ac = np.cumsum(-np.log1p(np.exp(rng.normal(size=(4, c)))), axis=-1)
    decay_acJ = np.exp(np.minimum(cum_ac[:, :, None] - cum_ac[:, None, :], 0.0))
    A_acJ = np.tril(beta_ac1 * (k_acE @ k_acE.transpose(0, 2, 1)) * decay_acJ, -1)
    T_acJ = np.asarray(jax.jit(gd.unit_lower_inverse)(jnp.asarray(A_acJ, jnp.float32)))
    assert not np.triu(T_acJ, 1).any()
    np.testing.assert_allclose(T_acJ, np.linalg.inv(np.eye(c) + A_acJ), atol=2e-7, rtol=0)


def test_rule_and_its_gradient_lower_to_no_triangular_solve():
    """On CPU a triangular solve is jaxlib's LAPACK custom call, which splits its batch over XLA's intra-op
    pool and waits on it from a thread of that same pool: with every pool thread running a device's copy
    of the call (8 test devices), none is left to run the parts and the step hangs at 0 % CPU."""
    args = inputs(13)
    loss = lambda *a: jnp.sum(_chunked(4)(*a)[0])
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args.values()).as_text()
    assert "dot_general" in text and "triangular_solve" not in text and "lapack" not in text  # CPU: lapack_strsm_ffi
