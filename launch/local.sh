#!/usr/bin/env bash
# N `nopejax train` processes on this machine, joined over localhost by jax.distributed.
#
# Each process gets its own fake CPU devices (--devices-per-process, default 2) and JAX's gloo
# CPU collectives, so a multi-host run can be tested without a cluster. Process 0 hosts the
# coordinator on a free port; all processes share the workdir (orbax writes one checkpoint
# together; metrics and TensorBoard come from process 0 only).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local.sh N [--devices-per-process D] [--port PORT] NOPEJAX_TRAIN_ARGS...

Run N `nopejax train` processes on this machine over localhost (CPU devices, gloo collectives).

  N                        number of processes (>= 1)
  --devices-per-process D  fake CPU devices per process (default 2)
  --port PORT              coordinator port on 127.0.0.1 (default: a free one)
  NOPEJAX_TRAIN_ARGS       passed to every process, e.g.
                           --config configs/tiny.py --workdir /tmp/run --config.train.steps=20

Logs: process 0 prints to the terminal; process i>0 writes WORKDIR/logs/process_i.log
(or ./nopejax_process_i.log without --workdir). If any process fails, the others are stopped
and the script exits with that process's status.

example:
  launch/local.sh 2 --config configs/tiny.py --workdir /tmp/tiny2 --config.train.steps=50
USAGE
}

die() { echo "launch/local.sh: error: $*" >&2; exit 2; }

if [[ $# -eq 0 ]]; then usage >&2; die "missing N, the number of processes (see --help)"; fi
case "$1" in -h|--help) usage; exit 0 ;; esac
N="$1"; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$N' (usage: launch/local.sh N ARGS...)"

DEVICES=2
PORT=""
ARGS=()
WORKDIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --devices-per-process) [[ $# -ge 2 ]] || die "--devices-per-process needs a value"; DEVICES="$2"; shift 2 ;;
    --port) [[ $# -ge 2 ]] || die "--port needs a value"; PORT="$2"; shift 2 ;;
    --workdir) [[ $# -ge 2 ]] || die "--workdir needs a value"; WORKDIR="$2"; ARGS+=("$1" "$2"); shift 2 ;;
    --workdir=*) WORKDIR="${1#--workdir=}"; ARGS+=("$1"); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '$DEVICES'"
[[ ${#ARGS[@]} -gt 0 ]] || die "no nopejax train arguments; pass at least --config FILE --workdir DIR"

PYTHON="${PYTHON:-python3}"
if [[ -z "$PORT" ]]; then
  # bind port 0 and let the kernel choose; the tiny race until process 0 binds it is acceptable here
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
LOGDIR="${WORKDIR:+$WORKDIR/logs}"
LOGDIR="${LOGDIR:-.}"
mkdir -p "$LOGDIR"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES"
export NOPEJAX_COORDINATOR="127.0.0.1:$PORT"
export NOPEJAX_NUM_PROCESSES="$N"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 143' INT TERM

for ((i = 0; i < N; i++)); do
  if [[ $i -eq 0 ]]; then
    NOPEJAX_PROCESS_ID=0 "$PYTHON" -m nopejax.cli train "${ARGS[@]}" &
  else
    NOPEJAX_PROCESS_ID=$i "$PYTHON" -m nopejax.cli train --no-progress "${ARGS[@]}" >"$LOGDIR/process_$i.log" 2>&1 &
  fi
  PIDS+=("$!")
done

# Wait for all; on the first failure stop the rest so nothing hangs on a dead peer.
status=0
remaining=$N
while [[ $remaining -gt 0 ]]; do
  set +e
  wait -n -p done_pid "${PIDS[@]}"
  rc=$?
  set -e
  [[ -n "${done_pid:-}" ]] || break  # nothing left to wait for
  remaining=$((remaining - 1))
  left=()
  for pid in "${PIDS[@]}"; do [[ "$pid" == "$done_pid" ]] || left+=("$pid"); done
  PIDS=("${left[@]}")
  if [[ $rc -ne 0 ]]; then
    status=$rc
    echo "launch/local.sh: a process exited with status $rc; stopping the others (logs in $LOGDIR)" >&2
    break
  fi
done
exit "$status"
