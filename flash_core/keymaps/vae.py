"""VAE key mapping between the official layout (Stability ``SDVAE`` / ComfyUI ``first_stage_model``) and diffusers.

docs/checkpoints.md "VAE". Keys are unprefixed. The two layouts differ in names only, except that

- decoder levels are numbered in opposite orders: official ``decoder.up.i`` (finest first) is diffusers
  ``decoder.up_blocks.(n-1-i)`` (coarsest first), n = number of levels in the state dict;
- the mid-block attention projections are 1x1 convs ``[C, C, 1, 1]`` officially and ``Linear`` ``[C, C]``
  in diffusers (a reshape, so conversion round-trips bitwise).

Unknown keys raise :class:`CheckpointError` naming the key. Tensors are never copied: values are the same
tensors or reshaped views, so meta tensors (shape-only inference) work too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from ..errors import CheckpointError

_P = r"(weight|bias)"
_RESNET_TO_DIFFUSERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                        "nin_shortcut": "conv_shortcut"}
_RESNET_TO_OFFICIAL = {v: k for k, v in _RESNET_TO_DIFFUSERS.items()}
_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Older diffusers files name the attention projections query/key/value/proj_attn; they are read too.
_ATTN_TO_OFFICIAL = {**{v: k for k, v in _ATTN_TO_DIFFUSERS.items()},
                     "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTN_PROJECTIONS = ("q", "k", "v", "proj_out")

_RES_OFFICIAL = "(" + "|".join(_RESNET_TO_DIFFUSERS) + ")"
_RES_DIFFUSERS = "(" + "|".join(_RESNET_TO_OFFICIAL) + ")"
_ATTN_OFFICIAL = "(" + "|".join(_ATTN_TO_DIFFUSERS) + ")"
_ATTN_DIFFUSERS = "(" + "|".join(re.escape(k) for k in _ATTN_TO_OFFICIAL) + ")"

Rule = tuple[re.Pattern, Callable[[re.Match, int], str]]


def _rules(pairs: list[tuple[str, Callable[[re.Match, int], str]]]) -> list[Rule]:
    return [(re.compile(pattern + r"\Z"), build) for pattern, build in pairs]


# (official pattern, builder of the diffusers key from the match and the number of decoder levels n)
_OFFICIAL_RULES = _rules([
    (rf"(encoder|decoder)\.(conv_in|conv_out)\.{_P}", lambda m, n: m[0]),
    (rf"(encoder|decoder)\.norm_out\.{_P}", lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (rf"encoder\.down\.(\d+)\.block\.(\d+)\.{_RES_OFFICIAL}\.{_P}",
     lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_TO_DIFFUSERS[m[3]]}.{m[4]}"),
    (rf"encoder\.down\.(\d+)\.downsample\.conv\.{_P}",
     lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (rf"decoder\.up\.(\d+)\.block\.(\d+)\.{_RES_OFFICIAL}\.{_P}",
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_TO_DIFFUSERS[m[3]]}.{m[4]}"),
    (rf"decoder\.up\.(\d+)\.upsample\.conv\.{_P}",
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
    (rf"(encoder|decoder)\.mid\.block_([12])\.{_RES_OFFICIAL}\.{_P}",
     lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_TO_DIFFUSERS[m[3]]}.{m[4]}"),
    (rf"(encoder|decoder)\.mid\.attn_1\.{_ATTN_OFFICIAL}\.{_P}",
     lambda m, n: f"{m[1]}.mid_block.attentions.0.{_ATTN_TO_DIFFUSERS[m[2]]}.{m[3]}"),
])

# (diffusers pattern, builder of the official key)
_DIFFUSERS_RULES = _rules([
    (rf"(encoder|decoder)\.(conv_in|conv_out)\.{_P}", lambda m, n: m[0]),
    (rf"(encoder|decoder)\.conv_norm_out\.{_P}", lambda m, n: f"{m[1]}.norm_out.{m[2]}"),
    (rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.{_RES_DIFFUSERS}\.{_P}",
     lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET_TO_OFFICIAL[m[3]]}.{m[4]}"),
    (rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_P}",
     lambda m, n: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
    (rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{_RES_DIFFUSERS}\.{_P}",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{_RESNET_TO_OFFICIAL[m[3]]}.{m[4]}"),
    (rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_P}",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    (rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.{_RES_DIFFUSERS}\.{_P}",
     lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET_TO_OFFICIAL[m[3]]}.{m[4]}"),
    (rf"(encoder|decoder)\.mid_block\.attentions\.0\.{_ATTN_DIFFUSERS}\.{_P}",
     lambda m, n: f"{m[1]}.mid.attn_1.{_ATTN_TO_OFFICIAL[m[2]]}.{m[3]}"),
])


def official_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official VAE names -> diffusers ``AutoencoderKL`` names; attention 1x1 conv weights become Linear."""
    n = _decoder_levels(sd, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, tensor in sd.items():
        new_key = _convert_key(key, _OFFICIAL_RULES, n, "official SD3 VAE", "diffusers_to_official")
        out[new_key] = tensor.flatten(1) if _is_attn_projection(key) else tensor
    return out


def diffusers_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` names -> official VAE names; attention Linear weights become 1x1 convs."""
    n = _decoder_levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, tensor in sd.items():
        new_key = _convert_key(key, _DIFFUSERS_RULES, n, "diffusers AutoencoderKL", "official_to_diffusers")
        out[new_key] = tensor.reshape(*tensor.shape, 1, 1) if _is_attn_projection(new_key) and tensor.ndim == 2 \
            else tensor
    return out


def _convert_key(key: str, rules: list[Rule], n: int, layout: str, other: str) -> str:
    for pattern, build in rules:
        m = pattern.match(key)
        if m:
            return build(m, n)
    raise CheckpointError(f"unknown VAE key '{key}': it is not part of the {layout} layout "
                          f"(docs/checkpoints.md 'VAE'; for the other layout use {other})")


def _is_attn_projection(official_key: str) -> bool:
    parts = official_key.split(".")
    return len(parts) == 5 and parts[1:3] == ["mid", "attn_1"] and parts[3] in _ATTN_PROJECTIONS \
        and parts[4] == "weight"


def _decoder_levels(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """Number of decoder levels present (needed to reverse their order); 0 for an encoder-only dict."""
    rx = re.compile(pattern)
    found = [int(m[1]) for m in map(rx.match, sd) if m]
    return max(found) + 1 if found else 0
