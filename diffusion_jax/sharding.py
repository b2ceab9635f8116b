"""Device mesh, sharding rules and host-local <-> global arrays.

The mesh has three axes: ``data``, ``fsdp`` and ``tensor``, of shape
``(num_devices / (fsdp * tensor), fsdp, tensor)``. The batch is split over ``data`` and
``fsdp`` (every device holds ``global_batch / (num_devices / tensor)`` examples); the devices of
one ``tensor`` group see the same examples and split the network between them.

Parameters (and their EMA and optimizer state, which follow them) get up to two sharded dims:

- ``tensor`` (tensor parallelism, Megatron style: Shoeybi et al. 2019), decided by the
  parameter's layer name (``tensor_dim``). Layers of a column/row pair split the hidden units
  between them, so a device computes its part of the hidden layer from the whole input and the
  pair needs one all-reduce of its output, not the weights:

  * column-parallel (kernel and bias split along the output units): the DiT's ``attn/qkv``
    (along its heads axis: kernel ``[D, 3, heads, hd]``, bias ``[3, heads, hd]``) and
    ``mlp/fc1``, the U-Net's attention ``q``, ``k``, ``v`` (their output channels are the heads'
    channels, head ``i`` owning block ``i``, so contiguous blocks are whole heads when
    ``tensor`` divides the heads), the time MLPs' first layers (DiT ``t_embedder/mlp_0``, U-Net
    ``temb_dense0``);
  * row-parallel (kernel split along the input units, bias replicated: added once after the
    sum): ``attn/proj`` (heads axis, kernel ``[heads, hd, D]``), ``mlp/fc2``, ``proj_out``,
    ``mlp_2``, ``temb_dense1``.

  Every other kernel (adaLN modulations, convolutions, the U-Net's other Dense layers) is
  split like a row-parallel layer, along its input units (dim -2 of Dense ``[in, out]`` and
  Conv ``[h, w, in, out]``): its input is whole on every device, so each takes its slice for
  free and the output is all-reduced (a column split would leave the output split, and XLA
  carries that split on into the residual stream). Tables (``embedding``) are split along
  their features. The networks' first and last layers (``REPLICATED``) and other vectors
  (biases, norm scales) are replicated. A split needs ``tensor`` to divide the dim; otherwise
  the parameter is replicated, except where ``check_tensor_parallel`` refuses the network
  (heads, hidden units). At ``tensor`` = 2 the parameter bytes per device about halve.

  No activation sharding constraint is needed: with these specs XLA's sharding propagation
  keeps the activations between the pairs whole and, in the tiny DiT's compiled train step
  (``tests/test_tensor_parallel.py``), all-reduces each row-parallel output (attention
  projection, fc2, adaLN modulations, time MLP) once in the forward pass and each
  column-parallel input gradient once in the backward pass, with no all-gather of a weight and
  no all-to-all or permute. (Splitting the DiT's last layer, ``final_layer/linear``, too made
  XLA carry the split into the activations: 52 all-gathers, 14 permutes, 17 all-to-alls.)
- ``fsdp`` (FSDP / ZeRO-3 style: XLA all-gathers the parameter for the forward pass and
  reduce-scatters its gradient): the largest other dim divisible by the axis size, when the
  parameter is large enough to be worth it.

With ``fsdp == tensor == 1`` everything is replicated (pure data parallelism).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax.models.unet import attn_heads

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**14  # parameters with fewer elements are not sharded over fsdp

# Layer name -> what its split dim holds; see the module docstring.
COLUMN_PARALLEL = {
    "qkv": "attention heads",
    "fc1": "MLP hidden units",
    "q": "attention heads",
    "k": "attention heads",
    "v": "attention heads",
    "mlp_0": "time MLP hidden units",
    "temb_dense0": "time MLP hidden units",
}
ROW_PARALLEL = {
    "proj": "attention heads",
    "fc2": "MLP hidden units",
    "proj_out": "attention heads",
    "mlp_2": "time MLP hidden units",
    "temb_dense1": "time MLP hidden units",
}
# The networks' first and last layers stay whole: small, next to the activations (images,
# every token) that splitting them would move; XLA would all-gather them instead.
REPLICATED = ("x_embedder", "linear", "conv_in", "conv_out")
_HEADS_AXIS = {"qkv": -2, "proj": 0}  # the DiT's attention kernels have a heads axis
_CHANNEL_HEADS = ("q", "k", "v", "proj_out")  # the U-Net's: heads are blocks of channels


def make_mesh(fsdp: int = 1, devices=None, *, tensor: int = 1) -> Mesh:
    """A ``(num_devices // (fsdp * tensor), fsdp, tensor)`` mesh, axes ``("data", "fsdp",
    "tensor")``."""
    devices = jax.devices() if devices is None else devices
    if len(devices) % (fsdp * tensor):
        raise ValueError(
            f"fsdp={fsdp} x tensor={tensor} must divide the number of devices ({len(devices)})"
        )
    shape = (len(devices) // (fsdp * tensor), fsdp, tensor)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        # Topology-unaware fallback (e.g. CPU devices of several processes).
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the ``data`` and ``fsdp`` axes (replicated over
    ``tensor``)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _split_dim(names: tuple[str, ...], ndim: int) -> int | None:
    """The dim of a parameter (path ``names``, ``ndim`` dims) that the tensor rule splits,
    whether or not the axis size divides it; None: replicated over ``tensor``."""
    if len(names) < 2 or ndim == 0:
        return None
    layer, kind = names[-2], names[-1]
    if layer in REPLICATED:
        return None
    if layer in ROW_PARALLEL:
        return _HEADS_AXIS.get(layer, 0) % ndim if kind == "kernel" else None
    if layer in COLUMN_PARALLEL:
        return _HEADS_AXIS.get(layer, -1) % ndim
    if kind == "kernel" and ndim >= 2:
        return ndim - 2  # input units (Dense [in, out], Conv [h, w, in, out])
    return ndim - 1 if ndim >= 2 else None  # tables (nn.Embed [rows, features])


def tensor_dim(names: tuple[str, ...], shape, tensor: int) -> int | None:
    """The dim of the parameter at path ``names`` (e.g. ``("blocks_0", "attn", "qkv",
    "kernel")``) of ``shape`` split over a ``tensor`` axis of that size (the module docstring's
    rule), or None when it is replicated over it."""
    if tensor == 1:
        return None
    dim = _split_dim(tuple(names), len(shape))
    return dim if dim is not None and shape[dim] % tensor == 0 else None


def param_spec(shape, fsdp: int, tensor: int = 1, names: tuple[str, ...] = ()) -> P:
    """The partition spec of one parameter at path ``names`` (the tensor rule, then the FSDP
    rule on another dim; see the module docstring)."""
    spec = [None] * len(shape)
    split = tensor_dim(names, shape, tensor)
    if split is not None:
        spec[split] = "tensor"
    if fsdp > 1 and int(np.prod(shape)) >= MIN_SHARDED_SIZE:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if dim != split and shape[dim] % fsdp == 0:
                spec[dim] = "fsdp"
                break
    return P(*spec) if any(spec) else P()


def path_names(path) -> tuple[str, ...]:
    """The dict keys of a pytree path: a parameter's names, also inside optimizer state."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_shardings(mesh: Mesh, abstract_tree):
    """NamedShardings of the tensor and FSDP rules over the mesh for a pytree of parameters
    (or arrays shaped like them: EMA, optimizer state, whose leaves carry the parameter's path),
    given as arrays or ShapeDtypeStructs. Other state (step, RNG key, statistics) is
    replicated whatever its size."""
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape.get("tensor", 1)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, param_spec(leaf.shape, fsdp, tensor, path_names(path))
        ),
        abstract_tree,
    )


