"""The SD3 VAE (docs/checkpoints.md "VAE"): config inference, official names, latent formats, diffusers parity."""

from __future__ import annotations

import math

import pytest
import torch

from sd35_flash.flash_core.errors import CheckpointError
from sd35_flash.flash_core.keymaps import vae as vae_keys
from sd35_flash.flash_core.vae import (
    LATENT_CHANNELS,
    LATENT_SCALE,
    LATENT_SHIFT,
    SD3VAE,
    VAEConfig,
    process_in,
    process_out,
)

# Small but structurally complete: 4 levels (downscale 8), 2 res blocks, widths multiples of 32.
SMALL = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2)
PARITY_TOL = 1e-4


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, at a scale that keeps activations O(1): conv/linear weights ~ N(0, 1/fan_in),
    biases ~ N(0, 0.1), GroupNorm affine weight ~ 1 + N(0, 0.2) and bias ~ N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name.split(".")[-2]
            if name.endswith("bias"):
                p.copy_(noise * (0.2 if is_norm else 0.1))
            elif is_norm:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return module


def small_vae() -> SD3VAE:
    return randomize_(SD3VAE(SMALL).eval())


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=gen) * 2 - 1


# --------------------------------------------------------------------------------------------------------
# Latent format


def test_latent_constants_match_comfyui_sd3_format():
    assert (LATENT_SCALE, LATENT_SHIFT, LATENT_CHANNELS) == (1.5305, 0.0609, 16)


def test_process_in_shifts_then_scales_and_process_out_inverts_it():
    z = torch.randn(2, 16, 4, 6, dtype=torch.float64)
    assert torch.equal(process_in(z), (z - 0.0609) * 1.5305)
    torch.testing.assert_close(process_out(process_in(z)), z, rtol=0, atol=1e-12)
    torch.testing.assert_close(process_in(process_out(z)), z, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# Config


def test_default_config_is_the_released_sd3_vae():
    sd = SD3VAE(device="meta").state_dict()
    assert VAEConfig.from_state_dict(sd) == VAEConfig()
    assert VAEConfig().downscale_factor == 8
    n_params = sum(t.numel() for t in sd.values())
    assert 83_000_000 < n_params < 84_500_000, n_params


@pytest.mark.parametrize("config", [SMALL, VAEConfig(base_channels=64, channel_mult=(1, 2, 4), num_res_blocks=1)])
def test_config_is_inferred_from_shapes_and_keys(config):
    sd = SD3VAE(config, device="meta").state_dict()
    assert VAEConfig.from_state_dict(sd) == config


def test_config_dict_round_trip():
    d = SMALL.to_dict()
    assert d["channel_mult"] == [1, 2, 2, 2]
    assert VAEConfig.from_dict(d) == SMALL
    with pytest.raises(ValueError, match="resolution"):
        VAEConfig.from_dict({**d, "resolution": 256})


def test_sd1_vae_is_refused_naming_the_key_and_the_expected_16_channels():
    sd = SD3VAE(VAEConfig(base_channels=32, latent_channels=4), device="meta").state_dict()
    sd["quant_conv.weight"] = torch.empty(8, 8, 1, 1, device="meta")
    sd["post_quant_conv.weight"] = torch.empty(4, 4, 1, 1, device="meta")
    with pytest.raises(CheckpointError) as info:
        VAEConfig.from_state_dict(sd)
    message = str(info.value)
    assert "decoder.conv_in.weight" in message and "16 latent channels" in message and "4 latent" in message
    print(message)


def test_non_vae_state_dict_is_refused_naming_the_missing_key():
    with pytest.raises(CheckpointError, match="missing key 'encoder.conv_in.weight'"):
        VAEConfig.from_state_dict({"x_embedder.proj.weight": torch.empty(1536, 16, 2, 2, device="meta")})


def test_diffusers_names_are_refused_with_a_conversion_hint():
    diffusers_named = vae_keys.official_to_diffusers(SD3VAE(SMALL, device="meta").state_dict())
    with pytest.raises(CheckpointError, match="missing key 'encoder.down.0.block.0.conv1.weight'.*diffusers_to_official"):
        VAEConfig.from_state_dict(diffusers_named)


# --------------------------------------------------------------------------------------------------------
# Official names and shapes


OFFICIAL_KEYS = [
    "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down.2.downsample.conv.weight", "encoder.mid.block_1.conv2.bias", "encoder.mid.attn_1.q.weight",
    "encoder.mid.attn_1.proj_out.bias", "encoder.mid.attn_1.norm.weight", "encoder.norm_out.weight",
    "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.mid.block_2.norm2.weight",
    "decoder.up.0.block.2.conv2.weight", "decoder.up.0.block.0.nin_shortcut.weight",
    "decoder.up.3.upsample.conv.weight", "decoder.norm_out.bias", "decoder.conv_out.weight",
]


def test_parameter_names_are_the_official_ones():
    sd = SD3VAE(device="meta").state_dict()
    assert set(OFFICIAL_KEYS) <= set(sd)
    assert "encoder.down.3.downsample.conv.weight" not in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert not any("quant_conv" in k for k in sd)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)


