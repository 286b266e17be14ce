"""Orbax checkpoints of {train state, data iterator, config}, saved together (nanodo, MaxText).

`DIR/checkpoints/<step>/` holds three items: `state` (sharded arrays: params, optimizer state,
step, rng), `data` (grain's iterator state, one JSON per process) and `config` (the run config
plus the parameter layout). Orbax writes into a temporary directory and renames it when the
save is final, so a half-written checkpoint is never taken as the latest. Saves are async:
the arrays are copied off the device, then written while training goes on.

The layout is recorded, not implied: params are layer-stacked [L, ...] whatever `scan_layers`
says, and `config.layout` names the model fields that fix the array shapes and the pattern.
Restoring into a model that differs in one of them is an error naming that field.
"""

from __future__ import annotations

import json
import logging
import os
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nopejax import config as config_lib
from nopejax.config import ConfigDict, ConfigError

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


def layout(m: ConfigDict) -> dict:
    out = {f: m[f] for f in LAYOUT_FIELDS}
    out["rope_pattern"] = [int(x) for x in config_lib.rope_pattern(m)]
    out["param_layout"] = "layer_stacked_v1"  # [L, ...] per layer param; independent of scan_layers
    return out


def check_compatible(saved: dict, m: ConfigDict, where: str) -> None:
    current = layout(m)
    for field, value in current.items():
        if saved.get(field) != value:
            name = "model.no_rope_layers" if field == "rope_pattern" else f"model.{field}"
            raise ConfigError(
                name,
                f"the checkpoint at {where} has {field}={saved.get(field)!r}, this config has {value!r}",
                "use the config the checkpoint was trained with, or start a new workdir",
            )


def _manager(
    workdir: str, cfg: ConfigDict | None = None, read_only: bool = False, partial: bool = False
) -> ocp.CheckpointManager:
    c = cfg.checkpoint if cfg is not None else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep if c else None,
        keep_period=(c.keep_period or None) if c else None,
        enable_async_checkpointing=c.async_save if c else False,
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

    def _config_item(self) -> dict:
        return {"config": config_lib.to_dict(self.cfg), "layout": layout(self.cfg.model)}

    def save(self, step: int, state: dict, data_iter=None, *, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(self._config_item())}
        if data_iter is not None:
            args["data"] = DataSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def data_shards(self) -> int | None:
        """The data shard count of the newest checkpoint (None without one): a resumed run
        reads the same shards, whatever its process count, so its data order is unchanged."""
        from nopejax.data.pipeline import shard_states

        for step in reversed(self.steps()):
            files = _data_files(epath.Path(self.manager.directory) / str(step) / "data")
            if files:
                return files[0][1] * len(shard_states(json.loads(files[0][2].read_text())))
        return None

    def restore_latest(self, abstract_state: dict, data_iter=None):
        """-> (state, step), or (None, 0) when there is no checkpoint.

        An unreadable newest checkpoint (truncated file, missing array) is reported with its
        path and skipped for the one before; only a config mismatch stops the run.
        """
        for step in reversed(self.steps()):
            path = os.path.join(self.manager.directory, str(step))
            saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            check_compatible(saved["layout"], self.cfg.model, path)
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None:
                args["data"] = DataRestore(data_iter)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            except ConfigError:  # a process count that cannot continue: stop, never restart silently
                raise
            except Exception as e:  # orbax / tensorstore raise many types for a damaged file
                log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                            path, type(e).__name__, str(e).splitlines()[0][:300])  # fmt: skip
                continue
            return restored["state"], step
        return None, 0


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
    """A workdir, its checkpoints/ dir, or one step dir -> (workdir-like root, step)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        return os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
    if os.path.basename(path) == "checkpoints":
        path = os.path.dirname(path)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConfigError("init_from", f"{path} has no checkpoints/ directory", "pass a nopejax workdir or a step dir")
    manager = _manager(path, read_only=True)
    steps = sorted(manager.all_steps())
    manager.close()
    if not steps:
        raise ConfigError("--workdir", f"{path}/checkpoints holds no complete checkpoint", "train first, or import-hf")
    if step is None:
        return path, steps[-1]
    if step not in steps:
        raise ConfigError("--step", f"no checkpoint for step {step} in {path}; there are {steps}", "pick one of those")
    return path, step


def _saved_config_item(workdir: str, step: int) -> dict:
    manager = _manager(workdir, read_only=True)
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    manager.close()
    return saved


def read_config(workdir: str, step: int) -> ConfigDict:
    return config_lib.from_dict(_saved_config_item(workdir, step)["config"])


def checkpoint_layout(workdir: str, step: int) -> dict:
    return _saved_config_item(workdir, step)["layout"]


def restore_params(workdir: str, step: int, shardings=None) -> dict:
    """Only the params of a checkpoint: as host numpy arrays, or placed with `shardings`."""
    manager = _manager(workdir, read_only=True, partial=True)
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
    manager.close()
    return restored["state"]["params"]


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
