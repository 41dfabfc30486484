"""Rectified-flow sampling: the shift map, teacher and student sigma grids, Euler, CFG and seeded noise.

Notation (docs/algorithm.md "Notation"): ``x_s = (1 - s) * x0 + s * eps``; the MM-DiT predicts the velocity
``v = eps - x0`` from the timestep ``1000 * s``; ``x0_hat = x_s - s * v``; an Euler step is
``x_{s'} = x_s + (s' - s) * v``.

Samplers take sigmas, they do not invent them (k-diffusion style): ``sample_euler(velocity_fn, x, sigmas)``.
Noise is drawn the way ComfyUI draws it, so a seed means the same image in both (docs/comfyui.md "Seeds and noise").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

SD35_SHIFT = 3.0
TIMESTEP_MULTIPLIER = 1000.0
SAMPLER_MODES = ("euler", "renoise")
GRID_KEY = "sd35_flash.student_sigmas"  # the checkpoint metadata key of a student grid
MAX_GRID_STEPS = 64  # a stored student grid has at most this many steps (a few-step student has 1 to 8)

#: The student grids of docs/algorithm.md "The student schedule": DMD2's [999, 749, 499, 249] through shift 3.
STUDENT_SIGMAS: dict[int, tuple[float, ...]] = {
    4: (1.0, 0.9, 0.75, 0.5, 0.0),
    2: (1.0, 0.75, 0.0),
}

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity_fn(x, sigma)``: the model's velocity at ``x`` for a batch of sigmas ``[B]`` (conditioning bound)."""

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``callback(i, x, x0_hat)`` after step ``i``: for progress bars and previews."""


def shift_sigma(t: torch.Tensor | float, shift: float = SD35_SHIFT) -> torch.Tensor | float:
    """The SD3 time shift ``s(t) = shift * t / (1 + (shift - 1) * t)`` (ComfyUI ``time_snr_shift``)."""
    return shift * t / (1 + (shift - 1) * t)


def sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The model's timestep input: ``1000 * sigma`` (the already shifted sigma), as float32."""
    return sigma.float() * TIMESTEP_MULTIPLIER


