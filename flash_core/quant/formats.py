"""The weight formats and their math: quantize, pack, unpack and dequantize one Linear weight.

Formats (``w`` is one Linear weight ``[out, in]``; ``scale`` is kept, never the float weight):

========  ==========================================  ==========================================
format    stored ``<layer>.weight``                   scale
========  ==========================================  ==========================================
int8      int8 ``[out, in]``, ``q = round(w / s)``     ``weight_scale`` fp32 ``[out]`` (per output channel)
fp8       float8_e4m3fn ``[out, in]``, ``w / s``       ``scale_weight`` fp32 scalar (ComfyUI's scaled-fp8 layout)
int6      uint8 ``[out, 3 * in / 4]`` (two planes)     ``weight_scale`` fp16 ``[out, in / group]``
int4      uint8 ``[out, in / 2]`` (two per byte)       ``weight_scale`` fp16 ``[out, in / group]``
========  ==========================================  ==========================================

The integer formats are symmetric: ``q`` in ``[-qmax, qmax]`` (127, 31, 7), stored with an offset of
``qmax + 1`` in the packed formats. int4 keeps element ``2j`` in the low nibble of byte ``j``; int6 keeps the
low four bits of every element as an int4 plane followed by the high two bits, four elements a byte. A group
never straddles rows; the group of a layer is ``gcd(group_size, in)``, so the packed tensor and its scale
alone give the logical shape (no shape table is needed to reload a file).

fp8 uses ComfyUI's own ``scaled_fp8`` layout (a ``scaled_fp8`` marker tensor beside the weights and one
``scale_weight`` per Linear), so ComfyUI's stock loaders read our fp8 files. ComfyUI (checked at a125cd8) has
no integer weight format, so int8 / int6 / int4 files load through this package (and its ComfyUI loader).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import FlashError

FORMATS = ("int8", "fp8", "int6", "int4")
BITS = {"int8": 8, "fp8": 8, "int6": 6, "int4": 4}
QMAX = {"int8": 127, "int6": 31, "int4": 7}
GROUPED = ("int6", "int4")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn
DEFAULT_GROUP_SIZE = 64
SCALE_KEY = {"int8": "weight_scale", "int6": "weight_scale", "int4": "weight_scale", "fp8": "scale_weight"}
STORED_DTYPE = {"int8": torch.int8, "fp8": FP8_DTYPE, "int6": torch.uint8, "int4": torch.uint8}
SCALE_DTYPE = {"int8": torch.float32, "fp8": torch.float32, "int6": torch.float16, "int4": torch.float16}
MIN_SCALE = 2.0**-14  # smallest normal fp16: a scale never underflows, an all-zero group stays exact
FP8_MARKER = "scaled_fp8"  # ComfyUI: a float8 tensor at the model root switches its loader to scaled-fp8 ops


class QuantError(FlashError, ValueError):
    """A quantization request that cannot be carried out (unknown format, bad group size)."""


def check_format(fmt: str, what: str = "format") -> str:
    if fmt not in FORMATS:
        raise QuantError(f"{what} '{fmt}' is not one of {', '.join(FORMATS)}")
    return fmt


def layer_group(in_features: int, group_size: int) -> int:
    """The group one layer uses: ``gcd(group_size, in)`` (the whole row when ``group_size`` is 0)."""
    return in_features if group_size <= 0 else math.gcd(group_size, in_features)


def can_quantize(fmt: str, in_features: int) -> bool:
    """int6 packs four elements into three bytes and int4 two into one; rows must fill whole bytes."""
    return in_features % {"int6": 4, "int4": 2}.get(fmt, 1) == 0


# ------------------------------------------------------------------------------------------------ packing


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, in]`` of values < 16 -> ``[out, in / 2]``: element ``2j`` low nibble, ``2j + 1`` high."""
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def pack_int6(u: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, in]`` of values < 64 -> ``[out, 3 * in / 4]``: the low-nibble int4 plane, then the high
    two bits of elements ``4j .. 4j + 3`` in byte ``j`` of the second plane (bit pairs 0-1, 2-3, 4-5, 6-7)."""
    high = u >> 4
    high_plane = high[:, 0::4] | (high[:, 1::4] << 2) | (high[:, 2::4] << 4) | (high[:, 3::4] << 6)
    return torch.cat((pack_int4(u & 15), high_plane), dim=1)


def unpack_int6(packed: torch.Tensor) -> torch.Tensor:
    in_features = packed.shape[1] * 4 // 3
    low = unpack_int4(packed[:, : in_features // 2])
    plane = packed[:, in_features // 2 :]
    high = torch.stack([(plane >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1).reshape(packed.shape[0], -1)
    return low | (high << 4)


def logical_in_features(fmt: str, stored_cols: int) -> int:
    return {"int6": stored_cols * 4 // 3, "int4": stored_cols * 2}.get(fmt, stored_cols)


# ------------------------------------------------------------------------------------- quantize / dequantize


@dataclass
class QuantizedWeight:
    """One Linear weight in a stored format: ``data`` (packed) and ``scale``, plus its logical shape."""

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], logical_in_features(self.fmt, self.data.shape[1])

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def _group_scale(w: torch.Tensor, fmt: str, group: int) -> torch.Tensor:
    """fp16 per-group scale ``amax / qmax`` ``[out, in / group]`` (what is stored, so the round trip is exact)."""
    amax = w.view(w.shape[0], -1, group).abs().amax(dim=-1)
    return (amax / QMAX[fmt]).clamp_min(MIN_SCALE).to(SCALE_DTYPE[fmt])


def quantize_weight(weight: torch.Tensor, fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeight:
    """Quantize a ``[out, in]`` weight (computed in fp32 on the weight's device)."""
    check_format(fmt)
    if weight.ndim != 2:
        raise QuantError(f"only 2-D Linear weights are quantized, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    out_features, in_features = w.shape
    if fmt == "fp8":
        scale = (w.abs().amax() / FP8_MAX).clamp_min(MIN_SCALE)
        return QuantizedWeight(fmt, (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.to(torch.float32))
    if fmt == "int8":
        scale = (w.abs().amax(dim=1) / QMAX[fmt]).clamp_min(MIN_SCALE)
        q = torch.round(w / scale[:, None]).clamp(-QMAX[fmt], QMAX[fmt])
        return QuantizedWeight(fmt, q.to(torch.int8), scale)
    if not can_quantize(fmt, in_features):
        raise QuantError(f"{fmt} needs an input width that fills whole bytes; got {in_features}")
    group = layer_group(in_features, group_size)
    scale = _group_scale(w, fmt, group)
    expanded = scale.float().repeat_interleave(group, dim=1)
    u = (torch.round(w / expanded).clamp(-QMAX[fmt], QMAX[fmt]) + (QMAX[fmt] + 1)).to(torch.uint8)
    return QuantizedWeight(fmt, pack_int6(u) if fmt == "int6" else pack_int4(u), scale)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[out, in]`` weight a stored layer stands for, in ``dtype``."""
    return dequantize_tensors(qw.fmt, qw.data, qw.scale, dtype)


def dequantize_tensors(fmt: str, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if fmt == "fp8":
        return data.to(dtype) * scale.to(dtype)
    if fmt == "int8":
        return data.to(dtype) * scale.to(dtype)[:, None]
    u = unpack_int6(data) if fmt == "int6" else unpack_int4(data)
    out_features, in_features = u.shape
    groups = scale.shape[1]
    q = u.to(dtype).sub_(QMAX[fmt] + 1).view(out_features, groups, in_features // groups)
    return q.mul_(scale.to(dtype)[:, :, None]).view(out_features, in_features)


# ------------------------------------------------------------------------------------------------ measuring


def quantized_nbytes(shape: tuple[int, int], fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes one ``[out, in]`` weight takes in ``fmt`` (packed data and scale), from its shape alone."""
    out_features, in_features = shape
    if fmt == "fp8":
        return out_features * in_features + 4
    if fmt == "int8":
        return out_features * in_features + 4 * out_features
    group = layer_group(in_features, group_size)
    return out_features * in_features * BITS[fmt] // 8 + 2 * out_features * (in_features // group)


def sd_nbytes(sd: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def relative_rms_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - reference|| / ||reference||`` in fp64: the velocity error the benchmark reports."""
    ref = reference.detach().double()
    return float((approx.detach().double() - ref).norm() / ref.norm().clamp_min(1e-30))

__all__ = [
    "BITS",
    "DEFAULT_GROUP_SIZE",
    "FORMATS",
    "FP8_DTYPE",
    "FP8_MARKER",
    "FP8_MAX",
    "GROUPED",
    "MIN_SCALE",
    "QMAX",
    "SCALE_DTYPE",
    "SCALE_KEY",
    "STORED_DTYPE",
    "QuantError",
    "QuantizedWeight",
    "can_quantize",
    "check_format",
    "dequantize",
    "dequantize_tensors",
    "layer_group",
    "logical_in_features",
    "pack_int4",
    "pack_int6",
    "quantize_weight",
    "quantized_nbytes",
    "relative_rms_error",
    "sd_nbytes",
    "unpack_int4",
    "unpack_int6",
]
