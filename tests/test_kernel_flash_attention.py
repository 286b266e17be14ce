"""Flash attention kernel (nopejax.kernels) against the plain fp32 reference, in Pallas interpret mode on CPU.

The cross product of (rope, causal, segments, heads, head dim, length, dtype,
kernel form) is far too big for CI; CASES is a hand-picked subset in which
every value of every axis appears, odd head counts and a padded length
included. The TPU form also compiles ahead of time through the real Mosaic
compiler for a v5p topology, and the GPU form lowers to Triton IR.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nopejax.kernels import describe, flash_attention, grid_steps, reference_attention

F32, BF16 = jnp.float32, jnp.bfloat16


def _inputs(B, S, Hq, Hkv, D, dtype, seed=0, segments=True):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, S, Hq, D), F32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, Hkv, D), F32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, Hkv, D), F32).astype(dtype)
    if not segments:
        return q, k, v, None, None
    # Packed documents: sorted random ids, positions restart at 0 in every document.
    seg = jnp.sort(jax.random.randint(ks[3], (B, S), 0, 4), axis=1).astype(jnp.int32)
    starts = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = jnp.broadcast_to(jnp.arange(S), (B, S))
    pos = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return q, k, v, seg, pos.astype(jnp.int32)


def _max_rel_err(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


# ~10x the largest error measured over CASES and LAYER_CASES (interpret mode, CPU, `highest` matmul
# precision from conftest): fp32 forward 5.5e-7, fp32 gradients 1.1e-6; bf16 forward 4.7e-3, bf16
# gradients 5.9e-3 (about half a bf16 ulp; the bf16 bounds stay at 4-5x that, tighter than 10x).
FWD_TOL = {F32: 5e-6, BF16: 2e-2}
GRAD_TOL = {F32: 1e-5, BF16: 3e-2}


# (rope, causal, segments, Hq, Hkv, D, S, dtype, backend, block_q, block_k)
CASES = [
    (True, True, True, 4, 1, 64, 128, F32, "tpu", None, None),
    (True, False, True, 6, 3, 128, 256, F32, "tpu", 128, 128),
    (False, True, True, 4, 4, 128, 384, F32, "tpu", 128, 128),
    (True, True, False, 6, 3, 64, 384, F32, "tpu", 256, 128),  # padded to 512
    (False, False, False, 4, 1, 64, 256, F32, "tpu", None, None),
    (True, True, True, 4, 4, 128, 256, BF16, "tpu", 128, 128),
    (False, True, True, 6, 3, 64, 128, BF16, "tpu", None, None),
    (True, True, True, 6, 3, 64, 256, F32, "gpu", 64, 32),
    (False, False, True, 4, 1, 128, 128, F32, "gpu", 64, 64),
    (True, False, False, 4, 4, 64, 384, F32, "gpu", 256, 64),  # padded to 512
    (True, True, True, 4, 1, 128, 128, BF16, "gpu", 64, 64),
]


def _case_id(c):
    rope, causal, seg, hq, hkv, d, s, dt, be, _, _ = c
    return (
        f"{be}-{'rope' if rope else 'nope'}-{'causal' if causal else 'full'}{'-seg' if seg else ''}"
        f"-h{hq}x{hkv}-d{d}-s{s}-{jnp.dtype(dt).name}"
    )


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_and_vjp_match_reference(case):
    rope, causal, segments, Hq, Hkv, D, S, dtype, backend, block_q, block_k = case
    q, k, v, seg, pos = _inputs(2 if S <= 128 else 1, S, Hq, Hkv, D, dtype, segments=segments)
    common = dict(segment_ids=seg, positions=pos, rope=rope, causal=causal, rope_theta=500.0)
    kernel = lambda q, k, v: flash_attention(
        q, k, v, interpret=True, backend=backend, block_q=block_q, block_k=block_k, **common
    )
    ref = lambda q, k, v: reference_attention(q, k, v, **common)

    out, vjp = jax.vjp(kernel, q, k, v)
    ref_out, ref_vjp = jax.vjp(ref, q, k, v)
    ct = jax.random.normal(jax.random.key(7), out.shape, F32).astype(dtype)
    assert out.shape == q.shape and out.dtype == dtype
    assert _max_rel_err(out, ref_out) < FWD_TOL[dtype]
    for name, g, rg in zip(("dq", "dk", "dv"), vjp(ct), ref_vjp(ct)):
        assert g.shape == rg.shape and g.dtype == dtype, name
        assert _max_rel_err(g, rg) < GRAD_TOL[dtype], name


def test_scaled_rope_and_custom_scale_match_reference():
    """inv_freq override (YaRN / linear scaling), attention factor and sm_scale reach the kernel."""
    q, k, v, seg, pos = _inputs(1, 128, 4, 2, 64, F32)
    common = dict(
        segment_ids=seg,
        positions=pos * 3,
        inv_freq=1.0 / (10000.0 ** (jnp.arange(0, 64, 2, dtype=F32) / 64)) / 4.0,
        rope_attention_factor=1.2,
        sm_scale=0.1,
    )
    out = flash_attention(q, k, v, interpret=True, **common)
    assert _max_rel_err(out, reference_attention(q, k, v, **common)) < FWD_TOL[F32]  # measured 2.3e-7


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_nope_equals_rope_at_position_zero(backend):
    q, k, v, seg, _ = _inputs(1, 128, 4, 2, 64, F32)
    run = lambda rope, pos: jax.vjp(
        lambda q, k, v: flash_attention(
            q, k, v, segment_ids=seg, positions=pos, rope=rope, interpret=True, backend=backend
        ),
        q,
        k,
        v,
    )
    nope, nope_vjp = run(False, None)
    zero, zero_vjp = run(True, jnp.zeros((1, 128), jnp.int32))
    np.testing.assert_allclose(nope, zero, atol=1e-6)
    for a, b in zip(nope_vjp(nope), zero_vjp(nope)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_nope_variant_does_no_rotation_work_and_kernels_declare_cost():
    q = jnp.ones((1, 128, 2, 64), F32)

    def jaxpr_text(rope):
        loss = lambda q: flash_attention(q, q, q, rope=rope, interpret=True).sum()
        return str(jax.make_jaxpr(jax.grad(loss))(q))

    rope_txt, nope_txt = jaxpr_text(True), jaxpr_text(False)
    trig = re.compile(r"= (cos|sin) ")
    assert trig.search(rope_txt) and not trig.search(nope_txt)
    for txt in (rope_txt, nope_txt):  # forward, dK/dV, dQ: each declares its cost
        assert txt.count("pallas_call[") == 3
        assert txt.count("CostEstimate(flops=") == 3


def test_runs_inside_scan_with_static_rope_flags():
    """The model scans a RoPE/NoPE period with the flag a Python constant per layer."""
    q, k, v, seg, pos = _inputs(1, 128, 2, 1, 64, F32)

    def period(x, _):
        x = flash_attention(x, k, v, segment_ids=seg, positions=pos, rope=True, interpret=True)
        x = flash_attention(x, k, v, segment_ids=seg, rope=False, interpret=True)
        return x, None

    def ref_period(x):
        x = reference_attention(x, k, v, segment_ids=seg, positions=pos, rope=True)
        return reference_attention(x, k, v, segment_ids=seg, rope=False)

    loss = lambda x: jax.lax.scan(period, x, None, length=2)[0].sum()
    ref_loss = lambda x: ref_period(ref_period(x)).sum()
    assert _max_rel_err(jax.grad(loss)(q), jax.grad(ref_loss)(q)) < 1e-6  # measured 1.2e-7


# ----------------------------------------------------------------------------- layer options (issue 13)

# (backend, block, S, Hq, Hkv, D, packed, options). Blocks of 128 on the TPU form (its minimum) and 32 on
# the GPU form; windows smaller than, equal to and larger than a block, and not multiples of it; lengths
# that are not a multiple of the block; packed rows whose positions restart per document.
LAYER_CASES = [
    ("tpu", 128, 300, 2, 1, 64, True, dict(sliding_window=50)),
    ("tpu", 128, 256, 2, 1, 64, False, dict(sliding_window=128, rope=False)),
    ("tpu", 128, 300, 2, 1, 128, True, dict(sliding_window=200, partial_rotary_factor=0.25)),
    ("tpu", 128, 300, 3, 1, 64, True, dict(chunk_size=96, rope_layout="interleaved")),
    ("tpu", 128, 384, 2, 2, 64, False, dict(chunk_size=128)),  # chunks on the sequence index: exact band
    ("tpu", 128, 200, 2, 1, 128, True, dict(rope=False, nope_temperature=(4.0, 0.5))),
    ("gpu", 32, 200, 4, 2, 64, True, dict(sliding_window=45, partial_rotary_factor=0.5, rope_layout="interleaved")),
    ("gpu", 32, 150, 2, 1, 64, False, dict(chunk_size=48, rope=False, nope_temperature=(8.0, 0.25))),
    ("gpu", 32, 130, 2, 1, 128, True, dict(sliding_window=32, partial_rotary_factor=0.25)),
]


def _layer_id(c):
    backend, _, S, hq, hkv, d, packed, opts = c
    return f"{backend}-s{S}-h{hq}x{hkv}-d{d}{'-packed' if packed else ''}-" + "-".join(
        f"{k}={v}" for k, v in opts.items()
    )


@pytest.mark.parametrize("case", LAYER_CASES, ids=[_layer_id(c) for c in LAYER_CASES])
def test_layer_options_match_reference(case):
    """Local, chunked, partial / interleaved RoPE and the NoPE temperature: forward and gradients, fp32."""
    backend, block, S, Hq, Hkv, D, packed, opts = case
    q, k, v, seg, pos = _inputs(1, S, Hq, Hkv, D, F32, seed=S + D, segments=packed)
    common = dict(segment_ids=seg, positions=pos, rope_theta=100.0, **opts)
    kernel = lambda q, k, v: flash_attention(
        q, k, v, interpret=True, backend=backend, block_q=block, block_k=block, **common
    )
    out, vjp = jax.vjp(kernel, q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, **common), q, k, v)
    ct = jax.random.normal(jax.random.key(7), out.shape, F32)
    assert _max_rel_err(out, ref_out) < FWD_TOL[F32]
    for name, g, rg in zip(("dq", "dk", "dv"), vjp(ct), ref_vjp(ct)):
        assert _max_rel_err(g, rg) < GRAD_TOL[F32], name


def test_options_change_the_result():
    """The reference is not blind to the options the cases above compare: each one moves the output."""
    q, k, v, seg, pos = _inputs(1, 96, 2, 1, 64, F32, segments=True)
    base = reference_attention(q, k, v, segment_ids=seg, positions=pos)
    for opts in (
        dict(sliding_window=8),
        dict(chunk_size=16),
        dict(partial_rotary_factor=0.5),
        dict(rope_layout="interleaved"),
        dict(rope=False),
    ):
        assert _max_rel_err(reference_attention(q, k, v, segment_ids=seg, positions=pos, **opts), base) > 1e-2, opts
    nope = reference_attention(q, k, v, segment_ids=seg, positions=pos, rope=False)
    warm = reference_attention(q, k, v, segment_ids=seg, positions=pos, rope=False, nope_temperature=(2.0, 0.5))
    assert _max_rel_err(warm, nope) > 1e-2


def test_window_covering_the_document_equals_global():
    """A window at least as long as every document is global attention; a chunk likewise."""
    q, k, v, seg, pos = _inputs(1, 160, 2, 1, 64, F32)
    run = lambda **o: flash_attention(
        q, k, v, segment_ids=seg, positions=pos, interpret=True, backend="gpu", block_q=32, block_k=32, **o
    )
    glob = run()
    np.testing.assert_allclose(run(sliding_window=160), glob, atol=1e-6)
    np.testing.assert_allclose(run(chunk_size=160), glob, atol=1e-6)


def test_local_layer_grid_grows_linearly_in_seq_len():
    """A local layer's grid covers the band only: steps ~ S * W / (bq * bk), for every kernel and both forms."""
    W = 4096
    for backend in ("tpu", "gpu"):
        shape = dict(num_heads=2, num_kv_heads=1, head_dim=128, backend=backend)
        local = {S: grid_steps(S, sliding_window=W, **shape) for S in (16384, 32768, 65536, 131072)}
        glob = {S: grid_steps(S, **shape) for S in (16384, 32768)}
        chunked = {S: grid_steps(S, chunk_size=W, packed=True, **shape) for S in (32768, 65536, 131072)}
        for name in ("forward", "dkv", "dq"):
            # Doubling S adds the same number of steps each time: linear, not quadratic.
            d1 = local[32768][name] - local[16384][name]
            d2 = local[65536][name] - local[32768][name]
            d3 = local[131072][name] - local[65536][name]
            assert d2 == 2 * d1 and d3 == 2 * d2, (backend, name, local)
            c1, c2 = chunked[65536][name] - chunked[32768][name], chunked[131072][name] - chunked[65536][name]
            assert c2 == 2 * c1, (backend, name, chunked)
            assert glob[32768][name] > 3.5 * glob[16384][name]  # global: quadratic
            assert local[32768][name] < 0.3 * glob[32768][name]


