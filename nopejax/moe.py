"""Mixture-of-experts FFN: the router, dropless grouped matmuls, balance statistics, expert parallelism.

Shape letters as in model.py (B, S, D, F, L), plus M tokens (B * S), X experts, Y experts on
this device, U experts per token (top-k; `k` in formulas), I width of one routed expert, A
assignments (M * U, one per token and chosen expert).

Routing (`route`): router logits in fp32, scores by softmax (Mixtral, Switch) or sigmoid
(DeepSeek-V3, AFMoE, Llama 4); the top k of `scores + expert_bias` pick the experts, the unbiased
scores of those k are the weights (DeepSeek-V3's auxiliary-loss-free balancing: the bias steers
selection only), optionally divided by their sum and times `routed_scale`. Llama 4 instead
multiplies each expert's input by its weight (`router_scale_input`).

Dispatch (`_local_experts`) is dropless by default: the M * k (token, expert) assignments are
sorted by expert, each expert's SwiGLU runs on its contiguous rows with `jax.lax.ragged_dot`
(one grouped matmul over all experts, no padding, no per-expert loop), and the inverse
permutation brings the rows back to token order, where the k results of a token are summed.
With `capacity_factor` > 0 an expert takes at most ceil(cf * S * k / X) assignments per
sequence, earlier tokens first (MaxText's per-sequence capacity); the rest are dropped (weight 0,
sorted past every group so no matmul touches them) and counted. "Earlier" is the true sequence
order, also under context parallelism, whose rows arrive in zig-zag order (`_ranks`): a token's
fate depends only on the tokens before it, and every mesh drops what one device drops.

Expert parallelism (`_dispatch`): experts are split over the `expert` mesh axis, which also splits
the batch everywhere else. Inside `shard_map` each device all-gathers the tokens of its expert
group, runs its Y = X / expert local experts on the assignments that chose them, and a
reduce-scatter sums the partial outputs and returns each device its own tokens (Megatron's
"allgather" token dispatcher). It is dropless without a ragged all-to-all and works on every
backend. Each device receives (expert - 1) * T_local * D values per layer and sends as many back,
where a ragged all-to-all would move about k * T_local * D * (expert - 1) / expert: the same order
for k near the expert-axis size, less for a wide axis and small k. `model.moe_dispatch =
"all_to_all"` (`_all_to_all_experts`) sends each token only to the devices owning its experts,
through `jax.lax.all_to_all` with fixed buffers: sized for the worst case when dropless, which
moves as many bytes as the all-gather, and by the capacity bound in capacity mode, which moves
fewer when capacity_factor * k / expert < 1 / context. `"ragged"` (`_ragged_experts`) sends each
device exactly the assignments its experts got, through `jax.lax.ragged_all_to_all` (TPU, GPU;
XLA:CPU has none), so the bytes follow the routing; its receive buffer is still the worst case.
`model.moe_dispatch_chunks` runs the all-gathered tokens through the experts a chunk at a time.
FSDP shards of the expert weights are gathered inside, tensor-parallel expert widths are summed
with a psum; which mesh axes those are comes from the one logical-axis table (sharding.py).

Balance statistics per MoE layer (`aux`): `load` (assignments each expert kept), the Switch /
GShard loss X * sum_e f_e * P_e (f_e: share of assignments to e before drops, P_e: mean router
probability of e, sigmoid scores normalised per token), the ST-MoE z-loss mean(logsumexp(logits)^2)
and `dropped` (assignments dropped by capacity).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from nopejax import context, sharding
from nopejax.config import ConfigError


def expert_width(m) -> int:
    """G: the width of one routed expert (model.expert_d_ff, or d_ff when 0)."""
    return m.expert_d_ff or m.d_ff


# name -> (shape given the model config, logical axes), one per MoE layer (leading `layers` implied)
MOE_PARAMS = {
    "router": (lambda m: (m.d_model, m.num_experts), ("embed", None)),
    # not trained by gradients: the train step moves it toward balanced load (update_expert_bias)
    "expert_bias": (lambda m: (m.num_experts,), (None,)),
    "expert_gate": (lambda m: (m.num_experts, m.d_model, expert_width(m)), ("expert", "expert_embed", "expert_mlp")),
    "expert_up": (lambda m: (m.num_experts, m.d_model, expert_width(m)), ("expert", "expert_embed", "expert_mlp")),
    "expert_down": (lambda m: (m.num_experts, expert_width(m), m.d_model), ("expert", "expert_mlp", "expert_embed")),
}
SHARED_PARAMS = {
    "shared_gate": (lambda m: (m.d_model, m.num_shared_experts * expert_width(m)), ("embed", "mlp")),
    "shared_up": (lambda m: (m.d_model, m.num_shared_experts * expert_width(m)), ("embed", "mlp")),
    "shared_down": (lambda m: (m.num_shared_experts * expert_width(m), m.d_model), ("mlp", "embed")),
    # model.shared_expert_gate (Qwen3-Next): the shared output times sigmoid(h @ shared_out_gate)
    "shared_out_gate": (lambda m: (m.d_model, 1), ("embed", None)),
}


def moe_params(m) -> dict:
    """The params of one MoE layer for this config: name -> (shape fn, logical axes)."""
    shared = {} if not m.num_shared_experts else {
        name: v for name, v in SHARED_PARAMS.items() if name != "shared_out_gate" or m.shared_expert_gate
    }  # fmt: skip
    return {**MOE_PARAMS, **shared}


def capacity(m, seq_len: int) -> int:
    """Assignments one expert takes per sequence in capacity mode."""
    return math.ceil(m.capacity_factor * seq_len * m.experts_per_token / m.num_experts)


def _ranks(chosen_BSUX):
    """-> [B, S, U]: the rank of each assignment among those of its row to the same expert, in true
    (token, slot) order: how many come before it in the sequence.

    Under context parallelism the rows are in zig-zag order (nopejax/context.py): Z = 2C blocks of
    S / Z tokens (A = S / Z * U assignments), block i holding the true chunk `chunks[i]`; without it,
    Z = 1. The rank is the count before it within its block plus the assignments of the chunks
    before its chunk in the sequence, so whether a token is dropped depends only on earlier tokens
    (causal) and equals the one-device result; only the per-block totals [B, Z, X] cross devices.
    """
    B, S, k, X = chosen_BSUX.shape
    C = sharding.context_size()
    chunks = context.zigzag_order(2 * C, C) if C > 1 else np.zeros(1, int)  # true chunk of each block
    n = len(chunks)
    blocks_BZAX = chosen_BSUX.reshape(B, n, S // n * k, X)
    within_BZAX = jnp.cumsum(blocks_BZAX, axis=2) - blocks_BZAX
    totals_BZX = jnp.sum(blocks_BZAX, axis=2)[:, np.argsort(chunks)]  # in true chunk order
    before_BZX = (jnp.cumsum(totals_BZX, axis=1) - totals_BZX)[:, chunks]  # back in block order
    rank_BZA = jnp.sum((within_BZAX + before_BZX[:, :, None]) * blocks_BZAX, axis=-1)
    return rank_BZA.reshape(B, S, k)


def _top_k(x_BSX, k: int):
    """-> [B, S, k] int32: the indices of each token's k largest entries, per shard under a mesh.

    Left to the SPMD partitioner, top_k of batch-sharded scores all-gathers the scores of the whole
    global batch onto every device, one all-gather per MoE layer (XLA:CPU, jax 0.10; a TPU compile
    keeps it local either way); tokens are independent, so each device takes the top k of its own.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return jax.lax.top_k(x_BSX, k)[1]
    spec = sharding.logical_to_spec(("act_batch", "act_seq", None), mesh)
    return jax.shard_map(lambda x: jax.lax.top_k(x, k)[1], mesh=mesh, in_specs=spec, out_specs=spec)(x_BSX)


