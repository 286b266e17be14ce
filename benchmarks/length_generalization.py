"""RoPE vs NoPE vs mixed stacks past the training length: trains, evaluates, reports over seeds.

    python benchmarks/length_generalization.py --seeds 0,1,2          # the whole study
    python benchmarks/length_generalization.py --seeds 0 --tasks copy  # one task, one seed
    python benchmarks/length_generalization.py --quick                 # 30-step smoke of the pipeline

`--quick` trains and evaluates every arm; the test suite checks all arm configs without training
and trains one arm per task (tests/test_eval_length.py).

Tasks (configs/experiments/recipes.py; four arms each that differ only in the positional
pattern: rope, hybrid, nope, local_global):
  copy, reverse  inputs of 1-20 letters; `eval-length` gives exact match for input lengths 1-40
  passkey        rows of 128 bytes; `eval-length` at 128-1024 by needle depth
  text           configs/experiments/{rope,hybrid,nope}.py on the offline corpus at length 128,
                 loss by position at 128-1024 (plus YaRN x8 on the RoPE layers)
Training goes through `nopejax.train.run`, evaluation through `nopejax.eval_length.evaluate`
(the code behind `nopejax eval-length`), so the numbers are the tool's own.

A task run "learned" its task when its in-distribution score (exact match averaged over input
lengths 1-20; passkey accuracy at the training length) is >= 0.95; the out-of-distribution
numbers of a run that did not are marked as not meaningful. Tables give the mean and [min-max]
over seeds. Writes `--docs`/length_generalization.md and length_generalization_*.png, after
every finished run (so a study stopped early still reports what finished). Runs live in
`--runs-dir`; a finished run is reused (its result.json), so a rerun only adds what is missing.
`--jobs N` (default: one per usable core) trains N runs at once, each process pinned to its own
CPU core: pinned, XLA sizes its thread pool to that one core, so a run never waits on a pool
thread that another process holds. On 2 cores the three-seed study is ~2.7 h of wall time from
an empty --runs-dir (326 min of training summed over its 45 runs, measured).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import signal
import threading
import time

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("copy", "reverse", "passkey", "text")
PATTERNS = ("rope", "hybrid", "nope", "local_global")
TEXT_PATTERNS = ("rope", "hybrid", "nope")  # the text study's configs (no local/global arm)
LABELS = {
    "rope": "all RoPE",
    "hybrid": "NoPE every 4th",
    "nope": "all NoPE",
    "local_global": "local RoPE + global NoPE",
}
TEXT_LENGTHS = [128, 256, 512, 1024]
PASSKEY_LENGTHS = [128, 256, 512, 1024]  # 1x, 2x, 4x, 8x the training length
LEARNED = 0.95  # in-distribution score a run needs before its out-of-distribution numbers mean anything
TEXT_STEPS = 300


def run_config(task: str, pattern: str, seed: int, quick: bool):
    from nopejax import config

    if task == "text":
        path = os.path.join(ROOT, "configs", "experiments", f"{pattern}.py")
        overrides = {"train.steps": TEXT_STEPS, "train.eval_every": TEXT_STEPS, "checkpoint.every_steps": TEXT_STEPS,
                     "train.sample_every": 0}  # fmt: skip
    else:
        path = os.path.join(ROOT, "configs", "experiments", task, f"{pattern}.py")
        overrides = {}
    overrides["train.seed"] = seed
    if quick:
        overrides.update({"train.steps": 30, "train.eval_every": 0, "checkpoint.every_steps": 0})
    cfg = config.load_config(path)
    return config.validate(config.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()]))


def pin_to_core(slots) -> None:
    """Pool initializer: take the next free core and run on it alone (before JAX starts)."""
    cores = sorted(os.sched_getaffinity(0))
    with slots.get_lock():
        slot, slots.value = slots.value, slots.value + 1
    os.sched_setaffinity(0, {cores[slot % len(cores)]})


def run_one(task: str, pattern: str, seed: int, runs_dir: str, quick: bool, batches: int, minutes: float) -> dict:
    """Train one run (or resume it), evaluate it with eval-length, save and return result.json.

    `minutes` > 0 stops training after that long (a SIGTERM to ourselves: the loop saves a
    checkpoint and returns, as on preemption) and evaluates what was reached; a rerun resumes it.
    """
    from nopejax import eval_length, train

    workdir = os.path.join(runs_dir, f"{task}_{pattern}_s{seed}")
    path = os.path.join(workdir, "result.json")
    if os.path.isfile(path):
        with open(path) as f:  # finished by an earlier invocation
            return {**json.load(f), "reused": True, "finished": finished(path)}
    cfg = run_config(task, pattern, seed, quick)
    t0 = time.perf_counter()
    timer = threading.Timer(60 * minutes, os.kill, (os.getpid(), signal.SIGTERM)) if minutes > 0 else None
    if timer is not None:
        timer.start()
    out = train.run(cfg, workdir, progress=False)
    if timer is not None:
        timer.cancel()
    seconds = time.perf_counter() - t0
    result = {"task": task, "pattern": pattern, "seed": seed, "steps": out["steps"], "recipe_steps": cfg.train.steps,
              "train_seconds": round(seconds), "final_loss": out["final_loss"]}  # fmt: skip
    t0 = time.perf_counter()
    if task in ("copy", "reverse"):
        r = eval_length.evaluate([workdir], TEXT_LENGTHS, batches=batches, progress=False)["results"][0]
        result.update(exact_match=r.exact_match, token_accuracy=r.token_accuracy, answer_loss=r.answer_loss)
        result["in_distribution"] = band(r.exact_match, 1, cfg.data.task_train_max_len)
    elif task == "passkey":
        r = eval_length.evaluate([workdir], PASSKEY_LENGTHS, batches=batches, progress=False)["results"][0]
        result["accuracy"] = [[n, d, a] for (n, d), a in sorted(r.accuracy.items())]
        result["in_distribution"] = r.by_length(PASSKEY_LENGTHS[0])
    else:
        r = eval_length.evaluate([workdir], TEXT_LENGTHS, batches=batches, progress=False)["results"][0]
        result["text"] = text_numbers(r)
        if pattern != "nope":  # YaRN rescales RoPE layers only: nothing to change in all-NoPE
            yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128}
            r = eval_length.evaluate([workdir], TEXT_LENGTHS, batches=batches, rope_scaling=yarn, progress=False,
                                     out_dir=os.path.join(workdir, "eval_length_yarn"))["results"][0]  # fmt: skip
            result["text_yarn"] = text_numbers(r)
    result["eval_seconds"] = round(time.perf_counter() - t0)
    with open(path, "w") as f:
        json.dump(result, f)
    return {**result, "finished": finished(path)}


def finished(path: str) -> str:
    """When a run's result.json was written (UTC)."""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(os.path.getmtime(path)))


