"""A network's parameters by module and its forward cost, without running it.

``python -m diffusion_jax.models summary --config=FILE [--config.KEY=VALUE ...]`` prints a table
of parameter counts by top-level module (a U-Net's ``down_0_block_0``, a DiT's ``blocks_0``,
...), a line ``parameters: N``, and a line with the forward pass's GFLOP for one example by XLA's
cost analysis (a multiply-add counts 2). Shapes only: nothing is initialised or compiled, so the
largest networks are summarised in seconds on a laptop.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion_jax import config_lib, input_pipeline


def abstract_inputs(config, model, batch: int = 1) -> tuple:
    """``(x, t, y)`` ShapeDtypeStructs of one call of ``model`` on ``batch`` examples of
    ``config``'s images (``y`` None for an unconditional network or a classifier)."""
    data = config.data
    x = jax.ShapeDtypeStruct((batch, data.image_size, data.image_size, data.channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    conditional = config.model.kind == "denoiser" and model.num_classes is not None
    return x, t, jax.ShapeDtypeStruct((batch,), jnp.int32) if conditional else None


def summarize(config, num_classes: int | None = None) -> dict:
    """``{"network", "modules": {name: parameters}, "parameters", "forward_gflop"}`` of the
    network of ``config`` (``num_classes``: the data set's, for a class-conditional network or
    a classifier)."""
    model = config_lib.make_model(config, num_classes)
    inputs = tuple(a for a in abstract_inputs(config, model) if a is not None)
    params = jax.eval_shape(
        lambda *inputs: model.init(jax.random.PRNGKey(0), *inputs, train=False), *inputs
    )["params"]
    modules = {
        name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
        for name, tree in params.items()
    }
    # XLA's cost analysis counts a loop's body once: scanned DiT blocks are counted unrolled.
    counted = model.clone(scan_blocks=False) if getattr(model, "scan_blocks", False) else model
    forward = lambda params, *inputs: counted.apply({"params": params}, *inputs, train=False)
    lowered = jax.jit(forward).lower(params, *inputs)
    return {
        "network": config.model.name if config.model.kind == "denoiser" else "classifier",
        "modules": modules,
        "parameters": sum(modules.values()),
        "forward_gflop": lowered.cost_analysis()["flops"] / 1e9,
    }


def format_summary(summary: dict) -> str:
    width = max(len(name) for name in summary["modules"])
    lines = [f"{'module':<{width}}  parameters"]
    lines += [f"{name:<{width}}  {count:>12,}" for name, count in summary["modules"].items()]
    lines.append(f"parameters: {summary['parameters']:,}")
    lines.append(f"forward GFLOP at batch 1 (XLA cost analysis): {summary['forward_gflop']:.3f}")
    return "\n".join(lines)


def main(config) -> str:
    config = config_lib.validate(config)
    _, num_classes = input_pipeline.dataset_spec(config.data)
    return format_summary(summarize(config, num_classes))
