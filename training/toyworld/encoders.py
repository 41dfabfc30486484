"""The toy world's text encoders and VAE: SD3.5's component kinds at toy size (issue 6, docs/toyworld.md "World").

Text encoders (docs/algorithm.md "Text encoders and T5 dropout"): a CLIP-L-shaped ``CLIPTextModel`` (quick_gelu,
unprojected pooled), a CLIP-G-shaped ``CLIPTextModelWithProjection`` (gelu, pooled projected to 128, wider than
L's 64 as bigG's 1280 is wider than L's 768) and a T5-shaped ``T5EncoderModel`` (gated-gelu, relative attention):
3 CLIP layers of width 64 each (one 64-wide head, MLP ratio 1), 2 T5 blocks of width 64; 0.26 M parameters, about
1 MB in float32. They go through ``flash_core.text`` exactly as the released encoders do: ``TripleTextEncoder`` zero-pads the
context to [B, 77 (+ T5 tokens), 4096] and the pooled vector to [B, 2048], and T5 off gives the 77 CLIP tokens.

**They are random and frozen, not trained.** SD3.5's encoders are frozen during diffusion training and
distillation, so all the method needs is a fixed, deterministic, injective map from prompt to conditioning. With a
word-level vocabulary every word is its own embedding row; drawn at random in 64-128 dimensions those rows are
nearly orthogonal, and a random transformer over them keeps distinct prompts distinct (tested: no two evaluation
prompts collide), while word order survives through the position embeddings and causal attention. The MM-DiT's
context and pooled embedders learn to read it. Training the encoders instead would need a contrastive image tower
(more code, minutes of the 45-minute budget) and could fit them to the evaluator's attributes. The weights are
drawn from a ``torch.Generator`` with explicit scales (:func:`init_text_encoder_`), not transformers' initialisers,
so a seed gives the same encoders under any transformers version, and features are O(1) without training.

VAE, and the latent size (the decision): SD3's VAE downsamples 8x, so a 16 px image would give a 2x2 latent and
the patch-2 MM-DiT would see **one** image token. The prototype's "16 px with patch 2 = 64 image tokens" means a
16x16 latent, i.e. a VAE that does not downsample at all. ``flash_core.vae`` expresses that with no change:
``VAEConfig(channel_mult=(1,))`` is the SD3 architecture (16 latent channels, official parameter names, res
blocks, the mid block's attention, GroupNorm 32, no quant convs) with one resolution level and so no
``downsample`` / ``upsample``; ``VAEConfig.from_state_dict`` infers it back from the weights, and ComfyUI builds
it from the same config (``nodes/native.build_vae``: ``ch_mult=[1]``, pixels-per-latent ratios 1, so 16 px <->
16x16 works there too). Kept: 16 px images, 16x16x16 latents, 64 image tokens (an
over-complete latent, which is fine for a toy: the VAE's job here is to be the SD3 component, not to compress).
Rejected: 128 px images with the released 8x layout (64x the VAE cost on 2 CPU cores), and a 2x VAE (16 image
tokens, too coarse for two-object scenes).
**Latent sizing**: ``flash_core.pipeline`` (``check_size`` / ``generate_latents``), ``training.data`` and
``nodes/native.build_vae`` (ComfyUI's ``downscale_ratio`` / ``upscale_ratio``) size latents by the VAE's
``downscale_factor``, so the toy model is asked for 16 px images everywhere headless. The one exception is
ComfyUI's stock ``EmptySD3LatentImage``, which always makes ``width // 8`` latents: in a ComfyUI graph the toy
model's empty latent is :data:`COMFY_EMPTY_LATENT_SIZE` (128) square, which is the 16x16 latent that decodes to a
16 px image.

The latent scale: the MM-DiT works in SD3's fixed model space ``(z - 0.0609) * 1.5305`` (``vae.process_in``;
ComfyUI's ``latent_formats.SD3``), so :func:`train_vae` regularises the posterior towards
N(0.0609, 1/1.5305^2) instead of N(0, 1): model-space latents then come out near zero mean, unit scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ...flash_core.text import Tokenizers, TripleTextEncoder
from ...flash_core.vae import LATENT_SCALE, LATENT_SHIFT, RELEASED_DOWNSCALE, SD3VAE, VAEConfig
from . import world
from .tokenizer import CLIP_BOS, CLIP_EOS, SPECIAL_TOKENS, vocab_size

CLIP_LENGTH = 77
CLIP_BOS_ID, CLIP_EOS_ID = SPECIAL_TOKENS.index(CLIP_BOS), SPECIAL_TOKENS.index(CLIP_EOS)
CLIP_L_WIDTH, CLIP_G_WIDTH, CLIP_G_PROJECTION, T5_WIDTH = 64, 64, 128, 64
TOY_VAE = VAEConfig(base_channels=32, channel_mult=(1,), num_res_blocks=1)  # no downsampling: 16 px -> 16x16
LATENT_SIZE = world.IMAGE_SIZE // TOY_VAE.downscale_factor  # 16: 8x8 = 64 image tokens at patch 2
COMFY_EMPTY_LATENT_SIZE = RELEASED_DOWNSCALE * LATENT_SIZE  # EmptySD3LatentImage's width/height for a 16x16 latent (see above)


# ------------------------------------------------------------------------------------------ text encoders


def clip_config(width: int, activation: str, projection: int, vocab: int) -> CLIPTextConfig:
    """A 3-layer CLIP text tower of ``width`` (heads of 64, as every CLIP and ``flash_core.text`` assume), with
    the toy tokenizer's start / end ids."""
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width, num_hidden_layers=3,
                          num_attention_heads=width // 64, max_position_embeddings=CLIP_LENGTH,
                          hidden_act=activation, projection_dim=projection, layer_norm_eps=1e-5,
                          bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID)