def test_grid_and_cost_estimate_cover_only_the_band():
    """The grids and CostEstimates the pallas_calls carry are what describe() reports, and FLOPs follow the band."""
    S, W = 640, 200
    q = jnp.ones((1, S, 2, 64), F32)
    loss = lambda q: flash_attention(q, q, q, sliding_window=W, interpret=True, block_q=128, block_k=128).sum()
    txt = str(jax.make_jaxpr(jax.grad(loss))(q))
    plan = describe(S, num_heads=2, num_kv_heads=2, head_dim=64, sliding_window=W, block_q=128, block_k=128)
    grids = [tuple(int(x) for x in g.split(",")) for g in re.findall(r"grid=\(([0-9, ]+)\)", txt)]
    flops = [int(f) for f in re.findall(r"CostEstimate\(flops=(\d+)", txt)]
    assert grids == [plan[n]["grid"] for n in ("forward", "dkv", "dq")]
    assert flops == [plan[n]["flops"] for n in ("forward", "dkv", "dq")]
    assert grids[0] == (1, 2, 5, 3)  # 5 q blocks x 3 kv blocks of 128 reach back 199 keys
    # Forward FLOPs: local at 128k is about W / (S / 2) of global (the causal half) at 128k.
    big = dict(num_heads=32, num_kv_heads=8, head_dim=128)
    local = describe(131072, sliding_window=4096, **big)["forward"]["flops"]
    glob = describe(131072, **big)["forward"]["flops"]
    assert 0.9 * 4096 / 65536 < local / glob < 1.2 * (4096 + 512) / 65536


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        (((1, 128, 4, 96), (1, 128, 4, 96)), {}, r"head_dim E=96 is not supported"),
        (((1, 128, 6, 64), (1, 128, 4, 64)), {}, r"Hq=6 must be a multiple of num kv heads Hkv=4"),
        (((1, 128, 4, 64), (1, 64, 4, 64)), {}, r"k/v must be \[B, S, Hkv, E\]"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"positions": jnp.zeros((1, 64), jnp.int32)}, r"positions must be"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"segment_ids": jnp.zeros((128,), jnp.int32)}, r"segment_ids must be"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"block_q": 96}, r"block_q=96 must be a multiple of 128"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"block_k": 48, "backend": "gpu"}, r"block_k=48 must be a power of two"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"inv_freq": jnp.ones((64,))}, r"inv_freq must have shape"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"sliding_window": 0}, r"sliding_window must be an int >= 1"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"chunk_size": 1.5}, r"chunk_size must be an int >= 1"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"sliding_window": 8, "chunk_size": 8}, r"not both"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"sliding_window": 8, "causal": False}, r"need causal=True"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"partial_rotary_factor": 0.0}, r"must be in \(0, 1\]"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"partial_rotary_factor": 0.3}, r"rot_dim = int\(64 \* f\) = 19"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"rope_layout": "pairs"}, r"rope_layout must be 'half'"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"nope_temperature": (4.0, 0.1)}, r"NoPE layers only"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"partial_rotary_factor": 0.25, "backend": "gpu"}, r"on GPU, rot_dim"),
        (((1, 128, 4, 64), (1, 128, 4, 64)), {"inv_freq": jnp.ones((32,)), "partial_rotary_factor": 0.5}, r"(16,)"),
    ],
)
def test_bad_inputs_raise_clear_errors(shapes, kwargs, match):
    q_shape, kv_shape = shapes
    q, kv = jnp.zeros(q_shape, F32), jnp.zeros(kv_shape, F32)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, kv, kv, interpret=True, **kwargs)


