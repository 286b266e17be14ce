"""Mixture of experts: the layer against an explicit per-token reference, capacity drops, balance
losses by their formulas, the expert-bias update, expert parallelism against one device, checkpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nopejax
from benchmarks.hlo_collectives import collective_bytes
from nopejax import checkpoint, config, context, layers, model, moe, sharding, train, validation
from nopejax.config import ConfigError
from tests.test_train import random_batches, run_steps


def moe_cfg(**changes):
    """A model config for the layer alone: odd sizes (D 13, E 5, G 7)."""
    m = config.base_config().model
    m.update(d_model=13, num_experts=5, experts_per_token=2, expert_d_ff=7, d_ff=11)
    m.update(**changes)
    return m


def init_layer(m, seed=0):
    """One MoE layer's params (random router and experts; a nonzero expert bias)."""
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    p = {name: 0.4 * jax.random.normal(next(keys), fn(m)) for name, (fn, _) in moe.moe_params(m).items()}
    p["expert_bias"] = 0.1 * jax.random.normal(next(keys), (m.num_experts,))
    return p


def reference(p, h_BSD, m, chosen_BSK):
    """Every token through each of its chosen experts: that expert's weights gathered per token
    (no sorting, no grouped matmul), weighted as the formulas say, summed over the k choices."""
    logits_BSX = h_BSD @ p["router"]
    scores_BSX = jax.nn.softmax(logits_BSX, -1) if m.router == "softmax" else jax.nn.sigmoid(logits_BSX)
    w_BSK = jnp.take_along_axis(scores_BSX, jnp.asarray(chosen_BSK), axis=-1)
    if m.router_normalize:
        w_BSK = w_BSK / jnp.sum(w_BSK, -1, keepdims=True)
    w_BSK = w_BSK * m.routed_scale
    y_BSD = jnp.zeros_like(h_BSD)
    for j in range(chosen_BSK.shape[-1]):
        e_BS, w_BS1 = chosen_BSK[..., j], w_BSK[..., j, None]
        x_BSD = h_BSD * w_BS1 if m.router_scale_input else h_BSD
        gate = jnp.einsum("bsd,bsdg->bsg", x_BSD, p["expert_gate"][e_BS])
        up = jnp.einsum("bsd,bsdg->bsg", x_BSD, p["expert_up"][e_BS])
        out_BSD = jnp.einsum("bsg,bsgd->bsd", jax.nn.silu(gate) * up, p["expert_down"][e_BS])
        y_BSD = y_BSD + (out_BSD if m.router_scale_input else w_BS1 * out_BSD)
    if m.num_shared_experts:
        shared = jax.nn.silu(h_BSD @ p["shared_gate"]) * (h_BSD @ p["shared_up"])
        gate = 1 / (1 + jnp.exp(-(h_BSD @ p["shared_out_gate"]))) if m.shared_expert_gate else 1.0  # [B, S, 1]
        y_BSD = y_BSD + gate * (shared @ p["shared_down"])
    return y_BSD


def top_k_numpy(p, h_BSD, m):
    """The experts each token picks: top k of score + bias, computed in numpy."""
    logits = np.asarray(h_BSD @ p["router"], np.float64)
    scores = (
        np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) if m.router == "softmax" else 1 / (1 + np.exp(-logits))
    )
    return np.argsort(-(scores + np.asarray(p["expert_bias"])), axis=-1, kind="stable")[..., : m.experts_per_token]


