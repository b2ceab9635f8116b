"""Label dropout and the guidance wrappers, against a Gaussian mixture with one component per
class: its conditional and unconditional optimal denoisers and its exact class posterior
p(y | x_t) are closed forms (tests/closed_form.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffusion_jax import config_defaults, config_lib, sharding, train_step

N = 4096


# --- label dropout in training ----------------------------------------------------------------


def test_label_drop_depends_on_the_example_key_alone():
    keys = train_step._per_example_keys(jax.random.PRNGKey(0), jnp.int32(3), N)
    labels = jnp.arange(N, dtype=jnp.int32) % 10
    half = np.asarray(train_step.drop_labels(keys, labels, 0.5, 10))
    # About half, each independently (binomial: 4 standard deviations).
    assert abs((half == 10).mean() - 0.5) < 4 * 0.5 / np.sqrt(N)
    np.testing.assert_array_equal(half[half != 10], np.asarray(labels)[half != 10])
    # Computed in pieces (as on several devices) or whole: the same draws.
    pieces = [train_step.drop_labels(keys[i::4], labels[i::4], 0.5, 10) for i in range(4)]
    np.testing.assert_array_equal(np.stack(pieces, axis=1).reshape(-1), half)
    assert np.all(np.asarray(train_step.drop_labels(keys, labels, 1.0, 10)) == 10)
    np.testing.assert_array_equal(train_step.drop_labels(keys, labels, 0.0, 10), labels)


class _LabelEcho(nn.Module):
    """A "network" whose output is its label times a parameter: the loss sees every label."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, t, y, *, train):
        scale = self.param("scale", nn.initializers.ones, ())
        return jnp.zeros_like(x) + scale * y[:, None, None, None].astype(x.dtype)


def _first_step_fn(label_dropout, batch_size=16):
    """``labels -> metrics`` of the first train step of ``_LabelEcho`` on fixed images."""
    config = config_defaults.get_config()
    config.model.update(class_conditional=True, label_dropout=label_dropout)
    config.diffusion.num_timesteps = 50
    config.training.batch_size = batch_size
    model, schedule = _LabelEcho(), config_lib.make_schedule(config)
    optimizer, lr_schedule = train_step.make_optimizer(config.optim)
    mesh, image_shape = sharding.make_mesh(1), (2, 2, 1)
    _, shardings = train_step.state_shardings(config, model, optimizer, image_shape, mesh)
    step_fn = train_step.make_train_step(
        config, model, schedule, optimizer, lr_schedule, mesh, shardings
    )
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, *image_shape))
    state = train_step.create_train_state(config, model, optimizer, image_shape, shardings)

    def run(labels):
        inputs = {"image": images.astype(np.float32), "label": np.asarray(labels, np.int32)}
        fresh = jax.tree_util.tree_map(jnp.copy, state)  # the step donates its state
        return jax.device_get(step_fn(fresh, sharding.global_batch(mesh, inputs))[1])

    return run


def test_label_dropout_one_trains_on_the_null_label_only():
    """With p = 1 the step sees only the null label 10: the same loss and gradient as p = 0
    with every label set to 10, and different ones from p = 0 with the real labels (p = 1 is
    rejected by the config check; make_train_step takes it)."""
    labels = np.arange(16) % 10
    dropped = _first_step_fn(1.0)(labels)
    undropped = _first_step_fn(0.0)
    null, real = undropped(np.full(16, 10)), undropped(labels)
    for key in ("loss", "grad_norm"):
        assert dropped[key] == null[key]
        assert dropped[key] != pytest.approx(real[key], rel=0.1)


def test_label_dropout_needs_a_conditional_model():
    config = config_defaults.get_config()
    config.model.label_dropout = 0.1
    with pytest.raises(config_lib.ConfigError, match="needs 'model.class_conditional' True"):
        config_lib.validate(config)
    config.model.update(class_conditional=True, label_dropout=1.0)
    with pytest.raises(config_lib.ConfigError, match=r"label_dropout' must lie in \[0, 1\)"):
        config_lib.validate(config)
