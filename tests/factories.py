"""Small random-weight SD3.5-shaped components and checkpoints for tests (nothing is downloaded).

Tokenizer files come from tokenizer_factories.py (the ``tokenizers_dir`` fixture of conftest.py).

Every parameter is drawn at random (adaLN and final layers included, which training code zero-initialises),
so that outputs depend on every weight and parity checks are not vacuous.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd35_flash.flash_core.checkpoint import FlashMetadata, save_checkpoint
from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig
from sd35_flash.flash_core.vae import SD3VAE, VAEConfig

# An SD3.5 Medium-shaped model at test size: a dual-attention layer, a plain one and the pre-only last block.
TINY_MMDIT = MMDiTConfig(depth=3, hidden_size=64 * 3, pos_embed_max_size=16, dual_attention_layers=(0,),
                         qk_norm=True)
TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Draw every floating parameter from N(0, std), norms' weights around 1."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if name == "pos_embed":
            continue
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight", "ln_k.weight",
                          "layer_norm.weight", "layer_norm1.weight", "layer_norm2.weight",
                          "final_layer_norm.weight", "norm_out.weight")):
            noise += 1.0
        param.copy_(noise.to(param.dtype))
    return module


def tiny_mmdit(config: MMDiTConfig = TINY_MMDIT, seed: int = 0) -> MMDiT:
    return randomize_(MMDiT(config), seed).eval()


def tiny_vae(config: VAEConfig = TINY_VAE, seed: int = 1) -> SD3VAE:
    return randomize_(SD3VAE(config), seed, std=0.1).eval()


def _clip_config(width: int, act: str, projection: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                          num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act,
                          projection_dim=projection or width, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=1)


def tiny_clip_l(seed: int = 2) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_clip_config(64, "quick_gelu")).eval()


def tiny_clip_g(seed: int = 3) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_clip_config(128, "gelu", projection=128)).eval()


def tiny_t5(seed: int = 4) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, is_encoder_decoder=False)
    return T5EncoderModel(config).eval()


def text_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The file layout of a text encoder: HF names, without position-id buffers or T5's tied embedding copy."""
    sd = {k: v for k, v in model.state_dict().items()
          if "position_ids" not in k and k != "encoder.embed_tokens.weight"}
    if "embeddings.token_embedding.weight" in sd:  # transformers 5's CLIPTextModel drops the file's prefix
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return sd


def write_tiny_checkpoint(path: Path, *, with_text: bool = True, with_t5: bool = True,
                          metadata: FlashMetadata | None = None, seed: int = 0) -> Path:
    """An official single-file SD3.5-shaped checkpoint with random weights, as a real release is laid out."""
    text = {}
    if with_text:
        text = {"clip_l": text_state_dict(tiny_clip_l(seed + 2)), "clip_g": text_state_dict(tiny_clip_g(seed + 3))}
        if with_t5:
            text["t5"] = text_state_dict(tiny_t5(seed + 4))
    return save_checkpoint(path, mmdit=tiny_mmdit(seed=seed), vae=tiny_vae(seed=seed + 1), metadata=metadata, **text)


# The demo model's shapes (training/toyworld) at random weights: a one-level VAE (1 pixel per latent), an MM-DiT
# with an 8x8 position table (16 px images), the toy encoders (a 29-id word-level vocabulary, CLIP-G projecting
# 64 -> 128) and the toy tokenizer folder beside the file, as the demo ships. ComfyUI loads it (hidden = 64 * depth).
DEMO_LIKE_MMDIT = MMDiTConfig(depth=2, hidden_size=128, pos_embed_max_size=8, dual_attention_layers=(0,),
                              qk_norm=True)
DEMO_LIKE_VAE = VAEConfig(base_channels=32, channel_mult=(1,), num_res_blocks=1)


def write_demo_like_checkpoint(folder: Path, name: str = "sd35_flash_demo.safetensors", seed: int = 0) -> Path:
    """``folder/name`` + ``folder/tokenizers/`` (clip/, t5xxl/): the demo model's layout and shapes, random weights."""
    from sd35_flash.training.toyworld.encoders import make_text_encoders
    from sd35_flash.training.toyworld.encoders import text_state_dict as toy_text_state_dict
    from sd35_flash.training.toyworld.tokenizer import save_tokenizers

    folder = Path(folder)
    save_tokenizers(folder / "tokenizers")
    text = {slot: toy_text_state_dict(model) for slot, model in make_text_encoders(seed).items()}
    meta = FlashMetadata(student_sigmas=[1.0, 0.9, 0.75, 0.5, 0.0], sampler_mode="euler")
    return save_checkpoint(folder / name, mmdit=tiny_mmdit(DEMO_LIKE_MMDIT, seed), vae=tiny_vae(DEMO_LIKE_VAE, seed + 1),
                           metadata=meta, **text)
