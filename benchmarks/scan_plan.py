"""The two scan plans side by side: compile seconds, compiled temp memory and step time of one
training gradient (remat "full"), for layer patterns with and without a short period.

    python benchmarks/scan_plan.py [--repeats 3] [--steps 5]

`period` scans blocks of the pattern's period (runs of equal layer specs nested); `switch` scans
all layers once and switches to each layer's spec, so it traces one body per distinct spec;
`unrolled` is `scan_layers=False`. Patterns, at a small width (d_model 128, seq 256, batch 2):
`nemotron_h_8b` (the published 52-layer pattern of configs/nemotron_h_8b.py: no short period, the
period plan traces 19 layers, the switch 3), `smollm3` (36 layers, RoPE x3 + NoPE: both plans trace
2 bodies) and `granite_like` (40 layers, Mamba2 x9 + attention, then 10 Mamba2 layers and 10 with
attention at every 5th: irregular). Compiles alternate between plans within each repeat and each
figure is the median over fresh compiles (a new config each time, so nothing comes from a cache).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from nopejax import config, layers, model, validation

NEMOTRON = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
NEMOTRON_KINDS = {"M": ("mamba2", "none"), "*": ("full_attention", "none"), "-": ("mlp", "dense")}
GRANITE_LIKE = (
    ["mamba2"] * 9 + ["full_attention"] + ["mamba2"] * 10 + ["mamba2" if i % 5 else "full_attention" for i in range(20)]
)
MAMBA = dict(mamba_num_heads=4, mamba_head_dim=32, mamba_groups=1, mamba_state_size=32, mamba_chunk_size=64)

PATTERNS = {
    "nemotron_h_8b": dict(
        num_layers=len(NEMOTRON), layer_types=tuple(NEMOTRON_KINDS[c][0] for c in NEMOTRON),
        ffn_types=tuple(NEMOTRON_KINDS[c][1] for c in NEMOTRON), no_rope_layer_interval=1, **MAMBA,
    ),
    "smollm3": dict(num_layers=36, no_rope_layer_interval=4),
    "granite_like": dict(
        num_layers=len(GRANITE_LIKE), layer_types=tuple(GRANITE_LIKE), no_rope_layer_interval=1, **MAMBA
    ),
}  # fmt: skip
PLANS = ("period", "switch", "unrolled")
B, S = 2, 256


def build(pattern: str, plan: str, salt: int):
    cfg = config.base_config()
    cfg.model.update(
        vocab_size=256, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, d_ff=256, dtype="float32",
        remat="full", rms_norm_eps=1e-6 + salt * 1e-12, scan_layers=plan != "unrolled",
        scan_plan="period" if plan == "unrolled" else plan, **PATTERNS[pattern],
    )  # fmt: skip
    m = validation.validate(cfg).model
    graphdef, params = model.split(nnx.eval_shape(lambda: model.create(m)))

    def loss(params, tokens):
        return jnp.mean(model.apply(graphdef, params, tokens) ** 2)

    return m, jax.jit(jax.value_and_grad(loss)), params


def measure(pattern: str, plan: str, salt: int) -> tuple[float, int]:
    """(compile seconds, compiled temp bytes) of a fresh config's gradient."""
    _, fn, params = build(pattern, plan, salt)
    tokens = jax.ShapeDtypeStruct((B, S), jnp.int32)
    t0 = time.perf_counter()
    compiled = fn.lower(params, tokens).compile()
    return time.perf_counter() - t0, compiled.memory_analysis().temp_size_in_bytes


def step_seconds(pattern: str, plan: str, steps: int) -> float:
    m, fn, _ = build(pattern, plan, 0)
    params = model.split(model.create(m))[1]
    tokens = jnp.zeros((B, S), jnp.int32)
    jax.block_until_ready(fn(params, tokens))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, tokens))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    args = parser.parse_args()
    patterns = args.patterns.split(",")
    measure("smollm3", "period", -1)  # warm up the compiler itself
    seconds, temp = {}, {}
    for r in range(args.repeats):
        for pattern in patterns:
            for plan in PLANS:
                s, t = measure(pattern, plan, r)
                seconds.setdefault((pattern, plan), []).append(s)
                temp[pattern, plan] = t
    print(f"{'pattern':>14} | {'plan':>8} | {'bodies':>6} | {'compile s':>9} | {'x period':>8} | "
          f"{'temp MiB':>8} | {'step s':>7} | {'x period':>8}")  # fmt: skip
    for pattern in patterns:
        specs = layers.layer_specs(build(pattern, "period", 0)[0])
        bodies = {"period": layers.period_bodies(specs), "switch": len(set(specs)), "unrolled": len(specs)}
        base_c = statistics.median(seconds[pattern, "period"])
        base_s = step_seconds(pattern, "period", args.steps)
        for plan in PLANS:
            c = statistics.median(seconds[pattern, plan])
            s = base_s if plan == "period" else step_seconds(pattern, plan, args.steps)
            print(f"{pattern:>14} | {plan:>8} | {bodies[plan]:>6} | {c:>9.2f} | {c / base_c:>8.2f} | "
                  f"{temp[pattern, plan] / 2**20:>8.1f} | {s:>7.3f} | {s / base_s:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
