"""One mixer layer's fwd+bwd on CPU at long S: Mamba2 (chunked SSD), Gated DeltaNet (chunked WY) and
attention (the XLA path), side by side; then FLOPs and bytes per chunk against the TPU v5p roofline.

    python benchmarks/mixers.py [--seq-lens 4096,16384,32768] [--d-model 512] [--steps 1]
                                [--time-attention-up-to 4096] [--memory-only | --roofline-only | --skip-roofline]
                                [--topology v5p:2x2x1]

1. Each layer is the mixer sublayer alone (projections, conv, mixer, output projection; no norm, no
   FFN, which all three share), batch 1, fp32 on CPU, loss = mean(out^2). Its train step (grad of
   the params, SGD update) is timed with benchmarks/plain_jax.py's `step_timer`; the compiled step's
   `memory_analysis()` gives its temporaries. Attention past --time-attention-up-to is compiled for
   its memory only (an S^2 step takes minutes on a shared 2-core CPU); its time there is left out.
   Shapes at d_model 512 (SmolLM3-3B's ratios at a quarter of its width):
     mamba2:         16 heads x 64 (expand 2), 1 group, state 128, conv 4, chunk 256
     gated_deltanet: 4 key heads x 128, 8 value heads x 128 (Qwen3-Next's ratios), conv 4, chunk 64
     attention:      NoPE, 4 query heads / 1 KV head of 128, nopejax's XLA path (512-query chunks, remat)
2. Per chunk and head, the FLOPs of Mamba2's intra-chunk part (Y_diag = (C B^T o L) X) and of one
   Gated DeltaNet chunk, counted below from the chunked forms in nopejax/mixers/ssd.py and
   gated_delta.py, and the bytes two ways: what a kernel holding the chunk's tiles on chip must read
   and write (its inputs and output), and what XLA's TPU compiler says the XLA form moves (the
   `bytes accessed` of `cost_analysis()` on the program compiled ahead of time for --topology, divided
   by chunks x heads). Their ratio is the arithmetic intensity, against v5p's ridge point:
   459 TFLOP/s bf16 / 2765 GB/s HBM = 166 FLOP/byte (cloud.google.com/tpu/docs/v5p, "Key specifications").
3. The intra-chunk part's fwd+bwd compiled for one v5p chip, XLA's form beside the Pallas kernels of
   nopejax/kernels/ssd.py: temporaries, FLOPs and bytes from the compiled programs.
4. The same for Gated DeltaNet (nopejax/kernels/gdn.py): its two intra-chunk parts (UT transform, chunk
   outputs) alone, and the whole chunked rule with its XLA scan over chunk states, each fwd+bwd.
"""

import argparse
import functools
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT compiles only; another process may hold libtpu

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_jax  # benchmarks/, the script's own folder

from nopejax import attention, config, model
from nopejax.layers import LayerSpec
from nopejax.mixers import gated_delta, ssd
from nopejax.mixers.kinds import KINDS

F32 = jnp.float32
V5P_BF16_FLOPS = 459e12  # per chip, cloud.google.com/tpu/docs/v5p
V5P_HBM_BYTES_PER_S = 2765e9
RIDGE = V5P_BF16_FLOPS / V5P_HBM_BYTES_PER_S


def model_cfg(d_model: int) -> ConfigDict:
    m = config.base_config().model  # every model field at its default (mamba_impl "xla", ...), then the shapes
    m.d_model = d_model
    m.mamba_num_heads, m.mamba_head_dim, m.mamba_groups, m.mamba_state_size = 2 * d_model // 64, 64, 1, 128
    m.mamba_conv_kernel, m.mamba_chunk_size, m.mamba_time_step_limit = 4, 256, None
    m.mamba_proj_bias, m.mamba_conv_bias = False, True
    m.gdn_key_heads, m.gdn_value_heads = d_model // 128, 2 * d_model // 128
    m.gdn_key_head_dim = m.gdn_value_head_dim = 128
    m.gdn_conv_kernel, m.gdn_chunk_size, m.gdn_allow_neg_eigval, m.gdn_norm_eps = 4, 64, False, None
    m.num_heads, m.num_kv_heads, m.head_dim = d_model // 128, max(1, d_model // 512), 128
    m.rms_norm_eps, m.attention_scale, m.qk_norm = 1e-6, None, "none"
    return m


