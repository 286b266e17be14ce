"""Mixture-of-experts step time on CPU, and the Trinity Mini shape compiled for a TPU slice.

    python benchmarks/moe.py [--steps 10] [--rounds 3] [--topology v5p:2x2x4]
    python benchmarks/moe.py --dispatch [--expert 8] [--steps 3] [--rounds 3]
    python benchmarks/moe.py --state [--slices v5p:2x2x2,v5p:2x2x4]
    python benchmarks/moe.py --layer-aot [--topology v5p:2x2x4] [--layer-dispatchers allgather,ragged,allgather:8]

1. configs/tiny_moe.py's train step against a dense nopejax model with the same active
   parameters (configs/tiny.py with d_ff = 405: 6 * 405 = 512 + 5 * (2 + 1) * 128, the widths
   a token goes through in tiny_moe's dense layer and five MoE layers).
2. The same tiny MoE step against a plain-JAX one written below (same params, same math:
   sigmoid router with expert bias, dropless sort + ragged_dot, shared expert, balance loss,
   AdamW, bias sign update), so the ratio is nopejax's overhead.
3. With --topology: `train.dry_run` of configs/trinity_mini.py (expert axis 8, fsdp 2 on 16
   chips) for that TPU slice: memory per chip and compile time (minutes on a loaded CPU).

4. With --dispatch: the two token dispatchers over the expert axis (model.moe_dispatch, allgather
   and all_to_all), tiny_moe's train step on 8 fake CPU devices, mesh expert x data = 8. The bytes
   they move on a TPU slice come from the compiled program instead (benchmarks/aot_vs_maxtext.sh
   with MOE=1 and DISPATCH=..., which reads them from the HLO: benchmarks/hlo_collectives.py).

5. With --layer-aot: one MoE layer of configs/trinity_mini.py (router, routed experts, shared
   expert; forward and backward, as the backward of a fully rematerialised layer runs it) compiled
   ahead of time for a TPU slice (default v5p:2x2x4, expert 8 x fsdp 2, 4 rows of 4096 tokens per
   chip), once per dispatcher ("allgather:8": with model.moe_dispatch_chunks = 8): the bytes each
   chip's collectives move per layer and step, read from the compiled HLO
   (benchmarks/hlo_collectives.py), and the program's memory per chip. A layer compiles in
   minutes where the whole train step takes most of an hour on a loaded CPU; the collectives of
   the dispatch are the layer's, the rest of the step (attention, FSDP gathers, gradient
   reductions) is the same for every dispatcher. The ragged all-to-all's bytes depend on the
   routing, which the HLO cannot know: its row gives the send buffer's size times (P - 1) / P,
   what leaves the device when every expert gets the same load (the upper bound: the whole buffer).

6. With --state: the train state (fp32 params and AdamW moments) per chip of the full-depth
   Trinity Mini on each TPU slice, expert 8 x fsdp rest, from the shardings train.setup derives
   (no compile): what must fit beside one layer's temporaries and the saved layer inputs.

The steps are alternated in one process so machine noise hits all alike.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # --layer-aot only compiles; another process may hold libtpu
if "--dispatch" in sys.argv:  # the expert-parallel comparison needs a mesh: 8 fake CPU devices, before jax loads
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import plain_jax  # benchmarks/, the script's own folder
from configs_loader import load

from nopejax import config, layers, model, train

# ---- the plain-JAX MoE baseline: no framework --------------------------------------------------


def plain_step_fn(cfg):
    m = cfg.model
    k = m.experts_per_token
    rope_layers = [(i + 1) % m.no_rope_layer_interval != 0 for i in range(m.num_layers)]
    moe_layers = [i >= m.num_dense_layers for i in range(m.num_layers)]
    norm, attention = plain_jax.rms_norm_fn(m), plain_jax.attention_fn(m)

    def swiglu(h, g, u, d):
        return (jax.nn.silu(h @ g) * (h @ u)) @ d

    def moe(h, L):
        B, S, D = h.shape
        x = h.reshape(B * S, D)
        scores = jax.nn.sigmoid(x @ L["router"])
        _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores) + L["expert_bias"], k)
        w = jnp.take_along_axis(scores, idx, -1)
        w = w / jnp.sum(w, -1, keepdims=True)
        flat = idx.reshape(-1)
        order = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=m.num_experts)
        xs = x[order // k]
        gate, up = jax.lax.ragged_dot(xs, L["expert_gate"], sizes), jax.lax.ragged_dot(xs, L["expert_up"], sizes)
        y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, L["expert_down"], sizes) * w.reshape(-1)[order][:, None]
        y = jnp.zeros_like(x).at[order // k].add(y)
        y = y + swiglu(x, L["shared_gate"], L["shared_up"], L["shared_down"])
        load = jnp.bincount(flat, length=m.num_experts).astype(jnp.float32)
        probs = scores / jnp.sum(scores, -1, keepdims=True)
        balance = m.num_experts * jnp.sum(load / (B * S * k) * jnp.mean(probs, 0))
        return y.reshape(B, S, D), load, balance

    def loss_fn(p, b):
        x = p["embed"][b["inputs"]]
        S = x.shape[1]
        seg = b["segment_ids"]
        mask = jnp.tril(jnp.ones((S, S), bool))[None] & (seg[:, :, None] == seg[:, None, :])
        loads, balances = [], []
        for i, (use_rope, is_moe) in enumerate(zip(rope_layers, moe_layers)):
            j = sum(moe_layers[:i]) if is_moe else i - sum(moe_layers[:i])  # index in its own stack
            L = {n: v[i] for n, v in p["layers"].items() if model.param_group(n) not in ("moe", "dense")}
            group = "moe" if is_moe else "dense"
            L.update({n: v[j] for n, v in p["layers"].items() if model.param_group(n) == group})
            x = x + attention(norm(x, L["attn_norm"]), L, mask, b["positions"], use_rope)
            h = norm(x, L["mlp_norm"])
            if is_moe:
                y, load, balance = moe(h, L)
                x = x + y
                loads.append(load)
                balances.append(balance)
            else:
                x = x + swiglu(h, L["w_gate"], L["w_up"], L["w_down"])
        logits = norm(x, p["final_norm"]) @ p["embed"].T
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
        loss = jnp.sum(ce * b["loss_mask"]) / jnp.maximum(jnp.sum(b["loss_mask"]), 1)
        return loss + m.balance_loss_weight * jnp.mean(jnp.stack(balances)), jnp.stack(loads)

    tx = optax.chain(optax.clip_by_global_norm(cfg.optim.clip_norm),
                     optax.adamw(cfg.optim.lr, 0.9, 0.95, weight_decay=0.1))  # fmt: skip

    @jax.jit
    def step(p, opt, b):
        (loss, load), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
        updates, opt = tx.update(g, opt, p)
        new = optax.apply_updates(p, updates)
        bias = p["layers"]["expert_bias"]
        new["layers"]["expert_bias"] = bias + m.expert_bias_rate * jnp.sign(load.mean(-1, keepdims=True) - load)
        return new, opt, loss

    return step, tx


# ---- measurement -----------------------------------------------------------------------------


def make_batch(cfg):
    rng = np.random.default_rng(0)
    B, S = cfg.train.global_batch_size, cfg.train.seq_len
    tok = rng.integers(0, 256, (B, S + 1)).astype(np.int32)
    return jax.device_put({
        "inputs": tok[:, :-1],
        "targets": tok[:, 1:],
        "segment_ids": np.ones((B, S), np.int32),
        "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)),
        "loss_mask": np.ones((B, S), np.float32),
    })  # fmt: skip


def nopejax_timer(cfg, batch, steps, devices=None):
    s = train.setup(cfg, devices or jax.devices()[:1])
    state = train.init_state(s)
    step, _ = train.compile_fns(s)
    batch = {k: jax.device_put(v, s.batch_sharding) for k, v in batch.items()}

    def run():
        nonlocal state
        t0 = time.perf_counter()
        with jax.set_mesh(s.mesh):
            for _ in range(steps):
                state, out = step(state, batch)
            jax.block_until_ready(out["loss"])
        return (time.perf_counter() - t0) / steps

    return run, state


def alternate(runs: dict, rounds: int) -> dict:
    """Median seconds per step of each run, measured in alternation after two warm-up calls each
    (the second compiles for the step's own output layout)."""
    for fn in [*runs.values()] * 2:
        fn()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(fn())
    return {name: statistics.median(v) for name, v in times.items()}


def compare_dispatchers(args):
    """tiny_moe on 8 CPU devices, expert x data = 8, with each token dispatcher; same batch, same init."""
    runs = {}
    for dispatch in config.MOE_DISPATCHERS:
        cfg = load("tiny_moe")
        cfg.model.moe_dispatch = dispatch
        cfg.mesh.update(expert=args.expert, data=8 // args.expert)
        runs[dispatch], _ = nopejax_timer(cfg, make_batch(cfg), args.steps, jax.devices())
    t = alternate(runs, args.rounds)
    result = {f"{name}_step_ms": round(1e3 * v, 1) for name, v in t.items()}
    result.update(all_to_all_over_allgather=round(t["all_to_all"] / t["allgather"], 3), expert=args.expert)
    result["devices"] = f"{len(jax.devices())} x {jax.devices()[0].device_kind}"
    print(
        f"tiny_moe, expert {args.expert} x data {8 // args.expert}: allgather {result['allgather_step_ms']} ms | "
        f"all_to_all {result['all_to_all_step_ms']} ms | all_to_all / allgather {result['all_to_all_over_allgather']}"
    )
    print(json.dumps(result))


def layer_aot(args):
    """One Trinity Mini MoE layer, forward + backward, compiled for a TPU slice per dispatcher."""
    from hlo_collectives import collective_bytes, summary_gib
    from jax.experimental import topologies

    from nopejax import moe, sharding

    cfg = load("trinity_mini")
    m = cfg.model
    devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    cfg.mesh.update(data=1, fsdp=-1, expert=args.expert)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    B, S = args.rows * len(devices), cfg.train.seq_len

    def spec(axes):
        return jax.NamedSharding(mesh, sharding.logical_to_spec(axes, mesh))

    params = {
        name: jax.ShapeDtypeStruct(fn(m), jnp.float32, sharding=spec(ax))
        for name, (fn, ax) in moe.moe_params(m).items()
    }
    h = jax.ShapeDtypeStruct((B, S, m.d_model), jnp.bfloat16, sharding=spec(("act_batch", "act_seq", "act_embed")))
    results = {}
    for dispatch in args.layer_dispatchers.split(","):  # "allgather:8": with model.moe_dispatch_chunks = 8
        m.moe_dispatch, _, chunks = dispatch.partition(":")
        m.moe_dispatch_chunks = int(chunks or 1)

        def loss(p, h_BSD, r_BSD):  # r: the output's cotangent, an input so XLA cannot fold the backward
            y_BSD, aux = moe.moe_ffn(p, h_BSD, m, jnp.bfloat16)
            return jnp.sum(y_BSD * r_BSD, dtype=jnp.float32) + moe.aux_loss(jax.tree.map(lambda a: a[None], aux), m)

        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, h, h).compile()
        seconds = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        hlo = compiled.as_text()
        table = collective_bytes(hlo)
        if args.hlo_dir:  # the compiled program, for a closer look at its collectives
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, f"moe_layer_{dispatch.replace(':', '_')}.hlo"), "w") as f:
                f.write(hlo)
        row = {
            "memory_per_chip_gib": round((mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                                         - mem.alias_size_in_bytes) / 2**30, 3),
            "temp_gib": round(mem.temp_size_in_bytes / 2**30, 3),
            "collective_gib": summary_gib(table),
            "counts": {kind: r["count"] for kind, r in table.items()},
            "compile_s": round(seconds, 1),
        }  # fmt: skip
        results[dispatch] = row
        print(f"{dispatch}: {json.dumps(row)}", flush=True)
    print(json.dumps({
        "layer_aot": results, "topology": args.topology, "mesh": dict(mesh.shape), "rows_per_chip": args.rows,
        "seq_len": S, "jax": jax.__version__, "load": os.getloadavg(),
    }))  # fmt: skip


