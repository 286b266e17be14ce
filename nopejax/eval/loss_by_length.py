"""Text loss by position and window length: how loss behaves past the length a run trained on.

The held-out data for length L is the run's own data config with `train.seq_len = L` and the
eval split, packed with `data.packing = "concat"`, which lays the eval documents end to end and
cuts that one stream into rows of L tokens. We then drop the packer's segment ids and positions:
every row is read as ONE continuous text, attention crosses document boundaries and positions run
0..L-1. Why: with per-document positions and segment masking, a row of 1024 tokens holding six
200-token documents never shows the model a position past 199, so "loss at position 900" would
measure nothing. The default corpus (and most corpora) has few documents longer than 1024 tokens;
keeping only those would leave too little text. The cost is that some windows span a document
boundary; the loss mask still drops the one EOS -> next-BOS target per boundary, exactly as in
training. Every length sees the same text: the first `batches * train.global_batch_size *
max(lengths)` tokens of the eval stream, cut into windows of L (the stream repeats if the eval
split is smaller than that).

Shape letters: B rows, S (= L) sequence length.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from nopejax import data
from nopejax.config import ConfigDict
from nopejax.eval.output import pyplot
from nopejax.eval.stats import FORWARD_TOKENS


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


def _binned(x_S: np.ndarray, count_S: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (bin centers, mean loss per bin of `width` positions): per-position means are too noisy."""
    starts = np.arange(0, len(x_S), width)
    sums, counts = np.add.reduceat(x_S, starts), np.add.reduceat(count_S, starts)
    ends = np.minimum(starts + width, len(x_S))
    return (starts + ends - 1) / 2, sums / np.maximum(counts, 1.0)


def text_plot(path: str, results: list[TextResult], lengths: list[int], bucket: int) -> None:
    """Left: loss vs position (color = run, line style = length). Right: mean loss vs length."""
    plt = pyplot()
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
