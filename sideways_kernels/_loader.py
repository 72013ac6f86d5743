"""Loads the compiled op library. Import never fails because a backend is
missing: ``backends()`` says what was built and why something was not."""
from __future__ import annotations

import importlib
import importlib.util

import torch

_cpp_error: str | None = None
try:
    importlib.import_module("sideways_kernels._C")
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _cpp_error = f"{type(exc).__name__}: {exc}"


def cpp_available() -> bool:
    """True when the compiled library (schemas and CPU kernels) is loaded."""
    return _cpp_error is None


def _cuda_kernels_registered() -> bool:
    if not cpp_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("sideways::weight_grad_accumulate", "CUDA")


def _triton_installed() -> bool:
    # find_spec, not import: importing triton costs ~70 MB and seconds, and a layer asks
    # for the backends at every pipeline run.
    return importlib.util.find_spec("triton") is not None


def backends() -> dict[str, bool | str]:
    """What this install can run: ``torch`` (always), ``cpp`` (compiled CPU kernels),
    ``cuda`` (compiled CUDA kernels and a visible GPU), ``triton`` (triton installed),
    and ``cpp_error`` with the reason the compiled library did not load, if it did not."""
    info: dict[str, bool | str] = {
        "torch": True,
        "cpp": cpp_available(),
        "cuda": _cuda_kernels_registered() and torch.cuda.is_available(),
        "triton": _triton_installed(),
    }
    if _cpp_error is not None:
        info["cpp_error"] = _cpp_error
    return info
