"""Run by tests/test_classifier.py in a subprocess with 4 CPU devices: the noisy classifier on a
1-device and a 4-device mesh. Prints one JSON line.

- ``logits``: a batch of 16 through the jitted classifier with the batch sharded over the mesh;
- ``step``: one train step from the same state and batch: metrics and parameters, on 1 device
  and on 4 with ``training.fsdp=2`` (the batch split 4 ways, parameters 2 ways);
- ``accuracy``: every test digit's t, prediction and cross-entropy from ``mode=accuracy``'s
  evaluator (of ``test_classifier.LinearDigitsClassifier``), on 1 device with batches of 40 and
  on 4 with batches of 64.
"""

import json
import sys
import tempfile

import jax
import numpy as np

from diffusion_jax import config_lib, input_pipeline, sharding, train_step
from diffusion_jax.evaluators import accuracy
from tests import test_classifier


def _state_and_step(config, mesh):
    model = config_lib.make_model(config, 10)
    optimizer, lr_schedule = train_step.make_optimizer(config.optim)
    _, shardings = train_step.state_shardings(config, model, optimizer, (8, 8, 1), mesh)
    state = train_step.create_train_state(config, model, optimizer, (8, 8, 1), shardings)
    params = jax.device_put(test_classifier.random_params(state.params), shardings.params)
    state = state.replace(params=params, ema_params=jax.tree.map(jax.numpy.copy, params))
    step = train_step.make_train_step(
        config, model, config_lib.make_schedule(config), optimizer, lr_schedule, mesh, shardings
    )
    return model, state, step


def main():
    assert jax.device_count() == 4, jax.devices()
    result = {"logits": {}, "step": {}, "accuracy": {}}
    config = test_classifier.tiny_config()
    batch = next(
        input_pipeline.create_train_iterator(
            config.data, global_batch_size=config.training.batch_size, seed=0
        )
    )
    for name, num_devices, fsdp in (("1", 1, 1), ("4_fsdp2", 4, 2)):
        config = test_classifier.tiny_config(**{"training.fsdp": fsdp})
        config_lib.validate(config, num_devices=num_devices)
        mesh = sharding.make_mesh(fsdp, devices=jax.devices()[:num_devices])
        model, state, step = _state_and_step(config, mesh)
        global_batch = sharding.global_batch(mesh, batch)
        apply = jax.jit(lambda p, x, t, model=model: model.apply({"params": p}, x, t, train=False))
        t = np.arange(16, dtype=np.int32) * 3
        logits = apply(state.params, global_batch["image"], sharding.global_batch(mesh, t))
        result["logits"][name] = np.asarray(logits).tolist()
        state, metrics = step(state, global_batch)
        result["step"][name] = {
            "metrics": {k: float(v) for k, v in jax.device_get(metrics).items()},
            "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
        }
    for num_devices, batch_size in ((1, 40), (4, 64)):
        mesh = sharding.make_mesh(1, devices=jax.devices()[:num_devices])
        with tempfile.TemporaryDirectory() as workdir:
            ctx = test_classifier.linear_context(workdir, mesh, batch_size=batch_size)
            summary = accuracy.run(ctx)
            with np.load(ctx.eval_dir / "accuracy_step0.npz") as saved:
                examples = {key: saved[key].tolist() for key in saved.files}
        result["accuracy"][f"{num_devices}x{batch_size}"] = {
            "summary": summary,
            "examples": examples,
        }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
