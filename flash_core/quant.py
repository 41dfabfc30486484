"""Weight-only quantization of the MM-DiT and T5 Linears (ALGORITHM.md "Quantization").

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

The file describes itself in ``__metadata__["sd35_flash.quantization"]``: one entry per quantized component,
for example ``{"mmdit": {"format": "int4", "group_size": 64, "layers": 96, "exclude": [...]}}``.

Runtime backends (:data:`BACKENDS`): ``dequant`` unpacks a layer's weight to the compute dtype for each call
(portable, the reference); ``int8mm`` runs int8 weights through ``torch._weight_int8pack_mm`` (CPU);
``quanto`` hands the layers to optimum-quanto (qint8 / qint4 / qfloat8) when it is installed. ``auto``
times the candidates on a layer of the model's own width on the device and keeps the fastest.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CheckpointError, FlashError

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
METADATA_KEY = "sd35_flash.quantization"
MAX_SCHEME_CHARS = 1 << 16  # a scheme is a few hundred characters: a longer value is not parsed
MAX_GROUP_SIZE = 1 << 16
MAX_LAYERS = 1 << 20  # packed layers (and exclude prefixes) a scheme may state
MAX_POS_EMBED_SIDE = 512  # an elided table is rebuilt from its stated shape (SD3.5 Medium's side is 384)
POS_EMBED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                    "float64": torch.float64}

# Layers kept in 16 bits unless told otherwise (the issue: "embedders and final layer excluded by default").
DEFAULT_EXCLUDE = {
    "mmdit": ("x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer"),
    "t5": (),
    "clip_l": (),
    "clip_g": (),
}
BACKENDS = ("dequant", "int8mm", "quanto")
QUANTO_TYPES = {"int8": "qint8", "fp8": "qfloat8"}


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


def quantized_nbytes(shape: tuple[int, int], fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes one ``[out, in]`` weight takes in ``fmt`` (packed data and scale), from its shape alone."""
    out_features, in_features = shape
    if fmt == "fp8":
        return out_features * in_features + 4
    if fmt == "int8":
        return out_features * in_features + 4 * out_features
    group = layer_group(in_features, group_size)
    return out_features * in_features * BITS[fmt] // 8 + 2 * out_features * (in_features // group)


# ------------------------------------------------------------------------------------------- the module


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
        from .mmdit import linear, matmul_dtype

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


# ------------------------------------------------------------------------------------- whole models


