#!/usr/bin/env bash
# Compile time and memory per chip of SmolLM3-3B's train step for a TPU v5p-16 slice (v5p:2x2x4),
# nopejax's dry run vs MaxText's train_compile of the same shape, alternated on the same JAX/libtpu.
#
#   benchmarks/aot_vs_maxtext.sh [ROUNDS]        # default 2 rounds = 4 compiles (~10-20 min on 2 busy cores)
#   TOOLS="nopejax nopejax_separate nopejax_allrope maxtext" benchmarks/aot_vs_maxtext.sh 2
#       # beside: the same stack with a traced body per layer spec (model.shared_rope_body=False), and
#       # with RoPE in every layer (the mixed stack's compile against the one-kind stack's)
#
# Long context (context parallelism): the same shape with each row's sequence split over CONTEXT chips,
# MaxText with ici_context_parallelism=CONTEXT attention=flash (its all-gather CP, load balanced):
#
#   CONTEXT=4 SEQ_LEN=32768 benchmarks/aot_vs_maxtext.sh 1
#   CONTEXT=4 SEQ_LEN=32768 TOOLS=nopejax NOPEJAX_CONFIG=configs/local_global_3b.py benchmarks/aot_vs_maxtext.sh 1
#
# Mixture of experts (MOE=1): Arcee Trinity Mini's shape (configs/trinity_mini.py: 128 experts of
# 1024, top 8 sigmoid + 1 shared, 2 dense first layers; expert 8 x fsdp 2, 4 rows of 4096 per chip)
# beside MaxText's closest MoE config, qwen3-30b-a3b (the same attention: d 2048, 32 query / 4 KV
# heads of 128, QK-norm; 128 experts top 8), its expert width set to Trinity's 1024 and its vocab
# to 200192, ici_expert_parallelism=8, per_device_batch_size=4. MaxText's qwen3_moe block has no
# shared expert, no dense first layers and no sliding window, so it has 1 shared expert less per
# layer. LAYERS (default 4) reduces both depths so the compile fits a small CPU; nopejax keeps
# 1 dense first layer, MaxText none. DISPATCH picks nopejax's model.moe_dispatch and CHUNKS its
# model.moe_dispatch_chunks (default: the config's 8 for allgather, 1 for the other dispatchers).
#
#   MOE=1 benchmarks/aot_vs_maxtext.sh 1
#   MOE=1 LAYERS=4 DISPATCH=all_to_all TOOLS=nopejax benchmarks/aot_vs_maxtext.sh 1
#
# Two Python 3.12 venvs with the same jax[tpu] (and so the same libtpu):
#   NOPEJAX_PY  (default /work/venv312/bin/python):      pip install -e '.[tpu]' 'jax[tpu]==0.12.0.1'
#   MAXTEXT_PY  (default /work/venv_maxtext/bin/python): pip install 'maxtext[tpu]==0.2.5'; pip install 'jax[tpu]==0.12.0.1'
# Both tools run under benchmarks/compile_timer.py, which reads JAX's jax.monitoring duration events
# (trace, lower to MLIR, backend compile) and the largest program's memory_analysis() the same way.
#
# MaxText has no SmolLM3; its reference is its llama2 decoder block (scanned, RoPE in every layer)
# at SmolLM3-3B's shape: d 2048, 16 query / 4 KV heads of 128, MLP 11008, 36 layers, vocab 128256,
# tied embeddings, fp32 weights, bf16 compute, full remat, FSDP over 16 chips, one 4096-token row per chip.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NOPEJAX_PY="${NOPEJAX_PY:-/work/venv312/bin/python}"
MAXTEXT_PY="${MAXTEXT_PY:-/work/venv_maxtext/bin/python}"
ROUNDS="${1:-2}"
SEQ_LEN="${SEQ_LEN:-4096}"
CONTEXT="${CONTEXT:-1}"
NOPEJAX_CONFIG="${NOPEJAX_CONFIG:-configs/smollm3_3b.py}"
TOOLS="${TOOLS:-nopejax maxtext}"
MOE="${MOE:-0}"
LAYERS="${LAYERS:-4}"
DISPATCH="${DISPATCH:-allgather}"
if [[ "$DISPATCH" == allgather ]]; then CHUNKS="${CHUNKS:-8}"; else CHUNKS="${CHUNKS:-1}"; fi
TIMER="$ROOT/benchmarks/compile_timer.py"
LOG="$(mktemp -d)"
# both tools only compile (no TPU is attached); let libtpu load while another process holds its lockfile
export ALLOW_MULTIPLE_LIBTPU_LOAD=1

