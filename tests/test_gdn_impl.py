"""model.gdn_impl = "pallas": the Gated DeltaNet layers' intra-chunk parts (UT transform, chunk outputs) from the
Pallas kernels (nopejax/kernels/gdn.py, in Pallas's interpreter on CPU) against the XLA form: two train steps of
configs/tiny_hybrid_gdn.py on packed rows (S = 80 with chunks of 64: documents start inside chunks, a padded
tail), on one device and on an fsdp x context mesh (the kernels inside the context recurrence); the mixer under
a data x tensor mesh (the kernels inside `shard_map`); generation's chunked prefill; the Mosaic compile of a
train step for a v5p slice ahead of time; and the refusals.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mamba_impl import check_prefill_equals_xla
from test_recurrent_context import _rows, _train, hybrid_cfg
from test_train import _libtpu, random_batches

from nopejax import config, sharding, train, validation
from nopejax.config import ConfigError
from nopejax.mixers import gated_deltanet as gdn_lib

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_hybrid_gdn.py")


def _cfg(impl, **mesh):
    cfg = config.load_config(CONFIG)
    cfg.model.gdn_impl = impl
    cfg.model.dtype = "float32"
    cfg.model.scan_layers = True  # one compiled period of GDN, GDN, GDN, attention (tiny.py unrolls its layers)
    cfg.train.update(global_batch_size=4, seq_len=80)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    cfg.mesh.update(**mesh)
    return cfg


@pytest.fixture(scope="module")
def xla_run():
    cfg = _cfg("xla")
    return _train(cfg, random_batches(cfg, 2), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [dict(), pytest.param(dict(fsdp=2, context=2), marks=pytest.mark.slow)])
def test_pallas_train_steps_equal_xla(mesh, xla_run):
    """Two AdamW steps (loss and gradient norm): the second step's loss depends on the first step's gradients
    through the kernels. Under context 2 the trainer zig-zags the rows (train.to_device_batch) and each device
    runs the kernels on its chunks inside the context recurrence (slow: ~80 s on 2 shared cores)."""
    cfg = _cfg("pallas", **mesh)
    got = _train(cfg, random_batches(cfg, 2), jax.devices()[: 2 * len(mesh) or 1])
    np.testing.assert_allclose(got, xla_run, rtol=2e-6)  # measured: at most 3.4e-7


def test_pallas_mixer_under_a_data_tensor_mesh_equals_xla():
    """2 key heads of 2 value heads on data 2 x tensor 2: the kernels run in `shard_map` on 2 of 4 rows and one
    key head each; output and gradients of every param and the input equal the XLA mixer on one device."""
    d = gdn_lib.GatedDeltaNetDims(d_model=8, key_heads=2, value_heads=4, key_head_dim=3, value_head_dim=5,
                                  chunk=4, allow_neg_eigval=True)  # fmt: skip
    params = gdn_lib.init_params(d, jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (4, 24, 8))
    seg = jnp.asarray(_rows(24)[0])

    def loss(d):
        return lambda p, h: jnp.sum(jnp.sin(gdn_lib.gated_deltanet(p, h, d, segment_ids_BS=seg)[0]))

    want = jax.jit(jax.value_and_grad(loss(d), argnums=(0, 1)))(params, h)
    cfg = config.base_config()
    cfg.mesh.update(data=2, fsdp=1, tensor=2)
    pallas = dataclasses.replace(d, impl="pallas")
    with jax.set_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:4])):
        fn = jax.jit(jax.value_and_grad(loss(pallas), argnums=(0, 1)))
        jaxpr = str(fn.trace(params, h).jaxpr)
        assert jaxpr.count("= pallas_call[") == 4  # both kernels forward and backward, once each
        # per shard: 2 of the 4 rows, 1 of the 2 key heads with its 2 value heads (the outputs' [B, t, K, G, c, O])
        assert "f32[2,6,1,2,4,5] = pallas_call[" in jaxpr
        got = fn(params, h)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-5  # measured: at most 3e-7


def test_pallas_prefill_equals_xla():
    """Generation's chunked prefill with the kernels (GDN chunks of 4 inside prefill chunks of 16, prompts
    left-padded) under data 2 x tensor 2: first token, logits and every GDN layer's state equal XLA's."""
    check_prefill_equals_xla(
        lambda impl: hybrid_cfg(gdn=True, model_fields={"gdn_impl": impl}, data=2, tensor=2), "gated_deltanet"
    )


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_train_step_compiles_for_v5p_with_the_mosaic_kernels():
    """A tiny GDN hybrid's train step for a v5p:2x2x1 slice (data 2 x tensor 2) ahead of time: the four kernels
    are Mosaic custom calls in the compiled program, in `shard_map`."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    cfg = _cfg("pallas", data=2, tensor=2)
    cfg.model.update(num_layers=2, layer_types=("gated_deltanet", "full_attention"), no_rope_layers=(0, 0),
                     dtype="bfloat16", gdn_key_head_dim=128, gdn_value_head_dim=128)  # fmt: skip
    s = train.setup(cfg, devices)
    step, _ = train.compile_fns(s)
    with jax.set_mesh(s.mesh):
        hlo = step.lower(s.abstract_state, train.abstract_batch(s)).compile().as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') >= 4, "no Mosaic kernels in the compiled step"
    for name in ("ut_transform_fwd", "ut_transform_bwd", "chunk_output_fwd", "chunk_output_bwd"):
        assert f"nopejax_gdn_{name}" in hlo


def test_refusals_are_one_line_before_compiling():
    cfg = _cfg("triton")
    with pytest.raises(ConfigError, match="unknown value 'triton'") as err:
        validation.validate(cfg)
    assert err.value.field == "model.gdn_impl"
    cfg = _cfg("pallas")
    cfg.model.gdn_chunk_size = 512
    with pytest.raises(ConfigError, match="at most 256") as err:
        validation.validate(cfg)
    assert err.value.field == "model.gdn_chunk_size" and "\n" not in str(err.value)
    cfg.model.gdn_impl = "xla"
    validation.validate(cfg)  # XLA takes any chunk
    with pytest.raises(ConfigError, match="Mosaic TPU kernels, these devices are gpu") as err:
        validation.check_platform(validation.validate(_cfg("pallas")), "gpu")
    assert err.value.field == "model.gdn_impl"
    for platform in ("tpu", "cpu"):
        validation.check_platform(validation.validate(_cfg("pallas")), platform)
