"""model.mamba_impl = "pallas": the Mamba2 layers' intra-chunk SSD from the Pallas kernels
(nopejax/kernels/ssd.py, in Pallas's interpreter on CPU) against the XLA form in a whole hybrid model:
logits and gradients on packed rows (documents starting inside SSD chunks), under a data x tensor
mesh (the kernel inside `shard_map`, groups or heads split over `tensor`), the switch scan plan
with remat, context parallelism, and a chunked generation prefill; the Mosaic compile of a train
step for a v5p slice ahead of time; and the refusals.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_recurrent_context import _rows, hybrid_cfg
from test_train import _libtpu

from nopejax import config, context, decode, model, sharding, train, validation
from nopejax.config import ConfigError
from nopejax.mixers import mamba2 as mamba2_lib

# two Mamba2 layers (a scanned run) and a NoPE attention layer; SSD chunks of 4, head dim 5, state 3
LAYERS = dict(layer_types=("mamba2", "mamba2", "full_attention"), num_layers=3)


def _cfg(model_fields=None, **mesh):
    return hybrid_cfg(model_fields={**LAYERS, **(model_fields or {})}, **mesh)


def _inputs(S: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 62, (4, S)).astype(np.int32)
    w = rng.standard_normal((4, S, 62)).astype(np.float32)
    seg, pos = _rows(S)  # 1 to 3 documents per row, one ending in padding
    return tokens, pos, seg, w


def _logits_and_grads(cfg, devices, params=None, zigzag: int = 1):
    """-> (params, logits, grads) of sum(logits * w) on `_inputs`; rows in zig-zag order for `zigzag` shards."""
    s = train.setup(cfg, devices)
    params = jax.device_get(train.init_state(s)["params"]) if params is None else params
    tokens, pos, seg, w = _inputs(cfg.train.seq_len)
    order = context.zigzag_order(cfg.train.seq_len, zigzag)
    tokens, pos, seg, w = (a[:, order] for a in (tokens, pos, seg, w))

    def loss(params):
        logits = model.apply(s.graphdef, params, tokens, pos, seg)
        return jnp.sum(logits * w), logits

    with jax.set_mesh(s.mesh):
        sharded = jax.device_put(params, s.state_shardings["params"])
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(sharded)
    logits = np.asarray(jax.device_get(logits))[:, np.argsort(order)]
    return params, logits, jax.device_get(grads)


def _close(got, want, tol):
    """Max error relative to the largest entry (fp32 sums in another order differ in their last bits)."""
    assert np.all(np.isfinite(got))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@pytest.fixture(scope="module")
def xla_one_device():
    return _logits_and_grads(_cfg(), jax.devices()[:1])


def _check(cfg, devices, xla_one_device, zigzag=1):
    params, want_logits, want_grads = xla_one_device
    assert cfg.model.mamba_impl == "pallas"
    _, logits, grads = _logits_and_grads(cfg, devices, params, zigzag)
    _close(logits, want_logits, 5e-6)  # measured 4e-7 (1 device, data x tensor, context)
    assert np.abs(want_grads["layers"]["mamba_A_log"]).min() > 0  # every Mamba2 layer's decay gets a gradient
    jax.tree.map(lambda a, b: _close(a, b, 1e-5), grads, want_grads)  # measured at most 1e-6


def _pallas(model_fields=None, **mesh):
    return _cfg({"mamba_impl": "pallas", **(model_fields or {})}, **mesh)


def test_pallas_equals_xla_on_packed_rows(xla_one_device):
    """One device: the kernel called directly; rows of one to three documents, starts inside SSD chunks."""
    _check(_pallas(), jax.devices()[:1], xla_one_device)


def test_pallas_under_a_tensor_mesh_with_the_switch_plan_equals_xla(xla_one_device):
    """data 2 x tensor 2: the kernel in `shard_map` per batch shard with its 2 groups split over
    `tensor`; the switch scan plan under full remat."""
    _check(_pallas(dict(scan_plan="switch", remat="full"), data=2, tensor=2), jax.devices()[:4], xla_one_device)


def test_pallas_mixer_splits_heads_of_one_group_over_tensor():
    """One group of 4 heads on data 2 x tensor 2: `tensor` splits the heads within the group (C and B
    go to both shards); output and gradients equal the XLA mixer on one device."""
    d = mamba2_lib.Mamba2Dims(d_model=8, heads=4, head_dim=5, groups=1, state=3, chunk=4)
    params = mamba2_lib.init_params(d, jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (4, 24, 8))
    seg = jnp.asarray(_rows(24)[0])

    def loss(d):
        return lambda p, h: jnp.sum(jnp.sin(mamba2_lib.mamba2(p, h, d, segment_ids_BS=seg)[0]))

    want = jax.jit(jax.value_and_grad(loss(d), argnums=(0, 1)))(params, h)
    cfg = config.base_config()
    cfg.mesh.update(data=2, fsdp=1, tensor=2)
    pallas = dataclasses.replace(d, impl="pallas")
    with jax.set_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:4])):
        fn = jax.jit(jax.value_and_grad(loss(pallas), argnums=(0, 1)))
        jaxpr = str(fn.trace(params, h).jaxpr)
        assert jaxpr.count("= pallas_call[") == 2  # the forward and backward kernels, once each
        # per shard: 2 of the 4 rows, 2 of the 4 heads ([B, H, t, c, O] in the kernel's layout)
        assert "f32[2,2,6,4,5] = pallas_call[" in jaxpr
        got = fn(params, h)
    jax.tree.map(lambda a, b: _close(np.asarray(a), np.asarray(b), 1e-5), got, want)


def test_pallas_under_context_parallelism_equals_xla(xla_one_device):
    """context 2 x data 2: each device's two zig-zag chunks run the kernel from their incoming states,
    documents crossing shard boundaries."""
    _check(_pallas(data=2, context=2), jax.devices()[:4], xla_one_device, zigzag=2)


def check_prefill_equals_xla(cfg_for, cache_name: str):
    """A chunked prefill of left-padded prompts (2 chunks of 16: the second continues the cache) with
    `cfg_for("pallas")`: the first token's logits and every `cache_name` layer's cache equal
    `cfg_for("xla")`'s, on the same params. The kernels' prefill runs under a data 2 x tensor 2 mesh
    (as training's samples do): 3 rows do not split over data, so they stay whole; the 2 groups (key
    heads) split over tensor. Shared with the Gated DeltaNet kernels' test."""
    prompts = [np.random.default_rng(row).integers(1, 62, n) for row, n in enumerate((5, 21, 12))]
    tokens, pos, seg = decode.left_pad(prompts, 0, 16)
    params, out = None, {}
    for impl in ("xla", "pallas"):
        cfg = cfg_for(impl)
        graphdef, own = model.split(model.create(validation.validate(cfg).model, seed=3))
        params = own if params is None else params
        args = (graphdef, params, tokens, pos, seg, jax.random.key(0), decode.Sampling())
        prefill = functools.partial(decode.prefill, *args, total_len=tokens.shape[1] + 2, chunk=16, greedy=True)
        if impl == "xla":
            out[impl] = prefill()
        else:
            with jax.set_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:4])):
                out[impl] = prefill()
    (cache, first, logits), (cache_x, first_x, logits_x) = out["pallas"], out["xla"]
    _close(np.asarray(logits), np.asarray(logits_x), 5e-6)
    np.testing.assert_array_equal(first, first_x)
    assert len(cache.recurrent[cache_name]) > 0
    for got, want in zip(cache.recurrent[cache_name], cache_x.recurrent[cache_name]):
        _close(np.asarray(got), np.asarray(want), 5e-6)


