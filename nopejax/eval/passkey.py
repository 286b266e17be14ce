"""Passkey retrieval: accuracy and answer loss by row length and needle depth.

For each row length (usually 1x-8x the training length) and each depth in PASSKEY_DEPTHS,
`batches * train.global_batch_size` fresh eval-split rows with the needle at that depth give
accuracy (all key digits right under greedy decoding) and the answer loss; the plot is a heat map
of accuracy over length x depth.

Shape letters: B rows, S sequence length.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nopejax import data
from nopejax.config import ConfigDict
from nopejax.data.synthetic import TaskExample
from nopejax.eval.output import pyplot
from nopejax.eval.stats import FORWARD_TOKENS

PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle depth: 0 = right after BOS, 1 = right before the question


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


def passkey_rows(results: list[PasskeyResult]) -> list[dict]:
    return [
        {"run": r.label, "step": r.step, "task": "passkey", "length": n, "train_length": r.train_length,
         "depth": d, "examples": r.examples, "accuracy": round(r.accuracy[n, d], 6),
         "answer_loss": round(r.answer_loss[n, d], 6)}
        for r in results
        for n, d in sorted(r.accuracy)
    ]  # fmt: skip


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


def passkey_plot(path: str, results: list[PasskeyResult]) -> None:
    """One heat map per run: accuracy over row length (rows) x needle depth (columns)."""
    plt = pyplot()
    lengths = sorted({n for n, _ in results[0].accuracy})
    size = (3.2 * len(results) + 1, 0.45 * len(lengths) + 1.6)
    fig, axes = plt.subplots(1, len(results), figsize=size, squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results):
        # [row lengths, needle depths]
        accuracy = np.array([[r.accuracy[n, d] for d in PASSKEY_DEPTHS] for n in lengths])
        image = ax.imshow(accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i, j in np.ndindex(accuracy.shape):
            ax.text(j, i, f"{accuracy[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(PASSKEY_DEPTHS)), [f"{d:g}" for d in PASSKEY_DEPTHS])
        ax.set_yticks(range(len(lengths)), [f"{n} ({n / r.train_length:g}x)" for n in lengths])
        ax.set(xlabel="needle depth", title=r.label)
    axes[0][0].set_ylabel("row length (tokens)")
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