def test_official_state_dict_loads_strictly_into_a_model_built_from_its_inferred_config():
    source = small_vae()
    sd = source.state_dict()
    model = SD3VAE(VAEConfig.from_state_dict(sd))
    model.load_state_dict(sd, strict=True)
    z = source.encode(images(1, 16, 16))
    assert torch.equal(model.encode(images(1, 16, 16)), z)


@torch.inference_mode()
def test_encode_decode_shapes_non_square_batch_2():
    vae = small_vae()
    z = vae.encode(images(2, 32, 48))
    assert z.shape == (2, 16, 4, 6) and z.dtype == torch.float32
    x = vae.decode(z)
    assert x.shape == (2, 3, 32, 48) and torch.isfinite(x).all()


@torch.inference_mode()
def test_encode_returns_the_mean_unless_a_generator_asks_for_a_sample():
    vae = small_vae()
    x = images(1, 16, 16)
    mean = vae.encode(x)
    assert torch.equal(vae.encode(x), mean)
    sample = vae.encode(x, generator=torch.Generator().manual_seed(3))
    again = vae.encode(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample, again) and not torch.equal(sample, mean)


def test_encode_refuses_sizes_that_are_not_multiples_of_8():
    with pytest.raises(ValueError, match="multiples of 8"):
        small_vae().encode(images(1, 20, 16))
    with pytest.raises(ValueError, match=r"\[B, 16, h, w\]"):
        small_vae().decode(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_half_precision_tracks_fp32(dtype):
    vae = small_vae()
    x = images(1, 16, 16)
    z32, y32 = vae.encode(x), vae.decode(torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(5)))
    half = SD3VAE(SMALL, dtype=dtype)
    half.load_state_dict(vae.state_dict())
    assert half.dtype == dtype
    z = half.encode(x)
    y = half.decode(torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(5)))
    assert z.dtype == dtype and y.dtype == dtype
    for low, ref in ((z, z32), (y, y32)):
        rel = (low.float() - ref).norm() / ref.norm()
        assert rel < 0.05, f"{dtype}: relative error {rel:.4f}"


# --------------------------------------------------------------------------------------------------------
# Key conversion


def test_key_conversion_round_trips_bitwise():
    official = small_vae().state_dict()
    diffusers = vae_keys.official_to_diffusers(official)
    assert diffusers["decoder.up_blocks.0.upsamplers.0.conv.weight"] is official["decoder.up.3.upsample.conv.weight"]
    assert diffusers["encoder.mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)
    back = vae_keys.diffusers_to_official(diffusers)
    assert list(back) == list(official)
    assert all(torch.equal(back[k], official[k]) and back[k].shape == official[k].shape for k in official)
    assert vae_keys.official_to_diffusers(back).keys() == diffusers.keys()


@pytest.mark.parametrize("convert, key", [
    (vae_keys.official_to_diffusers, "quant_conv.weight"),
    (vae_keys.official_to_diffusers, "encoder.down.0.block.0.conv3.weight"),
    (vae_keys.diffusers_to_official, "decoder.up_blocks.0.attentions.0.to_q.weight"),
])
def test_unknown_key_is_refused_by_name(convert, key):
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        convert({key: torch.zeros(1)})


# --------------------------------------------------------------------------------------------------------
# Parity with diffusers AutoencoderKL


@pytest.fixture(scope="module")
def parity_pair():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(SMALL.base_channels * m for m in SMALL.channel_mult), layers_per_block=2,
        norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=LATENT_SCALE, shift_factor=LATENT_SHIFT, sample_size=32,
    ).eval()
    ours = small_vae()
    reference.load_state_dict(vae_keys.official_to_diffusers(ours.state_dict()), strict=True)
    return ours, reference


def test_diffusers_state_dict_converts_to_exactly_our_keys(parity_pair):
    ours, reference = parity_pair
    converted = vae_keys.diffusers_to_official(reference.state_dict())
    assert converted.keys() == ours.state_dict().keys()
    SD3VAE(VAEConfig.from_state_dict(converted)).load_state_dict(converted, strict=True)


@torch.inference_mode()
def test_encode_matches_diffusers_posterior_mean(parity_pair):
    ours, reference = parity_pair
    x = images(2, 32, 40)
    expected = reference.encode(x).latent_dist.mean
    diff = (ours.encode(x) - expected).abs().max().item()
    print(f"encode max abs diff vs diffusers: {diff:.3e} (latent std {expected.std():.3f})")
    assert diff <= PARITY_TOL


@torch.inference_mode()
def test_decode_matches_diffusers(parity_pair):
    ours, reference = parity_pair
    z = torch.randn(2, 16, 4, 5, generator=torch.Generator().manual_seed(7))
    expected = reference.decode(z).sample
    diff = (ours.decode(z) - expected).abs().max().item()
    print(f"decode max abs diff vs diffusers: {diff:.3e} (image std {expected.std():.3f})")
    assert diff <= PARITY_TOL
