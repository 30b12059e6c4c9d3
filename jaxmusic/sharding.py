"""Device mesh and the one table that maps logical axes to mesh axes.

The mesh has three axes:

* ``data``   pure data parallelism: every shard holds whole parameters (multi-node: the
             axis that crosses nodes, where bandwidth is lowest);
* ``fsdp``   data parallelism with parameters, gradients and optimizer state sharded
             (ZeRO-3); batch rows are split over ``data`` x ``fsdp``;
* ``tensor`` tensor parallelism: heads, MLP width and vocabulary split across devices.

Models name their axes logically (`jaxmusic.nn`: ``embed``, ``heads``, ``mlp``, ...);
`LOGICAL_RULES` below is the only place in jaxmusic where logical names meet mesh axes.
Every other module asks this one for `PartitionSpec`s and `NamedSharding`s.

Multi-node: devices are ordered by process index, then device id, and the mesh is laid
out row-major, so the last axes (``fsdp``, ``tensor``) vary fastest and occupy consecutive
devices. With one process per GPU (or per node) and ranks assigned node by node (SLURM's
default block distribution), an ``fsdp x tensor`` group that divides a node's device
count therefore never leaves its node, and ``data`` spans nodes. `make_mesh` checks this
when it is told the node size.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxmusic.errors import UserError
from jaxmusic.trees import unflatten

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (empty: replicated). One table for parameters,
# optimizer state (which mirrors the parameters) and activations.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # activations and batches
    "batch": ("data", "fsdp"),    # rows of a batch; also audio chunk rows (one group per shard)
    "microbatch": (),             # the gradient-accumulation axis, scanned on every device
    "length": (),
    # parameters (see jaxmusic/models/*.py for what each name covers)
    "layers": (),                 # leading axis of stacked layers: scanned, never split
    "embed": ("fsdp",),
    "audio_embed": ("fsdp",),     # connector input (fused encoder features)
    "connector_mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "mel": (),
    "conv_in": ("tensor",),
    "conv_width": (),
    "positions": (),
}


# the logical axes of batches and activations; every other name in the table is a parameter's
ACTIVATION_AXES = ("batch", "microbatch", "length")


class ShardingError(UserError, ValueError):
    """A mesh or sharding request that cannot be satisfied."""


# ------------------------------------------------------------------------------ the mesh

def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Sizes of `MESH_AXES` from `shape` (missing axes are 1; at most one may be -1: the rest)."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh sizes must be positive, with at most one -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if n_devices % known:
            raise ShardingError(f"mesh {dict(shape)}: {n_devices} devices do not divide by {known}")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                            f"there are {n_devices}")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None, *,
              devices_per_node: int | None = None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh with Auto axis types over `devices` (default: all).

    `devices_per_node`, when known (multi-node launches), checks that each `fsdp x tensor`
    group stays inside one node.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    inner = sizes[1] * sizes[2]
    if devices_per_node and devices_per_node % inner and inner % devices_per_node:
        raise ShardingError(f"fsdp x tensor = {inner} neither divides nor is a multiple of the "
                            f"{devices_per_node} devices per node")
    if devices_per_node and inner > devices_per_node:
        log.warning("fsdp x tensor = %d spans nodes of %d devices: parameter all-gathers cross "
                    "the network", inner, devices_per_node)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered, dtype=object).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards (`batch` rows split over data x fsdp): the splice `groups`."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


# ------------------------------------------------------------------- logical -> physical

def logical_to_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None, *,
                    what: str = "array") -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry logical names (None: replicated).

    Raises if a name is not in `LOGICAL_RULES` or if one mesh axis would split two
    dimensions. With `shape`, a dimension its mesh axes do not divide is replicated
    instead (logged): correct, only less memory-efficient.
    """
    if shape is not None and len(shape) != len(axes):
        raise ShardingError(f"{what}: {len(axes)} logical axes {tuple(axes)} for shape {tuple(shape)}")
    used: dict[str, str] = {}
    spec = []
    for dim, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise ShardingError(f"{what}: logical axis {name!r} has no rule in jaxmusic.sharding.LOGICAL_RULES")
        mesh_axes = tuple(a for a in LOGICAL_RULES[name] if mesh.shape[a] > 1)
        for a in mesh_axes:
            if a in used:
                raise ShardingError(f"{what}: mesh axis {a!r} would split both {used[a]!r} and {name!r} "
                                    f"(logical axes {tuple(axes)})")
            used[a] = name
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if shape is not None and shape[dim] % size:
            log.warning("%s: dimension %d (%s, size %d) is not divisible by %s = %d; replicating it",
                        what, dim, name, shape[dim], "x".join(mesh_axes), size)
            mesh_axes = ()
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def param_axes(path: Sequence[str], variable: nnx.Variable) -> tuple[str, ...]:
    """A state entry's logical axes, with `layers` prepended for stacked layers."""
    axes = tuple(variable.get_metadata().get("axes") or ())
    ndim = len(variable.shape)
    if "layers" in path and len(axes) == ndim - 1:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        raise ShardingError(f"{'/'.join(path)}: logical axes {axes} do not match its shape "
                            f"{tuple(variable.shape)}")
    return axes


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
    """NamedShardings for an NNX state (e.g. of `nnx.eval_shape(...)`), as a pure dict."""
    flat = {}
    for path, variable in nnx.to_flat_state(abstract_state):
        path = tuple(str(k) for k in path)
        spec = logical_to_spec(param_axes(path, variable), mesh, variable.shape, what="/".join(path))
        flat[path] = NamedSharding(mesh, spec)
    return unflatten(flat)