def route(p, h_BSD, m):
    """-> (experts_BSU int32, weights_BSU fp32, aux). Dropped assignments get expert id X, weight 0."""
    X, k = m.num_experts, m.experts_per_token
    B, S, _ = h_BSD.shape
    logits_BSX = jnp.einsum("bsd,de->bse", h_BSD, p["router"].astype(h_BSD.dtype), preferred_element_type=jnp.float32)
    if m.router == "softmax":
        scores_BSX = jax.nn.softmax(logits_BSX, axis=-1)
        probs_BSX = scores_BSX
    else:
        scores_BSX = jax.nn.sigmoid(logits_BSX)
        probs_BSX = scores_BSX / jnp.sum(scores_BSX, axis=-1, keepdims=True)
    bias_X = jax.lax.stop_gradient(p["expert_bias"].astype(jnp.float32))
    experts_BSU = _top_k(jax.lax.stop_gradient(scores_BSX) + bias_X, k)
    weights_BSU = jnp.take_along_axis(scores_BSX, experts_BSU, axis=-1)
    if m.router_normalize:
        weights_BSU = weights_BSU / (jnp.sum(weights_BSU, axis=-1, keepdims=True) + 1e-20)
    weights_BSU = weights_BSU * m.routed_scale

    chosen_BSUX = jax.nn.one_hot(experts_BSU, X, dtype=jnp.float32)
    chosen_X = jnp.sum(chosen_BSUX, axis=(0, 1, 2))
    if m.capacity_factor:
        keep_BSU = _ranks(chosen_BSUX) < capacity(m, S)
        experts_BSU = jnp.where(keep_BSU, experts_BSU, X)
        weights_BSU = jnp.where(keep_BSU, weights_BSU, 0.0)
        load_X = jnp.sum(chosen_BSUX * keep_BSU[..., None], axis=(0, 1, 2))
    else:
        load_X = chosen_X
    M = B * S
    f_X = chosen_X / (M * k)
    P_X = jnp.mean(probs_BSX, axis=(0, 1))
    aux = {
        "load": load_X,
        "balance": X * jnp.sum(f_X * P_X),
        "z": jnp.mean(jnp.square(jax.nn.logsumexp(logits_BSX, axis=-1))),
        "dropped": jnp.sum(chosen_X) - jnp.sum(load_X),
    }
    return experts_BSU.astype(jnp.int32), weights_BSU, aux


