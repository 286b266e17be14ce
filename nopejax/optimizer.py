"""AdamW with global-norm clipping and a learning-rate schedule, all from `cfg.optim`.

`wsd` is warmup-stable-decay (Hu et al. 2024, MiniCPM; SmolLM3's schedule): linear warmup,
a long constant phase, then a linear decay over the last `decay_steps` steps, so a run can be
extended from any checkpoint of the stable phase. Warmup and decay lengths below 1 are fractions
of `train.steps` (`config.schedule_lengths`), so changing the run length needs no other change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nopejax.config import ConfigDict, schedule_lengths


def schedule(cfg: ConfigDict) -> optax.Schedule:
    o, total = cfg.optim, cfg.train.steps
    warmup_steps, decay_steps = schedule_lengths(o, total)  # fractions of the run resolved to steps
    peak, floor = o.lr, o.lr * o.min_lr_ratio
    warmup = optax.linear_schedule(0.0, peak, warmup_steps) if warmup_steps else optax.constant_schedule(peak)
    decay_len = decay_steps or max(total - warmup_steps, 1)
    if o.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif o.schedule == "linear":
        after = optax.linear_schedule(peak, floor, decay_len)
    elif o.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_len, alpha=o.min_lr_ratio)
    else:  # wsd
        stable = max(total - warmup_steps - decay_steps, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, max(decay_steps, 1))], [stable]
        )
    if not warmup_steps:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params, decay_embeddings: bool):
    """Weight decay on matrices only: never on norms or biases, on embeddings only if asked."""

    def wants_decay(path, _):
        name = jax.tree_util.keystr(path)
        if "norm" in name or "bias" in name:
            return False
        if "embed" in name or "lm_head" in name:
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make(cfg: ConfigDict) -> optax.GradientTransformation:
    o = cfg.optim
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
    parts.append(
        optax.adamw(
            schedule(cfg),
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=lambda params: decay_mask(params, o.decay_embeddings),
            mu_dtype=jnp.float32,
        )
    )
    return optax.chain(*parts)


def _is_schedule(x) -> bool:
    return isinstance(x, optax.ScaleByScheduleState)


def with_schedule_step(opt_state, step):
    """The optimizer state with the LR schedule at `step`: optax keeps the schedule's own count in
    each ScaleByScheduleState, apart from the train state's step; a stage that resets or carries
    over the step must move it too. Adam's bias-correction count is left as it is (it belongs to
    the moments)."""

    def move(x):
        return x._replace(count=jnp.full_like(x.count, step)) if _is_schedule(x) else x

    return jax.tree.map(move, opt_state, is_leaf=_is_schedule)


def schedule_count(opt_state):
    """The step the LR schedule is at, i.e. the one whose rate the next update applies. A skipped
    (non-finite) step keeps the old optimizer state, so this count stays behind the train step."""
    return next(x.count for x in jax.tree.leaves(opt_state, is_leaf=_is_schedule) if _is_schedule(x))
