"""Compile time of one value-and-grad step vs depth, scanned vs unrolled, per layer layout.

    python benchmarks/compile_depth.py [--depths 8,16,32,64] [--repeats 3]
    python benchmarks/compile_depth.py --quick        # depths 4,8,16, one compile each (~1 min)
    python benchmarks/compile_depth.py --depths 8,36 --layouts all_rope,rope_nope,rope_nope_separate --scanned-only

Fixed small width (d_model 128, seq 64). Layouts: `all_rope` (one layer kind), `rope_nope`
(SmolLM3: full attention, NoPE every 4th layer; `rope_nope_separate` the same with a traced body for
the NoPE layer apart from the RoPE layers', `model.shared_rope_body=False`), `local_global` (sliding
window 16 with RoPE, every 4th layer global NoPE: two layer kinds whose attention differs, not only their RoPE flag),
`mamba_hybrid` and `gdn_hybrid` (Mamba2 or Gated DeltaNet x3 : NoPE attention, Granite 4.0-H /
OLMo Hybrid style). Each figure is the median
over fresh compiles (a new model config each time, so nothing is served from a cache).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from nopejax import config, model, validation


def _hybrid(mixer: str, sizes: dict):
    return lambda n: dict(layer_types=tuple(mixer if (i + 1) % 4 else "full_attention" for i in range(n)),
                          no_rope_layer_interval=1, **sizes)  # fmt: skip


# layout -> model fields for a depth
LAYOUTS = {
    "all_rope": lambda n: dict(no_rope_layer_interval=0),
    "rope_nope": lambda n: dict(no_rope_layer_interval=4),
    # the same with a traced body per spec (RoPE layers and the NoPE layer apart): model.shared_rope_body off
    "rope_nope_separate": lambda n: dict(no_rope_layer_interval=4, shared_rope_body=False),
    "local_global": lambda n: dict(no_rope_layer_interval=4, global_attention_interval=4, sliding_window=16),
    "mamba_hybrid": _hybrid(
        "mamba2", dict(mamba_num_heads=4, mamba_head_dim=64, mamba_state_size=32, mamba_chunk_size=16)
    ),
    "gdn_hybrid": _hybrid(
        "gated_deltanet",
        dict(gdn_key_heads=2, gdn_value_heads=4, gdn_key_head_dim=32, gdn_value_head_dim=32, gdn_chunk_size=16),
    ),
}


def compile_seconds(num_layers: int, scan: bool, salt: int, layout: str = "rope_nope") -> float:
    cfg = config.base_config()
    shape = dict(vocab_size=256, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, d_ff=256)
    cfg.model.update(
        num_layers=num_layers, scan_layers=scan, dtype="float32", rms_norm_eps=1e-6 + salt * 1e-12, **shape
    )
    cfg.model.update(**LAYOUTS[layout](num_layers))
    m = validation.validate(cfg).model
    graphdef, params = model.split(nnx_eval_shape(m))
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)

    def loss(params, tokens):
        return jnp.mean(model.apply(graphdef, params, tokens) ** 2)

    t0 = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    return time.perf_counter() - t0


def nnx_eval_shape(m):
    from flax import nnx

    return nnx.eval_shape(lambda: model.create(m))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", default="8,16,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--quick", action="store_true", help="depths 4,8,16 and one compile each")
    parser.add_argument("--scanned-only", action="store_true", help="skip the unrolled stacks")
    args = parser.parse_args()
    if args.quick:
        args.depths, args.repeats = "4,8,16", 1
    depths = [int(d) for d in args.depths.split(",")]
    layouts = args.layouts.split(",")
    compile_seconds(4, True, -1)  # warm up the compiler itself
    scans = (True,) if args.scanned_only else (True, False)
    times = {}
    for r in range(args.repeats):  # each repeat compiles every cell once: load drifts hit all cells alike
        for layout in layouts:
            for scan in scans:
                for d in depths:
                    times.setdefault((layout, scan, d), []).append(compile_seconds(d, scan, r, layout))
    rows = {key: statistics.median(t) for key, t in times.items()}
    for layout in layouts if args.scanned_only else ():
        rows.update({(layout, False, d): float("nan") for d in depths})
    first = depths[0]
    print(f"{'layout':>12} | {'layers':>6} | {'scanned s':>9} | {f'x vs {first}':>7} | {'unrolled s':>10} | "
          f"{f'x vs {first}':>7}")  # fmt: skip
    for layout in layouts:
        for d in depths:
            s, u = rows[layout, True, d], rows[layout, False, d]
            s0, u0 = rows[layout, True, first], rows[layout, False, first]
            print(f"{layout:>12} | {d:>6} | {s:>9.2f} | {s / s0:>7.2f} | {u:>10.2f} | {u / u0:>7.2f}")


if __name__ == "__main__":
    main()
