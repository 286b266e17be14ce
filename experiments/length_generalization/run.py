"""The length study's runner: RoPE vs NoPE vs mixed stacks past the training length, over seeds.

    python -m experiments.length_generalization.run --seeds 0,1,2          # the whole study
    python -m experiments.length_generalization.run --seeds 0 --tasks copy  # one task, one seed
    python -m experiments.length_generalization.run --quick                 # 30-step smoke of the pipeline

(from the repository root). `--quick` trains and evaluates every arm; the test suite checks all
arm configs without training and trains one arm per task (tests/test_eval_length.py).

Tasks (recipes.py; six arms each that differ only in the layer pattern: rope, hybrid, nope,
local_global, mamba2_hybrid, gdn_hybrid):
  copy, reverse  inputs of 1-20 letters; `eval-length` gives exact match for input lengths 1-40
  passkey        rows of 128 bytes; `eval-length` at 128-1024 by needle depth
  text           text/{rope,hybrid,nope}.py on the offline corpus at length 128, loss by position
                 at 128-1024 (plus YaRN x8 on the RoPE layers)
Training goes through `nopejax.train.run`, evaluation through `nopejax.eval.command.evaluate`
(the code behind `nopejax eval-length`), so the numbers are the tool's own.

Each run lives in `--runs-dir`/TASK_PATTERN_sSEED with its result.json; a run with one is not
trained again, so a stopped study resumes where it stopped. After every run the report
(report.py) is rewritten from all finished runs of the study. `--jobs N` (default: one per
usable core) trains N runs at once, each process pinned to its own CPU core: pinned, XLA sizes
its thread pool to that one core, so a run never waits on a pool thread that another process
holds. On 2 cores the three-seed study is ~2.7 h of wall time from an empty --runs-dir (326 min
of training summed over its 45 runs, measured).
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

from experiments.length_generalization import report
from experiments.length_generalization.report import PASSKEY_LENGTHS, PATTERNS, TASKS, TEXT_LENGTHS, TEXT_PATTERNS

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT_STEPS = 300


def run_config(task: str, pattern: str, seed: int, quick: bool):
    from nopejax import config, validation

    path = os.path.join(HERE, task, f"{pattern}.py")
    if task == "text":
        overrides = {"train.steps": TEXT_STEPS, "train.eval_every": TEXT_STEPS, "checkpoint.every_steps": TEXT_STEPS,
                     "train.sample_every": 0}  # fmt: skip
    else:
        overrides = {}
    overrides["train.seed"] = seed
    if quick:
        overrides.update({"train.steps": 30, "train.eval_every": 0, "checkpoint.every_steps": 0})
    cfg = config.load_config(path)
    return validation.validate(config.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()]))


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
    from nopejax import train  # here, not at the top: a worker pins itself to a core before JAX starts
    from nopejax.eval.command import evaluate

    workdir = os.path.join(runs_dir, f"{task}_{pattern}_s{seed}")
    path = os.path.join(workdir, "result.json")
    if os.path.isfile(path):
        return report.load_result(path)
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
              "train_seconds": round(seconds), "final_loss": out["final_loss"], "machine": report.machine(),
              "versions": report.versions()}  # fmt: skip
    t0 = time.perf_counter()
    if task in ("copy", "reverse"):
        r = evaluate([workdir], TEXT_LENGTHS, batches=batches, progress=False)["results"][0]
        result.update(exact_match=r.exact_match, token_accuracy=r.token_accuracy, answer_loss=r.answer_loss)
        result["in_distribution"] = report.band(r.exact_match, 1, cfg.data.task_train_max_len)
    elif task == "passkey":
        r = evaluate([workdir], PASSKEY_LENGTHS, batches=batches, progress=False)["results"][0]
        result["accuracy"] = [[n, d, a] for (n, d), a in sorted(r.accuracy.items())]
        result["in_distribution"] = r.by_length(PASSKEY_LENGTHS[0])
    else:
        r = evaluate([workdir], TEXT_LENGTHS, batches=batches, progress=False)["results"][0]
        result["text"] = text_numbers(r)
        if pattern != "nope":  # YaRN rescales RoPE layers only: nothing to change in all-NoPE
            yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128}
            r = evaluate([workdir], TEXT_LENGTHS, batches=batches, rope_scaling=yarn, progress=False,
                         out_dir=os.path.join(workdir, "eval_length_yarn"))["results"][0]  # fmt: skip
            result["text_yarn"] = text_numbers(r)
    result["eval_seconds"] = round(time.perf_counter() - t0)
    with open(path, "w") as f:
        json.dump(result, f)
    return report.load_result(path)


def text_numbers(r) -> dict:
    """Mean loss per length; loss at positions 0-127 and 896-1023 of L=1024 windows, and their ratio."""
    first, last = r.mean(1024, 0, 128)[0], r.mean(1024, 896, 1024)[0]
    return {"mean": {str(n): r.mean(n)[0] for n in TEXT_LENGTHS}, "first": first, "last": last, "ratio": last / first}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset of the arms")
    p.add_argument("--runs-dir", default="/tmp/nopejax_length_gen")
    p.add_argument("--docs", default=report.DOCS, help="where report.md and its plots go")
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
            name = " ".join(map(str, futures[future]))
            print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {name}: train {result['train_seconds']} s, "
                  f"in-distribution {result.get('in_distribution', '-')}", flush=True)  # fmt: skip
            report.write_report(results, args.docs, report.study_command(results, args.quick), args.quick)
    print(report.write_report(results, args.docs, report.study_command(results, args.quick), args.quick))
    print(f"wrote {os.path.join(args.docs, report.REPORT)} and its PNG files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
