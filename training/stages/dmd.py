"""Stage B, DMD with timestep sharing (docs/algorithm.md "Stage B"): the student's samples are pushed along the
difference of two scores, kept together in :class:`DMDScores` as DMD2 keeps its real and fake networks in one
guidance model:

* the real score: the frozen teacher's velocity, with CFG ``dmd.real_cfg`` against the teacher data's negative;
* the fake score: a copy of the teacher trained in fp32 with its own optimizer, fit by flow matching to the
  student's current samples (``dmd.fake_updates_per_step`` updates per step; generator steps wait for
  ``dmd.fake_warmup_steps`` of them).

The split stage's ``dmd`` objective runs the same step on each branch's student steps.
"""

from __future__ import annotations

import copy

import torch

from ...flash_core.schedule import SD35_SHIFT, shift_sigma
from .. import objectives as obj
from . import Driver, StagePlan
from .networks import make_optimizer, norm_value, optimizer_step, set_lr, velocity_fn

HELD_OUT_SEED = 2**31 - 1  # the fake score's held-out batch (DMDScores.held_out_fake_loss): no step draws from it


def new_fake_score(trainer: Driver) -> torch.nn.Module:
    """The fake score network, initialised from the teacher (docs/algorithm.md "Stage B"), trained in fp32."""
    return copy.deepcopy(trainer.teacher).float().requires_grad_(True).train()


