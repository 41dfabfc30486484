"""The teacher stage's inputs: (image, caption) datasets, their VAE latents and their text conditioning.

The teacher is an MM-DiT trained from scratch by rectified flow (docs/algorithm.md "Notation": ``x_s = (1 - s) x0 +
s eps``, target ``v = eps - x0``) with SD3's logit-normal sigmas and caption dropout (docs/toyworld.md "Teacher").
The stage itself is :mod:`.stages.teacher`; this module prepares what it samples from, once per run:

* a dataset of captioned images (:class:`CaptionedImages`): one the caller provides by name (a
  :data:`DatasetSource`, drawn from a seed: ``sd35-flash-train`` provides the toy world's,
  :mod:`.toyworld.dataset`), or a folder of images with same-named ``.txt`` captions (:func:`folder_images`);
* a :class:`LatentPool`: the images encoded once by the frozen VAE (posterior mean, model space), and every
  distinct caption encoded once by the frozen text encoders, with and without T5, stored unpadded as the teacher
  data is (:mod:`.data`) and padded to the SD3 widths per batch. The empty caption is always in the table: it is
  what caption dropout substitutes (the null prompt of classifier-free guidance).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..flash_core.vae import process_in
from .config import ConfigError
from .data import conditioning_widths, drop_clip, encode_unpadded, pad_context

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NULL_CAPTION = ""


@dataclass
class CaptionedImages:
    """Images ``[N, 3, S, S]`` in [-1, 1], their captions and, when the dataset knows them, region maps
    ``[N, 1, S, S]`` in [0, 1]: the pixels that decide what the picture shows, which ``teacher.region_weight``
    weights in the loss (the toy world's are its shape regions: docs/toyworld.md "Teacher")."""

    images: torch.Tensor
    captions: list[str]
    regions: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.images) != len(self.captions) or len(self.images) == 0:
            raise ValueError(f"a dataset needs as many captions as images (at least one), got "
                             f"{len(self.images)} images and {len(self.captions)} captions")
        if self.regions is not None and self.regions.shape != (len(self.images), 1, *self.images.shape[2:]):
            raise ValueError(f"region maps must be [N, 1, H, W] beside images {tuple(self.images.shape)}, "
                             f"got {tuple(self.regions.shape)}")


DatasetSource = Callable[[int, int, int], CaptionedImages]  # (count, seed, image_size) -> the dataset


def _square(image: Image.Image, size: int) -> torch.Tensor:
    """Centre-crop to a square, resize to ``size`` (bicubic), to ``[3, size, size]`` in [-1, 1]."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def folder_images(folder: str | Path, image_size: int, limit: int | None = None) -> CaptionedImages:
    """Every image in ``folder`` (sorted by name; at most ``limit``) with the caption in the same-named ``.txt``
    file, centre-cropped and resized to ``image_size``. A missing caption file is an error naming the image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"teacher.dataset: '{folder}' is not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise ConfigError(f"teacher.dataset: '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images, captions = [], []
    for path in paths:
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise ConfigError(f"teacher.dataset: '{path}' has no caption file '{caption.name}' beside it")
        captions.append(caption.read_text().strip())
        with Image.open(path) as image:
            images.append(_square(image, image_size))
    return CaptionedImages(torch.stack(images), captions)


def load_dataset(spec: str, count: int, image_size: int, seed: int,
                 datasets: Mapping[str, DatasetSource]) -> CaptionedImages:
    """``teacher.dataset``: a name in ``datasets`` (``count`` samples drawn from ``seed``) or a folder (at most
    ``count``); anything else is a :class:`ConfigError` naming the key and the names provided."""
    if spec in datasets:
        return datasets[spec](count, seed, image_size)
    if not Path(spec).is_dir():
        names = " nor ".join(repr(name) for name in datasets) or "a named dataset (this caller provides none)"
        raise ConfigError(f"teacher.dataset: '{spec}' is neither {names} nor a folder of images")
    return folder_images(spec, image_size, count)