versions() { "$1" -c "import importlib.metadata as m, jax; print(jax.__version__, m.version('libtpu'))"; }
NOPEJAX_V="$(versions "$NOPEJAX_PY")"
MAXTEXT_V="$(versions "$MAXTEXT_PY")"
SHOWN_CONFIG="$NOPEJAX_CONFIG"
if [[ "$MOE" == 1 ]]; then SHOWN_CONFIG="configs/trinity_mini.py ($LAYERS layers, dispatch $DISPATCH, $CHUNKS chunks) vs MaxText qwen3-30b-a3b"; fi
echo "seq_len $SEQ_LEN, context $CONTEXT, nopejax config $SHOWN_CONFIG; jax, libtpu: nopejax venv $NOPEJAX_V; maxtext venv $MAXTEXT_V; load $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
if [[ "$NOPEJAX_V" != "$MAXTEXT_V" ]]; then
  echo "the two venvs must have the same jax and libtpu" >&2
  exit 1
fi
MAXTEXT_DIR="$("$MAXTEXT_PY" -c "import maxtext, os; print(os.path.dirname(maxtext.__file__))")"

run_nopejax() {
  if [[ "$MOE" == 1 ]]; then
    PYTHONPATH="$ROOT" "$NOPEJAX_PY" "$TIMER" nopejax.cli train --config "$ROOT/configs/trinity_mini.py" \
      --dry-run --topology v5p:2x2x4 --config.model.num_layers="$LAYERS" --config.model.num_dense_layers=1 \
      --config.model.moe_dispatch="$DISPATCH" --config.model.moe_dispatch_chunks="$CHUNKS"
    return
  fi
  PYTHONPATH="$ROOT" "$NOPEJAX_PY" "$TIMER" nopejax.cli train --config "$ROOT/$NOPEJAX_CONFIG" \
    --dry-run --topology v5p:2x2x4 --config.train.seq_len="$SEQ_LEN" --config.mesh.context="$CONTEXT" "$@"
}

# nopejax variants of the same shape, for ratios within nopejax in the same alternation
run_nopejax_separate() { run_nopejax --config.model.shared_rope_body=False; }  # a traced body per spec
run_nopejax_allrope() { run_nopejax --config.model.no_rope_layer_interval=0; }  # RoPE in every layer

maxtext_context() {  # nothing extra at CONTEXT=1, so the default run stays what it was
  if [[ "$CONTEXT" != 1 ]]; then echo "ici_context_parallelism=$CONTEXT attention=flash"; fi
}

