"""One traced body for RoPE and NoPE layers (`model.shared_rope_body`, layers.traced_specs): which
layers merge, and that the merged stack computes what separate bodies compute, on the XLA path and
in the Pallas kernel (interpret mode), with packed documents and under a tensor-parallel mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nopejax import config, layers, model, sharding, validation


def model_cfg(**overrides):
    cfg = config.base_config()
    cfg.model.update(vocab_size=67, d_model=64, num_heads=4, num_kv_heads=2, head_dim=64, d_ff=32, dtype="float32",
                     num_layers=8, no_rope_layer_interval=4)  # fmt: skip
    cfg.model.update(**overrides)
    return validation.validate(cfg)


@pytest.mark.parametrize(
    "overrides, bodies",
    [
        (dict(num_layers=36), 1),  # SmolLM3: RoPE x3 + NoPE, one body scanned 36 times
        (dict(partial_rotary_factor=0.25, rope_layout="interleaved", qk_norm="rms"), 1),
        (dict(shared_rope_body=False), 2),
        (dict(scan_layers=False), 2),  # unrolled: every layer traced anyway
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}), 2),
        (dict(nope_temperature=(8.0, 0.1), qk_norm="l2"), 2),  # Llama 4: NoPE and RoPE layers differ beyond RoPE
        (dict(global_attention_interval=4, sliding_window=8), 2),  # sliding RoPE, global NoPE: different attention
    ],
)
def test_which_layers_share_a_body(overrides, bodies):
    m = model_cfg(**overrides).model
    specs, traced = layers.layer_specs(m), layers.traced_specs(m)
    assert len(set(traced)) == bodies
    assert [s.mixer for s in traced] == [s.mixer for s in specs]
    if bodies == 1:
        assert layers.block_structure(traced)[:2] == ((traced[0],), m.num_layers)


def test_a_hybrid_stack_is_left_alone():
    m = model_cfg(layer_types=("mamba2",) * 3 + ("full_attention",), num_layers=4, no_rope_layer_interval=1,
                  mamba_num_heads=2, mamba_head_dim=32, mamba_state_size=8, mamba_chunk_size=8).model  # fmt: skip
    assert layers.traced_specs(m) == layers.layer_specs(m)


@pytest.mark.parametrize("impl, tensor", [("xla", 1), ("pallas", 1), ("pallas", 2)])
def test_shared_body_equals_separate_bodies(impl, tensor):
    """Logits and gradients of the merged stack = the stack with a body per spec (both scanned), on a
    packed row of two documents, partial RoPE."""
    S = 128
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 67, (2, S)), jnp.int32)
    seg = jnp.asarray(np.where(np.arange(S) < 50, 1, 2)[None].repeat(2, 0), jnp.int32)
    pos = jnp.asarray(np.where(np.arange(S) < 50, np.arange(S), np.arange(S) - 50)[None].repeat(2, 0), jnp.int32)

    def logits_and_grads(shared: bool):
        cfg = model_cfg(attention_impl=impl, shared_rope_body=shared, partial_rotary_factor=0.5, num_layers=4)
        cfg.mesh.update(data=1, fsdp=1, tensor=tensor)
        module = model.create(cfg.model, seed=1)

        @nnx.jit
        def fn(mod):
            return mod(tokens, pos, seg), nnx.grad(lambda m: jnp.mean(m(tokens, pos, seg) ** 2))(mod)

        with jax.set_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:tensor])):
            out, grads = fn(module)
        return np.asarray(out), nnx.to_pure_dict(grads)

    (out1, g1), (out2, g2) = logits_and_grads(True), logits_and_grads(False)
    # measured: identical logits on both paths; gradients identical (kernel) or within 1.2e-8 (XLA)
    np.testing.assert_array_equal(out1, out2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=0), g1, g2)
