"""Staged training: a run continued with another seq_len, RoPE base, data mixture or mesh.

SmolLM3 pretrained at 4k tokens, then extended the context in two stages: 4k -> 32k with
rope_theta 2M (the released nanotron config; the blog says 1.5M) and 32k -> 64k with 5M, the
sequence split over 4 GPUs, the first stage loading the optimizer state, the second not
(`configs/smollm3_3b_long.py`). nopejax runs a stage in one of two ways:

- a new workdir with `init_from` = the previous stage's run: the params always, the AdamW
  moments with `init_from_optimizer`, the step (and with it the LR schedule's position) with
  `init_from_schedule = "continue"`; by default the step is 0 and the schedule starts over;
- the same workdir, resumed with a changed config: the state (optimizer included) and the step
  continue from the newest checkpoint.

Either way, what may change is everything that leaves the parameter arrays' meaning intact:
`train.*` (seq_len, batch, steps), `model.rope_theta` / `rope_scaling` / dtypes / attention
kind, `mesh.*`, `optim.*` hyperparameters, `data.*`, `checkpoint.*`. Refused, with the field
named: the model's shape and RoPE/NoPE pattern (`checkpoint.check_compatible`) and an optimizer
whose state has another structure (`optim.clip_norm` 0 vs > 0).

The data stream on a same-workdir resume: the saved iterator state is the document index plus
an offset into the document being split, which does not depend on seq_len or the batch's row
count, so with the same data the stream continues at the next unread token (no token skipped
or repeated; rows simply get longer). When what defines the stream changes (`STREAM_FIELDS`:
source, paths, mixture, tokenizer, split, seed ...), the old position means nothing in the new
stream: it starts at its beginning, with a warning and a note in the history.

`DIR/config.json` holds the resolved config of the current stage plus `history`: one entry per
stage, `{"step", "stage": "new run" | "init_from" | "resumed", "changes": {key: [old, new]}}`
(init_from adds the source, its step, and whether the optimizer and schedule were kept).
"""

from __future__ import annotations

import json
import logging
import os

from nopejax import config as config_lib
from nopejax.config import HISTORY_KEY, ConfigDict, ConfigError

log = logging.getLogger("nopejax")

# Fields whose change makes the saved data position meaningless (the new stream starts over).
# Not listed, so a stage may change them and continue the stream: data.packing, data.num_workers,
# data.num_shards (the checkpoint's shard count is kept), train.seq_len, train.global_batch_size.
STREAM_FIELDS = ("data.source", "data.path", "data.text_field", "data.text_unit", "data.tokenizer", "data.add_bos",
                 "data.add_eos", "data.shuffle", "data.eval_fraction", "data.mixture_weights",
                 "data.task_train_min_len", "data.task_train_max_len", "train.seed")  # fmt: skip


def flat(d: dict, prefix: str = "", schema: ConfigDict | None = None) -> dict:
    """{"train": {"seq_len": 4}} -> {"train.seq_len": 4}: sections split, dict-valued fields
    (rope_scaling) kept whole; the history is left out."""
    schema = config_lib.base_config() if schema is None else schema
    out = {}
    for k, v in d.items():
        if k == HISTORY_KEY and not prefix:
            continue
        if isinstance(v, dict) and isinstance(schema.get(k), ConfigDict):
            out.update(flat(v, f"{prefix}{k}.", schema[k]))
        else:
            out[prefix + k] = v
    return out


def changes(old: dict, new: ConfigDict | dict) -> dict[str, list]:
    """{key: [old value, new value]} for every config field that differs (JSON values)."""
    a = flat(old)
    b = flat(config_lib.to_dict(new) if isinstance(new, ConfigDict) else new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def stream_changes(old: dict, cfg: ConfigDict) -> list[str]:
    return [k for k in changes(old, cfg) if k in STREAM_FIELDS]


def check_resume(saved: dict | None, cfg: ConfigDict, shards: int | None) -> bool:
    """Before restoring a workdir's newest checkpoint (trained with config `saved`) into `cfg`:
    -> True when the data stream must start over. Refuses a batch its saved shards cannot fill."""
    if saved is None:
        return False
    if shards is None:  # a checkpoint without a data position (import-hf's step 0): the stream starts here
        return True
    restart = stream_changes(saved, cfg)
    if restart:
        log.warning("resuming with changed %s: the data position of the checkpoint does not apply to the new "
                    "stream, which starts at its beginning", ", ".join(restart))  # fmt: skip
        return True
    B = cfg.train.global_batch_size
    if shards and B % shards:
        raise ConfigError(
            "train.global_batch_size",
            f"the checkpoint's data iterator reads {shards} data shards, which a global batch of {B} rows cannot "
            "continue (each shard fills the same number of rows)",
            f"use a multiple of {shards}, or start a new workdir from this one with init_from",
        )
    return False


def resume_entry(saved: dict, cfg: ConfigDict, step: int, restarted: bool) -> dict | None:
    """The history entry of a same-workdir resume: None when nothing changed."""
    diff = changes(saved, cfg)
    if not diff:
        return None
    entry = {"step": step, "stage": "resumed", "changes": diff}
    if restarted:
        entry["data"] = "restarted"
    return entry


def init_from_entry(source_cfg: dict, cfg: ConfigDict, root: str, source_step: int, step: int) -> dict:
    return {
        "step": step,
        "stage": "init_from",
        "init_from": root,
        "source_step": source_step,
        "optimizer": "kept" if cfg.init_from_optimizer else "fresh",
        "schedule": "continued" if cfg.init_from_schedule == "continue" else "reset",
        "changes": changes(source_cfg, cfg),
    }


def read_history(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f).get(HISTORY_KEY, [])


def write_config(workdir: str, cfg: ConfigDict, step: int, entry: dict | None) -> list[dict]:
    """Write DIR/config.json: the config plus the history, cut at `step` (a resumed run
    rewrites what came after its checkpoint) and extended by `entry`. Returns the history."""
    history = read_history(workdir)
    if entry is not None:
        history = [e for e in history if e["step"] < step] + [entry]
    else:
        history = [e for e in history if e["step"] <= step]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({**config_lib.to_dict(cfg), HISTORY_KEY: history}, f, indent=2)
    return history
