"""Loader nodes: Flash Checkpoint Loader, Triple Text Encoder Loader (T5 optional), Flash VAE Loader.

Each returns ComfyUI's own MODEL / CLIP / VAE (built in :mod:`.native`) and, after it runs, tells the web
extension what it detected (``sd35_flash.loader_info``, shown on the node by web/js/sd35_flash.js).
"""

from __future__ import annotations

from pathlib import Path

from ..flash_core.checkpoint import CheckpointFiles, FlashMetadata, index_checkpoint
from ..flash_core.checkpoint_info import COMPONENT_NAMES, loader_report
from ..flash_core.errors import CheckpointError
from ..flash_core.quant import FORMATS
from ..flash_core.text import tokenizers_beside
from ..flash_core.tokenizer_files import embedded_tokenizers
from . import native, path_policy, quant_ops
from .schema import UNIQUE_ID, combo, inputs, outputs

CATEGORY = "SD3.5 Flash"
LOADER_EVENT = "sd35_flash.loader_info"
T5_MODES = ["auto", "on", "off"]
NONE = "none"
QUANTIZE_OPTIONS = [NONE, *FORMATS]
TEXT_ENCODER_TIP = "{} file from models/text_encoders, or none to leave it out{}."


def filenames(*folders: str) -> list[str]:
    """Model files ComfyUI lists in ``folders`` (empty where ComfyUI is absent, e.g. schema tests)."""
    try:
        import folder_paths
    except ImportError:
        return []
    names: list[str] = []
    for folder in folders:
        names += [n for n in folder_paths.get_filename_list(folder) if n not in names]
    return names


def text_encoder_names() -> list[str]:
    """The Triple Text Encoder Loader's choices: none, then models/text_encoders."""
    return [NONE, *filenames("text_encoders")]


def full_path(name: str, *folders: str, widget: str = "ckpt_name") -> Path:
    """The file ``name`` in the first of ComfyUI's model ``folders`` that has it (as ComfyUI's loaders find it),
    or a clear error naming both; a name that would leave them (absolute, ``..``: :mod:`.path_policy`) is refused
    naming ``widget``."""
    import folder_paths

    roots = [root for folder in folders for root in folder_paths.get_folder_paths(folder)]
    path = path_policy.model_file(name, roots, widget, path_policy.model_place(folders))
    if path is None:
        raise CheckpointError(f"'{name}' is not in {path_policy.model_place(folders)}")
    return path


