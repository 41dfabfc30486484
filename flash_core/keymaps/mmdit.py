"""MM-DiT keys: official (Stability / ComfyUI, prefix stripped) <-> diffusers ``SD3Transformer2DModel``.

The table is docs/checkpoints.md "Official -> diffusers key mapping". Three transforms besides renaming:
- the fused ``qkv`` Linear is split into ``to_q/to_k/to_v`` (context stream: ``add_q/k/v_proj``) and back;
- the LAST context block's adaLN and ``final_layer.adaLN_modulation`` are stored (shift, scale) officially and
  (scale, shift) in diffusers: their rows are swapped;
- the last context block has no attention proj and no MLP, and only dual-attention x_blocks have ``attn2``
  (both follow from which keys exist, so nothing here needs the config).
Both directions copy values bit for bit; an unknown key raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

_GLOBAL = {
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "context_embedder.weight": "context_embedder.weight",
    "context_embedder.bias": "context_embedder.bias",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.linear.bias": "proj_out.bias",
}
for _off, _dif in (
    ("t_embedder", "time_text_embed.timestep_embedder"),
    ("y_embedder", "time_text_embed.text_embedder"),
):
    for _param in ("weight", "bias"):
        _GLOBAL[f"{_off}.mlp.0.{_param}"] = f"{_dif}.linear_1.{_param}"
        _GLOBAL[f"{_off}.mlp.2.{_param}"] = f"{_dif}.linear_2.{_param}"
_FINAL_ADALN = {f"final_layer.adaLN_modulation.1.{p}": f"norm_out.linear.{p}" for p in ("weight", "bias")}

# Renames inside joint_blocks.i (official suffix -> diffusers suffix under transformer_blocks.i).
_BLOCK_MODULES = {
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
# Fused qkv (official module) -> the three diffusers modules.
_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SWAPPED_IN_LAST_BLOCK = "context_block.adaLN_modulation.1"

_OFFICIAL_BLOCK = re.compile(r"joint_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def diffusers_config(config) -> dict:
    """The ``SD3Transformer2DModel`` config (its ``config.json`` fields) for an :class:`MMDiTConfig`.

    Plain data, so writing a diffusers folder needs no diffusers import. ``sample_size`` 128 is what the
    released SD3.x configs use (it sets the sin-cos table's base size; the table itself travels in the weights).
    """
    return {
        "sample_size": 128,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "num_layers": config.depth,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_channels,
        "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.adm_in_channels,
        "out_channels": config.out_channels,
        "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": list(config.dual_attention_layers),
        "qk_norm": "rms_norm" if config.qk_norm else None,
    }


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): swap the two halves along dim 0. Its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _last_block(keys, pattern: re.Pattern) -> int:
    ids = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(ids) if ids else -1


def official_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MM-DiT keys -> diffusers ``SD3Transformer2DModel`` keys (both unprefixed).

    Renamed tensors are passed through; split q/k/v are independent copies (safe to save with safetensors).
    """
    last = _last_block(sd, _OFFICIAL_BLOCK)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _GLOBAL:
            out[_GLOBAL[key]] = value
        elif key in _FINAL_ADALN:
            out[_FINAL_ADALN[key]] = swap_halves(value)
        elif m := _OFFICIAL_BLOCK.match(key):
            index, module, param = int(m.group(1)), m.group(2), m.group(3)
            prefix = f"transformer_blocks.{index}"
            if module in _QKV:
                if value.shape[0] % 3:
                    raise CheckpointError(f"'{key}' has {value.shape[0]} rows, not a multiple of 3 (q, k, v)")
                for name, part in zip(_QKV[module], value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}.{name}.{param}"] = part.clone()
            elif module in _BLOCK_MODULES:
                swap = index == last and module == _SWAPPED_IN_LAST_BLOCK
                out[f"{prefix}.{_BLOCK_MODULES[module]}.{param}"] = swap_halves(value) if swap else value
            else:
                raise CheckpointError(f"unknown official MM-DiT key '{key}'")
        else:
            raise CheckpointError(f"unknown official MM-DiT key '{key}'")
    return out


_GLOBAL_INV = {v: k for k, v in _GLOBAL.items()}
_FINAL_ADALN_INV = {v: k for k, v in _FINAL_ADALN.items()}
_BLOCK_MODULES_INV = {v: k for k, v in _BLOCK_MODULES.items()}
_QKV_PART = {name: (fused, i) for fused, names in _QKV.items() for i, name in enumerate(names)}


def diffusers_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``SD3Transformer2DModel`` keys -> official MM-DiT keys (both unprefixed).

    q, k and v are concatenated into ``qkv``; a missing partner raises :class:`CheckpointError` naming it.
    """
    last = _last_block(sd, _DIFFUSERS_BLOCK)
    out: dict[str, torch.Tensor] = {}
    fused_parts: dict[str, list[str | None]] = {}
    for key, value in sd.items():
        if key in _GLOBAL_INV:
            out[_GLOBAL_INV[key]] = value
        elif key in _FINAL_ADALN_INV:
            out[_FINAL_ADALN_INV[key]] = swap_halves(value)
        elif m := _DIFFUSERS_BLOCK.match(key):
            index, module, param = int(m.group(1)), m.group(2), m.group(3)
            prefix = f"joint_blocks.{index}"
            if module in _QKV_PART:
                fused, part = _QKV_PART[module]
                fused_parts.setdefault(f"{prefix}.{fused}.{param}", [None, None, None])[part] = key
            elif module in _BLOCK_MODULES_INV:
                official = _BLOCK_MODULES_INV[module]
                swap = index == last and official == _SWAPPED_IN_LAST_BLOCK
                out[f"{prefix}.{official}.{param}"] = swap_halves(value) if swap else value
            else:
                raise CheckpointError(f"unknown diffusers MM-DiT key '{key}'")
        else:
            raise CheckpointError(f"unknown diffusers MM-DiT key '{key}'")
    for fused_key, part_keys in fused_parts.items():
        if None in part_keys:
            m = _OFFICIAL_BLOCK.match(fused_key)
            expected = [f"transformer_blocks.{m.group(1)}.{name}.{m.group(3)}" for name in _QKV[m.group(2)]]
            absent = [k for k in expected if k not in sd]
            raise CheckpointError(f"diffusers MM-DiT keys {absent} are missing: cannot build '{fused_key}'")
        out[fused_key] = torch.cat([sd[k] for k in part_keys], dim=0)
    return out
