"""Sharded training: state created already sharded, one pure jitted step, and the loop.

The train state is a plain pytree {step, rng, params, opt_state}. Shardings come from the
params' logical axes through `sharding.LOGICAL_RULES`; the optimizer state mirrors its params.
Init follows nanodo: `eval_shape` -> shardings -> `jit(init, out_shardings)`, so no device ever
holds an unsharded copy. The step is jitted with explicit in/out shardings and donates the
state; the loop dispatches step n before it reads step n-1's metrics, so the host never stalls
the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nopejax import attention, checkpoint, config, context, metrics, model, moe, optimizer, sharding, stages
from nopejax.config import ConfigDict, ConfigError, RunError
from nopejax.decode import training_sampler

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


# ---------------------------------------------------------------------------------------------
# State and shardings


def param_logical_axes(m: ConfigDict) -> dict:
    """Pure dict mirroring the params: each leaf a tuple of logical axis names."""
    abstract = nnx.eval_shape(lambda: model.create(m))
    state = nnx.state(abstract, nnx.Param)
    axes = jax.tree.map(lambda v: v.logical_axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(axes) if not isinstance(axes, dict) else axes


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a run: built once, before any compile."""

    cfg: ConfigDict
    mesh: jax.sharding.Mesh
    graphdef: object
    tx: optax.GradientTransformation
    state_shardings: dict
    abstract_state: dict  # ShapeDtypeStructs carrying shardings
    batch_sharding: NamedSharding


def _init_fn(cfg: ConfigDict, tx):
    def init(seed):
        _, params = model.split(model.create(cfg.model, seed))
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)),
            "params": params,
            "opt_state": tx.init(params),
        }

    return init


def setup(cfg: ConfigDict, devices=None) -> Setup:
    """Validate, build the mesh, and derive every sharding. Raises ConfigError before compiling."""
    config.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    platform = mesh.devices.flat[0].platform
    cfg = cfg.copy_and_resolve_references()  # `auto` attention is decided for the target devices
    config.check_platform(cfg, platform)
    m = cfg.model
    m.attention_impl = attention.resolve_impl(m.attention_impl, m.head_dim, platform, config.context_chunk(cfg))
    tx = optimizer.make(cfg)
    axes = param_logical_axes(cfg.model)
    graphdef = nnx.split(nnx.eval_shape(lambda: model.create(cfg.model)))[0]
    abstract = jax.eval_shape(_init_fn(cfg, tx), 0)

    flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    flat_shapes = jax.tree.leaves(abstract["params"])
    sharding.check_divisible([(jax.tree_util.keystr(p), s.shape, a) for (p, a), s in zip(flat_axes, flat_shapes)], mesh)
    batch_spec = sharding.logical_to_spec(["act_batch", None], mesh)
    batch_axes = batch_spec[0] or ()
    batch_shards = math.prod(mesh.shape[a] for a in ((batch_axes,) if isinstance(batch_axes, str) else batch_axes))
    micro = cfg.train.global_batch_size // cfg.train.grad_accum
    if micro % batch_shards:
        raise ConfigError(
            "train.global_batch_size",
            f"each microbatch has {micro} rows, not divisible by the {batch_shards} data-parallel shards",
            f"use a global batch that is a multiple of grad_accum * {batch_shards}",
        )

    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = jax.tree.map(lambda a: sharding.named(mesh, a), axes, is_leaf=lambda x: isinstance(x, tuple))
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract["opt_state"],
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    state_shardings = {"step": replicated, "rng": replicated, "params": param_shardings, "opt_state": opt_shardings}
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_shardings
    )
    return Setup(cfg, mesh, graphdef, tx, state_shardings, abstract, NamedSharding(mesh, batch_spec))


def init_state(s: Setup) -> dict:
    init = jax.jit(_init_fn(s.cfg, s.tx), static_argnums=0, out_shardings=s.state_shardings)
    with jax.set_mesh(s.mesh):
        return init(s.cfg.train.seed)


def fresh_opt_state(s: Setup, params: dict) -> dict:
    """A new state around given params (init_from / import-hf): step 0, new optimizer state."""

    def build(params):
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(s.cfg.train.seed)),
            "params": params,
            "opt_state": s.tx.init(params),
        }

    with jax.set_mesh(s.mesh):
        return jax.jit(build, out_shardings=s.state_shardings)(params)


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