@dataclass
class QuantScheme:
    """What to quantize in one component: the format, the group size (int6 / int4) and the name prefixes kept
    in 16 bits."""

    fmt: str
    group_size: int = DEFAULT_GROUP_SIZE
    exclude: tuple[str, ...] = ()
    layers: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_format(self.fmt)
        if self.group_size < 0:
            raise QuantError(f"group size must be 0 (whole row) or positive, got {self.group_size}")

    @classmethod
    def default(cls, component: str, fmt: str, group_size: int = DEFAULT_GROUP_SIZE,
                exclude: Iterable[str] | None = None) -> QuantScheme:
        return cls(fmt, group_size, tuple(DEFAULT_EXCLUDE.get(component, ()) if exclude is None else exclude))

    def excludes(self, name: str) -> bool:
        return any(name == p or name.startswith(p.rstrip(".") + ".") for p in self.exclude)

    def to_json(self) -> dict:
        out = {"format": self.fmt, "layers": self.layers, "exclude": list(self.exclude)}
        if self.fmt in GROUPED:
            out["group_size"] = self.group_size
        return {**out, **self.extra}


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def quantize_module(module: nn.Module, scheme: QuantScheme, backend: str = "dequant",
                    progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Replace every ``nn.Linear`` of ``module`` that the scheme does not exclude (and whose width the format
    can pack) by a :class:`QuantizedLinear`, layer by layer; returns the names replaced."""
    candidates = [(n, m) for n, m in linear_layers(module).items()
                  if not scheme.excludes(n) and can_quantize(scheme.fmt, m.in_features)]
    for i, (name, layer) in enumerate(candidates):
        qw = quantize_weight(layer.weight, scheme.fmt, scheme.group_size)
        bias = None if layer.bias is None else layer.bias.detach()
        _set_submodule(module, name, QuantizedLinear(qw, bias, backend))
        if progress is not None:
            progress(i + 1, len(candidates))
    scheme.layers = len(candidates)
    return [n for n, _ in candidates]


def quantized_layers(module: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantizedLinear)}


def quantize_state_dict(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        linear_names: Iterable[str], scheme: QuantScheme,
                        progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """The stored form of a state dict: the weights of the named Linears (unless excluded, or of a width the
    format cannot pack) as packed data and scale, every other tensor as it is.

    ``tensors`` may be a mapping or an iterator of ``(key, tensor)`` pairs read one at a time, so a model is
    quantized while it is read and its float copy never exists whole. ``progress(n)`` after each tensor.
    """
    targets = {n for n in linear_names if not scheme.excludes(n)}
    out: dict[str, torch.Tensor] = {}
    layers = 0
    for i, (key, tensor) in enumerate(tensors.items() if isinstance(tensors, Mapping) else tensors):
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer in targets and tensor.ndim == 2 and can_quantize(scheme.fmt, tensor.shape[1]):
            qw = quantize_weight(tensor, scheme.fmt, scheme.group_size)
            out[key], out[f"{layer}.{SCALE_KEY[scheme.fmt]}"] = qw.data, qw.scale
            layers += 1
        else:
            out[key] = tensor
        if progress is not None:
            progress(i + 1)
    if scheme.fmt == "fp8":
        out[FP8_MARKER] = torch.empty(0, dtype=FP8_DTYPE)
    scheme.layers = layers
    return out


def elide_pos_embed(sd: dict[str, torch.Tensor], scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """Drop the MM-DiT's ``pos_embed`` when it is the fixed sin-cos table our engine rebuilds (to the stored
    dtype's precision), noting it in the scheme: 9 % of SD3.5 Medium's weights. fp8 files keep it (ComfyUI's
    stock loader reads its shape to detect the model)."""
    from .mmdit import sincos_pos_embed_table

    stored = sd.get("pos_embed")
    if scheme.fmt == "fp8" or stored is None or stored.ndim != 3 or "x_embedder.proj.weight" not in sd:
        return sd
    side = math.isqrt(stored.shape[1])
    if side * side != stored.shape[1]:
        return sd
    table = sincos_pos_embed_table(stored.shape[2], side)
    tolerance = max(2 * torch.finfo(stored.dtype).eps, 1e-5)
    if (stored.float() - table).abs().max() > tolerance:
        return sd
    scheme.extra["pos_embed"] = {"table": "sincos", "shape": list(stored.shape), "dtype": str(stored.dtype)[6:]}
    return {k: v for k, v in sd.items() if k != "pos_embed"}


def restore_pos_embed(sd: Mapping[str, torch.Tensor], scheme: QuantScheme | None) -> dict[str, torch.Tensor]:
    """Put back a ``pos_embed`` that :func:`elide_pos_embed` left out."""
    entry = (scheme.extra.get("pos_embed") if scheme else None) or {}
    if entry.get("table") != "sincos" or "pos_embed" in sd:
        return dict(sd)
    from .mmdit import sincos_pos_embed_table

    _, positions, hidden = entry["shape"]  # checked when read (parse_schemes)
    dtype = POS_EMBED_DTYPES[entry.get("dtype", "float32")]
    if any(t.is_meta for t in sd.values()):  # shapes only (architecture inference from headers)
        return {**sd, "pos_embed": torch.empty(entry["shape"], dtype=dtype, device="meta")}
    return {**sd, "pos_embed": sincos_pos_embed_table(hidden, math.isqrt(positions)).to(dtype)}


# ------------------------------------------------------------------------------------- reading files


def read_schemes(metadata: Mapping[str, str], source: str) -> dict[str, QuantScheme]:
    """``component -> QuantScheme`` from a file's ``__metadata__`` (empty for a 16-bit file); a malformed entry
    is a :class:`CheckpointError` naming the file and the key (:func:`parse_schemes` says what is wrong)."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        return parse_schemes(raw)
    except ValueError as err:
        raise CheckpointError(f"'{source}': metadata '{METADATA_KEY}' {err}") from None


def parse_schemes(raw: str) -> dict[str, QuantScheme]:
    """The schemes of one ``sd35_flash.quantization`` value. The file is untrusted: anything but a JSON object of
    known components, each with a known format, a group size in [0, :data:`MAX_GROUP_SIZE`], a layer count, a
    short exclude list and a sane ``pos_embed`` entry, is a ``ValueError`` saying what (the value is never
    parsed beyond :data:`MAX_SCHEME_CHARS` characters)."""
    if not isinstance(raw, str) or len(raw) > MAX_SCHEME_CHARS:
        size = f"{len(raw)} characters" if isinstance(raw, str) else type(raw).__name__
        raise ValueError(f"is {size}; expected a JSON object of at most {MAX_SCHEME_CHARS} characters")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        if raw in ("bf16", "fp16", "fp32"):  # early files named their float dtype here
            return {}
        raise ValueError(f"is not JSON: {raw[:80]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must map components to formats, got {raw[:80]!r}")
    return {component: _parse_scheme(component, entry) for component, entry in value.items()}


def _is_count(value, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def _cut(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _parse_scheme(component: str, entry) -> QuantScheme:
    if component not in DEFAULT_EXCLUDE:
        raise ValueError(f"names component {_cut(component)}; expected {', '.join(DEFAULT_EXCLUDE)}")
    if not isinstance(entry, dict) or entry.get("format") not in FORMATS:
        raise ValueError(f"entry '{component}' needs a format (one of {', '.join(FORMATS)}), got {_cut(entry)}")
    group, layers = entry.get("group_size", DEFAULT_GROUP_SIZE), entry.get("layers", 0)
    exclude = entry.get("exclude", [])
    if not _is_count(group, MAX_GROUP_SIZE):
        raise ValueError(f"entry '{component}': group_size must be an integer in [0, {MAX_GROUP_SIZE}] "
                         f"(0: whole rows), got {_cut(group)}")
    if not _is_count(layers, MAX_LAYERS):
        raise ValueError(f"entry '{component}': layers must be an integer in [0, {MAX_LAYERS}], got {_cut(layers)}")
    if not (isinstance(exclude, list) and len(exclude) <= MAX_LAYERS
            and all(isinstance(p, str) and 0 < len(p) <= 256 for p in exclude)):
        raise ValueError(f"entry '{component}': exclude must be a list of layer-name prefixes, got {_cut(exclude)}")
    extra = {k: v for k, v in entry.items() if k not in ("format", "group_size", "exclude", "layers")}
    if "pos_embed" in extra:
        _check_pos_embed_entry(component, extra["pos_embed"])
    return QuantScheme(entry["format"], group, tuple(exclude), layers, extra)


def _check_pos_embed_entry(component: str, entry) -> None:
    """``{"table": "sincos", "shape": [1, side * side, hidden], "dtype": ...}`` (:func:`elide_pos_embed`), with a
    side of at most :data:`MAX_POS_EMBED_SIDE` patches: the table is rebuilt from it, so it must be sane."""
    shape = entry.get("shape") if isinstance(entry, dict) else None
    ok = (isinstance(entry, dict) and entry.get("table") == "sincos" and isinstance(shape, list) and len(shape) == 3
          and all(_is_count(n, MAX_POS_EMBED_SIDE**2 * 65536) for n in shape) and shape[0] == 1
          and 0 < math.isqrt(shape[1]) <= MAX_POS_EMBED_SIDE and math.isqrt(shape[1]) ** 2 == shape[1]
          and 0 < shape[2] <= 65536 and shape[2] % 4 == 0 and entry.get("dtype", "float32") in POS_EMBED_DTYPES)
    if not ok:
        raise ValueError(f"entry '{component}': pos_embed must be {{\"table\": \"sincos\", \"shape\": [1, side**2, "
                         f"hidden], \"dtype\": one of {', '.join(POS_EMBED_DTYPES)}}} with side <= "
                         f"{MAX_POS_EMBED_SIDE} and hidden a multiple of 4, got {_cut(entry)}")


def check_stored_scheme(sd: Mapping[str, torch.Tensor], scheme: QuantScheme, what: str) -> dict[str, tuple[int, int]]:
    """The scheme a file's metadata states against its tensors (``sd``: real or meta, official names): every
    packed layer in the stated format (:func:`stored_layers`), as many as ``layers`` says, each with the groups
    its ``group_size`` gives, and an elided ``pos_embed`` as wide as the model. A file whose metadata lies about
    its tensors is a :class:`CheckpointError` naming it and the key. Returns :func:`stored_layers`'s map."""
    where = f"{what}: metadata '{METADATA_KEY}'"
    layers = stored_layers(sd, scheme.fmt, what)
    if scheme.layers and len(layers) != scheme.layers:
        raise CheckpointError(f"{where} says {scheme.layers} {scheme.fmt} layers; the tensors hold {len(layers)}")
    if scheme.fmt in GROUPED:
        for layer, (_, inputs) in layers.items():
            groups = sd[f"{layer}.{SCALE_KEY[scheme.fmt]}"].shape[1]
            expected = inputs // layer_group(inputs, scheme.group_size)
            if groups != expected:
                raise CheckpointError(f"{where} says group_size {scheme.group_size}, which gives {expected} groups "
                                      f"for the {inputs} inputs of '{layer}.weight'; its scale holds {groups}")
    entry = scheme.extra.get("pos_embed")
    width = sd["x_embedder.proj.weight"].shape[0] if "x_embedder.proj.weight" in sd else None
    if entry and width is not None and entry["shape"][2] != width:
        raise CheckpointError(f"{where} says the elided pos_embed is {entry['shape'][2]} wide; the MM-DiT is {width}")
    return layers


def write_schemes(schemes: Mapping[str, QuantScheme]) -> dict[str, str]:
    return {METADATA_KEY: json.dumps({c: s.to_json() for c, s in schemes.items()})} if schemes else {}


def stored_layers(sd: Mapping[str, torch.Tensor], fmt: str, what: str) -> dict[str, tuple[int, int]]:
    """Check every packed layer of a component's state dict; returns ``layer -> logical (out, in)``.

    A layer is packed when its scale key (``weight_scale``, or ``scale_weight`` for fp8) is present. The
    stored dtype, the packed width and the scale's shape must agree with ``fmt``: anything else is a
    malformed file, reported with the key.
    """
    scale_key = SCALE_KEY[fmt]
    other = {k for k in SCALE_KEY.values() if k != scale_key}
    layers = {}
    for key, scale in sd.items():
        suffix = key.rpartition(".")[2]
        if suffix in other:
            raise CheckpointError(f"{what}: key '{key}' belongs to another format than the file's '{fmt}' "
                                  f"(expected '{scale_key}' scales)")
        if suffix != scale_key:
            continue
        layer = key[: -len(scale_key) - 1]
        wkey = f"{layer}.weight"
        if wkey not in sd:
            raise CheckpointError(f"{what}: '{key}' has no packed weight '{wkey}'")
        layers[layer] = _check_packed(sd[wkey], scale, fmt, wkey, key, what)
    return layers


def _check_packed(data, scale, fmt: str, wkey: str, skey: str, what: str) -> tuple[int, int]:
    if data.dtype != STORED_DTYPE[fmt]:
        raise CheckpointError(f"{what}: '{wkey}' is {data.dtype}, expected {STORED_DTYPE[fmt]} for {fmt}")
    if data.ndim != 2:
        raise CheckpointError(f"{what}: '{wkey}' has shape {list(data.shape)}, expected a 2-D packed weight")
    if scale.dtype != SCALE_DTYPE[fmt]:
        raise CheckpointError(f"{what}: '{skey}' is {scale.dtype}, expected {SCALE_DTYPE[fmt]} for {fmt}")
    out_features, cols = data.shape
    if fmt == "int6" and cols % 3:
        raise CheckpointError(f"{what}: '{wkey}' has {cols} packed columns; int6 packs 4 values in 3 bytes")
    in_features = logical_in_features(fmt, cols)
    expected = {"fp8": (), "int8": (out_features,)}.get(fmt)
    if fmt in GROUPED:
        ok = scale.ndim == 2 and scale.shape[0] == out_features and scale.shape[1] > 0 \
            and in_features % scale.shape[1] == 0
        if not ok:
            raise CheckpointError(f"{what}: '{skey}' has shape {list(scale.shape)}, expected [{out_features}, G] "
                                  f"with G dividing the layer's {in_features} inputs")
    elif tuple(scale.shape) != expected:
        raise CheckpointError(f"{what}: '{skey}' has shape {list(scale.shape)}, expected {list(expected)}")
    return out_features, in_features


def logical_shapes(sd: Mapping[str, torch.Tensor], layers: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Meta tensors with each packed weight's logical shape (and no scales): what architecture inference
    reads."""
    out = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    for layer, shape in layers.items():
        out[f"{layer}.weight"] = torch.empty(shape, device="meta")
        out.pop(f"{layer}.{next(k for k in SCALE_KEY.values() if f'{layer}.{k}' in out)}")
    out.pop(FP8_MARKER, None)
    return out


def install_packed(module: nn.Module, sd: Mapping[str, torch.Tensor], layers: Mapping[str, tuple[int, int]],
                   fmt: str, what: str, backend: str = "dequant") -> dict[str, torch.Tensor]:
    """Swap the named Linears of a (meta-built) ``module`` for QuantizedLinears holding the stored tensors;
    returns the rest of ``sd`` (biases included) for the usual strict load."""
    rest = dict(sd)
    rest.pop(FP8_MARKER, None)
    linears = linear_layers(module)
    for layer, shape in layers.items():
        target = linears.get(layer)
        if target is None:
            raise CheckpointError(f"{what}: '{layer}.weight' is packed but '{layer}' is not a Linear of the "
                                  "architecture inferred from the weights")
        if (target.out_features, target.in_features) != shape:
            raise CheckpointError(f"{what}: '{layer}.weight' unpacks to {list(shape)}, expected "
                                  f"[{target.out_features}, {target.in_features}]")
        qw = QuantizedWeight(fmt, rest.pop(f"{layer}.weight"), rest.pop(f"{layer}.{SCALE_KEY[fmt]}"))
        bias = rest.pop(f"{layer}.bias", None)
        if (bias is None) != (target.bias is None):
            raise CheckpointError(f"{what}: '{layer}.bias' is {'missing' if bias is None else 'unexpected'}")
        _set_submodule(module, layer, QuantizedLinear(qw, bias, backend))
    return rest


def cast_unpacked(sd: Mapping[str, torch.Tensor], layers: Iterable[str], fmt: str, dtype, device) -> dict:
    """Move a stored state dict to ``device``, casting floating tensors to ``dtype`` except packed data and
    scales (their dtypes are the format)."""
    keep = {f"{layer}.{s}" for layer in layers for s in ("weight", SCALE_KEY[fmt])} | {FP8_MARKER}
    return {k: v.to(device) if k in keep or dtype is None or not v.is_floating_point() else v.to(device, dtype)
            for k, v in sd.items()}


# ------------------------------------------------------------------------------------- backends


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
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(width, width).requires_grad_(False)
    layer.weight.copy_(torch.randn(width, width, generator=gen) / math.sqrt(width))
    holder = nn.Sequential(layer)
    quantize_module(holder, QuantScheme(fmt), backend="dequant")
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
            _set_submodule(module, name, _to_quanto(layer, dtype))
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


def sd_nbytes(sd: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def relative_rms_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - reference|| / ||reference||`` in fp64: the velocity error the benchmark reports."""
    ref = reference.detach().double()
    return float((approx.detach().double() - ref).norm() / ref.norm().clamp_min(1e-30))


__all__ = [
    "BACKENDS", "FORMATS", "QuantError", "QuantScheme", "QuantizedLinear", "QuantizedWeight", "choose_backend",
    "dequantize", "install_packed", "logical_shapes", "quantize_module", "quantize_state_dict", "quantize_weight",
    "quantized_nbytes", "read_schemes", "set_backend", "stored_layers", "write_schemes", "parse_schemes",
    "check_stored_scheme",
]
