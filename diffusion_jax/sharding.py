"""Device mesh, sharding rules and host-local <-> global arrays.

The mesh has two axes: ``data`` and ``fsdp``. The batch is split over both (every device holds
``global_batch / num_devices`` examples). A parameter is sharded over ``fsdp`` along its
largest dimension divisible by the axis size, when it is large enough to be worth it
(FSDP / ZeRO-3 style: XLA all-gathers it for the forward pass and reduce-scatters its
gradient); with ``fsdp == 1`` everything is replicated (pure data parallelism).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**14  # parameters with fewer elements stay replicated


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A ``(num_devices // fsdp, fsdp)`` mesh with axes ``("data", "fsdp")``."""
    devices = jax.devices() if devices is None else devices
    if len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the number of devices ({len(devices)})")
    shape = (len(devices) // fsdp, fsdp)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        # Topology-unaware fallback (e.g. CPU devices of several processes).
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape, fsdp: int) -> P:
    """The partition spec of one parameter under the FSDP rule (see the module docstring)."""
    if fsdp == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(mesh: Mesh, abstract_tree):
    """NamedShardings of the FSDP rule over the mesh's ``fsdp`` axis for a pytree of parameters
    (or arrays shaped like them: EMA, optimizer state), given as arrays or ShapeDtypeStructs.
    Other state (step, RNG key, statistics) is replicated whatever its size."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda leaf: NamedSharding(mesh, param_spec(leaf.shape, fsdp)), abstract_tree
    )


def global_batch(mesh: Mesh, local_batch):
    """Assembles each process's host-local batch (numpy, leading axis) into global arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
