"""What a checkpoint holds, from its headers alone: layout, components, architecture, dtypes, sizes, metadata, its
text-token rows, and any tensor whose shape the architecture inferred from the others cannot take."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from .checkpoint import (
    CheckpointFiles,
    FlashMetadata,
    TensorRef,
    component_quant,
    component_shapes,
    index_checkpoint,
    load_mmdit,
    load_vae,
    logical_component_shapes,
    packed_keys,
)
from .devices import resolve_device, resolve_dtype
from .errors import CheckpointError
from .vae import RELEASED_DOWNSCALE

COMPONENT_NAMES = {
    "mmdit": "MM-DiT",
    "vae": "VAE",
    "clip_l": "CLIP-L",
    "clip_g": "CLIP-G",
    "t5": "T5-XXL",
}


DEFAULT_IMAGE_SIZE = 1024  # the image side drawn when none is asked for, unless the model's largest is smaller
METADATA_SHOWN = 200  # characters of a metadata value that ``info`` prints; longer values are cut
SD3_ROWS = 77  # SD3's CLIP and T5 token rows (flash_core.text CLIP_LENGTH, T5_DEFAULT_LENGTH)


def vae_downscale(files: CheckpointFiles) -> int:
    """Pixels per latent of the checkpoint's VAE (``VAEConfig.downscale_factor``: 8 for the released SD3 VAE, 1
    for the toy world's one-level VAE), from its headers; 8 when ``files`` holds no VAE."""
    if not files.has("vae"):
        return RELEASED_DOWNSCALE
    from .vae import VAEConfig

    return VAEConfig.from_state_dict(component_shapes(files, "vae")).downscale_factor


def largest_image_size(files: CheckpointFiles) -> int | None:
    """The largest image side the MM-DiT can make with this VAE: ``pos_embed_max_size * patch * downscale``
    (None without an MM-DiT). 16 px for the demo model, 6144 px for SD3.5 Medium, 3072 px for SD3.5 Large."""
    if not files.has("mmdit"):
        return None
    from .mmdit import MMDiTConfig

    config = MMDiTConfig.from_state_dict(logical_component_shapes(files, "mmdit"))
    return largest_side(config, vae_downscale(files))


def largest_side(config, downscale: int) -> int:
    """The largest image side an MM-DiT of ``config`` (an :class:`~.mmdit.MMDiTConfig`) makes with a VAE of
    ``downscale`` pixels per latent: its position table x its patch x the VAE's factor."""
    return config.pos_embed_max_size * config.patch_size * downscale


def native_image_size(largest: int | None) -> int:
    """The image side drawn when none is asked for (``sd35-flash generate`` and ``FlashPipeline.__call__``):
    1024, or the model's largest side when smaller (``largest``: :func:`largest_image_size`; the demo's 16 px).
    A released SD3.5 model (3072 px) gives 1024."""
    return DEFAULT_IMAGE_SIZE if largest is None else min(DEFAULT_IMAGE_SIZE, largest)


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


def dual_attention(layers: tuple[int, ...], depth: int) -> str:
    """The blocks with dual attention as block indices, and how many of how many: ``0-12 (13 of 24 blocks)``,
    ``0 (1 of 2 blocks)``, ``none (0 of 24 blocks)``."""
    indices = f"block {layers[0]}" if len(layers) == 1 else "blocks " + _layer_list(layers) if layers else "none"
    return f"{indices} ({len(layers)} of {depth} blocks)"


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
            "dual-attention layers": dual_attention(layers, config.depth),
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
    """The checkpoint's files, a :class:`ComponentInfo` per component and our metadata. A component whose
    architecture cannot be inferred gets that reason as its only detail (``problem``), not an error."""
    files = index_checkpoint(path)
    infos = []
    for component in COMPONENT_NAMES:
        if files.has(component):
            params, dtypes, nbytes = _summarise(files.components[component])
            try:
                details = component_details(files, component)
            except (CheckpointError, ValueError, KeyError, IndexError) as err:
                details = {"problem": f"the architecture cannot be inferred: {err}"}
            infos.append(ComponentInfo(component, params, dtypes, nbytes, details))
    return files, infos, FlashMetadata.from_safetensors(files.metadata, str(path))


