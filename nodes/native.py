"""ComfyUI's own MODEL, CLIP and VAE objects built from a :class:`~..flash_core.checkpoint.CheckpointFiles`.

Native types first (docs/architecture.md "Inside ComfyUI"): ComfyUI's loading code builds every object, so stock
KSampler, SamplerCustomAdvanced, LoRA loaders, ModelSamplingSD3 and VAEDecode work on them. What this module adds
is what the stock loaders cannot do:

* components of a checkpoint in any layout our engine reads (official single file, split files, diffusers names);
* text encoders and VAEs narrower than the released ones (the demo and test models): ComfyUI's own classes,
  sized through their config overrides, with conditioning zero-padded to the SD3 widths exactly as
  :func:`..flash_core.text.assemble_conditioning` pads it;
* our checkpoint metadata (student grid, sampler mode) kept on the model for the Flash Scheduler, and its VAE's
  pixels per latent for the Flash Sampler's size check;
* a model's own tokenizers (a ``tokenizers/`` folder beside the checkpoint, e.g. the demo model's word-level
  vocabulary, or tokenizers embedded in its metadata: flash_core/tokenizer_files.py): ComfyUI's own
  ``SDTokenizer`` pointed at those folders (or handed the embedded ones), and the CLIP models told their special ids.

Every ``comfy`` import is inside a function: this module imports where ComfyUI is absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..flash_core import quant
from ..flash_core.checkpoint import CheckpointFiles, FlashMetadata, component_quant, component_state_dict
from ..flash_core.checkpoint_info import vae_downscale
from ..flash_core.errors import CheckpointError
from ..flash_core.text import (
    CLIP_G_PAD_ID,
    CLIP_LENGTH,
    CONTEXT_DIM,
    POOLED_DIM,
    RELEASED_WIDTHS,
    SLOT_NAMES,
    T5_DEFAULT_LENGTH,
    TokenizerDirs,
    Tokenizers,
    find_tokenizer_dirs,
    infer_clip_config,
    infer_t5_config,
    load_tokenizers,
    reads_as_is,
)
from ..flash_core.vae import RELEASED_DOWNSCALE, VAEConfig
from . import quant_ops
from .attributes import DOWNSCALE_ATTRIBUTE, METADATA_ATTRIBUTE

COMFY_CLIP_VOCAB = 49408  # ComfyUI's CLIP BPE vocabulary (ids up to 49407), what SD3Tokenizer emits
WEIGHT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ MODEL


def build_model(files: CheckpointFiles, weight_dtype: str = "auto", metadata: FlashMetadata | None = None,
                quantize: str = "none"):
    """A native MODEL (ModelPatcher over ``comfy.model_base.SD3``) from the checkpoint's MM-DiT.

    ``comfy.sd.load_diffusion_model_state_dict`` detects the architecture from the shapes, as for any SD3 file.
    A quantized file (flash_core/quant/scheme.py metadata), or ``quantize`` set to a format, loads its Linears packed
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
    setattr(model.model, DOWNSCALE_ATTRIBUTE, vae_downscale(files))
    return model


def flash_metadata(model) -> FlashMetadata:
    """The metadata the Flash loader attached to a MODEL (empty for models from other loaders)."""
    return getattr(model.model, METADATA_ATTRIBUTE, None) or FlashMetadata()


def model_vae_downscale(model) -> int:
    """Pixels per latent of the VAE in the MODEL's checkpoint (the Flash loader records it; 8, the released SD3
    VAE's, for models from other loaders or checkpoints without a VAE)."""
    return getattr(model.model, DOWNSCALE_ATTRIBUTE, None) or RELEASED_DOWNSCALE


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
               weight_dtype: str = "auto", tokenizers=None):
    """A native ``comfy.sd.CLIP`` (SD3 tokenizer + ``SD3ClipModel``) from {slot: HF-layout state dict}.

    Released widths load exactly as ComfyUI's TripleCLIPLoader / DualCLIPLoader(type=sd3) load them. Narrower
    encoders are ComfyUI's same classes sized by config overrides (``<name>_model_config``), in a subclass that
    zero-pads T5 to 4096 channels and the pooled vector to 2048 like the headless engine. ``tokenizers`` (a folder
    :func:`..flash_core.text.load_tokenizers` reads, e.g. the one beside the checkpoint: ``text.tokenizers_beside``,
    or :class:`..flash_core.text.Tokenizers` already built, e.g. the ones embedded in the checkpoint's metadata)
    replaces ComfyUI's BPE tokenizers for narrow encoders: the demo model's word-level vocabulary.
    """
    import comfy.sd

    widths = check_slots(state_dicts, names or {})
    options = {} if WEIGHT_DTYPES[weight_dtype] is None else {"dtype": WEIGHT_DTYPES[weight_dtype]}
    if all(widths[slot] == RELEASED_WIDTHS[slot] for slot in widths):
        return comfy.sd.load_text_encoder_state_dicts([dict(sd) for sd in state_dicts.values()],
                                                      clip_type=comfy.sd.CLIPType.SD3, model_options=options)
    if tokenizers is None:
        _check_comfy_vocab(state_dicts, names or {})
    return _build_narrow_clip(state_dicts, options, tokenizers)


