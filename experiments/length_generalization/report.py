"""The length study's report: tables and plots over seeds from the runs' result.json files.

    python -m experiments.length_generalization.report --runs-dir /tmp/nopejax_length_gen

rewrites the report from finished runs without training (`run.py` calls `write_report` after
every run). A task run "learned" its task when its in-distribution score (exact match averaged
over input lengths 1-20; passkey accuracy at the training length) is >= LEARNED; the
out-of-distribution numbers of a run that did not are marked as not meaningful. Tables give the
mean and [min-max] over seeds, and each section names the command, date, machine and versions.
Writes `--docs`/report.md and {copy,reverse,passkey,text}.png.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, "docs", "results", "length-study")
REPORT = "report.md"
TASKS = ("copy", "reverse", "passkey", "text")
PATTERNS = ("rope", "hybrid", "nope", "local_global", "mamba2_hybrid", "gdn_hybrid")
TEXT_PATTERNS = ("rope", "hybrid", "nope")  # the text study's configs (no local/global arm)
LABELS = {
    "rope": "all RoPE",
    "hybrid": "NoPE every 4th",
    "nope": "all NoPE",
    "local_global": "local RoPE + global NoPE",
    "mamba2_hybrid": "Mamba2 x3 + NoPE attention",
    "gdn_hybrid": "Gated DeltaNet x3 + NoPE attention",
}
TEXT_LENGTHS = [128, 256, 512, 1024]
PASSKEY_LENGTHS = [128, 256, 512, 1024]  # 1x, 2x, 4x, 8x the training length
LEARNED = 0.95  # in-distribution score a run needs before its out-of-distribution numbers mean anything


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
    png = f"{task}.png"
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
        png = "passkey.png"
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
        "## Text (offline corpus, trained at length 128; text/{rope,hybrid,nope}.py)",
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
    fig.savefig(os.path.join(docs, "text.png"), dpi=110)
    plt.close(fig)
    return [*lines, "", "![text: mean loss by window length](text.png)", ""]


def longer(r: dict) -> str:
    """A run's out-of-distribution numbers in one cell (shown even when not meaningful, so marked)."""
    if r["task"] in ("copy", "reverse"):
        cell = f"EM 21-25 {band(r['exact_match'], 21, 25):.3f}, 26-40 {band(r['exact_match'], 26, 40):.3f}"
    elif r["task"] == "passkey":
        cell = ", ".join(f"{n // 128}x {a:.2f}" for n, a in zip(PASSKEY_LENGTHS, passkey_grid(r).mean(1)))
    else:
        return f"ratio {r['text']['ratio']:.2f}"
    return cell if r["in_distribution"] >= LEARNED else f"({cell})"


def machine() -> str:
    """This machine in words, stored with each run so a report names where its runs trained."""
    return f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.processor() or platform.system()})"


def versions() -> str:
    import jax

    return f"JAX {jax.__version__}, Python {platform.python_version()}"


def load_result(path: str) -> dict:
    """A run's result.json, with when it was written (UTC)."""
    with open(path) as f:
        result = json.load(f)
    return {**result, "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime(os.path.getmtime(path)))}


def provenance(results: list[dict], command: str) -> list[str]:
    """The '- Command/Date/Machine/Versions' lines every table of the report carries."""
    days = sorted({r["finished"][:10] for r in results})
    ran = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
    recorded = lambda key: "; ".join(sorted({r.get(key, "not recorded") for r in results}))
    return [
        f"- Command: `{command}`",
        f"- Date: {time.strftime('%Y-%m-%d', time.gmtime())} (the report; the runs finished {ran})",
        f"- Machine: {recorded('machine')}, each run on one CPU core",
        f"- Versions: {recorded('versions')}",
    ]


def write_report(results: list[dict], docs: str, command: str, quick: bool = False) -> str:
    """Write `docs`/report.md and its plots from finished runs' results; -> the Markdown."""
    about = ["", *provenance(results, command)]
    lines = [
        "# Length generalization: RoPE vs NoPE vs mixed stacks",
        "",
        "Recipes: experiments/length_generalization/recipes.py; the arms of a task differ only in the layer "
        "pattern. Evaluation: `nopejax eval-length`, fp32, XLA attention. Training time summed over the "
        f"{len(results)} runs: {sum(r['train_seconds'] for r in results) / 60:.0f} min.",
        "",
    ]
    if quick:
        lines += ["**Quick mode (30 training steps): these numbers only show that the pipeline runs.**", ""]
    os.makedirs(docs, exist_ok=True)
    for task in TASKS:
        runs = [r for r in results if r["task"] == task]
        if not runs:
            continue
        if task in ("copy", "reverse"):
            section = task_section(task, runs, docs)
        elif task == "passkey":
            section = passkey_section(runs, docs)
        else:
            section = text_section(runs, docs)
        lines += [section[0], *about, *section[1:]]
    head = ["task", "arm", "seed", "steps", "train s", "eval s", "final loss", "in-distribution", "learned", "longer",
            "finished (UTC)"]  # fmt: skip
    lines += ["## Every run", *about, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(results, key=lambda r: (TASKS.index(r["task"]), PATTERNS.index(r["pattern"]), r["seed"])):
        score = r.get("in_distribution")
        learned = "-" if score is None else "yes" if score >= LEARNED else "**no**: longer inputs not meaningful"
        steps = str(r["steps"]) + ("" if r["steps"] == r["recipe_steps"] else f" of {r['recipe_steps']} (stopped)")
        cells = [r["task"], LABELS[r["pattern"]], str(r["seed"]), steps, str(r["train_seconds"])]
        cells += [str(r["eval_seconds"]), f"{r['final_loss']:.4f}", "-" if score is None else f"{score:.3f}"]
        cells += [learned, longer(r), r["finished"]]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(docs, REPORT), "w") as f:
        f.write(text)
    return text


def study_command(results: list[dict], quick: bool = False) -> str:
    """The runner command that trains and evaluates exactly these runs."""
    seeds = ",".join(str(s) for s in sorted({r["seed"] for r in results}))
    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    patterns = [p for p in PATTERNS if any(r["pattern"] == p for r in results)]
    every = TEXT_PATTERNS if tasks == ["text"] else PATTERNS  # the text study has no local/global arm
    command = f"python -m experiments.length_generalization.run --seeds {seeds} --tasks {','.join(tasks)}"
    if len(patterns) < len(every):
        command += f" --patterns {','.join(patterns)}"
    return command + (" --quick" if quick else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="/tmp/nopejax_length_gen", help="the runner's --runs-dir")
    p.add_argument("--docs", default=DOCS)
    p.add_argument("--quick", action="store_true", help="report the runner's --quick runs (--runs-dir/quick)")
    args = p.parse_args()
    runs_dir = os.path.join(args.runs_dir, "quick") if args.quick else args.runs_dir
    results = [load_result(path) for path in sorted(glob.glob(os.path.join(runs_dir, "*", "result.json")))]
    if not results:
        p.error(f"--runs-dir: no */result.json under {runs_dir}; train them with experiments.length_generalization.run")
    print(write_report(results, args.docs, study_command(results, args.quick), args.quick))
    print(f"wrote {os.path.join(args.docs, REPORT)} and its PNG files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