def text_numbers(r) -> dict:
    """Mean loss per length; loss at positions 0-127 and 896-1023 of L=1024 windows, and their ratio."""
    first, last = r.mean(1024, 0, 128)[0], r.mean(1024, 896, 1024)[0]
    return {"mean": {str(n): r.mean(n)[0] for n in TEXT_LENGTHS}, "first": first, "last": last, "ratio": last / first}


def band(values: dict, lo: int, hi: int) -> float:
    """Mean of per-length values (keys int or str) over lengths lo..hi."""
    return float(np.mean([values[n] if n in values else values[str(n)] for n in range(lo, hi + 1)]))


# ---------------------------------------------------------------------------------------------
# Report


def spread(xs: list[float], fmt: str = "{:.3f}") -> str:
    """'mean [min-max]' over seeds; just the value for one seed."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(np.mean(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def arm_rows(runs: list[dict]):
    """Per arm with runs: (pattern, its runs, those that learned, its first table cells: arm,
    seeds learned, in-distribution score over all seeds)."""
    for pattern in PATTERNS:
        mine = [r for r in runs if r["pattern"] == pattern]
        if mine:
            ok = [r for r in mine if r["in_distribution"] >= LEARNED]
            cells = [LABELS[pattern], f"{len(ok)} of {len(mine)}", spread([r["in_distribution"] for r in mine])]
            yield pattern, mine, ok, cells


def task_section(task: str, runs: list[dict], docs: str) -> list[str]:
    """Summary table, per-run table and plot for copy / reverse."""
    lines = [
        f"## {task.capitalize()} (trained on input lengths 1-20, tested on 1-40)",
        "",
        "Exact match: greedy decoding of the whole answer exactly right; token accuracy: answer tokens right "
        "given a correct prefix. Mean [min-max] over seeds; out-of-distribution columns count only runs that "
        f"learned the task (exact match >= {LEARNED} on lengths 1-20).",
        "",
        "| arm | seeds learned | exact match, 1-20 (trained) | 21-25 | 26-40 | token accuracy, 21-40 |",
        "|---|---|---|---|---|---|",
    ]
    for _, _, ok, cells in arm_rows(runs):
        if ok:
            cells += [spread([band(r["exact_match"], lo, hi) for r in ok]) for lo, hi in [(21, 25), (26, 40)]]
            cells.append(spread([band(r["token_accuracy"], 21, 40) for r in ok]))
        else:
            cells += ["not meaningful (not learned)"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    png = f"length_generalization_{task}.png"
    task_plot(os.path.join(docs, png), task, runs)
    lines += ["", f"![{task}: exact match by input length]({png})", ""]
    return lines


def task_plot(path: str, task: str, runs: list[dict]) -> None:
    """Exact match and token accuracy vs input length: mean over learned seeds, min-max band."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for pattern in PATTERNS:
        ok = [r for r in runs if r["pattern"] == pattern and r["in_distribution"] >= LEARNED]
        if not ok:
            continue
        lengths = sorted(int(n) for n in ok[0]["exact_match"])
        for ax, key in zip(axes, ("exact_match", "token_accuracy")):
            ys = np.array([[r[key][str(n)] if str(n) in r[key] else r[key][n] for n in lengths] for r in ok])
            line = ax.plot(lengths, ys.mean(0), "o-", ms=3, label=f"{LABELS[pattern]} ({len(ok)} seeds)")[0]
            ax.fill_between(lengths, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    for ax, name in zip(axes, ("exact match (greedy)", "answer-token accuracy")):
        ax.axvline(20.5, color="k", ls=":", lw=1, label="longest training input")
        ax.set(xlabel="input length n", ylabel=name, ylim=(-0.02, 1.02), title=f"{task}: {name}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def passkey_section(runs: list[dict], docs: str) -> list[str]:
    lines = [
        "## Passkey retrieval (trained on rows of 128 bytes, tested at 1x-8x)",
        "",
        "Accuracy: all 5 key digits right under greedy decoding, over 5 needle depths (0, 0.25, 0.5, 0.75, 1). "
        f"Mean [min-max] over seeds; longer rows count only runs that learned the task (accuracy >= {LEARNED} "
        "at length 128).",
        "",
        "| arm | seeds learned | " + " | ".join(f"L={n} ({n // 128}x)" for n in PASSKEY_LENGTHS) + " |",
        "|---|---|" + "---|" * len(PASSKEY_LENGTHS),
    ]
    grids = {}
    for pattern, mine, ok, cells in arm_rows(runs):
        for n in PASSKEY_LENGTHS[1:]:
            cells.append(spread([np.mean([a for m, _, a in r["accuracy"] if m == n]) for r in ok]) if ok else "n/m")
        lines.append("| " + " | ".join(cells) + " |")
        shown = ok or mine  # an arm that never learned is still drawn, marked as not meaningful
        depths = sorted({d for _, d, _ in shown[0]["accuracy"]})
        grid_LD = np.mean([passkey_grid(r) for r in shown], axis=0)
        title = f"{LABELS[pattern]}\n{len(ok)} of {len(mine)} seeds learned" + ("" if ok else "\n(not meaningful)")
        grids[pattern] = (depths, grid_LD, title)
    if grids:
        head = ["arm", *(f"depth {d:g}" for d in next(iter(grids.values()))[0])]
        lines += ["", "By needle depth (mean over lengths 256-1024 and learned seeds; all seeds if none learned):", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for pattern, (_, grid_LD, _) in grids.items():
            lines.append("| " + " | ".join([LABELS[pattern], *(f"{x:.3f}" for x in grid_LD[1:].mean(0))]) + " |")
        png = "length_generalization_passkey.png"
        passkey_plot(os.path.join(docs, png), grids)
        lines += ["", f"![passkey accuracy by length and depth]({png})", ""]
    return lines


def passkey_grid(r: dict) -> np.ndarray:
    """A passkey run's accuracy [length, depth], lengths PASSKEY_LENGTHS, depths ascending."""
    return np.array([[a for m, _, a in sorted(r["accuracy"]) if m == n] for n in PASSKEY_LENGTHS])


def passkey_plot(path: str, grids: dict) -> None:
    fig, axes = plt.subplots(1, len(grids), figsize=(3.3 * len(grids) + 1.5, 3.6), squeeze=False, sharey=True)
    for ax, (depths, grid_LD, title) in zip(axes[0], grids.values()):
        image = ax.imshow(grid_LD, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i, j in np.ndindex(grid_LD.shape):
            ax.text(j, i, f"{grid_LD[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(PASSKEY_LENGTHS)), [f"{n} ({n // 128}x)" for n in PASSKEY_LENGTHS])
        ax.set(xlabel="needle depth")
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("row length (bytes)")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy (mean over seeds)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def text_section(runs: list[dict], docs: str) -> list[str]:
    head = ["run", "seeds", *(f"L={n}" for n in TEXT_LENGTHS), "L=1024: pos 0-127", "pos 896-1023", "ratio"]
    lines = [
        "## Text (offline corpus, trained at length 128; configs/experiments/{rope,hybrid,nope}.py)",
        "",
        "Loss in nats per byte on held-out text read as continuous windows; ratio = loss at positions "
        "896-1023 / positions 0-127 of L=1024 windows. Mean [min-max] over seeds.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for key, suffix in (("text", ""), ("text_yarn", " + YaRN x8")):
        for pattern in TEXT_PATTERNS:
            mine = [r[key] for r in runs if r["pattern"] == pattern and key in r]
            if not mine:
                continue
            cells = [LABELS[pattern] + suffix, str(len(mine))]
            cells += [spread([m["mean"][str(n)] for m in mine]) for n in TEXT_LENGTHS]
            cells += [
                spread([m[k] for m in mine], "{:.3f}" if k != "ratio" else "{:.2f}") for k in ("first", "last", "ratio")
            ]
            lines.append("| " + " | ".join(cells) + " |")
    fig, ax = plt.subplots(figsize=(6, 4))
    for pattern in TEXT_PATTERNS:
        mine = [r["text"] for r in runs if r["pattern"] == pattern]
        if mine:
            ys = np.array([[m["mean"][str(n)] for n in TEXT_LENGTHS] for m in mine])
            line = ax.plot(TEXT_LENGTHS, ys.mean(0), "o-", label=f"{LABELS[pattern]} ({len(mine)} seeds)")[0]
            ax.fill_between(TEXT_LENGTHS, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    ax.axvline(128, color="k", ls=":", lw=1, label="training length")
    ax.set(xscale="log", xlabel="window length L", ylabel="mean loss over the window (nats/byte)", title="Text")
    ax.set_xticks(TEXT_LENGTHS, [str(n) for n in TEXT_LENGTHS])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "length_generalization_text.png"), dpi=110)
    plt.close(fig)
    return [*lines, "", "![text: mean loss by window length](length_generalization_text.png)", ""]


def longer(r: dict) -> str:
    """A run's out-of-distribution numbers in one cell (shown even when not meaningful, so marked)."""
    if r["task"] in ("copy", "reverse"):
        cell = f"EM 21-25 {band(r['exact_match'], 21, 25):.3f}, 26-40 {band(r['exact_match'], 26, 40):.3f}"
    elif r["task"] == "passkey":
        cell = ", ".join(f"{n // 128}x {a:.2f}" for n, a in zip(PASSKEY_LENGTHS, passkey_grid(r).mean(1)))
    else:
        return f"ratio {r['text']['ratio']:.2f}"
    return cell if r["in_distribution"] >= LEARNED else f"({cell})"


def write_report(results: list[dict], args, elapsed: float, pending: int) -> str:
    import jax

    lines = [
        "# Length generalization: RoPE vs NoPE vs mixed stacks",
        "",
        f"Measured by `python benchmarks/length_generalization.py --seeds {args.seeds} --tasks {args.tasks}"
        f"{' --quick' if args.quick else ''}` (CPU, JAX {jax.__version__}; this invocation trained "
        f"{sum(not r.get('reused') for r in results)} runs in {elapsed / 60:.0f} min"
        f"{f', {pending} runs still to come' if pending else ''}). Recipes: configs/experiments/recipes.py; the "
        "arms of a task differ only in the positional pattern. Evaluation: `nopejax eval-length`, fp32, XLA "
        "attention.",
        "",
        f"Training time summed over the {len(results)} runs: {sum(r['train_seconds'] for r in results) / 60:.0f} "
        f"min, each run on one CPU core.",
    ]
    reused = [r for r in results if r.get("reused")]
    if reused:
        lines[-1] += (f" {len(reused)} of them were finished by earlier invocations into the same --runs-dir and "
                      "reused: the last table says when each run finished.")  # fmt: skip
    lines.append("")
    if args.quick:
        lines += ["**Quick mode (30 training steps): these numbers only show that the pipeline runs.**", ""]
    for task in TASKS:
        runs = [r for r in results if r["task"] == task]
        if not runs:
            continue
        if task in ("copy", "reverse"):
            lines += task_section(task, runs, args.docs)
        elif task == "passkey":
            lines += passkey_section(runs, args.docs)
        else:
            lines += text_section(runs, args.docs)
    head = ["task", "arm", "seed", "steps", "train s", "eval s", "final loss", "in-distribution", "learned", "longer",
            "finished (UTC)"]  # fmt: skip
    lines += ["## Every run", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: (TASKS.index(r["task"]), PATTERNS.index(r["pattern"]), r["seed"])):
        score = r.get("in_distribution")
        learned = "-" if score is None else "yes" if score >= LEARNED else "**no**: longer inputs not meaningful"
        steps = str(r["steps"]) + ("" if r["steps"] == r["recipe_steps"] else f" of {r['recipe_steps']} (stopped)")
        cells = [r["task"], LABELS[r["pattern"]], str(r["seed"]), steps, str(r["train_seconds"])]
        cells += [str(r["eval_seconds"]), f"{r['final_loss']:.4f}", "-" if score is None else f"{score:.3f}"]
        cells += [learned, longer(r), r["finished"]]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.docs, "length_generalization.md"), "w") as f:
        f.write(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset of the arms")
    p.add_argument("--runs-dir", default="/tmp/nopejax_length_gen")
    p.add_argument("--docs", default=os.path.join(ROOT, "docs"))
    cores = len(os.sched_getaffinity(0))
    p.add_argument("--jobs", type=int, default=cores, help=f"runs trained at once, one per CPU core (default {cores})")
    p.add_argument("--batches", type=int, default=2, help="eval-length --batches")
    p.add_argument(
        "--max-train-minutes",
        type=float,
        default=0.0,
        help="stop each run's training after this long and evaluate what it reached (0 = the full recipe)",
    )
    p.add_argument("--quick", action="store_true", help="30 steps per run, into --runs-dir/quick: checks the pipeline")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks, patterns = args.tasks.split(","), args.patterns.split(",")
    for name, chosen, known in (("--tasks", tasks, TASKS), ("--patterns", patterns, PATTERNS)):
        if not set(chosen) <= set(known):
            p.error(f"{name}: unknown {sorted(set(chosen) - set(known))}; use some of {','.join(known)}")
    if args.quick:
        args.runs_dir = os.path.join(args.runs_dir, "quick")
        args.batches = 1
    os.makedirs(args.docs, exist_ok=True)
    jobs = [(task, pattern, seed) for seed in seeds for task in tasks for pattern in patterns
            if task != "text" or pattern in TEXT_PATTERNS]  # fmt: skip
    t_start = time.perf_counter()
    results = []
    # spawn: each run in a fresh process with its own JAX runtime
    context = multiprocessing.get_context("spawn")
    pinning = {"initializer": pin_to_core, "initargs": (context.Value("i", 0),)} if args.jobs > 1 else {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, **pinning) as pool:
        settings = (args.runs_dir, args.quick, args.batches, args.max_train_minutes)
        futures = {pool.submit(run_one, *job, *settings): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results.append(result)
            elapsed = time.perf_counter() - t_start
            name = " ".join(map(str, futures[future]))
            print(f"[{elapsed / 60:5.1f} min] {name}: train {result['train_seconds']} s, "
                  f"in-distribution {result.get('in_distribution', '-')}", flush=True)  # fmt: skip
            write_report(results, args, elapsed, len(jobs) - len(results))
    print(write_report(results, args, time.perf_counter() - t_start, 0))
    print(f"wrote {args.docs}/length_generalization.md and its PNG files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
