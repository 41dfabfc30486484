"""Quantized checkpoints on disk: quantizing while reading, and ``sd35-flash quantize``.

The formats and the runtime live in :mod:`.quant`; this module reads checkpoints tensor by tensor (so a float
copy of a whole model never exists), writes the official single-file layout with the scheme in
``__metadata__``, and reports sizes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .checkpoint import (
    COMPONENTS,
    PREFIXES,
    CheckpointFiles,
    FlashMetadata,
    atomic_save,
    component_quant,
    component_state_dict,
    index_checkpoint,
    iter_tensors,
    logical_component_shapes,
)
from .errors import CheckpointError, FlashError
from .memory import release_heap
from .quant import (
    DEFAULT_GROUP_SIZE,
    QuantScheme,
    check_format,
    elide_pos_embed,
    quantize_state_dict,
    sd_nbytes,
    write_schemes,
)
from .tokenizer_files import written_tokenizer_metadata


def linear_names(files: CheckpointFiles, component: str) -> list[str]:
    """Names of the component's Linears, from a model built on the meta device from the headers."""
    from .quant import linear_layers

    shapes = logical_component_shapes(files, component)
    with torch.device("meta"):
        if component == "mmdit":
            from .mmdit import MMDiT, MMDiTConfig

            model = MMDiT(MMDiTConfig.from_state_dict(shapes))
        else:
            from transformers import T5EncoderModel

            from .text import infer_t5_config

            model = T5EncoderModel(infer_t5_config(shapes))
    return list(linear_layers(model))


def quantizable_state(files: CheckpointFiles, component: str, fmt: str | None, dtype: torch.dtype):
    """``(state dict, QuantScheme or None)``: as stored, or quantized to ``fmt`` while it is read (one tensor
    at a time, so the float copy never exists whole)."""
    stored = component_quant(files, component)
    if fmt is None or stored is not None:
        if fmt is not None and fmt != stored.fmt:
            raise FlashError(f"'{files.sources[component][0]}' stores the {component} in {stored.fmt}; it cannot "
                             f"be re-quantized to {fmt} (quantize the 16-bit file instead)")
        return component_state_dict(files, component, dtype), stored
    scheme = QuantScheme.default(component, check_format(fmt, "weights"))
    names = linear_names(files, component)
    if component in files.diffusers_keys:
        tensors = component_state_dict(files, component, dtype)
    else:
        tensors = iter_tensors(files.components[component], dtype)
    packed = quantize_state_dict(tensors, names, scheme)
    del tensors
    return own_memory(packed), scheme


def own_memory(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy the tensors that still view the file's memory map and give freed heap back to the system.

    safetensors hands out views of a private memory map of the whole file. One kept view (a bias, a norm)
    keeps the map, and with it every page read while quantizing, resident. Copies of the few float tensors
    let the map go; ``malloc_trim`` returns the heap that the per-layer fp32 temporaries left (glibc keeps it
    otherwise). Together they keep quantize-on-load's peak near the packed size (benchmarks/quantization.py).
    """
    out = {k: v if v.dtype in (torch.int8, torch.uint8) or v.element_size() == 1 else v.clone()
           for k, v in sd.items()}
    sd.clear()
    release_heap()
    return out


def quantize_checkpoint(source: str | os.PathLike, output: str | os.PathLike, *, fmt: str, t5_fmt: str | None = None,
                        group_size: int = DEFAULT_GROUP_SIZE, exclude: Iterable[str] | None = None,
                        progress: bool = True) -> str:
    """Write ``output``: ``source`` (any layout) as one official single file with the MM-DiT (and T5 when
    ``t5_fmt`` is given) quantized, the other parts as stored, our metadata kept and the scheme added. The
    source's own project-made tokenizers (a folder beside or in it, or already embedded) travel in the metadata
    (:mod:`.tokenizer_files`), so the copy works wherever it is moved. Returns the report ``sd35-flash quantize``
    prints."""
    output = Path(output)
    if output.suffix != ".safetensors":
        raise FlashError(f"output '{output}' must end in .safetensors")
    files = index_checkpoint(source)
    if not files.has("mmdit"):
        raise CheckpointError(f"'{source}' holds no MM-DiT (diffusion model) weights to quantize")
    if Path(source).resolve() == output.resolve():
        raise FlashError(f"output '{output}' is the input; write the quantized copy to another file")
    formats = {"mmdit": check_format(fmt), "t5": None if t5_fmt is None else check_format(t5_fmt, "--t5 format")}
    if formats["t5"] and not files.has("t5"):
        raise CheckpointError(f"'{source}' holds no T5 to quantize (--t5 {t5_fmt})")
    metadata = FlashMetadata.from_safetensors(files.metadata, str(source))
    tensors, schemes, lines = {}, {}, []
    for component in COMPONENTS:
        if not files.has(component):
            continue
        if formats.get(component):
            stored = component_quant(files, component)
            if stored is not None:
                raise CheckpointError(f"'{source}': the {component} is already quantized ({stored.fmt}); "
                                      "quantize the 16-bit file")
            scheme = QuantScheme.default(component, formats[component], group_size,
                                         exclude if component == "mmdit" else None)
            before = sum(r.dtype.itemsize * math.prod(r.shape) for r in files.components[component].values())
            sd = _quantize_component(files, component, scheme, progress)
            if component == "mmdit":
                sd = elide_pos_embed(sd, scheme)
            schemes[component] = scheme
            lines.append(f"  {component}: {scheme.fmt}, {scheme.layers} layers, {before / 2**30:.3f} GiB -> "
                         f"{sd_nbytes(sd) / 2**30:.3f} GiB ({sd_nbytes(sd) / before:.3f} of the input)")
        else:
            sd = component_state_dict(files, component)
        tensors.update({PREFIXES[component] + k: v for k, v in sd.items()})
    carried = component_quant(files, "t5") if files.has("t5") and not formats["t5"] else None
    if carried is not None:
        schemes["t5"] = carried
    raw = {**metadata.to_safetensors(), **write_schemes(schemes), **written_tokenizer_metadata(source, files.metadata)}
    atomic_save(tensors, output, raw)
    return "\n".join([f"wrote {output}", *lines])


def _quantize_component(files: CheckpointFiles, component: str, scheme: QuantScheme, progress: bool) -> dict:
    names = linear_names(files, component)
    refs = files.components[component]
    tensors = component_state_dict(files, component) if component in files.diffusers_keys else iter_tensors(refs)
    if not progress:
        return quantize_state_dict(tensors, names, scheme)
    from tqdm.auto import tqdm

    with tqdm(total=len(refs), desc=f"quantizing {component} to {scheme.fmt}", unit="tensor") as bar:
        return quantize_state_dict(tensors, names, scheme, progress=lambda n: bar.update(1))
