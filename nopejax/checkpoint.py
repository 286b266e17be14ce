"""Orbax checkpoints of {train state, data iterator, config}, saved together (nanodo, MaxText).

`DIR/checkpoints/<step>/` holds three items: `state` (sharded arrays: params, optimizer state,
step, rng), `data` (grain's iterator state, one JSON per process) and `config` (the run config
plus the parameter layout). Orbax writes into a temporary directory and renames it when the
save is final, so a half-written checkpoint is never taken as the latest. Saves are async:
the arrays are copied off the device, then written while training goes on.

The layout is recorded, not implied: params are layer-stacked [L, ...] whatever `scan_layers`
says, and `config.layout` names the model fields that fix the array shapes and the pattern.
Restoring into a model that differs in one of them is an error naming that field.

Faults are handled where they are found (`checkpoint_faults`): a damaged checkpoint is set aside
and the one before is restored; a transient read error is retried; a save that fails (read-only or
full disk, quota) stops the run with one line naming the directory and the cause; the earlier
checkpoints stay as they were.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from nopejax import checkpoint_faults as faults
from nopejax import config as config_lib
from nopejax import layers
from nopejax.config import ConfigDict, ConfigError, RunError

log = logging.getLogger("nopejax")

# model fields a checkpoint's arrays depend on (shapes) or whose meaning they carry (pattern)
LAYOUT_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                 "tie_embeddings")  # fmt: skip
ITEMS = ("state", "data", "config")
DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _data_files(directory) -> list[tuple[int, int, epath.Path]]:
    """(process index, process count, path) of each grain state file in a `data` item dir."""
    directory = epath.Path(directory)  # epath: the workdir may be on GCS
    if not directory.is_dir():
        return []
    found = [(m, p) for p in directory.iterdir() if (m := DATA_FILE.fullmatch(p.name))]
    return sorted((int(m[1]), int(m[2]), p) for m, p in found)


class DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's per-process iterator files, restorable by another number of processes.

    grain names each file process_<i>-of-<n>.json and finds only its own. When the count
    differs, the saved files are read in process order as one list of per-shard states (a
    process may hold several data shards, see `data.make_iterator`) and this process takes
    its share, so a run resumed on fewer or more hosts continues the same data order.
    """

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        index, count = jax.process_index(), jax.process_count()
        if (epath.Path(directory) / f"process_{index}-of-{count}.json").exists():
            return super().restore(directory, item=item)
        from nopejax.data.pipeline import shard_states

        states = []
        for _, _, path in _data_files(directory):
            states += shard_states(json.loads(path.read_text()))
        mine = len(getattr(item, "shards", [item]))
        if mine * count != len(states):
            raise ConfigError(
                "--num-processes",
                f"the data iterator in {directory} has {len(states)} shards, which {count} processes reading "
                f"{mine} each cannot continue",
                f"resume with a process count dividing {len(states)} (and the global batch)",
            )
        share = states[index * mine : (index + 1) * mine]
        item.set_state({"shards": share} if hasattr(item, "shards") else share[0])
        item.start_prefetch()
        return item


# grain's save/restore args, bound to DataHandler (orbax looks handlers up by args type)
@ocp.args.register_with_handler(DataHandler, for_save=True)
class DataSave(grain.checkpoint.CheckpointSave):
    pass


@ocp.args.register_with_handler(DataHandler, for_restore=True)
class DataRestore(grain.checkpoint.CheckpointRestore):
    pass


# Optional per-layer params: whether they exist depends on these. Checkpoints written before they
# were recorded have none of them, hence the defaults.
OPTIONAL_PARAM_FIELDS = {"attention_bias": False, "mlp_bias": False, "qk_norm_weights": False,
                         "block": "pre_norm", "recurrent_block": None, "norm": "rms", "moe": None,
                         "attention_gate": False, "norm_unit_offset": False}  # fmt: skip