def _check_comfy_vocab(state_dicts, names: Mapping[str, str]) -> None:
    """Without a tokenizer folder ComfyUI's BPE ids (up to 49407) are used: refuse a smaller vocabulary clearly
    rather than with an index error at the first CLIPTextEncode."""
    for slot in ("clip_l", "clip_g"):
        if slot in state_dicts:
            vocab = infer_clip_config(state_dicts[slot], slot).vocab_size
            if vocab < COMFY_CLIP_VOCAB:
                raise CheckpointError(
                    f"'{names.get(slot, slot)}': {SLOT_NAMES[slot]} has a vocabulary of {vocab} ids, not CLIP's "
                    f"{COMFY_CLIP_VOCAB}, so it needs its own tokenizers: put its tokenizers/ folder (clip/ and "
                    "t5xxl/) beside the checkpoint file")


def _special_ids(toks: Tokenizers | None) -> dict[str, dict[str, int]] | None:
    """{'clip_l', 'clip_g', 't5': SDClipModel special_tokens} of a tokenizer folder, as flash_core.text tokenizes:
    CLIP-L pads with its end token, CLIP-G with id 0, T5 has no start token and pads with its pad id."""
    if toks is None:
        return None
    ids = {slot: {"start": tok.bos_token_id, "end": tok.eos_token_id,
                  "pad": tok.eos_token_id if slot == "clip_l" else CLIP_G_PAD_ID}
           for slot, tok in (("clip_l", toks.clip_l), ("clip_g", toks.clip_g))}
    if toks.t5 is not None:
        ids["t5"] = {"end": toks.t5.eos_token_id, "pad": toks.t5.pad_token_id}
    return ids


CLIP_POSITIONS = "text_model.embeddings.position_embedding.weight"


def _positions_for_rows(state_dicts: dict, rows: int) -> dict:
    """The CLIPs' position tables cut to the tokenizer's row length. ComfyUI's CLIP adds its whole table to the
    token embeddings (comfy/clip_model.py), so its rows must be as long as the table; a model whose tokenizer
    declares shorter rows (the demo's 12) reads only that many positions anyway, here as in transformers."""
    out = dict(state_dicts)
    for slot in ("clip_l", "clip_g"):
        sd = out.get(slot)
        if sd is not None and CLIP_POSITIONS in sd and sd[CLIP_POSITIONS].shape[0] > rows:
            out[slot] = {**sd, CLIP_POSITIONS: sd[CLIP_POSITIONS][:rows]}
    return out


def _model_config_overrides(state_dicts, special: dict | None = None, rows: int = CLIP_LENGTH) -> dict[str, dict]:
    overrides = {}
    for slot, name in (("clip_l", "clip_l"), ("clip_g", "clip_g")):
        if slot in state_dicts:
            c = infer_clip_config(state_dicts[slot], slot, min_positions=rows)
            if c.num_hidden_layers < 3:  # SD3 reads the penultimate layer; ComfyUI's CLIP asserts 2 < layers
                raise CheckpointError(f"{SLOT_NAMES[slot]} ({slot}) has {c.num_hidden_layers} layers; ComfyUI's "
                                      "CLIP needs at least 3 to read SD3's penultimate layer")
            overrides[f"{name}_model_config"] = {
                "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
                "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                "max_position_embeddings": c.max_position_embeddings, "projection_dim": c.projection_dim,
                "hidden_act": c.hidden_act,
            }
            if special is not None:  # the ids the CLIP text model pools at when it has no token count
                overrides[f"{name}_model_config"].update(bos_token_id=special[slot]["start"],
                                                         eos_token_id=special[slot]["end"])
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


