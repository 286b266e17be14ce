"""RoPE vs NoPE vs hybrid: does loss hold up past the training length? Trains, evaluates, reports.

    python3 benchmarks/length_generalization.py [--runs-dir /tmp/nopejax_length_gen] [--docs docs]
        [--seeds 0] [--text-steps 300] [--copy-steps 600] [--yarn-factor 8]

Three configs that differ only in the positional pattern (configs/experiments/rope.py,
hybrid.py, nope.py: all RoPE, NoPE every 4th layer as SmolLM3, all NoPE) are trained twice:
  text  the offline corpus at train.seq_len 128; `eval-length` at 128, 256, 512, 1024
  copy  the copy task on inputs of length 1-20 (seq_len 83 fits the longest test example);
        `eval-length` reports exact match for input lengths 1-40
Training goes through `nopejax.train.run`, evaluation through `nopejax.eval_length.evaluate`
(the code behind `nopejax eval-length`), so the numbers are the tool's own. The RoPE and hybrid
text runs are evaluated once more with YaRN scaling (factor `--yarn-factor`, original length
128): scaling changes RoPE layers only, so all-NoPE is left out of that row.

Writes into `--docs`: length_generalization.md (setup, summary tables, the tool's full tables),
length_generalization_text.{png,csv} and length_generalization_copy.{png,csv}. Runs live in
`--runs-dir`; finished runs are reused (training resumes, so a rerun only evaluates).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import numpy as np

from nopejax import config, eval_length, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATTERNS = ("rope", "hybrid", "nope")
TEXT_LENGTHS = [128, 256, 512, 1024]
# The copy task: same model and optimizer, another data source. Rows of 43 = 20 + 20 + BOS, '=',
# EOS tokens fit the longest training example and waste no compute on padding; the test split
# (inputs up to 40, 83 tokens) does not fit, so there is no in-training eval: eval-length
# builds its own longer rows.
COPY_OVERRIDES = {
    "data.source": "copy",
    "train.seq_len": 43,
    "train.global_batch_size": 32,
    "optim.decay_steps": 120,
    "train.eval_every": 0,
}


def make_config(pattern: str, task: str, steps: int, seed: int) -> config.ConfigDict:
    cfg = config.load_config(os.path.join(ROOT, "configs", "experiments", f"{pattern}.py"))
    overrides = {"train.steps": steps, "train.seed": seed, "train.eval_every": steps}
    overrides["checkpoint.every_steps"] = steps  # one checkpoint, at the end
    overrides.update(COPY_OVERRIDES if task == "copy" else {})
    return config.validate(config.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()]))


def train_one(cfg, workdir: str) -> dict:
    """Train (or find finished) one run; -> {seconds, final train loss, eval loss}."""
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary["steps"] == cfg.train.steps:
            print(f"{workdir}: finished before, reusing it")
            return summary
    t0 = time.perf_counter()
    out = train.run(cfg, workdir, progress=False)
    summary = {"steps": out["steps"], "seconds": round(time.perf_counter() - t0, 1),
               "final_loss": out["final_loss"], "eval_loss": out["eval_loss"]}  # fmt: skip
    with open(summary_path, "w") as f:
        json.dump(summary, f)
    print(f"{workdir}: {summary}")
    return summary


def copy_outputs(files: list[str], docs: str, name: str) -> None:
    shutil.copy(files[0], os.path.join(docs, f"length_generalization_{name}.csv"))
    shutil.copy(files[2], os.path.join(docs, f"length_generalization_{name}.png"))


def text_summary(results, scaled) -> str:
    """Mean loss per evaluated length and the ratio of the last 128 positions to the first 128."""
    head = ["run", *(f"L={n}" for n in TEXT_LENGTHS), "L=1024: pos 0-127", "pos 896-1023", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [*results, *scaled]:
        first, last = r.mean(1024, 0, 128)[0], r.mean(1024, 896, 1024)[0]
        cells = [r.label, *(f"{r.mean(n)[0]:.3f}" for n in TEXT_LENGTHS), f"{first:.3f}", f"{last:.3f}"]
        lines.append("| " + " | ".join([*cells, f"{last / first:.2f}"]) + " |")
    return "\n".join(lines)


def copy_summary(results) -> str:
    head = ["run", "exact match, n = 1-20 (trained)", "n = 21-30", "n = 31-40", "answer loss, n = 1-20", "n = 21-40"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            f"{np.mean([r.exact_match[n] for n in range(lo, hi + 1)]):.3f}" for lo, hi in [(1, 20), (21, 30), (31, 40)]
        ]
        cells += [f"{np.mean([r.answer_loss[n] for n in range(lo, hi + 1)]):.3f}" for lo, hi in [(1, 20), (21, 40)]]
        lines.append("| " + " | ".join([r.label, *cells]) + " |")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="/tmp/nopejax_length_gen")
    p.add_argument("--docs", default=os.path.join(ROOT, "docs"))
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    p.add_argument("--text-steps", type=int, default=300)
    p.add_argument("--copy-steps", type=int, default=600)
    p.add_argument("--yarn-factor", type=float, default=8.0, help="0 = no YaRN row")
    p.add_argument("--batches", type=int, default=4, help="eval-length --batches")
    p.add_argument("--tasks", default="text,copy")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = args.tasks.split(",")
    os.makedirs(args.docs, exist_ok=True)
    t_start = time.perf_counter()

    runs, summaries = {}, {}
    for task in tasks:
        steps = args.text_steps if task == "text" else args.copy_steps
        for seed in seeds:
            for pattern in PATTERNS:
                name = f"{task}_{pattern}" + (f"_s{seed}" if len(seeds) > 1 else "")
                workdir = os.path.join(args.runs_dir, name)
                summaries[name] = train_one(make_config(pattern, task, steps, seed), workdir)
                runs.setdefault(task, []).append(workdir)

    sections = []
    if "text" in runs:
        text = eval_length.evaluate(runs["text"], TEXT_LENGTHS, batches=args.batches)
        copy_outputs(text["files"], args.docs, "text")
        scaled = []
        if args.yarn_factor:
            yarn = {"rope_type": "yarn", "factor": args.yarn_factor, "original_max_position_embeddings": 128}
            with_rope = [w for w in runs["text"] if "_nope" not in os.path.basename(w)]
            scaled = eval_length.evaluate(with_rope, TEXT_LENGTHS, batches=args.batches, rope_scaling=yarn,
                                          out_dir=os.path.join(args.runs_dir, "yarn_eval"))["results"]  # fmt: skip
        sections.append(("Text (offline corpus, trained at length 128)", text_summary(text["results"], scaled),
                         text["markdown"], "length_generalization_text.png"))  # fmt: skip
    if "copy" in runs:
        copy = eval_length.evaluate(runs["copy"], TEXT_LENGTHS, batches=args.batches)
        copy_outputs(copy["files"], args.docs, "copy")
        sections.append(("Copy task (trained on inputs of length 1-20)", copy_summary(copy["results"]),
                         copy["markdown"], "length_generalization_copy.png"))  # fmt: skip

    cfg0 = make_config("hybrid", "text", args.text_steps, seeds[0])
    lines = [
        "# Length generalization: all RoPE vs NoPE every 4th layer vs all NoPE",
        "",
        f"Measured by `python3 benchmarks/length_generalization.py` in {time.perf_counter() - t_start:.0f} s "
        f"(CPU, JAX {jax.__version__}). Model: configs/tiny.py "
        f"({cfg0.model.num_layers} layers, d_model {cfg0.model.d_model}, byte tokens), only "
        "`model.no_rope_layer_interval` differs (0 / 4 / 1). "
        f"Text: {args.text_steps} steps x {cfg0.train.global_batch_size} x 128 tokens. "
        f"Copy: {args.copy_steps} steps x {COPY_OVERRIDES['train.global_batch_size']} examples. "
        f"Seeds: {args.seeds}. Evaluation: `nopejax eval-length`, fp32, XLA attention.",
        "",
        "| run | train seconds | final train loss | eval loss at the training length |",
        "|---|---|---|---|",
        *(f"| {k} | {v['seconds']} | {v['final_loss']:.3f} | {_fmt(v['eval_loss'])} |" for k, v in summaries.items()),
    ]
    for title, summary, full, png in sections:
        lines += ["", f"## {title}", "", summary, "", f"![{title}]({png})", ""]
        lines += ["<details><summary>Full table</summary>", "", full, "</details>"]
    with open(os.path.join(args.docs, "length_generalization.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.docs}/length_generalization.md and its PNG/CSV files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