def batch_sharding(mesh: Mesh, ndim: int, *, microbatched: bool = True) -> NamedSharding:
    """Sharding of a batch array: `[microbatch,] batch rows, ...` (trailing dims replicated)."""
    lead = ("microbatch", "batch") if microbatched else ("batch",)
    return NamedSharding(mesh, logical_to_spec(lead + (None,) * (ndim - len(lead)), mesh))


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """A stacked KV cache `[layers, rows, ...]`: rows split like the batch, layers and the rest whole."""
    return NamedSharding(mesh, logical_to_spec(("layers", "batch"), mesh))


def activation_sharding(mesh: Mesh) -> NamedSharding:
    """Activations between layers `[rows, ...]`: rows split like the batch, the rest whole."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh))


def replica_axes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes (of size > 1) that split batch rows while every device along them holds the same
    parameters: ``data``, the axis that crosses nodes. The train step (`jaxmusic.train.step`)
    keeps each replica's gradients apart through the microbatches and sums them once per step."""
    params = {a for name, axes in LOGICAL_RULES.items() if name not in ACTIVATION_AXES for a in axes}
    return tuple(a for a in LOGICAL_RULES["batch"] if a not in params and mesh.shape[a] > 1)


def replica_count(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in replica_axes(mesh))


def within_replica(sharding: NamedSharding) -> NamedSharding:
    """`sharding` without the replica axes: what one replica's share of an array is split over."""
    replicas = replica_axes(sharding.mesh)
    spec = []
    for entry in sharding.spec:
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in replicas)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def per_replica(sharding: NamedSharding) -> NamedSharding:
    """An array stacked over the replicas, `[replicas, ...]`, each laid out by `within_replica`: the
    replicas' copies of a parameter or gradient, or a batch's rows reshaped `[replicas, rows, ...]`."""
    replicas = replica_axes(sharding.mesh)
    lead = None if not replicas else replicas[0] if len(replicas) == 1 else replicas
    return NamedSharding(sharding.mesh, PartitionSpec(lead, *within_replica(sharding).spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_rows(mesh: Mesh, global_rows: int) -> slice:
    """The contiguous rows of a `global_rows` batch that this process must supply.

    Data loaders feed `jax.make_array_from_process_local_data` with exactly these rows.
    """
    sharding = batch_sharding(mesh, 1, microbatched=False)
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map((global_rows,)).values():
        starts.append(index[0].start or 0)
        stops.append(global_rows if index[0].stop is None else index[0].stop)
    start, stop = min(starts), max(stops)
    covered = sum(b - a for a, b in sorted(set(zip(starts, stops))))
    if covered != stop - start:
        raise ShardingError("this process's batch rows are not contiguous; order devices by process")
    return slice(start, stop)


def to_global(mesh: Mesh, local: Mapping[str, np.ndarray], global_rows: Mapping[str, int], *,
              microbatched: bool = True) -> dict[str, jax.Array]:
    """Process-local batch arrays -> global arrays sharded on their row axis.

    `global_rows[key]`: the global size of each array's row axis (axis 1 when
    `microbatched`, else 0); the other dimensions are the same on every process.
    """
    out = {}
    row_axis = 1 if microbatched else 0
    for key, value in local.items():
        sharding = batch_sharding(mesh, value.ndim, microbatched=microbatched)
        shape = list(value.shape)
        shape[row_axis] = global_rows[key]
        out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
    return out


def to_local(array: jax.Array) -> np.ndarray:
    """This process's rows (axis 0) of a row-sharded global array, in order: what `to_global`
    took from it (replicas of a shard, e.g. over the tensor axis, are read once)."""
    shards = {s.index[0].start or 0: s for s in array.addressable_shards}
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])
