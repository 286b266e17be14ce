"""The Gated DeltaNet layer (nopejax/mixers/gated_deltanet.py) against transformers' OLMo Hybrid and Qwen3-Next
mixers (torch CPU path, fp32), on packed documents, and its decode step against the chunked forward.

Tiny odd sizes: width 9, 2 key heads of 5 serving 6 value heads of 3, conv kernel 4, chunk 4, rows of 13
(longer than the chunk, not a multiple of it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from mixer_checks import check_decode_steps, check_left_padded_prefill, check_packed_row
from transformers import OlmoHybridConfig, Qwen3NextConfig
from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridGatedDeltaNet
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from nopejax.mixers import gated_deltanet as m

DIMS = m.GatedDeltaNetDims(d_model=9, key_heads=2, value_heads=6, key_head_dim=5, value_head_dim=3, chunk=4)
SIZES = dict(
    hidden_size=9, linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=5, linear_value_head_dim=3,
    linear_conv_kernel_dim=4, num_hidden_layers=2, vocab_size=7, num_attention_heads=1, num_key_value_heads=1,
)  # fmt: skip

forward = jax.jit(m.gated_deltanet, static_argnames="d")
step = jax.jit(m.gated_deltanet_step, static_argnames="d")


def randomize(mixer):
    torch.manual_seed(0)
    with torch.no_grad():  # random everything, so no weight hides behind an init of ones or zeros
        for name, t in mixer.named_parameters():
            t.copy_(torch.randn_like(t) * (0.5 if "proj" in name else 1.0))
        mixer.A_log.copy_(torch.randn_like(mixer.A_log) - 1.0)
    return mixer.eval()


@pytest.mark.parametrize("neg_eigval", [False, True])
def test_matches_olmo_hybrid(neg_eigval):
    config = OlmoHybridConfig(
        **SIZES, linear_allow_neg_eigval=neg_eigval, layer_types=["linear_attention", "full_attention"]
    )
    mixer = randomize(OlmoHybridGatedDeltaNet(config, layer_idx=0))
    d = m.GatedDeltaNetDims(**{**DIMS.__dict__, "allow_neg_eigval": neg_eigval})
    p = m.from_hf(mixer.state_dict(), d)
    h = torch.randn(2, 13, 9)
    with torch.no_grad():
        want = mixer(h).numpy()
    got, _ = forward(p, jnp.asarray(h.numpy()), d)
    # measured error about 4e-6 on outputs up to 10
    np.testing.assert_allclose(got, want, atol=4e-5, rtol=0)


def test_matches_qwen3_next_through_its_tensor_map():
    config = Qwen3NextConfig(**SIZES, rms_norm_eps=1e-6, layer_types=["linear_attention", "full_attention"])
    mixer = randomize(Qwen3NextGatedDeltaNet(config, layer_idx=0))
    d = m.GatedDeltaNetDims(**{**DIMS.__dict__, "norm_eps": 1e-6})
    p = m.from_hf(mixer.state_dict(), d, tensors=m.QWEN3_NEXT_TENSORS)
    h = torch.randn(2, 13, 9)
    with torch.no_grad():
        want = mixer(h).numpy()
    got, _ = forward(p, jnp.asarray(h.numpy()), d)
    # measured error about 4e-6 on outputs up to 10
    np.testing.assert_allclose(got, want, atol=4e-5, rtol=0)


def test_qwen3_next_fused_tensors_round_trip_bit_for_bit():
    """to_qwen3_next is the exact inverse of QWEN3_NEXT_TENSORS: transformers' fused in_proj_qkvz / in_proj_ba
    (grouped per key head) and the rest come back bit for bit, with transformers' shapes."""
    config = Qwen3NextConfig(**SIZES, layer_types=["linear_attention", "full_attention"])
    mixer = randomize(Qwen3NextGatedDeltaNet(config, layer_idx=0))
    state = {name: t.numpy() for name, t in mixer.state_dict().items()}
    ours = {name: np.asarray(a) for name, a in m.from_hf(state, DIMS, tensors=m.QWEN3_NEXT_TENSORS).items()}
    back = m.to_qwen3_next(ours, DIMS)
    assert sorted(back) == sorted(state)
    assert {k: tuple(v.shape) for k, v in state.items()} == m.qwen3_next_shapes(DIMS)
    for name, t in state.items():
        np.testing.assert_array_equal(back[name], t, err_msg=name)


def params(d=DIMS):
    return m.init_params(d, jax.random.key(0))


def test_packed_row_equals_documents_alone():
    check_packed_row(forward, params(), DIMS, 9, lambda c: c.state_BHEO, atol=1e-8, state_atol=2e-8)


def test_decode_steps_equal_chunked_forward():
    # outputs about 1e-2 (init projections 0.02), measured error about 1e-9
    check_decode_steps(forward, step, params(), DIMS, 9, atol=2e-8)


@pytest.mark.parametrize("prefill_cuts", [(8,), (6, 8)])
def test_left_padded_prefill_then_steps_equal_the_prompt_alone(prefill_cuts):
    check_left_padded_prefill(forward, step, params(), DIMS, 9, prefill_cuts, atol=2e-8)


def test_head_mismatch_is_one_clear_error():
    with pytest.raises(ValueError, match="value_heads=7 must be a multiple of key_heads=2"):
        m.GatedDeltaNetDims(d_model=9, key_heads=2, value_heads=7, key_head_dim=5, value_head_dim=3)


def test_module_params_and_logical_axes():
    from flax import nnx

    layer = m.GatedDeltaNet(DIMS, rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    for name, (shape, logical) in m.GATED_DELTANET_PARAMS.items():
        assert state[name].shape == shape(DIMS), name
        assert state[name].logical_axes == logical, name
    h = jax.random.normal(jax.random.key(4), (2, 13, 9))
    # the module closes over its params as constants, which XLA may fold in another order: equal to rounding
    np.testing.assert_allclose(
        jax.jit(lambda h: layer(h)[0])(h), forward(layer.params(), h, DIMS)[0], atol=1e-8, rtol=0
    )
