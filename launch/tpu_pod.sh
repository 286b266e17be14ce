#!/usr/bin/env bash
# Train nopejax on a Cloud TPU VM slice: create (or reuse) it, install on every worker, run
# `nopejax train` on all workers at once. JAX detects the pod itself (NOPEJAX_CLUSTER=auto),
# one process per host; the mesh's ICI part spans a slice and mesh.dcn_* spans slices.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu_pod.sh --name NAME --zone ZONE --type ACCELERATOR --config FILE --workdir gs://BUCKET/PATH
                         [--project P] [--version RUNTIME] [--queued] [--spot] [--detach]
                         [-- NOPEJAX_TRAIN_ARGS...]

Create or reuse the TPU VM slice NAME, install this checkout of nopejax on every worker, and run
`nopejax train --config FILE --workdir WORKDIR` on all workers (--worker=all).

  --name NAME        TPU VM name (reused if it exists)
  --zone ZONE        e.g. us-east5-a (v5p), us-central1-a or europe-west4-b (v5e), us-east5-b (v6e)
  --type TYPE        accelerator type: v5litepod-16 (v5e), v5p-32 (v5p), v6e-16 (v6e), ...
  --config FILE      config file, relative to the repository root (e.g. configs/smollm3_3b.py)
  --workdir gs://B/P checkpoints, metrics and TensorBoard; every worker mounts bucket B with
                     gcsfuse at /gcs/B and trains in /gcs/B/P (all hosts write one checkpoint)
  --project P        GCP project (default: gcloud's configured one)
  --version V        TPU runtime (default by type: v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                     v6e v2-alpha-tpuv6e)
  --queued           create through a queued resource (waits for capacity) instead of tpu-vm create
  --spot             spot / preemptible capacity (nopejax saves and stops cleanly on SIGTERM)
  --detach           start training under nohup and return; logs in ~/nopejax_train.log on each worker
  -- ARGS            more `nopejax train` arguments, e.g. --config.train.steps=1000

Multislice (several slices over DCN) needs queued resources with --node-count; set
--config.mesh.dcn_data (or dcn_fsdp) to the slice count.

example:
  launch/tpu_pod.sh --name lm-v5p --zone us-east5-a --type v5p-32 --queued \
    --config configs/smollm3_3b.py --workdir gs://my-bucket/runs/smollm3 -- --config.train.steps=20000
USAGE
}

die() { echo "launch/tpu_pod.sh: error: $*" >&2; exit 2; }

NAME="" ZONE="" TYPE="" CONFIG="" WORKDIR="" PROJECT="" VERSION="" QUEUED=0 SPOT=0 DETACH=0
EXTRA=()
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need "$@"; NAME="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --type) need "$@"; TYPE="$2"; shift 2 ;;
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need "$@"; WORKDIR="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --version) need "$@"; VERSION="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --detach) DETACH=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (nopejax train arguments go after --; see --help)" ;;
  esac
done
for v in NAME ZONE TYPE CONFIG WORKDIR; do
  flag="--$(echo "$v" | tr '[:upper:]' '[:lower:]')"
  [[ -n "${!v}" ]] || die "missing $flag (see --help)"
done
[[ "$WORKDIR" == gs://*/* ]] || die "--workdir must be gs://BUCKET/PATH (all workers must see it), got '$WORKDIR'"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$REPO/$CONFIG" ]] || die "config $CONFIG not found under $REPO (give a path relative to the repository)"
command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud SDK and run 'gcloud auth login'"

if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime for --type $TYPE; pass --version (see 'gcloud compute tpus versions list')" ;;
  esac
fi

G=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && G+=(--project="$PROJECT")
SPOT_FLAG=()
[[ $SPOT -eq 1 ]] && SPOT_FLAG=(--spot)

# 1. the slice
if gcloud compute tpus tpu-vm describe "$NAME" "${G[@]}" >/dev/null 2>&1; then
  echo "reusing TPU VM $NAME"
elif [[ $QUEUED -eq 1 ]]; then
  gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$TYPE" \
    --runtime-version="$VERSION" "${SPOT_FLAG[@]}" "${G[@]}"
  echo "waiting for queued resource $NAME to become ACTIVE (Ctrl-C keeps the request queued)"
  while true; do
    state="$(gcloud compute tpus queued-resources describe "$NAME" "${G[@]}" --format='value(state.state)')"
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) die "queued resource $NAME is $state; see 'gcloud compute tpus queued-resources describe $NAME'" ;;
    esac
    sleep 30
  done
else
  gcloud compute tpus tpu-vm create "$NAME" --accelerator-type="$TYPE" --version="$VERSION" \
    "${SPOT_FLAG[@]}" "${G[@]}"
fi
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" "${G[@]}" --worker=all)

# 2. install this checkout on every worker (uncommitted changes included)
TARBALL="$(mktemp -t nopejax-XXXXXX.tar.gz)"
trap 'rm -f "$TARBALL"' EXIT
tar -C "$REPO" --exclude=.git --exclude='*.pyc' --exclude=.venv -czf "$TARBALL" .
gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:~/nopejax.tar.gz" "${G[@]}" --worker=all
BUCKET="${WORKDIR#gs://}"; BUCKET="${BUCKET%%/*}"
"${SSH[@]}" --command "set -e
rm -rf ~/nopejax && mkdir -p ~/nopejax && tar -xzf ~/nopejax.tar.gz -C ~/nopejax
python3 -m pip install -q -U pip && python3 -m pip install -q -e \"\$HOME/nopejax[tpu]\"
if ! command -v gcsfuse >/dev/null; then
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
sudo mkdir -p /gcs/$BUCKET && sudo chown \$USER /gcs/$BUCKET
mountpoint -q /gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET"

# 3. train on all workers; JAX finds the other hosts through the TPU metadata
LOCAL_WORKDIR="/gcs/$BUCKET/${WORKDIR#gs://"$BUCKET"/}"
TRAIN="cd ~/nopejax && NOPEJAX_CLUSTER=auto python3 -m nopejax.cli train --config $(printf '%q' "$CONFIG") \
--workdir $(printf '%q' "$LOCAL_WORKDIR")"
for a in "${EXTRA[@]}"; do TRAIN+=" $(printf '%q' "$a")"; done
if [[ $DETACH -eq 1 ]]; then
  "${SSH[@]}" --command "nohup bash -c $(printf '%q' "$TRAIN") > ~/nopejax_train.log 2>&1 &"
  echo "started on all workers of $NAME; follow with:"
  echo "  gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE --worker=0 --command 'tail -f ~/nopejax_train.log'"
else
  "${SSH[@]}" --command "$TRAIN"
fi
echo "metrics: $WORKDIR/metrics.jsonl; tensorboard --logdir $WORKDIR/tensorboard"
