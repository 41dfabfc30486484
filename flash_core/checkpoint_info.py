"""What a checkpoint holds, from its headers alone: layout, components, architecture, dtypes, sizes, metadata."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

from .checkpoint import (
    CheckpointFiles,
    FlashMetadata,
    TensorRef,
    component_quant,
    component_shapes,
    index_checkpoint,
    logical_component_shapes,
    packed_keys,
)

COMPONENT_NAMES = {
    "mmdit": "MM-DiT",
    "vae": "VAE",
    "clip_l": "CLIP-L",
    "clip_g": "CLIP-G",
    "t5": "T5-XXL",
}


RELEASED_DOWNSCALE = 8  # pixels per latent of the released SD3 VAE: what ComfyUI's EmptySD3LatentImage assumes


def vae_downscale(files: CheckpointFiles) -> int:
    """Pixels per latent of the checkpoint's VAE (``VAEConfig.downscale_factor``: 8 for the released SD3 VAE, 1
    for the toy world's one-level VAE), from its headers; 8 when ``files`` holds no VAE."""
    if not files.has("vae"):
        return RELEASED_DOWNSCALE
    from .vae import VAEConfig

    return VAEConfig.from_state_dict(component_shapes(files, "vae")).downscale_factor


def largest_image_size(files: CheckpointFiles) -> int | None:
    """The largest image side the MM-DiT can make with this VAE: ``pos_embed_max_size * patch * downscale``
    (None without an MM-DiT). 16 px for the demo model, 3072 px for SD3.5 Medium."""
    if not files.has("mmdit"):
        return None
    from .mmdit import MMDiTConfig

    config = MMDiTConfig.from_state_dict(logical_component_shapes(files, "mmdit"))
    return config.pos_embed_max_size * config.patch_size * vae_downscale(files)


def architecture_name(config) -> str:
    """A released model's name when the shapes match one, else a description of the shapes."""
    from .mmdit import MMDiTConfig

    known = {
        "SD3.5 Medium (MM-DiT-X)": MMDiTConfig.sd35_medium(),
        "SD3.5 Large": MMDiTConfig.sd35_large(),
    }
    for name, reference in known.items():
        if config == reference:
            return name
    if config.depth == 24 and config.hidden_size == 1536 and not config.qk_norm and not config.dual_attention_layers:
        return "SD3 Medium"
    kind = "MM-DiT-X" if config.dual_attention_layers else "MM-DiT"
    return f"custom {kind}"


def _layer_list(layers: tuple[int, ...]) -> str:
    """``none``, ``5``, ``0-12`` for a contiguous run, else the list."""
    if not layers:
        return "none"
    if len(layers) == 1:
        return str(layers[0])
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


@dataclass
class ComponentInfo:
    name: str
    parameters: int
    dtypes: dict[str, int]
    nbytes: int
    details: dict[str, object] = field(default_factory=dict)


def _summarise(refs: dict[str, TensorRef]) -> tuple[int, dict[str, int], int]:
    count = Counter()
    params = nbytes = 0
    for ref in refs.values():
        numel = math.prod(ref.shape)
        params += numel
        nbytes += numel * ref.dtype.itemsize
        count[str(ref.dtype).removeprefix("torch.")] += numel
    return params, dict(count), nbytes


def component_details(files: CheckpointFiles, component: str) -> dict[str, object]:
    """Architecture facts inferred from shapes (no weights are read)."""
    if component == "mmdit":
        from .mmdit import MMDiTConfig

        config = MMDiTConfig.from_state_dict(logical_component_shapes(files, "mmdit"))
        layers = config.dual_attention_layers
        return {
            "architecture": architecture_name(config),
            "depth": config.depth,
            "hidden": config.hidden_size,
            "heads": config.num_heads,
            "dual attention layers": _layer_list(layers),
            "qk norm": "RMSNorm" if config.qk_norm else "none",
            "pos-embed table": f"{config.pos_embed_max_size}x{config.pos_embed_max_size}",
            "max resolution": f"{config.pos_embed_max_size * config.patch_size * vae_downscale(files)} px"
                              + ("" if files.has("vae") else " (with the released 8x VAE)"),
        }
    if component == "vae":
        from .vae import VAEConfig

        config = VAEConfig.from_state_dict(component_shapes(files, "vae"))
        return {"latent channels": config.latent_channels, "base channels": config.base_channels,
                "channel mult": config.channel_mult}
    refs = files.components[component]
    if component == "t5":
        embed = refs.get("shared.weight") or refs.get("encoder.embed_tokens.weight")
        layers = {k.split(".")[2] for k in refs if k.startswith("encoder.block.")}
        return {"width": embed.shape[1] if embed else "?", "layers": len(layers)}
    width = refs["text_model.embeddings.token_embedding.weight"].shape[1]
    layers = {k.split(".")[3] for k in refs if k.startswith("text_model.encoder.layers.")}
    return {"width": width, "layers": len(layers)}


