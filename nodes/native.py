"""ComfyUI's own MODEL, CLIP and VAE objects built from a :class:`~..flash_core.checkpoint.CheckpointFiles`.

Native types first (ARCHITECTURE.md "Inside ComfyUI"): ComfyUI's loading code builds every object, so stock
KSampler, SamplerCustomAdvanced, LoRA loaders, ModelSamplingSD3 and VAEDecode work on them. What this module adds
is what the stock loaders cannot do:

* components of a checkpoint in any layout our engine reads (official single file, split files, diffusers names);
* text encoders and VAEs narrower than the released ones (the demo and test models): ComfyUI's own classes,
  sized through their config overrides, with conditioning zero-padded to the SD3 widths exactly as
  :func:`..flash_core.text.assemble_conditioning` pads it;
* our checkpoint metadata (student grid, sampler mode) kept on the model for the Flash Scheduler.

Every ``comfy`` import is inside a function: this module imports where ComfyUI is absent.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..flash_core import quant
from ..flash_core.checkpoint import CheckpointFiles, FlashMetadata, component_quant, component_state_dict
from ..flash_core.errors import CheckpointError
from ..flash_core.text import (
    CONTEXT_DIM,
    POOLED_DIM,
    RELEASED_WIDTHS,
    SLOT_NAMES,
    infer_clip_config,
    infer_t5_config,
)
from ..flash_core.vae import VAEConfig
from . import quant_ops

METADATA_ATTRIBUTE = "sd35_flash_metadata"  # on the BaseModel, so every clone of the ModelPatcher sees it
WEIGHT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ MODEL


def build_model(files: CheckpointFiles, weight_dtype: str = "auto", metadata: FlashMetadata | None = None,
                quantize: str = "none"):
    """A native MODEL (ModelPatcher over ``comfy.model_base.SD3``) from the checkpoint's MM-DiT.

    ``comfy.sd.load_diffusion_model_state_dict`` detects the architecture from the shapes, as for any SD3 file.
    A quantized file (flash_core/quant.py metadata), or ``quantize`` set to a format, loads its Linears packed
    through :func:`.quant_ops.operations` (the ComfyUI-GGUF pattern; LoRA patches still apply).
    """
    import comfy.sd

    dtype = WEIGHT_DTYPES[weight_dtype]
    options = {} if dtype is None else {"dtype": dtype}
    source = files.sources["mmdit"][0]
    sd, scheme = quant_ops.mmdit_state_dict(files, quantize, dtype)
    if scheme is not None:
        options["custom_operations"] = quant_ops.operations()
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
    if model is None:
        raise CheckpointError(f"ComfyUI could not detect an SD3 MM-DiT in '{source}'")
    if scheme is not None:
        model = quant_ops.finish_loaded(model, scheme, f"'{source}'")
    setattr(model.model, METADATA_ATTRIBUTE, metadata or FlashMetadata())
    return model


def flash_metadata(model) -> FlashMetadata:
    """The metadata the Flash loader attached to a MODEL (empty for models from other loaders)."""
    return getattr(model.model, METADATA_ATTRIBUTE, None) or FlashMetadata()


# ------------------------------------------------------------------------------------------------ VAE


def build_vae(files: CheckpointFiles):
    """A native ``comfy.sd.VAE``. The released SD3 VAE goes through ComfyUI's own detection; a narrower one is
    built by ComfyUI from its config, with identity 1x1 quant convs (SD3's VAE has none), and with ComfyUI's
    pixels-per-latent ratios set from its level count (a config-built VAE assumes 8; the toy VAE's is 1)."""
    import comfy.sd

    sd = component_state_dict(files, "vae")
    try:
        config = VAEConfig.from_state_dict(sd)
    except CheckpointError as e:
        raise CheckpointError(f"'{files.sources['vae'][0]}': {e}") from None
    if config == VAEConfig():
        return comfy.sd.VAE(sd=sd)
    z = config.latent_channels
    sd = {**sd, "quant_conv.weight": torch.eye(2 * z)[:, :, None, None], "quant_conv.bias": torch.zeros(2 * z),
          "post_quant_conv.weight": torch.eye(z)[:, :, None, None], "post_quant_conv.bias": torch.zeros(z)}
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": config.base_channels, "ch_mult": list(config.channel_mult),
                "num_res_blocks": config.num_res_blocks, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": z}})
    vae.latent_channels = z
    vae.downscale_ratio = vae.upscale_ratio = config.downscale_factor
    return vae


# ------------------------------------------------------------------------------------------------ CLIP


def text_state_dicts(files: CheckpointFiles, use_t5: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{slot: HF-layout state dict} for the text encoders present (T5 only when ``use_t5``; never read otherwise)."""
    slots = [s for s in (("clip_l", "clip_g", "t5") if use_t5 else ("clip_l", "clip_g")) if files.has(s)]
    return {slot: _float_text_state(files, slot) for slot in slots}


def _float_text_state(files: CheckpointFiles, slot: str) -> dict[str, torch.Tensor]:
    """A text encoder's state dict with float weights: a quantized one (``sd35-flash quantize --t5``) is
    unpacked to fp32, because ComfyUI builds its text encoders from float weights (the headless engine keeps
    them packed). ComfyUI then casts them to its text-encoder dtype."""
    sd = component_state_dict(files, slot)
    scheme = component_quant(files, slot)
    if scheme is None:
        return sd
    layers = quant.stored_layers(sd, scheme.fmt, f"'{files.sources[slot][0]}' ({SLOT_NAMES[slot]})")
    sd.pop(quant.FP8_MARKER, None)
    for layer in layers:
        scale = sd.pop(f"{layer}.{quant.SCALE_KEY[scheme.fmt]}")
        sd[f"{layer}.weight"] = quant.dequantize_tensors(scheme.fmt, sd[f"{layer}.weight"], scale, torch.float32)
    return sd


def _width(slot: str, sd: Mapping[str, torch.Tensor]) -> int:
    key = "text_model.embeddings.token_embedding.weight"
    if slot != "t5" and key in sd and sd[key].ndim == 2:
        return int(sd[key].shape[1])
    return infer_t5_config(sd).d_model if slot == "t5" else infer_clip_config(sd, slot).hidden_size


def check_slots(state_dicts: Mapping[str, Mapping[str, torch.Tensor]], names: Mapping[str, str]) -> dict[str, int]:
    """Each encoder's width, refusing one that is another slot's released encoder (e.g. CLIP-G given as CLIP-L).

    ``names`` maps a slot to the file it came from, for the message. Widths no released encoder has are accepted:
    they are this project's small demo and test encoders.
    """
    if not (state_dicts.keys() & {"clip_l", "clip_g"}):
        raise CheckpointError("SD3 conditioning needs CLIP-L and/or CLIP-G; none was given")
    widths = {}
    for slot, sd in state_dicts.items():
        try:
            width = widths[slot] = _width(slot, sd)
        except CheckpointError as e:
            raise CheckpointError(f"'{names.get(slot, slot)}': {e}") from None
        others = [s for s, w in RELEASED_WIDTHS.items() if w == width and s != slot]
        if others and width != RELEASED_WIDTHS[slot]:
            raise CheckpointError(
                f"'{names.get(slot, slot)}' was given as {SLOT_NAMES[slot]} but is a text encoder of width {width}, "
                f"which is {SLOT_NAMES[others[0]]}'s; {SLOT_NAMES[slot]} has width {RELEASED_WIDTHS[slot]}"
            )
    return widths


def build_clip(state_dicts: Mapping[str, Mapping[str, torch.Tensor]], names: Mapping[str, str] | None = None,
               weight_dtype: str = "auto"):
    """A native ``comfy.sd.CLIP`` (SD3 tokenizer + ``SD3ClipModel``) from {slot: HF-layout state dict}.

    Released widths load exactly as ComfyUI's TripleCLIPLoader / DualCLIPLoader(type=sd3) load them. Narrower
    encoders are ComfyUI's same classes sized by config overrides (``<name>_model_config``), in a subclass that
    zero-pads T5 to 4096 channels and the pooled vector to 2048 like the headless engine.
    """
    import comfy.sd

    widths = check_slots(state_dicts, names or {})
    options = {} if WEIGHT_DTYPES[weight_dtype] is None else {"dtype": WEIGHT_DTYPES[weight_dtype]}
    if all(widths[slot] == RELEASED_WIDTHS[slot] for slot in widths):
        return comfy.sd.load_text_encoder_state_dicts([dict(sd) for sd in state_dicts.values()],
                                                      clip_type=comfy.sd.CLIPType.SD3, model_options=options)
    return _build_narrow_clip(state_dicts, options)


def _model_config_overrides(state_dicts) -> dict[str, dict]:
    overrides = {}
    for slot, name in (("clip_l", "clip_l"), ("clip_g", "clip_g")):
        if slot in state_dicts:
            c = infer_clip_config(state_dicts[slot], slot)
            if c.num_hidden_layers < 3:  # SD3 reads the penultimate layer; ComfyUI's CLIP asserts 2 < layers
                raise CheckpointError(f"{SLOT_NAMES[slot]} ({slot}) has {c.num_hidden_layers} layers; ComfyUI's "
                                      "CLIP needs at least 3 to read SD3's penultimate layer")
            overrides[f"{name}_model_config"] = {
                "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
                "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                "max_position_embeddings": c.max_position_embeddings, "projection_dim": c.projection_dim,
                "hidden_act": c.hidden_act,
            }
    if "t5" in state_dicts:
        c = infer_t5_config(state_dicts["t5"])
        overrides["t5xxl_model_config"] = {
            "d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_heads": c.num_heads,
            "num_layers": c.num_layers, "vocab_size": c.vocab_size,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "is_gated_act": c.feed_forward_proj.startswith("gated"),
            "dense_act_fn": "gelu_pytorch_tanh" if c.feed_forward_proj.startswith("gated") else "relu",
        }
    return overrides


def _padded_sd3_clip(clip_l: bool, clip_g: bool, t5: bool):
    """ComfyUI's SD3ClipModel for narrow encoders: T5 padded to the context width, pooled padded to 2048,
    CLIP-L absent padded with CLIP-L's released width (ComfyUI's convention, kept for narrow CLIP-G)."""
    import comfy.text_encoders.sd3_clip as sd3_clip

    class PaddedSD3ClipModel(sd3_clip.SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
            super().__init__(clip_l=clip_l, clip_g=clip_g, t5=t5, device=device, dtype=dtype,
                             model_options=model_options)
            if self.t5xxl is not None:
                encode = self.t5xxl.encode_token_weights

                def padded_t5(token_weight_pairs):
                    out = list(encode(token_weight_pairs))
                    out[0] = torch.nn.functional.pad(out[0], (0, CONTEXT_DIM - out[0].shape[-1]))
                    return tuple(out)

                self.t5xxl.encode_token_weights = padded_t5

        def encode_token_weights(self, token_weight_pairs):
            out, pooled, extra = super().encode_token_weights(token_weight_pairs)
            if pooled.shape[-1] < POOLED_DIM:
                pooled = torch.nn.functional.pad(pooled, (0, POOLED_DIM - pooled.shape[-1]))
            return out, pooled, extra

    return PaddedSD3ClipModel


def _build_narrow_clip(state_dicts, options: dict):
    import comfy.sd
    import comfy.text_encoders.sd3_clip as sd3_clip
    import comfy.utils

    class Target:
        params: dict = {}
        tokenizer = sd3_clip.SD3Tokenizer
        clip = _padded_sd3_clip("clip_l" in state_dicts, "clip_g" in state_dicts, "t5" in state_dicts)

    parameters = sum(comfy.utils.calculate_parameters(sd) for sd in state_dicts.values())
    clip = comfy.sd.CLIP(Target, parameters=parameters, model_options={**options, **_model_config_overrides(state_dicts)})
    modules = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl"}
    for slot, sd in state_dicts.items():
        missing, _ = getattr(clip.cond_stage_model, modules[slot]).load_sd(dict(sd))
        missing = [k for k in missing if not k.endswith(("logit_scale", "text_projection.weight"))]
        if missing:
            raise CheckpointError(f"{SLOT_NAMES[slot]} ({slot}) weights are missing {len(missing)} keys, "
                                  f"e.g. '{missing[0]}'")
    return clip
