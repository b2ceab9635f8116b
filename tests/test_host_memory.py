"""host_memory.reuse_freed_memory: XLA:CPU's freed buffers are reused, not faulted in again."""

import json
import os
import subprocess
import sys

import pytest

from diffusion_jax import host_memory

# Runs a jitted op whose 256 MiB result is deleted at once, 16 times, and prints the page faults
# of each run: without the setting glibc returns the result's memory to the kernel on free and
# faults in all of its pages (65,536 of 4 KiB) again on every run; with it, runs fault on none
# once the heap holds a free block that large (the first few runs here each take fresh memory,
# a varying number, as XLA releases buffers asynchronously and small blocks split free ones).
_RUNS = """
import json, resource, sys
from diffusion_jax import xla_flags
xla_flags.configure(reuse_freed_memory=sys.argv[1] == "reuse")  # the programs' flag
import jax, jax.numpy as jnp
x = jnp.zeros((64, 1024, 1024), jnp.float32)
add_one = jax.jit(lambda x: x + 1)
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    add_one(x).block_until_ready().delete()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
_PAGES = 64 * 1024 * 1024 * 4 // os.sysconf("SC_PAGE_SIZE")

glibc_only = pytest.mark.skipif(not host_memory._glibc(), reason="glibc's mallopt (Linux)")


def _python(code, *args, **env):
    """Runs ``code`` in a fresh interpreter (the settings are the process's) with ``env`` over
    this one's, less any ``GLIBC_TUNABLES``; returns its last line of output."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def _faults_per_run(mode):
    """The fewest page faults of a run after the second."""
    return min(json.loads(_python(_RUNS, mode, JAX_PLATFORMS="cpu"))[2:])


@glibc_only
def test_freed_buffers_are_reused_without_page_faults():
    assert _faults_per_run("reuse") < 0.02 * _PAGES
    # Not the default (it slows small models): glibc's own settings fault every page again.
    assert _faults_per_run("default") > 0.9 * _PAGES


@glibc_only
@pytest.mark.parametrize(
    "env",
    [
        {"JAX_PLATFORMS": "cuda"},
        {"JAX_PLATFORMS": "cpu,tpu"},
        {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},
    ],
)
def test_left_alone_on_accelerators_and_for_the_users_own_tunables(env):
    decide = "from diffusion_jax import host_memory; print(host_memory.reuse_freed_memory())"
    assert _python(decide, **env) == "False"
    assert _python(decide, JAX_PLATFORMS="cpu") == "True"
