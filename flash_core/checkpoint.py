"""Checkpoint I/O: official single files, split files and diffusers folders (sharded too); metadata; errors.

Layouts are described in docs/checkpoints.md. Everything is read with safetensors; pickle files are refused.
Tensors are indexed first (names, shapes and dtypes from the headers) and read only when needed, so
``sd35-flash info`` never loads weights and a component is read without touching the others.

Official names are the working names of this project: a diffusers MM-DiT or VAE is converted on load
(:mod:`.keymaps`), text encoders are in Hugging Face layout in every format.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write
from .errors import CheckpointError
from .keymaps import mmdit as mmdit_keys
from .keymaps import vae as vae_keys

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

# Official single-file prefixes (docs/checkpoints.md "Official single file").
MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}
# diffusers folder: component -> subfolder (docs/checkpoints.md "diffusers folder").
DIFFUSERS_FOLDERS = {
    "mmdit": "transformer",
    "vae": "vae",
    "clip_l": "text_encoder",
    "clip_g": "text_encoder_2",
    "t5": "text_encoder_3",
}
COMPONENTS = ("mmdit", "vae", "clip_l", "clip_g", "t5")
PREFIXES = {"mmdit": MMDIT_PREFIX, "vae": VAE_PREFIX, **TEXT_PREFIXES}

METADATA_PREFIX = "sd35_flash."
FORMAT_VERSION = 1

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Keys that identify model families we do not run, to say what a wrong file is.
_FOREIGN_FAMILIES = {
    "input_blocks.": "an SD1.x/SD2.x/SDXL UNet",
    "double_blocks.": "a Flux transformer",
    "down_blocks.": "a diffusers UNet",
    "model.diffusion_model.input_blocks.": "an SD1.x/SD2.x/SDXL UNet checkpoint",
    "model.diffusion_model.double_blocks.": "a Flux checkpoint",
}


# --------------------------------------------------------------------------------------------------------
# Reading safetensors files lazily


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives, and its header facts."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"'{path}' is a pickle file ({path.suffix}); pickle files can run code when loaded and are refused. "
            "Convert it to .safetensors (for example with safetensors.torch.save_file) and load that."
        )


def _open(path: Path):
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist or is not a file")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        detail = str(err)
        if "not fully covered" in detail or "incomplete" in detail:
            reason = "it is truncated (the header lists more bytes than the file holds); download it again"
        else:
            reason = f"it is not a safetensors file ({detail})"
        raise CheckpointError(f"cannot read '{path}': {reason}") from None


def index_file(path: str | os.PathLike, strip: str = "", add: str = "") -> dict[str, TensorRef]:
    """Header-only index of a safetensors file: ``{name: TensorRef}``, optionally re-prefixed."""
    path = Path(path)
    refs = {}
    with _open(path) as handle:
        for key in handle.keys():
            tensor_slice = handle.get_slice(key)
            dtype = _DTYPES.get(tensor_slice.get_dtype())
            if dtype is None:
                raise CheckpointError(f"'{path}' key '{key}' has dtype {tensor_slice.get_dtype()}, which torch cannot hold")
            name = add + (key[len(strip):] if strip and key.startswith(strip) else key)
            refs[name] = TensorRef(path, key, tuple(tensor_slice.get_shape()), dtype)
    return refs


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw ``__metadata__`` of a safetensors file (``{}`` if none)."""
    with _open(Path(path)) as handle:
        return dict(handle.metadata() or {})


def data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file: ``{key: (start, end)}`` from the file's start, read
    from its header (which :func:`index_file` has had safetensors check: offsets in order, covering the data)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    return {key: (base + entry["data_offsets"][0], base + entry["data_offsets"][1])
            for key, entry in header.items() if key != "__metadata__"}


READ_CHUNK = 64 * 2**20  # bytes of the file mapped into this process at a time while a tensor is read


