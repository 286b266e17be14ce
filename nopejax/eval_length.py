"""`nopejax eval-length`: how a trained model's loss behaves past the length it was trained on.

Shape letters: B rows, S (= L) sequence length, V vocab.

Text runs (data.source default/text/jsonl/...). The held-out data for length L is the run's own
data config with `train.seq_len = L` and the eval split, packed with `data.packing = "concat"`,
which lays the eval documents end to end and cuts that one stream into rows of L tokens. We then
drop the packer's segment ids and positions: every row is read as ONE continuous text, attention
crosses document boundaries and positions run 0..L-1. Why: with per-document positions and
segment masking, a row of 1024 tokens holding six 200-token documents never shows the model a
position past 199, so "loss at position 900" would measure nothing. The default corpus (and most
corpora) has few documents longer than 1024 tokens; keeping only those would leave too little
text. The cost is that some windows span a document boundary; the loss mask still drops the one
EOS -> next-BOS target per boundary, exactly as in training. Every length sees the same text:
the first `batches * train.global_batch_size * max(lengths)` tokens of the eval stream, cut
into windows of L (the stream repeats if the eval split is smaller than that).

Synthetic tasks (data.source copy/reverse/parity). For each input length n from
task_train_min_len to task_test_max_len, `batches * train.global_batch_size` fresh eval-split
examples of exactly length n (one example per row, positions from 0) give exact match (greedy
decoding exactly right, `data.exact_match`) and the mean loss on answer tokens.

Passkey (data.source passkey). For each of `--lengths` (row lengths in tokens, usually 1x-8x
the training length) and each depth in PASSKEY_DEPTHS, `batches * train.global_batch_size`
fresh eval-split rows with the needle at that depth give accuracy (all key digits right under
greedy decoding) and the answer loss; the plot is a heat map of accuracy over length x depth.

Either way the model runs in fp32 with `attention_impl = "xla"`, whatever the run trained
with, so numbers compare across hardware. It runs on the run's own mesh (`mesh.*` of its
config, `--config.mesh.KEY=VALUE` to change it): params sharded by the logical-axis table as in
training, each forward's rows spread over the data axes (padded to a multiple of them), so a
long evaluation never needs one device to hold the model; the sums are the 1-device ones.
`--rope-scaling` (HF `rope_scaling`: linear, yarn, llama3) replaces the run's scaling; it
changes the RoPE frequencies only, so NoPE layers, which never rotate q and k, are untouched by
construction (`nopejax.rope`). For yarn and llama3 the `original_max_position_embeddings`
defaults to the run's training length.

Writes into `DIR/eval_length/`: `loss_by_position.csv` (every number), `loss_by_position.md`
(a table) and `loss_by_position.png` (loss vs position, one line per length and run, with the
training length marked; for tasks: exact match and answer loss vs input length). `--compare
DIR2 ...` evaluates those runs the same way and puts them in the same files.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from nopejax import checkpoint, config, context, data, hf, model, sharding, train
from nopejax.config import ConfigDict, ConfigError
from nopejax.data.pipeline import SYNTHETIC_SOURCES
from nopejax.data.synthetic import PASSKEY_MIN_LEN, TaskExample, answer_length

FORWARD_TOKENS = 8192  # tokens per device per forward call: bounds the [B, H, S, S] attention scores
OUT_DIR = "eval_length"
FILES = ("loss_by_position.csv", "loss_by_position.md", "loss_by_position.png")
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle depth: 0 = right after BOS, 1 = right before the question


@dataclasses.dataclass
class TextResult:
    """One run on text: per length, per-position sums over all windows."""

    label: str
    step: int
    train_length: int
    loss_sum: dict[int, np.ndarray]  # L -> float64 [L], summed token loss at each position
    count: dict[int, np.ndarray]  # L -> float64 [L], scored tokens at each position

    def mean(self, length: int, start: int = 0, end: int | None = None) -> tuple[float, int]:
        """(mean loss, tokens) over positions [start, end) of windows of `length`."""
        n = float(self.count[length][start:end].sum())
        return float(self.loss_sum[length][start:end].sum()) / max(n, 1.0), int(n)


@dataclasses.dataclass
class TaskResult:
    """One run on a synthetic task: per input length."""

    label: str
    step: int
    task: str
    train_max_length: int
    examples: dict[int, int]
    exact_match: dict[int, float]
    answer_loss: dict[int, float]
    token_accuracy: dict[int, float] = dataclasses.field(default_factory=dict)  # answer tokens right (greedy)


@dataclasses.dataclass
class PasskeyResult:
    """One run on passkey retrieval: per (row length, needle depth)."""

    label: str
    step: int
    train_length: int
    examples: int  # per cell
    accuracy: dict[tuple[int, float], float]
    answer_loss: dict[tuple[int, float], float]

    def by_length(self, length: int) -> float:
        return float(np.mean([a for (n, _), a in self.accuracy.items() if n == length]))

    def by_depth(self, depth: float) -> float:
        return float(np.mean([a for (_, d), a in self.accuracy.items() if d == depth]))


# ---------------------------------------------------------------------------------------------
# Loading a run for evaluation


def eval_config(cfg: ConfigDict, rope_scaling: dict | None) -> ConfigDict:
    """The run's config set up for evaluation: fp32, XLA attention, optional RoPE scaling."""
    cfg = copy.deepcopy(cfg)  # the caller's config stays as trained
    cfg.model.dtype = "float32"
    cfg.model.attention_impl = "xla"
    cfg.model.remat = "none"
    if rope_scaling is not None:
        scaling = dict(rope_scaling)
        if scaling.get("rope_type", scaling.get("type")) in ("yarn", "llama3"):
            scaling.setdefault("original_max_position_embeddings", cfg.train.seq_len)
        cfg.model.rope_scaling = scaling
    return config.validate(cfg)


