"""Reading the weights files of PyTorch networks: one state dict (name -> array) from a
``.safetensors`` (the ``safetensors`` package's NumPy API: no torch needed), a ``.npz`` or a
PyTorch ``.pt``/``.pth``/``.bin`` (torch, where installed; ``weights_only``). The importers
(``inception``, ``dit_weights``, ``autoencoder_weights``) map the names onto Flax parameters.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import numpy as np
from etils import epath

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class WeightsNotFoundError(FileNotFoundError):
    """The weights file does not exist."""


class CheckpointError(ValueError):
    """The file is not a readable state dict, or not the one of the network asked for."""


def one_line(e: BaseException) -> str:
    """An exception as ``Type: first line of its message``."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def float32_array(value) -> np.ndarray:
    """A state-dict entry (NumPy array, or torch tensor of any float dtype: bfloat16 has no
    NumPy dtype, so tensors go through torch's float32) as a float32 NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def read(
    path, *, missing: str, torch_hint: str, where_to_get: str = "", torch_safe_globals=()
) -> Mapping:
    """The state dict in the file ``path``, by its extension.

    ``missing``: what ``WeightsNotFoundError`` says after "no" (e.g. "Inception weights"),
    followed by ``where_to_get``; ``torch_hint``: how to do without torch, said when a PyTorch
    file is given and torch is not installed; ``torch_safe_globals``: classes a PyTorch
    checkpoint may hold beside its tensors (e.g. ``argparse.Namespace``). PyTorch tensors come
    back as they are (callers turn them into NumPy arrays). Raises ``CheckpointError`` for an
    unreadable file or one that holds no mapping.
    """
    path = os.fspath(path)
    file = epath.Path(path)
    if not file.exists() or file.is_dir():
        raise WeightsNotFoundError(
            f"no {missing} at {path!r}" + (f": {where_to_get}" if where_to_get else "")
        )
    if path.endswith(".safetensors"):
        from safetensors.numpy import load

        try:
            return load(file.read_bytes())
        except Exception as e:  # safetensors raises its own SafetensorError, among others
            raise CheckpointError(
                f"{path}: not a readable .safetensors file ({one_line(e)}; NumPy has no "
                "bfloat16: convert such weights to float32)"
            ) from None
    if path.endswith(".npz"):
        try:
            with file.open("rb") as f, np.load(f, allow_pickle=False) as arrays:
                return {k: arrays[k] for k in arrays.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: not a readable .npz file ({one_line(e)})") from None
    if not path.endswith(TORCH_SUFFIXES):
        raise CheckpointError(f"{path}: expected a .safetensors, .npz, .pt, .pth or .bin file")
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading the PyTorch checkpoint {path} needs torch: {torch_hint}"
        ) from None
    try:
        with torch.serialization.safe_globals(list(torch_safe_globals)), file.open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, ...)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({one_line(e)})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state
