"""Run by tests/test_evaluate.py in a subprocess with 4 CPU devices: the same evaluation on a
1-device and a 4-device mesh. Prints one JSON line.

- ``bpd`` of the exact Gaussian denoiser over the digits test split (297 examples, batches of
  40 or 64: the last one padded): every example's bound, per mesh and batch size;
- ``generate`` with a tiny U-Net: the batch of every convolution in the compiled program, and
  the samples, per mesh;
- ``generate`` with classifier-free guidance: the collectives in the compiled program (the
  two branches of an example run on its device), and the samples, per mesh;
- ``mode=sample`` of 6 samples with ``eval.batch_size`` 500 on 4 devices: the batch of the
  network in the program it runs (the exact Gaussian denoiser), and the samples it saved.
"""

import dataclasses
import json
import re
import sys
import tempfile

import jax
import numpy as np

from diffusion_jax import config_lib, generate, sharding, train_step
from diffusion_jax.evaluators import bpd
from diffusion_jax.evaluators import samples as sample_mode
from tests import test_evaluate, test_guided_generation

COLLECTIVES = r"\b(all-to-all|collective-permute|all-gather|all-reduce|reduce-scatter)\b"


class RowCounting:
    """``model`` (a network with a U-Net's ``apply``), noting the batch of every call it is
    traced with."""

    def __init__(self, model):
        self.model, self.num_classes, self.batches = model, model.num_classes, set()

    def apply(self, variables, x_t, *args, **kwargs):
        self.batches.add(int(x_t.shape[0]))
        return self.model.apply(variables, x_t, *args, **kwargs)


def main():
    assert jax.device_count() == 4, jax.devices()
    result = {}
    for num_devices, batch_size in ((1, 40), (4, 40), (4, 64)):
        mesh = sharding.make_mesh(1, devices=jax.devices()[:num_devices])
        with tempfile.TemporaryDirectory() as workdir:
            ctx = test_evaluate.exact_gaussian_context(workdir, mesh, batch_size=batch_size)
            total = bpd.run(ctx)["total_bpd"]
            with np.load(ctx.eval_dir / f"bpd_step{ctx.step}.npz") as saved:
                examples = saved["example_bpd"].tolist()
        result[f"bpd_{num_devices}x{batch_size}"] = {"total": total, "examples": examples}
    for num_devices in (1, 4):
        mesh = sharding.make_mesh(1, devices=jax.devices()[:num_devices])

        config = test_evaluate.tiny_config()
        config_lib.validate(config, num_devices=num_devices)
        setup = config_lib.make_train_setup(config, 10)
        model = setup.model
        _, shardings = train_step.state_shardings(setup, (8, 8, 1), mesh)
        state = train_step.create_train_state(setup, (8, 8, 1), shardings, config.seed)
        generate_fn = generate.make_generate_fn(config, model, mesh, shardings.ema_params, 64)
        rng = jax.random.PRNGKey(3)
        hlo = generate_fn.lower(state.ema_params, rng, 0).compile().as_text()
        conv_batches = sorted(
            {int(b) for b in re.findall(r"= f32\[(\d+),\d+,\d+,\d+\]\{[^}]*\} convolution", hlo)}
        )
        samples = generate.to_host(generate_fn(state.ema_params, rng, 0))
        result[f"generate_{num_devices}"] = {
            "conv_batches": conv_batches,
            "samples": samples.tolist(),
        }
    for num_devices in (1, 4):
        mesh = sharding.make_mesh(1, devices=jax.devices()[:num_devices])
        config = test_evaluate.tiny_config(
            **test_guided_generation.CONDITIONAL,
            **test_guided_generation.GROUPS,
            **{"sampling.guidance": "classifier_free", "sampling.guidance_scale": 2.0},
        )
        config.sampling.num_steps = 10
        model = config_lib.make_model(config, 10)
        params = test_guided_generation.perturbed_params(config, model, mesh)
        generate_fn = generate.make_generate_fn(config, model, mesh, sharding.replicated(mesh), 64)
        hlo = generate_fn.lower(params, rng, 0).compile().as_text()
        result[f"guided_{num_devices}"] = {
            "collectives": sorted(set(re.findall(COLLECTIVES, hlo))),
            "samples": generate.to_host(generate_fn(params, rng, 0)).tolist(),
        }
    with tempfile.TemporaryDirectory() as workdir:
        ctx = test_evaluate.exact_gaussian_context(
            workdir, sharding.make_mesh(1), batch_size=500, num_timesteps=50
        )
        ctx.config.eval.num_samples = 6
        counting = RowCounting(ctx.model)
        sample_mode.run(dataclasses.replace(ctx, model=counting))
        saved = sample_mode.load_samples(sample_mode.sample_dir(ctx))
    result["sample_6_of_500"] = {"network_batches": sorted(counting.batches), "saved": len(saved)}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
