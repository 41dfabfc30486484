"""Training state on disk without pickle: weights, optimizer moments and counters in one safetensors file.

``torch.optim`` state dicts are flattened to ``optim.<name>.state.<param>::<key>`` tensors plus the param groups
as JSON metadata, and rebuilt on load. Files are written atomically, and never with a NaN or an infinity in them
(:class:`NonFiniteStateError`); standalone, only the newest ``keep_last`` are kept (the trainer keeps its run's
own record instead: :mod:`.run_folder`).

A state file is input like any other: :func:`read_state` reads all of it and checks it (metadata, finite values)
before :func:`apply_state` checks every tensor's name and shape against the live modules and optimizers and loads
it; either refuses with :class:`StateError`, one line naming the file.

Sharded (FSDP) tensors are gathered whole for the file (a collective: every rank calls :func:`save_state`, rank 0
writes) and sharded again like the live tensors on load, so a state file is the same whatever the process count.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..flash_core.checkpoint import atomic_save
from ..flash_core.errors import FlashError

STATE_PATTERN = re.compile(r"step_(\d+)\.safetensors$")
META_KEY = "sd35_flash.state"
MAX_STEP = 10**12


class TrainingError(FlashError):
    """A training run cannot go on: its folder, its saved state or its numbers; the message says what to do."""


class StateError(TrainingError, ValueError):
    """A state file is unreadable, damaged, or does not fit the models it is loaded into."""


class NonFiniteStateError(TrainingError):
    """A state to be saved holds NaN or infinite values (the training diverged): it is not written."""


def state_name(step: int) -> str:
    """The file name of the state after ``step`` steps."""
    return f"step_{step:06d}.safetensors"


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


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def flatten_optimizer(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{name}.state.{index}::{key}"] = whole(tensor)
    return tensors, {"param_groups": state["param_groups"]}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fits(saved, live) -> bool:
    """Whether a saved param-group setting can stand in for the live one: same kind, finite numbers."""
    if isinstance(live, bool) or live is None:
        return saved is None or isinstance(saved, bool)
    if isinstance(live, (int, float)):
        return _number(saved)
    if isinstance(live, (tuple, list)):
        return (isinstance(saved, (tuple, list)) and len(saved) == len(live)
                and all(_number(s) if _number(v) else type(s) is type(v) for s, v in zip(saved, live, strict=True)))
    return type(saved) is type(live)


def checked_groups(path: Path, name: str, saved, live_groups: list[dict]) -> list[dict]:
    """The live param groups with the saved settings put in, each checked (a StateError names the first bad
    one); settings the live optimizer does not have are left out."""
    if not isinstance(saved, list) or len(saved) != len(live_groups):
        raise StateError(f"'{path}': optimizer '{name}' has {len(saved) if isinstance(saved, list) else 'no'} "
                         f"param groups; expected {len(live_groups)}")
    groups = []
    for index, (group, live) in enumerate(zip(saved, live_groups, strict=True)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                or len(group["params"]) != len(live["params"]):
            raise StateError(f"'{path}': optimizer '{name}' param group {index} does not list "
                             f"{len(live['params'])} parameters")
        merged = {"params": list(range(len(live["params"])))}
        for key, value in live.items():
            if key == "params":
                continue
            if key in group and not _fits(group[key], value):
                raise StateError(f"'{path}': optimizer '{name}' setting '{key}' is {group[key]!r}; expected a "
                                 f"value like {value!r}")
            chosen = group.get(key, value)
            merged[key] = tuple(chosen) if isinstance(value, tuple) else chosen
        groups.append(merged)
    offset = 0
    for group in groups:  # torch numbers the parameters across groups
        group["params"] = [offset + i for i in group["params"]]
        offset += len(group["params"])
    return groups


def optimizer_state(name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                    path: Path = Path("state")) -> dict:
    """The state dict to load into ``optimizer``: the ``optim.<name>.*`` tensors (each naming one of its
    parameters, with that parameter's shape, or a scalar) and the param groups of ``meta``, checked."""
    prefix = f"optim.{name}.state."
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        index, _, field = key[len(prefix):].partition("::")
        if not index.isdigit() or int(index) >= len(params) or not field:
            raise StateError(f"'{path}': '{key}' names no parameter of optimizer '{name}' ({len(params)} of them)")
        param = params[int(index)]
        if value.shape != param.shape and value.dim():
            raise StateError(f"'{path}': '{key}' has shape {list(value.shape)}; its parameter has "
                             f"{list(param.shape)}")
        state.setdefault(int(index), {})[field] = value
    groups = checked_groups(path, name, meta.get("param_groups"), optimizer.state_dict()["param_groups"])
    return {"state": state, "param_groups": groups}


def restore_optimizer(name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      meta: dict, path: Path = Path("state")) -> None:
    """Load ``optim.<name>.*`` tensors and the param groups of ``meta`` into ``optimizer``, checked first."""
    load_optimizer(optimizer, optimizer_state(name, optimizer, tensors, meta, path))


def load_optimizer(optimizer: torch.optim.Optimizer, checked: dict) -> None:
    """Load a state dict from :func:`optimizer_state`, moments placed like their parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {index: {field: shard_like(value, params[index]) if value.shape == params[index].shape else value
                     for field, value in fields.items()}
             for index, fields in checked["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": checked["param_groups"]})


def save_state(folder: Path, step: int, modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
               optimizers: dict[str, torch.optim.Optimizer], extra: dict, keep_last: int | None,
               write: bool = True) -> Path:
    """Write ``step_NNNNNN.safetensors`` in ``folder``; with ``keep_last``, delete all but the newest that many
    state files there (``None``: the caller prunes, as the trainer does by its run's record).

    A state holding NaN or infinite values is refused (:class:`NonFiniteStateError`) and nothing is written.
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
    path = folder / state_name(step)
    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteStateError(f"'{bad}' holds NaN or infinite values; the state of step {step} was not saved")
    if not write:
        return path
    path = atomic_save(tensors, path, {META_KEY: json.dumps(meta)})
    if keep_last is not None:
        for old in list_states(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def list_states(folder: Path) -> list[Path]:
    """State files in ``folder``, oldest first by the step in their names."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if STATE_PATTERN.search(p.name)),
                  key=lambda p: int(STATE_PATTERN.search(p.name).group(1)))


def _checked_meta(path: Path, raw) -> dict:
    """The state's metadata, its shape checked: ``step`` a count, ``extra`` and ``optimizers`` objects."""
    if raw is None:
        raise StateError(f"'{path}' has no '{META_KEY}' metadata; expected a training state file")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise StateError(f"'{path}': its '{META_KEY}' metadata is not JSON ({err})") from None
    if not isinstance(meta, dict):
        raise StateError(f"'{path}': its '{META_KEY}' metadata is not an object")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise StateError(f"'{path}': step {step!r} in its metadata; expected a whole number from 0")
    for key in ("extra", "optimizers"):
        if not isinstance(meta.get(key), dict):
            raise StateError(f"'{path}': '{key}' in its metadata is {type(meta.get(key)).__name__}; "
                             "expected an object")
    return meta


def read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A state file's metadata and tensors, all read and checked: a missing, truncated or damaged file, one whose
    metadata is not a state's, or one holding NaN or infinite values is a :class:`StateError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"'{path}' is missing" if not path.exists() else f"'{path}' is not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        raise StateError(f"'{path}' is unreadable ({err})") from None
    meta = _checked_meta(path, raw)
    bad = first_non_finite(tensors)
    if bad is not None:
        raise StateError(f"'{path}': '{bad}' holds NaN or infinite values")
    return meta, tensors


def _module_tensors(path: Path, name: str, tensors: dict[str, torch.Tensor],
                    live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved tensors of module ``name``, each present with the live tensor's shape and dtype."""
    prefix = name + "."
    saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for key in sorted(live):
        if key not in saved:
            raise StateError(f"'{path}': no '{name}.{key}' in the saved state")
        if saved[key].shape != live[key].shape or saved[key].dtype != live[key].dtype:
            raise StateError(f"'{path}': '{name}.{key}' is {saved[key].dtype} {list(saved[key].shape)}; the "
                             f"model has {live[key].dtype} {list(live[key].shape)}")
    return saved


def apply_state(path: Path, meta: dict, tensors: dict[str, torch.Tensor],
                modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
                optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, dict]:
    """Load what :func:`read_state` read into ``modules`` (strict: every tensor, same shapes) and ``optimizers``;
    returns (step, extra). Everything is checked before anything is loaded."""
    checked = {}
    for name, module in modules.items():
        live = module.state_dict() if isinstance(module, torch.nn.Module) else module
        checked[name] = (_module_tensors(path, name, tensors, live), live)
    moments = {}
    for name, optimizer in optimizers.items():
        if not isinstance(meta["optimizers"].get(name), dict):
            raise StateError(f"'{path}': no optimizer '{name}' in the saved state")
        moments[name] = optimizer_state(name, optimizer, tensors, meta["optimizers"][name], path)
    for name, module in modules.items():
        saved, live = checked[name]
        if isinstance(module, torch.nn.Module):
            module.load_state_dict({k: shard_like(saved[k], live[k]) for k in live}, strict=True)
        else:
            for k in module:
                module[k].copy_(shard_like(saved[k], module[k]))
    for name, optimizer in optimizers.items():
        load_optimizer(optimizer, moments[name])
    return meta["step"], meta["extra"]


def load_state(path: Path, modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
               optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, dict]:
    """Read a state file (:func:`read_state`) and load it into ``modules`` and ``optimizers``; returns
    (step, extra)."""
    meta, tensors = read_state(path)
    return apply_state(path, meta, tensors, modules, optimizers)