def _local_experts(x_MD, experts_MU, weights_MU, gate_YDI, up_YDI, down_YID, first_expert, scale_input: bool):
    """Sum over each token's assignments to experts first_expert .. first_expert + Y - 1 of
    weight * SwiGLU_expert(token); other assignments contribute 0. Sorted, grouped, unsorted."""
    Y = gate_YDI.shape[0]
    M, k = experts_MU.shape
    local_A = (experts_MU - first_expert).reshape(M * k)
    local_A = jnp.where((local_A >= 0) & (local_A < Y), local_A, Y)  # Y: not here (or dropped), sorted last
    order_A = jnp.argsort(local_A, stable=True)
    group_sizes_Y = jnp.bincount(local_A, length=Y + 1)[:Y].astype(jnp.int32)
    x_AD = jnp.take(x_MD, order_A // k, axis=0)
    w_A = jnp.take(weights_MU.reshape(M * k), order_A).astype(x_MD.dtype)
    if scale_input:
        x_AD = x_AD * w_A[:, None]
    # rows past sum(group_sizes) belong to no expert: ragged_dot leaves them 0
    gate_AI = jax.lax.ragged_dot(x_AD, gate_YDI, group_sizes_Y)
    up_AI = jax.lax.ragged_dot(x_AD, up_YDI, group_sizes_Y)
    y_AD = jax.lax.ragged_dot(jax.nn.silu(gate_AI) * up_AI, down_YID, group_sizes_Y)
    if not scale_input:
        y_AD = y_AD * w_A[:, None]
    y_MUD = jnp.take(y_AD, jnp.argsort(order_A), axis=0).reshape(M, k, -1)
    return jnp.sum(y_MUD, axis=1)


def _mesh_axes(spec_entry) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _all_to_all_experts(x_BSD, experts_BSU, weights_BSU, gate_YDI, up_YDI, down_YID, axes, devices, slots, scale_input):
    """The expert-group step of the all-to-all dispatcher (inside shard_map, on this device's tokens).

    P = `devices` in the expert group, each owning Y consecutive experts. Each token is sent once
    to every device owning at least one of its experts, with all k (expert, weight) pairs (the
    receiver ignores those it does not own), into a fixed buffer of C slots per destination: C =
    `slots`, at most the M local tokens. Every device computes its experts' weighted sum for the
    P * C tokens it received, the reverse all-to-all returns them, and each token sums its P partial
    outputs. Dropless: no device can be sent more than the M local tokens.
    """
    b, s, D = x_BSD.shape
    k, Y, M = experts_BSU.shape[-1], gate_YDI.shape[0], b * s
    C = min(M, slots)
    x_MD, experts_MU, weights_MU = x_BSD.reshape(M, D), experts_BSU.reshape(M, k), weights_BSU.reshape(M, k)
    # dropped assignments (expert X) map to device P: none
    wants_PM = jnp.any((experts_MU // Y)[None] == jnp.arange(devices)[:, None, None], axis=-1)
    # slot c of destination n holds token_PC[n, c]: the tokens wanting n first, in token order
    token_PC = jnp.argsort(~wants_PM, axis=-1, stable=True)[:, :C]
    filled_PC = jnp.take_along_axis(wants_PM, token_PC, axis=-1)
    send_experts_PCU = jnp.where(filled_PC[..., None], jnp.take(experts_MU, token_PC, axis=0), -1)
    send_weights_PCU = jnp.where(filled_PC[..., None], jnp.take(weights_MU, token_PC, axis=0), 0.0)

    def exchange(a):  # [P, C, ...] -> [P * C, ...]: block n goes to device n; block n comes from device n
        a = a.reshape(devices * C, *a.shape[2:])
        return jax.lax.all_to_all(a, axes, split_axis=0, concat_axis=0, tiled=True)

    x_WD = exchange(jnp.take(x_MD, token_PC, axis=0))  # W = P * C received slots
    first_expert = jax.lax.axis_index(axes) * Y
    y_WD = _local_experts(
        x_WD, exchange(send_experts_PCU), exchange(send_weights_PCU), gate_YDI, up_YDI, down_YID,
        first_expert, scale_input,
    )  # fmt: skip
    back_WD = exchange(y_WD.reshape(devices, C, D))  # the partial outputs for token_PC, from each n
    back_WD = jnp.where(filled_PC.reshape(-1, 1), back_WD, 0)
    y_MD = jnp.zeros_like(x_MD).at[token_PC.reshape(-1)].add(back_WD)
    return y_MD.reshape(b, s, D)


# XLA:CPU has no ragged all-to-all: the tests swap in an emulation built from all-gathers here
_ragged_all_to_all = jax.lax.ragged_all_to_all


def ragged_layout(counts_QPY, me):
    """The arguments of the two ragged all-to-alls of the "ragged" dispatcher, for device `me`.

    counts_QPY[q, p, y]: assignments device q sends to local expert y of device p (all devices'
    counts, all-gathered). Each sender's rows are sorted by global expert (p, y), so its block for
    (p, y) starts at the exclusive cumsum of its counts. There is one slice per (p, y), so the
    receiver's buffer comes out grouped by its local expert: expert y's block starts after the
    blocks of experts < y, and within it the senders are in device order. The return trip mirrors
    it: each receiver sends block (q, y) back to where sender q's rows for expert (me, y) began.

    -> forward (input_offsets, send_sizes, output_offsets, recv_sizes), back (the same four),
    group_sizes [Y]: the receiver's rows per local expert. Each argument is [P * Y], index p * Y + y
    (forward: destination p; back: destination q); int32, traced or not.
    """
    Q, P, Y = counts_QPY.shape
    counts_QX = counts_QPY.reshape(Q, P * Y)
    send_start_QX = jnp.cumsum(counts_QX, axis=1) - counts_QX  # where block (p, y) starts in sender q's rows
    group_PY = jnp.sum(counts_QPY, axis=0)  # rows each device receives per local expert
    expert_start_PY = jnp.cumsum(group_PY, axis=1) - group_PY  # where expert y's block starts on p
    before_QPY = jnp.cumsum(counts_QPY, axis=0) - counts_QPY  # rows from senders < q within that block
    recv_start_QPY = expert_start_PY[None] + before_QPY  # where sender q's rows for (p, y) land on p
    mine_QY = counts_QPY[:, me]  # what each sender sends me, per local expert
    forward = (
        send_start_QX[me],
        counts_QX[me],
        recv_start_QPY[me].reshape(P * Y),
        mine_QY.reshape(Q * Y),
    )
    back = (
        recv_start_QPY[:, me].reshape(Q * Y),  # my block (q, y) ...
        mine_QY.reshape(Q * Y),
        jax.lax.dynamic_slice_in_dim(send_start_QX, me * Y, Y, axis=1).reshape(Q * Y),  # ... to q's rows
        counts_QX[me],
    )
    return forward, back, group_PY[me]


def _exchange(x_ND, there, back, rows: int, axes):
    """Rows of x to other devices by the ragged all-to-all `there` (offsets and sizes), into a zero
    buffer of `rows` rows. Its gradient is the mirrored exchange `back`: differentiated by JAX, the
    collective would also return a cotangent for the zero buffer, which shard_map all-reduces over
    every device (the whole [rows, D] buffer) to drop it."""
    N, D = x_ND.shape

    @jax.custom_vjp
    def exchange(x_ND, there, back):
        return _ragged_all_to_all(x_ND, jnp.zeros((rows, D), x_ND.dtype), *there, axis_name=axes)

    def grad(back, g_RD):
        return _ragged_all_to_all(g_RD, jnp.zeros((N, D), g_RD.dtype), *back, axis_name=axes), None, None

    exchange.defvjp(lambda x_ND, there, back: (exchange(x_ND, there, back), back), grad)
    return exchange(x_ND, there, back)


def _ragged_experts(x_BSD, experts_BSU, weights_BSU, gate_YDI, up_YDI, down_YID, axes, devices, rows, scale_input):
    """The expert-group step of the ragged dispatcher (inside shard_map, on this device's tokens).

    Each device sorts its M * k assignments by expert and sends each device exactly the rows its
    experts were chosen for (`jax.lax.ragged_all_to_all`, one slice per destination expert, layout
    from `ragged_layout`); the receiver's buffer of `rows` rows comes out grouped by local expert,
    ready for the grouped matmul, and the outputs return by the mirrored ragged all-to-all. Traffic
    follows the routing: a device sends its assignments for other devices' experts, about
    M * k * D * (P - 1) / P values under balanced load. The receive buffer is sized for the worst
    case (every sender's rows for one device), so memory is not below the all-gather dispatcher's.
    """
    b, s, D = x_BSD.shape
    k, Y, M = experts_BSU.shape[-1], gate_YDI.shape[0], b * s
    X = devices * Y
    experts_A = experts_BSU.reshape(M * k)  # dropped assignments have id X: sorted last, sent nowhere
    order_A = jnp.argsort(experts_A, stable=True)
    counts_X = jnp.bincount(experts_A, length=X + 1)[:X].astype(jnp.int32)
    counts_QPY = jax.lax.all_gather(counts_X, axes, axis=0, tiled=False).reshape(devices, devices, Y)
    me = jax.lax.axis_index(axes)
    forward, back, group_sizes_Y = ragged_layout(counts_QPY, me)
    x_AD = jnp.take(x_BSD.reshape(M, D), order_A // k, axis=0)
    w_A = jnp.take(weights_BSU.reshape(M * k), order_A).astype(x_AD.dtype)
    if scale_input:
        x_AD = x_AD * w_A[:, None]
    x_WD = _exchange(x_AD, forward, back, rows, axes)
    # rows past sum(group_sizes) are unused buffer: ragged_dot leaves them 0
    gate_WI = jax.lax.ragged_dot(x_WD, gate_YDI, group_sizes_Y)
    up_WI = jax.lax.ragged_dot(x_WD, up_YDI, group_sizes_Y)
    y_WD = jax.lax.ragged_dot(jax.nn.silu(gate_WI) * up_WI, down_YID, group_sizes_Y)
    y_AD = _exchange(y_WD, back, forward, M * k, axes)
    if not scale_input:
        y_AD = y_AD * w_A[:, None]
    y_MUD = jnp.take(y_AD, jnp.argsort(order_A), axis=0).reshape(M, k, D)
    return jnp.sum(y_MUD, axis=1).reshape(b, s, D)


def _dispatch(x_BSD, experts_BSU, weights_BSU, gate_XDI, up_XDI, down_XID, m):
    """Routed experts on the mesh: shard_map over every axis, the expert axis by all-gather /
    reduce-scatter of tokens (`model.moe_dispatch = "allgather"`) or by all-to-all of the tokens
    each device's experts chose (`"all_to_all"`). Without a mesh (or on one device), the same
    computation in place."""
    D, k = x_BSD.shape[-1], experts_BSU.shape[-1]
    scale_input = m.router_scale_input

    chunks = m.moe_dispatch_chunks

    def local(x_BSD, experts_BSU, weights_BSU, gate, up, down, first_expert):
        b, s = x_BSD.shape[:2]
        M = b * s
        x_MD, experts_MU, weights_MU = x_BSD.reshape(M, D), experts_BSU.reshape(M, k), weights_BSU.reshape(M, k)
        if chunks == 1:
            y_MD = _local_experts(x_MD, experts_MU, weights_MU, gate, up, down, first_expert, scale_input)
            return y_MD.reshape(b, s, D)
        if M % chunks:
            raise ConfigError(
                "model.moe_dispatch_chunks", f"{chunks} does not divide the {M} tokens one device runs through "
                "its experts", "use a divisor of (global_batch_size / (data * fsdp)) * seq_len / context",
            )  # fmt: skip
        # the k-fold buffers of one chunk at a time; the weights stay fp32 inside, so their
        # gradients add up over the chunks in fp32
        dtype = gate.dtype
        gate, up, down = (w.astype(jnp.float32) for w in (gate, up, down))

        @jax.checkpoint
        def one(args):
            x_CD, experts_CU, weights_CU = args
            return _local_experts(
                x_CD, experts_CU, weights_CU, gate.astype(dtype), up.astype(dtype), down.astype(dtype),
                first_expert, scale_input,
            )  # fmt: skip

        split = (x_MD.reshape(chunks, M // chunks, D), experts_MU.reshape(chunks, M // chunks, k),
                 weights_MU.reshape(chunks, M // chunks, k))  # fmt: skip
        return jax.lax.map(one, split).reshape(b, s, D)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return local(x_BSD, experts_BSU, weights_BSU, gate_XDI, up_XDI, down_XID, 0)

    token_spec = sharding.logical_to_spec(("act_batch", "act_seq", "act_embed"), mesh)
    route_spec = sharding.logical_to_spec(("act_batch", "act_seq", None), mesh)
    in_spec = sharding.logical_to_spec(MOE_PARAMS["expert_gate"][1], mesh)
    out_spec = sharding.logical_to_spec(MOE_PARAMS["expert_down"][1], mesh)
    expert_axes, embed_axes, width_axes = (_mesh_axes(a) for a in in_spec)
    devices = math.prod(mesh.shape[a] for a in expert_axes)
    # capacity mode bounds what one device can be sent: its Y experts keep at most `capacity` of a
    # (whole) row's assignments each, so a device receives at most rows * Y * capacity tokens
    cap = capacity(m, x_BSD.shape[1]) if m.capacity_factor else None

    def body(x_BSD, experts_BSU, weights_BSU, gate, up, down):
        if embed_axes:  # FSDP: the D dimension of the expert weights, gathered for this layer
            gate = jax.lax.all_gather(gate, embed_axes, axis=1, tiled=True)
            up = jax.lax.all_gather(up, embed_axes, axis=1, tiled=True)
            down = jax.lax.all_gather(down, embed_axes, axis=2, tiled=True)
        if expert_axes and m.moe_dispatch == "ragged":
            b, s = x_BSD.shape[:2]
            # a token sends at most min(k, Y) assignments to one device; capacity bounds a device's
            # experts to `cap` of each of the group's rows
            rows = devices * b * s * min(k, gate.shape[0])
            if cap is not None:
                rows = min(rows, devices * b * gate.shape[0] * cap)
            y_BSD = _ragged_experts(
                x_BSD, experts_BSU, weights_BSU, gate, up, down, expert_axes, devices, rows, scale_input
            )
            if width_axes:  # tensor-parallel expert width: partial sums of the down projection
                y_BSD = jax.lax.psum(y_BSD, width_axes)
            return y_BSD
        if expert_axes and m.moe_dispatch == "all_to_all":
            b, s = x_BSD.shape[:2]
            slots = b * s if cap is None else b * gate.shape[0] * cap
            y_BSD = _all_to_all_experts(
                x_BSD, experts_BSU, weights_BSU, gate, up, down, expert_axes, devices, slots, scale_input
            )
            if width_axes:  # tensor-parallel expert width: partial sums of the down projection
                y_BSD = jax.lax.psum(y_BSD, width_axes)
            return y_BSD
        first_expert = 0
        if expert_axes:  # the tokens of the whole expert group, each device running its experts on them
            x_BSD, experts_BSU, weights_BSU = (
                jax.lax.all_gather(a, expert_axes, axis=0, tiled=True) for a in (x_BSD, experts_BSU, weights_BSU)
            )
            first_expert = jax.lax.axis_index(expert_axes) * gate.shape[0]
        y_BSD = local(x_BSD, experts_BSU, weights_BSU, gate, up, down, first_expert)
        if width_axes:  # tensor-parallel expert width: partial sums of the down projection
            y_BSD = jax.lax.psum(y_BSD, width_axes)
        if expert_axes:  # sum the experts' partial outputs, each device keeping its own tokens
            y_BSD = jax.lax.psum_scatter(y_BSD, expert_axes, scatter_dimension=0, tiled=True)
        return y_BSD

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(token_spec, route_spec, route_spec, in_spec, in_spec, out_spec),
        out_specs=token_spec,
    )(x_BSD, experts_BSU, weights_BSU, gate_XDI, up_XDI, down_XID)


def swiglu(h_BSD, gate_DF, up_DF, down_FD, dtype):
    gate_BSF = jnp.einsum("bsd,df->bsf", h_BSD, gate_DF.astype(dtype))
    up_BSF = jnp.einsum("bsd,df->bsf", h_BSD, up_DF.astype(dtype))
    return jnp.einsum("bsf,fd->bsd", jax.nn.silu(gate_BSF) * up_BSF, down_FD.astype(dtype))


def moe_ffn(p, h_BSD, m, dtype):
    """The MoE FFN on normed inputs h [B, S, D] -> (output [B, S, D], aux). `p`: one layer's params."""
    experts_BSU, weights_BSU, aux = route(p, h_BSD, m)
    y_BSD = _dispatch(
        h_BSD, experts_BSU, weights_BSU,
        p["expert_gate"].astype(dtype), p["expert_up"].astype(dtype), p["expert_down"].astype(dtype), m,
    )  # fmt: skip
    if m.num_shared_experts:
        shared_BSD = swiglu(h_BSD, p["shared_gate"], p["shared_up"], p["shared_down"], dtype)
        if "shared_out_gate" in p:  # Qwen3-Next: one sigmoid gate per token on the whole shared output
            shared_BSD = shared_BSD * jax.nn.sigmoid(h_BSD @ p["shared_out_gate"].astype(dtype))
        y_BSD = y_BSD + shared_BSD
    return y_BSD, aux


# ---------------------------------------------------------------------------------------------
# Outside the forward pass: the aux loss, the metrics, the expert-bias update


def aux_loss(aux, m):
    """The weighted balance + z losses, averaged over MoE layers (aux leaves are [L_moe, ...])."""
    return m.balance_loss_weight * jnp.mean(aux["balance"]) + m.router_z_loss_weight * jnp.mean(aux["z"])


def load_metrics(aux) -> dict:
    """Per logged step: load of the least / most used expert relative to uniform (1 = balanced;
    worst layer), the load entropy over log X (1 = balanced; mean over layers), dropped
    assignments, and the unweighted aux losses (mean over layers)."""
    load_LX = aux["load"]
    X = load_LX.shape[-1]
    share_LX = load_LX / jnp.maximum(jnp.sum(load_LX, axis=-1, keepdims=True), 1.0)
    entropy_L = -jnp.sum(jnp.where(share_LX > 0, share_LX * jnp.log(jnp.maximum(share_LX, 1e-30)), 0.0), axis=-1)
    return {
        "moe_load_min": jnp.min(share_LX) * X,
        "moe_load_max": jnp.max(share_LX) * X,
        "moe_load_entropy": jnp.mean(entropy_L) / math.log(X),
        "moe_dropped": jnp.sum(aux["dropped"]),
        "moe_balance_loss": jnp.mean(aux["balance"]),
        "moe_z_loss": jnp.mean(aux["z"]),
    }


def update_expert_bias(bias_LX, load_LX, rate: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: raise the bias of under-loaded experts and
    lower it for over-loaded ones by a fixed step, b += rate * sign(mean load - load), per layer."""
    mean_L1 = jnp.mean(load_LX, axis=-1, keepdims=True)
    return bias_LX + rate * jnp.sign(mean_L1 - load_LX).astype(bias_LX.dtype)