FIELD_NAMES = {"rope_pattern": "model.no_rope_layers", "qk_norm_weights": "model.qk_norm", "moe": "model.num_experts"}


def layout(m: ConfigDict) -> dict:
    out = {f: m[f] for f in LAYOUT_FIELDS}
    out["rope_pattern"] = [int(x) for x in layers.rope_pattern(m)]
    out["attention_bias"], out["mlp_bias"] = bool(m.attention_bias), bool(m.mlp_bias)
    # learned q/k norm weights exist (True: per head; "rms_proj": per head and dim, one norm over all heads)
    out["qk_norm_weights"] = {"rms": True, "rms_proj": "rms_proj"}.get(m.qk_norm, False)
    out["attention_gate"] = bool(m.attention_gate)  # the attn_gate projection exists
    out["block"] = m.block  # which norm weights exist (model.BLOCK_NORMS) and where they apply
    out["recurrent_block"] = m.recurrent_block  # the same, for the recurrent-mixer layers
    out["norm"] = m.norm  # what the norm weights scale: RMS- or mean-normalised activations
    out["norm_unit_offset"] = bool(m.norm_unit_offset)  # whether a norm weight w scales by w or by 1 + w
    out["moe"] = None  # which layers have experts, and their shapes (dense FFN / MoE params stack apart)
    if m.num_experts:
        out["moe"] = {
            "ffn_pattern": list(layers.ffn_pattern(m)),
            "num_experts": m.num_experts,
            "expert_d_ff": m.expert_d_ff or m.d_ff,
            "num_shared_experts": m.num_shared_experts,
        }
        if m.shared_expert_gate:  # the shared_out_gate param exists (absent from older checkpoints' layouts)
            out["moe"]["shared_expert_gate"] = True
    out["param_layout"] = "layer_stacked_v1"  # [L, ...] per layer param; independent of scan_layers
    return out


RESUME_FIX = "use the config the checkpoint was trained with, or start a new workdir"


def check_compatible(saved: dict, m: ConfigDict, where: str, fix: str = RESUME_FIX) -> None:
    current = layout(m)
    for field, value in current.items():
        was = saved.get(field, OPTIONAL_PARAM_FIELDS.get(field))
        if was != value:
            raise ConfigError(
                FIELD_NAMES.get(field, f"model.{field}"),
                f"the checkpoint at {where} has {field}={was!r}, this config has {value!r}",
                fix,
            )


def _leaf_shapes(tree) -> dict[tuple, tuple]:
    """path -> shape of every array leaf; namedtuple fields and dict keys read alike, so a
    restored metadata tree (dicts) and a live optimizer state (namedtuples) compare."""

    def name(key):
        return str(getattr(key, "name", getattr(key, "key", getattr(key, "idx", key))))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def check_opt_state(saved_state_meta, abstract_state: dict, where: str, field: str, fix: str) -> None:
    """The optimizer state a checkpoint holds must have the structure this config builds
    (clip_norm 0 vs > 0 adds or drops a state): say so before orbax fails on it."""
    if "opt_state" not in saved_state_meta:
        raise ConfigError(field, f"the checkpoint at {where} holds no optimizer state", fix)
    saved, wanted = _leaf_shapes(saved_state_meta["opt_state"]), _leaf_shapes(abstract_state["opt_state"])
    if saved != wanted:
        diff = sorted(set(saved.items()) ^ set(wanted.items()))[0]
        raise ConfigError(
            field,
            f"the optimizer state at {where} has another structure than this config's optimizer (first difference: "
            f"{'.'.join(diff[0])} {diff[1]}, in {'the checkpoint' if diff in saved.items() else 'this config'} only)",
            fix,
        )