def inspect_checkpoint(path: str | os.PathLike) -> tuple[CheckpointFiles, list[ComponentInfo], FlashMetadata]:
    files = index_checkpoint(path)
    infos = []
    for component in COMPONENT_NAMES:
        if files.has(component):
            params, dtypes, nbytes = _summarise(files.components[component])
            infos.append(ComponentInfo(component, params, dtypes, nbytes, component_details(files, component)))
    return files, infos, FlashMetadata.from_safetensors(files.metadata, str(path))


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def quantization_lines(files: CheckpointFiles, backends: bool = False) -> list[str]:
    """One line per quantized component: format, layers, group size and, with ``backends``, the runtime
    backend that would run it on this machine (``auto``: measured now, flash_core/quant.py)."""
    from .quant import GROUPED, choose_backend

    lines = []
    for component in COMPONENT_NAMES:
        scheme = component_quant(files, component)
        if scheme is None:
            continue
        group = f", group {scheme.group_size}" if scheme.fmt in GROUPED else ""
        line = f"  {COMPONENT_NAMES[component]} quantization: {scheme.fmt}, {scheme.layers} layers{group}"
        if backends:
            from .pipeline import resolve_device, resolve_dtype

            device = resolve_device("auto")
            width = 1024
            if component == "mmdit":
                width = logical_component_shapes(files, "mmdit")["x_embedder.proj.weight"].shape[0]
            choice = choose_backend(scheme.fmt, device, resolve_dtype("auto", device), width=width)
            line += f"; runs here ({device.type}) through {choice.describe()}"
        lines.append(line)
    return lines


def describe_checkpoint(path: str | os.PathLike, backends: bool = False) -> str:
    """The report ``sd35-flash info`` prints (``backends``: also which quantization backend runs here)."""
    files, infos, metadata = inspect_checkpoint(path)
    lines = [f"{path}", f"  layout: {files.layout}"]
    for info in infos:
        dtypes = ", ".join(f"{d} {c / info.parameters:.0%}" if len(info.dtypes) > 1 else d
                           for d, c in info.dtypes.items())
        lines.append(f"  {COMPONENT_NAMES[info.name]}: {_human(info.parameters)} parameters, {dtypes}, "
                     f"{info.nbytes / 2**30:.2f} GiB")
        lines.extend(f"    {key}: {value}" for key, value in info.details.items())
    lines.extend(quantization_lines(files, backends))
    absent = [COMPONENT_NAMES[c] for c in COMPONENT_NAMES if not files.has(c)]
    if absent:
        lines.append(f"  not in this checkpoint: {', '.join(absent)}")
    meta = metadata.to_safetensors()
    meta.pop("sd35_flash.format_version", None)
    if meta:
        lines.append("  SD3.5-Flash metadata:")
        lines.extend(f"    {key.removeprefix('sd35_flash.')}: {value}" for key, value in sorted(meta.items()))
    else:
        lines.append("  SD3.5-Flash metadata: none (not a checkpoint written by this project)")
    return "\n".join(lines)


def weight_bytes(files: CheckpointFiles, component: str, dtype=None) -> int:
    """Bytes the component's weights take in ``dtype`` (None: as stored), from the headers alone."""
    refs = files.components.get(component, {})
    packed = packed_keys(refs)
    return sum(math.prod(r.shape) * (dtype.itemsize if dtype is not None and r.dtype.is_floating_point
                                     and k not in packed else r.dtype.itemsize) for k, r in refs.items())


def loader_report(files: CheckpointFiles, *, source: str, weight_dtype=None, t5: str = "absent",
                  metadata: FlashMetadata | None = None) -> dict[str, object]:
    """What a loader detected, as the JSON the ComfyUI loader nodes show (web/js/flash_info.js): architecture,
    layout, components, whether T5 was loaded (``on``/``off``/``absent``), weight format, the student grid and
    sampler mode from the metadata, and the estimated weight memory per part."""
    metadata = metadata or FlashMetadata()
    architecture = None
    if files.has("mmdit"):
        details = component_details(files, "mmdit")
        architecture = details["architecture"]
        if architecture.startswith("custom"):
            architecture += f" (depth {details['depth']}, hidden {details['hidden']})"
    stored = Counter(str(r.dtype).removeprefix("torch.") for c in files.components.values() for r in c.values())
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    weight_format = (names.get(str(weight_dtype).removeprefix("torch."), str(weight_dtype)) if weight_dtype
                     else names.get(stored.most_common(1)[0][0], stored.most_common(1)[0][0]) if stored else None)
    text = [c for c in ("clip_l", "clip_g", "t5") if files.has(c) and (c != "t5" or t5 == "on")]
    memory = {"mmdit": weight_bytes(files, "mmdit", weight_dtype), "vae": weight_bytes(files, "vae"),
              "text_encoders": sum(weight_bytes(files, c, weight_dtype) for c in text)}
    memory = {k: v for k, v in memory.items() if v}
    memory["total"] = sum(memory.values())
    return {
        "file": source, "architecture": architecture, "layout": files.layout,
        "components": {c: files.has(c) for c in COMPONENT_NAMES}, "t5": t5,
        "weight_format": weight_format, "student_sigmas": metadata.student_sigmas,
        "sampler_mode": metadata.sampler_mode, "memory_bytes": memory,
    }
