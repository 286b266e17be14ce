"""Checks every sequence mixer (nopejax/mixers/) must pass, written once: a packed row equals its documents
run alone, decode steps equal the chunked forward, a left-padded prefill equals the prompt alone.

`forward(p, h_BSD, d, segment_ids_BS=None, cache=None) -> (y_BSD, cache)` and
`step(p, h_BD, d, cache) -> (y_BD, cache)` are the mixer's jitted functions; `state(cache)` picks its
recurrent state. Rows of 13 tokens: longer than the tests' chunk of 4, not a multiple of it.
"""

import jax
import jax.numpy as jnp
import numpy as np


def check_packed_row(forward, p, d, width: int, state, *, atol: float, state_atol: float):
    # row 0: documents of 5 and 6 tokens, then 2 of padding; row 1: 3 of left padding, then 10 tokens
    docs = [[(1, 0, 5), (2, 5, 11)], [(1, 3, 13)]]
    seg = np.zeros((2, 13), np.int32)
    for b, row in enumerate(docs):
        for doc, start, stop in row:
            seg[b, start:stop] = doc
    h = jax.random.normal(jax.random.key(1), (2, 13, width))
    y, cache = forward(p, h, d, segment_ids_BS=jnp.asarray(seg))
    for b, row in enumerate(docs):
        for _, start, stop in row:
            y_doc, cache_doc = forward(p, h[b : b + 1, start:stop], d)
            np.testing.assert_allclose(y[b : b + 1, start:stop], y_doc, atol=atol, rtol=0)
    # the state after right padding is the last document's
    np.testing.assert_allclose(state(cache)[1:], state(cache_doc), atol=state_atol, rtol=0)


def check_decode_steps(forward, step, p, d, width: int, *, atol: float):
    h = jax.random.normal(jax.random.key(2), (2, 13, width))
    want, _ = forward(p, h, d)
    # prefill 9 tokens in two calls (5 + 4, the cache carried between), then 4 single steps
    y0, cache = forward(p, h[:, :5], d)
    y1, cache = forward(p, h[:, 5:9], d, cache=cache)
    ys = [y0, y1]
    for t in range(9, 13):
        y_t, cache = step(p, h[:, t], d, cache)
        ys.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), want, atol=atol, rtol=0)


def check_left_padded_prefill(forward, step, p, d, width: int, prefill_cuts, *, atol: float):
    # a 2-token prompt behind 6 of padding, prefilled at once or in two calls (the second starting
    # exactly at the prompt): neither the conv window nor the state may carry padding into the prompt
    h = jax.random.normal(jax.random.key(3), (1, 12, width))
    seg = jnp.asarray([[0] * 6 + [1] * 2], jnp.int32)
    cache = None
    for a, b in zip((0, *prefill_cuts[:-1]), prefill_cuts):
        y, cache = forward(p, h[:, a:b], d, segment_ids_BS=seg[:, a:b], cache=cache)
    outs = [y[:, -2:]]
    for t in range(8, 12):
        y_t, cache = step(p, h[:, t], d, cache)
        outs.append(y_t[:, None])
    want, _ = forward(p, h[:, 6:], d)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=atol, rtol=0)
