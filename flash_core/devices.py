"""Which device and weight dtype a run uses: ``auto`` resolved, a named device checked before anything loads.

Shared by the pipeline, ``sd35-flash info`` (which backend would run a quantized layer here) and the CLI.
"""

from __future__ import annotations

import torch

from .errors import FlashError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def _device_backend(kind: str):
    """``(available, count)`` for an accelerator type torch knows how to use here, else None."""
    if kind == "mps":
        available = torch.backends.mps.is_available()
        return available, int(available)
    backend = getattr(torch, kind, None) if kind in ("cuda", "xpu") else None
    if backend is None or not hasattr(backend, "is_available"):
        return None
    available = backend.is_available()
    return available, backend.device_count() if available else 0


def resolve_device(device: str | torch.device = "auto", what: str = "device") -> torch.device:
    """``auto``: the first CUDA GPU, else the CPU. Any other device must exist on this machine: a
    :class:`FlashError` naming ``what`` (``--device`` for the CLI) says why not, before anything loads."""
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise FlashError(f"{what} '{text}' is not a device; expected {DEVICE_CHOICES}") from None
    if resolved.type == "cpu":
        return resolved
    backend = _device_backend(resolved.type)
    if backend is None:
        raise FlashError(f"{what} '{text}' is not supported; expected {DEVICE_CHOICES}")
    available, count = backend
    if not available:
        raise FlashError(f"{what} '{text}': this machine has no {resolved.type.upper()} device "
                         f"(torch {torch.__version__} finds none); use cpu or auto")
    if resolved.index is not None and resolved.index >= count:
        raise FlashError(f"{what} '{text}': this machine has {count} {resolved.type.upper()} device(s), "
                         f"{resolved.type}:0 to {resolved.type}:{count - 1}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it (fp16 otherwise), fp32 on the CPU. For a known model,
    :func:`.checkpoint_info.run_dtype` resolves the CPU's ``auto`` by measurement instead."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise FlashError(f"dtype '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
