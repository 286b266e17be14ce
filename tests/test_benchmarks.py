"""The benchmark scripts run: a change to the model's config or layer API that breaks one fails here,
not on the next machine that has the time to run it. Each at its smallest arguments."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as the scripts are run
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_mixers_benchmark_times_every_mixer():
    out = run("benchmarks/mixers.py", "--seq-lens", "256", "--d-model", "128", "--skip-roofline")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| 256 |" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["mamba2", "gated_deltanet", "attention"]
    assert all(float(row.split("|")[4]) > 0 for row in rows), out  # a time per step for each


def test_step_collectives_benchmark_prints_a_row_per_mesh_and_accumulation():
    out = run("benchmarks/step_collectives.py", "--topology", "cpu", "--d-model", "128", "--layers", "1",
              "--meshes", "data=2", "--grad-accum", "1,2")  # fmt: skip
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| data 2 |")]
    assert [row[2].strip() for row in rows] == ["1", "2"], out
    assert all(float(row[-3]) > 0 for row in rows), out  # the gradient's all-reduce at least
