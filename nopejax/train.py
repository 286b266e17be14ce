"""Training: one pure jitted step, and the loop that drives it, phase by phase.

The step is jitted with explicit in/out shardings and donates the state (built already sharded:
nopejax/state.py). `Trainer` runs one workdir top to bottom: build (compile, open the
checkpoints) -> restore (`restore.plan`, executed: resume, init_from or new) -> loop (step,
metrics, eval, sample, checkpoint, signals) -> finish (the summary). The loop dispatches step n
before it reads step n-1's metrics, so the host never stalls the device.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from nopejax import checkpoint, data, metrics, model, moe, optimizer, restore, sharding, signals, stages
from nopejax.config import ConfigDict, ConfigError, RunError
from nopejax.decode import training_sampler
from nopejax.lock import WorkdirLock
from nopejax.restore import state_from  # noqa: F401 (public here: the state of an init_from run)
from nopejax.state import (  # noqa: F401 (public here: train.setup, train.init_state, ...)
    BATCH_KEYS,
    Setup,
    abstract_batch,
    fresh_opt_state,
    init_state,
    param_logical_axes,
    setup,
    to_device_batch,
)

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

    head_RDV = model.loss_head(graphdef, params, x_BSD.dtype, rows=x_BSD.shape[0])

    def chunk_sums(x_BcD, targets_Bc, mask_Bc):
        logits_BcV = model.apply_head(graphdef, params, x_BcD, head_RDV)
        log_z_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
        # a masked sum, not a gather: each device sums its own vocabulary columns
        vocab_V = jnp.arange(logits_BcV.shape[-1], dtype=targets_Bc.dtype)
        target_logit_Bc = jnp.sum(jnp.where(vocab_V == targets_Bc[..., None], logits_BcV, 0.0), axis=-1)
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


def accumulate(sums_and_grads, params, micros):
    """Sum `sums_and_grads(params, micro)` over the microbatches `micros` [A, B/A, ...] under a scan.
    -> (the sums, how many groups of rows they add up: A, or A x data replicas).

    Across `data` each replica sums its own microbatches' gradients and the replicas add theirs
    once, after the last one: the scan runs inside `shard_map` over `data` (unchecked, so JAX adds
    no reduction for the replicated params' gradients; the model inside drops `data` from its
    shardings, `sharding.logical_to_spec`), and one psum follows the loop. Left to the partitioner,
    with the data-replicated sum as the loop's carry, every microbatch all-reduced its whole gradient:
    A times the traffic, over DCN when `data` spans slices. Over `fsdp` each microbatch's gradient
    still reduce-scatters onto the params' shards, as every FSDP step does. The MoE statistics of a
    group are its own rows' (the balance loss per replica and microbatch, as GShard's per group).
    """
    mesh = jax.sharding.get_abstract_mesh()

    def scan(params, micros):
        def body(carry, micro):
            micro = jax.tree.map(lambda x: sharding.constrain(x, ("act_batch", None)), micro)
            return jax.tree.map(jnp.add, carry, sums_and_grads(params, micro)), None

        shapes = jax.eval_shape(sums_and_grads, params, jax.tree.map(lambda x: x[0], micros))
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        return jax.lax.scan(body, zeros, micros)[0]

    A, data = jax.tree.leaves(micros)[0].shape[0], 1 if mesh.empty else mesh.shape.get("data", 1)
    if data == 1:
        return scan(params, micros), A

    def per_replica(params, micros):  # each replica's gradient is its own partial sum until the psum
        return jax.lax.psum(scan(params, micros), "data")

    specs = (PartitionSpec(), PartitionSpec(None, "data"))
    sums = jax.shard_map(per_replica, in_specs=specs, out_specs=PartitionSpec(), axis_names={"data"}, check_vma=False)(
        params, micros
    )
    return sums, A * data


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
        (grads, ce, count, moe_aux), groups = accumulate(sums_and_grads, params, micros)
        if moe_aux is not None:  # loads and drops add up over the groups; the losses are means
            moe_aux = {**moe_aux, "balance": moe_aux["balance"] / groups, "z": moe_aux["z"] / groups}
    # in the params' own layout before the update: the tied embedding's two gradients (D-split from
    # the lookup, vocabulary-split from the loss head) meet here, and left free the partitioner ran
    # AdamW on the table vocabulary-split and moved the new table and both moments back, in fp32
    axes = param_logical_axes(cfg.model)
    grads = jax.tree.map(sharding.constrain, grads, axes, is_leaf=lambda x: isinstance(x, tuple))
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


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile: memory and FLOPs before a pod is booked


def dry_run(cfg: ConfigDict, topology: str | None = None) -> dict:
    devices = None
    if topology:
        from jax.experimental import topologies

        # compile only, no TPU attached: another process's dry run may hold libtpu's lockfile
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
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


def run(cfg: ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """Train (or resume) in `workdir`. Returns the summary that is also printed. One trainer per
    workdir: while one runs there, another is refused before it reads anything (WorkdirLock)."""
    s = setup(cfg)
    with WorkdirLock(workdir, take=jax.process_index() == 0):
        return Trainer(s, cfg, workdir, progress=progress).run()


class Trainer:
    """One run in one workdir. `run` reads top to bottom: build (here), the restore plan, loop, finish.

    `cfg` is the config as given, which checkpoints and DIR/config.json record; `s.cfg` is the
    one resolved for the devices. What changes while training lives on the object: the state and
    data iterator, the metrics line waiting for its step, the throughput marks, the non-finite tally.
    """

    def __init__(self, s: Setup, cfg: ConfigDict, workdir: str, *, progress: bool = True):
        self.s, self.cfg, self.t, self.workdir, self.progress = s, cfg, cfg.train, workdir, progress
        self.is_main = jax.process_index() == 0
        self.step_fn, self.eval_fn = compile_fns(s)
        self.ckpt = checkpoint.Checkpointer(workdir, cfg)

    def run(self) -> dict:
        start = self.starting_point()
        if start.resumed and start.step >= self.t.steps:
            return self.nothing_to_do(start.step)
        if start.resumed:
            self.say(f"resuming from step {start.step} ({self.ckpt.directory / str(start.step)})")
        self.prepare(start)
        t_start = time.perf_counter()
        preempt = signals.Preemption(str(self.ckpt.directory), self.t.stop_grace_seconds)
        with jax.set_mesh(self.s.mesh), preempt:
            stopped_early = self.loop(start.step, preempt)
            self.close()  # waits until the last save is durable (within the grace of a stop)
        return self.finish(start.step, time.perf_counter() - t_start, stopped_early, preempt.signal_name)

    # --- the restore plan ------------------------------------------------------------------------

    def starting_point(self) -> restore.Start:
        """Plan from the workdir and the config, open the data stream where the plan says, then
        restore the state (and the stream's position) or build it."""
        plan = restore.plan(self.cfg, self.ckpt)
        self.train_iter = data.make_iterator(self.cfg, "train", num_shards=plan.data_shards)
        start = restore.execute(plan, self.s, self.cfg, self.ckpt, self.train_iter)
        self.state = start.state
        return start

    def nothing_to_do(self, step: int) -> dict:
        self.say(f"already at step {step} of {self.t.steps}: nothing to do")
        self.ckpt.close()
        return {"steps": step, "start": step, "final_loss": None, "eval_loss": None, "eval_step": None,
                "seconds": 0.0, "preempted": False, "stopped_by": None, "checkpoints": self.ckpt.steps(),
                "workdir": self.workdir}  # fmt: skip

    def prepare(self, start: restore.Start) -> None:
        """Record the stage, open the metrics, and zero what the loop counts."""
        cfg, t = self.cfg, self.t
        if self.is_main:
            stages.write_config(self.workdir, cfg, start.step, start.entry)
        self.writer = metrics.Writer(self.workdir, self.is_main)
        self.sample_text = t.sample_every and training_sampler(self.s.graphdef, cfg.data, data.make_tokenizer(cfg.data))
        if self.is_main:
            metrics.truncate_after(self.workdir, start.step)
        self.peak, self.flops = metrics.peak_flops(jax.devices()[0]), metrics.train_flops_per_step(cfg)
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.bar = tqdm(total=t.steps, initial=start.step, disable=not (self.progress and self.is_main), unit="step",
                        dynamic_ncols=True)  # fmt: skip
        self.pending = None  # (step, its metrics, eval loss, non-finite counts): written once the next step is queued
        self.last, self.last_eval, self.eval_step = {"loss": float("nan")}, None, None
        self.t_mark, self.step_mark = time.perf_counter(), start.step
        replicated = NamedSharding(self.s.mesh, PartitionSpec())
        self.tally = jax.jit(tally_nonfinite, out_shardings=replicated)
        with jax.set_mesh(self.s.mesh):
            self.counts = jax.jit(lambda: jnp.zeros(2, jnp.int32), out_shardings=replicated)()
        self.nonfinite_logged = 0

    # --- the loop ------------------------------------------------------------------------------

    def loop(self, start: int, preempt: signals.Preemption) -> bool:
        """Steps `start` .. train.steps, or until a signal asks to stop. -> whether it stopped early."""
        t = self.t
        for step in range(start, t.steps):
            batch = to_device_batch(self.s, next(self.train_iter))
            self.state, out = self.step_fn(self.state, batch)
            self.counts = self.tally(self.counts, out["nonfinite"])
            done = step + 1
            self.write_pending()  # an earlier step's line: the host waits for that step while step `done` runs
            eval_loss = None
            if t.eval_every and (done % t.eval_every == 0 or done == t.steps):  # the summary reports the end
                eval_loss = self.last_eval = self.evaluate(self.state["params"])
                self.eval_step = done
            if self.sample_text and done % t.sample_every == 0:
                self.writer.write_text(done, "sample", self.sample_text(self.state["params"]))
            if done % t.log_every == 0 or done == t.steps or eval_loss is not None:
                self.pending = (done, out, eval_loss, self.counts)
            stop = preempt.should_stop(done)
            every = self.cfg.checkpoint.every_steps
            if stop or done == t.steps or (every and done % every == 0):
                self.save(done, force=stop or done == t.steps)
            self.bar.update(1)
            if stop:
                return done < t.steps
        return False

    def evaluate(self, params) -> float:
        ce = count = 0.0
        eval_iter = data.make_iterator(self.cfg, "eval")
        for _ in range(self.t.eval_batches):
            c, n = self.eval_fn(params, to_device_batch(self.s, next(eval_iter)))
            ce, count = ce + host_scalar(c), count + host_scalar(n)
        return ce / max(count, 1.0)

    def write_pending(self) -> None:
        """Write the waiting metrics line (reading it waits for its step), then stop on what it shows:
        too many non-finite steps, or an async save that failed since."""
        if self.pending is None:
            return
        (done, out, eval_loss, counts_done), self.pending = self.pending, None
        values = {k: host_scalar(out[k]) for k in ("loss", "lr", "grad_norm")}  # waits for step `done`
        values.update({k: host_scalar(v) for k, v in out.items() if k.startswith("moe_")})
        streak, total = (int(x) for x in np.asarray(jax.device_get(counts_done)))
        values["nonfinite_steps"], self.nonfinite_logged = total - self.nonfinite_logged, total  # since the last line
        now = time.perf_counter()
        tps = (done - self.step_mark) * self.tokens_per_step / max(now - self.t_mark, 1e-9)
        self.t_mark, self.step_mark = now, done
        values["tokens_per_sec"] = tps
        values["mfu"] = (None if self.peak is None
                         else tps / self.tokens_per_step * self.flops / (self.peak * jax.device_count()))  # fmt: skip
        if eval_loss is not None:
            values["eval_loss"] = eval_loss
        self.writer.write(done, values)
        self.last = values
        self.check_finite(done, streak)
        try:
            self.ckpt.check_for_errors()  # an async save that failed since: stop now, not at the next save
        except RunError as e:
            self.stop_run(e)
        shown = {"loss": f"{values['loss']:.4f}", "tok/s": f"{tps:,.0f}"}
        if values["mfu"] is not None:
            shown["mfu"] = f"{100 * values['mfu']:.1f}%"
        self.bar.set_postfix(shown, refresh=False)

    def save(self, done: int, force: bool) -> None:
        self.write_pending()  # its line first, so a stop below still leaves it in metrics.jsonl
        # reading the count costs nothing here: the save waits for step `done` anyway
        self.check_finite(done, int(np.asarray(jax.device_get(self.counts))[0]))
        try:
            self.ckpt.save(done, self.state, self.train_iter, force=force)
        except RunError as e:
            self.stop_run(e)

    def check_finite(self, done: int, streak: int) -> None:
        """Stop after `train.max_nonfinite_steps` non-finite steps in a row."""
        limit = self.t.max_nonfinite_steps
        if streak >= limit:
            saved = self.ckpt.steps()
            self.stop_run(RunError(
                f"{streak} consecutive steps up to step {done} had a non-finite loss or gradient norm "
                f"(train.max_nonfinite_steps={limit}); their updates were skipped and no "
                f"non-finite state was saved. The newest checkpoint, "
                f"{f'step {saved[-1]}' if saved else 'none yet'}, is the last good state: lower optim.lr, "
                f"lengthen optim.warmup_steps or check the data near step {done}, then rerun to resume"
            ))  # fmt: skip

    def stop_run(self, error: Exception):
        """Finish what can be finished (the in-flight save becomes durable), then raise `error`."""
        self.bar.close()
        self.writer.close()
        try:
            self.ckpt.close()
        except RunError as save_error:  # that save failed too: the older cause is the one to fix first
            raise save_error from error
        raise error

    # --- finish --------------------------------------------------------------------------------

    def close(self) -> None:
        """The last metrics line, then the checkpoints: RunError if the last save failed."""
        self.write_pending()
        self.bar.close()
        self.writer.close()
        self.ckpt.close()

    def finish(self, start: int, seconds: float, stopped_early: bool, signal_name: str | None) -> dict:
        summary = {
            "steps": int(host_scalar(self.state["step"])),
            "start": start,
            "final_loss": self.last.get("loss"),
            "eval_loss": self.last_eval,
            "eval_step": self.eval_step,
            "seconds": round(seconds, 1),
            "preempted": stopped_early,
            "stopped_by": signal_name if stopped_early else None,
            "checkpoints": self.ckpt.steps(),
            "workdir": self.workdir,
        }
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("nopejax_train_end")  # no host exits while others save
        return summary

    def say(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)
