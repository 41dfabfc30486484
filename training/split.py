"""Split-timestep branches at inference (docs/algorithm.md "Stage C"): the ``routed`` two-checkpoint mode, which runs
the high-noise branch where ``1000 * sigma > boundary`` and the low-noise branch elsewhere, to measure what
merging the branches into one checkpoint costs. Training the branches and merging them is in :mod:`.stages.split`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..flash_core.checkpoint import component_state_dict, index_checkpoint, load_mmdit


class RoutedMMDiT(nn.Module):
    """Two MM-DiTs behind one MM-DiT interface, chosen per sample by the timestep (``1000 * sigma``)."""

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float = 500.0):
        super().__init__()
        if high.config != low.config:
            raise ValueError("the routed branches must have the same architecture")
        self.high, self.low, self.boundary = high, low, float(boundary)
        self.config = high.config

    @property
    def dtype(self) -> torch.dtype:
        return self.high.dtype

    def forward(self, x: torch.Tensor, timestep, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=x.device).float().expand(x.shape[0])
        high = timestep > self.boundary
        if bool(high.all()):
            return self.high(x, timestep, context, y)
        if not bool(high.any()):
            return self.low(x, timestep, context, y)
        out = torch.empty_like(x)
        out[high] = self.high(x[high], timestep[high], context[high], y[high])
        out[~high] = self.low(x[~high], timestep[~high], context[~high], y[~high])
        return out


def load_routed(high_path, low_path, boundary: float = 500.0, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> RoutedMMDiT:
    """The routed model from two branch checkpoints (``branch_high.safetensors``, ``branch_low.safetensors``)."""
    branches = [load_mmdit(component_state_dict(index_checkpoint(p), "mmdit"), dtype=dtype, device=device)
                for p in (high_path, low_path)]
    return RoutedMMDiT(*branches, boundary=boundary)
