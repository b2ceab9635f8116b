"""Run by tests/test_classifier.py in a subprocess with 4 CPU devices: the noisy classifier on a
4-device mesh, to compare with the same computations on 1 device in the test process. Prints
one JSON line.

- ``logits`` and ``step``: ``test_classifier.OneStep`` with ``training.fsdp=2`` (the batch split
  4 ways, large parameters 2 ways): the logits of its random parameters, and one train step's
  metrics and parameters;
- ``accuracy``: every test digit's t, prediction and cross-entropy from ``mode=accuracy``'s
  evaluator (of ``test_classifier.LinearDigitsClassifier``) with batches of 64.
"""

import json
import sys
import tempfile

import jax
import numpy as np

from diffusion_jax import sharding
from diffusion_jax.evaluators import accuracy
from tests import test_classifier


def main():
    assert jax.device_count() == 4, jax.devices()
    one_step = test_classifier.OneStep(fsdp=2)
    result = {"logits": one_step.logits().tolist()}
    state, metrics = one_step()
    result["step"] = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
    }
    with tempfile.TemporaryDirectory() as workdir:
        ctx = test_classifier.linear_context(workdir, sharding.make_mesh(), batch_size=64)
        summary = accuracy.run(ctx)
        with np.load(ctx.eval_dir / "accuracy_step0.npz") as saved:
            examples = {key: saved[key].tolist() for key in saved.files}
    result["accuracy"] = {"summary": summary, "examples": examples}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
