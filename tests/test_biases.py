"""Projection biases (model.attention_bias, model.mlp_bias): the kernel path and sharding.

Parity with transformers is in test_hf_exact.py; here the biased model runs the Pallas kernel
(interpret mode) like the XLA path, and sharded on a 2 x 2 x 2 mesh like on one device.
"""

import jax
import jax.numpy as jnp
import numpy as np

from nopejax import config, model, sharding, train, validation


def biased(cfg, seed=0):
    """Params of `cfg.model` with random biases (they start at 0, which would hide a dropped one)."""
    _, params = model.split(model.create(cfg.model, seed=seed))
    rng = np.random.default_rng(seed)
    for name in model.BIAS_PARAMS:
        params["layers"][name] = jnp.asarray(rng.normal(0, 0.5, params["layers"][name].shape), jnp.float32)
    return params


def test_pallas_kernel_path_with_biases_matches_xla():
    cfg = config.base_config()
    cfg.model.update(vocab_size=61, d_model=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, d_ff=45,
                     dtype="float32", no_rope_layers=(1, 0), attention_bias=True, mlp_bias=True)  # fmt: skip
    m = validation.validate(cfg).model
    params = biased(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 32)), jnp.int32)
    logits = {}
    for impl in ("xla", "pallas"):
        m.attention_impl = impl
        graphdef, _ = model.split(model.create(m))
        logits[impl] = np.asarray(jax.jit(lambda p, g=graphdef: model.apply(g, p, tokens))(params))
    # measured max |pallas - xla| 1.5e-7 (logits up to 0.65) at `highest` precision; the bound is ~10x
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=0, atol=2e-6)
    m.attention_impl, m.attention_bias, m.mlp_bias = "xla", False, False  # and the biases do matter
    unbiased = model.split(model.create(m))[0]
    without = {k: v for k, v in params["layers"].items() if not k.endswith("bias")}
    assert np.abs(np.asarray(model.apply(unbiased, {**params, "layers": without}, tokens)) - logits["xla"]).max() > 0.1


def test_biases_shard_by_the_table_and_sharded_forward_equals_one_device():
    cfg = config.base_config()
    cfg.model.update(vocab_size=64, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=96,
                     dtype="float32", attention_bias=True, mlp_bias=True)  # fmt: skip
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    params = biased(cfg)
    s = train.setup(cfg, jax.devices())
    specs = {name: tuple(sh.spec) for name, sh in s.state_shardings["params"]["layers"].items()}
    assert specs["q_bias"] == (None, "tensor", None) and specs["k_bias"] == (None, "tensor", None)
    assert specs["o_bias"] == (None, "fsdp") and specs["down_bias"] == (None, "fsdp")
    assert specs["gate_bias"] == (None, "tensor") and specs["up_bias"] == (None, "tensor")
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 24)), jnp.int32)
    one_device = np.asarray(model.apply(s.graphdef, params, tokens))
    with jax.set_mesh(s.mesh):
        placed = jax.device_put(params, s.state_shardings["params"])
        tokens_sharded = jax.device_put(tokens, sharding.named(s.mesh, ("act_batch", None)))
        sharded = jax.jit(lambda p, t: model.apply(s.graphdef, p, t))(placed, tokens_sharded)
    np.testing.assert_allclose(np.asarray(sharded), one_device, atol=1e-5)