def read_tensor(mapped: mmap.mmap, ref: TensorRef, span: tuple[int, int] | None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor (cast to ``dtype`` when given) copied out of the memory-mapped file into memory of its own, a
    :data:`READ_CHUNK` at a time, each chunk's pages dropped from this process once copied: the file's pages
    never pile up in the resident memory beside the tensors, and a cast writes the final tensor directly (the
    stored copy never exists whole beside it)."""
    out = torch.empty(ref.shape, dtype=dtype or ref.dtype)
    count, item = out.numel(), ref.dtype.itemsize
    if span is None or span[1] - span[0] != count * item or span[1] > len(mapped):
        raise CheckpointError(f"cannot read key '{ref.key}' of '{ref.file}': its header entry does not match the "
                              "file (changed or truncated since it was indexed)")
    flat, step = out.reshape(-1), READ_CHUNK // item
    for start in range(0, count, step):
        n = min(step, count - start)
        offset = span[0] + start * item
        flat[start:start + n].copy_(torch.frombuffer(mapped, dtype=ref.dtype, count=n, offset=offset))
        _drop_pages(mapped, offset, n * item)
    return out


def _drop_pages(mapped: mmap.mmap, offset: int, length: int) -> None:
    """Unmap ``[offset, offset + length)`` of ``mapped`` from this process's resident memory (the page cache
    keeps the file; the next read of those pages maps them again)."""
    start = offset - offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, offset + length - start)


def iter_tensors(refs: Mapping[str, TensorRef], dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", keep_dtype: Iterable[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time (floating ones cast to ``dtype`` when given, except the names in
    ``keep_dtype``), one file open at a time. Each is read into its own memory and cast at once, so a whole
    component's stored copy never exists beside its cast one (docs/checkpoints.md "Loading")."""
    keep = set(keep_dtype)
    by_file: dict[Path, list[tuple[str, TensorRef]]] = {}
    for name, ref in refs.items():
        by_file.setdefault(ref.file, []).append((name, ref))
    for file, items in by_file.items():
        offsets = data_offsets(file)
        with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            for name, ref in items:
                cast = dtype if dtype is not None and ref.dtype.is_floating_point and name not in keep else None
                yield name, read_tensor(mapped, ref, offsets.get(ref.key), cast).to(device)


