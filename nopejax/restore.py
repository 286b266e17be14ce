"""Where a run starts from: one plan, decided before the data iterator exists, then executed.

In order of precedence: the workdir's newest readable checkpoint (a resume, possibly with a
changed config: a stage, `nopejax.stages`); else the run named by `init_from`; else a new state.
A resume keeps the data shards its checkpoint was saved with, so the process count may change;
a stage that changes what the data stream is starts the new stream at its beginning. When every
checkpoint of the workdir turns out damaged (`checkpoint.Checkpointer.restore_latest` sets each
aside), the run starts as if there had been none.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nopejax import checkpoint, config, optimizer, stages
from nopejax.config import ConfigDict, ConfigError
from nopejax.state import Setup, init_state


@dataclasses.dataclass(frozen=True)
class Plan:
    resume: bool  # the workdir has checkpoints: its newest readable one is restored
    restart_data: bool  # the data stream starts at its beginning, not at the checkpoint's position
    data_shards: int | None  # the shard count the train iterator keeps (None: this run's own)
    init_from: str | None  # the run to start from when nothing is resumed


@dataclasses.dataclass(frozen=True)
class Start:
    state: dict
    step: int
    resumed: bool
    entry: dict | None  # the stage's history entry in DIR/config.json (None: a resume with nothing changed)


def plan(cfg: ConfigDict, ckpt: checkpoint.Checkpointer) -> Plan:
    """Decide from the workdir's checkpoints and `cfg`; reads configs and data positions only.
    A batch the saved data shards cannot fill is refused here (ConfigError)."""
    saved = ckpt.latest_config()
    shards = ckpt.data_shards()
    restart_data = stages.check_resume(saved, cfg, shards)
    return Plan(
        resume=bool(ckpt.steps()),
        restart_data=restart_data,
        data_shards=None if restart_data else shards,
        init_from=cfg.init_from or None,
    )


def execute(p: Plan, s: Setup, cfg: ConfigDict, ckpt: checkpoint.Checkpointer, train_iter) -> Start:
    """The state the run starts from; a resume also restores `train_iter`'s position (unless the
    plan restarts the stream). `cfg` is the config as given, which the stage's history compares."""
    if p.resume:
        state, step = ckpt.restore_latest(s.abstract_state, None if p.restart_data else train_iter)
        if state is not None:
            return Start(state, step, True, stages.resume_entry(ckpt.restored_config, cfg, step, p.restart_data))
    if p.init_from:
        state, entry = state_from(s, *checkpoint.find_checkpoint(p.init_from, field="init_from"))
        return Start(state, entry["step"], False, entry)
    return Start(init_state(s), 0, False, {"step": 0, "stage": "new run"})


def state_from(s: Setup, root: str, source_step: int) -> tuple[dict, dict]:
    """init_from: a new run's state from another run's checkpoint, placed on this run's mesh.
    -> (state, its history entry). Params always; the AdamW moments with init_from_optimizer;
    the step with init_from_schedule="continue" (else 0). The schedule's count in the optimizer
    state is set to that step either way, so the learning rate follows the step."""
    cfg, where = s.cfg, f"{root} step {source_step}"
    fix = "init_from carries params into a model of the same shape and RoPE/NoPE pattern"
    checkpoint.check_compatible(checkpoint.checkpoint_layout(root, source_step), cfg.model, where, fix)
    step = source_step if cfg.init_from_schedule == "continue" else 0
    if step >= cfg.train.steps:
        raise ConfigError(
            "train.steps",
            f"init_from_schedule=continue starts at the source's step {step}, and train.steps={cfg.train.steps} "
            "counts from the source's start",
            f"set train.steps above {step}, or init_from_schedule=reset",
        )
    if cfg.init_from_optimizer:
        source = checkpoint.restore_state(root, source_step, s.abstract_state)
        params, opt_state = source["params"], source["opt_state"]
    else:
        params, opt_state = checkpoint.restore_params(root, source_step, s.state_shardings["params"]), None

    def build(params, opt_state):
        opt_state = s.tx.init(params) if opt_state is None else opt_state
        return {
            "step": jnp.asarray(step, jnp.int32),
            "rng": jax.random.key_data(jax.random.key(cfg.train.seed)),
            "params": params,
            "opt_state": optimizer.with_schedule_step(opt_state, step),
        }

    with jax.set_mesh(s.mesh):
        state = jax.jit(build, out_shardings=s.state_shardings, donate_argnums=(0, 1))(params, opt_state)
    source_cfg = config.to_dict(checkpoint.read_config(root, source_step))
    return state, stages.init_from_entry(source_cfg, cfg, root, source_step, step)