def send_report(node_id, report: dict) -> None:
    """Show ``report`` on the node (no-op outside a running ComfyUI server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    if node_id is not None and getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_sync(LOADER_EVENT, {"node": str(node_id), "info": report})


def _t5_state(t5: str, files: CheckpointFiles, source: str) -> str:
    if t5 not in T5_MODES:
        raise ValueError(f"t5 must be one of {', '.join(T5_MODES)}, got '{t5}'")
    if t5 == "on" and not files.has("t5"):
        raise CheckpointError(f"t5 is 'on' but '{source}' holds no T5-XXL weights; load one with the Triple Text "
                              "Encoder Loader, or set t5 to 'auto' or 'off'")
    if not files.has("t5"):
        return "absent"
    return "off" if t5 == "off" else "on"


class FlashCheckpointLoader:
    """An SD3.5 / SD3.5-Flash checkpoint in any layout -> native MODEL, CLIP and VAE."""

    NODE_TYPE = "SD35FlashCheckpointLoader"
    INPUT_TYPES = inputs(
        NODE_TYPE, hidden=UNIQUE_ID,
        ckpt_name=combo(lambda: filenames("checkpoints", "diffusion_models"),
                        tooltip="An SD3.5 or SD3.5-Flash file from models/checkpoints (single file with text "
                                "encoders and VAE) or models/diffusion_models (MM-DiT only; add the Triple Text "
                                "Encoder Loader and Flash VAE Loader)."),
        t5=combo(T5_MODES, default="auto",
                 tooltip="T5-XXL text encoder: auto uses it when the file has it; off never reads it "
                         "(77 CLIP tokens only, about 9 GB less memory); on requires it."),
        weight_dtype=combo(list(native.WEIGHT_DTYPES), default="auto",
                           tooltip="Weight dtype of the MM-DiT and text encoders; auto lets ComfyUI pick for the "
                                   "device (bf16/fp16 on GPU, fp32 on CPU)."),
        # optional (in the table): API prompts saved before this input existed still run
        quantize=combo(QUANTIZE_OPTIONS, default=NONE,
                       tooltip="Quantize the MM-DiT's Linears while loading (embedders and final layer stay "
                               "16-bit): int8 or fp8 about halve its memory, int6 / int4 (groups of 64) cut it to "
                               "about 0.4 / 0.3, with more error. none loads the weights as stored (a quantized "
                               "file stays quantized). The same image as sd35-flash generate --weights FORMAT."),
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)
    OUTPUT_TOOLTIPS = ("The MM-DiT, carrying the student sigma grid for the Flash Scheduler.",
                       "CLIP-L + CLIP-G (+ T5-XXL) for CLIPTextEncode / CLIPTextEncodeSD3; None if the file has "
                       "no text encoders.",
                       "The 16-channel SD3 VAE; None if the file has none.")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads an SD3.5-Flash (or any SD3.5) checkpoint as ComfyUI's native MODEL, CLIP and VAE."

    def load(self, ckpt_name: str, t5: str = "auto", weight_dtype: str = "auto", quantize: str = NONE,
             unique_id=None):
        path = full_path(ckpt_name, "checkpoints", "diffusion_models")
        files = index_checkpoint(path)
        if not files.has("mmdit"):
            raise CheckpointError(f"'{ckpt_name}' holds no MM-DiT (diffusion model) weights")
        t5_state = _t5_state(t5, files, ckpt_name)
        metadata = FlashMetadata.from_safetensors(files.metadata, ckpt_name)
        if quantize not in QUANTIZE_OPTIONS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_OPTIONS)}, got '{quantize}'")
        model = native.build_model(files, weight_dtype, metadata, quantize)
        texts = native.text_state_dicts(files, use_t5=t5_state == "on")
        # the model's own tokenizers (the demo's word-level vocabulary): a folder beside it, or embedded in it
        tokenizers = tokenizers_beside(path) or embedded_tokenizers(files.metadata, ckpt_name)
        clip = native.build_clip(texts, {s: ckpt_name for s in texts}, weight_dtype, tokenizers) if texts else None
        vae = native.build_vae(files) if files.has("vae") else None
        report = loader_report(files, source=ckpt_name, weight_dtype=native.WEIGHT_DTYPES[weight_dtype], t5=t5_state,
                               metadata=metadata)
        report["quantization"] = quant_ops.describe(model.model)
        send_report(unique_id, report)
        return model, clip, vae


class FlashTextEncoderLoader:
    """CLIP-L + CLIP-G + T5-XXL, each optional ('none'), -> native CLIP."""

    NODE_TYPE = "SD35FlashTextEncoderLoader"
    INPUT_TYPES = inputs(
        NODE_TYPE, hidden=UNIQUE_ID,
        clip_l=combo(text_encoder_names, tooltip=TEXT_ENCODER_TIP.format("CLIP-L (768 wide)", "")),
        clip_g=combo(text_encoder_names, tooltip=TEXT_ENCODER_TIP.format("CLIP-G (1280 wide)", "")),
        t5xxl=combo(text_encoder_names, default=NONE, tooltip=TEXT_ENCODER_TIP.format(
            "T5-XXL", ": without T5 the prompt is 77 CLIP tokens and about 9 GB less memory is used")),
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)
    OUTPUT_TOOLTIPS = ("SD3 text encoder for CLIPTextEncode / CLIPTextEncodeSD3.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the SD3 triple text encoder with T5-XXL optional (any of the three may be none)."

    def load(self, clip_l: str, clip_g: str, t5xxl: str = NONE, unique_id=None):
        chosen = {slot: name for slot, name in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5xxl)) if name != NONE}
        if not chosen.keys() & {"clip_l", "clip_g"}:
            raise CheckpointError("choose a CLIP-L and/or CLIP-G file: SD3 conditioning needs at least one CLIP")
        files = CheckpointFiles(layout="split text encoder files")
        tokenizers = None
        paths = {slot: full_path(name, "text_encoders", widget="t5xxl" if slot == "t5" else slot)
                 for slot, name in chosen.items()}  # every name checked before any file is read
        for slot, name in chosen.items():
            path = paths[slot]
            tokenizers = tokenizers or tokenizers_beside(path)  # a tokenizers/ folder beside the first file having one
            part = index_checkpoint(path, slot)
            if not part.has(slot):
                found = ", ".join(COMPONENT_NAMES[c] for c in part.components) or "nothing"
                raise CheckpointError(f"'{name}' was chosen as {COMPONENT_NAMES[slot]} but holds {found} weights")
            files.components[slot], files.sources[slot] = part.components[slot], part.sources[slot]
        texts = native.text_state_dicts(files, use_t5=True)
        clip = native.build_clip(texts, chosen, tokenizers=tokenizers)
        send_report(unique_id, loader_report(files, source=", ".join(chosen.values()),
                                             t5="on" if "t5" in chosen else "absent"))
        return (clip,)


class FlashVAELoader:
    """An SD3 VAE file (official or diffusers names, released or smaller) -> native VAE."""

    NODE_TYPE = "SD35FlashVAELoader"
    INPUT_TYPES = inputs(NODE_TYPE, vae_name=combo(
        lambda: filenames("vae"), tooltip="A 16-channel SD3 VAE from models/vae (official or diffusers key names)."))
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)
    OUTPUT_TOOLTIPS = ("The SD3 VAE for VAEDecode / VAEEncode.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a separate SD3 VAE file, including the small demo-model VAE the stock loader cannot size."

    def load(self, vae_name: str):
        files = index_checkpoint(full_path(vae_name, "vae", widget="vae_name"), "vae")
        if not files.has("vae"):
            raise CheckpointError(f"'{vae_name}' holds no VAE weights (found {', '.join(files.components)})")
        return (native.build_vae(files),)