def test_cpu_without_interpret_raises():
    if jax.default_backend() != "cpu":
        pytest.skip("only meaningful on a CPU-only host")
    x = jnp.zeros((1, 128, 2, 64), F32)
    with pytest.raises(ValueError, match="interpret=True"):
        flash_attention(x, x, x)


# ----------------------------------------------------------------------------- real compilers


def _v5p_single_device_sharding():
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
    except Exception as e:  # libtpu absent or too old for this topology
        pytest.skip(f"TPU topology unavailable (is libtpu installed?): {e}")
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


@pytest.mark.parametrize(("rope", "D", "causal"), [(True, 128, True), (False, 64, False)])
def test_tpu_lowering_compiles_ahead_of_time_for_v5p(rope, D, causal):
    """Mosaic (the real TPU compiler in libtpu) accepts forward and backward, not only the interpreter."""
    sharding = _v5p_single_device_sharding()
    B, S, Hq, Hkv = 1, 1024, 4, 2
    q = jax.ShapeDtypeStruct((B, S, Hq, D), BF16, sharding=sharding)
    kv = jax.ShapeDtypeStruct((B, S, Hkv, D), BF16, sharding=sharding)
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=sharding)

    def loss(q, k, v, seg, pos):
        o = flash_attention(q, k, v, segment_ids=seg, positions=pos, rope=rope, causal=causal, backend="tpu")
        return o.astype(F32).sum()

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3


