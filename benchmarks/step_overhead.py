"""nopejax's tiny train step vs a hand-written plain-JAX step of the same shapes.

    python benchmarks/step_overhead.py [--steps 30] [--rounds 5]

Both do the same work: forward (embedding, 6 layers of GQA attention with RoPE on layers
1-3 and 5-6, SwiGLU, RMSNorm, tied head), masked fp32 cross-entropy, backward, AdamW with
clipping. They are alternated in one process so machine noise hits both alike. Goal: <= 1.05x.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import plain_jax  # benchmarks/, the script's own folder
from configs_loader import load

from nopejax import config, train

# ---- the plain-JAX baseline: ~60 lines, no framework ----------------------------------------


def plain_step_fn(cfg):
    m = cfg.model
    pattern = [(i + 1) % m.no_rope_layer_interval != 0 for i in range(m.num_layers)]
    norm, attention = plain_jax.rms_norm_fn(m), plain_jax.attention_fn(m)

    def loss_fn(p, b):
        x = p["embed"][b["inputs"]]
        S = x.shape[1]
        seg = b["segment_ids"]
        mask = jnp.tril(jnp.ones((S, S), bool))[None] & (seg[:, :, None] == seg[:, None, :])
        for i, use_rope in enumerate(pattern):
            L = {k: v[i] for k, v in p["layers"].items()}
            x = x + attention(norm(x, L["attn_norm"]), L, mask, b["positions"], use_rope)
            h = norm(x, L["mlp_norm"])
            x = x + (jax.nn.silu(h @ L["w_gate"]) * (h @ L["w_up"])) @ L["w_down"]
        logits = norm(x, p["final_norm"]) @ p["embed"].T
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
        return jnp.sum(ce * b["loss_mask"]) / jnp.maximum(jnp.sum(b["loss_mask"]), 1)

    tx = optax.chain(optax.clip_by_global_norm(cfg.optim.clip_norm),
                     optax.adamw(cfg.optim.lr, 0.9, 0.95, weight_decay=0.1))  # fmt: skip

    @jax.jit
    def step(p, opt, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    return step, tx


# ---- measurement -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.scan_layers=false")
    args = parser.parse_args()
    cfg = config.apply_overrides(load("tiny"), args.overrides)
    s = train.setup(cfg, jax.devices()[:1])
    state = train.init_state(s)
    ours, _ = train.compile_fns(s)
    plain, tx = plain_step_fn(cfg)

    rng = np.random.default_rng(0)
    B, S = cfg.train.global_batch_size, cfg.train.seq_len
    tok = rng.integers(0, 256, (B, S + 1)).astype(np.int32)
    batch = {
        "inputs": tok[:, :-1],
        "targets": tok[:, 1:],
        "segment_ids": np.ones((B, S), np.int32),
        "positions": np.tile(np.arange(S, dtype=np.int32), (B, 1)),
        "loss_mask": np.ones((B, S), np.float32),
    }
    batch = jax.device_put(batch)

    def time_ours():
        nonlocal state
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, out = ours(state, batch)
        jax.block_until_ready(out["loss"])
        return (time.perf_counter() - t0) / args.steps

    time_plain = plain_jax.step_timer(plain, tx, state["params"], batch, args.steps)

    for _ in range(2):  # compile and warm up; the second call compiles for the step's own output layout
        time_ours(), time_plain()
    a, b = [], []
    for _ in range(args.rounds):
        a.append(time_ours())
        b.append(time_plain())
    ratio = statistics.median(a) / statistics.median(b)
    print(f"nopejax step {1e3 * statistics.median(a):.1f} ms | plain JAX step {1e3 * statistics.median(b):.1f} ms "
          f"| ratio {ratio:.3f} (goal <= 1.05) on {jax.devices()[0].device_kind}")  # fmt: skip


if __name__ == "__main__":
    main()
