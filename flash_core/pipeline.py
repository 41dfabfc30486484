"""FlashPipeline: prompts -> images with an SD3.x MM-DiT, the SD3 VAE and the triple text encoder.

The sampling follows docs/algorithm.md "The student schedule": the student grid for 2 and 4 steps (from the
checkpoint's metadata when present), deterministic Euler by default, CFG 1. Noise is drawn as ComfyUI draws
it, so the same checkpoint, prompt and seed give the same image in a ComfyUI graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import schedule
from .checkpoint import (
    CheckpointFiles,
    FlashMetadata,
    component_shapes,
    component_state_dict,
    index_checkpoint,
    load_mmdit,
    load_vae,
)
from .checkpoint_info import largest_side, native_image_size, run_dtype
from .devices import resolve_device
from .errors import CheckpointError, FlashError
from .quant import choose_backend, quantized_layers, set_backend
from .quant_io import quantizable_state
from .text import TripleTextEncoder
from .tokenizer_files import checkpoint_tokenizers
from .vae import RELEASED_DOWNSCALE, VAEConfig, process_out

PATCH_SIZE = 2
SIZE_MULTIPLE = RELEASED_DOWNSCALE * PATCH_SIZE  # latent side must be a multiple of the patch size (2)


def check_size(width: int, height: int, downscale: int = RELEASED_DOWNSCALE) -> None:
    """Image sides must be positive multiples of ``downscale * 2``: the latent is ``1/downscale`` of the image
    (8 for the released VAE, 1 for the toy world's one-level VAE) and its side a multiple of the patch (2)."""
    multiple = downscale * PATCH_SIZE
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            raise FlashError(f"{name} {value} is not a positive multiple of {multiple} "
                             f"(the latent is 1/{downscale} of the image and the MM-DiT patch is {PATCH_SIZE})")


class NonFiniteImageError(FlashError):
    """The model produced NaN or infinite values: there is no image to save."""


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteImageError` when ``values`` hold NaN or infinite entries."""
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise NonFiniteImageError(f"the {what} hold {bad} of {values.numel()} values that are NaN or infinite: "
                                  "the model produced no image (NaN or infinite weights, or an fp16 overflow)")


def latents_to_images(images: torch.Tensor) -> list[Image.Image]:
    """VAE output in [-1, 1], ``[B, 3, H, W]`` -> 8-bit RGB PIL images, quantised as ComfyUI's VAEDecode +
    SaveImage do (``clamp((x + 1) / 2, 0, 1)``, times 255, truncated), so both write the same bytes."""
    pixels = (((images.float() + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).cpu().numpy())) for p in pixels]


@dataclass
class Conditioning:
    """SD3 conditioning: ``context [B, L, 4096]`` and ``pooled [B, 2048]`` (docs/algorithm.md "Text encoders and T5 dropout")."""

    context: torch.Tensor
    pooled: torch.Tensor

    def repeat(self, n: int) -> Conditioning:
        return Conditioning(self.context.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))


class Slot:
    """A pipeline part: a module, or a loader that builds it when its phase starts (memory tiers).

    :meth:`release` after the phase drops a loadable part (the CPU: its memory goes back) or moves a given one
    to the CPU (a GPU: device memory goes back, the next call moves it again).
    """

    def __init__(self, value: torch.nn.Module | Callable[[], torch.nn.Module], device: torch.device):
        self.loader = None if isinstance(value, torch.nn.Module) else value
        self.module = value if isinstance(value, torch.nn.Module) else None
        self.device = device

    def get(self) -> torch.nn.Module:
        if self.module is None:
            self.module = self.loader()
        elif self.loader is None and self.device.type != "cpu":
            self.module.to(self.device)
        return self.module

    def release(self) -> None:
        if self.loader is not None:
            self.module = None
        elif self.module is not None and self.device.type != "cpu":
            self.module.to("cpu")


class FlashPipeline:
    """Text-to-image with an SD3.x MM-DiT (teacher or few-step student).

    Each part may be given as a module or as a zero-argument loader; with ``offload=True`` every part is
    released after its phase (encode, denoise, decode), so the peak is the largest phase (flash_core/memory.py).
    Latents are sized by the VAE's ``downscale_factor`` (pixels per latent): taken from a VAE module, or given
    with a VAE loader (default 8, the released VAE's).
    """

    def __init__(self, mmdit, vae, text_encoder, metadata: FlashMetadata | None = None,
                 device: str | torch.device = "cpu", offload: bool = False, downscale_factor: int | None = None):
        self.device = torch.device(device)
        config = getattr(vae, "config", None)
        self.downscale_factor = downscale_factor or getattr(config, "downscale_factor", RELEASED_DOWNSCALE)
        self.slots = {name: Slot(part, self.device)
                      for name, part in (("mmdit", mmdit), ("vae", vae), ("text_encoder", text_encoder))}
        self.metadata = metadata or FlashMetadata()
        self.offload = offload
        self.quant_report: dict[str, str] = {}  # component -> "int8 through int8mm (...)", for the CLI

    mmdit = property(lambda self: self.slots["mmdit"].get())
    vae = property(lambda self: self.slots["vae"].get())
    text_encoder = property(lambda self: self.slots["text_encoder"].get())

    def _done_with(self, name: str) -> None:
        if self.offload:
            self.slots[name].release()

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, *, vae: str | os.PathLike | None = None,
                        clip_l: str | os.PathLike | None = None, clip_g: str | os.PathLike | None = None,
                        t5: str | os.PathLike | None = None, tokenizers: str | os.PathLike | None = None,
                        use_t5: bool = True, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "auto", weights: str | None = None,
                        t5_weights: str | None = None, quant_backend: str = "auto",
                        offload: bool = False) -> FlashPipeline:
        """Load a checkpoint in any supported layout; separate files fill or replace its components.

        ``use_t5=False`` never reads the T5 weights (the T5-off memory tier). Tokenizers, first found: ``tokenizers``;
        the checkpoint's own (a diffusers folder's, a ``tokenizers/`` folder beside a checkpoint file, as the demo
        model ships them, or tokenizers embedded in the file's metadata); ``$SD35_FLASH_TOKENIZERS``; the ComfyUI
        installation (``tokenizer_files.checkpoint_tokenizers``). ``weights`` / ``t5_weights``
        (``int8``, ``fp8``, ``int6``, ``int4``) quantize the MM-DiT / T5 while they are read; a quantized file
        loads as stored. ``quant_backend`` picks the runtime (flash_core/quant/backends.py, ``auto`` measures).
        ``offload=True`` loads each part when its phase starts and releases it after.
        """
        device = resolve_device(device)
        files = index_checkpoint(checkpoint)
        for component, extra in (("vae", vae), ("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)):
            if extra is not None:
                _take_component(files, index_checkpoint(extra, component), component, extra)
        dtype = run_dtype(dtype, device, files)[0]
        if not files.has("mmdit"):
            raise CheckpointError(f"'{checkpoint}' holds no MM-DiT (diffusion model) weights")
        if not files.has("vae"):
            raise CheckpointError(f"'{checkpoint}' holds no VAE; pass a VAE file (--vae)")
        if not (files.has("clip_l") or files.has("clip_g")):
            raise CheckpointError(f"'{checkpoint}' holds no CLIP text encoders; pass --clip-l and --clip-g "
                                  "(and optionally --t5)")
        toks = checkpoint_tokenizers(checkpoint, files.metadata, tokenizers)
        metadata = FlashMetadata.from_safetensors(files.metadata, str(checkpoint))
        use_t5 = use_t5 and files.has("t5")
        report: dict[str, str] = {}

        def mmdit():
            return _load_quantizable(files, "mmdit", weights, dtype, device, quant_backend, report)

        def vae_model():
            return load_vae(component_state_dict(files, "vae", torch.float32), dtype=torch.float32, device=device,
                            what=f"'{files.sources['vae'][0]}' (VAE)")

        def text_encoder():
            t5_sd, t5_scheme = quantizable_state(files, "t5", t5_weights, dtype) if use_t5 else (None, None)
            encoder = TripleTextEncoder.from_state_dicts(
                clip_l=component_state_dict(files, "clip_l", dtype) if files.has("clip_l") else None,
                clip_g=component_state_dict(files, "clip_g", dtype) if files.has("clip_g") else None,
                t5=t5_sd, tokenizers=toks, dtype=dtype, device=device, t5_quant=t5_scheme)
            if t5_scheme is not None:
                _choose_backend(encoder.t5, t5_scheme, device, dtype, quant_backend, report, "t5")
            return encoder

        parts = (mmdit, vae_model, text_encoder)
        if not offload:  # read everything now: errors surface before any sampling
            parts = tuple(load() for load in parts)
        downscale = VAEConfig.from_state_dict(component_shapes(files, "vae")).downscale_factor
        pipe = cls(*parts, metadata, device, offload=offload, downscale_factor=downscale)
        pipe.quant_report = report
        return pipe

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
        """Sample model-space latents ``[B, 16, H/f, W/f]``, ``f = downscale_factor`` (one image per conditioning
        row)."""
        check_size(width, height, self.downscale_factor)
        mode = mode or self.metadata.sampler_mode or "euler"
        if mode not in schedule.SAMPLER_MODES:
            raise FlashError(f"sampler mode '{mode}' is not one of {', '.join(schedule.SAMPLER_MODES)}")
        if cfg != 1.0 and uncond is None:
            raise FlashError("cfg other than 1.0 needs a negative (unconditional) prompt")
        batch = cond.context.shape[0]
        f = self.downscale_factor
        shape = (batch, 16, height // f, width // f)
        noise = schedule.initial_noise(seed, shape).to(self.device)
        sigmas = self.sigmas(steps).to(self.device)
        velocity = self.velocity_fn(cond, uncond, cfg)
        x = sigmas[0] * noise
        if mode == "euler":
            return schedule.sample_euler(velocity, x, sigmas, callback)
        return schedule.sample_renoise(velocity, x, sigmas, schedule.renoise_sampler(seed, x), callback)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> images; NaN or infinite values (NaN weights, an fp16 overflow) raise
        :class:`NonFiniteImageError` rather than turning into black images."""
        check_finite(latents, "sampled latents")
        raw = process_out(latents.float())
        images = self.vae.decode(raw.to(self.vae.dtype))
        check_finite(images, "decoded images")
        return latents_to_images(images)

    def __call__(self, prompt: str, *, negative: str = "", steps: int = 4, seed: int = 0, width: int | None = None,
                 height: int | None = None, cfg: float = 1.0, use_t5: bool = True, batch: int = 1,
                 mode: str | None = None, progress: bool | Callable[[int, int], None] = True) -> list[Image.Image]:
        """Generate ``batch`` images for ``prompt``; noise for the whole batch comes from ``seed``.

        ``width`` / ``height`` default as ``sd35-flash generate``'s: one given, the other is the same; neither,
        the model's native size (:meth:`native_size`: 1024, or the model's largest side when smaller, the demo's
        16 px)."""
        if width is not None or height is not None:
            width = width if width is not None else height
            height = height if height is not None else width
            check_size(width, height, self.downscale_factor)
        if batch < 1:
            raise FlashError(f"batch must be at least 1, got {batch}")
        cond = self.encode_prompt(prompt, use_t5).repeat(batch)
        uncond = self.encode_prompt(negative, use_t5).repeat(batch) if cfg != 1.0 else None
        self._done_with("text_encoder")
        if width is None:  # after the text phase: with offload the MM-DiT it reads is loaded next anyway
            width = height = self.native_size()
        callback, bar = _progress_callback(progress, len(self.sigmas(steps)) - 1)
        try:
            latents = self.generate_latents(cond, seed=seed, width=width, height=height, steps=steps, cfg=cfg,
                                            uncond=uncond, mode=mode, callback=callback)
        finally:
            if bar is not None:
                bar.close()
        self._done_with("mmdit")
        images = self.decode(latents)
        self._done_with("vae")
        return images

    def native_size(self) -> int:
        """The image side ``__call__`` draws when given none: ``checkpoint_info.native_image_size`` of the
        MM-DiT's largest side with this pipeline's VAE (1024 when the MM-DiT module has no ``config``)."""
        config = getattr(self.mmdit, "config", None)
        return native_image_size(None if config is None else largest_side(config, self.downscale_factor))


def _progress_callback(progress, total: int):
    if callable(progress):
        return (lambda i, x, x0: progress(i + 1, total)), None
    if not progress:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="sampling", unit="step")
    return (lambda i, x, x0: bar.update(1)), bar


def _load_quantizable(files: CheckpointFiles, component: str, fmt: str | None, dtype: torch.dtype,
                      device: torch.device, backend: str, report: dict[str, str]) -> torch.nn.Module:
    sd, scheme = quantizable_state(files, component, fmt, dtype)
    if scheme is None:
        return load_mmdit(sd, dtype=dtype, device=device)
    model = load_mmdit(sd, dtype=dtype, device=device, quant_scheme=scheme)
    _choose_backend(model, scheme, device, dtype, backend, report, component)
    return model


def _choose_backend(model: torch.nn.Module, scheme, device, dtype, backend: str, report: dict, component: str):
    layers = quantized_layers(model)
    width = max((layer.in_features for layer in layers.values()), default=1024)
    choice = choose_backend(scheme.fmt, device, dtype, width=min(width, 4096), requested=backend)
    set_backend(model, choice.backend, dtype)
    report[component] = f"{scheme.fmt}, {len(layers)} layers, backend {choice.describe()}"


def _take_component(files: CheckpointFiles, extra: CheckpointFiles, component: str, path) -> None:
    if not extra.has(component):
        found = ", ".join(extra.components) or "nothing"
        raise CheckpointError(f"'{path}' was given as the {component} file but holds {found}")
    files.components[component] = extra.components[component]
    files.sources[component] = extra.sources[component]
    files.diffusers_keys.discard(component)
    files.diffusers_keys.update(extra.diffusers_keys & {component})

