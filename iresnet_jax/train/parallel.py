"""Data parallelism with a device mesh: ``jax.make_mesh`` + ``NamedSharding`` + ``jit``.

The train state is replicated over the mesh axis ``"data"``; batches are split along their
leading axis. Under ``jit`` XLA inserts the gradient all-reduce (and computes BatchNorm
statistics over the global batch), so the loss is the same on one device or many. With
several processes (``jax.distributed.initialize()``), every process builds the same global
batch (batching is a pure function of the step) and contributes its slice.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes).

    The axis is of type ``Auto``: shardings propagate as in GSPMD, so model code needs no
    sharding annotations (``jax.make_mesh`` defaults to ``Explicit`` axes).
    """
    auto = (jax.sharding.AxisType.Auto,)
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=auto)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.size
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} is not divisible by the {n} devices of the "
                         "mesh; choose a multiple")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a global numpy batch on the mesh, split along the leading axis.

    Each process passes the same global batch and contributes the slice that belongs to
    its devices (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh)
    n_proc, index = jax.process_count(), jax.process_index()

    def put(x):
        x = np.asarray(x)
        check_batch_size(x.shape[0], mesh, "global batch size")
        if n_proc > 1:
            per = x.shape[0] // n_proc
            x = x[index * per:(index + 1) * per]
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Replicates a pytree of arrays on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
