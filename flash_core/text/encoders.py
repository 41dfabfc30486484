"""SD3's text encoders: CLIP-L, CLIP-G and optional T5-XXL built from state dicts, and the conditioning they give.

Encodes the token rows of :mod:`.tokenizers` as ComfyUI's ``comfy/text_encoders/sd3_clip.py`` does (docs/comfyui.md):

* T5 runs without an attention mask, as ComfyUI's ``t5_attention_mask=False``.
* CLIP-L and CLIP-G give their penultimate hidden state (``hidden_states[-2]``, no final layer norm).
  Pooled: CLIP-L's unprojected, final-layer-normed feature at the first end token (768); CLIP-G's feature
  there passed through ``text_projection`` (1280).
* ``context = pad(cat(l_hidden, g_hidden, -1), 4096)`` -> [B, 77, 4096]; with T5 its last hidden state is
  appended along the tokens -> [B, 77 + t5_max_length, 4096]. T5 off: 77 tokens, no T5 tokens at all.
  ``pooled = cat(l_pooled, g_pooled)`` -> [B, 2048].
* A missing CLIP-L: ComfyUI does ``pad(g_out, (768, 0))`` (768 zero channels in front of CLIP-G) and
  ``l_pooled = zeros(768)``; a missing CLIP-G: the context holds CLIP-L then zeros, and ``g_pooled =
  zeros(1280)``. Both mirrored here.
* The conditioning is returned in float32 whatever dtype the encoders run in (ComfyUI returns ``.float()``).

Encoder configs are inferred from the state dicts (HF layout), so small test or demo encoders work too: a T5
narrower than 4096 is zero-padded on the channel axis like the CLIP pair (a no-op for the real T5-XXL).
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping

import torch
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from ..errors import CheckpointError, TokenizerNotFoundError
from .tokenizers import (
    CLIP_G_PAD_ID,
    CLIP_LENGTH,
    ENV_TOKENIZERS,
    Tokenizers,
    load_tokenizers,
    tokenize_clip,
    tokenize_t5,
    warn_unknown_words,
)

POOLED_DIM = 2048  # the MM-DiT's pooled input: CLIP-L 768 + CLIP-G 1280
CONTEXT_DIM = 4096  # SD3 context width (T5-XXL's d_model); the CLIP pair is zero-padded up to it
CLIP_L_WIDTH = 768  # ComfyUI's zeros for a missing CLIP-L (hidden and pooled)
CLIP_G_POOLED = 1280  # ComfyUI's zeros for a missing CLIP-G pooled output
CLIP_HEAD_DIM = 64
# Widths of the released SD3.5 text encoders; pass as ``expect_widths`` to reject anything else.
RELEASED_WIDTHS = {"clip_l": 768, "clip_g": 1280, "t5": 4096}
# The released activations: OpenAI CLIP ViT-L/14 uses quick_gelu, OpenCLIP bigG uses exact gelu.
CLIP_ACTIVATIONS = {"clip_l": "quick_gelu", "clip_g": "gelu"}
SLOT_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5-XXL"}


# ------------------------------------------------------------------------------------ configs from weights


def _looks_like(sd: Mapping[str, torch.Tensor]) -> str:
    """A short guess at what a state dict holds, for error messages."""
    keys = list(sd)
    if any(k.startswith("text_encoders.") for k in keys):
        return "a single-file checkpoint (split it with checkpoint.split_by_prefix first)"
    if "text_model.embeddings.token_embedding.weight" in sd:
        width = sd["text_model.embeddings.token_embedding.weight"].shape[-1]
        return f"a CLIP text encoder of width {width}"
    if "shared.weight" in sd or any(k.startswith("encoder.block.") for k in keys):
        return "a T5 encoder"
    if any(k.startswith(("model.diffusion_model.", "transformer_blocks.", "joint_blocks.")) for k in keys):
        return "a diffusion model"
    return f"something else (first keys: {', '.join(keys[:3]) or 'none'})"


def _require(sd, slot: str, key: str, ndim: int, what: str) -> torch.Tensor:
    """``sd[key]`` checked to exist with ``ndim`` dimensions, else a CheckpointError naming slot and key."""
    name = SLOT_NAMES[slot]
    if key not in sd:
        raise CheckpointError(
            f"{name} text encoder ({slot}): key '{key}' ({what}) is missing; the state dict looks like "
            f"{_looks_like(sd)}"
        )
    tensor = sd[key]
    if tensor.ndim != ndim:
        raise CheckpointError(
            f"{name} text encoder ({slot}): '{key}' has shape {list(tensor.shape)}, expected {ndim} dims ({what})"
        )
    return tensor


def _check_width(slot: str, key: str, shape, width: int, expect_width: int | None) -> None:
    if expect_width is not None and width != expect_width:
        raise CheckpointError(
            f"{SLOT_NAMES[slot]} text encoder ({slot}): '{key}' has shape {list(shape)}, a text encoder of width "
            f"{width}; expected width {expect_width} for this slot ({_looks_like_slot(slot, width)})"
        )


def _looks_like_slot(slot: str, width: int) -> str:
    others = [SLOT_NAMES[s] for s, w in RELEASED_WIDTHS.items() if w == width and s != slot]
    return f"width {width} is {others[0]}'s" if others else "no released SD3 text encoder has that width"


def _count_layers(sd, pattern: str) -> int:
    """Number of consecutive layers 0..n-1 whose keys match ``pattern`` (with a group for the index)."""
    indices = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def infer_clip_config(sd: Mapping[str, torch.Tensor], slot: str, expect_width: int | None = None,
                      min_positions: int = CLIP_LENGTH) -> CLIPTextConfig:
    """CLIPTextConfig from an HF-layout CLIP text encoder state dict (``text_model.*``, ``text_projection``).

    Heads are hidden / 64 (all CLIP text towers); ``hidden_act`` is quick_gelu for the CLIP-L slot and gelu for
    the CLIP-G slot, as the released models (OpenAI ViT-L/14, OpenCLIP bigG).
    """
    tok_key = "text_model.embeddings.token_embedding.weight"
    token_emb = _require(sd, slot, tok_key, 2, "token embedding [vocab, hidden]")
    vocab, hidden = token_emb.shape
    _check_width(slot, tok_key, token_emb.shape, hidden, expect_width)
    positions = _require(sd, slot, "text_model.embeddings.position_embedding.weight", 2,
                         "position embedding [positions, hidden]").shape[0]
    if positions < min_positions:
        raise CheckpointError(f"{SLOT_NAMES[slot]} ({slot}): {positions} position embeddings, need {min_positions} "
                              "(one per token of a CLIP row)")
    fc1 = _require(sd, slot, "text_model.encoder.layers.0.mlp.fc1.weight", 2, "first MLP [intermediate, hidden]")
    if hidden % CLIP_HEAD_DIM:
        raise CheckpointError(
            f"{SLOT_NAMES[slot]} ({slot}): hidden size {hidden} is not a multiple of the head size {CLIP_HEAD_DIM}"
        )
    projection_dim = hidden
    if slot == "clip_g":
        projection_dim = _require(sd, slot, "text_projection.weight", 2, "projection [proj, hidden]").shape[0]
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=fc1.shape[0],
        num_hidden_layers=_count_layers(sd, r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=hidden // CLIP_HEAD_DIM, max_position_embeddings=positions,
        hidden_act=CLIP_ACTIVATIONS[slot], projection_dim=projection_dim, layer_norm_eps=1e-5,
        # Only transformers' own pooler_output reads these (encode_clip pools at the tokenizer's end token); kept
        # inside a smaller vocabulary (the toy world's) so that transformers does not warn about them.
        bos_token_id=min(49406, vocab - 1), eos_token_id=min(49407, vocab - 1), pad_token_id=min(49407, vocab - 1),
    )


def _t5_embedding(sd) -> tuple[str, torch.Tensor] | None:
    for key in ("shared.weight", "encoder.embed_tokens.weight"):
        if key in sd:
            return key, sd[key]
    return None


def infer_t5_config(sd: Mapping[str, torch.Tensor], expect_width: int | None = None) -> T5Config:
    """T5Config of an HF T5 encoder state dict: d_model, d_kv, heads (relative_attention_bias), d_ff, layers,
    gated-gelu (``wi_0``/``wi_1``, T5 v1.1 / T5-XXL) or relu (``wi``)."""
    slot = "t5"
    emb_key = (_t5_embedding(sd) or ("shared.weight", None))[0]
    emb = _require(sd, slot, emb_key, 2, "token embedding [vocab, d_model]")
    vocab, d_model = emb.shape
    _check_width(slot, emb_key, emb.shape, d_model, expect_width)
    block = "encoder.block.0.layer."
    q = _require(sd, slot, block + "0.SelfAttention.q.weight", 2, "query [heads * d_kv, d_model]")
    bias = _require(sd, slot, block + "0.SelfAttention.relative_attention_bias.weight", 2,
                    "relative attention bias [buckets, heads]")
    gated = block + "1.DenseReluDense.wi_0.weight" in sd
    wi = _require(sd, slot, block + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight"),
                  2, "feed-forward input [d_ff, d_model]")
    buckets, heads = bias.shape
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=q.shape[0] // heads, d_ff=wi.shape[0], num_heads=heads,
        num_layers=_count_layers(sd, r"encoder\.block\.(\d+)\."), relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False,
        dropout_rate=0.0, layer_norm_epsilon=1e-6,
    )


# ------------------------------------------------------------------------------------------- model building


def _file_prefix(model: nn.Module) -> str:
    """Prefix the files put before the model's own keys: 'text_model.' for transformers >= 5's flattened
    CLIPTextModel, '' where the model's keys already are the file layout (v4 CLIP, CLIP-G, T5)."""
    keys = model.state_dict().keys()
    is_clip = any("embeddings.token_embedding" in k for k in keys)
    return "text_model." if is_clip and not any(k.startswith("text_model.") for k in keys) else ""