def test_local_layer_tpu_lowering_compiles_ahead_of_time_for_v5p():
    """Mosaic accepts the banded grids, partial interleaved RoPE (16 + 16 + 96 lanes) and the temperature."""
    sharding = _v5p_single_device_sharding()
    B, S, Hq, Hkv = 1, 1024, 4, 2
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=sharding)
    layers = [
        (128, dict(sliding_window=300, partial_rotary_factor=0.25, rope_layout="interleaved")),
        (64, dict(rope=False, chunk_size=512, nope_temperature=(64.0, 0.1))),
    ]
    for D, opts in layers:
        q = jax.ShapeDtypeStruct((B, S, Hq, D), BF16, sharding=sharding)
        kv = jax.ShapeDtypeStruct((B, S, Hkv, D), BF16, sharding=sharding)

        def loss(q, k, v, seg, pos, opts=opts):
            o = flash_attention(q, k, v, segment_ids=seg, positions=pos, backend="tpu", **opts)
            return o.astype(F32).sum()

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
        assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 3, opts


def _lower_for_cuda(fn, *args) -> str:
    """StableHLO for CUDA from a host without a GPU (Pallas -> Triton IR runs; PTX needs a GPU)."""
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
        if "No supported GPU devices" not in str(e):
            raise
    # Newer JAX (0.12) wants the target GPU named when none is attached: an abstract H100.
    from jax._src import mesh as mesh_lib

    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