def test_pallas_prefill_equals_xla():
    check_prefill_equals_xla(lambda impl: _cfg({"mamba_impl": impl}, data=2, tensor=2), "mamba2")


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
@pytest.mark.parametrize("mesh", [dict(data=2, tensor=2), dict(data=2, context=2)])
def test_train_step_compiles_for_v5p_with_the_mosaic_kernel(mesh):
    """A tiny hybrid's train step for a v5p:2x2x1 slice ahead of time: the Mamba2 layers' forward and
    backward kernels are Mosaic custom calls in the compiled program (in `shard_map` on data x
    tensor; inside the context recurrence on data x context)."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    cfg = _pallas(dict(layer_types=("mamba2", "full_attention"), num_layers=2, dtype="bfloat16"), **mesh)
    s = train.setup(cfg, devices)
    step, _ = train.compile_fns(s)
    with jax.set_mesh(s.mesh):
        hlo = step.lower(s.abstract_state, train.abstract_batch(s)).compile().as_text()
    assert s.mesh.devices.flat[0].platform == "tpu"
    assert hlo.count('custom_call_target="tpu_custom_call"') >= 2, "no Mosaic kernels in the compiled step"
    assert "nopejax_ssd_intra_chunk_fwd" in hlo and "nopejax_ssd_intra_chunk_bwd" in hlo


def test_refusals_are_one_line_before_compiling():
    cfg = _pallas()
    cfg.model.mamba_impl = "triton"
    with pytest.raises(ConfigError, match="unknown value 'triton'") as err:
        validation.validate(cfg)
    assert err.value.field == "model.mamba_impl"
    cfg = _pallas(dict(mamba_chunk_size=1024))
    with pytest.raises(ConfigError, match="at most 512") as err:
        validation.validate(cfg)
    assert err.value.field == "model.mamba_chunk_size" and "\n" not in str(err.value)
    validation.validate(_cfg(dict(mamba_chunk_size=1024)))  # XLA takes any chunk
    with pytest.raises(ConfigError, match="Mosaic TPU kernel, these devices are gpu") as err:
        validation.check_platform(validation.validate(_pallas()), "gpu")
    assert err.value.field == "model.mamba_impl"
    for platform in ("tpu", "cpu"):
        validation.check_platform(validation.validate(_pallas()), platform)
