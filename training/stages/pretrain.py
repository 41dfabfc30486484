"""Stage A, trajectory guidance (docs/algorithm.md "Stage A"): the student learns the teacher's trajectory segment by
segment, each sample of a batch on a random segment between two student steps. The split stage's ``trajectory``
objective is the same step on a branch's segments."""

from __future__ import annotations

import torch

from .. import objectives as obj
from . import Driver, StagePlan
from .networks import make_optimizer, norm_value, optimizer_step, set_lr, velocity_fn


def trajectory_step(trainer: Driver, model, generator: torch.Generator,
                    ks: list[int]) -> tuple[dict[str, float], torch.Tensor]:
    """Stage A's loss on a batch, each sample on a random segment among the student steps ``ks``."""
    config, world = trainer.config, trainer.world
    batch = trainer.batch(generator)
    n, d = batch["noise"].shape[0], world.device
    choice = torch.tensor(ks)[torch.randint(len(ks), (config.train.batch_size,), generator=generator)]
    segment = world.local(choice).to(d)
    rows = torch.arange(n, device=d)
    sigmas = trainer.sigmas.to(d)
    v = velocity_fn(model, batch["context"], batch["pooled"], config.train.autocast == "bf16")
    loss = obj.trajectory_loss(v, batch["trajectory"][rows, segment], batch["trajectory"][rows, segment + 1],
                               sigmas[segment], sigmas[segment + 1], config.pretrain.loss, config.pretrain.huber_c)
    return {"loss": loss.item()}, loss


def prepare(trainer: Driver) -> StagePlan:
    """Stage A: the student (:meth:`~..trainer.Trainer.initial_student`) on every student step."""
    cfg = trainer.config.pretrain
    student = trainer.initial_student("pretrain")
    model = trainer.wrap(student)
    optimizer = make_optimizer(student.parameters(), cfg.optim)
    every_step = list(range(trainer.config.student.steps))

    def train_step(step: int, generator: torch.Generator) -> dict[str, float]:
        values, loss = trajectory_step(trainer, model, generator, every_step)
        values["lr"] = set_lr(optimizer, cfg.optim, step, cfg.iterations)
        values["grad_norm"] = norm_value(optimizer_step(model, optimizer, loss, cfg.optim))
        return values

    return StagePlan(cfg.iterations, {"student": student}, {"student": optimizer}, train_step, {"student": student},
                     lambda: trainer.save_output("pretrain", student, cfg.iterations), preview_model=student)