NOPE = LayerSpec(rope="none")


def layer(kind: str, m: ConfigDict, key):
    """(params, forward(params, h_BSD) -> out_BSD) of one mixer sublayer."""
    if kind == "attention":
        D, H, K, E = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
        ks = jax.random.split(key, 4)
        p = {n: 0.02 * jax.random.normal(k, s) for n, k, s in
             zip(("wq", "wk", "wv", "wo"), ks, ((D, H, E), (D, K, E), (D, K, E), (H, E, D)))}  # fmt: skip

        def attend(q, k, v):
            o = attention.attend(q, k, v, positions_BS=None, segment_ids_BS=None, spec=NOPE, cos_sin=None,
                                 rope=None, impl="xla")  # fmt: skip
            return o, None

        return p, lambda p, h: model.attention_sublayer(p, h, m, F32, NOPE, attend)[0]
    mixer = KINDS[kind]
    dims = mixer.dims(m)
    return mixer.init(dims, key), lambda p, h: mixer.forward(p, h, dims)[0]


def train_step(forward, tx):
    def loss(p, h):
        return jnp.mean(jnp.square(forward(p, h)))

    @jax.jit
    def step(p, opt, h):
        value, g = jax.value_and_grad(loss)(p, h)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, value

    return step


def measure(kind, m, S, steps, timed):
    p, forward = layer(kind, m, jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (1, S, m.d_model), F32)
    tx = optax.sgd(1e-3)
    step = train_step(forward, tx)
    t0 = time.perf_counter()
    compiled = step.lower(p, tx.init(p), h).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    row = {"layer": kind, "S": S, "compile_s": compile_s, "temp_gib": mem.temp_size_in_bytes / 2**30}
    if timed:
        run = plain_jax.step_timer(step, tx, p, h, steps)
        run()  # first dispatch: the jit cache, buffers
        row["step_s"] = statistics.median(run() for _ in range(2))
    return row


# ---- FLOPs and bytes per chunk ------------------------------------------------------------------


def ssd_intra_chunk_cost(c, E, P, G, itemsize=2, backward=False):
    """Per (chunk, head) of ssd.intra_chunk (P the head dim, E the state),
    Y_diag_l = sum_{m<=l} (C_l . B_m) exp(cum_l - cum_m) xdt_m.

    FLOPs: C B^T (2 c^2 E, shared by the G heads of a group), the segsum and its exp (c^2 adds,
    c^2 exponentials, counted as 1 FLOP each), the mask product (c^2), (S o L) X (2 c^2 P).
    Bytes a kernel must move: C, B (c E each, shared by G heads), xdt and y (c P each), the log
    decays (c, fp32), with the matrices in `itemsize` bytes.
    backward: the forward's tiles recomputed, then d(xdt) = (S o L)^T dy and dP = dy xdt^T (2 c^2 P
    each), dS = dP o L, dC = dS B and dB = dS^T C (2 c^2 E each, per group), d(log decay) from
    dP o S o L (3 c^2); it reads the inputs and dy and writes their four gradients.
    """
    fwd = 2 * c * c * E / G + 3 * c * c + 2 * c * c * P
    io = 2 * c * E * itemsize / G + 2 * c * P * itemsize + 4 * c
    if not backward:
        return fwd, io
    return fwd + 4 * c * c * P + 4 * c * c * E / G + 3 * c * c, 2 * io + c * P * itemsize


