"""XLA settings that must be in place before JAX starts a backend (the first computation).

Kept free of JAX imports so that programs can call it first thing.
"""

import os

from diffusion_jax import host_memory

# YNNPACK (XLA:CPU's default library for dots, convolutions and reductions in jaxlib 0.10) keeps
# the reductions only; dots and convolutions go to XLA's Eigen kernels (bench/unet.py,
# bench/dit_vs_torch.py: variant "ynn_reduce").
CPU_LIBRARY_FLAG = "--xla_cpu_experimental_ynn_fusion_type=reduce"
# XLA:CPU's default scheduler orders a program for concurrency, keeping many buffers live at
# once: its buffer assignment overstates what a memory-aware accelerator compiler needs and
# hides rematerialisation entirely (a DiT-XL/2 step of 4 blocks, batch 32 per device: 6019 MiB
# with or without remat; with this scheduler 4863 MiB without and 2947 MiB with).
CPU_MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _jaxlib_at_least(*version: int) -> bool:
    import jaxlib.version  # does not start a backend

    return jaxlib.version.__version_info__[: len(version)] >= version


def configure(
    cpu_devices: int | None = None,
    *,
    memory_scheduler: bool = False,
    reuse_freed_memory: bool = False,
) -> str:
    """Adds this project's XLA flags to ``XLA_FLAGS`` (keeping the user's); returns them.

    - ``cpu_devices``: expose that many CPU devices (``--xla_force_host_platform_device_count``).
    - XLA:CPU's own (Eigen) convolutions and dots instead of YNNPACK's (``CPU_LIBRARY_FLAG``):
      its weight-gradient convolutions make the U-Net's train step 1.1-3.6x slower by machine,
      its dots the DiT's 2-11% (``bench/unet.py``, ``bench/dit_vs_torch.py``); its reductions
      stay (without them XLA splits every row sum in two). CPU-only, ignored on accelerators;
      not set where the user chose a fusion type, nor for jaxlibs older than 0.10, which do not
      know the flag and would abort on it.
    - ``memory_scheduler``: XLA:CPU's memory-minimising scheduler (``CPU_MEMORY_SCHEDULER_FLAG``)
      instead of its concurrency-optimised one: for sizing programs by their buffer assignment
      (``bench/train.py --compile_only``), not for speed.
    - ``reuse_freed_memory``: glibc keeps the memory XLA:CPU frees for its next run
      (``host_memory.reuse_freed_memory``; CPU-only hosts with glibc): for steps that hold
      gigabytes of activations (a DiT-S/2 train step at batch 32: 7.2-7.5 instead of 9.9-10.5 s
      here); it makes small ones slower (the digits U-Net's by 15-18%), so it is not the default.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if cpu_devices:
        flags += f" --xla_force_host_platform_device_count={cpu_devices}"
    if "xla_cpu_experimental_ynn_fusion_type" not in flags and _jaxlib_at_least(0, 10):
        flags += f" {CPU_LIBRARY_FLAG}"
    if memory_scheduler and "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        flags += f" {CPU_MEMORY_SCHEDULER_FLAG}"
    os.environ["XLA_FLAGS"] = flags.strip()
    if reuse_freed_memory:
        host_memory.reuse_freed_memory()
    return os.environ["XLA_FLAGS"]
