"""The chunked SSD scan (nopejax/mixers/ssd.py) against a plain sequential recurrence written here.

Reference: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t h_t + D x_t, one token at a time.
Tiny odd sizes: 6 heads in 2 groups, head dim 3, state 5, S = 13 with chunks that do and do not
divide it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mixer_checks import check_gradient_memory_is_linear, check_gradients_match, check_packed_scan, check_pieces_combine

from nopejax.mixers import ssd as ssd_module

# jitted: one compile per shape instead of one per primitive
ssd = jax.jit(ssd_module.ssd, static_argnames="chunk")
summarize = jax.jit(ssd_module.summarize, static_argnames="chunk")
combine = ssd_module.combine

Bsz, H, G, P, N = 2, 6, 2, 3, 5


def inputs(S, seed=0, batch=Bsz):
    ks = jax.random.split(jax.random.key(seed), 7)
    return dict(
        x_BSHO=jax.random.normal(ks[0], (batch, S, H, P)),
        dt_BSH=jax.nn.softplus(jax.random.normal(ks[1], (batch, S, H)) - 1.0),
        A_H=-jnp.exp(jax.random.normal(ks[2], (H,))),
        B_BSKE=jax.random.normal(ks[3], (batch, S, G, N)),
        C_BSKE=jax.random.normal(ks[4], (batch, S, G, N)),
        D_H=jax.random.normal(ks[5], (H,)),
        initial_state_BHOE=jax.random.normal(ks[6], (batch, H, P, N)),
    )


def recurrence(x_BSHO, dt_BSH, A_H, B_BSKE, C_BSKE, D_H, initial_state_BHOE):
    B_BSHN = jnp.repeat(B_BSKE, H // G, axis=2)
    C_BSHN = jnp.repeat(C_BSKE, H // G, axis=2)

    def step(h_BHPN, t):
        x_BHP, dt_BH, B_BHN, C_BHN = t
        h_BHPN = jnp.exp(dt_BH * A_H)[..., None, None] * h_BHPN + jnp.einsum("bh,bhp,bhn->bhpn", dt_BH, x_BHP, B_BHN)
        return h_BHPN, jnp.einsum("bhpn,bhn->bhp", h_BHPN, C_BHN) + D_H[:, None] * x_BHP

    seq = [jnp.moveaxis(t, 1, 0) for t in (x_BSHO, dt_BSH, B_BSHN, C_BSHN)]
    final, y_SBHP = jax.lax.scan(step, initial_state_BHOE, seq)
    return jnp.moveaxis(y_SBHP, 0, 1), final


def _chunked(chunk):
    return lambda *args: ssd(*args[:5], chunk=chunk, D_H=args[5], initial_state_BHOE=args[6])


@pytest.mark.parametrize("chunk", [4, 5, 13, 16])
def test_forward_matches_recurrence(chunk):
    args = tuple(inputs(13).values())
    y, final = _chunked(chunk)(*args)
    y_ref, final_ref = jax.jit(recurrence)(*args)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(final, final_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [4, 5, 16])
def test_gradients_match_recurrence(chunk):
    check_gradients_match(_chunked(chunk), recurrence, inputs(13), tol=1e-5)


def _alone(args, b, start, stop, chunk):
    piece = {k: v[b : b + 1, start:stop] for k, v in args.items() if k not in ("A_H", "D_H", "initial_state_BHOE")}
    return ssd(**piece, A_H=args["A_H"], D_H=args["D_H"], chunk=chunk)


@pytest.mark.parametrize("chunk", [4, 5])
def test_packed_row_equals_documents_alone(chunk):
    # row 0: documents of 4 (a boundary on a chunk edge), 6, 3 tokens, then 4 of padding;
    # row 1: 2 of left padding, then documents of 7 and 8
    docs = [[(1, 0, 4), (2, 4, 10), (3, 10, 13)], [(5, 2, 9), (6, 9, 17)]]
    args = inputs(17)
    del args["initial_state_BHOE"]
    run = lambda seg: ssd(**args, chunk=chunk, segment_ids_BS=seg)
    check_packed_scan(run, lambda b, start, stop: _alone(args, b, start, stop, chunk), docs, 17, atol=1e-5)


@pytest.mark.parametrize("cuts", [(9,), (3, 8, 12)])
def test_pieces_combine_to_the_whole(cuts):
    # documents 1 (0..6), 2 (7..11, starting inside a piece), 3 (12..16, starting exactly on the last cut)
    seg = jnp.asarray(np.repeat([[1] * 7 + [2] * 5 + [3] * 5], Bsz, 0), jnp.int32)
    args = inputs(17)
    x, dt, A, B, C, D, state_in = args.values()
    whole = ssd(x, dt, A, B, C, chunk=4, D_H=D, segment_ids_BS=seg, initial_state_BHOE=state_in)

    def segments(a, b):
        return dict(segment_ids_BS=seg[:, a:b], segment_id_before_B=None if a == 0 else seg[:, a - 1])

    def summarize_piece(a, b):  # on its own, as a context shard would
        return summarize(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], chunk=4, **segments(a, b))

    def run_piece(a, b, state):
        return ssd(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], chunk=4, D_H=D, initial_state_BHOE=state,
                   **segments(a, b))  # fmt: skip

    check_pieces_combine(whole, summarize_piece, run_piece, combine, state_in, (0, *cuts, 17), atol=1e-5)


def test_gradient_memory_is_linear_in_sequence():
    def one_row(S):
        args = inputs(S, batch=1)
        del args["initial_state_BHOE"]
        return args

    check_gradient_memory_is_linear(functools.partial(ssd_module.ssd, chunk=8), one_row)
