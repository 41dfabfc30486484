"""The stage kinds the :class:`~..trainer.Trainer` drives, one module each: :mod:`.teacher` (rectified flow from
scratch), :mod:`.pretrain` (Stage A, trajectory guidance), :mod:`.dmd` (Stage B: the real and fake scores and
the generator step) and :mod:`.split` (Stage C: two branches, then the merge).

Each module's ``prepare(trainer)`` builds the stage's networks and optimizers and returns a :class:`StagePlan`:
what its state files hold, its step function, and its outputs (:class:`Driver`: what it uses of the trainer).
The trainer owns everything around the steps (the step generators, resume, state files, logs, previews, stops);
a step draws from the generator it is given, and only from it, so its draws are the same on every rank and
after a resume. Shared pieces: :mod:`.networks`
(velocity binding, optimizers) and :mod:`.previews` (sample grids).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from ..config import Config
from ..data import TeacherData
from ..distributed import World
from ..teacher import DatasetSource

StepFn = Callable[[int, torch.Generator], dict[str, float]]  # (step, its generator) -> the values to log


@dataclass
class StagePlan:
    """One stage kind, ready to train: what the trainer's loop steps, saves and keeps."""

    iterations: int
    modules: dict  # what a state file holds besides the optimizers: networks and EMA state dicts, by name
    optimizers: dict[str, torch.optim.Optimizer]
    step: StepFn
    trained: dict[str, torch.nn.Module]  # kept as Trainer.models (and compared across DDP ranks) after the loop
    outputs: Callable[[], Path]  # writes the stage's checkpoints after the last step; the path run() returns
    preview_model: torch.nn.Module | None = None  # what the preview grids sample (train.sample_every)
    preview: Callable[[torch.nn.Module], Image.Image] | None = None  # default: Trainer.preview (the student's)


class Driver(Protocol):
    """What a stage kind uses of the :class:`~..trainer.Trainer` that drives it."""

    config: Config
    world: World
    progress: bool  # progress bars on (rank 0)
    out: Path  # the run folder
    datasets: Mapping[str, DatasetSource]  # the named datasets ``teacher.dataset`` may name
    sigmas: torch.Tensor  # the student grid, its final 0 included
    teacher: torch.nn.Module  # the frozen teacher MM-DiT of ``model.teacher``
    data: TeacherData  # the teacher data of ``data.dir``

    def initial_student(self, stage: str) -> torch.nn.Module:
        """The stage's starting student weights."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` as this job trains it (itself, DDP or FSDP)."""

    def batch(self, generator: torch.Generator) -> dict:
        """A teacher-data batch drawn with ``generator``: this rank's slice."""

    def stage_output(self, stage: str) -> Path:
        """The checkpoint path of a stage's output in the run folder."""

    def save_output(self, name: str, mmdit, iterations: int, stage: str | None = None, parts_from: str = "",
                    student: bool = True) -> Path:
        """An official-layout checkpoint of ``mmdit`` (a network or a state dict) named ``name``."""