def parse_rope_scaling(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        scaling = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            "--rope-scaling", f"{text!r} is not JSON ({e})", 'write e.g. \'{"rope_type": "yarn", "factor": 4}\''
        ) from None
    if not isinstance(scaling, dict):
        raise ConfigError(
            "--rope-scaling", f"{text!r} is not a JSON object", 'write e.g. \'{"rope_type": "linear", "factor": 2}\''
        )
    return scaling


def read_run(workdir: str, step: int | None, rope_scaling: dict | None) -> tuple[str, int, ConfigDict]:
    """-> (checkpoint root, step, eval config): cheap, no arrays read."""
    root, step = checkpoint.find_checkpoint(workdir, step)
    return root, step, eval_config(checkpoint.read_config(root, step), rope_scaling)


def mesh_config(cfg: ConfigDict, overrides) -> ConfigDict:
    """The run's config with `--config.mesh.KEY=VALUE` overrides; the rest is the checkpoint's."""
    others = [o for o in overrides if not o.removeprefix("--config.").startswith("mesh.")]
    if others:
        raise ConfigError(
            others[0].split("=")[0], "eval-length takes only mesh overrides; the model and data are the checkpoint's",
            "pass --config.mesh.KEY=VALUE (e.g. --config.mesh.fsdp=8), or train a run with the other setting",
        )  # fmt: skip
    return config.validate(config.apply_overrides(copy.deepcopy(cfg), overrides))


