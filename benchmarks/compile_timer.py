"""Run a Python module as `python -m MODULE ARGS...` and report its compile time and memory the same way for any tool.

    python benchmarks/compile_timer.py nopejax.cli train --config configs/smollm3_3b.py --dry-run --topology v5p:2x2x4
    python benchmarks/compile_timer.py maxtext.trainers.pre_train.train_compile .../base.yml compile_topology=v5p-16 ...

Used by benchmarks/aot_vs_maxtext.sh so that nopejax and MaxText are measured by one instrument:
JAX's own `jax.monitoring` duration events (tracing, lowering to MLIR, XLA backend compile) and,
for the largest compiled program, `memory_analysis()` summed as the nopejax dry run sums it
(arguments + temporaries + outputs - aliased), and the bytes its collectives move per chip
(benchmarks/hlo_collectives.py, from the compiled HLO). The last stdout line is JSON.
COMPILE_TIMER_HLO=FILE keeps that program's HLO text in FILE (or, for a directory, in
DIR/MODULE.PID.hlo.txt, one per run).
"""

import collections
import json
import os
import runpy
import sys

import jax
import jax.stages
from hlo_collectives import collective_bytes, summary_gib  # benchmarks/, the script's own folder

EVENTS = {
    "trace_s": "/jax/core/compile/jaxpr_trace_duration",
    "lower_s": "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "backend_compile_s": "/jax/core/compile/backend_compile_duration",
}

durations = collections.defaultdict(list)
compiled_programs = []  # (backend compile seconds, Compiled): the train step is the slowest one


def on_event(event: str, seconds: float, **kwargs) -> None:
    durations[event].append(seconds)


_compile = jax.stages.Lowered.compile


def compile_and_keep(self, *args, **kwargs):
    before = sum(durations[EVENTS["backend_compile_s"]])
    compiled = _compile(self, *args, **kwargs)
    compiled_programs.append((sum(durations[EVENTS["backend_compile_s"]]) - before, compiled))
    return compiled


def memory_gib(compiled) -> float | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return round(total / 2**30, 3)


def report(module: str) -> dict:
    out = {"module": module, "jax": jax.__version__}
    for name, event in EVENTS.items():
        # Tracing events also fire for small helper jits (init, sharding); the train step dominates the sums.
        out[name] = round(sum(durations[event]), 2)
        out[name[:-2] + "_max_s"] = round(max(durations[event], default=0.0), 2)
    if compiled_programs:
        seconds, biggest = max(compiled_programs, key=lambda p: p[0])
        out["step_backend_compile_s"] = round(seconds, 2)
        out["memory_per_device_gib"] = memory_gib(biggest)
        # per chip and step: what the collectives of the step's program move (hlo_collectives.py)
        hlo = biggest.as_text()
        out["collective_gib"] = summary_gib(collective_bytes(hlo))
        path = os.environ.get("COMPILE_TIMER_HLO")  # keep the step's compiled HLO for a closer look
        if path:
            if os.path.isdir(path):  # one file per tool, so an alternated run keeps each tool's
                path = os.path.join(path, f"{module}.{os.getpid()}.hlo.txt")
            with open(path, "w") as f:
                f.write(hlo)
    return out


def main():
    module, argv = sys.argv[1], sys.argv[2:]
    jax.monitoring.register_event_duration_secs_listener(on_event)
    jax.stages.Lowered.compile = compile_and_keep
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:  # absl's app.run and argparse CLIs exit through here
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    print(json.dumps(report(module)), flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