def shape_problem(files: CheckpointFiles, component: str) -> str | None:
    """Why ``generate`` would refuse the component's tensors, from the headers alone: the strict key and shape
    check its loaders run (``checkpoint.load_mmdit`` / ``load_vae``, ``text.build_clip`` / ``build_t5``), here
    on meta tensors; None when every tensor fits the architecture inferred from the others."""
    from .text import build_clip, build_t5

    try:
        if component == "mmdit":
            load_mmdit(logical_component_shapes(files, "mmdit"), device="meta")
        elif component == "vae":
            load_vae(component_shapes(files, "vae"), device="meta")
        elif component == "t5":
            build_t5(logical_component_shapes(files, "t5"))
        else:
            build_clip(component_shapes(files, component), component)
    except (CheckpointError, ValueError, KeyError, IndexError, RuntimeError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def token_rows(path: str | os.PathLike, files: CheckpointFiles) -> tuple[int, int, str]:
    """``(CLIP row, T5 row, where from)``: the lengths the checkpoint's own tokenizers declare (a folder beside
    or in it, or embedded in its metadata: the demo's 12), else SD3's 77 and 77."""
    from .tokenizer_files import EmbeddedTokenizerError, own_row_lengths

    try:
        own = own_row_lengths(path, files.metadata)
    except EmbeddedTokenizerError as err:
        return SD3_ROWS, SD3_ROWS, f"SD3's: its embedded tokenizers are unusable ({err})"
    return own or (SD3_ROWS, SD3_ROWS, "SD3's: no tokenizers of its own")


def token_line(rows: tuple[int, int, str]) -> str:
    """How many context tokens the MM-DiT reads, with T5 off (the CLIP row) and on (CLIP + T5 rows)."""
    clip, t5, origin = rows
    return (f"  text tokens: CLIP rows of {clip}, T5 rows of {t5} ({origin}); T5 off: {clip} context tokens, "
            f"T5 on: {clip + t5}")


def cut(value: str, limit: int = METADATA_SHOWN) -> str:
    """``value`` up to ``limit`` characters; a longer one is cut there, with its length said."""
    return value if len(value) <= limit else f"{value[:limit]}… ({len(value)} chars)"


def metadata_lines(files: CheckpointFiles, metadata: FlashMetadata, clip_row: int) -> list[str]:
    """Our metadata, one line per key, each value cut to :data:`METADATA_SHOWN` characters. The T5 convention
    says the file's real CLIP row length; embedded tokenizers are summarised, not printed."""
    from .tokenizer_files import METADATA_KEY, EmbeddedTokenizerError, read_entry

    meta = metadata.to_safetensors()
    meta.pop("sd35_flash.format_version", None)
    if meta.get("sd35_flash.t5"):
        meta["sd35_flash.t5"] = _t5_convention(meta["sd35_flash.t5"], clip_row)
    raw = files.metadata.get(METADATA_KEY)
    if raw is not None:
        try:
            entry = read_entry(files.metadata)
            meta[METADATA_KEY] = f"embedded: {', '.join(entry)} ({len(raw) / 1000:.1f} KB)"
        except EmbeddedTokenizerError as err:
            meta[METADATA_KEY] = f"embedded but unusable, ignored ({err})"
    return [f"    {key.removeprefix('sd35_flash.')}: {cut(str(value))}" for key, value in sorted(meta.items())]


def _t5_convention(value: str, clip_row: int) -> str:
    """The stored T5 convention (``optional: 77 CLIP tokens when off``) with the file's own CLIP row length."""
    stored = re.search(r"(\d+) CLIP tokens", value)
    if stored is None or int(stored.group(1)) == clip_row:
        return value
    fixed = value[:stored.start(1)] + str(clip_row) + value[stored.end(1):]
    return f"{fixed} (the file says {stored.group(1)}; its tokenizers' rows are {clip_row})"


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def quantization_lines(files: CheckpointFiles, backends: bool = False) -> list[str]:
    """One line per quantized component: format, layers, group size and, with ``backends``, the runtime
    backend that would run it on this machine (``auto``: measured now, flash_core/quant/backends.py)."""
    from .quant import GROUPED, choose_backend

    lines = []
    for component in COMPONENT_NAMES:
        scheme = component_quant(files, component)
        if scheme is None:
            continue
        group = f", group {scheme.group_size}" if scheme.fmt in GROUPED else ""
        line = f"  {COMPONENT_NAMES[component]} quantization: {scheme.fmt}, {scheme.layers} layers{group}"
        if backends:
            device = resolve_device("auto")
            width = 1024
            if component == "mmdit":
                width = logical_component_shapes(files, "mmdit")["x_embedder.proj.weight"].shape[0]
            choice = choose_backend(scheme.fmt, device, resolve_dtype("auto", device), width=width)
            line += f"; runs here ({device.type}) through {choice.describe()}"
        lines.append(line)
    return lines


COMPUTE_ROWS = 1024  # the image tokens of a 512 px SD3 image: the rows ``info`` times a half GEMM on


def compute_lines(files: CheckpointFiles) -> list[str]:
    """On the CPU, how the MM-DiT's bf16 and fp16 Linear layers would run here (measured now:
    flash_core/compute.py), at its hidden width on :data:`COMPUTE_ROWS` rows."""
    if not files.has("mmdit") or resolve_device("auto").type != "cpu":
        return []
    from .compute import attention_choice, half_matmul_choice

    width = logical_component_shapes(files, "mmdit")["x_embedder.proj.weight"].shape[0]
    lines = [f"  compute here (cpu): {half_matmul_choice(dtype, width, COMPUTE_ROWS).describe()}"
             for dtype in (torch.bfloat16, torch.float16)]
    lines += [f"  compute here (cpu): {attention_choice(dtype, COMPUTE_ROWS).describe()}"
              for dtype in (torch.float32, torch.bfloat16)]
    return lines + [f"  compute here (cpu): {run_dtype('auto', torch.device('cpu'), files)[1]}"]


def run_dtype(dtype: str | torch.dtype, device: torch.device, files: CheckpointFiles) -> tuple[torch.dtype, str]:
    """The weight dtype a run of ``files`` uses, and why when ``auto`` chose it by measurement: on the CPU,
    :func:`.compute.auto_cpu_dtype` at the MM-DiT's width and fp32 size; elsewhere
    :func:`.devices.resolve_dtype` (the reason is then empty)."""
    if dtype != "auto" or device.type != "cpu" or not files.has("mmdit"):
        return resolve_dtype(dtype, device), ""
    from .compute import auto_cpu_dtype

    width = logical_component_shapes(files, "mmdit")["x_embedder.proj.weight"].shape[0]
    return auto_cpu_dtype(width, weight_bytes(files, "mmdit", torch.float32), COMPUTE_ROWS)


def describe_checkpoint(path: str | os.PathLike, backends: bool = False) -> str:
    """The report ``sd35-flash info`` prints (``backends``: also which quantization backend runs here)."""
    files, infos, metadata = inspect_checkpoint(path)
    lines = [f"{path}", f"  layout: {files.layout}"]
    problems = 0
    for info in infos:
        dtypes = ", ".join(f"{d} {c / info.parameters:.0%}" if len(info.dtypes) > 1 else d
                           for d, c in info.dtypes.items())
        lines.append(f"  {COMPONENT_NAMES[info.name]}: {_human(info.parameters)} parameters, {dtypes}, "
                     f"{info.nbytes / 2**30:.2f} GiB")
        lines.extend(f"    {key}: {value}" for key, value in info.details.items() if key != "problem")
        problem = info.details.get("problem") or shape_problem(files, info.name)
        if problem:
            problems += 1
            lines.append(f"    PROBLEM: {cut(problem, 400)}")
    if problems:
        lines.append(f"  PROBLEM: {problems} component{'s' if problems > 1 else ''} do{'' if problems > 1 else 'es'} "
                     "not fit the architecture inferred from the weights: generate refuses this file")
    lines.extend(quantization_lines(files, backends))
    if backends:
        lines.extend(compute_lines(files))
    absent = [COMPONENT_NAMES[c] for c in COMPONENT_NAMES if not files.has(c)]
    if absent:
        lines.append(f"  not in this checkpoint: {', '.join(absent)}")
    rows = token_rows(path, files)
    if files.has("mmdit") or files.has("clip_l") or files.has("clip_g"):
        lines.append(token_line(rows))
    meta = metadata_lines(files, metadata, rows[0])
    if meta:
        lines.append("  SD3.5-Flash metadata:")
        lines.extend(meta)
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
