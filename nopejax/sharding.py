"""The device mesh and the one table that maps logical axis names to mesh axes.

Model code names logical axes only (`embed`, `heads`, ...), never mesh axes; this module alone
decides where they go (MaxText `logical_axis_rules`, nanodo `fsdp.py`). The mesh has five axes:
`data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state sharded),
`context` (the sequence of each row split across devices: context parallelism, nopejax/context.py),
`expert` (MoE experts split over it, the batch elsewhere) and `tensor` (Megatron-style heads / MLP
split). Parameters shard over `fsdp` and `context` together, as MaxText and torchtitan do, so
context-parallel devices hold no replicas. DCN sizes (across slices or nodes) multiply the `data`,
`fsdp` and `context` axes; the devices are laid out so that the DCN part is the slow, outer one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nopejax.config import ConfigDict, ConfigError

MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the expert axis splits the batch outside MoE layers (MaxText)
CONTEXT_AXIS = "context"

# logical axis -> mesh axis (or a tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    # the expert axis splits the batch outside MoE layers, so it shards those layers' weights too
    # (FSDP over fsdp x expert, as MaxText): replicated over it they would cost an MoE model its
    # whole non-expert state once per expert-axis device
    "embed": ("fsdp", CONTEXT_AXIS, "expert"),
    "expert_embed": ("fsdp", CONTEXT_AXIS),  # the embed dim of the expert weights: "expert" shards their experts
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",  # MoE: experts over the expert axis (nopejax/moe.py)
    "expert_mlp": "tensor",  # MoE: each expert's width, Megatron-style
    "layers": None,
    "norm": None,
    # activations
    "act_batch": BATCH_AXES,
    "act_seq": CONTEXT_AXIS,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
    # the LM head and loss (train.loss_sums): the head's vocabulary over every axis that shards the
    # weights, the hidden states of a loss chunk gathered to match, so each device's share of the
    # head's gradient is its own and nothing of [V, D] crosses devices inside the chunk loop (the
    # head has one copy per data replica for that: model.loss_head)
    "loss_batch": "data",
    "loss_vocab": ("fsdp", CONTEXT_AXIS, "expert", "tensor"),
}


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh | None = None) -> PartitionSpec:
    """Logical names -> PartitionSpec, dropping mesh axes of size 1 (they shard nothing) and, inside
    `shard_map`, the axes it made manual (each device holds its own part along them already)."""
    manual = getattr(mesh, "manual_axes", ()) if mesh is not None else ()
    spec = []
    for name in logical_axes:
        target = LOGICAL_RULES.get(name) if name else None
        if isinstance(target, str):
            target = (target,)
        if target and mesh is not None:
            target = tuple(a for a in target if mesh.shape.get(a, 1) > 1 and a not in manual)
        spec.append(target if target else None)
    return PartitionSpec(*[t[0] if t and len(t) == 1 else t for t in spec])


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is set (plain 1-device use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh))


def constrain_dividing(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`constrain`, each dimension split over as many of its mesh axes (in order) as divide it: a
    vocabulary of 67 stays whole on 2 devices, where `constrain` would be refused."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    spec = [dividing_axes(size, name, mesh) if name else () for size, name in zip(x.shape, logical_axes)]
    return jax.lax.with_sharding_constraint(
        x, PartitionSpec(*[t if len(t) > 1 else (t[0] if t else None) for t in spec])
    )


def dividing_axes(size: int, logical: str, mesh=None) -> tuple[str, ...]:
    """The mesh axes of `logical`, in order, as many as divide a dimension of `size` (how
    `constrain_dividing` splits it)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    kept, shards = [], 1
    for axis in mesh_axes(logical, mesh):
        if size % (shards * mesh.shape[axis]) == 0:
            kept.append(axis)
            shards *= mesh.shape[axis]
    return tuple(kept)


def mesh_axes(logical: str, mesh=None) -> tuple[str, ...]:
    """The mesh axes the logical axis `logical` is split over (none of size 1, none manual), in order;
    `mesh` defaults to the current one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        return ()
    axes = logical_to_spec([logical], mesh)[0]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def mesh_size(logical: str) -> int:
    """Devices the logical axis `logical` is split over under the current mesh; 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in mesh_axes(logical, mesh))


def context_size(mesh=None) -> int:
    """Devices one row's sequence is split over (ici x dcn); 1 without a mesh or a context axis."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        return 1
    return mesh.shape.get(CONTEXT_AXIS, 1)


def compile_platform() -> str:
    """The platform being compiled for: the abstract mesh's devices (TPU in an ahead-of-time dry
    run on a CPU host), else the default backend. Picks how Pallas kernels lower."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None) if mesh is not None and not mesh.empty else None
    return getattr(device, "platform", None) or jax.default_backend()


