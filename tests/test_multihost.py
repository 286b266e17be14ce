"""Multi-process training on one machine: 2 processes x 1 CPU device over localhost (gloo).

With default data settings, losses equal those of 1 process x 1 device and 1 process x 2
devices (the data order does not depend on the process count); a 2-process checkpoint resumes
in 1 process; each process reads its own documents. Faults end in bounded time: SIGTERM to
both processes or to one stops both at the same step with one checkpoint; a killed process
(the coordinator's host included) ends the other with an error, not a hang.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import ROOT

from nopejax import config, validation
from nopejax.data import make_iterator
from nopejax.data.pipeline import document_indices, open_sources

# 6 steps with checkpoints at 3 and 6; a 2-layer model keeps each run ~15-30 s on 2 cores
RUN = ["--config", "configs/tiny.py", "--config.model.num_layers=2", "--config.train.global_batch_size=8",
       "--config.train.seq_len=64", "--config.train.steps=6", "--config.optim.warmup_steps=2",
       "--config.optim.decay_steps=4", "--config.train.log_every=1", "--config.train.eval_every=0",
       "--config.checkpoint.every_steps=3", "--no-progress"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int, **extra) -> dict:
    flags = f"{os.environ['NOPEJAX_TEST_XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    for k in ("NOPEJAX_COORDINATOR", "NOPEJAX_NUM_PROCESSES", "NOPEJAX_PROCESS_ID"):
        env.pop(k, None)
    return {**env, **extra}


def train_cmd(workdir, *args) -> list[str]:
    return [sys.executable, "-m", "nopejax.cli", "train", "--workdir", str(workdir), *RUN, *args]


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def run_one(workdir, *args, devices=4, **env):
    out = subprocess.run(train_cmd(workdir, *args), cwd=ROOT, env=cpu_env(devices, **env), capture_output=True,
                         text=True, timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture
def procs():
    """Processes started by a test; all killed at teardown, whatever happened."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """launch/local.sh 2: the script users run, 2 processes x 1 device."""
    wd = tmp_path_factory.mktemp("two")
    cmd = ["bash", "launch/local.sh", "2", "--devices-per-process", "1", "--workdir", str(wd), *RUN]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=240)
    finally:  # the script stops its children on exit; a timeout here takes the whole group
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:] + (wd / "logs" / "process_1.log").read_text()[-3000:]
    return wd


@pytest.mark.parametrize("devices", [1, 2])
def test_two_processes_match_one_process_with_default_data_settings(two_process_run, tmp_path, devices):
    # nothing set in advance for the process count: the global batches are the same anyway
    run_one(tmp_path, devices=devices)
    two, one = losses(two_process_run), losses(tmp_path)
    assert sorted(two) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in range(1, 6)], [one[s] for s in range(1, 6)], rtol=1e-4)
    assert two[6] < two[1]
    # orbax wrote each checkpoint from both processes together; metrics came from process 0 only
    data = sorted(os.listdir(two_process_run / "checkpoints" / "6" / "data"))
    assert [f for f in data if f.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]
    assert len((two_process_run / "metrics.jsonl").read_text().splitlines()) == 6


def test_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path):
    wd = tmp_path / "resume"
    shutil.copytree(two_process_run, wd)
    shutil.rmtree(wd / "checkpoints" / "6")  # resume from step 3, written by 2 processes
    run_one(wd)  # the checkpoint's 8 data shards (one per row) are regrouped onto 1 process
    two, resumed = losses(two_process_run), losses(wd)
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [two[s] for s in (4, 5, 6)], rtol=1e-5)


def start_two(workdir, procs, *args) -> str:
    """2 training processes (endless) past their second step. -> the coordinator address."""
    coordinator = f"127.0.0.1:{free_port()}"
    for i in range(2):
        env = cpu_env(2, NOPEJAX_COORDINATOR=coordinator, NOPEJAX_NUM_PROCESSES="2", NOPEJAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(train_cmd(workdir, "--config.train.steps=10000", *args), cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    metrics, t0 = workdir / "metrics.jsonl", time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # training, not compiling
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        assert time.time() - t0 < 300, "the 2-process run did not reach step 2"
        time.sleep(0.2)
    return coordinator


def finish(proc, seconds: float, what: str) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} still runs {seconds} s later")


@pytest.mark.parametrize("signalled", [(0, 1), (1,)], ids=["both", "one"])
def test_sigterm_stops_both_processes_at_one_step_with_one_checkpoint(tmp_path, procs, signalled):
    start_two(tmp_path, procs, "--config.checkpoint.every_steps=0")  # the only checkpoint: the stop's
    for i in signalled:
        procs[i].send_signal(signal.SIGTERM)
    outs = [finish(p, 120, f"process {i} (SIGTERM to {signalled})") for i, p in enumerate(procs)]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    # JAX's preemption sync point gives both processes the same stop step
    stops = [int(out.split("stopped by SIGTERM at step ")[1].split()[0]) for out, _ in outs]
    assert stops[0] == stops[1] < 10000, stops
    assert os.listdir(tmp_path / "checkpoints") == [str(stops[0])]
    data = sorted(f for f in os.listdir(tmp_path / "checkpoints" / str(stops[0]) / "data") if f.endswith(".json"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]  # one checkpoint, written by both
    assert max(losses(tmp_path)) == stops[0]


def test_killed_coordinator_stops_process_1_within_60_s(tmp_path, procs):
    coordinator = start_two(tmp_path, procs)
    procs[0].kill()  # process 0 hosts the coordination service
    killed = time.time()
    _, err = finish(procs[1], 60, "process 1 (process 0 was killed)")
    print(f"process 1 exited {time.time() - killed:.1f} s after the kill, rc {procs[1].returncode}")
    assert procs[1].returncode != 0
    # XLA's fatal line says the coordination service is gone; ours names its address
    assert "coordination service" in err and f"coordinator {coordinator} (hosted by process 0)" in err, err[-3000:]


def test_killed_process_stops_the_other_within_60_s(tmp_path, procs):
    start_two(tmp_path, procs)
    procs[1].kill()
    killed = time.time()
    _, err = finish(procs[0], 60, "process 0 (its peer was killed)")
    print(f"process 0 exited {time.time() - killed:.1f} s after the kill, rc {procs[0].returncode}")
    assert procs[0].returncode != 0
    # the coordination service names the lost task; no Python traceback is needed to see why
    assert "task" in err.lower() and ("heartbeat" in err.lower() or "unavailable" in err.lower()), err[-3000:]


def _cfg():
    cfg = config.load_config(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.train.global_batch_size, cfg.train.seq_len = 8, 64
    return validation.validate(cfg)


def test_processes_read_disjoint_documents_and_compose_the_global_batch():
    cfg = _cfg()
    n = len(open_sources(cfg.data)[0])
    B = cfg.train.global_batch_size  # one data shard per row; process p holds rows 4p .. 4p + 3
    shards = [{i for r in range(4 * p, 4 * p + 4) for i in document_indices(n, cfg.data, "train", r, B)}
              for p in range(2)]  # fmt: skip
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) > 0.9 * n
    local = [make_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    batches = [[next(it) for _ in range(3)] for it in local]
    for step in range(3):
        a, b = batches[0][step]["inputs"], batches[1][step]["inputs"]
        assert a.shape == b.shape == (4, 64) and not np.array_equal(a, b)
    # 1 process with default settings sees exactly the rows the 2 processes hold, process-major
    both = make_iterator(cfg, process_index=0, process_count=1)
    for step in range(3):
        glob = next(both)
        for k in glob:
            np.testing.assert_array_equal(glob[k], np.concatenate([batches[0][step][k], batches[1][step][k]]))
