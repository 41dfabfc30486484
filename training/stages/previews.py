"""Preview grids: a network's Euler samples from fixed seeds (``train.sample_seeds``), decoded by a VAE and laid
side by side, so that the grids of one run compare step to step."""

from __future__ import annotations

import torch
from PIL import Image

from ...flash_core.schedule import initial_noise, sample_euler
from ...flash_core.vae import process_out
from .networks import velocity_fn


def image_grid(images: list, columns: int | None = None):
    """Images side by side in rows of ``columns`` (default: all in one row up to 8)."""
    columns = columns or min(len(images), 8)
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


@torch.no_grad()
def sample_grid(mmdit: torch.nn.Module, vae, seeds: list[int], latent_shape: tuple[int, ...], sigmas: torch.Tensor,
                context: torch.Tensor, pooled: torch.Tensor, uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
                cfg: float = 1.0) -> Image.Image:
    """One Euler sample of ``mmdit`` per seed along ``sigmas`` (on the device the samples are made on), each
    from ``initial_noise(seed)`` with its row of ``context``/``pooled`` (CFG ``cfg`` against ``uncond`` when
    given), decoded by ``vae``: the samples in one row."""
    from ...flash_core.pipeline import latents_to_images

    d = sigmas.device
    noise = torch.cat([initial_noise(seed, (1, *latent_shape)) for seed in seeds]).to(d)
    if uncond is not None:
        uncond = tuple(u.to(d) for u in uncond)
    v = velocity_fn(mmdit, context.to(d), pooled.to(d), uncond=uncond, cfg=cfg)
    latents = sample_euler(v, noise * sigmas[0], sigmas)
    return image_grid(latents_to_images(vae.decode(process_out(latents))))
