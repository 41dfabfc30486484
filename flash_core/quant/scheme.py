"""What a quantized file stores: the scheme of each component, its metadata, and the packed layers' checks.

A :class:`QuantScheme` says what to quantize in one component (format, group size, the layers kept in 16 bits);
:func:`quantize_module` applies it to a live model and :func:`quantize_state_dict` to a state dict read tensor
by tensor. The file describes itself in ``__metadata__["sd35_flash.quantization"]``: one entry per quantized
component, for example ``{"mmdit": {"format": "int4", "group_size": 64, "layers": 96, "exclude": [...]}}``.
The MM-DiT's fixed sin-cos ``pos_embed`` is left out of the file and rebuilt on load.

Reading is for untrusted files: the metadata is parsed within size limits (:func:`parse_schemes`), and the
packed tensors are checked against it (:func:`check_stored_scheme`, :func:`stored_layers`) before a model is
built from them (:func:`logical_shapes`, :func:`install_packed`, :func:`cast_unpacked`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError
from ..mmdit import sincos_pos_embed_table
from .formats import (
    DEFAULT_GROUP_SIZE,
    FORMATS,
    FP8_DTYPE,
    FP8_MARKER,
    GROUPED,
    SCALE_DTYPE,
    SCALE_KEY,
    STORED_DTYPE,
    QuantError,
    QuantizedWeight,
    can_quantize,
    check_format,
    layer_group,
    logical_in_features,
    quantize_weight,
)
from .layer import QuantizedLinear, linear_layers, set_submodule

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


# ------------------------------------------------------------------------------------- applying a scheme


def quantize_module(module: nn.Module, scheme: QuantScheme, backend: str = "dequant",
                    progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Replace every ``nn.Linear`` of ``module`` that the scheme does not exclude (and whose width the format
    can pack) by a :class:`QuantizedLinear`, layer by layer; returns the names replaced."""
    candidates = [(n, m) for n, m in linear_layers(module).items()
                  if not scheme.excludes(n) and can_quantize(scheme.fmt, m.in_features)]
    for i, (name, layer) in enumerate(candidates):
        qw = quantize_weight(layer.weight, scheme.fmt, scheme.group_size)
        bias = None if layer.bias is None else layer.bias.detach()
        set_submodule(module, name, QuantizedLinear(qw, bias, backend))
        if progress is not None:
            progress(i + 1, len(candidates))
    scheme.layers = len(candidates)
    return [n for n, _ in candidates]


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


# ------------------------------------------------------------------------------------- the pos_embed table


def elide_pos_embed(sd: dict[str, torch.Tensor], scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """Drop the MM-DiT's ``pos_embed`` when it is the fixed sin-cos table our engine rebuilds (to the stored
    dtype's precision), noting it in the scheme: 9 % of SD3.5 Medium's weights. fp8 files keep it (ComfyUI's
    stock loader reads its shape to detect the model)."""
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
    _, positions, hidden = entry["shape"]  # checked when read (parse_schemes)
    dtype = POS_EMBED_DTYPES[entry.get("dtype", "float32")]
    if any(t.is_meta for t in sd.values()):  # shapes only (architecture inference from headers)
        return {**sd, "pos_embed": torch.empty(entry["shape"], dtype=dtype, device="meta")}
    return {**sd, "pos_embed": sincos_pos_embed_table(hidden, math.isqrt(positions)).to(dtype)}


# ------------------------------------------------------------------------------------- files


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
        set_submodule(module, layer, QuantizedLinear(qw, bias, backend))
    return rest


def cast_unpacked(sd: Mapping[str, torch.Tensor], layers: Iterable[str], fmt: str, dtype, device) -> dict:
    """Move a stored state dict to ``device``, casting floating tensors to ``dtype`` except packed data and
    scales (their dtypes are the format)."""
    keep = {f"{layer}.{s}" for layer in layers for s in ("weight", SCALE_KEY[fmt])} | {FP8_MARKER}
    return {k: v.to(device) if k in keep or dtype is None or not v.is_floating_point() else v.to(device, dtype)
            for k, v in sd.items()}

__all__ = [
    "DEFAULT_EXCLUDE",
    "MAX_GROUP_SIZE",
    "MAX_LAYERS",
    "MAX_POS_EMBED_SIDE",
    "MAX_SCHEME_CHARS",
    "METADATA_KEY",
    "POS_EMBED_DTYPES",
    "QuantScheme",
    "cast_unpacked",
    "check_stored_scheme",
    "elide_pos_embed",
    "install_packed",
    "logical_shapes",
    "parse_schemes",
    "quantize_module",
    "quantize_state_dict",
    "read_schemes",
    "restore_pos_embed",
    "stored_layers",
    "write_schemes",
]