def tracing_mesh(mesh: Mesh):
    """Context manager under which a jitted function is traced for ``mesh``: inside it the
    networks may split their intermediates the way the mesh's rules say
    (``constrain_layers``, ``constrain_batch``)."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain_layers(stacked):
    """A pytree of per-layer parameters stacked on a new leading axis ([L, *shape], the leaves'
    paths a layer's: ``("attn", "qkv", "kernel")``), each split as one layer's parameter is
    (``param_spec``), the layer axis whole; unchanged outside ``tracing_mesh`` (or under a mesh
    without this module's axes).

    Without it, GSPMD leaves a ``lax.scan`` over the layers free to gather the carried
    activations of the whole batch in every step instead of that layer's weights (DiT-XL/2,
    FSDP over 8: 7,913 MiB per device against 4,408; docs/networks.md).
    """
    mesh = _tracing_mesh()
    if mesh is None:
        return stacked
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jax.lax.with_sharding_constraint(
            leaf, P(None, *param_spec(leaf.shape[1:], fsdp, tensor, path_names(path)))
        ),
        stacked,
    )


def constrain_batch(x: jax.Array) -> jax.Array:
    """``x`` [B, ...] split over the batch axes (``batch_sharding``) inside ``tracing_mesh``;
    unchanged outside it."""
    if _tracing_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def _tracing_mesh():
    """The mesh of ``tracing_mesh`` (one with this module's axes), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else mesh


def check_tensor_parallel(model, abstract_params, tensor: int) -> None:
    """Raises ValueError, naming ``training.tensor_parallel``, unless ``tensor`` divides what
    the tensor rule splits in ``model`` (parameters ``abstract_params``): the attention heads
    (the DiT's heads axis; a U-Net's ``num_heads``, or channels / ``num_head_channels``, of every
    attention block) and the hidden units of the MLPs. A U-Net with attention of 1 head is
    refused for any ``tensor`` > 1: splitting its channels would split one head's dot products
    and all-reduce its [B, HW, HW] logits, the most expensive tensor in the network."""
    if tensor == 1:
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        names = path_names(path)
        if len(names) < 2 or names[-1] != "kernel":
            continue
        layer = names[-2]
        what = COLUMN_PARALLEL.get(layer) or ROW_PARALLEL.get(layer)
        if what is None:
            continue
        count = leaf.shape[_split_dim(names, leaf.ndim)]
        if layer in _CHANNEL_HEADS and hasattr(model, "num_head_channels"):
            count = attn_heads(model, leaf.shape[-1])
        if count % tensor:
            raise ValueError(
                f"Config key 'training.tensor_parallel' ({tensor}) must divide the {what} of "
                f"{'/'.join(names[:-1])} ({count}): tensor parallelism splits them over devices"
            )


def global_batch(mesh: Mesh, local_batch):
    """Assembles each process's host-local batch (numpy, leading axis) into global arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
