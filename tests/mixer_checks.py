"""Checks every sequence mixer (nopejax/mixers/) must pass, written once: a chunked scan's gradients equal
its recurrence's, a packed row equals its documents run alone (the layer, `check_packed_row`, and its
chunked scan, `check_packed_scan`), decode steps equal the chunked forward, a left-padded prefill equals
the prompt alone.

`forward(p, h_BSD, d, segment_ids_BS=None, cache=None) -> (y_BSD, cache)` and
`step(p, h_BD, d, cache) -> (y_BD, cache)` are the mixer's jitted functions; `state(cache)` picks its
recurrent state. Rows of 13 tokens: longer than the tests' chunk of 4, not a multiple of it.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def check_gradients_match(chunked, recurrence, args: dict, *, tol: float):
    """Through a random projection of (out, final state), every input's gradient in the chunked scan
    equals the plain recurrence's, within `tol` times the largest reference gradient of that input."""
    values = tuple(args.values())
    out, final = jax.eval_shape(chunked, *values)
    ko, kf = jax.random.split(jax.random.key(1))
    wo, wf = jax.random.normal(ko, out.shape), jax.random.normal(kf, final.shape)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a)[0] * wo) + jnp.sum(fn(*a)[1] * wf)

    grads = jax.jit(jax.grad(loss(chunked), argnums=range(len(values))))(*values)
    grads_ref = jax.jit(jax.grad(loss(recurrence), argnums=range(len(values))))(*values)
    for name, g, g_ref in zip(args, grads, grads_ref):
        scale = float(jnp.max(jnp.abs(g_ref)))
        np.testing.assert_allclose(g, g_ref, atol=tol * scale, rtol=0, err_msg=name)


def check_gradient_memory_is_linear(scan, inputs):
    """The backward pass's temporary memory grows about 4x for 4x the length (an S x S term would give
    about 16x). `scan(segment_ids_BS=..., **inputs) -> (out, final)`; `inputs(S)` one row's inputs
    without an initial state."""

    def temp_bytes(S):
        args, seg = inputs(S), jnp.ones((1, S), jnp.int32)

        def loss(a):
            return jnp.sum(scan(**a, segment_ids_BS=seg)[0])

        return jax.jit(jax.grad(loss)).lower(args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(256), temp_bytes(1024)
    assert 3 < large / small < 5, (small, large)


def segment_ids(docs, length: int) -> np.ndarray:
    """[rows, length] int32 from (document id, start, stop) per document of each row; 0 (padding) elsewhere."""
    seg = np.zeros((len(docs), length), np.int32)
    for b, row in enumerate(docs):
        for doc, start, stop in row:
            seg[b, start:stop] = doc
    return seg


def check_packed_scan(run, alone, docs, length: int, *, atol: float):
    """A chunked scan over packed rows equals each document alone, outputs and final state (padding after
    a row's last document leaves its state). `run(segment_ids_BS) -> (out, final)` takes the whole rows,
    `alone(b, start, stop) -> (out, final)` one document."""
    out, final = run(jnp.asarray(segment_ids(docs, length)))
    for b, row in enumerate(docs):
        for _, start, stop in row:
            out_doc, final_doc = alone(b, start, stop)
            np.testing.assert_allclose(out[b : b + 1, start:stop], out_doc, atol=atol, rtol=0)
        np.testing.assert_allclose(final[b : b + 1], final_doc, atol=atol, rtol=0)


def check_pieces_combine(whole, summarize_piece, run_piece, combine, state_in, bounds, *, atol: float):
    """A row cut at `bounds` into pieces (as context shards are), each summarised alone and chained by
    `combine`, gives the whole row's final state, and each piece run from the chained state gives its part
    of the whole row's output. `whole = (out, final)` from `state_in`; `summarize_piece(a, b)` is the
    piece's (decay or transition, state from zero); `run_piece(a, b, state_in) -> (out, final)`."""
    out, final = whole
    outs = []
    for a, b in itertools.pairwise(bounds):
        decay, state_from_zero = summarize_piece(a, b)
        out_piece, final_piece = run_piece(a, b, state_in)
        state_in = combine(decay, state_in, state_from_zero)
        np.testing.assert_allclose(final_piece, state_in, atol=atol, rtol=0)
        outs.append(out_piece)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), out, atol=atol, rtol=0)
    np.testing.assert_allclose(state_in, final, atol=atol, rtol=0)


def check_packed_row(forward, p, d, width: int, state, *, atol: float, state_atol: float):
    # row 0: documents of 5 and 6 tokens, then 2 of padding; row 1: 3 of left padding, then 10 tokens
    docs = [[(1, 0, 5), (2, 5, 11)], [(1, 3, 13)]]
    seg = segment_ids(docs, 13)
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
