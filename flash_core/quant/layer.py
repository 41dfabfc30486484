"""The quantized Linear: a module that keeps its weight packed, and the helpers that find and swap Linears.

A :class:`QuantizedLinear` holds one stored weight (:class:`~.formats.QuantizedWeight`) as buffers and runs it
through its backend on every call: ``dequant`` unpacks the weight to the matmul dtype (the reference),
``int8mm`` hands int8 weights to ``torch._weight_int8pack_mm`` on the CPU (:mod:`.backends` picks one).
"""

from __future__ import annotations

import torch
from torch import nn

from ..mmdit import linear, matmul_dtype
from .formats import SCALE_KEY, QuantizedWeight, dequantize_tensors


class QuantizedLinear(nn.Module):
    """A Linear whose weight stays packed; ``forward`` runs it through the layer's backend.

    ``weight`` and the scale are buffers: ``.to(dtype)`` moves them between devices but never converts them
    (the bias, a parameter, follows the module's dtype as usual).
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, backend: str = "dequant"):
        super().__init__()
        self.fmt = qw.fmt
        self.out_features, self.in_features = qw.shape
        self.register_buffer("weight", qw.data)
        self.register_buffer(SCALE_KEY[qw.fmt], qw.scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.backend = backend
        self._int8_scales: torch.Tensor | None = None

    @property
    def scale(self) -> torch.Tensor:
        return getattr(self, SCALE_KEY[self.fmt])

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.fmt, self.weight, self.scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
                f"backend={self.backend}")

    def _apply(self, fn, recurse=True):
        stored = {name: buf.dtype for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, dtype in stored.items():
            if self._buffers[name].dtype != dtype:  # a dtype cast: undo it, keep the device move
                self._buffers[name] = self._buffers[name].to(dtype)
        self._int8_scales = None
        return self

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_tensors(self.fmt, self.weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "int8mm" and self.fmt == "int8" and x.device.type == "cpu":
            return self._int8mm(x)
        dtype = matmul_dtype(x)  # unpack straight to the dtype the matmul runs in (fp32 for bf16 on most CPUs)
        bias = None if self.bias is None else self.bias.to(dtype)
        return linear(x.to(dtype), self.dequantized_weight(dtype), bias).to(x.dtype)

    def _int8mm(self, x: torch.Tensor) -> torch.Tensor:
        if self._int8_scales is None or self._int8_scales.dtype != x.dtype:
            self._int8_scales = self.scale.to(x.dtype)
        out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight,
                                        self._int8_scales)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def quantized_layers(module: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantizedLinear)}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` (a dotted path) of ``root``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)

__all__ = [
    "QuantizedLinear",
    "linear_layers",
    "quantized_layers",
    "set_submodule",
]
