"""`nopejax eval-length`: how a trained model's loss and accuracy behave past the length it was trained on.

The kind of evaluation follows the run's data: text runs get loss by position and window length
(`loss_by_length`), copy/reverse/parity runs exact match by input length (`tasks`), passkey runs
accuracy by row length and needle depth (`passkey`); all read per-token stats from `stats`.

Writes into `DIR/eval_length/`: `loss_by_position.csv` (every number), `loss_by_position.md`
(a table) and `loss_by_position.png` (loss vs position, one line per length and run, with the
training length marked; for tasks: exact match and answer loss vs input length; for passkey: a
heat map). `--compare DIR2 ...` evaluates those runs the same way and puts them in the same files.
"""

from __future__ import annotations

import os

from nopejax.config import ConfigError
from nopejax.data.pipeline import SYNTHETIC_SOURCES
from nopejax.data.synthetic import PASSKEY_MIN_LEN
from nopejax.eval import loss_by_length, passkey, tasks
from nopejax.eval.output import write_csv
from nopejax.eval.stats import mesh_config, parse_rope_scaling, read_run, stats_fn

OUT_DIR = "eval_length"
FILES = ("loss_by_position.csv", "loss_by_position.md", "loss_by_position.png")


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(
            "--lengths", f"{text!r} is not a comma-separated list of integers", "write e.g. 128,256,512"
        ) from None
    if not lengths or lengths[0] < 1:
        raise ConfigError("--lengths", f"{text!r} needs positive lengths", "write e.g. 128,256,512")
    return lengths


def _labels(workdirs: list[str], rope_scaling: dict | None) -> list[str]:
    names = [os.path.basename(os.path.abspath(w)) for w in workdirs]
    if len(set(names)) < len(names):  # same basename in different places: use the paths
        names = [os.path.relpath(os.path.abspath(w)) for w in workdirs]
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        names = [f"{n} ({kind} x{rope_scaling.get('factor')})" for n in names]
    return names


def evaluate(
    workdirs: list[str],
    lengths: list[int],
    *,
    step: int | None = None,
    bucket: int = 0,
    batches: int = 4,
    rope_scaling: dict | None = None,
    out_dir: str | None = None,
    progress: bool = True,
    mesh_overrides: list[str] = (),
    devices=None,
) -> dict:
    """Evaluate `workdirs` (the first names the output dir); write CSV, Markdown, PNG.

    `step` applies to the first workdir; compared runs use their newest checkpoint. Each run is
    evaluated on its own mesh with `mesh_overrides` (`mesh.fsdp=8` ...), over `devices` (all).
    Returns {"kind": "text" | task name, "results": [...], "files": [paths], "markdown": str}.
    """
    from tqdm import tqdm

    if batches < 1:
        raise ConfigError("--batches", f"must be >= 1, got {batches}", "use e.g. 4")
    runs = [read_run(w, step if i == 0 else None, rope_scaling) for i, w in enumerate(workdirs)]
    runs = [(root, run_step, mesh_config(cfg, mesh_overrides)) for root, run_step, cfg in runs]
    labels = _labels(workdirs, rope_scaling)
    kinds = {cfg.data.source if cfg.data.source in SYNTHETIC_SOURCES else "text" for _, _, cfg in runs}
    if "passkey" in kinds and lengths[0] < PASSKEY_MIN_LEN:
        raise ConfigError(
            "--lengths", f"{lengths[0]} is too short for a passkey row ({PASSKEY_MIN_LEN} tokens at least)",
            "use multiples of the training length, e.g. 128,256,512,1024",
        )  # fmt: skip
    if len(kinds) > 1:
        raise ConfigError(
            "--compare",
            f"the runs mix kinds of data ({sorted(kinds)})",
            "compare text runs with text runs and task runs with the same task",
        )
    kind = kinds.pop()
    out_dir = out_dir or os.path.join(workdirs[0], OUT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in FILES]

    results = []  # one run's params in memory at a time
    if kind == "text":
        bucket = bucket or runs[0][2].train.seq_len
        budgets = [batches * cfg.train.global_batch_size * max(lengths) for _, _, cfg in runs]
        bar = tqdm(total=len(lengths) * sum(budgets), unit="tok", unit_scale=True, disable=not progress,
                   desc="eval-length")  # fmt: skip
        for (root, run_step, cfg), label, budget in zip(runs, labels, budgets):
            bar.set_postfix_str(label)
            run_stats = stats_fn(root, run_step, cfg, devices)
            loss_sum, count = loss_by_length.eval_text(cfg, run_stats, lengths, budget, bar)
            results.append(loss_by_length.TextResult(label, run_step, cfg.train.seq_len, loss_sum, count))
        bar.close()
        write_csv(paths[0], loss_by_length.text_rows(results, lengths, bucket))
        markdown = loss_by_length.text_markdown(results, lengths, bucket)
        loss_by_length.text_plot(paths[2], results, lengths, bucket)
    elif kind == "passkey":
        rows = [batches * cfg.train.global_batch_size for _, _, cfg in runs]
        bar = tqdm(total=len(lengths) * len(passkey.PASSKEY_DEPTHS) * len(runs), unit="cell", disable=not progress,
                   desc="eval-length passkey")  # fmt: skip
        for (root, run_step, cfg), label, examples in zip(runs, labels, rows):
            bar.set_postfix_str(label)
            acc, loss = passkey.eval_passkey(cfg, stats_fn(root, run_step, cfg, devices), lengths, examples, bar)
            results.append(passkey.PasskeyResult(label, run_step, cfg.train.seq_len, examples, acc, loss))
        bar.close()
        write_csv(paths[0], passkey.passkey_rows(results))
        markdown = passkey.passkey_markdown(results)
        passkey.passkey_plot(paths[2], results)
    else:
        d0 = runs[0][2].data
        span = d0.task_test_max_len - d0.task_train_min_len + 1
        bar = tqdm(total=span * len(runs), unit="len", disable=not progress, desc=f"eval-length {kind}")
        for (root, run_step, cfg), label in zip(runs, labels):
            bar.set_postfix_str(label)
            examples = batches * cfg.train.global_batch_size
            counts, em, loss, acc = tasks.eval_task(cfg, stats_fn(root, run_step, cfg, devices), examples, bar)
            results.append(tasks.TaskResult(label, run_step, kind, cfg.data.task_train_max_len, counts, em, loss, acc))
        bar.close()
        write_csv(paths[0], tasks.task_rows(results))
        markdown = tasks.task_markdown(results)
        tasks.task_plot(paths[2], results)
    with open(paths[1], "w") as f:
        f.write(markdown)
    return {"kind": kind, "results": results, "files": paths, "markdown": markdown}


def main(args) -> int:
    """`nopejax eval-length` (arguments parsed by nopejax.cli)."""
    rope_scaling = parse_rope_scaling(args.rope_scaling)
    lengths = parse_lengths(args.lengths)
    out = evaluate([args.workdir, *args.compare], lengths, step=args.step, bucket=args.bucket, batches=args.batches,
                   rope_scaling=rope_scaling, mesh_overrides=getattr(args, "overrides", []))  # fmt: skip
    if out["kind"] not in ("text", "passkey"):
        print(f"(data.source={out['kind']}: evaluated input lengths task_train_min_len..task_test_max_len; "
              "--lengths applies to text runs)")  # fmt: skip
    print(out["markdown"])
    print("wrote " + ", ".join(out["files"]))
    return 0