def gdn_chunk_cost(c, E, P, G, itemsize=2):
    """Per (chunk, value head) of gated_delta.gated_delta (E key, P value head dim): everything a chunk
    does, the state pass included.

    FLOPs: k k^T and q k^T (2 c^2 E each, shared by G value heads), the decay pairs and A (3 c^2),
    the unit-lower triangular solve for [u | w] (c^2 (P + E)), w S_in (2 c E P), the new state
    k~^T (u - w S_in) (2 c E P), q S_in (2 c E P), (q k^T o pair) (u - w S_in) (2 c^2 P).
    Bytes a kernel must move: q, k (c E each, shared by G), v and o (c P each), g and beta (c each,
    fp32), and the state in and out (E P, fp32).
    """
    flops = 4 * c * c * E / G + 3 * c * c + c * c * (P + E) + 6 * c * E * P + 2 * c * c * P
    bytes_ = 2 * c * E * itemsize / G + 2 * c * P * itemsize + 8 * c + 2 * 4 * E * P
    return flops, bytes_


def xla_tpu_cost(fn, args, topology):
    """(flops, bytes accessed) XLA's TPU compiler reports for fn(*args), compiled ahead of time."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    cost = jax.jit(fn).lower(*shapes).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"], cost["bytes accessed"]


def roofline(topology, S=8192):
    """Rows per chunk and head, at the 3B hybrids' mixer shapes (configs/*_hybrid_3b_long.py)."""
    rows = []
    Bz = 1
    # Mamba2: 64 heads x 64, 1 group, state 128, chunk 256
    H, P, K, E, c = 64, 64, 1, 128, 256
    t = S // c
    shape = lambda *s: jax.ShapeDtypeStruct(s, F32)
    intra = ssd.intra_chunk
    args = (shape(Bz, t, c, K, E), shape(Bz, t, c, K, E), shape(Bz, t, c, K, H // K, P), shape(Bz, t, K, H // K, c),
            jax.ShapeDtypeStruct((Bz, t, c), jnp.int32))  # fmt: skip
    counted = ssd_intra_chunk_cost(c, E, P, H // K)
    rows.append(("mamba2 intra-chunk, fwd", counted, xla_tpu_cost(intra, args, topology), t * H))

    def intra_grad(C, B, xdt, a, doc):
        return jax.grad(lambda *x: jnp.sum(intra(*x, doc) ** 2), argnums=(0, 1, 2, 3))(C, B, xdt, a)

    counted = ssd_intra_chunk_cost(c, E, P, H // K, backward=True)
    rows.append(("mamba2 intra-chunk, fwd+bwd", counted, xla_tpu_cost(intra_grad, args, topology), t * H))
    # Gated DeltaNet: 16 key heads, 32 value heads of 128, chunk 64; the whole chunked rule (fwd)
    Kq, Hv, E, P, c = 16, 32, 128, 128, 64
    t = S // c
    rule = lambda q, k, v, g, b: gated_delta.gated_delta(q, k, v, g, b, chunk=c)[0]
    args = (shape(Bz, S, Kq, E), shape(Bz, S, Kq, E), shape(Bz, S, Hv, P), shape(Bz, S, Hv), shape(Bz, S, Hv))
    counted = gdn_chunk_cost(c, E, P, Hv // Kq)
    rows.append(("gated_deltanet chunk, fwd", counted, xla_tpu_cost(rule, args, topology), t * Hv))
    return rows


def kernel_vs_xla(topology, S=8192):
    """Mamba2's intra-chunk part, fwd+bwd, XLA form vs the Pallas kernels (nopejax/kernels/ssd.py),
    compiled for one v5p chip at the 3B hybrid's shape, S tokens (32k over context 4 = 8192 per chip):
    temporaries and the compiler's FLOPs / bytes (for the kernels these are their declared
    pl.CostEstimate plus the XLA ops around them)."""
    from jax.experimental import topologies

    from nopejax.kernels.ssd import ssd_intra_chunk

    device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    H, P, K, E, c = 64, 64, 1, 128, 256
    t = S // c
    shape = lambda *s, dt=F32: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
    args = (shape(1, t, c, K, E), shape(1, t, c, K, E), shape(1, t, c, K, H // K, P), shape(1, t, K, H // K, c),
            shape(1, t, c, dt=jnp.int32))  # fmt: skip
    rows = []
    for name, fn in (("XLA (ssd.intra_chunk)", ssd.intra_chunk),
                     ("Pallas (kernels/ssd.py)", lambda *a: ssd_intra_chunk(*a, backend="tpu"))):  # fmt: skip
        loss = lambda C, B, x, a, doc, fn=fn: jnp.sum(fn(C, B, x, a, doc) ** 2)
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        temp = compiled.memory_analysis().temp_size_in_bytes
        rows.append((name, temp, cost["flops"], cost["bytes accessed"]))
    print(f"\nintra-chunk fwd+bwd on one {topology} chip, S {S}, 64 heads x 64, state 128, chunk 256, fp32 inputs")
    print("| form | temp (MiB) | GFLOP | GB accessed | time bound (ms) |")
    print("|---|---|---|---|---|")
    for name, temp, f, b in rows:
        bound = max(f / V5P_BF16_FLOPS, b / V5P_HBM_BYTES_PER_S) * 1e3
        print(f"| {name} | {temp / 2**20:.0f} | {f / 1e9:.2f} | {b / 1e9:.3f} | {bound:.3f} |")


def _compiled_cost(fn, args):
    """(temp bytes, flops, bytes accessed) of fn compiled ahead of time for the args' (TPU) sharding."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled.memory_analysis().temp_size_in_bytes, cost["flops"], cost["bytes accessed"]


def gdn_kernels_vs_xla(topology, S=8192):
    """Gated DeltaNet, fwd+bwd, XLA form vs the Pallas kernels (nopejax/kernels/gdn.py), compiled for one v5p chip
    at the 3B GDN hybrid's shape (16 key / 32 value heads of 128, chunk 64, S tokens): the two intra-chunk parts
    alone (the UT transform and the chunk outputs, gradients of all their inputs), then the whole rule
    (gated_delta with its scan over chunk states; gradients of q, k, v, g, beta). Temporaries and the compiler's
    FLOPs / bytes (for the kernels their declared pl.CostEstimate plus the XLA ops around them)."""
    from jax.experimental import topologies

    from nopejax.kernels.gdn import gdn_chunk_output, gdn_ut_transform

    device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    K, H, E, P, c = 16, 32, 128, 128, 64
    G, t = H // K, S // c
    shape = lambda *s, dt=F32: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
    parts_args = (shape(1, t, c, K, E), shape(1, t, c, K, E), shape(1, t, c, K, G, P), shape(1, t, K, G, c),
                  shape(1, t, K, G, c), shape(1, t, c, dt=jnp.int32), shape(1, t, K, G, c, P),
                  shape(1, t, K, G, E, P))  # fmt: skip
    rule_args = (shape(1, S, K, E), shape(1, S, K, E), shape(1, S, H, P), shape(1, S, H), shape(1, S, H))
    pallas = gated_delta.Intra(functools.partial(gdn_ut_transform, backend="tpu"),
                               functools.partial(gdn_chunk_output, backend="tpu"))  # fmt: skip
    rows = []
    for name, intra in (("XLA (gated_delta.py)", gated_delta.XLA_INTRA), ("Pallas (kernels/gdn.py)", pallas)):

        def parts(q, k, v, beta, cum, doc, new, state, intra=intra):
            u, w = intra.ut(k, v, beta, cum, doc)
            return jnp.sum(u**2) + jnp.sum(w**2) + jnp.sum(intra.output(q, k, new, state, cum, doc) ** 2)

        def rule(q, k, v, g, beta, intra=intra):
            return jnp.sum(gated_delta.gated_delta(q, k, v, g, beta, chunk=c, intra=intra)[0] ** 2)

        grads = (0, 1, 2, 3, 4, 6, 7)
        rows.append((f"intra-chunk parts, {name}", *_compiled_cost(jax.value_and_grad(parts, grads), parts_args)))
        rows.append((f"whole rule, {name}", *_compiled_cost(jax.value_and_grad(rule, (0, 1, 2, 3, 4)), rule_args)))
    rows = rows[0::2] + rows[1::2]
    print(f"\nGated DeltaNet fwd+bwd on one {topology} chip, S {S}, 16 key / 32 value heads of 128, chunk 64, "
          "fp32 inputs")  # fmt: skip
    print("| part, form | temp (MiB) | GFLOP | GB accessed | time bound (ms) |")
    print("|---|---|---|---|---|")
    for name, temp, f, b in rows:
        bound = max(f / V5P_BF16_FLOPS, b / V5P_HBM_BYTES_PER_S) * 1e3
        print(f"| {name} | {temp / 2**20:.0f} | {f / 1e9:.2f} | {b / 1e9:.3f} | {bound:.3f} |", flush=True)


def print_roofline(rows, topology):
    print(f"\nper chunk and head; v5p ridge {RIDGE:.0f} FLOP/byte ({V5P_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16, "
          f"{V5P_HBM_BYTES_PER_S / 1e9:.0f} GB/s); XLA columns from {topology} AOT cost_analysis")  # fmt: skip
    print("| part | counted MFLOP | kernel bytes (KiB) | kernel FLOP/byte | XLA MFLOP | XLA bytes (KiB) "
          "| XLA FLOP/byte | XLA time bound per 1k (us) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, (f, b), (xf, xb), n in rows:
        xf, xb = xf / n, xb / n
        bound_us = max(xf / V5P_BF16_FLOPS, xb / V5P_HBM_BYTES_PER_S) * 1e6 * 1000
        print(f"| {name} | {f / 1e6:.2f} | {b / 1024:.0f} | {f / b:.0f} | {xf / 1e6:.2f} | {xb / 1024:.0f} | "
              f"{xf / xb:.1f} | {bound_us:.1f} |")  # fmt: skip


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="4096,16384,32768")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1, help="steps per timed run (two runs, the median)")
    ap.add_argument("--time-attention-up-to", type=int, default=4096)
    ap.add_argument("--layers", default="mamba2,gated_deltanet,attention")
    ap.add_argument("--roofline-only", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="compile every step for its memory, time none")
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--skip-roofline", action="store_true", help="the CPU table only")
    args = ap.parse_args()
    import importlib.metadata as md

    print(f"jax {jax.__version__}, libtpu {md.version('libtpu')}, python {platform.python_version()}, "
          f"{os.cpu_count()} cores, load {load()}")  # fmt: skip
    if not args.roofline_only:
        m = model_cfg(args.d_model)
        print(f"d_model {args.d_model}, batch 1, fp32; fwd+bwd+SGD step of one mixer sublayer")
        print("| layer | S | compile (s) | step (s) | temp (GiB) |")
        print("|---|---|---|---|---|")
        for S in (int(s) for s in args.seq_lens.split(",")):
            for kind in args.layers.split(","):
                timed = not args.memory_only and (kind != "attention" or args.time_attention_up_to >= S)
                r = measure(kind, m, S, args.steps, timed)
                step = f"{r['step_s']:.3g}" if "step_s" in r else "not timed"  # a 256-token step: milliseconds
                print(f"| {kind} | {S} | {r['compile_s']:.1f} | {step} | {r['temp_gib']:.3f} |", flush=True)
    if not args.skip_roofline:
        print_roofline(roofline(args.topology), args.topology)
        kernel_vs_xla(args.topology)
        gdn_kernels_vs_xla(args.topology)
    print(f"load at the end {load()}")


if __name__ == "__main__":
    main()