def teacher_sigmas(steps: int, shift: float = SD35_SHIFT) -> torch.Tensor:
    """``steps + 1`` sigmas from 1 to 0: uniform ``t`` pushed through the shift map (the teacher's schedule)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_sigma(t, shift).float()


def grid_problem(grid: Sequence[float]) -> str | None:
    """Why ``grid`` cannot be a student grid (a checkpoint's ``sd35_flash.student_sigmas``), or None: it must hold
    1 to :data:`MAX_GRID_STEPS` sigmas, finite real numbers strictly decreasing within (0, 1], one final 0
    optional. NaN fails every test here (each says what must hold, and every comparison with NaN is false)."""
    if not isinstance(grid, (list, tuple)):
        return f"is not a list of sigmas (got {type(grid).__name__})"
    if not 1 <= len(grid) <= MAX_GRID_STEPS + 1:
        return f"has {len(grid)} entries; expected 1 to {MAX_GRID_STEPS} sigmas (and a final 0)"
    bad = next((s for s in grid if isinstance(s, bool) or not isinstance(s, (int, float))), None)
    if bad is not None:
        return f"holds {str(bad)[:40]!r}, which is not a number"
    positive = list(grid[:-1]) if grid[-1] == 0 and len(grid) > 1 else list(grid)
    if not all(0.0 < s <= 1.0 for s in positive):
        return f"must be finite sigmas within (0, 1] (one final 0 optional), got {list(grid)}"
    if not all(a > b for a, b in zip(positive, positive[1:], strict=False)):
        return f"must decrease strictly, got {list(grid)}"
    return None


def check_grid(grid: Sequence[float], what: str = f"the stored student grid ({GRID_KEY})") -> list[float]:
    """``grid`` as floats, or a ``ValueError`` saying ``what`` is wrong with it (:func:`grid_problem`)."""
    problem = grid_problem(grid)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    return [float(s) for s in grid]


def student_sigmas(steps: int, grid: Sequence[float] | None = None) -> torch.Tensor:
    """The few-step student's sigmas, ending in 0.

    ``grid`` is the one stored in a checkpoint's metadata (with or without the final 0); without it the
    defaults of docs/algorithm.md are used for 2 and 4 steps. Any other step count has no student grid. A stored
    grid is never replaced by another: an invalid one is a ``ValueError`` (:func:`check_grid`).
    """
    if grid is not None:
        values = check_grid(grid)
        if values[-1] != 0.0:
            values.append(0.0)
        if len(values) - 1 != steps:
            raise ValueError(f"the stored student grid {values} has {len(values) - 1} steps, not {steps}")
        return _validated(torch.tensor(values, dtype=torch.float32))
    if steps not in STUDENT_SIGMAS:
        raise ValueError(f"no student grid for {steps} steps: the student was distilled for 2 or 4 steps")
    return torch.tensor(STUDENT_SIGMAS[steps], dtype=torch.float32)


def flash_sigmas(steps: int, grid: Sequence[float] | None = None, shift: float = SD35_SHIFT,
                 denoise: float = 1.0) -> torch.Tensor:
    """Sigmas for ``steps``: the student grid for the distilled step count, the shifted teacher schedule otherwise.

    ``denoise < 1`` keeps the tail of a longer schedule (ComfyUI's convention): ``round(steps / denoise)``
    steps are planned and the last ``steps + 1`` sigmas are returned.
    """
    if grid is not None:  # the stored grid wins and is validated first: an invalid one is never passed over
        grid = check_grid(grid)
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if denoise < 1.0:
        return teacher_sigmas(round(steps / denoise), shift)[-(steps + 1):]
    stored = grid is not None and len([s for s in grid if s > 0]) == steps
    if stored or (grid is None and steps in STUDENT_SIGMAS):
        return student_sigmas(steps, grid if stored else None)
    return teacher_sigmas(steps, shift)


def _validated(sigmas: torch.Tensor) -> torch.Tensor:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D list of at least 2 values, got shape {tuple(sigmas.shape)}")
    if not bool((sigmas[:-1] > sigmas[1:]).all()) or sigmas.max() > 1.0 or sigmas.min() < 0.0:
        raise ValueError(f"sigmas must decrease strictly within [0, 1], got {sigmas.tolist()}")
    return sigmas


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Noise exactly as ComfyUI's ``prepare_noise``: a CPU generator seeded with ``seed``, float32 randn of the
    whole latent batch at once."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), dtype=torch.float32, generator=generator, device="cpu")


def renoise_sampler(seed: int, like: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Fresh noise for the ``renoise`` mode, drawn as ComfyUI's ``lcm`` sampler draws it (a generator on the
    latent's device seeded with the seed), so the mode matches ComfyUI's stock ``lcm`` sampler."""
    generator = torch.Generator(device=like.device).manual_seed(int(seed))
    return lambda: torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance ``v_uncond + cfg * (v_cond - v_uncond)`` (linear, so equal to guiding x0)."""
    return v_uncond + cfg * (v_cond - v_uncond)


@torch.no_grad()
def sample_euler(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """Deterministic Euler along the model's own trajectory (the student's sampler, docs/algorithm.md)."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, sigma * s_in)
        if callback is not None:
            callback(i, x, x - sigma * v)
        x = x + (sigma_next - sigma) * v
    return x


@torch.no_grad()
def sample_renoise(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                   noise_fn: Callable[[], torch.Tensor], callback: StepCallback | None = None) -> torch.Tensor:
    """Re-noise sampling (DMD2 / LCM style): ``x <- (1 - s') * x0_hat + s' * eps_fresh`` after each step."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0_hat = x - sigma * velocity_fn(x, sigma * s_in)
        if callback is not None:
            callback(i, x, x0_hat)
        x = x0_hat if sigma_next == 0 else (1 - sigma_next) * x0_hat + sigma_next * noise_fn()
    return x