def pallas_on_mesh(kernel, dims, specs, *, per_device: bool):
    """A Pallas kernel function (taking `interpret=` and `backend=`) set up for the platform being
    compiled for: lowered by Mosaic for TPU (a TPU host or an ahead-of-time TPU mesh), run in Pallas's
    HLO interpreter on CPU (slow: for tests). A Mosaic kernel is opaque to XLA's sharding propagation,
    so under a mesh of several devices it runs inside `shard_map` on each device's batch rows, and on
    its key groups K when the `act_heads` axes divide them, else on its heads within a group G.

    `dims(*args) -> (batch rows, K, G)`; `specs(batch, on_K, on_G) -> (in_specs, out_specs)`, each
    the mesh axes (or None: replicated) of that dimension. `per_device`: the caller is inside
    `shard_map` already (a context-parallel recurrence). Shared by the Mamba2 SSD and Gated DeltaNet kernels.
    """
    platform = compile_platform()
    kernel = functools.partial(kernel, interpret=platform == "cpu", backend="tpu" if platform == "tpu" else None)
    mesh = jax.sharding.get_abstract_mesh()
    if per_device or mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return kernel

    def split(logical: str, n: int):  # the mesh axes of `logical` if they divide n, else None (replicated)
        axes = logical_to_spec([logical], mesh)[0]
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
        return axes if size > 1 and n % size == 0 else None

    def per_shard(*args):
        Bz, K, G = dims(*args)
        batch = split("act_batch", Bz)  # a generation sample of one row under a training mesh: replicated
        on_K = split("act_heads", K)  # groups split: each device its own shared keys
        on_G = None if on_K else split("act_heads", G)  # else heads within groups
        in_specs, out_specs = specs(batch, on_K, on_G)
        return jax.shard_map(kernel, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

    return per_shard


# ---------------------------------------------------------------------------------------------
# Mesh


def resolve_mesh_shape(
    mesh_cfg: ConfigDict, num_devices: int, platform: str | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """-> (ici sizes, dcn sizes) per mesh axis, with the one -1 filled in.

    Errors name the axes the user sized (not the -1 axis that merely takes the rest); on CPU they
    say how to get more (fake) devices."""
    dcn = {
        "data": mesh_cfg.dcn_data,
        "fsdp": mesh_cfg.dcn_fsdp,
        "context": mesh_cfg.dcn_context,
        "expert": 1,
        "tensor": 1,
    }
    more = "; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices" if platform == "cpu" else ""
    num_slices = math.prod(dcn.values())
    if num_devices % num_slices:
        sized = [f"dcn_{a}" for a in ("data", "fsdp", "context") if dcn[a] != 1]
        raise ConfigError(
            _fields(sized),
            f"dcn_data * dcn_fsdp * dcn_context = {num_slices} does not divide the {num_devices} devices",
            "set the DCN sizes to the number of slices / nodes" + more,
        )
    per_slice = num_devices // num_slices
    ici = {a: mesh_cfg[a] for a in MESH_AXES}
    # the axes given a size (data defaults to -1, the others to 1)
    sized = [a for a in MESH_AXES if ici[a] != -1 and ici[a] != (-1 if a == "data" else 1)]
    product = " x ".join(f"mesh.{a} = {ici[a]}" for a in sized)
    slices = f" per slice ({num_devices} in all)" if num_slices > 1 else ""
    known = math.prod(v for v in ici.values() if v != -1)
    for axis, v in ici.items():
        if v == -1:
            if per_slice % known:
                sizes = f"{product} gives {known}, which" if len(sized) > 1 else product
                raise ConfigError(
                    _fields(sized),
                    f"{sizes} does not divide the {per_slice} devices{slices}, so mesh.{axis} = -1 has nothing to take",
                    f"choose sizes whose product divides {per_slice}" + more,
                )
            ici[axis] = per_slice // known
    if math.prod(ici.values()) != per_slice:
        raise ConfigError(
            _fields(sized),
            f"{' * '.join(MESH_AXES)} = {' * '.join(str(ici[a]) for a in MESH_AXES)} = {math.prod(ici.values())}, "
            f"but there are {per_slice} devices per slice ({num_devices} in all)",
            "make the product match, or set one axis to -1 to take the rest" + more,
        )
    return ici, dcn


def _fields(axes: list[str]) -> str:
    """The config field(s) an error is about: `mesh.tensor`, or `mesh (fsdp, tensor)`."""
    if len(axes) == 1:
        return f"mesh.{axes[0]}"
    return f"mesh ({', '.join(axes)})" if axes else "mesh"


def make_mesh(mesh_cfg: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = resolve_mesh_shape(mesh_cfg, len(devices), devices[0].platform)
    ici_shape = [ici[a] for a in MESH_AXES]
    dcn_shape = [dcn[a] for a in MESH_AXES]
    if math.prod(dcn_shape) > 1:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices, process_is_granule=devices[0].platform != "tpu"
        )
    else:
        try:
            from jax.experimental import mesh_utils

            device_array = mesh_utils.create_device_mesh(ici_shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            device_array = np.asarray(devices).reshape(ici_shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def check_divisible(shapes_and_axes, mesh: Mesh) -> None:
    """Every sharded dimension must divide evenly by its mesh axes; say which does not."""
    for path, shape, logical in shapes_and_axes:
        spec = logical_to_spec(logical, mesh)
        for dim, axes, name in zip(shape, spec, logical):
            if axes is None:
                continue
            size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % size:
                raise ConfigError(
                    "mesh",
                    f"parameter {path} dimension `{name}` = {dim} is not divisible by mesh axes {axes} of size {size}",
                    f"choose mesh sizes dividing {dim}, or change the model shape",
                )


def named(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh))