def _manager(
    workdir: str, cfg: ConfigDict | None = None, read_only: bool = False, partial: bool = False
) -> ocp.CheckpointManager:
    c = cfg.checkpoint if cfg is not None else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep if c else None,
        keep_period=(c.keep_period or None) if c else None,
        enable_async_checkpointing=c.async_save if c else False,
        # folders are made before save() returns: a read-only or full disk then raises here, where
        # orbax 0.12's background creation leaves its writer threads waiting and the process hung
        async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=options,
        item_handlers={
            # same files either way; the PyTree handler also restores a subtree (params only)
            "state": ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler(),
            "data": DataHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


class Checkpointer:
    """The run's checkpoint manager: save, and restore the newest readable checkpoint."""

    def __init__(self, workdir: str, cfg: ConfigDict):
        self.workdir, self.cfg = workdir, cfg
        self.manager = _manager(workdir, cfg)
        self.directory = epath.Path(self.manager.directory)
        self._saving = None  # the step of the newest save, for the error if it fails in the background
        self.restored_config: dict | None = None  # the config the restored checkpoint was trained with

    def _config_item(self) -> dict:
        return {"config": config_lib.to_dict(self.cfg), "layout": layout(self.cfg.model)}

    def _save_failed(self, e: Exception) -> RunError:
        kept = complete_steps(self.directory, exclude=self._saving)
        resume = f"rerun to resume from step {kept[-1]}" if kept else "rerun"
        return RunError(
            f"saving checkpoint step {self._saving} to {self.directory} failed ({faults.cause(e)}); the earlier "
            f"checkpoints {kept} are intact. Make the directory writable or free space there, then {resume}"
        )

    def save(self, step: int, state: dict, data_iter=None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(self._config_item())}
        if data_iter is not None:
            args["data"] = DataSave(data_iter)
        try:
            # waits for the previous async save, so its failure surfaces here too (as this step's)
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # OSError, tensorstore's and orbax's own errors: all mean "not saved"
            self._saving = step
            raise self._save_failed(e) from e
        if saved:
            self._saving = step
        return saved

    def check_for_errors(self) -> None:
        """Raise RunError if an async save has failed since; never blocks on one in flight."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(e) from e

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e) from e

    def close(self) -> None:
        try:
            self.wait()
        except RunError:
            with contextlib.suppress(Exception):  # the same failure once more; it is reported above
                self.manager.close()
            raise
        self.manager.close()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def data_shards(self) -> int | None:
        """The data shard count of the newest checkpoint (None without one): a resumed run
        reads the same shards, whatever its process count, so its data order is unchanged."""
        from nopejax.data.pipeline import shard_states

        for step in reversed(self.steps()):
            files = _data_files(self.directory / str(step) / "data")
            try:
                return files[0][1] * len(shard_states(json.loads(files[0][2].read_text())))
            except (IndexError, json.JSONDecodeError):  # none saved, or damaged: restore_latest sets it aside
                continue
        return None

    def _where(self, step: int) -> str:
        return str(self.directory / str(step))

    def _read_config_item(self, step: int) -> tuple[dict | None, Exception | None]:
        def read_item():
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

        return faults.read(read_item, step, self._where(step))

    def latest_config(self) -> dict | None:
        """The config the newest readable checkpoint was trained with (None without one)."""
        for step in reversed(self.steps()):
            item, error = self._read_config_item(step)
            if error is None:
                return item["config"]
            # damaged: restore_latest sets it aside and looks further back too
        return None

    def _try_restore(self, step: int, abstract_state: dict, data_iter) -> tuple[dict | None, Exception | None]:
        """-> (restored items, None), or (None, the error that shows it damaged). A config mismatch
        raises ConfigError; any other failure to read raises RunError (`checkpoint_faults.read`)."""
        where = self._where(step)
        saved, error = self._read_config_item(step)
        if error is None:
            state_meta, error = faults.read(lambda: self.manager.item_metadata(step)["state"], step, where)
        if error is not None:
            return None, error
        check_compatible(saved["layout"], self.cfg.model, where)
        if state_meta is not None:  # an optimizer of another structure is a config change, not damage
            check_opt_state(state_meta, abstract_state, where, "optim.clip_norm",
                            "resume with the optimizer settings the checkpoint was trained with (clip_norm 0 and "
                            "> 0 build different states), or start a new workdir with init_from")  # fmt: skip
        self.restored_config = saved["config"]
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = DataRestore(data_iter)
        return faults.read(lambda: self.manager.restore(step, args=ocp.args.Composite(**args)), step, where)

    def _set_aside(self, step: int, error: Exception | None) -> tuple[int, str, str]:
        """Quarantine a damaged step (process 0 renames; every process then sees it gone).
        -> (step, what is wrong, where it went), for `restore_latest` to report."""
        where = self.directory / str(step)
        moved = f"set aside as {self.directory / f'{step}.damaged-*'}"
        if jax.process_index() == 0:
            try:
                moved = f"set aside as {self.directory / faults.quarantine(self.directory, step)}"
            except OSError as e:  # a read-only workdir: the run's first save there will say so
                moved = f"could not be set aside ({faults.cause(e)})"
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"nopejax_set_aside_{step}")
        self.manager.reload()
        cause = faults.cause(faults.read_error_kind(error)[1]) if error is not None else "unreadable on another process"
        return step, f"{where} is damaged ({cause})", moved

    def restore_latest(self, abstract_state: dict, data_iter=None):
        """-> (state, step), or (None, 0) when there is no checkpoint.

        A damaged checkpoint (truncated or missing file, corrupt metadata) is set aside, and the one
        before is tried; each is reported in one line naming the step the run continues from. A
        config mismatch or a read that fails for another reason stops the run. Processes agree on
        each step's outcome, so none resumes from a step another could not read.
        """
        aside = []
        for step in reversed(self.steps()):
            failure = None
            try:
                restored, error = self._try_restore(step, abstract_state, data_iter)
            except RunError as e:  # after the vote, so that no process waits for another that stopped
                restored, error, failure = None, None, e
            outcome = 0 if restored is not None else 2 if failure is not None else 1  # ok, damaged, stop
            if jax.process_count() > 1:
                outcome = int(np.max(multihost_utils.process_allgather(np.int32(outcome))))
            if outcome == 2:
                raise failure or RunError(f"another process could not read checkpoint step {step} (see its error)")
            if outcome == 0:
                _report_set_aside(aside, f"continuing from step {step}")
                return restored["state"], step
            aside.append(self._set_aside(step, error))
        _report_set_aside(aside, "no earlier checkpoint is left, so the run starts without one")
        return None, 0


def _report_set_aside(aside: list[tuple[int, str, str]], then: str) -> None:
    for step, what, moved in aside:
        log.warning("checkpoint step %d: %s; %s; %s", step, what, moved, then)


def complete_steps(directory, exclude: int | None = None) -> list[int]:
    """Steps whose folder is complete on disk (orbax renames a save's temporary folder last)."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and int(p.name) != exclude)


def _unreadable(root: str, step: int, error: Exception) -> ConfigError:
    """The error for reading a damaged step, naming the nearest step whose params do read."""
    others = sorted(complete_steps(os.path.join(root, "checkpoints"), exclude=step),
                    key=lambda s: (abs(s - step), -s))  # fmt: skip
    nearest = next((s for s in others if _params_readable(root, s)), None)
    fix = (f"use --step {nearest}, the nearest readable checkpoint" if nearest is not None
           else "no readable checkpoint is left there; train again or restore the folder from a copy")  # fmt: skip
    return ConfigError("--step", f"checkpoint {root}/checkpoints/{step} is unreadable ({faults.cause(error)})", fix)


def _params_readable(root: str, step: int) -> bool:
    try:
        _restore_params(root, step, None)
    except Exception:  # damaged too: the caller looks further away
        return False
    return True


def find_checkpoint(path: str, step: int | None = None, field: str = "--workdir") -> tuple[str, int]:
    """A workdir, its checkpoints/ dir, or one step dir -> (workdir-like root, step).
    `field` is what errors name: the option or config field that gave the path."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise ConfigError(field, f"{path} does not exist", "pass the workdir of a nopejax run, or one of its step dirs")
    if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        return os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
    if os.path.basename(path) == "checkpoints":
        path = os.path.dirname(path)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConfigError(field, f"{path} has no checkpoints/ directory", "pass a nopejax workdir or a step dir")
    manager = _manager(path, read_only=True)
    steps = sorted(manager.all_steps())
    manager.close()
    if not steps:
        raise ConfigError(field, f"{path}/checkpoints holds no complete checkpoint", "train first, or import-hf")
    if step is None:
        return path, steps[-1]
    if step not in steps:
        damaged = faults.damaged_steps(os.path.join(path, "checkpoints")).get(step)
        if damaged:
            nearest = min(steps, key=lambda s: (abs(s - step), -s))
            raise ConfigError(
                "--step",
                f"step {step} in {path} was found unreadable and set aside as checkpoints/{damaged}",
                f"use --step {nearest}, the nearest readable checkpoint",
            )
        raise ConfigError("--step", f"no checkpoint for step {step} in {path}; there are {steps}", "pick one of those")
    return path, step


def _saved_config_item(workdir: str, step: int) -> dict:
    manager = _manager(workdir, read_only=True)
    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:
        raise _unreadable(workdir, step, e) from None
    finally:
        manager.close()


def read_config(workdir: str, step: int) -> ConfigDict:
    return config_lib.from_dict(_saved_config_item(workdir, step)["config"])


def checkpoint_layout(workdir: str, step: int) -> dict:
    return _saved_config_item(workdir, step)["layout"]


def _restore_params(workdir: str, step: int, shardings) -> dict:
    manager = _manager(workdir, read_only=True, partial=True)
    try:
        meta = manager.item_metadata(step)["state"]
        params_meta = meta["params"] if isinstance(meta, dict) else meta.tree["params"]
        if shardings is None:
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
        else:
            restore_args = jax.tree.map(lambda _, s: ocp.ArrayRestoreArgs(sharding=s), params_meta, shardings)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": params_meta}, restore_args={"params": restore_args}, partial_restore=True
                )
            ),
        )
    finally:
        manager.close()
    return restored["state"]["params"]


def restore_params(workdir: str, step: int, shardings=None) -> dict:
    """Only the params of a checkpoint: as host numpy arrays, or placed with `shardings`.
    An unreadable step is an error naming the nearest readable one."""
    try:
        return _restore_params(workdir, step, shardings)
    except Exception as e:  # orbax / tensorstore raise many types for a damaged file
        raise _unreadable(workdir, step, e) from None


def restore_state(workdir: str, step: int, abstract_state: dict) -> dict:
    """The whole train state of a checkpoint, placed as `abstract_state` says (another mesh is
    fine): init_from with the optimizer state. A source without a matching one is an error."""
    manager = _manager(workdir, read_only=True)
    where = f"{workdir} step {step}"
    try:
        try:
            meta = manager.item_metadata(step)["state"]
        except Exception as e:
            raise _unreadable(workdir, step, e) from None
        check_opt_state(meta, abstract_state, where, "init_from_optimizer",
                        "set init_from_optimizer=false (fresh AdamW moments), or use the source's optimizer "
                        "settings (optim.clip_norm 0 and > 0 build different states)")  # fmt: skip
        try:
            return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
                "state"
            ]
        except Exception as e:
            raise _unreadable(workdir, step, e) from None
    finally:
        manager.close()


def load_model(workdir: str, step: int | None = None):
    """The Decoder of a checkpoint (newest by default), with its own config (fp32 compute)."""
    from nopejax import hf

    root, step = find_checkpoint(workdir, step)
    cfg = read_config(root, step)
    return hf.build(cfg.model, restore_params(root, step))


def write_run_config(workdir: str, cfg: ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg), f, indent=2)