# ---------------------------------------------------------------------------------------------
# Loss and steps


def loss_sums(graphdef, params, batch, z_loss: float, chunk_len: int = 0):
    """-> (sum of masked token losses incl. z-loss, sum of masked CE only, token count, MoE
    statistics per MoE layer or None), fp32.

    With `chunk_len`, the LM head and the loss run over sequence chunks of that length under a
    rematerialized scan: the [B, S, V] float32 logits (2 GiB per 4k-token row at SmolLM3's
    128k vocabulary) never exist at once, in the forward or the backward pass.
    """
    x_BSD, moe_aux = model.apply(
        graphdef, params, batch["inputs"], batch["positions"], batch["segment_ids"], method="hidden_and_aux"
    )

    def chunk_sums(x_BcD, targets_Bc, mask_Bc):
        logits_BcV = model.apply_head(graphdef, params, x_BcD).astype(jnp.float32)
        log_z_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
        target_logit_Bc = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
        mask_Bc = mask_Bc.astype(jnp.float32)
        ce = jnp.sum((log_z_Bc - target_logit_Bc) * mask_Bc)
        z = z_loss * jnp.sum(jnp.square(log_z_Bc) * mask_Bc) if z_loss else 0.0
        return ce + z, ce, jnp.sum(mask_Bc)

    def with_moe(sums):
        return (*sums, moe_aux)

    S = x_BSD.shape[1]
    if not chunk_len or chunk_len >= S:
        return with_moe(chunk_sums(x_BSD, batch["targets"], batch["loss_mask"]))
    n = S // chunk_len

    def to_chunks(a):  # [B, S, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(a.reshape(a.shape[0], n, chunk_len, *a.shape[2:]), 1, 0)

    def body(carry, xs):
        return jax.tree.map(jnp.add, carry, jax.checkpoint(chunk_sums)(*xs)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(
        body, (zero, zero, zero), tuple(map(to_chunks, (x_BSD, batch["targets"], batch["loss_mask"])))
    )
    return with_moe(sums)


def loss_fault(step):
    """Test hook: a factor the loss is multiplied by at `step` (NaN to inject a fault), or None.

    Production never sets it; tests replace it before the step is compiled (tests/test_faults.py).
    """
    return None


def train_step(state, batch, *, graphdef, tx, cfg: ConfigDict):
    """One optimizer step over the global batch, as `grad_accum` microbatches under a scan.

    Microbatch losses are summed and divided by the total token count once, so 4 x (B/4)
    gives the same update as one step on B. A step whose loss or gradient norm is not finite
    applies no update (params and optimizer state stay as they were; the step count advances
    past the consumed batch): a select on device, so no host round trip decides it, and no
    NaN ever reaches the state or a checkpoint. `out["nonfinite"]` reports it.
    """
    A = cfg.train.grad_accum
    fault = loss_fault(state["step"])

    def sums_and_grads(params, micro):
        def f(p):
            total, ce, count, moe_aux = loss_sums(graphdef, p, micro, cfg.train.z_loss, cfg.train.loss_chunk_len)
            if moe_aux is not None:  # per-token losses: weighted by the tokens, divided by all tokens below
                total = total + count * moe.aux_loss(moe_aux, cfg.model)
            if fault is not None:
                total, ce = total * fault, ce * fault
            return total, (ce, count, moe_aux)

        (_, (ce, count, moe_aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, ce, count, moe_aux

    params = state["params"]
    if A == 1:
        grads, ce, count, moe_aux = sums_and_grads(params, batch)
    else:
        # rows i*A + a form microbatch a, so each device's shard splits evenly across microbatches
        micros = jax.tree.map(lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, micro):
            micro = jax.tree.map(lambda x: sharding.constrain(x, ("act_batch", None)), micro)
            return jax.tree.map(jnp.add, carry, sums_and_grads(params, micro)), None

        shapes = jax.eval_shape(sums_and_grads, params, jax.tree.map(lambda x: x[0], micros))
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        (grads, ce, count, moe_aux), _ = jax.lax.scan(body, zeros, micros)
        if moe_aux is not None:  # loads and drops add up over microbatches; the losses are means
            moe_aux = {**moe_aux, "balance": moe_aux["balance"] / A, "z": moe_aux["z"] / A}
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss, grad_norm = ce / count, optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)

    def only_if_finite(new, old):
        return jnp.where(finite, new, old)

    new_params = jax.tree.map(only_if_finite, optax.apply_updates(params, updates), params)
    if moe_aux is not None:  # the expert bias is no gradient's business: it follows the observed load
        bias_LX = params["layers"]["expert_bias"]
        new_bias = moe.update_expert_bias(bias_LX, moe_aux["load"], cfg.model.expert_bias_rate)
        new_params["layers"] = {**new_params["layers"], "expert_bias": only_if_finite(new_bias, bias_LX)}
    new_state = {
        "step": state["step"] + 1,
        "rng": state["rng"],
        "params": new_params,
        "opt_state": jax.tree.map(only_if_finite, opt_state, state["opt_state"]),
    }
    lr = optimizer.schedule(cfg)(optimizer.schedule_count(state["opt_state"]))  # the rate this update applies
    out = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": count, "nonfinite": (~finite).astype(jnp.int32)}
    if moe_aux is not None:
        out.update(moe.load_metrics(moe_aux))
    return new_state, out


def eval_step(params, batch, *, graphdef, chunk_len: int = 0):
    _, ce, count, _ = loss_sums(graphdef, params, batch, 0.0, chunk_len)
    return ce, count


def compile_fns(s: Setup):
    """The jitted train and eval steps with explicit shardings; the state is donated."""
    replicated = NamedSharding(s.mesh, PartitionSpec())
    batch_shardings = {k: s.batch_sharding for k in BATCH_KEYS}
    step = jax.jit(
        functools.partial(train_step, graphdef=s.graphdef, tx=s.tx, cfg=s.cfg),
        in_shardings=(s.state_shardings, batch_shardings),
        out_shardings=(s.state_shardings, replicated),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef=s.graphdef, chunk_len=s.cfg.train.loss_chunk_len),
        in_shardings=(s.state_shardings["params"], batch_shardings),
        out_shardings=replicated,
    )
    return step, evaluate


def abstract_batch(s: Setup) -> dict:
    shape = (s.cfg.train.global_batch_size, s.cfg.train.seq_len)
    dtypes = {"loss_mask": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, dtypes.get(k, jnp.int32), sharding=s.batch_sharding) for k in BATCH_KEYS}


