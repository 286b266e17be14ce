"""What the train step's collectives move per chip and step, by mesh and `train.grad_accum`, read
from the compiled program (benchmarks/hlo_collectives.py) of a TPU topology compiled ahead of time.

    python benchmarks/step_collectives.py                       # v5p:2x2x2, data 8 and data 2 x fsdp 4, A = 1 and 4
    python benchmarks/step_collectives.py --topology cpu --d-model 64 --meshes data=2 --grad-accum 1,2

The model is configs/tiny.py widened to `--d-model` (heads of 128, d_ff 4 x d_model, vocabulary
8192, bf16 compute), `--layers` layers, global batch 32 x 512 tokens. `--topology cpu` compiles for
8 fake CPU devices instead (XLA:CPU writes its collectives differently: a smoke run, not a figure).
"""

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_meshes(text: str) -> list[dict]:
    return [{k: int(v) for k, v in (kv.split("=") for kv in mesh.split(","))} for mesh in text.split(";")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:2x2x2", help="a TPU topology, or cpu (8 fake CPU devices)")
    p.add_argument("--meshes", default="data=8;data=2,fsdp=4", help="mesh axes, ';' between meshes")
    p.add_argument("--grad-accum", default="1,4")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    if args.topology == "cpu":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only; another process may hold libtpu
    sys.path.insert(0, HERE)
    import jax
    from hlo_collectives import collective_bytes

    from nopejax import config, state, train

    if args.topology == "cpu":
        devices = jax.devices()
    else:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
    kinds = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
    shape = f"d_model {args.d_model}, {args.layers} layers"
    print(f"{args.topology}, {shape}, jax {jax.__version__}: MiB received per chip and step")
    print("| mesh | grad_accum | " + " | ".join(kinds) + " | total | temporaries |")
    print("|---" * (len(kinds) + 4) + "|")
    for mesh in parse_meshes(args.meshes):
        for accum in map(int, args.grad_accum.split(",")):
            cfg = config.load_config(os.path.join(HERE, "..", "configs", "tiny.py"))
            d = args.d_model
            heads = max(1, d // 128)
            cfg.model.update(d_model=d, d_ff=4 * d, num_layers=args.layers, num_heads=heads, num_kv_heads=heads)
            cfg.model.update(head_dim=d // heads, vocab_size=8192, dtype="bfloat16")
            cfg.mesh.update({"data": 1, **mesh})
            cfg.train.update(global_batch_size=32, seq_len=512, grad_accum=accum)
            s = state.setup(cfg, devices[: math.prod(mesh.values())] if args.topology == "cpu" else devices)
            step, _ = train.compile_fns(s)
            with jax.set_mesh(s.mesh):
                compiled = step.lower(s.abstract_state, state.abstract_batch(s)).compile()
            moved = {k: v["moved_bytes"] / 2**20 for k, v in collective_bytes(compiled.as_text()).items()}
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
            name = " x ".join(f"{k} {v}" for k, v in mesh.items())
            cells = " | ".join(f"{moved.get(k, 0.0):.1f}" for k in kinds)
            print(f"| {name} | {accum} | {cells} | {sum(moved.values()):.1f} | {temp:.0f} |", flush=True)


if __name__ == "__main__":
    main()
