"""Parity with diffusers' SD3Transformer2DModel on random weights converted by our keymap."""

from __future__ import annotations

import pytest
import torch

from sd35_flash.flash_core.errors import CheckpointError
from sd35_flash.flash_core.keymaps.mmdit import diffusers_config, diffusers_to_official, official_to_diffusers
from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig

diffusers = pytest.importorskip("diffusers")

MMDIT_X = MMDiTConfig(
    depth=3,
    hidden_size=128,
    pos_embed_max_size=16,
    adm_in_channels=32,
    context_in_channels=48,
    dual_attention_layers=(0, 1),
)
SD3_PLAIN = MMDiTConfig(
    depth=2, hidden_size=128, pos_embed_max_size=16, adm_in_channels=32, context_in_channels=48, qk_norm=False
)


def random_model(config: MMDiTConfig, seed: int = 0) -> MMDiT:
    """Every parameter random at a reasonable scale, the zero-init adaLN and final layer included."""
    model = MMDiT(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def diffusers_model(config: MMDiTConfig):
    return diffusers.SD3Transformer2DModel(**diffusers_config(config)).eval()


def max_abs_diff_vs_diffusers(config: MMDiTConfig, height: int, width: int, batch: int = 2) -> float:
    ours = random_model(config)
    theirs = diffusers_model(config)
    theirs.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, height, width, generator=gen)
    t = torch.tensor([900.0, 37.5])[:batch]
    context = torch.randn(batch, 11, config.context_in_channels, generator=gen)
    y = torch.randn(batch, config.adm_in_channels, generator=gen)
    with torch.no_grad():
        a = ours(x, t, context, y)
        b = theirs(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=context,
            pooled_projections=y,
            return_dict=False,
        )[0]
    assert a.abs().mean() > 0.1, "the outputs are near zero: the comparison would be vacuous"
    return (a - b).abs().max().item()


def test_mmdit_x_matches_diffusers_for_a_non_square_latent_batch_2():
    err = max_abs_diff_vs_diffusers(MMDIT_X, height=12, width=8)
    print(f"MM-DiT-X (dual 0,1 + plain last, RMS qk-norm) 12x8 latent, batch 2: max abs diff {err:.3e}")
    assert err <= 1e-4


def test_original_sd3_shape_matches_diffusers():
    err = max_abs_diff_vs_diffusers(SD3_PLAIN, height=10, width=14)
    print(f"SD3 (no qk-norm, no dual attention) 10x14 latent, batch 2: max abs diff {err:.3e}")
    assert err <= 1e-4


def test_fresh_positional_table_equals_diffusers_table():
    ours = MMDiT(MMDIT_X).pos_embed
    theirs = diffusers_model(MMDIT_X).pos_embed.pos_embed
    assert (ours - theirs).abs().max() < 1e-6


@pytest.mark.parametrize("config", [MMDIT_X, SD3_PLAIN], ids=["mmdit-x", "sd3"])
def test_key_conversion_round_trips_bitwise(config):
    official = random_model(config).state_dict()
    there = official_to_diffusers(official)
    assert set(there) == set(diffusers_model(config).state_dict())
    back = diffusers_to_official(there)
    assert set(back) == set(official)
    assert all(torch.equal(back[k], official[k]) for k in official)
    again = official_to_diffusers(back)
    assert set(again) == set(there) and all(torch.equal(again[k], there[k]) for k in there)


def test_diffusers_state_dict_converts_to_official_and_back_bitwise():
    theirs = diffusers_model(MMDIT_X).state_dict()
    official = diffusers_to_official(theirs)
    assert MMDiTConfig.from_state_dict(official) == MMDIT_X
    MMDiT(MMDIT_X).load_state_dict(official, strict=True)
    back = official_to_diffusers(official)
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_last_context_block_and_final_layer_are_swapped():
    official = random_model(MMDIT_X).state_dict()
    there = official_to_diffusers(official)
    d = MMDIT_X.hidden_size
    last = official["joint_blocks.2.context_block.adaLN_modulation.1.bias"]
    assert torch.equal(there["transformer_blocks.2.norm1_context.linear.bias"][:d], last[d:])
    final = official["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(there["norm_out.linear.weight"][d:], final[:d])
    first = official["joint_blocks.0.context_block.adaLN_modulation.1.bias"]
    assert torch.equal(there["transformer_blocks.0.norm1_context.linear.bias"], first)


def test_unknown_keys_are_named():
    official = random_model(SD3_PLAIN).state_dict()
    official["joint_blocks.0.x_block.surprise.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"joint_blocks\.0\.x_block\.surprise\.weight"):
        official_to_diffusers(official)
    with pytest.raises(CheckpointError, match="register"):
        official_to_diffusers({"register": torch.zeros(1)})
    theirs = official_to_diffusers(random_model(SD3_PLAIN).state_dict())
    theirs["transformer_blocks.1.attn.to_qq.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.attn\.to_qq\.weight"):
        diffusers_to_official(theirs)


def test_missing_q_k_or_v_is_named():
    theirs = official_to_diffusers(random_model(SD3_PLAIN).state_dict())
    del theirs["transformer_blocks.0.attn.add_k_proj.bias"]
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn\.add_k_proj\.bias"):
        diffusers_to_official(theirs)
