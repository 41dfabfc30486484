"""Our MM-DiT and VAE against ComfyUI's own implementations: the same parameter names and shapes for the
released architectures, and the same outputs for the same random weights."""

import pytest
import torch

from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig
from sd35_flash.flash_core.vae import SD3VAE, VAEConfig


def comfy_mmdit(comfy, config: MMDiTConfig, device: str):
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT as ComfyMMDiT

    return ComfyMMDiT(
        input_size=None, patch_size=config.patch_size, in_channels=config.in_channels, depth=config.depth,
        out_channels=config.out_channels, adm_in_channels=config.adm_in_channels,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": config.context_in_channels,
                                            "out_features": config.hidden_size}},
        pos_embed_max_size=config.pos_embed_max_size, num_patches=config.pos_embed_max_size ** 2,
        qk_norm="rms" if config.qk_norm else None, x_block_self_attn_layers=list(config.dual_attention_layers),
        pos_embed_scaling_factor=None, device=device, dtype=torch.float32, operations=comfy.ops.disable_weight_init,
    )


@pytest.mark.parametrize("name", ["sd35_medium", "sd35_large"])
def test_released_architectures_have_comfyuis_parameter_names_and_shapes(comfy, name):
    config = getattr(MMDiTConfig, name)()
    theirs = comfy_mmdit(comfy, config, "meta").state_dict()
    with torch.device("meta"):
        ours = MMDiT(config).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_mmdit_matches_comfyui_for_the_same_weights(comfy):
    config = MMDiTConfig(depth=3, hidden_size=192, pos_embed_max_size=16, dual_attention_layers=(0,))
    ours, theirs = MMDiT(config), comfy_mmdit(comfy, config, "cpu")
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 + float(k.endswith(("ln_q.weight", "ln_k.weight")))
          for k, v in ours.state_dict().items() if k != "pos_embed"}
    sd["pos_embed"] = ours.pos_embed
    ours.load_state_dict(sd)
    theirs.load_state_dict(sd, strict=True)
    x, t = torch.randn(2, 16, 12, 8, generator=g), torch.tensor([900.0, 250.0])
    context, y = torch.randn(2, 154, 4096, generator=g), torch.randn(2, 2048, generator=g)
    with torch.no_grad():
        diff = (ours(x, t, context, y) - theirs(x, t, y=y, context=context)).abs().max().item()
    print(f"MM-DiT vs ComfyUI: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def _comfy_vae_parts(config: VAEConfig):
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    ddconfig = dict(double_z=True, z_channels=config.latent_channels, resolution=256, in_channels=3, out_ch=3,
                    ch=config.base_channels, ch_mult=list(config.channel_mult), num_res_blocks=config.num_res_blocks,
                    attn_resolutions=[], dropout=0.0)
    return Encoder(**ddconfig), Decoder(**ddconfig)


def test_vae_has_comfyuis_parameter_names_and_matches_it(comfy):
    with torch.device("meta"):
        encoder, decoder = _comfy_vae_parts(VAEConfig())
        ours = SD3VAE(VAEConfig()).state_dict()
    theirs = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
              **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)

    small = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    vae, (encoder, decoder) = SD3VAE(small), _comfy_vae_parts(small)
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(v.shape, generator=g) * 0.1 + float("norm" in k and k.endswith("weight"))
          for k, v in vae.state_dict().items()}
    vae.load_state_dict(sd)
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")})
    image, z = torch.randn(1, 3, 32, 40, generator=g).clamp(-1, 1), torch.randn(1, 16, 4, 5, generator=g)
    with torch.no_grad():
        encode_diff = (vae.encode(image) - encoder(image)[:, :16]).abs().max().item()
        decode_diff = (vae.decode(z) - decoder(z)).abs().max().item()
    print(f"VAE vs ComfyUI: encode {encode_diff:.2e}, decode {decode_diff:.2e}")
    assert encode_diff <= 1e-4 and decode_diff <= 1e-4