run_maxtext() {
  if [[ "$MOE" == 1 ]]; then
    "$MAXTEXT_PY" "$TIMER" maxtext.trainers.pre_train.train_compile "$MAXTEXT_DIR/configs/base.yml" \
      compile_topology=v5p-16 compile_topology_num_slices=1 run_name=aot_vs_nopejax_moe \
      model_name=qwen3-30b-a3b override_model_config=true base_num_decoder_layers="$LAYERS" \
      base_moe_mlp_dim=1024 vocab_size=200192 logits_via_embedding=false \
      max_target_length=4096 per_device_batch_size=4 remat_policy=full scan_layers=true \
      dtype=bfloat16 weight_dtype=float32 ici_expert_parallelism=8 ici_fsdp_parallelism=-1 \
      enable_dropout=false dataset_type=synthetic enable_checkpointing=false
    return
  fi
  "$MAXTEXT_PY" "$TIMER" maxtext.trainers.pre_train.train_compile "$MAXTEXT_DIR/configs/base.yml" \
    compile_topology=v5p-16 compile_topology_num_slices=1 run_name=aot_vs_nopejax \
    decoder_block=llama2 base_emb_dim=2048 base_num_query_heads=16 base_num_kv_heads=4 base_mlp_dim=11008 \
    base_num_decoder_layers=36 head_dim=128 vocab_size=128256 logits_via_embedding=true \
    normalization_layer_epsilon=1e-6 rope_max_timescale=50000 \
    max_target_length="$SEQ_LEN" per_device_batch_size=1 $(maxtext_context) remat_policy=full scan_layers=true \
    dtype=bfloat16 weight_dtype=float32 ici_fsdp_parallelism=-1 enable_dropout=false \
    dataset_type=synthetic enable_checkpointing=false
}

for round in $(seq "$ROUNDS"); do
  for tool in $TOOLS; do
    echo "round $round: $tool ..." >&2
    if ! "run_$tool" >"$LOG/$tool.$round.out" 2>&1; then
      tail -30 "$LOG/$tool.$round.out" >&2
      echo "$tool failed in round $round; full log $LOG/$tool.$round.out" >&2
      exit 1
    fi
    tail -1 "$LOG/$tool.$round.out" | tee -a "$LOG/$tool.jsonl"
  done
done

"$NOPEJAX_PY" - "$LOG" <<'EOF'
import json, os, statistics, sys

log = sys.argv[1]
tools = ("nopejax", "nopejax_separate", "nopejax_allrope", "maxtext")
rows = {t: [json.loads(line) for line in open(f"{log}/{t}.jsonl")] for t in tools if os.path.exists(f"{log}/{t}.jsonl")}
keys = ("trace_s", "lower_s", "backend_compile_s", "memory_per_device_gib")
med = {t: {k: statistics.median(r[k] for r in rows[t]) for k in keys} for t in rows}
print(f"\nmedian of {len(next(iter(rows.values())))} alternated runs each (seconds are JAX's monitoring events, summed):")
coll = {t: statistics.median(r.get("collective_gib", {}).get("total", float("nan")) for r in rows[t]) for t in rows}
print("| tool | trace (s) | lower (s) | backend compile (s) | trace+lower+compile (s) | memory per chip (GiB) "
      "| collectives per chip and step (GiB) |")
print("|---|---|---|---|---|---|---|")
for t, m in med.items():
    total = m["trace_s"] + m["lower_s"] + m["backend_compile_s"]
    print(f"| {t} | {m['trace_s']:.1f} | {m['lower_s']:.1f} | {m['backend_compile_s']:.1f} | {total:.1f} "
          f"| {m['memory_per_device_gib']:.2f} | {coll[t]:.2f} |")
total = lambda m: m["trace_s"] + m["lower_s"] + m["backend_compile_s"]
for t in ("nopejax_separate", "nopejax_allrope"):
    if "nopejax" in med and t in med:
        print(f"nopejax / {t}: trace+lower+compile {total(med['nopejax']) / total(med[t]):.2f}x, "
              f"memory per chip {med['nopejax']['memory_per_device_gib'] / med[t]['memory_per_device_gib']:.2f}x")
if "nopejax" not in med or "maxtext" not in med:
    sys.exit(0)
n, x = med["nopejax"], med["maxtext"]
print(f"nopejax / MaxText: backend compile {n['backend_compile_s'] / x['backend_compile_s']:.2f}x, "
      f"trace+lower+compile {total(n) / total(x):.2f}x, "
      f"memory per chip {n['memory_per_device_gib'] / x['memory_per_device_gib']:.2f}x")
EOF
