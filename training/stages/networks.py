"""What every stage does with its networks: bind conditioning (and CFG) to an MM-DiT as a velocity ``v(x,
sigma)``, recompute blocks in the backward pass, and update with AdamW (linear warm-up, gradient clipping)."""

from __future__ import annotations

import math

import torch

from ...flash_core.schedule import sigma_to_timestep
from ..config import OptimConfig
from ..objectives import VelocityFn
from ..state import whole


def velocity_fn(model: torch.nn.Module, context: torch.Tensor, pooled: torch.Tensor, autocast: bool = False,
                uncond: tuple[torch.Tensor, torch.Tensor] | None = None, cfg: float = 1.0) -> VelocityFn:
    """Bind conditioning (and CFG) to an MM-DiT: ``v(x, sigma)`` in fp32."""
    dtype = next(model.parameters()).dtype

    def v(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            if uncond is not None and cfg != 1.0:
                out = model(torch.cat([x, x]).to(dtype), sigma_to_timestep(torch.cat([sigma, sigma])),
                            torch.cat([context, uncond[0]]).to(dtype), torch.cat([pooled, uncond[1]]).to(dtype))
                cond, un = out.float().chunk(2)
                return un + cfg * (cond - un)
            return model(x.to(dtype), sigma_to_timestep(sigma), context.to(dtype), pooled.to(dtype)).float()

    return v


def enable_gradient_checkpointing(mmdit: torch.nn.Module) -> None:
    """Recompute each joint block in the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    for block in mmdit.joint_blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward: checkpoint(_f, *a, use_reentrant=False)


def make_optimizer(params, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW with its fused kernel: one pass over all parameters instead of a loop of small ops per tensor
    (the same update to float rounding; tests/test_training_numbers.py)."""
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay,
                             fused=True)


def set_lr(optimizer: torch.optim.Optimizer, config: OptimConfig, step: int, total: int | None = None) -> float:
    """The learning rate of update ``step`` of ``total``, set on every group: a linear warm-up over
    ``warmup_steps``, then ``lr`` (``schedule = "constant"``) or a cosine from ``lr`` to ``min_lr`` at update
    ``total - 1`` (``"cosine"``; without ``total``, constant)."""
    lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
    if config.schedule == "cosine" and total is not None and step >= config.warmup_steps:
        progress = min(1.0, (step - config.warmup_steps) / max(1, total - 1 - config.warmup_steps))
        lr = config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   config: OptimConfig) -> torch.Tensor:
    """Backward, clip, step; returns the gradient norm before clipping, where it was computed (no host sync:
    :func:`norm_value` reads it when it is logged)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip if config.grad_clip > 0 else math.inf)
    optimizer.step()
    return norm


def norm_value(norm: torch.Tensor) -> float:
    """A gradient norm from :func:`optimizer_step` as a number (sharded norms gathered first)."""
    return float(whole(norm))