CASES = {
    "softmax_k1": dict(router="softmax", experts_per_token=1),
    "softmax_k2_shared2_normalized": dict(
        router="softmax", experts_per_token=2, num_shared_experts=2, router_normalize=True
    ),
    "sigmoid_k4_afmoe": dict(
        router="sigmoid", experts_per_token=4, num_shared_experts=1, router_normalize=True, routed_scale=2.5
    ),
    "sigmoid_k1_llama4": dict(router="sigmoid", experts_per_token=1, num_shared_experts=1, router_scale_input=True),
    # the 10 tokens through the experts 2 at a time (moe_dispatch_chunks), the input scaled as in Llama 4
    "sigmoid_k2_llama4_chunks5": dict(router="sigmoid", router_scale_input=True, moe_dispatch_chunks=5),
    "softmax_k2_gated_shared_qwen3_next": dict(
        router="softmax", experts_per_token=2, num_shared_experts=1, router_normalize=True, shared_expert_gate=True
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_equals_explicit_per_token_reference_forward_and_gradients(case):
    m = moe_cfg(**CASES[case])
    p = init_layer(m)
    h_BSD = jax.random.normal(jax.random.key(7), (2, 5, m.d_model))
    chosen = top_k_numpy(p, h_BSD, m)
    r_BSD = jax.random.normal(jax.random.key(8), h_BSD.shape)

    def ours(p, h):
        y, aux = moe.moe_ffn(p, h, m, jnp.float32)
        return jnp.sum(y * r_BSD), (y, aux)

    def ref(p, h):
        y = reference(p, h, m, chosen)
        return jnp.sum(y * r_BSD), y

    (_, (y, aux)), g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(p, h_BSD)
    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(ref, argnums=(0, 1), has_aux=True))(p, h_BSD)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for name in g[0]:
        np.testing.assert_allclose(g[0][name], g_ref[0][name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-4, atol=1e-6)
    assert not np.any(g[0]["expert_bias"])  # steers selection only, never trained by gradients
    # dropless: every assignment is computed and counted
    assert float(aux["dropped"]) == 0
    np.testing.assert_array_equal(aux["load"], np.bincount(chosen.ravel(), minlength=m.num_experts))


def test_dropless_keeps_every_token_when_all_pick_one_expert():
    m = moe_cfg(experts_per_token=1)
    p = init_layer(m)
    p["expert_bias"] = jnp.array([100.0, 0, 0, 0, 0])  # every token picks expert 0
    h_BSD = jax.random.normal(jax.random.key(3), (3, 7, m.d_model))
    y, aux = jax.jit(lambda p, h: moe.moe_ffn(p, h, m, jnp.float32))(p, h_BSD)
    np.testing.assert_array_equal(aux["load"], [21, 0, 0, 0, 0])
    np.testing.assert_allclose(y, reference(p, h_BSD, m, np.zeros((3, 7, 1), int)), rtol=1e-5, atol=1e-6)


def test_capacity_mode_drops_later_tokens_and_counts_them():
    # identity router on one-hot inputs: token s picks expert want[s]; capacity ceil(1.0 * 6 * 1 / 3) = 2
    m = moe_cfg(d_model=3, num_experts=3, experts_per_token=1, capacity_factor=1.0)
    assert moe.capacity(m, 6) == 2
    p = init_layer(m)
    p["router"], p["expert_bias"] = jnp.eye(3), jnp.zeros(3)
    want = [0, 0, 1, 0, 0, 2]  # expert 0 gets tokens 0, 1, 3, 4: the last two are dropped
    h_BSD = 3.0 * jax.nn.one_hot(jnp.array([want]), 3)
    y, aux = jax.jit(lambda p, h: moe.moe_ffn(p, h, m, jnp.float32))(p, h_BSD)
    assert float(aux["dropped"]) == 2
    np.testing.assert_array_equal(aux["load"], [2, 1, 1])
    kept = reference(p, h_BSD, m, np.array(want).reshape(1, 6, 1))
    np.testing.assert_allclose(y[0, [0, 1, 2, 5]], kept[0, [0, 1, 2, 5]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[0, [3, 4]], 0.0)


def test_balance_and_z_losses_equal_their_formulas_on_a_hand_made_routing():
    m = moe_cfg(d_model=2, num_experts=2, experts_per_token=1)
    p = init_layer(m)
    p["router"], p["expert_bias"] = jnp.eye(2), jnp.zeros(2)
    h_BSD = jnp.array([[[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])  # logits = h: 3 tokens to 0, 1 to 1
    _, _, aux = moe.route(p, h_BSD, m)
    p_hi = math.exp(2) / (math.exp(2) + 1)  # softmax([2, 0])[0]
    f = [3 / 4, 1 / 4]
    P = [(3 * p_hi + (1 - p_hi)) / 4, (3 * (1 - p_hi) + p_hi) / 4]
    assert float(aux["balance"]) == pytest.approx(2 * (f[0] * P[0] + f[1] * P[1]), rel=1e-6)
    assert float(aux["z"]) == pytest.approx(math.log(math.exp(2) + 1) ** 2, rel=1e-6)
    # sigmoid router: P uses the scores normalised per token
    m = moe_cfg(d_model=2, num_experts=2, experts_per_token=1, router="sigmoid")
    _, _, aux = moe.route(p, h_BSD, m)
    s_hi, s_lo = 1 / (1 + math.exp(-2)), 0.5
    q = s_hi / (s_hi + s_lo)
    P = [(3 * q + (1 - q)) / 4, (3 * (1 - q) + q) / 4]
    assert float(aux["balance"]) == pytest.approx(2 * (f[0] * P[0] + f[1] * P[1]), rel=1e-6)
    # perfectly balanced routing with uniform probabilities gives exactly 1
    m = moe_cfg(d_model=2, num_experts=2, experts_per_token=1)
    p["router"] = jnp.array([[1.0, -1.0], [-1.0, 1.0]]) * 1e-3
    _, _, aux = moe.route(p, jnp.array([[[1.0, 0.0], [0.0, 1.0]]]), m)
    assert float(aux["balance"]) == pytest.approx(1.0, rel=1e-5)


def test_expert_bias_update_moves_a_skewed_router_toward_balance():
    m = moe_cfg(num_experts=4, experts_per_token=1, router="sigmoid")
    p = init_layer(m)
    p["router"] = p["router"].at[:, 0].add(0.5)  # expert 0 favoured: inputs have a positive mean
    p["expert_bias"] = jnp.zeros(4)
    h_BSD = jax.random.normal(jax.random.key(5), (4, 64, m.d_model)) + 0.5
    route = jax.jit(lambda p: moe.route(p, h_BSD, m)[2])
    metrics = []
    for _ in range(40):
        aux = jax.tree.map(lambda a: a[None], route(p))
        metrics.append(moe.load_metrics(aux))
        p["expert_bias"] = moe.update_expert_bias(p["expert_bias"][None], aux["load"], 0.05)[0]
    assert float(metrics[0]["moe_load_max"]) > 2.0  # skewed at the start
    assert float(metrics[-1]["moe_load_max"]) < 1.5
    assert float(metrics[-1]["moe_load_entropy"]) > float(metrics[0]["moe_load_entropy"]) + 0.2
    assert float(p["expert_bias"][0]) < 0  # the favoured expert is pushed down


# ---------------------------------------------------------------------------------------------
# Token dispatchers over the expert axis


def layer_on_mesh(p, h_BSD, r_BSD, m, mesh_sizes=None):
    """(output, aux, gradients of sum(output * r) wrt (params, inputs)), on a mesh of 8 fake
    devices with these axis sizes, or on one device (no mesh) when mesh_sizes is None."""

    def f(p, h):
        y, aux = moe.moe_ffn(p, h, m, jnp.float32)
        return jnp.sum(y * r_BSD), (y, aux)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    if mesh_sizes is None:
        (_, (y, aux)), g = fn(p, h_BSD)
        return y, aux, g
    mesh_cfg = config.base_config().mesh
    mesh_cfg.update({"data": 1, **mesh_sizes})
    with jax.set_mesh(sharding.make_mesh(mesh_cfg)):
        (_, (y, aux)), g = fn(p, h_BSD)
    return y, aux, g


def numpy_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes):
    """jax.lax.ragged_all_to_all as its docstring specifies, over P devices' numpy arrays: entry i of
    sender q's arguments sends operand[q][input_offsets[i] : + send_sizes[i]] to device i // (N / P),
    written there at output_offsets[i]; each receiver's recv_sizes must list what arrives."""
    P, N = len(operands), len(input_offsets[0])
    per = N // P
    results = [o.copy() for o in outputs]
    for q in range(P):
        for i in range(N):
            p, j = divmod(i, per)
            n = send_sizes[q][i]
            assert recv_sizes[p][q * per + j] == n
            results[p][output_offsets[q][i] : output_offsets[q][i] + n] = operands[q][input_offsets[q][i] :][:n]
    return results


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """The same semantics inside shard_map from all-gathers and selects (XLA:CPU has no ragged
    all-to-all): each output row takes the sender row whose slice covers it."""
    P = jax.lax.axis_size(axis_name)
    per = input_offsets.shape[0] // P
    me = jax.lax.axis_index(axis_name)
    ops, starts, sizes, dests = (
        jax.lax.all_gather(a, axis_name, axis=0, tiled=False)
        for a in (operand, input_offsets, send_sizes, output_offsets)
    )
    rows = jnp.arange(output.shape[0])
    out = output
    for q in range(P):
        for j in range(per):
            i = me * per + j  # sender q's slice for this device
            start, size, dest = starts[q, i], sizes[q, i], dests[q, i]
            inside = (rows >= dest) & (rows < dest + size)
            vals = jnp.take(ops[q], jnp.clip(start + rows - dest, 0, operand.shape[0] - 1), axis=0)
            out = jnp.where(inside.reshape(-1, *[1] * (out.ndim - 1)), vals, out)
    return out


@pytest.mark.parametrize("P,Y,seed", [(2, 3, 0), (4, 2, 1), (3, 4, 2)])
def test_ragged_layout_delivers_each_row_to_its_expert_and_back(P, Y, seed):
    """The ragged dispatcher's offsets and sizes (moe.ragged_layout), run through the documented
    ragged all-to-all in numpy: every receiver gets exactly the rows chosen for its experts, grouped
    by local expert and, within an expert, by sender then sender order; the return trip puts each
    output back on the row it came from. Random counts with empty experts and a skewed device."""
    rng = np.random.default_rng(seed)
    X, D = P * Y, 3
    counts_QX = rng.integers(0, 4, (P, X)) * (rng.random((P, X)) < 0.7)
    counts_QX[:, :Y] += 5  # device 0's experts chosen most
    # each sender's rows, sorted by expert: (sender, expert, index among the sender's rows) as data
    sent = [np.repeat(np.arange(X), counts_QX[q]) for q in range(P)]
    rows = [np.stack([np.full(len(e), q), e, np.arange(len(e))], 1).astype(np.float64) for q, e in enumerate(sent)]
    W = max(counts_QX[:, p * Y : (p + 1) * Y].sum() for p in range(P)) + 2  # 2 spare rows
    layouts = [moe.ragged_layout(jnp.asarray(counts_QX.reshape(P, P, Y)), q) for q in range(P)]
    forward, back, groups = zip(*layouts)
    args = [[np.asarray(f[a]) for f in forward] for a in range(4)]
    received = numpy_ragged_all_to_all(rows, [np.full((W, D), -1.0) for _ in range(P)], *args)
    for p in range(P):
        expected = [r for y in range(Y) for q in range(P) for r in rows[q] if r[1] == p * Y + y]
        np.testing.assert_array_equal(received[p][: len(expected)], np.array(expected).reshape(-1, D))
        assert (received[p][len(expected) :] == -1).all()  # the spare rows untouched
        np.testing.assert_array_equal(groups[p], counts_QX[:, p * Y : (p + 1) * Y].sum(0))
    outputs = [r * 10 for r in received]  # the "experts": any per-row function
    args = [[np.asarray(b[a]) for b in back] for a in range(4)]
    returned = numpy_ragged_all_to_all(outputs, [np.zeros_like(r) for r in rows], *args)
    for q in range(P):
        np.testing.assert_array_equal(returned[q], rows[q] * 10)


def test_ragged_dispatch_is_refused_on_cpu_in_one_line():
    cfg = small_moe_cfg(expert=2, data=4)
    cfg.model.moe_dispatch = "ragged"
    with pytest.raises(ConfigError, match=r"model\.moe_dispatch.*XLA:CPU") as err:
        train.setup(cfg)
    assert "\n" not in str(err.value) and "allgather" in str(err.value)
    cfg.mesh.update(expert=1, data=8)  # nothing to dispatch over: allowed, computed in place
    train.setup(cfg)


@pytest.mark.parametrize(
    ("mesh", "capacity_factor"),
    [
        (dict(expert=4, data=2), 1.0),
        (dict(fsdp=2, expert=2, tensor=2), 0.0),
        (dict(expert=2, context=2, tensor=2), 0.0),
    ],
    ids=["expert4_data2_capacity", "fsdp2_expert2_tensor2_dropless", "expert2_context2_tensor2_dropless"],
)
def test_all_to_all_and_ragged_dispatch_equal_allgather_and_one_device(mesh, capacity_factor, monkeypatch):
    """Forward and gradients, for a random router and one where every token picks experts 0 and 1
    (all on the expert group's first device: its buffer is full, the dropless worst case; in
    capacity mode the buffers hold rows * Y * capacity tokens). Capacity 1.0 gives each expert 2 of a
    row's 12 assignments, so on expert 4 x data 2 the all-to-all buffers (1 row * 2 experts * 2 slots)
    are below the 6 local tokens. The all-gather dispatcher also in 4 chunks (moe_dispatch_chunks).
    The ragged dispatcher runs with an emulated ragged all-to-all
    (`emulated_ragged_all_to_all`, XLA:CPU has none); its receive buffer is sized as on TPU."""
    monkeypatch.setattr(moe, "_ragged_all_to_all", emulated_ragged_all_to_all)
    m = moe_cfg(d_model=14, num_experts=8, expert_d_ff=10, num_shared_experts=1, router="sigmoid")
    m.update(router_normalize=True, capacity_factor=capacity_factor)
    p = init_layer(m)
    h_BSD = jax.random.normal(jax.random.key(7), (8, 6, m.d_model))
    r_BSD = jax.random.normal(jax.random.key(8), h_BSD.shape)
    for skew in (0.0, 100.0):
        p["expert_bias"] = p["expert_bias"].at[:2].add(skew)
        y_one, aux, g_one = layer_on_mesh(p, h_BSD, r_BSD, m)
        if not capacity_factor:  # dropless: every assignment computed, as the explicit reference says
            assert float(aux["dropped"]) == 0
            np.testing.assert_allclose(y_one, reference(p, h_BSD, m, top_k_numpy(p, h_BSD, m)), rtol=1e-5, atol=1e-5)
        elif skew:
            assert float(aux["dropped"]) > 0
        for dispatch, chunks in (("all_to_all", 1), ("ragged", 1), ("allgather", 4), ("allgather", 1)):
            m.update(moe_dispatch=dispatch, moe_dispatch_chunks=chunks)  # 4 chunks of the group's 24 tokens
            y, aux_mesh, g = layer_on_mesh(p, h_BSD, r_BSD, m, mesh)
            np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-5, err_msg=dispatch)
            assert float(aux_mesh["dropped"]) == float(aux["dropped"])
            for name in g[0]:
                np.testing.assert_allclose(g[0][name], g_one[0][name], rtol=1e-4, atol=1e-5, err_msg=name)
            np.testing.assert_allclose(g[1], g_one[1], rtol=1e-4, atol=1e-5, err_msg=dispatch)


@pytest.mark.parametrize("mesh", [dict(context=2, expert=2, data=2), dict(context=4, expert=2)], ids=str)
def test_capacity_under_context_parallelism_equals_one_device(mesh):
    """Capacity mode keeps each expert's earliest assignments of the true sequence, also when the
    rows arrive in zig-zag order (nopejax/context.py): forward, load, drops and gradients equal one
    device in natural order, for both dispatchers. The skewed bias sends every token to experts
    0 and 1, so the cut falls inside the row and zig-zag order would keep later tokens."""
    m = moe_cfg(d_model=12, num_experts=8, expert_d_ff=10, router="sigmoid", router_normalize=True)
    m.update(capacity_factor=1.5)  # D 12: the expert weights' embed axis is split over context 4
    p = init_layer(m)
    p["expert_bias"] = p["expert_bias"].at[:2].add(100.0)
    B, S = 4, 16  # capacity ceil(1.5 * 16 * 2 / 8) = 6 of a row's 16 assignments to expert 0: past a chunk
    h_BSD = jax.random.normal(jax.random.key(7), (B, S, m.d_model))
    r_BSD = jax.random.normal(jax.random.key(8), h_BSD.shape)
    y_one, aux_one, g_one = layer_on_mesh(p, h_BSD, r_BSD, m)
    assert float(aux_one["dropped"]) == B * 2 * (S - moe.capacity(m, S))
    order = context.zigzag_order(S, mesh["context"])
    natural = np.argsort(order)
    for dispatch in ("allgather", "all_to_all"):
        m.moe_dispatch = dispatch
        y, aux, g = layer_on_mesh(p, h_BSD[:, order], r_BSD[:, order], m, mesh)
        np.testing.assert_allclose(y[:, natural], y_one, rtol=1e-5, atol=1e-5, err_msg=dispatch)
        np.testing.assert_array_equal(aux["load"], aux_one["load"])
        assert float(aux["dropped"]) == float(aux_one["dropped"])
        for name in g[0]:
            np.testing.assert_allclose(g[0][name], g_one[0][name], rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(g[1][:, natural], g_one[1], rtol=1e-4, atol=1e-5, err_msg=dispatch)


@pytest.mark.parametrize(
    ("dispatch", "capacity_factor"), [("allgather", 0.0), ("all_to_all", 0.0), ("all_to_all", 1.0)]
)
def test_layer_moves_tokens_by_its_dispatchers_collectives(dispatch, capacity_factor):
    """The compiled layer (router and dispatcher) on expert 4 x data 2, one row of 7 tokens per
    device: the all-gather dispatcher gathers the group's tokens and reduce-scatters their outputs;
    the all-to-all one moves fixed buffers by all-to-all only (no gather to fall back on), T slots
    per destination when dropless and rows * Y * capacity in capacity mode. The router's top k
    stays on each device's tokens. Bytes from the shapes."""
    m = moe_cfg(num_experts=8, expert_d_ff=10, moe_dispatch=dispatch, capacity_factor=capacity_factor)
    B, S, D, k, N = 8, 7, m.d_model, m.experts_per_token, 4
    p = init_layer(m)
    mesh_cfg = config.base_config().mesh
    mesh_cfg.update(data=2, expert=N)
    with jax.set_mesh(sharding.make_mesh(mesh_cfg)):
        layer = jax.jit(lambda p, h: moe.moe_ffn(p, h, m, jnp.float32)[0])
        table = collective_bytes(layer.lower(p, jnp.ones((B, S, D))).compile().as_text())
    T = B // 8 * S  # tokens per device
    if dispatch == "allgather":  # x [T, D], expert ids and weights [T, k] in; the group's N * T outputs back
        assert set(table) == {"all-gather", "reduce-scatter"}
        assert table["all-gather"]["operand_bytes"] == T * (D + 2 * k) * 4
        assert table["reduce-scatter"]["operand_bytes"] == N * T * D * 4
    else:  # N buffers of C slots: x, ids and weights out, outputs back
        C = T if not capacity_factor else B // 8 * (m.num_experts // N) * moe.capacity(m, S)
        assert C < T or not capacity_factor
        assert set(table) == {"all-to-all"}
        assert table["all-to-all"]["operand_bytes"] == N * C * (2 * D + 2 * k) * 4


# ---------------------------------------------------------------------------------------------
# In the model and the train step


def small_moe_cfg(**mesh):
    """A 3-layer model: layer 0 dense, then MoE (E 4, k 2, one shared expert); heads * head_dim
    (2 * 24) differs from d_model (40), as in Trinity."""
    cfg = config.base_config()
    cfg.model.update(vocab_size=384, d_model=40, num_layers=3, num_heads=2, num_kv_heads=2, head_dim=24, d_ff=56)
    cfg.model.update(num_experts=4, experts_per_token=2, expert_d_ff=12, num_shared_experts=1, num_dense_layers=1)
    cfg.model.update(router="sigmoid", router_normalize=True, balance_loss_weight=0.01, router_z_loss_weight=1e-3)
    cfg.model.update(expert_bias_rate=1e-3, dtype="float32", scan_layers=False)
    cfg.train.update(global_batch_size=8, seq_len=24, steps=20)
    cfg.optim.update(lr=1e-2, warmup_steps=2, decay_steps=5)
    cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    cfg.mesh.update(**mesh)
    return cfg


def test_layer_plan_scans_moe_period_after_the_dense_prefix():
    cfg = small_moe_cfg()
    cfg.model.update(num_layers=7, num_dense_layers=2, moe_layer_interval=2)  # dense: 0, 1, 2, 4, 6
    specs = layers.layer_specs(cfg.model)
    assert [s.ffn for s in specs] == ["dense"] * 3 + ["moe", "dense"] * 2
    shapes = {name: p.shape for name, p in model.create(cfg.model).layers.items()}
    assert shapes["w_gate"][0] == 5 and shapes["expert_gate"][0] == 2 and shapes["wq"][0] == 7
    tokens = jnp.arange(2 * 11).reshape(2, 11) % 300
    outs = []
    for scan in (True, False):
        cfg.model.scan_layers = scan
        graphdef, params = model.split(model.create(cfg.model))
        x, aux = jax.jit(lambda p, g=graphdef: model.apply(g, p, tokens, method="hidden_and_aux"))(params)
        outs.append((x, aux["load"]))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert outs[0][1].shape == (2, 4)


@pytest.fixture(scope="module")
def one_device_moe():
    cfg = small_moe_cfg()
    return run_steps(cfg, random_batches(cfg, 5), jax.devices()[:1])


@pytest.mark.parametrize(
    ("mesh", "dispatch"),
    [  # the all-to-all dispatcher's layer test above covers the other meshes; a train step is costly
        (dict(expert=4, data=2), "allgather"),
        (dict(fsdp=2, expert=2, tensor=2), "allgather"),
        (dict(expert=4, data=2), "all_to_all"),
    ],
    ids=str,
)
def test_expert_parallel_losses_equal_one_device(mesh, dispatch, one_device_moe):
    cfg = small_moe_cfg(**mesh)
    cfg.model.moe_dispatch = dispatch
    losses, state = run_steps(cfg, random_batches(cfg, 5), jax.devices())
    np.testing.assert_allclose(losses, one_device_moe[0], rtol=1e-4)
    assert losses[-1] < losses[0]
    gate = state["params"]["layers"]["expert_gate"]  # [layers, expert, embed, expert_mlp]
    assert gate.sharding.spec[1] == "expert"
    # the other weights are FSDP-sharded over the expert axis too (the batch is split over it)
    for name, dim in (("wq", 1), ("router", 1)):
        axes = state["params"]["layers"][name].sharding.spec[dim]
        assert "expert" in ((axes,) if isinstance(axes, str) else axes), (name, axes)
    np.testing.assert_allclose(
        state["params"]["layers"]["expert_bias"], one_device_moe[1]["params"]["layers"]["expert_bias"], atol=1e-6
    )


def test_expert_parallel_composes_with_context_parallelism(one_device_moe):
    """expert 2 x context 2 x data 2: rows in zig-zag order (as train.to_device_batch puts them), the
    experts' all-gather over the expert axis sees sequence shards; losses equal one device."""
    cfg = small_moe_cfg(expert=2, context=2, data=2)
    batches = [context.reorder(b, 2) for b in random_batches(cfg, 5)]
    losses, state = run_steps(cfg, batches, jax.devices())
    np.testing.assert_allclose(losses, one_device_moe[0], rtol=1e-4)
    np.testing.assert_allclose(
        state["params"]["layers"]["expert_bias"], one_device_moe[1]["params"]["layers"]["expert_bias"], atol=1e-6
    )


@pytest.fixture(scope="module")
def one_device_capacity():
    """Capacity 0.75: each expert keeps 9 of a row's 48 assignments, so most rows drop some; init std
    0.2 makes the experts' outputs large enough that a different cut moves the loss (by ~2e-3)."""
    cfg = small_moe_cfg()
    cfg.model.update(capacity_factor=0.75, init_std=0.2)
    batches = random_batches(cfg, 3, seed=1)
    return batches, run_steps(cfg, batches, jax.devices()[:1])


@pytest.mark.parametrize(
    ("mesh", "dispatch"),
    [(dict(context=2, expert=2, data=2), "allgather"), (dict(context=4, expert=2), "all_to_all")],
    ids=str,
)
def test_capacity_under_context_parallelism_losses_equal_one_device(mesh, dispatch, one_device_capacity):
    """Train steps on zig-zag rows (as train.to_device_batch puts them) keep the same assignments as
    one device: losses and the load-driven expert bias agree."""
    batches, (want_losses, want_state) = one_device_capacity
    cfg = small_moe_cfg(**mesh)
    cfg.model.update(capacity_factor=0.75, init_std=0.2, moe_dispatch=dispatch)
    C = mesh["context"]
    losses, state = run_steps(cfg, [context.reorder(b, C) for b in batches], jax.devices())
    np.testing.assert_allclose(losses, want_losses, rtol=2e-6)  # measured 2.2e-7; a wrong cut moves it ~2e-3
    np.testing.assert_allclose(
        state["params"]["layers"]["expert_bias"], want_state["params"]["layers"]["expert_bias"], atol=1e-6
    )


def test_capacity_mode_under_context_parallelism_is_causal():
    """Changing the last chunk of a row (tokens 12-15 of 16, stored second under zig-zag on context
    2) leaves the hidden states of tokens 0-11 unchanged: no expert's capacity is spent on a later
    token before an earlier one."""
    cfg = small_moe_cfg(context=2, expert=2)
    cfg.model.capacity_factor = 0.5  # each expert keeps 4 of a row's 32 assignments
    graphdef, params = model.split(model.create(cfg.model, seed=1))
    B, S = 2, 16
    tokens = np.random.default_rng(0).integers(0, 384, (2, B, S)).astype(np.int32)
    tokens[1, :, :12] = tokens[0, :, :12]  # the second batch differs only in tokens 12-15
    order, natural = context.zigzag_order(S, 2), np.argsort(context.zigzag_order(S, 2))
    positions = np.broadcast_to(order, (B, S)).astype(np.int32)
    hidden = jax.jit(lambda p, t, pos: model.apply(graphdef, p, t, pos, method="hidden"))
    with jax.set_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:4])):
        h0, h1 = (np.asarray(hidden(params, t[:, order], positions))[:, natural] for t in tokens)
    np.testing.assert_allclose(h1[:, :12], h0[:, :12], rtol=0, atol=1e-6)
    assert np.abs(h1[:, 12:] - h0[:, 12:]).max() > 0.1


def test_train_step_reports_load_metrics_and_moves_the_expert_bias():
    cfg = small_moe_cfg()
    s = train.setup(cfg, jax.devices()[:1])
    state = train.init_state(s)
    step, _ = train.compile_fns(s)
    batch = random_batches(cfg, 1)[0]
    with jax.set_mesh(s.mesh):
        new, out = step(state, batch)
    for key in ("moe_load_min", "moe_load_max", "moe_load_entropy", "moe_dropped", "moe_balance_loss", "moe_z_loss"):
        assert np.isfinite(float(out[key])), key
    assert float(out["moe_load_min"]) <= 1.0 <= float(out["moe_load_max"])
    bias = np.asarray(new["params"]["layers"]["expert_bias"])
    assert set(np.unique(np.abs(bias))) <= {0.0, np.float32(1e-3)} and np.any(bias)  # one sign step


def test_moe_checkpoint_resumes_bit_exactly_and_restores_on_another_expert_mesh(tmp_path):
    cfg = small_moe_cfg(expert=2, data=2)
    batches = random_batches(cfg, 4, seed=3)
    s = train.setup(cfg, jax.devices()[:4])
    step_fn, _ = train.compile_fns(s)
    state = train.init_state(s)
    trace = []
    with jax.set_mesh(s.mesh):
        for i, b in enumerate(batches):
            state, out = step_fn(state, {k: jax.device_put(v, s.batch_sharding) for k, v in b.items()})
            trace.append(float(out["loss"]))
            if i == 1:
                ckpt = checkpoint.Checkpointer(str(tmp_path), cfg)
                ckpt.save(2, state)
                ckpt.close()
                saved_bias = np.asarray(state["params"]["layers"]["expert_bias"])
    assert np.any(saved_bias)
    for mesh, devices in ((dict(expert=2, data=2), jax.devices()[:4]), (dict(expert=4, fsdp=2), jax.devices())):
        same = mesh == dict(expert=2, data=2)
        cfg2 = small_moe_cfg(**mesh)
        s2 = s if same else train.setup(cfg2, devices)
        restored, step = checkpoint.Checkpointer(str(tmp_path), cfg2).restore_latest(s2.abstract_state)
        assert step == 2
        np.testing.assert_array_equal(restored["params"]["layers"]["expert_bias"], saved_bias)
        step2 = step_fn if same else train.compile_fns(s2)[0]
        resumed = []
        with jax.set_mesh(s2.mesh):
            for b in batches[2:]:
                restored, out = step2(restored, {k: jax.device_put(v, s2.batch_sharding) for k, v in b.items()})
                resumed.append(float(out["loss"]))
        if same:
            assert resumed == trace[2:]  # same mesh: bit-exact
        else:
            np.testing.assert_allclose(resumed, trace[2:], rtol=1e-4)


def test_checkpoint_of_a_dense_model_does_not_restore_into_an_moe_model(tmp_path):
    dense = small_moe_cfg()
    dense.model.update(num_experts=0, num_shared_experts=0, num_dense_layers=0)
    s = train.setup(dense, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(str(tmp_path), dense)
    ckpt.save(1, train.init_state(s), force=True)
    ckpt.close()
    cfg = small_moe_cfg()
    s2 = train.setup(cfg, jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"model\.num_experts"):
        checkpoint.Checkpointer(str(tmp_path), cfg).restore_latest(s2.abstract_state)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(experts_per_token=5), "model.experts_per_token"),
        (dict(router="topk"), "model.router"),
        (dict(num_dense_layers=5), "model.num_dense_layers"),
        (dict(capacity_factor=-1.0), "model.capacity_factor"),
        (dict(router_scale_input=True), "model.router_scale_input"),
        (dict(expert_bias_rate=-0.1), "model.expert_bias_rate"),
        (dict(moe_dispatch="alltoall"), "model.moe_dispatch"),
        (dict(moe_dispatch_chunks=0), "model.moe_dispatch_chunks"),
        (dict(moe_dispatch="ragged", moe_dispatch_chunks=2), "model.moe_dispatch_chunks"),
        (dict(num_shared_experts=0, shared_expert_gate=True), "model.shared_expert_gate"),
    ],
)
def test_bad_moe_configs_name_the_field(changes, field):
    cfg = small_moe_cfg()
    cfg.model.update(**changes)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validation.validate(cfg)


def test_expert_axis_must_divide_experts_and_needs_experts():
    with pytest.raises(ConfigError, match=r"mesh\.expert"):
        validation.validate(small_moe_cfg(expert=3))
    dense = small_moe_cfg(expert=2)
    dense.model.num_experts = 0
    with pytest.raises(ConfigError, match=r"mesh\.expert"):
        validation.validate(dense)


def test_kv_cache_decoding_of_an_moe_model_equals_full_recomputation():
    """nopejax.generate reads the dense-FFN and MoE stacks by their own layer index (scanned runs)."""
    cfg = small_moe_cfg()
    cfg.model.update(num_layers=4, scan_layers=True, init_std=0.2, num_shared_experts=0, router="softmax")
    module = model.create(cfg.model, seed=3)
    prompt = np.array([5, 17, 200, 33, 9, 120, 7], np.int32)
    ids, logits = nopejax.generate(module, prompt, max_new_tokens=6, return_logits=True)
    full = np.asarray(module(jnp.asarray(np.concatenate([prompt, ids])[None])))[0]
    expected = full[len(prompt) - 1 : -1]
    np.testing.assert_allclose(logits, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
    np.testing.assert_array_equal(ids, expected.argmax(-1))
