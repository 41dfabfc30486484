"""The losses of SD3.5-Flash distillation as small functions (docs/algorithm.md, Stages A-C).

Everything works on velocities in the rectified-flow convention of docs/algorithm.md "Notation":
``x_s = (1 - s) x0 + s eps``, ``v = eps - x0``, ``x0_hat = x_s - s v``, Euler ``x_{s'} = x_s + (s' - s) v``.
A *velocity function* ``v(x, sigma)`` has its conditioning (and CFG) bound, as in :mod:`flash_core.schedule`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..flash_core.schedule import SD35_SHIFT, shift_sigma
from .config import SCORE_SAMPLES

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A sigma (scalar or ``[B]``) shaped to broadcast against ``like`` ``[B, C, H, W]``."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """``x + (s' - s) v``."""
    return x + (per_sample(sigma_next, x) - per_sample(sigma, x)) * v


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """``x0_hat = x - s v``."""
    return x - per_sample(sigma, x) * v


def noised(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """``(1 - s) x0 + s eps``."""
    s = per_sample(sigma, x0)
    return (1 - s) * x0 + s * eps


# --------------------------------------------------------------------------------- Stage A: trajectory guidance


def trajectory_loss(student: VelocityFn, x_start: torch.Tensor, x_end: torch.Tensor, sigma, sigma_next,
                    kind: str = "l2", huber_c: float = 1e-3) -> torch.Tensor:
    """Segment endpoint matching (docs/algorithm.md "Stage A"): one student Euler step from the teacher's point at
    ``sigma`` should land on the teacher's point at ``sigma_next``. Mean over the batch of the per-sample mean
    squared error, or of the pseudo-Huber distance ``sqrt(d^2 + c^2) - c`` on the per-sample RMS error."""
    v = student(x_start, torch.as_tensor(sigma, device=x_start.device).expand(x_start.shape[0]))
    error = (euler_step(x_start, v, sigma, sigma_next) - x_end).float()
    mse = error.pow(2).flatten(1).mean(1)
    if kind == "l2":
        return mse.mean()
    if kind == "pseudo_huber":
        return (torch.sqrt(mse + huber_c**2) - huber_c).mean()
    raise ValueError(f"trajectory loss must be 'l2' or 'pseudo_huber', got '{kind}'")


# --------------------------------------------------------------------------------------- Stage B: DMD


@torch.no_grad()
def rollout(student: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """The student's own trajectory from ``noise`` (at ``sigmas[0]``) through ``steps`` Euler steps, no grad."""
    x = noise * sigmas[0]
    for i in range(steps):
        v = student(x, sigmas[i].expand(x.shape[0]))
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x


class StudentTrajectory:
    """The student's own trajectory from one batch of ``noise`` (no grad), computed step by step as far as it is
    asked for and kept: the fake-score updates and the generator step of one DMD iteration read the same
    points instead of each rolling the student out again (its weights do not change in between). The numbers
    are :func:`rollout`'s, computed once."""

    def __init__(self, student: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor):
        self.student, self.sigmas = student, sigmas
        self.points = [noise * sigmas[0]]
        self.velocities: list[torch.Tensor] = []

    @torch.no_grad()
    def velocity(self, k: int) -> torch.Tensor:
        """The student's velocity at its ``k``-th point."""
        while len(self.velocities) <= k:
            i = len(self.velocities)
            x = self.points[i]
            v = self.student(x, self.sigmas[i].expand(x.shape[0]))
            self.velocities.append(v)
            self.points.append(euler_step(x, v, self.sigmas[i], self.sigmas[i + 1]))
        return self.velocities[k]

    def point(self, k: int) -> torch.Tensor:
        """``x_k``: the point the student's step ``k`` starts from (``noise * sigmas[0]`` for ``k = 0``)."""
        if k > 0:
            self.velocity(k - 1)
        return self.points[k]

    def x0(self, k: int) -> torch.Tensor:
        """The student's x0 estimate at step ``k`` (no grad): what the fake score is fit to."""
        return x0_from_velocity(self.point(k), self.velocity(k), self.sigmas[k])


@dataclass
class GeneratorStep:
    """One student step with gradient (docs/algorithm.md "Stage B"): its input ``x_k`` at ``sigma_k``, the predicted
    ``x0_hat`` (carries the gradient), and the point the scores are read at, ``x_score`` at ``sigma_score``."""

    x_k: torch.Tensor
    sigma_k: torch.Tensor
    x0_hat: torch.Tensor
    x_score: torch.Tensor
    sigma_score: torch.Tensor


def renoise_sigma(u: torch.Tensor, low: float = 0.02, high: float = 0.98, shift: float = SD35_SHIFT) -> torch.Tensor:
    """The re-noise baseline's sigma from uniforms ``u`` in [0, 1): ``t = low + u (high - low)`` through the shift."""
    return shift_sigma(low + u * (high - low), shift)


def generator_step(student: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, k: int, score_sample: str,
                   renoise_eps: torch.Tensor, renoise_u: torch.Tensor,
                   renoise_range: tuple[float, float] = (0.02, 0.98), shift: float = SD35_SHIFT,
                   x_k: torch.Tensor | None = None) -> GeneratorStep:
    """Roll the student to step ``k`` without grad, take step ``k`` with grad, and choose the score sample.

    ``score_sample`` (docs/algorithm.md "Stage B"):
    * ``shared_next``: the student's next trajectory point ``x_k + (s_{k+1} - s_k) v_k`` at the known
      ``s_{k+1}``; on the last step (``s_{k+1} = 0``) ``x0_hat`` is re-noised at a sigma of the student grid.
    * ``shared_current``: the step's own input point ``x_k`` at ``s_k``. Scores are read there; the student's
      ``x0_hat`` is what the gradient moves.
    * ``renoise``: ``x0_hat`` re-noised with fresh noise at a random shifted sigma (DMD2 / SwD baseline).

    The randomness comes in as arguments (``renoise_eps`` like ``noise``, ``renoise_u`` uniforms ``[B]``) so that
    callers draw it for a global batch and every rank, and a resumed run, sees the same numbers. ``x_k``: the
    start of step ``k`` when the caller has rolled the student out already (:class:`StudentTrajectory`).
    """
    if score_sample not in SCORE_SAMPLES:
        raise ValueError(f"score_sample must be one of {', '.join(SCORE_SAMPLES)}, got '{score_sample}'")
    batch = noise.shape[0]
    x_k = rollout(student, noise, sigmas, k) if x_k is None else x_k
    sigma_k = sigmas[k].expand(batch)
    v_k = student(x_k, sigma_k)
    x0_hat = x0_from_velocity(x_k, v_k, sigma_k)
    sigma_next = sigmas[k + 1]
    if score_sample == "shared_current":
        return GeneratorStep(x_k, sigma_k, x0_hat, x_k, sigma_k)
    if score_sample == "shared_next" and sigma_next > 0:
        x_next = euler_step(x_k, v_k, sigma_k, sigma_next)
        return GeneratorStep(x_k, sigma_k, x0_hat, x_next, sigma_next.expand(batch))
    if score_sample == "shared_next":  # last step: re-noise x0_hat at a sigma of the student grid
        grid = sigmas[sigmas > 0]
        sigma_r = grid[(renoise_u * len(grid)).long().clamp(max=len(grid) - 1).to(grid.device)]
    else:
        sigma_r = renoise_sigma(renoise_u, *renoise_range, shift=shift).to(noise.device)
    return GeneratorStep(x_k, sigma_k, x0_hat, noised(x0_hat, renoise_eps, sigma_r), sigma_r)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine between two whole batches as flat vectors (0 when either is zero): a logged diagnostic."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))


def dmd_gradient(x0_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, normaliser: str = "per_sample",
                 clip: float = 0.0) -> torch.Tensor:
    """``g = (x0_fake - x0_real) / mean|x0_hat - x0_real|`` in fp32 (docs/algorithm.md "Stage B", DMD2's normaliser).

    ``normaliser``: the mean over C, H, W of each sample (``per_sample``) or over the whole batch
    (``per_batch``). ``clip > 0`` clips g elementwise to ``[-clip, clip]``.
    """
    diff = (x0_hat.detach() - x0_real).float().abs()
    if normaliser == "per_sample":
        scale = diff.flatten(1).mean(1).reshape(-1, *([1] * (diff.ndim - 1)))
    elif normaliser == "per_batch":
        scale = diff.mean()
    else:
        raise ValueError(f"normaliser must be 'per_sample' or 'per_batch', got '{normaliser}'")
    g = (x0_fake - x0_real).float() / scale.clamp_min(1e-8)
    return g.clamp(-clip, clip) if clip > 0 else g


def dmd_generator_loss(x0_hat: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``0.5 ||x0_hat - stopgrad(x0_hat - g)||^2`` (mean over elements): its gradient wrt ``x0_hat`` is ``g``
    divided by the element count per sample times the batch, so it moves x0_hat down g."""
    target = (x0_hat.detach().float() - g).detach()
    return 0.5 * (x0_hat.float() - target).pow(2).mean()


@torch.no_grad()
def score_x0(score: VelocityFn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A score network's x0 estimate at ``(x, sigma)``: ``x - s v``."""
    return x0_from_velocity(x, score(x, sigma), sigma)


def flow_matching_loss(model: VelocityFn, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """The rectified-flow loss ``||v(x_s, s) - (eps - x0)||^2`` on detached ``x0`` (the teacher's data, the fake
    score's student samples); ``weight``, broadcast against the latents (``[B, 1, h, w]``), scales each squared
    error (the teacher's region weight: docs/toyworld.md "Teacher")."""
    x0 = x0.detach()
    x = noised(x0, eps, sigma)
    error = (model(x, sigma).float() - (eps - x0).float()).pow(2)
    return (error if weight is None else error * weight).mean()


# ---------------------------------------------------------------------------------- Stage C: EMA and merging


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay at update ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``, so a short run's
    EMA is not dominated by the weights it started from (a random init for the teacher, the DMD student for a
    split branch: 100 updates leave it a share below 1e-12 where a plain 0.99 EMA would keep 37 %)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * params`` in place (docs/algorithm.md "Stage C", decay 0.99). Pass
    the parameters only: a buffer in ``ema`` (the MM-DiT's fixed sin-cos ``pos_embed``) keeps its exact value,
    where averaging it with itself would drift it by rounding (2.6e-5 after 10 000 teacher iterations, enough
    that the quantizer no longer recognises the table it elides)."""
    for name, value in params.items():
        ema[name].mul_(decay).add_(value.detach().to(ema[name].dtype), alpha=1 - decay)


@torch.no_grad()
def merge_weights(high: dict[str, torch.Tensor], low: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``theta = alpha * theta_high + (1 - alpha) * theta_low`` for every floating tensor; others from ``high``."""
    if high.keys() != low.keys():
        missing = sorted(high.keys() ^ low.keys())
        raise ValueError(f"the branches hold different tensors, e.g. '{missing[0]}'")
    return {k: (alpha * high[k].float() + (1 - alpha) * low[k].float()).to(high[k].dtype)
            if high[k].is_floating_point() else high[k].clone() for k in high}
