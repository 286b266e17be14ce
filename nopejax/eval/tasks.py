"""Synthetic tasks (copy, reverse, parity): exact match, answer-token accuracy and loss by input length.

For each input length n from task_train_min_len to task_test_max_len, `batches *
train.global_batch_size` fresh eval-split examples of exactly length n (one example per row,
positions from 0) give exact match (greedy decoding exactly right, `data.exact_match`), the share
of answer tokens right given a correct prefix, and the mean loss on answer tokens.

Shape letters: B rows, S sequence length.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nopejax import data
from nopejax.config import ConfigDict
from nopejax.data.synthetic import TaskExample, answer_length
from nopejax.eval.output import pyplot


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


def task_rows(results: list[TaskResult]) -> list[dict]:
    return [
        {"run": r.label, "step": r.step, "task": r.task, "input_length": n, "train_max_length": r.train_max_length,
         "examples": r.examples[n], "exact_match": round(r.exact_match[n], 6),
         "token_accuracy": round(r.token_accuracy[n], 6), "answer_loss": round(r.answer_loss[n], 6)}
        for r in results
        for n in sorted(r.exact_match)
    ]  # fmt: skip


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


def task_plot(path: str, results: list[TaskResult]) -> None:
    plt = pyplot()
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