def to_device_batch(s: Setup, local_batch: dict) -> dict:
    """Host rows -> global arrays; under context parallelism each row is reordered once, here,
    into zig-zag order (causal load balancing: nopejax/context.py)."""
    from nopejax import data

    rows = context.reorder({k: np.asarray(local_batch[k]) for k in BATCH_KEYS}, sharding.context_size(s.mesh))
    return data.global_batch(rows, s.mesh, sharding.BATCH_AXES)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile: memory and FLOPs before a pod is booked


def dry_run(cfg: ConfigDict, topology: str | None = None) -> dict:
    devices = None
    if topology:
        from jax.experimental import topologies

        try:
            devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
        except Exception as e:  # libtpu missing or an unknown name: say which
            raise ConfigError(
                "--topology",
                f"cannot build TPU topology {topology!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                "install the TPU extra (pip install 'nopejax[tpu]') and use a name like v5p:2x2x4 or v6e:4x4",
            ) from None
    s = setup(cfg, devices)
    step, _ = compile_fns(s)
    t0 = time.perf_counter()
    with jax.set_mesh(s.mesh):
        compiled = step.lower(s.abstract_state, abstract_batch(s)).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_device = None
    if mem is not None:
        per_device = (
            mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        ) / 2**30
    n = len(s.mesh.devices.flat)
    return {
        "compile_seconds": round(seconds, 2),
        "param_count": model.param_count(cfg.model),
        "memory_per_device_gib": None if per_device is None else round(per_device, 3),
        "flops_per_device": metrics.train_flops_per_step(cfg) / n,
        "devices": n,
        "device_kind": s.mesh.devices.flat[0].device_kind,
        "mesh": dict(s.mesh.shape),
    }


