"""Flash Scheduler (MODEL + steps -> SIGMAS) and Flash Sampler (the one-node common case).

Both run on ComfyUI's sampling machinery: the scheduler feeds SamplerCustomAdvanced, and the sampler calls
``comfy.sample.sample_custom`` with ComfyUI's own ``euler`` / ``lcm`` samplers, so progress bars, previews,
interruption, noise (``prepare_noise``) and CFG are ComfyUI's. docs/algorithm.md "Sampling" says why those two samplers
are the student's deterministic and re-noise modes.
"""

from __future__ import annotations

import torch

from ..flash_core import schedule
from ..flash_core.errors import FlashError
from ..flash_core.graph import SEED_RANGE
from ..flash_core.vae import RELEASED_DOWNSCALE
from .loaders import CATEGORY
from .native import flash_metadata, model_vae_downscale
from .schema import combo, inputs, outputs

MODES = ["auto", "euler", "renoise"]
COMFY_SAMPLERS = {"euler": "euler", "renoise": "lcm"}  # lcm = x0_hat, then fresh noise at the next sigma
MAX_STEPS = 200


def model_sigmas(model, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The model's sigmas for ``steps``: the student grid (checkpoint metadata, else docs/algorithm.md's) for 2 or 4
    steps, the shifted teacher schedule (the model's shift, 3.0 unless ModelSamplingSD3 changed it) otherwise."""
    if not 1 <= int(steps) <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    shift = getattr(model.get_model_object("model_sampling"), "shift", schedule.SD35_SHIFT)
    return schedule.flash_sigmas(int(steps), flash_metadata(model).student_sigmas, float(shift), float(denoise))


def sampler_mode(model, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
    return (flash_metadata(model).sampler_mode or "euler") if mode == "auto" else mode


def check_latent(samples: torch.Tensor, downscale: int = RELEASED_DOWNSCALE) -> None:
    """Refuse latents the MM-DiT cannot patchify: latent sides must be even (patch 2), i.e. image sides multiples
    of ``2 * downscale`` pixels, ``downscale`` being the model's VAE's pixels per latent (8 for the released VAE,
    1 for the demo model's; :func:`.native.model_vae_downscale`)."""
    multiple = 2 * downscale
    for name, latent in (("width", samples.shape[-1]), ("height", samples.shape[-2])):
        value = latent * downscale
        if value % multiple:
            hint = ("use a size like 1024 or 1008" if downscale == RELEASED_DOWNSCALE else
                    f"EmptySD3LatentImage's {name} must be a multiple of 16 (8 x the latent)")
            raise FlashError(f"image {name} {value} is not a multiple of {multiple} (the latent is {latent}, "
                             f"{downscale} px per latent); {hint}")


class FlashScheduler:
    """Sigmas for SamplerCustomAdvanced: the timestep-shared student grid for 2 or 4 steps."""

    NODE_TYPE = "SD35FlashScheduler"
    INPUT_TYPES = inputs(
        NODE_TYPE,
        model={"tooltip": "The model whose student grid (checkpoint metadata) to use."},
        steps={"default": 4, "min": 1, "max": MAX_STEPS,
               "tooltip": "2 or 4: the student grid the model was distilled for; any other number: the shifted "
                          "teacher schedule."},
        denoise={"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                 "tooltip": "Below 1: the tail of a longer schedule, for image-to-image."},
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)
    OUTPUT_TOOLTIPS = ("Sigmas from 1 to 0 for SamplerCustomAdvanced.",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY
    DESCRIPTION = "The SD3.5-Flash 2/4-step timestep-shared schedule as SIGMAS."

    def get_sigmas(self, model, steps: int, denoise: float):
        return (model_sigmas(model, steps, denoise),)


class FlashSampler:
    """Noise, the Flash schedule and ComfyUI's euler / lcm sampler in one node."""

    NODE_TYPE = "SD35FlashSampler"
    INPUT_TYPES = inputs(
        NODE_TYPE,
        model={"tooltip": "An SD3.5-Flash model (any SD3 model works with steps > 4)."},
        positive={"tooltip": "The prompt (CLIPTextEncode / CLIPTextEncodeSD3)."},
        latent_image={"tooltip": "EmptySD3LatentImage for text-to-image, VAEEncode for image-to-image (with "
                                 "denoise < 1)."},
        seed={"default": 0, "min": 0, "max": SEED_RANGE - 1,
              "tooltip": "Noise seed; the same seed gives the same image as `sd35-flash generate`."},
        steps={"default": 4, "min": 1, "max": MAX_STEPS,
               "tooltip": "4 or 2 for a distilled model; more steps use the teacher schedule."},
        cfg={"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
             "tooltip": "Guidance scale. The student was distilled with guidance built in: keep 1.0 (one model "
                        "call per step). Above 1 needs a negative prompt."},
        mode=combo(MODES, default="auto",
                   tooltip="euler: deterministic Euler steps; renoise: predict x0_hat, then fresh noise at the "
                           "next sigma (ComfyUI's lcm sampler); auto: what the checkpoint says, else euler."),
        denoise={"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                 "tooltip": "Below 1 keeps part of the input latent (image-to-image)."},
        negative={"tooltip": "Negative prompt, used only when cfg is not 1."},  # optional (in the table)
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)
    OUTPUT_TOOLTIPS = ("The denoised latent, for VAEDecode.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Samples an SD3.5-Flash model in 4 or 2 steps with ComfyUI's samplers."

    def sample(self, model, positive, latent_image, seed: int, steps: int, cfg: float, mode: str,
               denoise: float = 1.0, negative=None):
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        if cfg != 1.0 and negative is None:
            raise FlashError(f"cfg {cfg} needs a negative conditioning; connect one or set cfg to 1.0")
        samples = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        check_latent(samples, model_vae_downscale(model))
        sigmas = model_sigmas(model, steps, denoise)
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
        sampler = comfy.samplers.sampler_object(COMFY_SAMPLERS[sampler_mode(model, mode)])
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        out = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative if negative is not None else [], samples,
            noise_mask=latent_image.get("noise_mask"), callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        return ({**latent_image, "samples": out},)
