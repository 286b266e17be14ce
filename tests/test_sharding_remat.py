"""No tensor replicated by XLA's partitioner: the train step on every mesh the tests use (data,
fsdp, context, tensor, expert alone, each pair of them as 2 x 4, and fsdp x context x tensor),
compiled on 8 fake CPU devices, makes the SPMD partitioner print no "Involuntary full
rematerialization" (its last resort when it cannot move a tensor between two shardings: a full copy
on every device, then a re-partition).

Only XLA's passes up to and including SPMD partitioning run (`xla_enable_hlo_passes_only`), so a
mesh costs a second or two instead of a whole CPU compile (the code emitter may then refuse the
program the skipped passes did not rewrite; the partitioned program, dumped, shows it got that far).
The partitioner writes to the process's stderr, read here with capfd.
`test_the_check_sees_a_forced_rematerialization` proves, under the same flags and log level, that a
known bad reshard is seen.
"""

import contextlib
import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from test_train import small_cfg

from nopejax import config, sharding, train

MESSAGE = "Involuntary full rematerialization"
# the passes XLA:CPU runs before and through SPMD partitioning (the `spmd-partitioner` pipeline)
PARTITION_PASSES = (
    "async-collective-replacer,strip-memory-placement-annotations,flatten-call-graph,call-inliner,"
    "zero_sized_hlo_elimination,conditional-canonicalizer,shardy-xla,dce,tuple-simplifier,cse,spmd-partitioning"
)
# The code emitter's reaction to the skipped passes differs by version: XLA:CPU in JAX 0.12 aborts
# the process (a CHECK) on a gather no simplifier has rewritten, so there the simplifiers run too
# and the emitter fails with an error instead; in JAX 0.10 the same simplifiers make it abort.
if jax.__version_info__ >= (0, 11):
    PARTITION_PASSES += ",gather_simplifier,scatter_simplifier"

AXES = ("data", "fsdp", "context", "tensor", "expert")
MESHES = (
    [{a: 8} for a in AXES]
    + [{a: 2, b: 4} for a, b in itertools.combinations(AXES, 2)]
    # the reversed pairs that once rematerialized (docs/results/compile.md), the others as 2 x 4 only
    + [dict(fsdp=2, data=4), dict(context=2, fsdp=4), dict(expert=2, fsdp=4)]
    + [dict(fsdp=2, context=2, tensor=2), dict(data=2, context=2, tensor=2)]
)


def dense_cfg():
    """Sliding RoPE and global NoPE layers, scanned (4 blocks of 2), full remat, the loss in chunks."""
    cfg = small_cfg()
    cfg.model.update(
        d_model=64, num_heads=8, num_kv_heads=8, head_dim=8, d_ff=64, num_layers=8,
        layer_types=("sliding_attention", "full_attention") * 4, sliding_window=5, no_rope_layer_interval=2,
        remat="full", scan_layers=True,
    )  # fmt: skip
    cfg.train.update(global_batch_size=8, seq_len=64, loss_chunk_len=16)
    return cfg


def hybrid_moe_cfg(dispatch="allgather"):
    """Mamba2, Gated DeltaNet, global and sliding attention layers with MoE, dense and no FFNs (2 blocks of 4)."""
    cfg = dense_cfg()
    cfg.model.update(
        layer_types=("full_attention", "mamba2", "sliding_attention", "gated_deltanet") * 2,
        ffn_types=("moe", "dense", "moe", "none") * 2, no_rope_layer_interval=0,
        num_experts=8, experts_per_token=2, expert_d_ff=16, num_shared_experts=1, moe_dispatch=dispatch,
        mamba_num_heads=4, mamba_head_dim=8, mamba_groups=2, mamba_state_size=4, mamba_chunk_size=4,
        gdn_key_heads=2, gdn_value_heads=4, gdn_key_head_dim=4, gdn_value_head_dim=8, gdn_chunk_size=4,
    )  # fmt: skip
    return cfg


def _id(axes: dict) -> str:
    return "x".join(f"{a}{n}" for a, n in axes.items())


# The dense model on every mesh without an expert axis (which needs experts); the hybrid MoE model
# wherever the expert axis meets another, and on the context meshes its recurrent mixers handle.
CASES = [("dense", axes) for axes in MESHES if "expert" not in axes] + [
    ("hybrid_moe", axes)
    for axes in MESHES
    if "expert" in axes or axes in (dict(context=8), dict(fsdp=2, context=4), dict(fsdp=2, context=2, tensor=2))
]
CASES.append(("hybrid_moe_all_to_all", dict(fsdp=2, expert=4)))
MODELS = {
    "dense": dense_cfg,
    "hybrid_moe": hybrid_moe_cfg,
    "hybrid_moe_all_to_all": lambda: hybrid_moe_cfg("all_to_all"),
}


def partition(jitted, *args, dump_dir) -> None:
    """Lower and run XLA's passes through SPMD partitioning. The code emitter then meets ops that
    the skipped passes would have rewritten and may refuse them: an error is expected only once the
    partitioned program has been written to `dump_dir`, which proves the partitioner ran to its end."""
    options = {
        "xla_enable_hlo_passes_only": PARTITION_PASSES,
        "xla_dump_to": str(dump_dir),
        "xla_dump_hlo_pass_re": "spmd-partitioning",
    }
    with contextlib.suppress(jax.errors.JaxRuntimeError):
        jitted.lower(*args).compile(compiler_options=options)
    partitioned = list(dump_dir.glob("*after_spmd-partitioning*"))
    assert partitioned, f"XLA did not finish SPMD partitioning; it dumped {sorted(p.name for p in dump_dir.iterdir())}"


def rematerializations(err: str) -> list[str]:
    return [line for line in err.splitlines() if MESSAGE in line]


def test_the_check_sees_a_forced_rematerialization(capfd, tmp_path):
    """[B, S, D] from D over fsdp x context to batch x sequence: the move the embedding lookup made."""
    cfg = config.base_config()
    cfg.mesh.update(data=1, fsdp=2, context=4, tensor=1)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices())
    d_sharded = NamedSharding(mesh, PartitionSpec(None, None, ("fsdp", "context")))
    x_BSD = jax.ShapeDtypeStruct((8, 16, 32), jnp.float32, sharding=d_sharded)
    f = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2, PartitionSpec("fsdp", "context", None)))
    capfd.readouterr()
    with jax.set_mesh(mesh):
        partition(f, x_BSD, dump_dir=tmp_path)
    assert len(rematerializations(capfd.readouterr().err)) == 1


@pytest.mark.parametrize("model, axes", CASES, ids=[f"{m}-{_id(a)}" for m, a in CASES])
def test_train_step_partitions_without_replicating(model, axes, capfd, tmp_path):
    cfg = MODELS[model]()
    cfg.mesh.update(**axes)
    s = train.setup(cfg, jax.devices())
    step, _ = train.compile_fns(s)
    capfd.readouterr()
    with jax.set_mesh(s.mesh):
        partition(step, s.abstract_state, train.abstract_batch(s), dump_dir=tmp_path)
    found = rematerializations(capfd.readouterr().err)
    assert not found, f"{len(found)} involuntary full rematerializations:\n" + "\n".join(found)