@dataclasses.dataclass
class Stats:
    """The jitted per-token stats of a checkpoint on its mesh: batch -> (loss [B, S], correct [B, S])."""

    fn: object
    mesh: jax.sharding.Mesh
    batch_sharding: jax.sharding.NamedSharding
    shards: int  # devices the batch rows are spread over: B is padded to a multiple

    def __call__(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        B, S = batch["inputs"].shape
        C = sharding.context_size(self.mesh)
        if C > 1 and S % (2 * C):
            raise ConfigError(
                "--lengths", f"{S} is not divisible by 2 x context = {2 * C} (the mesh splits each row in zig-zag "
                "chunks)", f"use lengths that are multiples of {2 * C}, or --config.mesh.context=1",
            )  # fmt: skip
        pad = -B % self.shards  # rows copied from row 0, computed and dropped
        # under context parallelism rows go in zig-zag order, as in training (nopejax/context.py)
        rows = context.reorder({k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}, C)
        placed = {k: jax.device_put(v, self.batch_sharding) for k, v in rows.items()}
        with jax.set_mesh(self.mesh):
            loss_BS, correct_BS = self.fn(placed)
        out = context.restore({"loss": np.asarray(loss_BS), "correct": np.asarray(correct_BS)}, C)
        return out["loss"][:B], out["correct"][:B]


def stats_fn(root: str, step: int, cfg: ConfigDict, devices=None) -> Stats:
    """The checkpoint's params restored sharded on the mesh of `cfg.mesh` (over `devices`,
    default all), as training shards them; batches sharded over the data axes."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    axes = train.param_logical_axes(cfg.model)
    named = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    shapes = jax.tree.leaves(jax.eval_shape(lambda: model.split(model.create(cfg.model))[1]))
    sharding.check_divisible([(jax.tree_util.keystr(p), x.shape, a) for (p, a), x in zip(named, shapes)], mesh)
    shardings = jax.tree.map(lambda a: sharding.named(mesh, a), axes, is_leaf=lambda x: isinstance(x, tuple))
    params = checkpoint.restore_params(root, step, shardings)
    graphdef, params = model.split(hf.build(cfg.model, params))
    spec = sharding.logical_to_spec(["act_batch", "act_seq"], mesh)
    rows = spec[0] or ()
    shards = int(np.prod([mesh.shape[a] for a in ((rows,) if isinstance(rows, str) else rows)]))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = jax.jit(functools.partial(token_stats, graphdef), out_shardings=replicated)
    return Stats(functools.partial(fn, params), mesh, jax.sharding.NamedSharding(mesh, spec), shards)


def token_stats(graphdef, params, batch):
    """-> (loss [B, S] fp32, argmax == target [B, S] bool); unmasked, the caller masks."""
    logits_BSV = model.apply(graphdef, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    log_z_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
    target_logit_BS = jnp.take_along_axis(logits_BSV, batch["targets"][..., None], axis=-1)[..., 0]
    return log_z_BS - target_logit_BS, jnp.argmax(logits_BSV, axis=-1) == batch["targets"]


# ---------------------------------------------------------------------------------------------
# Text: loss by position on continuous windows


def text_windows(cfg: ConfigDict, length: int, rows: int):
    """Endless [rows, length] batches of the eval stream, read as continuous text (see top)."""
    cfg = copy.deepcopy(cfg)
    cfg.train.seq_len, cfg.train.global_batch_size = length, rows
    cfg.data.packing = "concat"
    it = data.make_iterator(cfg, "eval", process_index=0, process_count=1)
    positions_BS = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
    for batch in it:
        yield {
            "inputs": batch["inputs"],
            "targets": batch["targets"],
            # padding (only at the end of a finite stream) is masked by loss_mask, not by segments
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": positions_BS,
            "loss_mask": batch["loss_mask"],
        }


def eval_text(cfg, run_stats, lengths, tokens_per_length: int, bar=None) -> tuple[dict, dict]:
    """-> (loss_sum, count): per length L, float64 [L] sums over the first windows of the stream."""
    loss_sum, count = {}, {}
    shards = getattr(run_stats, "shards", 1)
    for length in lengths:
        windows_left = -(-tokens_per_length // length)  # ceil: the same text for every length
        # rows per call: a multiple of the data shards, FORWARD_TOKENS per device, no more than needed
        rows = shards * max(1, min(FORWARD_TOKENS // length, -(-windows_left // shards)))
        loss_S, count_S = np.zeros(length), np.zeros(length)
        for batch in text_windows(cfg, length, rows):
            mask_BS = batch["loss_mask"].astype(np.float64)
            mask_BS[windows_left:] = 0.0  # the last call may hold more windows than the budget
            loss_BS, _ = run_stats(batch)
            loss_S += (np.asarray(loss_BS, np.float64) * mask_BS).sum(axis=0)
            count_S += mask_BS.sum(axis=0)
            windows_left -= rows
            if bar is not None:
                bar.update(min(rows, rows + windows_left) * length)
            if windows_left <= 0:
                break
        loss_sum[length], count[length] = loss_S, count_S
    return loss_sum, count


# ---------------------------------------------------------------------------------------------
# Synthetic tasks: exact match and answer loss by input length


def task_batch(cfg: ConfigDict, n: int, rows: int) -> dict[str, np.ndarray]:
    """`rows` eval-split examples of input length exactly n, each [rows, S]."""
    d = cfg.data
    seq_len = max(cfg.train.seq_len, d.task_test_max_len + answer_length(d.source, d.task_test_max_len) + 3)
    make = TaskExample(d.source, cfg.train.seed, "eval", n, n, seq_len)
    # indices offset by n: examples of different lengths draw from unrelated random streams
    examples = [make.map(n * 1_000_003 + i) for i in range(rows)]
    return {k: np.stack([e[k] for e in examples]) for k in data.BATCH_KEYS}


def eval_task(cfg, run_stats, examples: int, bar=None) -> tuple[dict, dict, dict, dict]:
    """-> (examples, exact match, answer loss, answer-token accuracy), each keyed by input length."""
    d = cfg.data
    counts, em, loss, token_acc = {}, {}, {}, {}
    for n in range(d.task_train_min_len, d.task_test_max_len + 1):
        batch = task_batch(cfg, n, examples)
        loss_BS, correct_BS = run_stats(batch)
        answer_BS = batch["loss_mask"] > 0
        right_B = np.all(np.asarray(correct_BS) | ~answer_BS, axis=1)
        counts[n] = examples
        em[n] = float(right_B.mean())
        loss[n] = float((np.asarray(loss_BS, np.float64) * answer_BS).sum() / answer_BS.sum())
        token_acc[n] = float((np.asarray(correct_BS) & answer_BS).sum() / answer_BS.sum())
        if bar is not None:
            bar.update(1)
    return counts, em, loss, token_acc


def passkey_batch(cfg: ConfigDict, length: int, depth_index: int, rows: int) -> dict[str, np.ndarray]:
    """`rows` eval-split passkey rows of `length` tokens, needle at PASSKEY_DEPTHS[depth_index]."""
    make = TaskExample("passkey", cfg.train.seed, "eval", length, length, length, PASSKEY_DEPTHS[depth_index])
    first = (length * len(PASSKEY_DEPTHS) + depth_index) * 1_000_003  # every cell its own random stream
    examples = [make.map(first + i) for i in range(rows)]
    return {k: np.stack([e[k] for e in examples]) for k in data.BATCH_KEYS}


def eval_passkey(cfg, run_stats, lengths: list[int], examples: int, bar=None) -> tuple[dict, dict]:
    """-> (accuracy, answer loss), each keyed by (length, depth)."""
    acc, loss = {}, {}
    for length in lengths:
        rows = max(1, FORWARD_TOKENS // length)
        for j, depth in enumerate(PASSKEY_DEPTHS):
            batch = passkey_batch(cfg, length, j, examples)
            right, loss_sum = 0, 0.0
            for lo in range(0, examples, rows):
                part = {k: v[lo : lo + rows] for k, v in batch.items()}
                loss_BS, correct_BS = run_stats(part)
                answer_BS = part["loss_mask"] > 0
                right += int(np.all(np.asarray(correct_BS) | ~answer_BS, axis=1).sum())
                loss_sum += float((np.asarray(loss_BS, np.float64) * answer_BS).sum())
            acc[length, depth] = right / examples
            loss[length, depth] = loss_sum / float(batch["loss_mask"].sum())
            if bar is not None:
                bar.update(1)
    return acc, loss


# ---------------------------------------------------------------------------------------------
# Output: CSV, Markdown, PNG


def bucket_bounds(length: int, bucket: int) -> list[tuple[int, int]]:
    return [(s, min(s + bucket, length)) for s in range(0, length, bucket)]


def text_rows(results: list[TextResult], lengths: list[int], bucket: int) -> list[dict]:
    """CSV rows: per run and length, one row per position bucket, then an `all` row (the mean)."""
    rows = []
    for r in results:
        for length in lengths:
            spans = [(f"{s}-{e - 1}", s, e) for s, e in bucket_bounds(length, bucket)] + [("all", 0, length)]
            for name, start, end in spans:
                loss, tokens = r.mean(length, start, end)
                rows.append({
                    "run": r.label, "step": r.step, "length": length, "train_length": r.train_length,
                    "positions": name, "start": start, "end": end, "tokens": tokens, "loss": round(loss, 6),
                })  # fmt: skip
    return rows


def task_rows(results: list[TaskResult]) -> list[dict]:
    return [
        {"run": r.label, "step": r.step, "task": r.task, "input_length": n, "train_max_length": r.train_max_length,
         "examples": r.examples[n], "exact_match": round(r.exact_match[n], 6),
         "token_accuracy": round(r.token_accuracy[n], 6), "answer_loss": round(r.answer_loss[n], 6)}
        for r in results
        for n in sorted(r.exact_match)
    ]  # fmt: skip


def passkey_rows(results: list[PasskeyResult]) -> list[dict]:
    return [
        {"run": r.label, "step": r.step, "task": "passkey", "length": n, "train_length": r.train_length,
         "depth": d, "examples": r.examples, "accuracy": round(r.accuracy[n, d], 6),
         "answer_loss": round(r.answer_loss[n, d], 6)}
        for r in results
        for n, d in sorted(r.accuracy)
    ]  # fmt: skip


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def text_markdown(results: list[TextResult], lengths: list[int], bucket: int) -> str:
    buckets = bucket_bounds(max(lengths), bucket)
    head = ["run", "length", "mean loss", *(f"pos {s}-{e - 1}" for s, e in buckets)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for length in lengths:
            cells = [r.label, str(length), f"{r.mean(length)[0]:.4f}"]
            for s, e in buckets:
                cells.append(f"{r.mean(length, s, e)[0]:.4f}" if s < length else "")
            lines.append("| " + " | ".join(cells) + " |")
    trained = ", ".join(f"{r.label}: {r.train_length}" for r in results)
    note = (f"Cross-entropy (nats/token) on held-out text read as continuous windows of each length, "
            f"by position bucket of {bucket}. Training length: {trained}.")  # fmt: skip
    return note + "\n\n" + "\n".join(lines) + "\n"


def task_markdown(results: list[TaskResult]) -> str:
    r0 = results[0]
    lengths = sorted(r0.exact_match)
    lines = [f"Task `{r0.task}`: exact match (greedy, whole answer) and answer-token loss by input length; "
             f"trained on lengths <= {r0.train_max_length}.", ""]  # fmt: skip
    head = ["run", f"exact match, lengths <= {r0.train_max_length}", f"exact match, lengths > {r0.train_max_length}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        seen = [r.exact_match[n] for n in lengths if n <= r.train_max_length]
        unseen = [r.exact_match[n] for n in lengths if n > r.train_max_length]
        cells = [r.label, f"{np.mean(seen):.3f}" if seen else "", f"{np.mean(unseen):.3f}" if unseen else ""]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["input length", *(f"{r.label} EM" for r in results), *(f"{r.label} loss" for r in results)]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in lengths:
        cells = [str(n), *(f"{r.exact_match[n]:.3f}" for r in results), *(f"{r.answer_loss[n]:.4f}" for r in results)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def passkey_markdown(results: list[PasskeyResult]) -> str:
    r0 = results[0]
    lengths = sorted({n for n, _ in r0.accuracy})
    lines = [f"Passkey retrieval: accuracy (greedy, all {len(PASSKEY_DEPTHS)} depths x {r0.examples} rows per cell) "
             f"by row length; trained at length {r0.train_length}.", ""]  # fmt: skip
    head = ["run", *(f"L={n} ({n / r0.train_length:g}x)" for n in lengths)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r.label, *(f"{r.by_length(n):.3f}" for n in lengths)]) + " |" for r in results]
    head = ["run", *(f"depth {d:g}" for d in PASSKEY_DEPTHS)]
    lines += ["", "By needle depth (mean over lengths):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r.label, *(f"{r.by_depth(d):.3f}" for d in PASSKEY_DEPTHS)]) + " |" for r in results]
    head = ["run", "length", *(f"depth {d:g}" for d in PASSKEY_DEPTHS)]
    lines += ["", "Every cell:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for n in lengths:
            cells = [r.label, str(n), *(f"{r.accuracy[n, d]:.3f}" for d in PASSKEY_DEPTHS)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _binned(x_S: np.ndarray, count_S: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (bin centers, mean loss per bin of `width` positions): per-position means are too noisy."""
    starts = np.arange(0, len(x_S), width)
    sums, counts = np.add.reduceat(x_S, starts), np.add.reduceat(count_S, starts)
    ends = np.minimum(starts + width, len(x_S))
    return (starts + ends - 1) / 2, sums / np.maximum(counts, 1.0)


def text_plot(path: str, results: list[TextResult], lengths: list[int], bucket: int) -> None:
    """Left: loss vs position (color = run, line style = length). Right: mean loss vs length."""
    plt = _pyplot()
    fig, (ax, ax_mean) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    width = max(1, bucket // 4)
    for i, r in enumerate(results):
        color = colors[i % len(colors)]
        for j, length in enumerate(sorted(lengths, reverse=True)):
            x, y = _binned(r.loss_sum[length], r.count[length], width)
            label = f"{r.label}, L={length}" if len(results) > 1 else f"L={length}"
            ax.plot(x, y, styles[j % len(styles)], color=color, lw=1.4, label=label)
        mean = [r.mean(length)[0] for length in lengths]
        ax_mean.plot(lengths, mean, "o-", color=color, label=r.label)
    for train_length in sorted({r.train_length for r in results}):
        for a in (ax, ax_mean):
            a.axvline(train_length, color="k", ls=":", lw=1)
        ax.annotate(f" training length {train_length}", (train_length, 1), xycoords=("data", "axes fraction"),
                    va="top", fontsize=8)  # fmt: skip
    ax.set(xlabel="position in window", ylabel=f"loss (nats/token, mean over {width} positions)",
           title="Loss by position")  # fmt: skip
    ax_mean.set(xlabel="evaluated length L", ylabel="mean loss over the window (nats/token)",
                title="Mean loss per length", xscale="log")  # fmt: skip
    ax_mean.set_xticks(lengths, [str(n) for n in lengths])
    ax_mean.minorticks_off()
    ax.legend(fontsize=7, ncol=max(1, len(results)))
    ax_mean.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def task_plot(path: str, results: list[TaskResult]) -> None:
    plt = _pyplot()
    fig, (ax_em, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        lengths = sorted(r.exact_match)
        ax_em.plot(lengths, [r.exact_match[n] for n in lengths], "o-", ms=3, label=r.label)
        ax_loss.plot(lengths, [r.answer_loss[n] for n in lengths], "o-", ms=3, label=r.label)
    for a in (ax_em, ax_loss):
        a.axvline(results[0].train_max_length + 0.5, color="k", ls=":", lw=1, label="longest training input")
        a.set_xlabel("input length n")
        a.legend(fontsize=8)
    ax_em.set(ylabel="exact match (greedy)", ylim=(-0.02, 1.02), title=f"{results[0].task}: exact match")
    ax_loss.set(ylabel="answer-token loss (nats/token)", yscale="log", title=f"{results[0].task}: answer loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def passkey_plot(path: str, results: list[PasskeyResult]) -> None:
    """One heat map per run: accuracy over row length (rows) x needle depth (columns)."""
    plt = _pyplot()
    lengths = sorted({n for n, _ in results[0].accuracy})
    size = (3.2 * len(results) + 1, 0.45 * len(lengths) + 1.6)
    fig, axes = plt.subplots(1, len(results), figsize=size, squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results):
        acc_LD = np.array([[r.accuracy[n, d] for d in PASSKEY_DEPTHS] for n in lengths])
        image = ax.imshow(acc_LD, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i, j in np.ndindex(acc_LD.shape):
            ax.text(j, i, f"{acc_LD[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(PASSKEY_DEPTHS)), [f"{d:g}" for d in PASSKEY_DEPTHS])
        ax.set_yticks(range(len(lengths)), [f"{n} ({n / r.train_length:g}x)" for n in lengths])
        ax.set(xlabel="needle depth", title=r.label)
    axes[0][0].set_ylabel("row length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command


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
            loss_sum, count = eval_text(cfg, stats_fn(root, run_step, cfg, devices), lengths, budget, bar)
            results.append(TextResult(label, run_step, cfg.train.seq_len, loss_sum, count))
        bar.close()
        write_csv(paths[0], text_rows(results, lengths, bucket))
        markdown = text_markdown(results, lengths, bucket)
        text_plot(paths[2], results, lengths, bucket)
    elif kind == "passkey":
        rows = [batches * cfg.train.global_batch_size for _, _, cfg in runs]
        bar = tqdm(total=len(lengths) * len(PASSKEY_DEPTHS) * len(runs), unit="cell", disable=not progress,
                   desc="eval-length passkey")  # fmt: skip
        for (root, run_step, cfg), label, examples in zip(runs, labels, rows):
            bar.set_postfix_str(label)
            acc, loss = eval_passkey(cfg, stats_fn(root, run_step, cfg, devices), lengths, examples, bar)
            results.append(PasskeyResult(label, run_step, cfg.train.seq_len, examples, acc, loss))
        bar.close()
        write_csv(paths[0], passkey_rows(results))
        markdown = passkey_markdown(results)
        passkey_plot(paths[2], results)
    else:
        d0 = runs[0][2].data
        span = d0.task_test_max_len - d0.task_train_min_len + 1
        bar = tqdm(total=span * len(runs), unit="len", disable=not progress, desc=f"eval-length {kind}")
        for (root, run_step, cfg), label in zip(runs, labels):
            bar.set_postfix_str(label)
            examples = batches * cfg.train.global_batch_size
            counts, em, loss, acc = eval_task(cfg, stats_fn(root, run_step, cfg, devices), examples, bar)
            results.append(TaskResult(label, run_step, kind, cfg.data.task_train_max_len, counts, em, loss, acc))
        bar.close()
        write_csv(paths[0], task_rows(results))
        markdown = task_markdown(results)
        task_plot(paths[2], results)
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
