"""FlashPipeline: prompts -> images with an SD3.x MM-DiT, the SD3 VAE and the triple text encoder.

The sampling follows ALGORITHM.md "The student schedule": the student grid for 2 and 4 steps (from the
checkpoint's metadata when present), deterministic Euler by default, CFG 1. Noise is drawn as ComfyUI draws
it, so the same checkpoint, prompt and seed give the same image in a ComfyUI graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import schedule
from .checkpoint import (
    CheckpointFiles,
    FlashMetadata,
    component_state_dict,
    index_checkpoint,
    load_mmdit,
    load_vae,
)
from .errors import CheckpointError, FlashError
from .text import TripleTextEncoder, load_tokenizers
from .vae import SD3VAE, process_out

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_DOWNSCALE = 8
SIZE_MULTIPLE = 16  # latent side must be a multiple of the patch size (2)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it (fp16 otherwise), fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise FlashError(f"dtype '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise FlashError(f"{name} {value} is not a positive multiple of {SIZE_MULTIPLE} "
                             f"(the latent is 1/8 of the image and the MM-DiT patch is 2)")


def latents_to_images(images: torch.Tensor) -> list[Image.Image]:
    """VAE output in [-1, 1], ``[B, 3, H, W]`` -> 8-bit RGB PIL images, quantised as ComfyUI's VAEDecode +
    SaveImage do (``clamp((x + 1) / 2, 0, 1)``, times 255, truncated), so both write the same bytes."""
    pixels = (((images.float() + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).cpu().numpy())) for p in pixels]


@dataclass
class Conditioning:
    """SD3 conditioning: ``context [B, L, 4096]`` and ``pooled [B, 2048]`` (ALGORITHM.md "Text encoders")."""

    context: torch.Tensor
    pooled: torch.Tensor

    def repeat(self, n: int) -> Conditioning:
        return Conditioning(self.context.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))


class FlashPipeline:
    """Text-to-image with an SD3.x MM-DiT (teacher or few-step student)."""

    def __init__(self, mmdit: torch.nn.Module, vae: SD3VAE, text_encoder: TripleTextEncoder,
                 metadata: FlashMetadata | None = None, device: str | torch.device = "cpu"):
        self.mmdit = mmdit
        self.vae = vae
        self.text_encoder = text_encoder
        self.metadata = metadata or FlashMetadata()
        self.device = torch.device(device)

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, *, vae: str | os.PathLike | None = None,
                        clip_l: str | os.PathLike | None = None, clip_g: str | os.PathLike | None = None,
                        t5: str | os.PathLike | None = None, tokenizers: str | os.PathLike | None = None,
                        use_t5: bool = True, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "auto") -> FlashPipeline:
        """Load a checkpoint in any supported layout; separate files fill or replace its components.

        ``use_t5=False`` never reads the T5 weights (the T5-off memory tier). Tokenizers come from
        ``tokenizers``, a diffusers folder, or ``$SD35_FLASH_TOKENIZERS``.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        files = index_checkpoint(checkpoint)
        for component, extra in (("vae", vae), ("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)):
            if extra is not None:
                _take_component(files, index_checkpoint(extra, component), component, extra)
        if not files.has("mmdit"):
            raise CheckpointError(f"'{checkpoint}' holds no MM-DiT (diffusion model) weights")
        if not files.has("vae"):
            raise CheckpointError(f"'{checkpoint}' holds no VAE; pass a VAE file (--vae)")
        if not (files.has("clip_l") or files.has("clip_g")):
            raise CheckpointError(f"'{checkpoint}' holds no CLIP text encoders; pass --clip-l and --clip-g "
                                  "(and optionally --t5)")
        if tokenizers is None and Path(checkpoint).is_dir():
            tokenizers = checkpoint
        toks = load_tokenizers(tokenizers)
        metadata = FlashMetadata.from_safetensors(files.metadata, str(checkpoint))

        # Cast while reading, tensor by tensor: the stored-dtype copy of the whole model never exists.
        mmdit = load_mmdit(component_state_dict(files, "mmdit", dtype=dtype), dtype=dtype, device=device)
        vae_model = load_vae(component_state_dict(files, "vae"), dtype=torch.float32, device=device,
                             what=f"'{files.sources['vae'][0]}' (VAE)")
        text_encoder = TripleTextEncoder.from_state_dicts(
            clip_l=component_state_dict(files, "clip_l") if files.has("clip_l") else None,
            clip_g=component_state_dict(files, "clip_g") if files.has("clip_g") else None,
            t5=component_state_dict(files, "t5") if use_t5 and files.has("t5") else None,
            tokenizers=toks, dtype=dtype, device=device,
        )
        return cls(mmdit, vae_model, text_encoder, metadata, device)

    # ---------------------------------------------------------------------------------------------- sampling

    @property
    def dtype(self) -> torch.dtype:
        return self.mmdit.dtype

    def encode_prompt(self, prompts: str | Sequence[str], use_t5: bool = True) -> Conditioning:
        context, pooled = self.text_encoder.encode(list([prompts] if isinstance(prompts, str) else prompts),
                                                   use_t5=use_t5 and self.text_encoder.has_t5)
        return Conditioning(context.to(self.device), pooled.to(self.device))

    def sigmas(self, steps: int, denoise: float = 1.0) -> torch.Tensor:
        return schedule.flash_sigmas(steps, self.metadata.student_sigmas, denoise=denoise)

    def velocity_fn(self, cond: Conditioning, uncond: Conditioning | None, cfg: float) -> schedule.VelocityFn:
        """Bind conditioning (and CFG) to the MM-DiT: ``v(x, sigma)`` in float32."""
        guided = uncond is not None and cfg != 1.0
        context = torch.cat([cond.context, uncond.context]) if guided else cond.context
        pooled = torch.cat([cond.pooled, uncond.pooled]) if guided else cond.pooled
        context, pooled = context.to(self.dtype), pooled.to(self.dtype)

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if guided:
                x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
            v = self.mmdit(x.to(self.dtype), schedule.sigma_to_timestep(sigma), context, pooled).float()
            if guided:
                v_cond, v_uncond = v.chunk(2)
                return schedule.cfg_velocity(v_cond, v_uncond, cfg)
            return v

        return velocity

    @torch.no_grad()
    def generate_latents(self, cond: Conditioning, *, seed: int, width: int, height: int, steps: int = 4,
                         cfg: float = 1.0, uncond: Conditioning | None = None, mode: str | None = None,
                         callback: schedule.StepCallback | None = None) -> torch.Tensor:
        """Sample model-space latents ``[B, 16, H/8, W/8]`` (one image per conditioning row)."""
        check_size(width, height)
        mode = mode or self.metadata.sampler_mode or "euler"
        if mode not in schedule.SAMPLER_MODES:
            raise FlashError(f"sampler mode '{mode}' is not one of {', '.join(schedule.SAMPLER_MODES)}")
        if cfg != 1.0 and uncond is None:
            raise FlashError("cfg other than 1.0 needs a negative (unconditional) prompt")
        batch = cond.context.shape[0]
        shape = (batch, 16, height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE)
        noise = schedule.initial_noise(seed, shape).to(self.device)
        sigmas = self.sigmas(steps).to(self.device)
        velocity = self.velocity_fn(cond, uncond, cfg)
        x = sigmas[0] * noise
        if mode == "euler":
            return schedule.sample_euler(velocity, x, sigmas, callback)
        return schedule.sample_renoise(velocity, x, sigmas, schedule.renoise_sampler(seed, x), callback)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        raw = process_out(latents.float())
        return latents_to_images(self.vae.decode(raw.to(self.vae.dtype)))

    def __call__(self, prompt: str, *, negative: str = "", steps: int = 4, seed: int = 0, width: int = 1024,
                 height: int = 1024, cfg: float = 1.0, use_t5: bool = True, batch: int = 1,
                 mode: str | None = None, progress: bool | Callable[[int, int], None] = True) -> list[Image.Image]:
        """Generate ``batch`` images for ``prompt``; noise for the whole batch comes from ``seed``."""
        check_size(width, height)
        if batch < 1:
            raise FlashError(f"batch must be at least 1, got {batch}")
        cond = self.encode_prompt(prompt, use_t5).repeat(batch)
        uncond = self.encode_prompt(negative, use_t5).repeat(batch) if cfg != 1.0 else None
        callback, bar = _progress_callback(progress, len(self.sigmas(steps)) - 1)
        try:
            latents = self.generate_latents(cond, seed=seed, width=width, height=height, steps=steps, cfg=cfg,
                                            uncond=uncond, mode=mode, callback=callback)
        finally:
            if bar is not None:
                bar.close()
        return self.decode(latents)


def _progress_callback(progress, total: int):
    if callable(progress):
        return (lambda i, x, x0: progress(i + 1, total)), None
    if not progress:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="sampling", unit="step")
    return (lambda i, x, x0: bar.update(1)), bar


def _take_component(files: CheckpointFiles, extra: CheckpointFiles, component: str, path) -> None:
    if not extra.has(component):
        found = ", ".join(extra.components) or "nothing"
        raise CheckpointError(f"'{path}' was given as the {component} file but holds {found}")
    files.components[component] = extra.components[component]
    files.sources[component] = extra.sources[component]
    files.diffusers_keys.discard(component)
    files.diffusers_keys.update(extra.diffusers_keys & {component})

