"""What both programs (``train`` and ``evaluate``) do before any work: command-line flags for
devices and ``jax.distributed``, the XLA flags, the log filter, one-line flag errors.

The flags are defined when this module is imported, i.e. by the program's ``main`` module.
"""

from __future__ import annotations

import ast
import logging as pylogging
import os
import sys

from absl import flags, logging

from diffusion_jax import xla_flags

_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    None,
    "Number of CPU devices this process exposes (--xla_force_host_platform_device_count).",
)
_REUSE_FREED_MEMORY = flags.DEFINE_bool(
    "reuse_freed_memory",
    False,
    "CPU hosts with glibc: keep the memory XLA frees for the next step instead of faulting it in "
    "again (faster for models whose steps hold gigabytes of activations, e.g. a DiT-S/2 at "
    "batch 32; slower for small ones). See diffusion_jax/host_memory.py.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for jax.distributed; with --num_processes and --process_id. "
    "On TPU pods and SLURM use --distributed instead (auto-detected).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detected settings."
)


def init_runtime():
    """Log filter, device count and multi-process setup; must run before JAX initialises a
    backend."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    xla_flags.configure(
        cpu_devices=_CPU_DEVICES.value, reuse_freed_memory=_REUSE_FREED_MEMORY.value
    )
    import jax

    if _COORDINATOR.value or _DISTRIBUTED.value:
        if jax.config.jax_platforms in (None, "", "cpu"):
            # Collectives across the CPU devices of several processes, also without
            # --cpu_devices (the default implementation depends on the JAX version).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    logging.info(
        "JAX %s: process %d/%d, %d local / %d global devices (%s)",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )


class _QuietLibraries(pylogging.Filter):
    """Drops the INFO chatter of orbax and grain (one line per file written) from the log."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or not any(
            f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "grain")
        )


def parse_flags(argv):
    """absl's flag parsing, with a one-line error for a bad ``--config.*`` override."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        reason = str(e)
        try:  # ml_collections' unknown-key errors arrive as the repr of a message
            reason = str(ast.literal_eval(reason))
        except (ValueError, SyntaxError):
            pass
        sys.exit(f"error: bad command line: {' '.join(reason.split())}")


def run_or_exit(fn, errors: tuple[type[BaseException], ...]):
    """Returns ``fn()``; an exception of one of ``errors`` (bad input the user can fix) ends the
    program with its message as one line, ``error: ...``, and exit status 1."""
    try:
        return fn()
    except errors as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