def logit_normal_sigmas(n: int, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """``sigmoid(N(mean, std))``: SD3's logit-normal training sigmas (most weight mid-way between data and
    noise), drawn from ``generator``."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, chunk: int = 256, progress: bool = False) -> torch.Tensor:
    """Model-space latents (``process_in`` of the posterior mean) of ``images``, in chunks."""
    out = []
    for i in tqdm(range(0, len(images), chunk), desc="encode latents", disable=not progress):
        out.append(process_in(vae.encode(images[i:i + chunk]).float()).cpu())
    return torch.cat(out)


@dataclass
class LatentPool:
    """What the teacher stage samples: latents ``[N, 16, h, w]`` (model space), each sample's caption index, the
    caption table's unpadded conditioning (``clip``, ``pooled``; ``t5``, ``pooled_t5`` when there is T5), and the
    dataset's region maps at latent size ``[N, 1, h, w]`` (max-pooled over each latent pixel's patch) or None."""

    latents: torch.Tensor
    caption_index: torch.Tensor
    captions: list[str]
    conditioning: dict[str, torch.Tensor]
    clip_l_width: int
    has_t5: bool
    regions: torch.Tensor | None = None

    @classmethod
    def build(cls, dataset: CaptionedImages, vae, text_encoder, progress: bool = False,
              chunk: int = 256) -> LatentPool:
        captions = sorted(set(dataset.captions) | {NULL_CAPTION})
        position = {c: i for i, c in enumerate(captions)}
        index = torch.tensor([position[c] for c in dataset.captions], dtype=torch.long)
        latents = encode_latents(vae, dataset.images, chunk, progress)
        widths = conditioning_widths(text_encoder)
        has_t5 = text_encoder.has_t5
        parts: dict[str, list[torch.Tensor]] = {"clip": [], "pooled": [], "t5": [], "pooled_t5": []}
        with torch.no_grad():
            for i in range(0, len(captions), chunk):
                rows = captions[i:i + chunk]
                clip, _, pooled = encode_unpadded(text_encoder, rows, False, widths)
                parts["clip"].append(clip.cpu())
                parts["pooled"].append(pooled.cpu())
                if has_t5:
                    _, t5, pooled_t5 = encode_unpadded(text_encoder, rows, True, widths)
                    parts["t5"].append(t5.cpu())
                    parts["pooled_t5"].append(pooled_t5.cpu())
        conditioning = {k: torch.cat(v) for k, v in parts.items() if v}
        regions = None
        if dataset.regions is not None:
            regions = torch.nn.functional.adaptive_max_pool2d(dataset.regions.float(), latents.shape[-2:])
        return cls(latents, index, captions, conditioning, widths[2], has_t5, regions)

    def __len__(self) -> int:
        return len(self.latents)

    @functools.cached_property
    def region_mean(self) -> float:
        """The region maps' mean over the whole pool (0 without maps): what the region weight is divided by."""
        return 0.0 if self.regions is None else float(self.regions.mean())

    def region_weights(self, rows: torch.Tensor, region_weight: float) -> torch.Tensor | None:
        """``(1 + region_weight * map) / (1 + region_weight * region_mean)`` of these rows (``[B, 1, h, w]``): a
        constant divisor, so the loss is the same on any number of processes; None when ``region_weight`` is 0."""
        if not region_weight:
            return None
        if self.regions is None:
            raise ValueError("the dataset has no region maps to weight")
        return (1 + region_weight * self.regions[rows]) / (1 + region_weight * self.region_mean)

    @property
    def null_index(self) -> int:
        return self.captions.index(NULL_CAPTION)

    def conditioning_for(self, caption_rows: torch.Tensor, use_t5: bool, drop_l: torch.Tensor | None = None,
                         drop_g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context [B, 77 (+T5), 4096], pooled [B, 2048])`` for caption-table rows, with the per-sample CLIP
        dropouts (docs/algorithm.md "Text encoders and T5 dropout") applied when given."""
        c = self.conditioning
        use_t5 = use_t5 and self.has_t5
        clip = c["clip"][caption_rows].clone()
        pooled = (c["pooled_t5"] if use_t5 else c["pooled"])[caption_rows].clone()
        if drop_l is not None and drop_g is not None:
            drop_clip(clip, pooled, drop_l, drop_g, self.clip_l_width)
        return pad_context(clip, c["t5"][caption_rows] if use_t5 else None), pooled

    def caption_rows(self, captions: list[str]) -> torch.Tensor:
        """Caption-table rows of ``captions`` (each must be in the table)."""
        missing = [c for c in captions if c not in self.captions]
        if missing:
            raise ValueError(f"caption {missing[0]!r} is not in the dataset")
        return torch.tensor([self.captions.index(c) for c in captions], dtype=torch.long)
