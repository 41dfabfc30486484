"""Runtime backends: how a model's quantized Linears run on this machine, and which one is fastest.

Runtime backends (:data:`BACKENDS`): ``dequant`` unpacks a layer's weight to the compute dtype for each call
(portable, the reference); ``int8mm`` runs int8 weights through ``torch._weight_int8pack_mm`` (CPU);
``quanto`` hands the layers to optimum-quanto (qint8 / qint4 / qfloat8) when it is installed. ``auto``
times the candidates on a layer of the model's own width on the device and keeps the fastest.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from .formats import QuantError, quantize_weight
from .layer import QuantizedLinear, quantized_layers, set_submodule

BACKENDS = ("dequant", "int8mm", "quanto")
QUANTO_TYPES = {"int8": "qint8", "fp8": "qfloat8"}


def available_backends(fmt: str, device: torch.device) -> list[str]:
    """Backends that can run ``fmt`` on ``device``: always ``dequant``; ``int8mm`` for int8 on the CPU;
    ``quanto`` for int8 and fp8 when optimum-quanto is importable. (quanto's qint4 re-quantizes our int4 values
    with its own groups and zero points, which adds a second rounding error: int4 stays on ``dequant``.)"""
    out = ["dequant"]
    if fmt == "int8" and device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
        out.append("int8mm")
    if fmt in QUANTO_TYPES and quanto_available():
        out.append("quanto")
    return out


def quanto_available() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class BackendChoice:
    backend: str
    timings_ms: dict[str, float]
    reason: str

    def describe(self) -> str:
        if len(self.timings_ms) < 2:
            return f"{self.backend} ({self.reason})"
        fastest = min(self.timings_ms.values())
        table = ", ".join(f"{b} {t / fastest:.2f}" for b, t in sorted(self.timings_ms.items(), key=lambda kv: kv[1]))
        return f"{self.backend} ({self.reason}; time vs the fastest: {table})"


_CHOICES: dict[tuple, BackendChoice] = {}


def choose_backend(fmt: str, device: torch.device | str, dtype: torch.dtype, width: int = 1024,
                   requested: str = "auto", tokens: int = 256) -> BackendChoice:
    """The backend for ``fmt`` on ``device`` with ``dtype`` activations.

    ``requested`` (or ``$SD35_FLASH_QUANT_BACKEND``) other than ``auto`` is taken as it is when available.
    ``auto`` times each available backend on a random ``width x width`` layer and ``tokens`` rows (once per
    process and setting) and keeps the fastest.
    """
    device = torch.device(device)
    requested = os.environ.get("SD35_FLASH_QUANT_BACKEND", requested) if requested == "auto" else requested
    candidates = available_backends(fmt, device)
    if requested != "auto":
        if requested not in BACKENDS:
            raise QuantError(f"quantization backend '{requested}' is not one of auto, {', '.join(BACKENDS)}")
        if requested not in candidates:
            raise QuantError(f"backend '{requested}' cannot run {fmt} on {device.type} "
                             f"(available: {', '.join(candidates)})")
        return BackendChoice(requested, {}, "requested")
    if len(candidates) == 1:
        return BackendChoice(candidates[0], {}, "the only one for this format and device")
    key = (fmt, device.type, dtype, width, tokens)
    if key not in _CHOICES:
        timings = {b: _time_backend(b, fmt, device, dtype, width, tokens) for b in candidates}
        _CHOICES[key] = BackendChoice(min(timings, key=timings.get), timings,
                                      f"measured on {device.type} with {str(dtype).removeprefix('torch.')}")
    return _CHOICES[key]


def _time_backend(backend: str, fmt: str, device, dtype, width: int, tokens: int, reps: int = 3) -> float:
    """Milliseconds one call of a random quantized ``width x width`` layer takes through ``backend`` (only int8
    and fp8 have more than one backend to time, and both pack any width)."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(width, width).requires_grad_(False)
    layer.weight.copy_(torch.randn(width, width, generator=gen) / math.sqrt(width))
    holder = nn.Sequential(QuantizedLinear(quantize_weight(layer.weight, fmt), layer.bias.detach()))
    holder = set_backend(holder.to(device, dtype), backend, dtype)
    x = torch.randn(tokens, width, generator=gen).to(device, dtype)
    with torch.no_grad():
        holder(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            holder(x)
        _sync(device)
    return (time.perf_counter() - start) / reps * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_backend(module: nn.Module, backend: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Run the module's QuantizedLinears through ``backend`` (``quanto`` swaps int8 / fp8 layers for
    optimum-quanto's, made from the stored weights in ``dtype``, the compute dtype; other formats keep
    ``dequant``)."""
    if backend not in BACKENDS:
        raise QuantError(f"quantization backend '{backend}' is not one of {', '.join(BACKENDS)}")
    for name, layer in quantized_layers(module).items():
        if backend == "quanto" and layer.fmt in QUANTO_TYPES:
            set_submodule(module, name, _to_quanto(layer, dtype))
        else:
            layer.backend = backend
    return module


def _to_quanto(layer: QuantizedLinear, dtype: torch.dtype | None) -> nn.Module:
    import optimum.quanto as quanto

    weights = getattr(quanto, QUANTO_TYPES[layer.fmt])
    dtype = dtype or (layer.bias.dtype if layer.bias is not None else torch.float32)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=layer.weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight(dtype))
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    qlayer = quanto.QLinear.from_module(dense, weights=weights)
    quanto.freeze(qlayer)
    return qlayer

__all__ = [
    "BACKENDS",
    "QUANTO_TYPES",
    "BackendChoice",
    "available_backends",
    "choose_backend",
    "quanto_available",
    "set_backend",
]