def _check_keys(model: nn.Module, sd: Mapping[str, torch.Tensor], slot: str, may_miss: set[str]) -> None:
    """Strict key and shape check of file-layout ``sd`` against ``model`` (on meta), raising CheckpointError."""
    prefix = _file_prefix(model)
    expected = {prefix + k: v for k, v in model.state_dict().items()}
    name = f"{SLOT_NAMES[slot]} text encoder ({slot})"
    missing = sorted(set(expected) - set(sd) - may_miss)
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: state dict does not fit the inferred architecture; missing keys: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; unexpected keys: {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (it looks like {_looks_like(sd)})"
        )
    for key, tensor in sd.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{name}: '{key}' has shape {list(tensor.shape)}, expected {list(expected[key].shape)}"
            )


def _load(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Assign the checked file-layout tensors to the meta-built ``model``."""
    prefix = _file_prefix(model)
    model.load_state_dict({k[len(prefix):]: v for k, v in sd.items()}, strict=False, assign=True)


def _materialize_buffers(model: nn.Module) -> None:
    """Re-create the non-persistent ``position_ids`` buffers left on the meta device by meta construction."""
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise CheckpointError(f"buffer '{module_name}.{name}' was not loaded")
            module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)


def _finish(model: nn.Module, dtype, device) -> nn.Module:
    model.to(device=device, dtype=dtype or torch.float32)
    model.eval().requires_grad_(False)
    return model


def build_clip(sd: Mapping[str, torch.Tensor], slot: str, expect_width: int | None = None, dtype=None,
               device=None) -> nn.Module:
    """CLIPTextModel (slot ``clip_l``) or CLIPTextModelWithProjection (``clip_g``) loaded strictly from ``sd``.

    Tolerated: a saved ``text_model.embeddings.position_ids`` buffer (dropped) and CLIP-L's
    ``text_projection.weight`` (present or not: CLIP-L's pooled output is unprojected). Weights default to
    float32.
    """
    config = infer_clip_config(sd, slot, expect_width)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if slot == "clip_l":
        sd.pop("text_projection.weight", None)
    cls = CLIPTextModel if slot == "clip_l" else CLIPTextModelWithProjection
    with torch.device("meta"):
        model = cls(config)
    _check_keys(model, sd, slot, may_miss=set())
    _load(model, sd)
    _materialize_buffers(model)
    return _finish(model, dtype, device)


def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """transformers' T5 feed-forward without its cast of the activations to ``wo.weight.dtype``: with a packed
    ``wo`` that dtype is the storage's (uint8, float8), not the compute dtype."""
    if hasattr(self, "wi_0"):
        hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
    else:
        hidden = self.act(self.wi(hidden_states))
    return self.wo(self.dropout(hidden))


def _keep_feed_forward_dtype(model: nn.Module) -> None:
    for module in model.modules():
        if type(module).__name__ in ("T5DenseGatedActDense", "T5DenseActDense"):
            module.forward = types.MethodType(_feed_forward, module)


def build_t5(sd: Mapping[str, torch.Tensor], expect_width: int | None = None, dtype=None, device=None,
             quant_scheme=None) -> nn.Module:
    """T5EncoderModel loaded strictly from ``sd``; ``encoder.embed_tokens.weight`` is tied to ``shared.weight``
    (either may be the one stored). Weights default to float32. ``quant_scheme`` (a
    :class:`~..quant.QuantScheme`) says the Linears of ``sd`` are stored packed in that format."""
    from .. import quant

    layers = quant.stored_layers(sd, quant_scheme.fmt, "T5 text encoder (t5)") if quant_scheme else {}
    config = infer_t5_config(quant.logical_shapes(sd, layers) if layers else sd, expect_width)
    emb_key, emb = _t5_embedding(sd)
    sd = {k: v for k, v in sd.items() if k not in ("encoder.embed_tokens.weight", quant.FP8_MARKER)}
    sd["shared.weight"] = emb
    with torch.device("meta"):
        model = T5EncoderModel(config)
    if layers:
        quant.install_packed(model, sd, layers, quant_scheme.fmt, "T5 text encoder (t5)")
        _keep_feed_forward_dtype(model)
    _check_keys(model, sd, "t5", may_miss={"encoder.embed_tokens.weight"})
    _load(model, sd)
    model.encoder.embed_tokens.weight = model.shared.weight
    _materialize_buffers(model)
    return _finish(model, dtype, device)


# ------------------------------------------------------------------------------------------- conditioning


def first_eos_position(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B] index of the first ``eos_id`` in each row of ``ids`` (every row must contain one)."""
    is_eos = ids == eos_id
    if not bool(is_eos.any(dim=-1).all()):
        raise ValueError(f"every token row needs an end token {eos_id}")
    positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    return positions.masked_fill(~is_eos, ids.shape[-1]).min(dim=-1).values


def encode_clip(model: nn.Module, ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden state [B, 77, H], pooled [B, P]) of a CLIP text tower, causal mask only.

    Pooled is the final-layer-normed feature at the first end token, projected when the model has a
    ``text_projection`` (CLIP-G) and unprojected otherwise (CLIP-L).
    """
    transformer = getattr(model, "text_model", model)  # transformers 5's CLIPTextModel is the transformer itself
    out = transformer(input_ids=ids, output_hidden_states=True)
    rows = torch.arange(ids.shape[0], device=ids.device)
    pooled = out.last_hidden_state[rows, first_eos_position(ids, eos_id)]
    if hasattr(model, "text_projection"):
        pooled = model.text_projection(pooled)
    return out.hidden_states[-2].float(), pooled.float()


def encode_t5(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """T5 encoder last hidden state [B, L, d_model] (final layer norm applied), no attention mask."""
    return model(input_ids=ids).last_hidden_state.float()


def _pad_channels(x: torch.Tensor, width: int = CONTEXT_DIM) -> torch.Tensor:
    return nn.functional.pad(x, (0, width - x.shape[-1]))


def assemble_conditioning(l_out, g_out, t5_out, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 (context, pooled) from the encoder outputs, each None when that encoder is absent.

    Mirrors ``SD3ClipModel.encode_token_weights``: ``l_out``/``g_out`` are (hidden, pooled), ``t5_out`` a hidden
    state. CLIP-L missing: 768 zero channels in front of CLIP-G and zero pooled; CLIP-G missing: zeros after
    CLIP-L (padding) and zero pooled (1280); nothing at all: zeros [B, 77, 4096] and [B, 2048]. A pooled vector
    narrower than 2048 (encoders smaller than the released ones) is zero-padded on the right, like the context.
    """
    l_pooled = l_out[1] if l_out is not None else torch.zeros(batch, CLIP_L_WIDTH, device=device)
    g_pooled = g_out[1] if g_out is not None else torch.zeros(batch, CLIP_G_POOLED, device=device)
    pooled = torch.cat([l_pooled, g_pooled], dim=-1)
    # narrower-than-released encoders (test and demo models): zero-pad like the context
    if pooled.shape[-1] < POOLED_DIM:
        pooled = _pad_channels(pooled, POOLED_DIM)
    if l_out is not None and g_out is not None:
        lg = torch.cat([l_out[0], g_out[0]], dim=-1)
    elif g_out is not None:
        lg = nn.functional.pad(g_out[0], (CLIP_L_WIDTH, 0))
    else:
        lg = l_out[0] if l_out is not None else None
    parts = [_pad_channels(lg)] if lg is not None else []
    if t5_out is not None:
        parts.append(_pad_channels(t5_out))
    if not parts:
        parts.append(torch.zeros(batch, CLIP_LENGTH, CONTEXT_DIM, device=device))
    return torch.cat(parts, dim=-2).float(), pooled.float()


class TripleTextEncoder(nn.Module):
    """CLIP-L + CLIP-G + optional T5-XXL giving SD3 conditioning (docs/algorithm.md "Text encoders and T5 dropout").

    ``encode`` returns float32 ``context`` [B, 77 (+ 77 T5), 4096] and ``pooled`` [B, 2048] whatever
    dtype the encoders run in. ``tokenizers`` None: loaded on first use with ``load_tokenizers()``. The row
    lengths are the tokenizers' (77 and 77 unless a folder declares others); ``t5_max_length`` overrides T5's.
    """

    def __init__(self, clip_l=None, clip_g=None, t5=None, tokenizers: Tokenizers | None = None,
                 t5_max_length: int | None = None):
        super().__init__()
        if clip_l is None and clip_g is None:
            raise CheckpointError("TripleTextEncoder needs CLIP-L and/or CLIP-G (got neither)")
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizers = tokenizers
        self.t5_max_length = t5_max_length
        self._check_widths()

    def _check_widths(self) -> None:
        l_width = self.clip_l.config.hidden_size if self.clip_l is not None else CLIP_L_WIDTH
        g_width = self.clip_g.config.hidden_size if self.clip_g is not None else 0
        if l_width + g_width > CONTEXT_DIM:
            raise CheckpointError(f"CLIP-L width {l_width} + CLIP-G width {g_width} exceed the context {CONTEXT_DIM}")
        if self.t5 is not None and self.t5.config.d_model > CONTEXT_DIM:
            raise CheckpointError(f"T5 width {self.t5.config.d_model} exceeds the context width {CONTEXT_DIM}")

    @classmethod
    def from_state_dicts(cls, clip_l=None, clip_g=None, t5=None, tokenizers: Tokenizers | None = None, dtype=None,
                         device=None, *, t5_max_length: int | None = None,
                         expect_widths: Mapping[str, int] | None = None, t5_quant=None) -> TripleTextEncoder:
        """Build from HF-layout state dicts (None for an absent encoder; at least one CLIP).

        ``dtype`` (default float32) and ``device`` apply to the encoders; ``expect_widths`` (e.g.
        ``RELEASED_WIDTHS``) rejects encoders of another width per slot with a CheckpointError; ``t5_quant``
        (a QuantScheme) reads a T5 stored in a quantized format.
        """
        if clip_l is None and clip_g is None:
            raise CheckpointError("TripleTextEncoder needs a CLIP-L and/or CLIP-G state dict (got neither)")
        widths = dict(expect_widths or {})
        models = {
            slot: build_clip(sd, slot, widths.get(slot), dtype, device)
            for slot, sd in (("clip_l", clip_l), ("clip_g", clip_g)) if sd is not None
        }
        t5_model = build_t5(t5, widths.get("t5"), dtype, device, t5_quant) if t5 is not None else None
        return cls(models.get("clip_l"), models.get("clip_g"), t5_model, tokenizers, t5_max_length)

    @property
    def has_t5(self) -> bool:
        return self.t5 is not None

    def _tokenizers(self) -> Tokenizers:
        if self.tokenizers is None:
            self.tokenizers = load_tokenizers()
        return self.tokenizers

    @property
    def clip_length(self) -> int:
        """Tokens in a CLIP row (the CLIP part of the context)."""
        return self._tokenizers().clip_length

    @property
    def t5_length(self) -> int:
        """Tokens in a T5 row: ``t5_max_length`` when given, else the tokenizer's."""
        return self.t5_max_length or self._tokenizers().t5_length

    def tokenize(self, prompts: list[str], use_t5: bool = True) -> dict[str, torch.Tensor]:
        """{'clip_l': [B, clip_length], 'clip_g': [B, clip_length]} plus 't5': [B, t5_length] when ``use_t5`` and
        T5 is loaded (77 each unless the tokenizer folder declares shorter rows). Words the tokenizers read as
        unknown give one warning naming them (:func:`warn_unknown_words`)."""
        toks = self._tokenizers()
        warn_unknown_words(toks, prompts, use_t5 and self.has_t5)
        out = {
            "clip_l": tokenize_clip(toks.clip_l, prompts, pad_id=toks.clip_l.eos_token_id, length=toks.clip_length),
            "clip_g": tokenize_clip(toks.clip_g, prompts, pad_id=CLIP_G_PAD_ID, length=toks.clip_length),
        }
        if use_t5 and self.has_t5:
            if toks.t5 is None:
                raise TokenizerNotFoundError(
                    "T5 is loaded but no T5 tokenizer (tokenizer.json) was found: put it in a t5xxl/ folder beside "
                    f"the CLIP tokenizer, set {ENV_TOKENIZERS}, pass --tokenizers PATH, or encode with use_t5=False"
                )
            out["t5"] = tokenize_t5(toks.t5, prompts, self.t5_length)
        return out

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, use_t5: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, L, 4096], pooled [B, 2048]) in float32; L = 77, or 77 + t5_max_length with T5.

        ``use_t5=False`` (or no T5 loaded) gives the 77 CLIP tokens only, no T5 tokens at all.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = self._device()
        tokens = {k: v.to(device) for k, v in self.tokenize(prompts, use_t5).items()}
        toks = self._tokenizers()
        l_out = g_out = None
        if self.clip_l is not None:
            l_out = encode_clip(self.clip_l, tokens["clip_l"], toks.clip_l.eos_token_id)
        if self.clip_g is not None:
            g_out = encode_clip(self.clip_g, tokens["clip_g"], toks.clip_g.eos_token_id)
        t5_out = encode_t5(self.t5, tokens["t5"]) if "t5" in tokens else None
        return assemble_conditioning(l_out, g_out, t5_out, len(prompts), device)

    def forward(self, prompts: list[str] | str, use_t5: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts, use_t5)

__all__ = [
    "CLIP_ACTIVATIONS",
    "CLIP_G_POOLED",
    "CLIP_HEAD_DIM",
    "CLIP_L_WIDTH",
    "CONTEXT_DIM",
    "POOLED_DIM",
    "RELEASED_WIDTHS",
    "SLOT_NAMES",
    "TripleTextEncoder",
    "assemble_conditioning",
    "build_clip",
    "build_t5",
    "encode_clip",
    "encode_t5",
    "first_eos_position",
    "infer_clip_config",
    "infer_t5_config",
]