# ---------------------------------------------------------------------------------------------
# The loop


def host_scalar(x) -> float:
    return float(np.asarray(jax.device_get(x)))


def tally_nonfinite(counts_2, nonfinite):
    """[consecutive non-finite steps, non-finite steps so far], updated on device each step, so
    the host learns of them whenever it reads metrics anyway, never through an extra sync."""
    streak = jnp.where(nonfinite > 0, counts_2[0] + 1, 0)
    return jnp.stack([streak, counts_2[1] + nonfinite])


def _ignore_here(signum, frame):
    """The Python-level handler: it only has to exist, so Python catches the signal; the watcher
    thread of `Preemption` acts on it."""


class Preemption:
    """SIGTERM (what GCE/TPU and SLURM send before preemption) and a first Ctrl-C ask the loop to
    stop cleanly: finish the step, save, exit. A second Ctrl-C stops at once, without saving. A stop
    that does not complete within `train.stop_grace_seconds` (a step that never finishes: a hung
    collective, a stuck device) ends the process with one line naming the newest complete checkpoint.

    The signals reach a watcher thread through `signal.set_wakeup_fd`, because Python runs signal
    handlers only between bytecodes of the main thread, which a stuck step never returns to.

    Multi-process runs must agree on the step to stop at: JAX's preemption sync point gives
    every process the same answer. Its coordination service watches SIGTERM itself, so there the
    signals are left to it: Ctrl-C and the grace period are for single-process runs.
    """

    def __init__(self, checkpoints_dir: str, grace_seconds: float):
        self.requested = False
        self.signal_name: str | None = None  # the signal that asked to stop
        self.stopping_at: int | None = None  # the step the loop stops after, once it has seen the request
        self.multi = jax.process_count() > 1
        self._dir, self._grace = checkpoints_dir, grace_seconds
        self._handlers, self._timer = {}, None
        self._lock, self._closed = threading.Lock(), False  # no timer outlives the run it watches

    def __enter__(self) -> Preemption:
        if self.multi:
            return self
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)  # written from a signal handler: never block there
        self._old_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._handlers[signum] = signal.signal(signum, _ignore_here)
        threading.Thread(target=self._watch, name="nopejax-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.multi:
            return
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
        for signum, handler in self._handlers.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, handler)
        signal.set_wakeup_fd(self._old_wakeup_fd)
        os.close(self._write_fd)  # the watcher reads end-of-file and returns

    def _watch(self) -> None:
        while data := os.read(self._read_fd, 64):  # one byte per signal: its number
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._on_signal(signal.Signals(signum))
        os.close(self._read_fd)

    def _on_signal(self, signum: signal.Signals) -> None:
        with self._lock:
            if self._closed:
                return
            if self.requested:  # a scheduler may repeat SIGTERM; a second Ctrl-C means "now"
                if signum == signal.SIGINT:
                    self._exit(130, f"interrupted again: stopped at once, without saving; {self._newest()}")
                return
            self.requested, self.signal_name = True, signum.name
            if signum == signal.SIGINT:
                print("nopejax train: interrupted: stopping after this step with a checkpoint; Ctrl-C again stops "
                      "at once, without one", file=sys.stderr, flush=True)  # fmt: skip
            self._timer = threading.Timer(self._grace, self._expired)
            self._timer.daemon = True
            self._timer.start()

    def _expired(self) -> None:
        with self._lock:
            if self._closed:
                return
            what = ("the step in progress did not finish" if self.stopping_at is None
                    else f"the checkpoint of step {self.stopping_at} was not complete")  # fmt: skip
            self._exit(1, f"error: {what} within {self._grace} s of {self.signal_name}; stopped without saving, "
                          f"{self._newest()}. If it only needs longer, raise train.stop_grace_seconds")  # fmt: skip

    def _newest(self) -> str:
        steps = checkpoint.complete_steps(self._dir)
        if not steps:
            return "there is no complete checkpoint yet"
        return f"the newest complete checkpoint is step {steps[-1]} ({os.path.join(self._dir, str(steps[-1]))})"

    @staticmethod
    def _exit(code: int, message: str) -> None:
        """End the process from the watcher: the main thread may be stuck where no exception reaches."""
        sys.stdout.flush()
        print(f"nopejax train: {message}", file=sys.stderr, flush=True)
        os._exit(code)

    def should_stop(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            stop = multihost_utils.reached_preemption_sync_point(step)
            self.signal_name = self.signal_name or ("SIGTERM" if stop else None)
        else:
            stop = self.requested
        if stop and self.stopping_at is None:
            self.stopping_at = step
        return stop


def run(cfg: ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """Train (or resume) in `workdir`. Returns the summary that is also printed. One trainer per
    workdir: while one runs there, another is refused before it reads anything (WorkdirLock)."""
    s = setup(cfg)
    with checkpoint.WorkdirLock(workdir, take=jax.process_index() == 0):
        return _run(s, cfg, workdir, progress)


def _run(s: Setup, cfg: ConfigDict, workdir: str, progress: bool) -> dict:
    from tqdm import tqdm

    from nopejax import data

    t = cfg.train
    is_main = jax.process_index() == 0
    step_fn, eval_fn = compile_fns(s)
    ckpt = checkpoint.Checkpointer(workdir, cfg)
    # a resumed run keeps the data shards it was saved with, so the process count may change;
    # a stage that changes what the data stream is starts the new stream (nopejax.stages)
    restart_data = stages.check_resume(ckpt.latest_config(), cfg, ckpt.data_shards())
    train_iter = data.make_iterator(cfg, "train", num_shards=None if restart_data else ckpt.data_shards())
    state, start = ckpt.restore_latest(s.abstract_state, None if restart_data else train_iter)
    if state is not None:
        entry = stages.resume_entry(ckpt.restored_config, cfg, start, restart_data)
        if start >= t.steps:
            if is_main:
                print(f"already at step {start} of {t.steps}: nothing to do", flush=True)
            ckpt.close()
            return {"steps": start, "start": start, "final_loss": None, "eval_loss": None, "eval_step": None,
                    "seconds": 0.0, "preempted": False, "stopped_by": None, "checkpoints": ckpt.steps(),
                    "workdir": workdir}  # fmt: skip
        if is_main:
            print(f"resuming from step {start} ({ckpt.directory / str(start)})", flush=True)
    elif cfg.init_from:
        state, entry = state_from(s, *checkpoint.find_checkpoint(cfg.init_from, field="init_from"))
        start = int(host_scalar(state["step"]))
    else:
        state, entry = init_state(s), {"step": 0, "stage": "new run"}
    if is_main:
        stages.write_config(workdir, cfg, start, entry)
    writer = metrics.Writer(workdir, is_main)
    sample_text = t.sample_every and training_sampler(s.graphdef, cfg.data, data.make_tokenizer(cfg.data))
    if is_main:
        metrics.truncate_after(workdir, start)

    def evaluate(params) -> float:
        ce = count = 0.0
        eval_iter = data.make_iterator(cfg, "eval")
        for _ in range(t.eval_batches):
            c, n = eval_fn(params, to_device_batch(s, next(eval_iter)))
            ce, count = ce + host_scalar(c), count + host_scalar(n)
        return ce / max(count, 1.0)

    peak = metrics.peak_flops(jax.devices()[0])
    flops = metrics.train_flops_per_step(cfg)
    tokens_per_step = t.global_batch_size * t.seq_len
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and is_main), unit="step", dynamic_ncols=True)
    pending, last = None, {"loss": float("nan")}
    t_mark, step_mark = time.perf_counter(), start
    last_eval = eval_step = None
    stopped_early = False
    replicated = NamedSharding(s.mesh, PartitionSpec())
    tally = jax.jit(tally_nonfinite, out_shardings=replicated)
    with jax.set_mesh(s.mesh):
        counts = jax.jit(lambda: jnp.zeros(2, jnp.int32), out_shardings=replicated)()
    nonfinite_logged = 0

    def stop_run(error: Exception):
        """Finish what can be finished (the in-flight save becomes durable), then stop."""
        bar.close()
        writer.close()
        try:
            ckpt.close()
        except RunError as save_error:  # that save failed too: the older cause is the one to fix first
            raise save_error from error
        raise error

    def check_finite(done: int, streak: int) -> None:
        """Stop after `train.max_nonfinite_steps` non-finite steps in a row."""
        if streak >= t.max_nonfinite_steps:
            saved = ckpt.steps()
            stop_run(RunError(
                f"{streak} consecutive steps up to step {done} had a non-finite loss or gradient norm "
                f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); their updates were skipped and no "
                f"non-finite state was saved. The newest checkpoint, "
                f"{f'step {saved[-1]}' if saved else 'none yet'}, is the last good state: lower optim.lr, "
                f"lengthen optim.warmup_steps or check the data near step {done}, then rerun to resume"
            ))  # fmt: skip

    def save(done: int, force: bool) -> None:
        nonlocal pending
        if pending is not None:  # its line first, so a stop below still leaves it in metrics.jsonl
            flush(pending)
            pending = None
        # reading the count costs nothing here: the save waits for step `done` anyway
        check_finite(done, int(np.asarray(jax.device_get(counts))[0]))
        try:
            ckpt.save(done, state, train_iter, force=force)
        except RunError as e:
            stop_run(e)

    def flush(pending):
        nonlocal t_mark, step_mark, last, nonfinite_logged
        done, out, eval_loss, counts_done = pending
        values = {k: host_scalar(out[k]) for k in ("loss", "lr", "grad_norm")}  # waits for step `done`
        values.update({k: host_scalar(v) for k, v in out.items() if k.startswith("moe_")})
        streak, total = (int(x) for x in np.asarray(jax.device_get(counts_done)))
        values["nonfinite_steps"], nonfinite_logged = total - nonfinite_logged, total  # since the last line
        now = time.perf_counter()
        tps = (done - step_mark) * tokens_per_step / max(now - t_mark, 1e-9)
        t_mark, step_mark = now, done
        values["tokens_per_sec"] = tps
        values["mfu"] = None if peak is None else tps / tokens_per_step * flops / (peak * jax.device_count())
        if eval_loss is not None:
            values["eval_loss"] = eval_loss
        writer.write(done, values)
        last = values
        check_finite(done, streak)
        try:
            ckpt.check_for_errors()  # an async save that failed since: stop now, not at the next save
        except RunError as e:
            stop_run(e)
        shown = {"loss": f"{values['loss']:.4f}", "tok/s": f"{tps:,.0f}"}
        if values["mfu"] is not None:
            shown["mfu"] = f"{100 * values['mfu']:.1f}%"
        bar.set_postfix(shown, refresh=False)

    t_start = time.perf_counter()
    with jax.set_mesh(s.mesh), Preemption(str(ckpt.directory), t.stop_grace_seconds) as preempt:
        for step in range(start, t.steps):
            batch = to_device_batch(s, next(train_iter))
            state, out = step_fn(state, batch)
            counts = tally(counts, out["nonfinite"])
            done = step + 1
            if pending is not None:
                flush(pending)
                pending = None
            eval_loss = None
            if t.eval_every and (done % t.eval_every == 0 or done == t.steps):  # the summary reports the end
                eval_loss = last_eval = evaluate(state["params"])
                eval_step = done
            if sample_text and done % t.sample_every == 0:
                writer.write_text(done, "sample", sample_text(state["params"]))
            if done % t.log_every == 0 or done == t.steps or eval_loss is not None:
                pending = (done, out, eval_loss, counts)
            stop = preempt.should_stop(done)
            every = cfg.checkpoint.every_steps
            if stop or done == t.steps or (every and done % every == 0):
                save(done, force=stop or done == t.steps)
            bar.update(1)
            if stop:
                stopped_early = done < t.steps
                break
        if pending is not None:
            flush(pending)
        bar.close()
        writer.close()
        ckpt.close()  # waits until the last save is durable (within the grace of a stop); RunError if it failed
    elapsed = time.perf_counter() - t_start
    summary = {
        "steps": int(host_scalar(state["step"])),
        "start": start,
        "final_loss": last.get("loss"),
        "eval_loss": last_eval,
        "eval_step": eval_step,
        "seconds": round(elapsed, 1),
        "preempted": stopped_early,
        "stopped_by": preempt.signal_name if stopped_early else None,
        "checkpoints": ckpt.steps(),
        "workdir": workdir,
    }
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("nopejax_train_end")  # no host exits while others save
    return summary
