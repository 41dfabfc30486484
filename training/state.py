"""Training state on disk without pickle: weights, optimizer moments and counters in one safetensors file.

``torch.optim`` state dicts are flattened to ``optim.<name>.state.<param>::<key>`` tensors plus the param groups
as JSON metadata, and rebuilt on load. Files are written atomically; only the newest ``keep_last`` are kept.

Sharded (FSDP) tensors are gathered whole for the file (a collective: every rank calls :func:`save_state`, rank 0
writes) and sharded again like the live tensors on load, so a state file is the same whatever the process count.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..flash_core.checkpoint import atomic_save

STATE_PATTERN = re.compile(r"step_(\d+)\.safetensors$")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor: sharded (DTensor) ones are gathered from every rank first (a collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def shard_like(full: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``full`` placed like ``live``: sharded the same way when ``live`` is a DTensor, else on its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(live, DTensor):
        return distribute_tensor(full.to(live.device, live.dtype), live.device_mesh, live.placements)
    return full.to(live.device)


def flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{name}.state.{index}::{key}"] = whole(tensor)
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      meta: dict) -> None:
    prefix = f"optim.{name}.state."
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix):].rsplit("::", 1)
            param = params[int(index)]
            state.setdefault(int(index), {})[field] = (shard_like(value, param) if value.shape == param.shape
                                                       else value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(folder: Path, step: int, modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
               optimizers: dict[str, torch.optim.Optimizer], extra: dict, keep_last: int,
               write: bool = True) -> Path:
    """Write ``step_NNNNNN.safetensors`` in ``folder`` and delete all but the newest ``keep_last``.

    With sharded modules every rank must call this (the tensors are gathered); only ``write=True`` writes.
    """
    tensors, meta = {}, {"step": step, "extra": extra, "optimizers": {}}
    for name, module in modules.items():
        sd = module.state_dict() if isinstance(module, torch.nn.Module) else module
        tensors.update({f"{name}.{k}": whole(v) for k, v in sd.items()})
    for name, optimizer in optimizers.items():
        flat, groups = flatten_optimizer(name, optimizer)
        tensors.update(flat)
        meta["optimizers"][name] = groups
    path = folder / f"step_{step:06d}.safetensors"
    if not write:
        return path
    path = atomic_save(tensors, path, {"sd35_flash.state": json.dumps(meta)})
    for old in list_states(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_states(folder: Path) -> list[Path]:
    """State files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if STATE_PATTERN.search(p.name)),
                  key=lambda p: int(STATE_PATTERN.search(p.name).group(1)))


def load_state(path: Path, modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
               optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, dict]:
    """Load a state file into ``modules`` (strict) and ``optimizers``; returns (step, extra)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["sd35_flash.state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, module in modules.items():
        prefix = name + "."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        live = module.state_dict() if isinstance(module, torch.nn.Module) else module
        missing = live.keys() - sd.keys()
        if missing:
            raise ValueError(f"{path}: no '{name}.{sorted(missing)[0]}' in the saved state")
        if isinstance(module, torch.nn.Module):
            module.load_state_dict({k: shard_like(sd[k], live[k]) for k in live}, strict=True)
        else:
            for k in module:
                module[k].copy_(shard_like(sd[k], module[k]))
    for name, optimizer in optimizers.items():
        restore_optimizer(name, optimizer, tensors, meta["optimizers"][name])
    return meta["step"], meta["extra"]
