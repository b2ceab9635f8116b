"""The README's library example, run as written, with a tiny U-Net in place of the user's."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import UNet

REPO = pathlib.Path(__file__).resolve().parents[1]


def _library_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using the library from your own JAX code\n", 1)[1]
    return re.match(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def _random_params(net, x, t, seed):
    """N(0, 0.2^2) parameters (the zero-initialised output layer would make outputs zero)."""
    shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, t, train=False))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes["params"]
    )


def test_library_example_compiles_once_for_all_parameters():
    net = UNet(
        ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, out_channels=1
    )
    x0 = jnp.round(jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 1)) * 255) / 127.5 - 1
    t = jnp.array([3, 500])
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    params, other_params = (_random_params(net, x0, t, seed) for seed in (0, 1))
    names = {"net": net, "params": params, "x0": x0, "t": t, "noise": noise}
    exec(_library_example(), names)

    assert names["terms"]["loss"].shape == (2,)
    generate, nll = names["generate"], names["nll"]
    samples, bpd = names["samples"], names["bpd"]
    assert samples.shape == (16, 4, 4, 1) and bpd.shape == (2,)
    other_samples = generate(other_params, jax.random.PRNGKey(0))
    other_bpd = nll(other_params, x0, jax.random.PRNGKey(1))["total_bpd"]
    # New parameters, same compiled programs, and the parameters do reach the network.
    assert generate._cache_size() == 1 and nll._cache_size() == 1
    assert np.all(np.isfinite(samples)) and np.all(np.isfinite(other_samples))
    assert np.abs(np.asarray(samples) - np.asarray(other_samples)).max() > 1e-3
    assert np.abs(np.asarray(bpd) - np.asarray(other_bpd)).max() > 1e-3