def _padded_sd3_clip(clip_l: bool, clip_g: bool, t5: bool, special: dict | None = None,
                     g_projection: tuple[int, int] | None = None):
    """ComfyUI's SD3ClipModel for narrow encoders: T5 padded to the context width, pooled padded to 2048,
    CLIP-L absent padded with CLIP-L's released width (ComfyUI's convention, kept for narrow CLIP-G).

    ``special`` ({slot: {"start", "end", "pad"}}, from a tokenizer folder) replaces the BPE ids ComfyUI's
    ``SDClipModel`` / ``SDXLClipG`` / ``T5XXLModel`` hard-code: the end id marks where the pooled feature is read
    (``SDClipModel.process_tokens`` counts tokens up to the first end id; ``clip_model`` pools at count - 1), and
    the ids make the empty prompt that prompt weights are measured against. ``g_projection`` ([out, in] of CLIP-G's
    ``text_projection``) sizes a projection that is not square (ComfyUI's is always hidden x hidden; the demo's
    CLIP-G projects 64 -> 128, as bigG projects to more than L's width)."""
    import comfy.text_encoders.sd3_clip as sd3_clip

    class PaddedSD3ClipModel(sd3_clip.SD3ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
            super().__init__(clip_l=clip_l, clip_g=clip_g, t5=t5, device=device, dtype=dtype,
                             model_options=model_options)
            for slot, module in (("clip_l", self.clip_l), ("clip_g", self.clip_g), ("t5", self.t5xxl)):
                if special is not None and module is not None and slot in special:
                    module.special_tokens = dict(special[slot])
            if self.clip_g is not None and g_projection is not None:
                old = self.clip_g.transformer.text_projection
                if tuple(old.weight.shape) != tuple(g_projection):
                    self.clip_g.transformer.text_projection = self.clip_g.operations.Linear(
                        g_projection[1], g_projection[0], bias=False, dtype=old.weight.dtype, device=old.weight.device)
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


def folder_tokenizer(dirs: TokenizerDirs | Tokenizers, t5_pad_id: int | None = None, clip_length: int = CLIP_LENGTH,
                     t5_length: int = T5_DEFAULT_LENGTH):
    """An SD3 tokenizer class for ``comfy.sd.CLIP`` made of ComfyUI's own ``SDTokenizer`` pointed at a tokenizer
    folder, set as ``SD3Tokenizer`` sets its three (so a prompt gives the ids ``flash_core.text`` gives):

    * CLIP-L (``SDTokenizer``): start + prompt + end, padded to 77 with the end token; embeddings 768, ``clip_l``;
    * CLIP-G (``SDXLClipGTokenizer``): the same, padded with id 0; embeddings 1280, ``clip_g``;
    * T5 (``T5XXLTokenizer``): no start token, prompt + end, padded with the pad id to at least 77, never chunked;
      without a T5 folder ComfyUI's own T5 tokenizer.

    ``clip_length`` / ``t5_length``: the rows the folder declares (``Tokenizers.clip_length``; the demo's 12).

    A folder with a ``tokenizer.json`` read as-is (the demo's word-level vocabulary) is read with
    ``PreTrainedTokenizerFast``; CLIP BPE files with ComfyUI's default ``CLIPTokenizer``. ``dirs`` may also be
    :class:`Tokenizers` built already (embedded in a checkpoint: they have no folder), handed to ``SDTokenizer``
    as they are."""
    import comfy.sd1_clip as sd1_clip
    import comfy.text_encoders.sd3_clip as sd3_clip
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5TokenizerFast

    def cls_for(folder, default):
        if isinstance(folder, Path):
            return PreTrainedTokenizerFast if reads_as_is(folder) else default
        return _built(folder)

    def path(folder) -> str:
        return str(folder) if isinstance(folder, Path) else "(embedded in the checkpoint)"

    t5_pad = t5_pad_id

    class FolderSD3Tokenizer(sd3_clip.SD3Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's signature)
            common = {"embedding_directory": embedding_directory, "tokenizer_data": tokenizer_data}
            self.clip_l = sd1_clip.SDTokenizer(
                path(dirs.clip_l), max_length=clip_length, pad_with_end=True, embedding_size=768,
                embedding_key="clip_l", tokenizer_class=cls_for(dirs.clip_l, CLIPTokenizer), **common)
            self.clip_g = sd1_clip.SDTokenizer(
                path(dirs.clip_g), max_length=clip_length, pad_with_end=False, pad_token=CLIP_G_PAD_ID,
                embedding_size=1280, embedding_key="clip_g", tokenizer_class=cls_for(dirs.clip_g, CLIPTokenizer),
                **common)
            if dirs.t5 is None:
                self.t5xxl = sd3_clip.T5XXLTokenizer(**common)
            else:
                self.t5xxl = sd1_clip.SDTokenizer(
                    path(dirs.t5), pad_with_end=False, pad_token=t5_pad, embedding_size=4096, embedding_key="t5xxl",
                    tokenizer_class=cls_for(dirs.t5, T5TokenizerFast), has_start_token=False,
                    pad_to_max_length=False, max_length=99999999, min_length=t5_length, **common)

    return FolderSD3Tokenizer


def _built(tokenizer):
    """A ``tokenizer_class`` for ComfyUI's ``SDTokenizer`` whose ``from_pretrained`` (the only use it makes of
    its path) hands back ``tokenizer``, already built."""
    return type("BuiltTokenizer", (), {"from_pretrained": staticmethod(lambda *args, **kwargs: tokenizer)})


def _build_narrow_clip(state_dicts, options: dict, tokenizers=None):
    import comfy.sd
    import comfy.text_encoders.sd3_clip as sd3_clip
    import comfy.utils

    if isinstance(tokenizers, Tokenizers):  # built already (embedded in the checkpoint): no folder to read
        dirs, toks = tokenizers, tokenizers
    else:
        dirs = find_tokenizer_dirs(tokenizers) if tokenizers is not None else None
        toks = load_tokenizers(tokenizers) if tokenizers is not None else None
    special = _special_ids(toks)
    rows = toks.clip_length if toks is not None else CLIP_LENGTH
    state_dicts = _positions_for_rows(state_dicts, rows)

    class Target:
        params: dict = {}
        tokenizer = sd3_clip.SD3Tokenizer if dirs is None else folder_tokenizer(
            dirs, toks.t5.pad_token_id if toks.t5 is not None else None, toks.clip_length, toks.t5_length)
        clip = _padded_sd3_clip("clip_l" in state_dicts, "clip_g" in state_dicts, "t5" in state_dicts, special,
                                _projection_shape(state_dicts.get("clip_g")))

    parameters = sum(comfy.utils.calculate_parameters(sd) for sd in state_dicts.values())
    overrides = _model_config_overrides(state_dicts, special, rows)
    clip = comfy.sd.CLIP(Target, parameters=parameters, model_options={**options, **overrides})
    modules = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5xxl"}
    for slot, sd in state_dicts.items():
        sd = _comfy_vocab_rows(dict(sd)) if slot != "t5" else dict(sd)
        missing, _ = getattr(clip.cond_stage_model, modules[slot]).load_sd(sd)
        missing = [k for k in missing if not k.endswith(("logit_scale", "text_projection.weight"))]
        if missing:
            raise CheckpointError(f"{SLOT_NAMES[slot]} ({slot}) weights are missing {len(missing)} keys, "
                                  f"e.g. '{missing[0]}'")
    return clip


def _comfy_vocab_rows(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's CLIP text model always has CLIP's 49408 token rows (``clip_model.CLIPEmbeddings`` ignores the
    config's vocab_size): a smaller vocabulary (the demo's) is zero-padded to it; its own ids never reach the
    padding rows."""
    key = "text_model.embeddings.token_embedding.weight"
    table = sd.get(key)
    if table is not None and table.shape[0] < COMFY_CLIP_VOCAB:
        sd[key] = torch.cat([table, table.new_zeros(COMFY_CLIP_VOCAB - table.shape[0], table.shape[1])])
    return sd


def _projection_shape(sd) -> tuple[int, int] | None:
    projection = None if sd is None else sd.get("text_projection.weight")
    return None if projection is None else tuple(projection.shape)
