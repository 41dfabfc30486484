"""Stage C, split-timestep fine-tuning (docs/algorithm.md "Stage C"): two copies of the student train on disjoint
timestep ranges, the high-noise branch on the student steps with ``1000 * sigma > split.boundary`` and the low
one on the rest, each with its own EMA; the EMAs are saved as ``branch_high``/``branch_low`` and merged into one
checkpoint. The objective is DMD's step (:class:`.dmd.DMDScores`, one fake score for both branches) or Stage A's
(``split.objective``). Previews sample the two branches routed by timestep (:class:`..split.RoutedMMDiT`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ...flash_core.checkpoint import component_state_dict, index_checkpoint
from .. import objectives as obj
from ..config import ConfigError
from ..distributed import on_main
from ..run_folder import stage_state
from ..split import RoutedMMDiT
from ..state import load_state
from . import Driver, StagePlan
from .dmd import DMDScores, new_fake_score
from .networks import make_optimizer, optimizer_step, set_lr
from .pretrain import trajectory_step

BRANCHES = ("high", "low")


def branch_steps(sigmas: torch.Tensor, boundary: float) -> tuple[list[int], list[int]]:
    """Student step indices of the high-noise branch (``1000 * sigma > boundary``) and of the low one, for the
    student grid ``sigmas`` (its final 0 included)."""
    timesteps = [1000.0 * float(s) for s in sigmas[:-1]]
    high = [k for k, t in enumerate(timesteps) if t > boundary]
    low = [k for k, t in enumerate(timesteps) if t <= boundary]
    if not high or not low:
        raise ConfigError(f"split.boundary: {boundary} leaves a branch with no student steps "
                          f"(step timesteps {timesteps})")
    return high, low


def dmd_scores(trainer: Driver) -> tuple[DMDScores, int]:
    """The branches' DMD scores and the fake-score warm-up steps already done. DMD's own fake score, already
    warmed up on the student the branches start from (when this folder ran DMD); otherwise a fresh copy of the
    teacher, warmed up here first (docs/toyworld.md "Pitfalls" 1)."""
    fake = new_fake_score(trainer)
    dmd_state = on_main(trainer.world, lambda: stage_state(trainer.out, "dmd"), share=True)
    if dmd_state is not None:
        load_state(dmd_state, {"fake": fake}, {})
    warmup_done = trainer.config.dmd.fake_warmup_steps if dmd_state is not None else 0
    return DMDScores(trainer, fake), warmup_done


def prepare(trainer: Driver) -> StagePlan:
    """Stage C: both branches from the student (:meth:`~..trainer.Trainer.initial_student`), each with its EMA
    and optimizer (``dmd.optim`` or ``pretrain.optim`` by objective); with the DMD objective, the fake score."""
    cfg = trainer.config.split
    high_steps, low_steps = branch_steps(trainer.sigmas, cfg.boundary)
    start = trainer.initial_student("split")
    branches = {"high": start, "low": copy.deepcopy(start)}
    models = {name: trainer.wrap(b) for name, b in branches.items()}
    emas = {name: {k: v.detach().clone() for k, v in b.state_dict().items()} for name, b in branches.items()}
    optim = trainer.config.dmd.optim if cfg.objective == "dmd" else trainer.config.pretrain.optim
    opts = {name: make_optimizer(b.parameters(), optim) for name, b in branches.items()}
    scores, warmup_done = dmd_scores(trainer) if cfg.objective == "dmd" else (None, 0)
    # The low branch's steps start where the high branch's steps left them, as at inference (routed or merged).
    rollout = {"high": None, "low": RoutedMMDiT(branches["high"], branches["low"], cfg.boundary)}
    # the first branch update: after a fresh fake score's warm-up, if this folder's DMD did not warm it up
    first_update = trainer.config.dmd.fake_warmup_steps - warmup_done if scores is not None else 0

    def train_step(step: int, generator: torch.Generator) -> dict[str, float]:
        values = {}
        for name, ks in (("high", high_steps), ("low", low_steps)):
            if scores is not None:
                vals, loss = scores.step(models[name], generator, step + warmup_done, ks, rollout[name])
            else:
                vals, loss = trajectory_step(trainer, models[name], generator, ks)
            if loss is None:  # the fresh fake score's warm-up: no branch update yet
                values.update({f"{name}_fake": vals["fake"]})
                continue
            set_lr(opts[name], optim, step, cfg.iterations)
            optimizer_step(models[name], opts[name], loss, optim)
            obj.ema_update(emas[name], dict(branches[name].named_parameters()),
                           obj.ema_decay_at(step - first_update, cfg.ema_decay))
            values.update({f"{name}_{k}": v for k, v in vals.items() if k in ("loss", "fake", "g_abs")})
        if "high_loss" in values:
            values["loss"] = (values["high_loss"] + values["low_loss"]) / 2
        return values

    def outputs() -> Path:
        for name in BRANCHES:
            trainer.save_output(f"branch_{name}", emas[name], cfg.iterations, stage="split")
        return merge(trainer)

    modules = {"high": branches["high"], "low": branches["low"], "ema_high": emas["high"], "ema_low": emas["low"]}
    optimizers = dict(opts)
    if scores is not None:
        modules["fake"], optimizers["fake"] = scores.fake, scores.fake_optimizer
    return StagePlan(cfg.iterations, modules, optimizers, train_step, branches, outputs,
                     preview_model=RoutedMMDiT(branches["high"], branches["low"], cfg.boundary))


def merge(trainer: Driver) -> Path:
    """Interpolate the branch EMAs: ``a * high + (1 - a) * low`` (docs/algorithm.md "Stage C")."""
    branches = {}
    for name in BRANCHES:
        path = trainer.stage_output(f"branch_{name}")
        if not path.exists():
            raise ConfigError(f"merge: '{path}' is missing; run the split stage first")
        branches[name] = component_state_dict(index_checkpoint(path), "mmdit")
    merged = obj.merge_weights(branches["high"], branches["low"], trainer.config.split.merge_alpha)
    return trainer.save_output("merged", merged, trainer.config.split.iterations, stage="merge")