LOCAL_GPU = dict(sliding_window=100, partial_rotary_factor=0.25, rope_layout="interleaved")


@pytest.mark.parametrize("opts", [{}, LOCAL_GPU], ids=["global", "local"])
def test_gpu_lowering_emits_triton_kernels(opts):
    """Forward, dK/dV and dQ lower through Pallas's Triton backend (GQA 6:2, RoPE, segments)."""
    B, S, Hq, Hkv, D = 1, 256, 6, 2, 128
    q = jax.ShapeDtypeStruct((B, S, Hq, D), BF16)
    kv = jax.ShapeDtypeStruct((B, S, Hkv, D), BF16)
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)

    def loss(q, k, v, seg, pos):
        o = flash_attention(q, k, v, segment_ids=seg, positions=pos, rope=True, backend="gpu", **opts)
        return o.astype(F32).sum()

    text = _lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, kv, kv, ids, ids)
    assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_wide_rows_take_half_tiles(dtype):
    # On an H200 the default GPU tiles asked for 240 KiB (bf16) / 289 KiB (fp32) of shared memory at D = 256
    # (227 KiB available); rows of 512 bytes or more must take the halved tiles, narrower rows keep the defaults.
    wide = describe(4096, head_dim=256, dtype=dtype, backend="gpu")
    narrow = describe(4096, head_dim=64 if dtype == jnp.float32 else 128, dtype=dtype, backend="gpu")
    assert wide["forward"]["grid"][0] == 4096 // 64 and wide["dkv"]["grid"][0] == 4096 // 32
    assert narrow["forward"]["grid"][0] == 4096 // 128 and narrow["dkv"]["grid"][0] == 4096 // 64
