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
from mixer_checks import check_decode_steps, check_left_padded_prefill, check_packed_row
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
    check_packed_row(forward, params(), DIMS, 9, lambda c: c.ssm_state_BHOE, atol=2e-7, state_atol=1e-7)


def test_decode_steps_equal_chunked_forward():
    check_decode_steps(forward, step, params(), DIMS, 9, atol=2e-7)


@pytest.mark.parametrize("prefill_cuts", [(8,), (6, 8)])
def test_left_padded_prefill_then_steps_equal_the_prompt_alone(prefill_cuts):
    check_left_padded_prefill(forward, step, params(), DIMS, 9, prefill_cuts, atol=5e-7)


def test_module_params_and_logical_axes():
    from flax import nnx

    layer = m.Mamba2(DIMS, rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    for name, (shape, logical) in m.mamba2_params(DIMS).items():
        assert state[name].shape == shape(DIMS), name
        assert state[name].logical_axes == logical, name
    h = jax.random.normal(jax.random.key(4), (2, 13, 9))
    np.testing.assert_array_equal(jax.jit(lambda h: layer(h)[0])(h), forward(layer.params(), h, DIMS)[0])
