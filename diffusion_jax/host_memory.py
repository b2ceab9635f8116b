"""glibc allocator settings for XLA:CPU, which must be in place before JAX starts a backend.

XLA:CPU allocates each run's temporary buffer (every activation a train step keeps for its
backward pass: about 5 GB for a DiT-S/2 step at batch 32) with ``malloc``, from its own worker
threads, and frees it when the run ends. glibc serves an allocation that large with a fresh
``mmap`` and returns it to the kernel on ``free``, so every step faults in and zeroes every
page again: 1.33 million page faults and 3.4-4.2 CPU-seconds in the kernel per DiT-S/2 step
on 2 cores (``bench/dit_vs_torch.py``; docs/networks.md). ``reuse_freed_memory`` makes glibc
keep what is freed and hand it out again: the same step then faults on no page and takes
7.2-7.5 instead of 9.9-10.5 s.

It is a trade, not a default: with one arena and no ``mmap``, every large block lives in one
heap, and ``malloc`` walks ever longer lists of free blocks of distinct sizes (glibc's large
bins; 17% of a profile's samples in ``_int_malloc``). A small model's step, whose many small
allocations never paid for page faults, gets slower: the digits U-Net (``configs/digits.py``)
21.9 instead of 18.6-19.0 s per 100 steps. The programs apply it with ``--reuse_freed_memory``
(``xla_flags.configure(reuse_freed_memory=True)``).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
    """Tells glibc's ``malloc`` to keep freed memory for reuse; returns whether it did.

    Three ``mallopt`` settings, which together keep a multi-gigabyte buffer freed by one XLA
    run in the process for the next: one arena for all threads (``M_ARENA_MAX`` 1: the other
    arenas' heaps cannot exceed 64 MiB and fall back to ``mmap``), no ``mmap`` for large blocks
    (``M_MMAP_MAX`` 0), no trimming of the heap's top (``M_TRIM_THRESHOLD`` -1). The costs: the
    process holds its peak memory until it exits (the next step needs it again anyway), and
    small models' steps get slower (above).

    Applied only on Linux with glibc, with JAX computing on the CPU (``JAX_PLATFORMS`` is
    ``cpu``, or no GPU/TPU plugin is installed: on an accelerator the large buffers live on
    the device, and one arena would serialise the input pipeline's threads' allocations), and
    ``GLIBC_TUNABLES`` not already choosing malloc settings. Call it before JAX starts a backend
    (the first computation): the arena setting holds only for threads started later.
    """
    if not _glibc() or _jax_may_use_an_accelerator():
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def _glibc() -> bool:
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def _jax_may_use_an_accelerator() -> bool:
    """Whether JAX may pick a GPU or TPU, decided without starting a backend: the platforms
    named in ``JAX_PLATFORMS`` (or ``jax.config``, where JAX is imported already), else whether
    an accelerator plugin (``jax_plugins``: CUDA, ROCm, ...) or ``libtpu`` is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
        platforms = sys.modules["jax"].config.jax_platforms or platforms
    if platforms:
        return any(p.strip() != "cpu" for p in platforms.split(","))
    if importlib.util.find_spec("libtpu") is not None:
        return True
    plugins = importlib.util.find_spec("jax_plugins")
    if plugins is not None and any(pkgutil.iter_modules(plugins.submodule_search_locations)):
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))
