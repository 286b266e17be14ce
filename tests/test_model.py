"""The decoder against itself: scanned vs unrolled, packed vs alone, causality, the block plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nopejax import config, layers, model, validation


def tiny(**overrides):
    cfg = config.base_config()
    cfg.model.update(vocab_size=67, d_model=30, num_heads=3, num_kv_heads=1, head_dim=10, d_ff=22, dtype="float32")
    cfg.model.update(**overrides)
    return validation.validate(cfg).model


def assert_scanned_equals_unrolled(m, seq_len: int) -> None:
    """The scanned stack of `m` gives the unrolled stack's logits and parameter gradients."""
    scanned = model.create(m, seed=1)
    m.scan_layers = False
    unrolled = model.create(m, seed=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 67, (2, seq_len)), jnp.int32)

    @nnx.jit  # logits and grads in one compile per stack: eager op-by-op dispatch costs more on CPU
    def logits_and_grads(module):
        return module(tokens), nnx.grad(lambda mod: jnp.mean(mod(tokens) ** 2))(module)

    (out1, g1), (out2, g2) = logits_and_grads(scanned), logits_and_grads(unrolled)
    np.testing.assert_allclose(out1, out2, atol=1e-6, rtol=0)
    g1, g2 = nnx.to_pure_dict(g1), nnx.to_pure_dict(g2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g1, g2)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_layers=8, no_rope_layer_interval=4),
        dict(num_layers=7, no_rope_layer_interval=4),  # a 3-layer tail after one block of 4
        dict(num_layers=5, no_rope_layers=(1, 0, 0, 1, 1)),  # not periodic at all
        dict(num_layers=6, no_rope_layer_interval=2, remat="full"),
        dict(num_layers=4, no_rope_layer_interval=0, remat="save_dots"),
    ],
)
def test_scanned_equals_unrolled(overrides):
    assert_scanned_equals_unrolled(tiny(**overrides), seq_len=13)


def test_packed_documents_equal_documents_alone():
    m = tiny(num_layers=5, no_rope_layer_interval=4)
    module = model.create(m, seed=2)
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(0, 67, 9), rng.integers(0, 67, 14)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None], jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(9), np.arange(14)])[None], jnp.int32)
    segments = jnp.asarray(np.array([1] * 9 + [2] * 14)[None], jnp.int32)
    together = module(packed, positions=positions, segment_ids=segments)
    alone_a = module(jnp.asarray(doc_a[None], jnp.int32))
    alone_b = module(jnp.asarray(doc_b[None], jnp.int32))
    np.testing.assert_allclose(together[:, :9], alone_a, atol=1e-5)
    np.testing.assert_allclose(together[:, 9:], alone_b, atol=1e-5)


def test_causal_by_gradients():
    """Logit t depends on tokens <= t only: d logits[t] / d embed(token s) is zero for s > t."""
    m = tiny(num_layers=4, tie_embeddings=False)  # tied, the LM head would read every embedding row
    module = model.create(m, seed=4)
    graphdef, params = model.split(module)
    tokens = jnp.arange(11, dtype=jnp.int32)[None]

    def out_at(t, embed):
        return model.apply(graphdef, {**params, "embed": embed}, tokens)[0, t].sum()

    embed = params["embed"]
    for t in (0, 5, 10):
        grads = jax.grad(lambda e, t=t: out_at(t, e))(embed)
        used = np.abs(np.asarray(grads)[np.asarray(tokens[0])]).sum(-1)
        assert np.all(used[t + 1 :] == 0) and used[t] > 0


def test_nope_layer_is_position_independent():
    """An all-NoPE model gives the same logits whatever positions are passed; RoPE does not."""
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 67, (1, 10)), jnp.int32)
    shifted = jnp.arange(10, dtype=jnp.int32)[None] + 37
    nope = model.create(tiny(num_layers=3, no_rope_layers=(0, 0, 0)), seed=0)
    np.testing.assert_allclose(nope(tokens), nope(tokens, positions=shifted), atol=1e-6)
    rope = model.create(tiny(num_layers=3, no_rope_layer_interval=0), seed=0)
    # RoPE is relative: a uniform shift leaves logits alone too, so the check is a non-uniform one
    jumbled = jnp.asarray([[0, 1, 2, 3, 9, 5, 6, 7, 8, 4]], jnp.int32)
    assert not np.allclose(rope(tokens), rope(tokens, positions=jumbled), atol=1e-4)
    np.testing.assert_allclose(nope(tokens), nope(tokens, positions=jumbled), atol=1e-6)


@pytest.mark.parametrize(
    "pattern, block, reps, tail",
    [
        ((1, 1, 1, 0) * 9, (1, 1, 1, 0), 9, ()),
        ((1, 1, 1, 0) * 2 + (1, 1), (1, 1, 1, 0), 2, (1, 1)),
        ((1,) * 6, (1,), 6, ()),
        ((1, 0, 0, 1, 1), (1, 0, 0), 1, (1, 1)),  # no repeat: every split traces 5 layers
    ],
)
def test_block_structure(pattern, block, reps, tail):
    pattern = tuple(map(bool, pattern))
    b, n, t = layers.block_structure(pattern)
    assert (b, n, t) == (tuple(map(bool, block)), reps, tuple(map(bool, tail)))
    assert b * n + t == pattern


def test_smollm3_pattern_and_size():
    from configs_loader import load

    m = validation.validate(load("smollm3_3b")).model
    assert layers.rope_pattern(m)[:8] == (True, True, True, False) * 2
    assert layers.block_structure(layers.rope_pattern(m))[1] == 9
    assert abs(model.param_count(m) - 3.075e9) < 0.01e9  # SmolLM3-3B: 3.08B parameters, tied
