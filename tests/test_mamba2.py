"""The Mamba2 mixer layer (nopejax/mixers/mamba2.py) against transformers' Mamba2Mixer torch path,
on packed documents, and its decode step against the chunked forward.

Tiny odd sizes: width 9, 6 heads of 3 in 2 groups, state 5, conv kernel 4, chunk 4, rows of 13
(longer than the chunk, not a multiple of it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from nopejax.mixers import mamba2 as m

LIMIT = (0.05, 0.4)
DIMS = m.Mamba2Dims(d_model=9, heads=6, head_dim=3, groups=2, state=5, conv_kernel=4, chunk=4, time_step_limit=LIMIT)

forward = jax.jit(m.mamba2, static_argnames="d")
step = jax.jit(m.mamba2_step, static_argnames="d")


def hf_mixer(use_bias: bool):
    torch.manual_seed(0)
    config = Mamba2Config(
        hidden_size=9, num_heads=6, head_dim=3, expand=2, n_groups=2, state_size=5, conv_kernel=4, chunk_size=4,
        time_step_limit=LIMIT, use_bias=use_bias, use_conv_bias=True, num_hidden_layers=1, vocab_size=7,
    )  # fmt: skip
    mixer = Mamba2Mixer(config, layer_idx=0).eval()
    with torch.no_grad():  # random everything, so no weight hides behind an init of ones or zeros
        for name, t in mixer.named_parameters():
            t.copy_(torch.randn_like(t) * (0.3 if "proj" in name else 1.0))
        mixer.dt_bias.copy_(torch.randn(6) - 1.0)
    return mixer


def params(d=DIMS):
    return m.init_params(d, jax.random.key(0))


@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_transformers(use_bias):
    mixer = hf_mixer(use_bias)
    d = m.Mamba2Dims(**{**DIMS.__dict__, "use_bias": use_bias})
    p = m.from_hf(mixer.state_dict(), d)
    h = torch.randn(2, 13, 9)
    with torch.no_grad():
        want = mixer(h).numpy()
        dt = torch.nn.functional.softplus(mixer.in_proj(h)[..., -6:] + mixer.dt_bias)
    # the clamp to time_step_limit acts on both sides
    assert (dt < LIMIT[0]).any() and (dt > LIMIT[1]).any()
    got, _ = forward(p, jnp.asarray(h.numpy()), d)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_packed_row_equals_documents_alone():
    # row 0: documents of 5 and 6 tokens, then 2 of padding; row 1: 3 of left padding, then 10 tokens
    docs = [[(1, 0, 5), (2, 5, 11)], [(1, 3, 13)]]
    seg = np.zeros((2, 13), np.int32)
    for b, row in enumerate(docs):
        for doc, start, stop in row:
            seg[b, start:stop] = doc
    p = params()
    h = jax.random.normal(jax.random.key(1), (2, 13, 9))
    y, cache = forward(p, h, DIMS, segment_ids_BS=jnp.asarray(seg))
    for b, row in enumerate(docs):
        for _, start, stop in row:
            y_doc, cache_doc = forward(p, h[b : b + 1, start:stop], DIMS)
            np.testing.assert_allclose(y[b : b + 1, start:stop], y_doc, atol=2e-7, rtol=0)
    # the state after right padding is the last document's
    np.testing.assert_allclose(cache.ssm_state_BHPN[1:], cache_doc.ssm_state_BHPN, atol=1e-7, rtol=0)


def test_decode_steps_equal_chunked_forward():
    p = params()
    h = jax.random.normal(jax.random.key(2), (2, 13, 9))
    want, _ = forward(p, h, DIMS)
    # prefill 9 tokens in two calls (5 + 4, the cache carried between), then 4 single steps
    y0, cache = forward(p, h[:, :5], DIMS)
    y1, cache = forward(p, h[:, 5:9], DIMS, cache=cache)
    ys = [y0, y1]
    for t in range(9, 13):
        y_t, cache = step(p, h[:, t], DIMS, cache)
        ys.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), want, atol=2e-7, rtol=0)


@pytest.mark.parametrize("prefill_cuts", [(8,), (6, 8)])
def test_left_padded_prefill_then_steps_equal_the_prompt_alone(prefill_cuts):
    # a 2-token prompt behind 6 of padding, prefilled at once or in two calls (the second starting
    # exactly at the prompt): the conv window must not carry padding into the prompt or the steps
    p = params()
    h = jax.random.normal(jax.random.key(3), (1, 12, 9))
    seg = jnp.asarray([[0] * 6 + [1] * 2], jnp.int32)
    cache = None
    for a, b in zip((0, *prefill_cuts[:-1]), prefill_cuts):
        y, cache = forward(p, h[:, a:b], DIMS, segment_ids_BS=seg[:, a:b], cache=cache)
    outs = [y[:, -2:]]
    for t in range(8, 12):
        y_t, cache = step(p, h[:, t], DIMS, cache)
        outs.append(y_t[:, None])
    want, _ = forward(p, h[:, 6:], DIMS)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=5e-7, rtol=0)


def test_module_params_and_logical_axes():
    from flax import nnx

    layer = m.Mamba2(DIMS, rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    for name, (shape, logical) in m.mamba2_params(DIMS).items():
        assert state[name].shape == shape(DIMS), name
        assert state[name].logical_axes == logical, name
    h = jax.random.normal(jax.random.key(4), (2, 13, 9))
    np.testing.assert_array_equal(jax.jit(lambda h: layer(h)[0])(h), forward(layer.params(), h, DIMS)[0])