def state_per_chip(args):
    """Train state (params + optimizer state) per chip of the full-depth Trinity Mini on TPU slices,
    from the shardings nopejax gives it (train.setup: nothing is compiled): the largest chip's shards."""
    from jax.experimental import topologies

    rows = []
    for topology in args.slices.split(","):
        cfg = load("trinity_mini")
        if args.layers:  # the reduced shape of benchmarks/aot_vs_maxtext.sh: 1 dense + the rest MoE
            cfg.model.update(num_layers=args.layers, num_dense_layers=1)
        devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        cfg.mesh.update(data=1, fsdp=-1, expert=args.expert)
        cfg.train.global_batch_size = args.rows * len(devices)
        s = train.setup(cfg, devices)
        per_device = {}
        for leaf in jax.tree.leaves(s.abstract_state):
            if not hasattr(leaf, "sharding") or leaf.sharding is None:
                continue
            shard = leaf.sharding.shard_shape(leaf.shape)
            nbytes = int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
            for d in leaf.sharding.device_set:  # a replicated leaf costs every device its whole size
                per_device[d.id] = per_device.get(d.id, 0) + nbytes
        gib = max(per_device.values()) / 2**30
        rows.append(
            {"topology": topology, "chips": len(devices), "mesh": dict(s.mesh.shape), "state_gib": round(gib, 2)}
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def active_params(m) -> int:
    """Params one token goes through (routed experts: k of E), embeddings once."""
    total = model.param_count(m)
    if not m.num_experts:
        return total
    width = m.expert_d_ff or m.d_ff
    moe_layers = sum(spec.ffn == "moe" for spec in layers.layer_specs(m))
    return total - moe_layers * 3 * m.d_model * width * (m.num_experts - m.experts_per_token)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--topology", default=None, help="also compile Trinity Mini for this TPU slice, e.g. v5p:2x2x4")
    parser.add_argument("--dispatch", action="store_true", help="compare the token dispatchers on 8 CPU devices")
    parser.add_argument("--expert", type=int, default=8, help="--dispatch: expert-axis size (divides 8)")
    parser.add_argument("--layer-aot", action="store_true", help="compile one Trinity Mini MoE layer per dispatcher")
    parser.add_argument("--layer-dispatchers", default=",".join([*config.MOE_DISPATCHERS, "allgather:8"]))
    parser.add_argument("--hlo-dir", default=None, help="--layer-aot: write each compiled HLO here")
    parser.add_argument("--rows", type=int, default=4, help="--layer-aot: rows of seq_len tokens per chip")
    parser.add_argument("--state", action="store_true", help="full-depth Trinity Mini: train state per chip")
    parser.add_argument("--layers", type=int, default=0, help="--state: depth (0: the published 32)")
    parser.add_argument("--slices", default="v5p:2x2x2,v5p:2x2x4,v5p:2x4x4,v5p:4x4x4", help="--state: TPU slices")
    args = parser.parse_args()
    if args.state:
        state_per_chip(args)
        return
    if args.layer_aot:
        args.topology = args.topology or "v5p:2x2x4"
        layer_aot(args)
        return
    if args.dispatch:
        compare_dispatchers(args)
        return

    moe_cfg = load("tiny_moe")
    dense_cfg = load("tiny")
    dense_cfg.model.d_ff = 405
    batch = make_batch(moe_cfg)
    run_moe, state = nopejax_timer(moe_cfg, batch, args.steps)
    run_dense, _ = nopejax_timer(dense_cfg, batch, args.steps)
    run_plain = plain_jax.step_timer(*plain_step_fn(moe_cfg), state["params"], batch, args.steps)
    t = alternate({"moe": run_moe, "dense": run_dense, "plain": run_plain}, args.rounds)
    result = {
        "tiny_moe_step_ms": round(1e3 * t["moe"], 1),
        "dense_same_active_step_ms": round(1e3 * t["dense"], 1),
        "plain_jax_moe_step_ms": round(1e3 * t["plain"], 1),
        "moe_over_dense": round(t["moe"] / t["dense"], 3),
        "nopejax_over_plain": round(t["moe"] / t["plain"], 3),
        "active_params_moe": active_params(moe_cfg.model),
        "active_params_dense": active_params(dense_cfg.model),
        "device": jax.devices()[0].device_kind,
    }
    print(
        f"tiny MoE {result['tiny_moe_step_ms']} ms | dense, same active params {result['dense_same_active_step_ms']} "
        f"ms | plain-JAX MoE {result['plain_jax_moe_step_ms']} ms | MoE/dense {result['moe_over_dense']} | "
        f"nopejax/plain {result['nopejax_over_plain']}"
    )
    if args.topology:
        aot = train.dry_run(load("trinity_mini"), args.topology)
        result["trinity_mini_aot"] = aot
        print(
            f"Trinity Mini on {args.topology} (mesh {aot['mesh']}): {aot['memory_per_device_gib']} GiB per chip, "
            f"compiled in {aot['compile_seconds']} s"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