def materialize(refs: Mapping[str, TensorRef], dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", keep_dtype: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Read the referenced tensors (floating ones cast to ``dtype`` when given, except ``keep_dtype``)."""
    return dict(iter_tensors(refs, dtype, device, keep_dtype))


def shapes_only(refs: Mapping[str, TensorRef]) -> dict[str, torch.Tensor]:
    """Meta tensors with the right shapes and dtypes: enough to infer an architecture without reading weights."""
    return {name: torch.empty(ref.shape, dtype=ref.dtype, device="meta") for name, ref in refs.items()}


# --------------------------------------------------------------------------------------------------------
# Layouts


@dataclass
class CheckpointFiles:
    """A checkpoint's tensors, split into components with official names (prefixes stripped).

    ``mmdit`` and ``vae`` keys are official names; text encoders are Hugging Face layout. ``sources`` says
    which file each component came from; ``metadata`` is our ``__metadata__`` (from the MM-DiT's file).
    """

    components: dict[str, dict[str, TensorRef]] = field(default_factory=dict)
    sources: dict[str, list[Path]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = ""
    diffusers_keys: set[str] = field(default_factory=set)   # components stored with diffusers names

    def has(self, component: str) -> bool:
        return bool(self.components.get(component))


def _classify_unprefixed(refs: Mapping[str, TensorRef]) -> str | None:
    """Which component a bare (prefix-free) file holds, or None."""
    keys = refs.keys()
    if "joint_blocks.0.context_block.attn.qkv.weight" in keys or "x_embedder.proj.weight" in keys:
        return "mmdit"
    if "transformer_blocks.0.attn.add_q_proj.weight" in keys and "pos_embed.proj.weight" in keys:
        return "mmdit_diffusers"
    if "decoder.conv_out.weight" in keys or "encoder.conv_in.weight" in keys:
        return "vae_diffusers" if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys) else "vae"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in keys or "shared.weight" in keys:
        return "t5"
    if "text_model.embeddings.token_embedding.weight" in keys:
        width = refs["text_model.embeddings.token_embedding.weight"].shape[1]
        return "clip_l" if width == 768 else "clip_g" if width == 1280 else "clip"
    return None


def _foreign_family(keys: Iterable[str]) -> str | None:
    for key in keys:
        for marker, family in _FOREIGN_FAMILIES.items():
            if key.startswith(marker):
                return family
    return None


def split_by_prefix(sd: Mapping[str, object], strict: bool = True) -> dict[str, dict[str, object]]:
    """A single-file state dict (or index) -> ``{component: {unprefixed key: value}}``, absent ones omitted.

    ``strict``: a key with none of the official prefixes is an error; otherwise it is ignored.
    """
    parts: dict[str, dict[str, object]] = {}
    for key, value in sd.items():
        component = next((c for c, prefix in PREFIXES.items() if key.startswith(prefix)), None)
        if component is not None:
            parts.setdefault(component, {})[key[len(PREFIXES[component]):]] = value
        elif strict:
            raise CheckpointError(f"key '{key}' has none of the official prefixes ({', '.join(PREFIXES.values())})")
    return parts


def _split_single_file(refs: dict[str, TensorRef], path: Path) -> CheckpointFiles:
    files = CheckpointFiles(layout="official single file")
    files.components = split_by_prefix(refs, strict=False)
    files.sources = {component: [path] for component in files.components}
    return files


def index_checkpoint(path: str | os.PathLike, component: str | None = None) -> CheckpointFiles:
    """Index a checkpoint in any supported layout: an official single file (with or without text encoders),
    a single component file (MM-DiT, VAE, CLIP or T5; official or diffusers names), or a diffusers folder.

    ``component`` names the slot a separate file was given for (``clip_l``, ``clip_g``, ...): a bare CLIP
    file then goes to that slot whatever its width (the text encoder checks the width it expects).
    """
    path = Path(path)
    if path.is_dir():
        return _index_diffusers_folder(path)
    refs = index_file(path)
    metadata = read_metadata(path)
    if any(k.startswith((MMDIT_PREFIX, VAE_PREFIX, "text_encoders.")) for k in refs):
        files = _split_single_file(refs, path)
    else:
        kind = _classify_unprefixed(refs)
        if kind is None:
            family = _foreign_family(refs)
            found = f"it looks like {family}" if family else f"its first keys are {sorted(refs)[:3]}"
            raise CheckpointError(
                f"'{path}' is not an SD3-class checkpoint: {found}; expected an MM-DiT "
                f"('{MMDIT_PREFIX}joint_blocks.0.context_block.attn.qkv.weight'), a VAE, or SD3 text encoders"
            )
        files = CheckpointFiles(layout="single component file")
        found = kind.removesuffix("_diffusers")
        if found in ("clip", "clip_l", "clip_g") and component in ("clip_l", "clip_g"):
            found = component
        elif found == "clip":
            width = refs["text_model.embeddings.token_embedding.weight"].shape[1]
            raise CheckpointError(
                f"'{path}' holds a CLIP text encoder of width {width}; SD3 uses CLIP-L (768) and CLIP-G (1280)"
            )
        files.components[found] = refs
        files.sources[found] = [path]
        if kind.endswith("_diffusers"):
            files.diffusers_keys.add(found)
    files.metadata = metadata
    _check_mmdit_family(files, path)
    return files


def _check_mmdit_family(files: CheckpointFiles, path: Path) -> None:
    mmdit = files.components.get("mmdit")
    if mmdit is None or "mmdit" in files.diffusers_keys:
        return
    required = "joint_blocks.0.context_block.attn.qkv.weight"
    if required not in mmdit:
        family = _foreign_family(f"{MMDIT_PREFIX}{k}" for k in mmdit)
        found = f"it looks like {family}" if family else "its diffusion model has no joint blocks"
        raise CheckpointError(
            f"'{path}' is not an SD3-class checkpoint: {found}; expected the key '{MMDIT_PREFIX}{required}'"
        )


def _index_component_folder(folder: Path) -> dict[str, TensorRef]:
    """All tensors of one diffusers component folder: a single file, or shards listed in an index json."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"'{indexes[0]}' is not a valid shard index (no 'weight_map'): {err}") from None
        refs = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if not shard_path.exists():
                raise CheckpointError(f"shard '{shard_path}' listed in '{indexes[0]}' is missing")
            refs.update(index_file(shard_path))
        missing = sorted(set(weight_map) - set(refs))
        if missing:
            raise CheckpointError(f"'{indexes[0]}' lists key '{missing[0]}', which none of its shards holds")
        return refs
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(pickles[0])
        raise CheckpointError(f"'{folder}' holds no .safetensors weights")
    refs = {}
    for file in files:
        refs.update(index_file(file))
    return refs


def _index_diffusers_folder(root: Path) -> CheckpointFiles:
    files = CheckpointFiles(layout="diffusers folder")
    for component, sub in DIFFUSERS_FOLDERS.items():
        folder = root / sub
        if not folder.is_dir():
            continue
        files.components[component] = _index_component_folder(folder)
        files.sources[component] = sorted({r.file for r in files.components[component].values()})
        if component in ("mmdit", "vae"):
            files.diffusers_keys.add(component)
    if not files.components:
        raise CheckpointError(
            f"'{root}' is a folder but not a diffusers SD3 folder: expected subfolders "
            f"{', '.join(DIFFUSERS_FOLDERS.values())} (at least '{DIFFUSERS_FOLDERS['mmdit']}')"
        )
    if files.has("mmdit"):
        files.metadata = read_metadata(files.sources["mmdit"][0])
    return files


# --------------------------------------------------------------------------------------------------------
# Whole-checkpoint key conversion


def official_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> diffusers names.

    A bare MM-DiT state dict (``joint_blocks...``) gives bare diffusers transformer keys; a single-file
    checkpoint (``model.diffusion_model.``, ``first_stage_model.``, ``text_encoders.*``) gives keys prefixed
    with the diffusers subfolder (``transformer.``, ``vae.``, ``text_encoder.``, ``text_encoder_2.``,
    ``text_encoder_3.``). Exactly inverted by :func:`diffusers_to_official`.
    """
    if not any(k.startswith((MMDIT_PREFIX, VAE_PREFIX, "text_encoders.")) for k in sd):
        return mmdit_keys.official_to_diffusers(sd)
    out: dict[str, torch.Tensor] = {}
    for component, part in split_by_prefix(sd).items():
        if component == "mmdit":
            part = mmdit_keys.official_to_diffusers(part)
        elif component == "vae":
            part = vae_keys.official_to_diffusers(part)
        folder = DIFFUSERS_FOLDERS[component]
        out.update({f"{folder}.{k}": v for k, v in part.items()})
    return out


def diffusers_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> official names; the inverse of :func:`official_to_diffusers`."""
    folder_to_component = {folder: comp for comp, folder in DIFFUSERS_FOLDERS.items()}
    if not any(k.split(".", 1)[0] in folder_to_component for k in sd):
        return mmdit_keys.diffusers_to_official(sd)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        folder, _, rest = key.partition(".")
        if folder not in folder_to_component:
            raise CheckpointError(f"key '{key}' does not start with a diffusers component folder "
                                  f"({', '.join(DIFFUSERS_FOLDERS.values())})")
        parts.setdefault(folder_to_component[folder], {})[rest] = value
    out: dict[str, torch.Tensor] = {}
    for component, part in parts.items():
        if component == "mmdit":
            part = mmdit_keys.diffusers_to_official(part)
        elif component == "vae":
            part = vae_keys.diffusers_to_official(part)
        out.update({PREFIXES[component] + k: v for k, v in part.items()})
    return out


def component_state_dict(files: CheckpointFiles, component: str, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read one component's tensors, converted to official names."""
    if not files.has(component):
        raise CheckpointError(f"the checkpoint has no {component} weights")
    sd = materialize(files.components[component], dtype, device, packed_keys(files.components[component]))
    if component in files.diffusers_keys:
        sd = (mmdit_keys if component == "mmdit" else vae_keys).diffusers_to_official(sd)
    return sd


def packed_keys(keys: Iterable[str]) -> set[str]:
    """Keys of quantized layers (packed weight and scale) and the fp8 marker: their dtype is their format, so
    reading never casts them (flash_core/quant/formats.py)."""
    from .quant import FP8_MARKER, SCALE_KEY

    out = set()
    for key in keys:
        head, _, tail = key.rpartition(".")
        if tail in SCALE_KEY.values():
            out.update((key, f"{head}.weight"))
        elif tail == FP8_MARKER:
            out.add(key)
    return out


def component_quant(files: CheckpointFiles, component: str):
    """The :class:`~.quant.QuantScheme` a component of ``files`` is stored in, or None for float weights. The
    scheme the metadata states is checked against the component's tensor headers
    (:func:`~.quant.check_stored_scheme`): a file whose metadata lies about its tensors is refused here."""
    from .quant import check_stored_scheme, read_schemes

    if not files.has(component):
        return None
    source = files.sources[component][0]
    metadata = files.metadata if component == "mmdit" else read_metadata(source)
    scheme = read_schemes(metadata, str(source)).get(component)
    if scheme is not None:
        check_stored_scheme(component_shapes(files, component), scheme, f"'{source}'")
    return scheme


def logical_component_shapes(files: CheckpointFiles, component: str) -> dict[str, torch.Tensor]:
    """:func:`component_shapes` with packed layers at their logical ``[out, in]`` shape (and an elided
    ``pos_embed`` put back): what architecture inference reads, for float and quantized files alike."""
    from . import quant

    shapes = component_shapes(files, component)
    scheme = component_quant(files, component)
    if scheme is None:
        return shapes
    layers = quant.stored_layers(shapes, scheme.fmt, f"'{files.sources[component][0]}'")
    return quant.logical_shapes(quant.restore_pos_embed(shapes, scheme), layers)


def component_shapes(files: CheckpointFiles, component: str) -> dict[str, torch.Tensor]:
    """Meta tensors (official names) for one component: architecture inference without reading weights."""
    sd = shapes_only(files.components[component])
    if component in files.diffusers_keys:
        sd = (mmdit_keys if component == "mmdit" else vae_keys).diffusers_to_official(sd)
    return sd


# --------------------------------------------------------------------------------------------------------
# Building modules from weights


def load_module_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True, assign=True)`` with errors that name the key and the expected shape."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise CheckpointError(f"{what}: missing key '{missing[0]}' (and {len(missing) - 1} more)"
                              if len(missing) > 1 else f"{what}: missing key '{missing[0]}'")
    if unexpected:
        raise CheckpointError(f"{what}: unexpected key '{unexpected[0]}'"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                              + "; the architecture inferred from the weights has no such parameter")
    for key, tensor in expected.items():
        if tuple(sd[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{what}: key '{key}' has shape {tuple(sd[key].shape)}, expected "
                                  f"{tuple(tensor.shape)} for the architecture inferred from the other weights")
    module.load_state_dict(dict(sd), strict=True, assign=True)


def load_mmdit(path_or_state_dict, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quant_scheme=None, backend: str = "dequant"):
    """Build the MM-DiT from a file, a folder or a state dict (official or diffusers names, any prefix).

    The architecture is inferred from the weights (docs/checkpoints.md "Architecture inferred from the MM-DiT state dict");
    ``dtype=None`` keeps the stored dtype. A quantized file is recognised from its metadata; for a state dict,
    ``quant_scheme`` (a :class:`~.quant.QuantScheme`) says its Linears are packed. Packed layers become
    :class:`~.quant.QuantizedLinear` running through ``backend``.
    """
    from . import quant
    from .mmdit import MMDiT, MMDiTConfig

    if isinstance(path_or_state_dict, Mapping):
        sd, what = _mmdit_from_mapping(path_or_state_dict), "the MM-DiT state dict"
    else:
        files = index_checkpoint(path_or_state_dict)
        if not files.has("mmdit"):
            raise CheckpointError(f"'{path_or_state_dict}' holds no MM-DiT (diffusion model) weights; "
                                  f"found: {', '.join(files.components) or 'nothing'}")
        sd, what = component_state_dict(files, "mmdit"), f"'{files.sources['mmdit'][0]}'"
        quant_scheme = quant_scheme or component_quant(files, "mmdit")
    if quant_scheme is None and packed_keys(sd):
        raise CheckpointError(f"{what}: holds quantized layers (e.g. '{min(packed_keys(sd))}') but no "
                              f"'{quant.METADATA_KEY}' metadata saying their format")
    layers = quant.stored_layers(sd, quant_scheme.fmt, what) if quant_scheme else {}
    if quant_scheme:
        sd = quant.restore_pos_embed(sd, quant_scheme)
    config = MMDiTConfig.from_state_dict(quant.logical_shapes(sd, layers) if layers else sd)
    dtype = dtype or sd["x_embedder.proj.weight"].dtype
    with torch.device("meta"):
        model = MMDiT(config, dtype=dtype)
    if layers:
        quant.install_packed(model, sd, layers, quant_scheme.fmt, what, backend)
    fmt = quant_scheme.fmt if quant_scheme else "int8"
    sd = quant.cast_unpacked(sd, layers, fmt, dtype, device)
    sd.pop(quant.FP8_MARKER, None)
    load_module_strict(model, sd, what)
    return model.eval().requires_grad_(False)


def load_vae(sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu", what: str = "the VAE state dict"):
    """Build the SD3 VAE from official- or diffusers-named weights, architecture inferred from them."""
    from .vae import SD3VAE, VAEConfig

    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        sd = vae_keys.diffusers_to_official(sd)
    config = VAEConfig.from_state_dict(sd)
    with torch.device("meta"):
        vae = SD3VAE(config, dtype=dtype)
    load_module_strict(vae, {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, what)
    return vae.eval().requires_grad_(False)


def _mmdit_from_mapping(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith(MMDIT_PREFIX) for k in sd):
        return {k[len(MMDIT_PREFIX):]: v for k, v in sd.items() if k.startswith(MMDIT_PREFIX)}
    if any(k.startswith("model.") for k in sd):
        return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if "transformer_blocks.0.attn.add_q_proj.weight" in sd:
        return mmdit_keys.diffusers_to_official(sd)
    return dict(sd)


# --------------------------------------------------------------------------------------------------------
# Metadata and writing


MAX_METADATA_CHARS = 1 << 16  # one of our values (a grid, a scheme, provenance) is at most a few KB
MAX_NOTE_CHARS = 1000  # sd35_flash.t5: a one-line convention


class _Unusable(ValueError):
    """Why one of our metadata values cannot be read (the text after the key in the message or the warning)."""


def _text(value, limit: int = MAX_METADATA_CHARS) -> str:
    if not isinstance(value, str):
        raise _Unusable(f"is a {type(value).__name__}, not text")
    if len(value) > limit:  # never parsed: a 50 MB value costs nothing beyond the header already read
        raise _Unusable(f"is {len(value)} characters long; at most {limit} expected")
    return value


def _json(value):
    text = _text(value)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]] nested deeper than Python recurses
        raise _Unusable(f"is not valid JSON: {text[:80]!r}") from None


def _json_object(value) -> dict:
    parsed = _json(value)
    if not isinstance(parsed, dict):
        raise _Unusable(f"is not a JSON object: {value[:80]!r}")
    return parsed


def _read_sigmas(value) -> list[float]:
    from .schedule import grid_problem

    grid = _json(value)
    problem = grid_problem(grid)
    if problem is not None:
        raise _Unusable(problem)
    return [float(s) for s in grid]


def _read_sampler_mode(value) -> str:
    from .schedule import SAMPLER_MODES

    text = _text(value, 64)
    if text not in SAMPLER_MODES:
        raise _Unusable(f"is {text!r}; expected one of {', '.join(SAMPLER_MODES)}")
    return text


def _read_quantization(value) -> str:
    from .quant import parse_schemes

    try:
        parse_schemes(value)
    except ValueError as err:
        raise _Unusable(str(err)) from None
    return value


def _read_format_version(value) -> int:
    version = _json(value)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise _Unusable(f"is {value[:20]!r}; this version reads format {FORMAT_VERSION}")
    return version


# Each of our keys: how its value is read, and whether a malformed one is refused (it decides the image: the
# student grid, the sampler mode, how the weights are stored) or ignored with a warning (it describes the file).
_READERS = {
    "architecture": (_json_object, False),
    "student_sigmas": (_read_sigmas, True),
    "sampler_mode": (_read_sampler_mode, True),
    "t5": (lambda value: _text(value, MAX_NOTE_CHARS), False),
    "quantization": (_read_quantization, True),
    "training": (_json_object, False),
    "format_version": (_read_format_version, False),
}


@dataclass
class FlashMetadata:
    """What this project writes into ``__metadata__`` (docs/checkpoints.md "What this project writes")."""

    architecture: dict | None = None
    student_sigmas: list[float] | None = None
    sampler_mode: str | None = None
    t5: str | None = None            # e.g. "optional: 77 CLIP tokens when off"
    quantization: str | None = None  # the JSON quantization schemes (flash_core/quant/scheme.py write_schemes)
    training: dict | None = None     # stage, iterations, config hash
    format_version: int = FORMAT_VERSION

    def to_safetensors(self) -> dict[str, str]:
        out = {}
        for name, value in vars(self).items():
            if value is not None:
                out[METADATA_PREFIX + name] = value if isinstance(value, str) else json.dumps(value)
        return out

    @classmethod
    def from_safetensors(cls, raw: Mapping[str, str], source: str = "metadata") -> FlashMetadata:
        """Our entries of a file's ``__metadata__``, each checked, since the file is untrusted
        (:data:`_READERS`): a malformed value that decides the image (the student grid, the sampler mode, the
        quantization scheme) is a :class:`CheckpointError` naming the file and the key, never replaced by a
        default; a malformed descriptive one (architecture, training, t5, format_version) is ignored with one
        warning naming the key. A value over :data:`MAX_METADATA_CHARS` characters is never parsed."""
        fields = {}
        for name, (read, decisive) in _READERS.items():
            key = METADATA_PREFIX + name
            if raw.get(key) is None:
                continue
            try:
                fields[name] = read(raw[key])
            except _Unusable as err:
                if decisive:
                    raise CheckpointError(f"'{source}': metadata '{key}' {err}") from None
                logger.warning("'%s': metadata '%s' ignored: it %s", source, key, err)
        return cls(**fields)

    @property
    def is_flash(self) -> bool:
        return self.student_sigmas is not None


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file through a temporary file and a rename (:func:`atomic.atomic_write`): never
    half-written, the umask's permissions; a failed write is an ``OutputError`` naming ``path``."""
    tensors, metadata = _unshared(tensors), dict(metadata or {})

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as err:  # safetensors reports I/O failures (a full disk) as its own error
            found = re.search(r"\(os error (\d+)\)", str(err))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(tmp)) from None

    return atomic_write(path, write)


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no two sharing storage (tied weights are written twice, as safetensors requires)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.contiguous()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        out[key] = tensor.clone() if ptr in seen else tensor
        if ptr is not None:
            seen.add(ptr)
    return out


def save_checkpoint(path: str | os.PathLike, *, mmdit=None, vae=None, clip_l=None, clip_g=None, t5=None,
                    metadata: FlashMetadata | None = None, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write an official single-file checkpoint (the layout ComfyUI's checkpoint loader reads).

    Each argument is a module or a state dict (official names for MM-DiT and VAE, HF layout for text encoders).
    ``extra_metadata``: ``__metadata__`` entries :class:`FlashMetadata` has no field for (the embedded tokenizers
    of :mod:`.tokenizer_files`).
    """
    def state(x):
        return x.state_dict() if isinstance(x, torch.nn.Module) else x

    tensors = {}
    for component, value in {"mmdit": mmdit, "vae": vae, "clip_l": clip_l, "clip_g": clip_g, "t5": t5}.items():
        if value is not None:
            tensors.update({PREFIXES[component] + k: v.detach().cpu() for k, v in state(value).items()})
    meta = metadata or FlashMetadata()
    if mmdit is not None and meta.architecture is None and hasattr(mmdit, "config"):
        meta.architecture = mmdit.config.to_dict()
    return atomic_save(tensors, path, {**meta.to_safetensors(), **(extra_metadata or {})})