def t5_config(vocab: int) -> T5Config:
    """A 2-block T5 v1.1-style encoder (gated-gelu, relative attention buckets) of width 64."""
    return T5Config(vocab_size=vocab, d_model=T5_WIDTH, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, is_encoder_decoder=False, use_cache=False,
                    dropout_rate=0.0)


@torch.no_grad()
def init_text_encoder_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Draw every weight from ``generator``: token embeddings N(0, 1), position embeddings N(0, 0.5) (the word
    dominates), matrices N(0, 1/fan_in) (unit-scale activations), norms 1, biases 0."""
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            std = 1.0 if name.endswith(("token_embedding.weight", "shared.weight")) else (
                0.5 if name.endswith("position_embedding.weight") else 1.0 / math.sqrt(param.shape[1]))
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval().requires_grad_(False)


def make_text_encoders(seed: int = 0, vocab: int | None = None) -> dict[str, nn.Module]:
    """{'clip_l', 'clip_g', 't5'}: the toy encoders, random and frozen (see the module docstring), from ``seed``."""
    vocab = vocab or vocab_size()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # transformers' constructors draw (then overwritten) from the global RNG
        models = {
            "clip_l": CLIPTextModel(clip_config(CLIP_L_WIDTH, "quick_gelu", CLIP_L_WIDTH, vocab)),
            "clip_g": CLIPTextModelWithProjection(clip_config(CLIP_G_WIDTH, "gelu", CLIP_G_PROJECTION, vocab)),
            "t5": T5EncoderModel(t5_config(vocab)),
        }
    return {slot: init_text_encoder_(model, generator) for slot, model in models.items()}


def text_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The file layout of an HF text encoder (what ``flash_core.text.build_clip`` / ``build_t5`` read): without
    position-id buffers or T5's tied embedding copy, CLIP keys under ``text_model.``."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if "position_ids" not in k and k != "encoder.embed_tokens.weight"}
    if "embeddings.token_embedding.weight" in sd:  # transformers 5's CLIPTextModel drops the file's prefix
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return sd


def text_encoder(tokenizers: Tokenizers, seed: int = 0, with_t5: bool = True) -> TripleTextEncoder:
    """flash_core's TripleTextEncoder over the toy encoders, built through their file layout (as a loaded
    checkpoint would be). ``with_t5=False`` leaves T5 out entirely (the T5-optional path)."""
    sds = {slot: text_state_dict(m) for slot, m in make_text_encoders(seed, len(tokenizers.clip_l)).items()}
    return TripleTextEncoder.from_state_dicts(sds["clip_l"], sds["clip_g"], sds["t5"] if with_t5 else None,
                                              tokenizers=tokenizers)


def parameter_count(models: dict[str, nn.Module]) -> int:
    return sum(p.numel() for m in models.values() for p in m.parameters())


# ------------------------------------------------------------------------------------------------- VAE


def make_vae(config: VAEConfig = TOY_VAE, seed: int = 0) -> SD3VAE:
    """An untrained SD3VAE of ``config``, initialised by PyTorch's defaults under ``seed`` (the global RNG is
    left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SD3VAE(config)


def kl_to_latent_prior(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean KL( N(mean, exp(logvar)) || N(LATENT_SHIFT, 1 / LATENT_SCALE^2) ) per latent element: the prior
    under which ``process_in`` latents are N(0, 1)."""
    prior_var = 1.0 / LATENT_SCALE ** 2
    var = logvar.exp()
    kl = 0.5 * (math.log(prior_var) - logvar + (var + (mean - LATENT_SHIFT) ** 2) / prior_var - 1.0)
    return kl.mean()


def vae_loss(vae: SD3VAE, images: torch.Tensor, generator: torch.Generator,
             kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction MSE of a posterior sample (reparameterised) + ``kl_weight`` * KL to the latent prior."""
    mean, logvar = vae.encoder(images).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    recon = nn.functional.mse_loss(vae.decoder(z), images)
    kl = kl_to_latent_prior(mean, logvar)
    return recon + kl_weight * kl, {"recon": recon.item(), "kl": kl.item()}


def train_vae(iterations: int = 400, batch_size: int = 32, lr: float = 2e-3, kl_weight: float = 1e-3,
              seed: int = 0, config: VAEConfig = TOY_VAE, progress: bool = True) -> tuple[SD3VAE, list[dict]]:
    """Train the toy VAE on fresh toy images each step (Adam, gradient clip 1, cosine learning-rate decay).

    Returns the VAE (eval mode, frozen) and its log, one dict per step: ``step``, ``loss``, ``recon`` (MSE on
    [-1, 1] images), ``kl``. Everything random (init, images, posterior samples) comes from ``seed``.
    """
    vae = make_vae(config, seed).train()
    data = torch.Generator().manual_seed(seed + 1)
    noise = torch.Generator().manual_seed(seed + 2)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(iterations, 1), eta_min=lr * 0.05)
    log = []
    bar = tqdm(range(iterations), desc="toy VAE", unit="it", disable=not progress)
    for step in bar:
        loss, parts = vae_loss(vae, world.sample_images(batch_size, data), noise, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log.append({"step": step, "loss": loss.item(), **parts})
        bar.set_postfix(recon=f"{parts['recon']:.4f}", kl=f"{parts['kl']:.3f}")
    return vae.eval().requires_grad_(False), log