class DMDScores:
    """The real and the fake score of DMD (module docstring), the fake one wrapped for this job and with its
    AdamW (``dmd.fake_optim``). Every draw comes from the step's generator, in a fixed order: the batch, per fake
    update its step and its noise, then the generator step's segment and its re-noising."""

    def __init__(self, trainer: Driver, fake: torch.nn.Module):
        self.trainer, self.config = trainer, trainer.config.dmd
        self.fake = fake
        self.fake_model = trainer.wrap(fake)
        self.fake_optimizer = make_optimizer(fake.parameters(), self.config.fake_optim)

    @property
    def autocast(self) -> bool:
        return self.trainer.config.train.autocast == "bf16"

    @torch.no_grad()
    def real_x0(self, batch: dict, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen teacher's x0 estimates at ``(x, sigma)`` on ``batch``'s conditioning: with CFG
        ``dmd.real_cfg`` (the real score) and without (its conditional half), from one batched forward."""
        d, cfg = self.trainer.world.device, self.config.real_cfg
        cond_v = velocity_fn(self.trainer.teacher, batch["context"], batch["pooled"], self.autocast)
        if cfg == 1.0:
            x0 = obj.score_x0(cond_v, x, sigma)
            return x0, x0
        uncond = self.trainer.data.uncond_batch(batch["noise"].shape[0], batch["use_t5"])
        both_v = velocity_fn(self.trainer.teacher, torch.cat([batch["context"], uncond[0].to(d)]),
                             torch.cat([batch["pooled"], uncond[1].to(d)]), self.autocast)
        cond, un = both_v(torch.cat([x, x]), torch.cat([sigma, sigma])).chunk(2)
        return (obj.x0_from_velocity(x, un + cfg * (cond - un), sigma), obj.x0_from_velocity(x, cond, sigma))

    def fake_score(self, batch: dict):
        """The fake score's velocity on ``batch``'s conditioning (no CFG)."""
        return velocity_fn(self.fake_model, batch["context"], batch["pooled"], self.autocast)

    def update_fake_score(self, trajectory: obj.StudentTrajectory, batch: dict, choices: list[int],
                          generator: torch.Generator) -> float:
        """``dmd.fake_updates_per_step`` flow-matching updates of the fake score, each on the student's x0 from a
        random student step among ``choices`` (read from ``trajectory``) at a fresh shifted sigma; their mean
        loss."""
        world, b, d = self.trainer.world, self.trainer.config.train.batch_size, self.trainer.world.device
        fake_v = self.fake_score(batch)
        fake_losses = []
        for _ in range(self.config.fake_updates_per_step):
            k = choices[int(torch.randint(len(choices), (), generator=generator))]
            x0 = trajectory.x0(k)
            eps = world.local(torch.randn((b, *x0.shape[1:]), generator=generator)).to(d)
            t = world.local(torch.rand(b, generator=generator))
            sigma = shift_sigma(t, SD35_SHIFT).to(d)
            point = self.shared_point(trajectory, k)
            if point is not None:  # fit where the scores are read: x0 and eps that interpolate to that point
                x0, eps, sigma = point
            fake_loss = obj.flow_matching_loss(fake_v, x0, eps, sigma)
            optimizer_step(self.fake_model, self.fake_optimizer, fake_loss, self.config.fake_optim)
            fake_losses.append(fake_loss.detach())
        return torch.stack(fake_losses).double().mean().item()  # one host sync per iteration, not per update

    @torch.no_grad()
    def held_out_fake_loss(self, rollout_model) -> float:
        """The fake score's flow-matching loss on a batch it is never fit on: teacher data and fresh noise
        drawn by a generator of its own (:data:`HELD_OUT_SEED`, the same batch every time), the current
        student's x0 at each student step, fixed eps and shifted sigma (with ``dmd.fake_sample = "shared"``, the
        student's own trajectory points where it has one, as the fake score is fit). Logged as ``fake_held_out``
        every ``train.log_every`` steps: the fake score's warm-up is long enough once it stops falling."""
        world, b, d = self.trainer.world, self.trainer.config.train.batch_size, self.trainer.world.device
        generator = torch.Generator().manual_seed(HELD_OUT_SEED)
        batch = self.fresh_noise(self.trainer.batch(generator), generator)
        trajectory = self.trajectory(rollout_model, batch)
        fake_v = velocity_fn(self.fake, batch["context"], batch["pooled"], self.autocast)
        losses = []
        for k in range(len(trajectory.sigmas) - 1):
            eps = world.local(torch.randn((b, *batch["noise"].shape[1:]), generator=generator)).to(d)
            sigma = shift_sigma(world.local(torch.rand(b, generator=generator)), SD35_SHIFT).to(d)
            x0, point = trajectory.x0(k), self.shared_point(trajectory, k)
            if point is not None:  # dmd.fake_sample = "shared": held out where the fake score is fit
                x0, eps, sigma = point
            losses.append(obj.flow_matching_loss(fake_v, x0, eps, sigma))
        return torch.stack(losses).mean().item()

    def shared_point(self, trajectory: obj.StudentTrajectory, k: int):
        """``dmd.fake_sample = "shared"``: the student trajectory point ``j`` the generator step at ``k`` reads the
        scores at (``k + 1`` for ``shared_next``, ``k`` for ``shared_current``) as ``(x0, eps, sigma)`` with
        ``(1 - s_j) x0 + s_j eps = x_j`` and ``eps - x0`` the student's velocity there: the student's own x0
        estimate at ``x_j``. None for ``renoise`` and at the final point (sigma 0: the reading re-noises there)."""
        if self.config.fake_sample != "shared":
            return None
        j = k + 1 if self.config.score_sample == "shared_next" else k
        sigma = trajectory.sigmas[j]
        if float(sigma) <= 0.0:
            return None
        x_j, x0 = trajectory.point(j), trajectory.x0(j)
        eps = (x_j - (1.0 - sigma) * x0) / sigma
        return x0, eps, sigma.expand(x_j.shape[0])

    def generator_loss(self, student_v, trajectory: obj.StudentTrajectory, batch: dict, choices: list[int],
                       generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The student's loss at a random student step ``k`` among ``choices``: DMD's (the x0 estimate pushed
        along real minus fake score, read as ``dmd.score_sample`` says), plus ``dmd.trajectory_weight`` times
        Stage A's loss on segment ``k`` (the anchor). Returns it unstepped, with its logged values."""
        cfg, world, d = self.config, self.trainer.world, self.trainer.world.device
        n, b = batch["noise"].shape[0], self.trainer.config.train.batch_size
        k = choices[int(torch.randint(len(choices), (), generator=generator))]
        renoise_eps = world.local(torch.randn((b, *batch["noise"].shape[1:]), generator=generator)).to(d)
        renoise_u = world.local(torch.rand(b, generator=generator)).to(d)
        sigmas = trajectory.sigmas
        gs = obj.generator_step(student_v, batch["noise"], sigmas, k, cfg.score_sample, renoise_eps, renoise_u,
                                tuple(cfg.renoise_range), x_k=trajectory.point(k))
        x0_real, x0_cond = self.real_x0(batch, gs.x_score, gs.sigma_score)
        x0_fake = obj.score_x0(self.fake_score(batch), gs.x_score, gs.sigma_score)
        g = obj.dmd_gradient(gs.x0_hat, x0_real, x0_fake, cfg.normaliser, cfg.g_clip)
        loss = obj.dmd_generator_loss(gs.x0_hat, g)
        values = {"dmd": loss.item(), "g_abs": float(g.abs().mean()), "k": float(k)}
        if cfg.real_cfg != 1.0:  # how much of the DMD direction is plain guidance (docs/algorithm.md "Stage B")
            values["cfg_cos"] = obj.cosine(x0_real - x0_fake, x0_real - x0_cond)
        if cfg.trajectory_weight > 0:
            rows = torch.arange(n, device=d)
            kk = torch.full((n,), k, device=d)
            anchor = obj.trajectory_loss(student_v, batch["trajectory"][rows, kk], batch["trajectory"][rows, kk + 1],
                                         sigmas[k], sigmas[k + 1])
            loss = loss + cfg.trajectory_weight * anchor
            values["trajectory"] = anchor.item()
        values["loss"] = loss.item()
        return loss, values

    def draw_batch(self, generator: torch.Generator) -> dict:
        """A batch of the teacher data; with ``dmd.noise = "fresh"`` its rollout noise replaced by fresh N(0, 1)
        (drawn for the global batch, then this rank's slice)."""
        batch = self.trainer.batch(generator)
        return self.fresh_noise(batch, generator) if self.config.noise == "fresh" else batch

    def fresh_noise(self, batch: dict, generator: torch.Generator) -> dict:
        """``batch`` with its rollout noise replaced by N(0, 1) drawn for the global batch (this rank's slice)."""
        world, b = self.trainer.world, self.trainer.config.train.batch_size
        noise = torch.randn((b, *batch["noise"].shape[1:]), generator=generator)
        return {**batch, "noise": world.local(noise).to(batch["noise"].device, batch["noise"].dtype)}

    def trajectory(self, model, batch: dict) -> obj.StudentTrajectory:
        """``model``'s trajectory (the student's, or the routed branches') from ``batch``'s noise."""
        v = velocity_fn(model, batch["context"], batch["pooled"], self.autocast)
        return obj.StudentTrajectory(v, batch["noise"], self.trainer.sigmas.to(self.trainer.world.device))

    def step(self, student_model, generator: torch.Generator, step: int, ks: list[int] | None = None,
             rollout_model=None) -> tuple[dict[str, float], torch.Tensor | None]:
        """One DMD iteration on a batch drawn with ``generator``: fake-score updates, then (after warm-up) the
        generator loss on the student steps ``ks`` (default: all), returned unstepped (None during warm-up).
        ``rollout_model`` (default: the student) makes the trajectory the steps before ``ks`` start from: the
        split's low branch is rolled out through the high branch there, as inference runs them."""
        trainer = self.trainer
        batch = self.draw_batch(generator)
        student_v = velocity_fn(student_model, batch["context"], batch["pooled"], self.autocast)
        choices = ks if ks is not None else list(range(trainer.config.student.steps))
        rollout = student_model if rollout_model is None else rollout_model
        trajectory = self.trajectory(rollout, batch)  # shared by both halves unless ...
        fake_batch, fake_trajectory = batch, trajectory
        if self.config.fake_batch == "other":  # ... the fake score is fit on a batch of its own
            fake_batch = self.draw_batch(generator)
            fake_trajectory = self.trajectory(rollout, fake_batch)
        values = {"fake": self.update_fake_score(fake_trajectory, fake_batch, choices, generator)}
        if (step + 1) % trainer.config.train.log_every == 0:
            values["fake_held_out"] = self.held_out_fake_loss(rollout)
        if step < self.config.fake_warmup_steps:
            return values, None
        loss, generator_values = self.generator_loss(student_v, trajectory, batch, choices, generator)
        values.update(generator_values)
        return values, loss


def prepare(trainer: Driver) -> StagePlan:
    """Stage B: the student (:meth:`~..trainer.Trainer.initial_student`) and a fake score fresh from the
    teacher, each with its optimizer and its learning-rate warm-up (the student's counted after the fake
    score's warm-up)."""
    cfg = trainer.config.dmd
    student, fake = trainer.initial_student("dmd"), new_fake_score(trainer)
    student_model = trainer.wrap(student)
    scores = DMDScores(trainer, fake)
    student_opt = make_optimizer(student.parameters(), cfg.optim)

    def train_step(step: int, generator: torch.Generator) -> dict[str, float]:
        set_lr(scores.fake_optimizer, cfg.fake_optim, step, cfg.iterations)
        values, loss = scores.step(student_model, generator, step)
        if loss is not None:
            values["lr"] = set_lr(student_opt, cfg.optim, step - cfg.fake_warmup_steps,
                                  cfg.iterations - cfg.fake_warmup_steps)
            values["grad_norm"] = norm_value(optimizer_step(student_model, student_opt, loss, cfg.optim))
        return values

    return StagePlan(cfg.iterations, {"student": student, "fake": fake},
                     {"student": student_opt, "fake": scores.fake_optimizer}, train_step,
                     {"student": student, "fake": fake}, lambda: trainer.save_output("dmd", student, cfg.iterations),
                     preview_model=student)
