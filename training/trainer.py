"""The training loop: the teacher (rectified flow from scratch, :mod:`.teacher`), then the distillation: Stage A
(trajectory pre-training), Stage B (DMD), Stage C (split fine-tuning) and the merge, from one config (ALGORITHM.md;
:mod:`.objectives` holds the losses).

* Randomness is drawn per step from ``(seed, stage, step)`` for the *global* batch and sliced per rank, so a
  resumed run, and a run on N processes, draw exactly what one uninterrupted process draws.
* State (weights, optimizer moments, EMA) is saved every ``checkpoint_every`` steps as safetensors, atomically,
  keeping the newest ``keep_last`` of the stage's run; ``resume`` continues that run from its newest readable
  state, and starting over where another run's states are needs ``overwrite`` (:mod:`.run_folder`: the run
  record, the folder's lock, and the temporary files of a stopped write, removed at the next start).
* A step whose values (loss, gradient norm, learning rate) are not finite stops the stage with
  :class:`NonFiniteLossError` naming the step and the last good state; nothing non-finite is ever saved.
* Ctrl-C, SIGTERM and ComfyUI's Cancel let the current step finish, save its state and stop; the exception
  carries ``training_stop`` (:class:`Stopped`: the step and the state's path) for the one line the CLI prints.
* Each stage ends with a checkpoint in the official layout (the teacher's text encoders and VAE included) with
  our metadata: student grid, sampler mode, T5 convention, provenance (stage, iterations, config hash).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from ..flash_core.atomic import atomic_write
from ..flash_core.checkpoint import (
    CheckpointFiles,
    FlashMetadata,
    component_state_dict,
    index_checkpoint,
    load_mmdit,
    load_vae,
    save_checkpoint,
)
from ..flash_core.cli import one_line
from ..flash_core.errors import FlashError
from ..flash_core.mmdit import MMDiT, MMDiTConfig
from ..flash_core.schedule import (
    SD35_SHIFT,
    STUDENT_SIGMAS,
    initial_noise,
    sample_euler,
    shift_sigma,
    sigma_to_timestep,
    teacher_sigmas,
)
from ..flash_core.tokenizer_files import written_tokenizer_metadata
from ..flash_core.vae import process_out
from . import objectives as obj
from .config import Config, ConfigError, OptimConfig, teacher_architecture, to_toml
from .data import TeacherData
from .run_folder import (
    RunLock,
    RunRecord,
    StageRun,
    check_start,
    cut_log,
    newest_state,
    record_state,
    remove_leftovers,
    stage_state,
    start_stage,
    state_folder,
)
from .split import RoutedMMDiT
from .state import (
    NonFiniteStateError,
    TrainingError,
    apply_state,
    load_state,
    read_state,
    save_state,
    state_name,
    whole,
)
from .teacher import LatentPool, ema_decay_at, load_dataset, logit_normal_sigmas

STAGES = ("pretrain", "dmd", "split", "merge", "teacher")  # the order seeds each stage's generators: append only
DISTILLATION_STAGES = ("pretrain", "dmd", "split")  # what ``all`` runs after the data stage
T5_CONVENTION = "optional: 77 CLIP tokens when off"

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ plumbing


@dataclass
class World:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, config: Config) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        device = _device(config.model.device)
        if size > 1 and not dist.is_initialized():
            backend = config.distributed.backend
            if backend == "auto":
                backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        rank = dist.get_rank() if size > 1 else 0
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return cls(rank, size, device)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global-batch tensor."""
        n = x.shape[0] // self.size
        return x[self.rank * n:(self.rank + 1) * n]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator for one step of one stage: identical on every rank and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGES.index(stage) * 100_003 + step)


def velocity_fn(model: torch.nn.Module, context: torch.Tensor, pooled: torch.Tensor, autocast: bool = False,
                uncond: tuple[torch.Tensor, torch.Tensor] | None = None, cfg: float = 1.0) -> obj.VelocityFn:
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
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, config: OptimConfig, step: int) -> float:
    lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                   config: OptimConfig) -> float:
    """Backward, clip, step; returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip if config.grad_clip > 0 else math.inf)
    optimizer.step()
    return float(whole(norm))


# ------------------------------------------------------------------------------------------------ stops


class NonFiniteLossError(TrainingError):
    """The training diverged: a loss, gradient norm, learning rate or weight is NaN or infinite. Nothing of it is
    saved; ``last_state`` (kept) is the newest state of the run, or None."""

    def __init__(self, stage: str, step: int, what: str, last_state: tuple[int, Path] | None):
        self.stage, self.step, self.last_state = stage, step, last_state
        if last_state is None:
            then = "no state was saved before it; lower the learning rate (or fix the data) and start again"
        else:
            then = (f"nothing of it was saved; the last good state is '{last_state[1]}' (step {last_state[0]}): "
                    "lower the learning rate (or fix the data) and pass --resume to continue from it")
        super().__init__(f"{stage}: the training diverged at step {step} ({what}); {then}")


def non_finite_values(values: dict[str, float]) -> str:
    """``values`` that are NaN or infinite, as ``name=value`` text ('' when all are finite)."""
    return ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating-point tensor (this rank's shard of a sharded one) is finite: one check, and one
    host sync, per device."""
    from torch.distributed.tensor import DTensor

    checks: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.is_floating_point() and local.numel():
            checks.setdefault(local.device, []).append(torch.isfinite(local.detach()).all())
    return all(bool(torch.stack(found).all()) for found in checks.values())


def saved_tensors(modules: dict, optimizers: dict[str, torch.optim.Optimizer]) -> Iterator[torch.Tensor]:
    """Every tensor a state file of ``modules`` and ``optimizers`` holds, as they live."""
    for module in modules.values():
        yield from (module.state_dict() if isinstance(module, torch.nn.Module) else module).values()
    for optimizer in optimizers.values():
        for fields in optimizer.state.values():
            yield from (v for v in fields.values() if torch.is_tensor(v))


@dataclass
class Stopped:
    """Where a user's stop (Ctrl-C, SIGTERM, ComfyUI's Cancel) left a stage; the stop's exception carries it as
    ``training_stop``."""

    stage: str
    step: int  # steps done
    state: tuple[int, Path] | None  # the newest state (step, path), or None
    note: str = ""

    def __str__(self) -> str:
        text = f"{self.stage} stopped at step {self.step}"
        if self.state is None:
            return f"{text}; no state saved{self.note}"
        if self.state[0] == self.step:
            return f"{text}; state saved to '{self.state[1]}'"
        return f"{text}; steps after {self.state[0]} were not saved{self.note}; the newest state is '{self.state[1]}'"


@contextlib.contextmanager
def whole_steps() -> Iterator[None]:
    """Within the block (one training step and its bookkeeping), SIGINT and SIGTERM wait for it to end: their
    handlers (Ctrl-C's KeyboardInterrupt, the CLI's :class:`..flash_core.atomic.Terminated`) run after it, so a
    stop never finds the weights half updated. A second signal runs its handler at once (a stop in the middle of
    the step itself is not saved). Main thread only (elsewhere, as in ComfyUI's worker, the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    handlers = {s: h for s, h in handlers.items() if callable(h)}
    pending: list[tuple[int, object]] = []

    def hold(signum, frame):
        if pending:
            handlers[signum](signum, frame)
        pending.append((signum, frame))

    for s in handlers:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if pending:
        signum, frame = pending[0]
        handlers[signum](signum, frame)


def on_main(world: World, fn: Callable[[], object], share: bool = False):
    """``fn()`` on rank 0 only. Its expected failure is raised on every rank (none is left waiting in a
    collective); with ``share`` every rank gets its value, else the others get None."""
    if world.size == 1:
        return fn()
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except (FlashError, ValueError, OSError) as err:
            error = err
    box = [(None if error is None else one_line(error), result if share else None)]
    dist.broadcast_object_list(box, src=0)
    message, shared = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise TrainingError(message)
    return result if world.main else shared


@contextlib.contextmanager
def run_lock(world: World, out: Path) -> Iterator[None]:
    """The run folder's lock (:class:`.run_folder.RunLock`, taken by rank 0; every rank stops when it cannot be),
    with the temporary files of a stopped write removed once it is held."""
    def take() -> RunLock:
        lock = RunLock.acquire(out)
        try:
            remove_leftovers(out)
        except BaseException:
            lock.release()
            raise
        return lock

    lock = on_main(world, take)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------------------------------ logs


class CSVLog:
    """One CSV per stage, and TensorBoard scalars when tensorboard is installed. Opened at step ``start`` (a
    resume), it keeps the rows up to that step only (:func:`.run_folder.cut_log`): the steps trained again are
    logged once."""

    def __init__(self, path: Path, enabled: bool, start: int = 0):
        self.path, self.enabled, self.writer = path, enabled, None
        if enabled:
            cut_log(path, start)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(path.parent / "tensorboard" / path.stem),
                                            purge_step=start + 1 if start else None)
            except Exception:  # tensorboard is optional
                self.writer = None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        header = self._header(values)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, restval="")
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow({"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def _header(self, values: dict[str, float]) -> list[str]:
        """The file's columns, widened (the file rewritten through a temporary file) when a row brings a new
        key: DMD's fake-score warm-up logs fewer values than its generator steps."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return ["step", *values]
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
            f.seek(0)
            header = next(csv.reader(f))
        added = [k for k in values if k not in header]
        if added:
            header = [*header, *added]
            def write(tmp: Path) -> None:
                with tmp.open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=header, restval="")
                    writer.writeheader()
                    writer.writerows(rows)

            atomic_write(self.path, write)
        return header


# ------------------------------------------------------------------------------------------------ the trainer


class Trainer:
    """Runs one stage (or all) of the distillation described by ``config``."""

    def __init__(self, config: Config, world: World | None = None, progress: bool = True,
                 on_step: Callable[[str, int, int, dict], None] | None = None):
        self.config, self.world = config, world or World.from_env(config)
        self.progress = progress and self.world.main
        self.on_step = on_step  # (stage, step, total, values): for the ComfyUI nodes' progress and chart
        self.on_preview: Callable | None = None  # (stage, step, PIL image) after each preview grid
        self.interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt,)  # stops that save state first
        self.out = Path(config.train.out)
        self.lock_held = False  # True when the caller holds the run folder's lock (run_stages does)
        self.stage_run: StageRun | None = None  # the running stage's record entry (rank 0)
        self.sigmas = torch.tensor(self.student_grid(), dtype=torch.float32)
        self._data: TeacherData | None = None
        self._teacher: torch.nn.Module | None = None
        self.models: dict[str, torch.nn.Module] = {}  # the last stage's trained networks
        self._vae = None
        self.preview_model: torch.nn.Module | None = None  # what the stage's previews sample
        self.preview_fn: Callable[[torch.nn.Module], Image.Image] | None = None  # default: :meth:`preview`

    # -------------------------------------------------------------------------------------------- inputs

    def student_grid(self) -> list[float]:
        grid = list(self.config.student.sigmas) or list(STUDENT_SIGMAS[self.config.student.steps])
        return grid if grid[-1] == 0.0 else [*grid, 0.0]

    @property
    def sharded(self) -> bool:
        """FSDP: every rank holds a shard, so saving, previews and outputs are collectives."""
        return self.world.size > 1 and self.config.distributed.fsdp

    @property
    def data(self) -> TeacherData:
        if self._data is None:
            self._data = TeacherData.load(self.config.resolve(self.config.data.dir))
            self._trajectory_index = self._data.sigma_indices(self.student_grid())
        return self._data

    @property
    def teacher(self) -> torch.nn.Module:
        """The frozen teacher MM-DiT (the real score of DMD)."""
        if self._teacher is None:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.config.model.dtype]
            self._teacher = load_mmdit(self._checkpoint_mmdit(self.config.model.teacher, "model.teacher"),
                                       dtype=dtype, device=self.world.device).eval().requires_grad_(False)
        return self._teacher

    def _checkpoint_mmdit(self, path: str, key: str) -> dict[str, torch.Tensor]:
        if not path:
            raise ConfigError(f"{key}: no checkpoint given")
        files = index_checkpoint(path)
        if not files.has("mmdit"):
            raise ConfigError(f"{key}: '{path}' holds no MM-DiT")
        return component_state_dict(files, "mmdit")

    def initial_student(self, stage: str) -> torch.nn.Module:
        """The stage's starting weights: the previous stage's output if present, else ``student_init``/teacher."""
        previous = {"pretrain": None, "dmd": "pretrain", "split": "dmd"}[stage]
        if previous and self.stage_output(previous).exists():
            path, key = str(self.stage_output(previous)), f"{previous} output"
        else:
            path, key = self.config.model.student_init or self.config.model.teacher, "model.student_init"
        student = load_mmdit(self._checkpoint_mmdit(path, key), dtype=torch.float32, device=self.world.device)
        if self.config.train.gradient_checkpointing:
            enable_gradient_checkpointing(student)
        return student.requires_grad_(True).train()

    @torch.no_grad()
    def preview(self, mmdit: torch.nn.Module) -> Image.Image:
        """A grid of student samples: fixed seeds (``train.sample_seeds``), the first prompts of the data, the
        student grid with Euler, decoded with the teacher's VAE. The same noise every time, so grids compare."""
        from ..flash_core.pipeline import latents_to_images
        from ..flash_core.schedule import initial_noise, sample_euler
        from ..flash_core.vae import process_out

        if self._vae is None:
            self._vae = load_vae(component_state_dict(index_checkpoint(self.config.model.teacher), "vae"),
                                 device=self.world.device)
        seeds = self.config.train.sample_seeds
        index = torch.arange(len(seeds)) % len(self.data)
        none = torch.zeros(len(seeds), dtype=torch.bool)
        batch = self.data.batch(index, True, none, none)
        shape = (1, *batch["noise"].shape[1:])
        noise = torch.cat([initial_noise(seed, shape) for seed in seeds]).to(self.world.device)
        d = self.world.device
        v = velocity_fn(mmdit, batch["context"].to(d), batch["pooled"].to(d))
        sigmas = self.sigmas.to(d)
        latents = sample_euler(v, noise * sigmas[0], sigmas)
        images = latents_to_images(self._vae.decode(process_out(latents)))
        return image_grid(images)

    def stage_output(self, stage: str) -> Path:
        return self.out / f"{stage}.safetensors"

    def batch(self, generator: torch.Generator) -> dict:
        """A global batch drawn with ``generator`` (indices, T5 and CLIP dropout), then this rank's slice."""
        b, d = self.config.train.batch_size, self.config.dropout
        indices = torch.randint(len(self.data), (b,), generator=generator)
        use_t5 = bool(torch.rand((), generator=generator) >= d.t5)
        drop_l = torch.rand(b, generator=generator) < d.clip_l
        drop_g = torch.rand(b, generator=generator) < d.clip_g
        drop_l &= ~drop_g  # never both: a sample keeps at least one CLIP
        full = self.data.batch(indices, use_t5, drop_l, drop_g)
        full["trajectory"] = full["trajectory"][:, self._trajectory_index]
        local = {k: self.world.local(v).to(self.world.device) for k, v in full.items()}
        local["use_t5"] = use_t5
        return local

    # -------------------------------------------------------------------------------------------- stages

    def run(self, stage: str, resume: bool = False, overwrite: bool = False) -> Path:
        """Train ``stage`` (or merge) in the run folder, holding its lock. ``resume`` continues the stage's run
        from its newest readable state; without it the stage starts at step 0, which ``overwrite`` must allow
        where another run's states are (they are moved aside: :func:`.run_folder.start_stage`)."""
        key, batch = (("teacher.batch_size", self.config.teacher.batch_size) if stage == "teacher"
                      else ("train.batch_size", self.config.train.batch_size))
        if batch % self.world.size:
            raise ConfigError(f"{key}: {batch} does not split over {self.world.size} processes")
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run, or start it over")
        with contextlib.nullcontext() if self.lock_held else run_lock(self.world, self.out):
            self.out.mkdir(parents=True, exist_ok=True)
            if self.world.main:
                text = to_toml(self.config)
                atomic_write(self.out / "config.toml", lambda tmp: tmp.write_text(text))
            if stage == "merge":
                return self.merge()
            self.stage_run = on_main(self.world, lambda: start_stage(self.out, stage, self.config.hash(), resume,
                                                                      overwrite))
            return {"teacher": self.train_teacher, "pretrain": self.pretrain, "dmd": self.dmd,
                    "split": self.split}[stage](resume)

    def _resume(self, stage: str, modules: dict, optimizers: dict) -> int:
        """Load the newest readable state of the stage's run (rank 0 chooses, every rank loads it); its step."""
        found = {}

        def choose() -> tuple[int, str] | None:
            found["state"] = newest_state(self.out, stage, self.stage_run, repair=True)
            return None if found["state"] is None else (found["state"].step, str(found["state"].path))

        chosen = on_main(self.world, choose, share=True)
        if chosen is None:
            log.info("%s: no saved state to resume from; starting at step 0", stage)
            return 0
        state = found.get("state")
        if state is not None:
            meta, tensors = state.meta, state.tensors
        else:  # another rank: the file rank 0 read
            meta, tensors = read_state(Path(chosen[1]))
        step, _ = apply_state(Path(chosen[1]), meta, tensors, modules, optimizers)
        return step

    def _loop(self, stage: str, iterations: int, resume: bool, modules: dict, optimizers: dict,
              step_fn: Callable[[int, torch.Generator], dict[str, float]]) -> None:
        folder = state_folder(self.out, stage)
        start = self._resume(stage, modules, optimizers) if resume else 0
        log_file = CSVLog(self.out / f"log_{stage}.csv", self.world.main, start)
        bar = tqdm(total=iterations, initial=start, desc=stage, disable=not self.progress)
        self._done, self._in_step, self._diverged = start, False, None
        try:
            for step in range(start, iterations):
                self._step(stage, step, iterations, step_fn, log_file, bar, folder, modules, optimizers)
        except self.interrupts as stop:
            # A user's stop (Ctrl-C, SIGTERM, ComfyUI's Cancel): keep what was trained, say where, then stop.
            stop.training_stop = self._stopped(stage, start, folder, modules, optimizers)
            log.info("%s", stop.training_stop)
            raise
        finally:
            bar.close()

    def _step(self, stage, step, iterations, step_fn, log_file, bar, folder, modules, optimizers) -> None:
        """One training step, its values checked, then its log line, state file, preview and callback, as due.
        A stop by signal waits for all of it (:func:`whole_steps`)."""
        with whole_steps():
            tic = time.perf_counter()
            self._in_step = True
            values = step_fn(step, step_generator(self.config.train.seed, stage, step))
            self._done, self._in_step = step + 1, False
            values["sec_per_it"] = time.perf_counter() - tic
            self._check_values(stage, step + 1, values)
            self._after_step(stage, step + 1, iterations, values, log_file, bar, folder, modules, optimizers)

    def _after_step(self, stage, done, iterations, values, log_file, bar, folder, modules, optimizers) -> None:
        """The bookkeeping of step ``done``: progress, log row, state file, preview grid, callback."""
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k in ("loss", "dmd", "fake")})
        if done % self.config.train.log_every == 0 or done == iterations:
            log_file.write(done, values)
        if done % self.config.train.checkpoint_every == 0 or done == iterations:
            self._save(stage, folder, done, modules, optimizers)
        every = self.config.train.sample_every
        if (self.world.main or self.sharded) and every and self.preview_model is not None and done % every == 0:
            grid = (self.preview_fn or self.preview)(self.preview_model)  # under FSDP a collective: all sample
            if self.world.main:
                path = self.out / "samples" / f"{stage}_{done:06d}.png"
                atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
                if self.on_preview is not None:
                    self.on_preview(stage, done, grid)
        if self.on_step is not None:
            self.on_step(stage, done, iterations, values)

    def _check_values(self, stage: str, step: int, values: dict[str, float]) -> None:
        """Stop at the first step whose values are not finite (they are floats already: no device sync). Under
        torchrun a rank only notes it; the ranks agree at the next state save (:meth:`_agree_finite`)."""
        bad = non_finite_values(values)
        if not bad:
            return
        if self.world.size == 1:
            raise NonFiniteLossError(stage, step, bad, self._last_state(stage))
        if self._diverged is None:
            self._diverged = (step, bad)

    def _agree_finite(self, stage: str, step: int, modules: dict, optimizers: dict) -> None:
        """Under torchrun, before a state save: every rank's first non-finite step and the finiteness of what it
        would save, agreed by all (one all-reduce), so all ranks stop together and nothing non-finite is saved."""
        first = self._diverged[0] if self._diverged else step + 1
        finite = all_finite(saved_tensors(modules, optimizers))
        flags = torch.tensor([float(first), 1.0 if finite else 0.0], dtype=torch.float64, device=self.world.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        first, finite = int(flags[0]), bool(flags[1])
        if first <= step:
            what = self._diverged[1] if self._diverged and self._diverged[0] == first else "on another rank"
            raise NonFiniteLossError(stage, first, what, self._last_state(stage))
        if not finite:
            raise NonFiniteLossError(stage, step, "NaN or infinite weights", self._last_state(stage))

    def _save(self, stage: str, folder: Path, step: int, modules: dict, optimizers: dict) -> None:
        """Save the state after ``step`` steps and record it as the run's newest (older ones beyond
        ``train.keep_last`` go). Never a non-finite one: the stage stops instead."""
        if self.world.size > 1:
            self._agree_finite(stage, step, modules, optimizers)
        if not (self.world.main or self.sharded):
            return
        extra = {"stage": stage, "run": self.stage_run.run if self.stage_run else ""}
        try:
            save_state(folder, step, modules, optimizers, extra, None, write=self.world.main)
        except NonFiniteStateError as err:
            raise NonFiniteLossError(stage, step, str(err), self._last_state(stage)) from None
        if self.world.main:
            record_state(self.out, stage, self.stage_run, step, self.config.train.keep_last)

    def _last_state(self, stage: str) -> tuple[int, Path] | None:
        """The run's newest recorded state (step, path), or None."""
        current = self.stage_run if self.stage_run is not None else RunRecord.load(self.out).stages.get(stage)
        newest = current.newest() if current is not None else None
        return None if newest is None else (newest, state_folder(self.out, stage) / state_name(newest))

    def _stopped(self, stage: str, start: int, folder: Path, modules: dict, optimizers: dict) -> Stopped:
        """After a user's stop: save the last finished step's state unless it is saved already, the stop came
        in the middle of a step (a second Ctrl-C), the weights are not finite, or other ranks run (a save there
        is a collective they are not in). Returns where the stage stopped."""
        last, note = self._last_state(stage), ""
        if self._done > start and (last is None or last[0] != self._done):
            if self._in_step:
                note = " (stopped in the middle of a step)"
            elif self.world.size > 1:
                note = " (a stop under torchrun saves no state)"
            elif not all_finite(saved_tensors(modules, optimizers)):
                note = " (the weights are not finite)"
            else:
                self._save(stage, folder, self._done, modules, optimizers)
                last = self._last_state(stage)
        return Stopped(stage, self._done, last, note)

    def finish(self, stage: str, models: dict[str, torch.nn.Module]) -> None:
        """Keep the stage's networks and, under torchrun, check that every rank holds the same weights."""
        self.models = models
        if self.world.size == 1 or self.sharded:  # FSDP ranks hold different shards by design
            return
        for name, model in models.items():
            flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
            stats = torch.stack([flat.sum(), flat.square().sum(), flat.abs().max()]).to(self.world.device)
            gathered = [torch.zeros_like(stats) for _ in range(self.world.size)]
            dist.all_gather(gathered, stats)
            if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
                raise RuntimeError(f"{stage}: the ranks' {name} weights differ after training: {gathered}")
        if self.world.main:
            text = f"{self.world.size} ranks hold identical weights for {', '.join(models)}\n"
            atomic_write(self.out / f"replicas_{stage}.txt", lambda tmp: tmp.write_text(text))

    def _ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as this job trains it: itself (one process), FSDP2-sharded per joint block, or under DDP."""
        if self.world.size == 1:
            return model
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            for block in model.joint_blocks:
                fully_shard(block)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.world.device] if self.world.device.type == "cuda"
                                       else None)

    # -------------------------------------------------------------------------------------------- the teacher

    def component_files(self) -> CheckpointFiles:
        """``teacher.components``: the frozen VAE and text encoders the teacher is trained with (and ships with)."""
        path = self.config.teacher.components
        if not path:
            raise ConfigError("teacher.components: no checkpoint given (the VAE and text encoders to train with)")
        files = index_checkpoint(path)
        if not files.has("vae") or not (files.has("clip_l") or files.has("clip_g")):
            raise ConfigError(f"teacher.components: '{path}' must hold a VAE and CLIP text encoders; it holds "
                              f"{', '.join(files.components) or 'nothing'}")
        return files

    def teacher_pool(self, files: CheckpointFiles, vae) -> LatentPool:
        """The teacher's dataset encoded once: latents by ``vae``, captions by the components' text encoders."""
        from ..flash_core.text import TripleTextEncoder, load_tokenizers

        cfg = self.config.teacher
        dataset = load_dataset(cfg.dataset, cfg.dataset_size, cfg.image_size, self.config.train.seed)
        text_encoder = TripleTextEncoder.from_state_dicts(
            **{slot: component_state_dict(files, slot) if files.has(slot) else None
               for slot in ("clip_l", "clip_g", "t5")},
            tokenizers=load_tokenizers(self.config.model.tokenizers or None), device=self.world.device)
        return LatentPool.build(dataset, vae, text_encoder, progress=self.progress)

    def new_teacher(self) -> MMDiT:
        """A fresh MM-DiT of ``[teacher]``'s architecture (training init: adaLN-zero), seeded by ``train.seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)
            teacher = MMDiT(teacher_architecture(self.config.teacher))
        teacher = teacher.to(self.world.device)
        if self.config.train.gradient_checkpointing:
            enable_gradient_checkpointing(teacher)
        return teacher.requires_grad_(True).train()

    def train_teacher(self, resume: bool = False) -> Path:
        """The teacher stage: rectified flow from scratch on the dataset's VAE latents (TOYWORLD.md "Teacher");
        the EMA of the weights is saved, with the components' VAE and text encoders, as ``teacher.safetensors``."""
        cfg = self.config.teacher
        files = self.component_files()
        vae = load_vae(component_state_dict(files, "vae"), device=self.world.device)
        pool = self.teacher_pool(files, vae)
        teacher = self.new_teacher()
        model = self._ddp(teacher)
        optimizer = make_optimizer(teacher.parameters(), cfg.optim)
        ema = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        self.preview_model = teacher
        self.preview_fn = lambda mmdit: self.teacher_preview(mmdit, pool, vae)

        def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
            loss = self._flow_matching_step(model, pool, generator)
            values = {"loss": loss.item(), "lr": set_lr(optimizer, cfg.optim, step)}
            values["grad_norm"] = optimizer_step(model, optimizer, loss, cfg.optim)
            obj.ema_update(ema, dict(teacher.state_dict()), ema_decay_at(step, cfg.ema_decay))
            return values

        self._loop("teacher", cfg.iterations, resume, {"teacher": teacher, "ema": ema}, {"teacher": optimizer},
                   step_fn)
        self.finish("teacher", {"teacher": teacher})
        return self.save_output("teacher", ema, cfg.iterations, parts_from=cfg.components, student=False)

    def _flow_matching_step(self, model, pool: LatentPool, generator: torch.Generator) -> torch.Tensor:
        """The rectified-flow loss ``||v(x_s, s) - (eps - x0)||^2`` on a global batch drawn with ``generator``
        (logit-normal sigmas, caption dropout to the null prompt, T5 and CLIP dropout), on this rank's slice."""
        cfg, drop, d = self.config.teacher, self.config.dropout, self.world.device
        b = cfg.batch_size
        rows = torch.randint(len(pool), (b,), generator=generator)
        use_t5 = bool(torch.rand((), generator=generator) >= drop.t5)
        null = torch.rand(b, generator=generator) < cfg.caption_dropout
        drop_l = torch.rand(b, generator=generator) < drop.clip_l
        drop_g = torch.rand(b, generator=generator) < drop.clip_g
        drop_l &= ~drop_g  # never both: a sample keeps at least one CLIP
        eps = torch.randn((b, *pool.latents.shape[1:]), generator=generator)
        sigma = logit_normal_sigmas(b, cfg.logit_normal_mean, cfg.logit_normal_std, generator)
        captions = torch.where(null, pool.null_index, pool.caption_index[rows])
        local = self.world.local
        context, pooled = pool.conditioning_for(local(captions), use_t5, local(drop_l), local(drop_g))
        v = velocity_fn(model, context.to(d), pooled.to(d), self.config.train.autocast == "bf16")
        return obj.flow_matching_loss(v, local(pool.latents[rows]).to(d), local(eps).to(d), local(sigma).to(d))

    @torch.no_grad()
    def teacher_preview(self, mmdit: torch.nn.Module, pool: LatentPool, vae) -> Image.Image:
        """Teacher samples for the dataset's first captions: ``data.teacher_steps`` Euler steps on the shifted
        schedule with CFG ``data.teacher_cfg``, fixed seeds (``train.sample_seeds``), T5 on."""
        from ..flash_core.pipeline import latents_to_images

        d, seeds = self.world.device, self.config.train.sample_seeds
        rows = pool.caption_index[torch.arange(len(seeds)) % len(pool)]
        context, pooled = pool.conditioning_for(rows, True)
        uncond = pool.conditioning_for(torch.full_like(rows, pool.null_index), True)
        v = velocity_fn(mmdit, context.to(d), pooled.to(d), uncond=tuple(u.to(d) for u in uncond),
                        cfg=self.config.data.teacher_cfg)
        sigmas = teacher_sigmas(self.config.data.teacher_steps, self.config.data.shift).to(d)
        noise = torch.cat([initial_noise(seed, (1, *pool.latents.shape[1:])) for seed in seeds]).to(d)
        latents = sample_euler(v, noise * sigmas[0], sigmas)
        return image_grid(latents_to_images(vae.decode(process_out(latents))))

    # -------------------------------------------------------------------------------------------- distillation

    def pretrain(self, resume: bool = False) -> Path:
        """Stage A: trajectory guidance (ALGORITHM.md "Stage A")."""
        cfg = self.config.pretrain
        student = self.initial_student("pretrain")
        model = self._ddp(student)
        optimizer = make_optimizer(student.parameters(), cfg.optim)
        self.preview_model = student
        every_step = list(range(self.config.student.steps))

        def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
            values, loss = self._trajectory_step(model, generator, every_step)
            values["lr"] = set_lr(optimizer, cfg.optim, step)
            values["grad_norm"] = optimizer_step(model, optimizer, loss, cfg.optim)
            return values

        self._loop("pretrain", cfg.iterations, resume, {"student": student}, {"student": optimizer}, step_fn)
        self.finish("pretrain", {"student": student})
        return self.save_output("pretrain", student, cfg.iterations)

    def _fake_score(self) -> torch.nn.Module:
        """The fake score network, initialised from the teacher (ALGORITHM.md "Stage B"), trained in fp32."""
        return copy.deepcopy(self.teacher).float().requires_grad_(True).train()

    def _dmd_step(self, student_model, fake_model, fake_opt, generator: torch.Generator, step: int,
                  ks: list[int] | None = None) -> tuple[dict[str, float], torch.Tensor | None]:
        """One DMD iteration: fake-score updates, then (after warm-up) the generator loss, returned unstepped."""
        cfg, d = self.config.dmd, self.world.device
        autocast = self.config.train.autocast == "bf16"
        sigmas = self.sigmas.to(d)
        batch = self.batch(generator)
        n = batch["noise"].shape[0]
        values: dict[str, float] = {}
        student_v = velocity_fn(student_model, batch["context"], batch["pooled"], autocast)
        fake_v = velocity_fn(fake_model, batch["context"], batch["pooled"], autocast)
        choices = ks if ks is not None else list(range(self.config.student.steps))
        fake_losses = []
        for _ in range(cfg.fake_updates_per_step):
            k = choices[int(torch.randint(len(choices), (), generator=generator))]
            with torch.no_grad():
                x_k = obj.rollout(student_v, batch["noise"], sigmas, k)
                x0 = obj.x0_from_velocity(x_k, student_v(x_k, sigmas[k].expand(n)), sigmas[k])
            eps = self.world.local(torch.randn((self.config.train.batch_size, *x0.shape[1:]), generator=generator)).to(d)
            t = self.world.local(torch.rand(self.config.train.batch_size, generator=generator))
            sigma = shift_sigma(t, SD35_SHIFT).to(d)
            fake_loss = obj.flow_matching_loss(fake_v, x0, eps, sigma)
            optimizer_step(fake_model, fake_opt, fake_loss, cfg.fake_optim)
            fake_losses.append(fake_loss.item())
        values["fake"] = sum(fake_losses) / len(fake_losses)
        if step < cfg.fake_warmup_steps:
            return values, None
        k = choices[int(torch.randint(len(choices), (), generator=generator))]
        b = self.config.train.batch_size
        renoise_eps = self.world.local(torch.randn((b, *batch["noise"].shape[1:]), generator=generator)).to(d)
        renoise_u = self.world.local(torch.rand(b, generator=generator)).to(d)
        gs = obj.generator_step(student_v, batch["noise"], sigmas, k, cfg.score_sample, renoise_eps, renoise_u,
                                tuple(cfg.renoise_range))
        uncond = self.data.uncond_batch(n, batch["use_t5"])
        real_v = velocity_fn(self.teacher, batch["context"], batch["pooled"], autocast,
                             tuple(u.to(d) for u in uncond), cfg.real_cfg)
        x0_real = obj.score_x0(real_v, gs.x_score, gs.sigma_score)
        x0_fake = obj.score_x0(velocity_fn(fake_model, batch["context"], batch["pooled"], autocast), gs.x_score,
                               gs.sigma_score)
        g = obj.dmd_gradient(gs.x0_hat, x0_real, x0_fake, cfg.normaliser, cfg.g_clip)
        loss = obj.dmd_generator_loss(gs.x0_hat, g)
        values.update(dmd=loss.item(), g_abs=float(g.abs().mean()), k=float(k))
        if cfg.trajectory_weight > 0:
            rows = torch.arange(n, device=d)
            kk = torch.full((n,), k, device=d)
            anchor = obj.trajectory_loss(student_v, batch["trajectory"][rows, kk], batch["trajectory"][rows, kk + 1],
                                         sigmas[k], sigmas[k + 1])
            loss = loss + cfg.trajectory_weight * anchor
            values["trajectory"] = anchor.item()
        values["loss"] = loss.item()
        return values, loss

    def dmd(self, resume: bool = False) -> Path:
        """Stage B: DMD with timestep sharing (ALGORITHM.md "Stage B")."""
        cfg = self.config.dmd
        student, fake = self.initial_student("dmd"), self._fake_score()
        student_model, fake_model = self._ddp(student), self._ddp(fake)
        student_opt = make_optimizer(student.parameters(), cfg.optim)
        fake_opt = make_optimizer(fake.parameters(), cfg.fake_optim)
        self.preview_model = student

        def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
            set_lr(fake_opt, cfg.fake_optim, step)
            values, loss = self._dmd_step(student_model, fake_model, fake_opt, generator, step)
            if loss is not None:
                values["lr"] = set_lr(student_opt, cfg.optim, step - cfg.fake_warmup_steps)
                values["grad_norm"] = optimizer_step(student_model, student_opt, loss, cfg.optim)
            return values

        self._loop("dmd", cfg.iterations, resume, {"student": student, "fake": fake},
                   {"student": student_opt, "fake": fake_opt}, step_fn)
        self.finish("dmd", {"student": student, "fake": fake})
        return self.save_output("dmd", student, cfg.iterations)

    def branch_steps(self) -> tuple[list[int], list[int]]:
        """Student step indices of the high-noise branch (``1000 * sigma > boundary``) and of the low one."""
        timesteps = [1000.0 * float(s) for s in self.sigmas[:-1]]
        high = [k for k, t in enumerate(timesteps) if t > self.config.split.boundary]
        low = [k for k, t in enumerate(timesteps) if t <= self.config.split.boundary]
        if not high or not low:
            raise ConfigError(f"split.boundary: {self.config.split.boundary} leaves a branch with no student steps "
                              f"(step timesteps {timesteps})")
        return high, low

    def split(self, resume: bool = False) -> Path:
        """Stage C: two branches on disjoint timestep ranges with per-branch EMA; then the merge."""
        cfg = self.config.split
        high_steps, low_steps = self.branch_steps()
        start = self.initial_student("split")
        branches = {"high": start, "low": copy.deepcopy(start)}
        models = {name: self._ddp(b) for name, b in branches.items()}
        emas = {name: {k: v.detach().clone() for k, v in b.state_dict().items()} for name, b in branches.items()}
        optim = self.config.dmd.optim if cfg.objective == "dmd" else self.config.pretrain.optim
        opts = {name: make_optimizer(b.parameters(), optim) for name, b in branches.items()}
        fake = self._fake_score() if cfg.objective == "dmd" else None
        # DMD's own fake score, already warmed up on the student the branches start from (when this folder ran
        # DMD); otherwise a fresh copy of the teacher, warmed up here first (TOYWORLD.md "Pitfalls" 1).
        dmd_state = on_main(self.world, lambda: stage_state(self.out, "dmd"), share=True) if fake is not None else None
        if dmd_state is not None:
            load_state(dmd_state, {"fake": fake}, {})
        warmup_done = self.config.dmd.fake_warmup_steps if dmd_state is not None else 0
        fake_model = self._ddp(fake) if fake is not None else None
        fake_opt = make_optimizer(fake.parameters(), self.config.dmd.fake_optim) if fake is not None else None
        self.preview_model = RoutedMMDiT(branches["high"], branches["low"], cfg.boundary)

        def step_fn(step: int, generator: torch.Generator) -> dict[str, float]:
            values = {}
            for name, ks in (("high", high_steps), ("low", low_steps)):
                if cfg.objective == "dmd":
                    vals, loss = self._dmd_step(models[name], fake_model, fake_opt, generator, step + warmup_done,
                                                ks)
                else:
                    vals, loss = self._trajectory_step(models[name], generator, ks)
                if loss is None:  # the fresh fake score's warm-up: no branch update yet
                    values.update({f"{name}_fake": vals["fake"]})
                    continue
                set_lr(opts[name], optim, step)
                optimizer_step(models[name], opts[name], loss, optim)
                obj.ema_update(emas[name], dict(branches[name].state_dict()), cfg.ema_decay)
                values.update({f"{name}_{k}": v for k, v in vals.items() if k in ("loss", "fake", "g_abs")})
            if "high_loss" in values:
                values["loss"] = (values["high_loss"] + values["low_loss"]) / 2
            return values

        modules = {"high": branches["high"], "low": branches["low"], "ema_high": emas["high"], "ema_low": emas["low"]}
        optimizers = dict(opts)
        if fake is not None:
            modules["fake"], optimizers["fake"] = fake, fake_opt
        self._loop("split", cfg.iterations, resume, modules, optimizers, step_fn)
        self.finish("split", branches)
        for name in ("high", "low"):
            self.save_output(f"branch_{name}", emas[name], cfg.iterations, stage="split")
        return self.merge()

    def _trajectory_step(self, model, generator: torch.Generator, ks: list[int]):
        """Stage A's loss on a batch, each sample on a random segment among the student steps ``ks``."""
        batch = self.batch(generator)
        n, d = batch["noise"].shape[0], self.world.device
        choice = torch.tensor(ks)[torch.randint(len(ks), (self.config.train.batch_size,), generator=generator)]
        segment = self.world.local(choice).to(d)
        rows = torch.arange(n, device=d)
        sigmas = self.sigmas.to(d)
        v = velocity_fn(model, batch["context"], batch["pooled"], self.config.train.autocast == "bf16")
        loss = obj.trajectory_loss(v, batch["trajectory"][rows, segment], batch["trajectory"][rows, segment + 1],
                                   sigmas[segment], sigmas[segment + 1], self.config.pretrain.loss,
                                   self.config.pretrain.huber_c)
        return {"loss": loss.item()}, loss

    def merge(self) -> Path:
        """Interpolate the branch EMAs: ``a * high + (1 - a) * low`` (ALGORITHM.md "Stage C")."""
        branches = {}
        for name in ("high", "low"):
            path = self.stage_output(f"branch_{name}")
            if not path.exists():
                raise ConfigError(f"merge: '{path}' is missing; run the split stage first")
            branches[name] = component_state_dict(index_checkpoint(path), "mmdit")
        merged = obj.merge_weights(branches["high"], branches["low"], self.config.split.merge_alpha)
        return self.save_output("merged", merged, self.config.split.iterations, stage="merge")

    # -------------------------------------------------------------------------------------------- outputs

    def save_output(self, name: str, mmdit, iterations: int, stage: str | None = None, parts_from: str = "",
                    student: bool = True) -> Path:
        """An official-layout checkpoint: the MM-DiT plus the VAE and text encoders of ``parts_from`` (default:
        the teacher's). A student's metadata carries its grid and sampler mode; a teacher's carries neither. The
        tokenizers those text encoders read (``model.tokenizers``, else the source's own) travel in the metadata
        when they are project-made (:func:`..flash_core.tokenizer_files.written_tokenizer_metadata`)."""
        path = self.stage_output(name)
        state = mmdit.state_dict() if isinstance(mmdit, torch.nn.Module) else mmdit
        state = {k: whole(v) for k, v in state.items()}  # gathers FSDP shards: every rank takes part
        bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise NonFiniteLossError(stage or name, iterations, f"'{bad}' is NaN or infinite; '{path}' not written",
                                     self._last_state(stage or name) if (stage or name) in STAGES else None)
        if not self.world.main:
            return path
        source_path = parts_from or self.config.model.teacher
        source = index_checkpoint(source_path)
        parts = {c: component_state_dict(source, c) for c in ("vae", "clip_l", "clip_g", "t5") if source.has(c)}
        config = getattr(mmdit, "config", None) or MMDiTConfig.from_state_dict(state)
        metadata = FlashMetadata(
            architecture=config.to_dict(), student_sigmas=self.student_grid() if student else None,
            sampler_mode=self.config.student.sampler_mode if student else None, t5=T5_CONVENTION,
            training={"stage": stage or name, "iterations": iterations, "config_hash": self.config.hash()})
        tokenizers = written_tokenizer_metadata(source_path, source.metadata, self.config.model.tokenizers or None)
        return save_checkpoint(path, mmdit={k: v.float() for k, v in state.items()}, **parts, metadata=metadata,
                               extra_metadata=tokenizers)


def image_grid(images: list, columns: int | None = None):
    """Images side by side in rows of ``columns`` (default: all in one row up to 8)."""
    columns = columns or min(len(images), 8)
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def run_stages(config: Config, stage: str = "all", resume: bool = False, progress: bool = True,
               teacher_pipe_factory: Callable | None = None, overwrite: bool = False) -> Path:
    """The headless entry point (CLI and ComfyUI nodes): ``data``, one training stage (``teacher`` included), or
    ``all``: the data and the distillation stages in order (the teacher is its own stage: it comes first).

    The run folder's lock is held throughout; before any work, a stage that would start at step 0 where another
    run's states are is refused unless ``resume`` or ``overwrite`` (see :meth:`Trainer.run`)."""
    from .data import make_teacher_data

    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or start it over")
    stages = ["data", *DISTILLATION_STAGES] if stage == "all" else [stage]
    if not config.model.teacher.strip() and any(name != "teacher" for name in stages):
        raise ConfigError(f"model.teacher: stage '{stage}' needs the teacher checkpoint (a .safetensors file or a "
                          "diffusers folder); the config names none")
    world = World.from_env(config)
    out = result = Path(config.train.out)
    with run_lock(world, out):
        for name in stages:
            if name in ("teacher", *DISTILLATION_STAGES):
                on_main(world, lambda name=name: check_start(out, name, resume, overwrite))
        for name in stages:
            if name == "data":
                if world.main:
                    pipe = (teacher_pipe_factory or _teacher_pipe)(config)
                    result = make_teacher_data(config, pipe, progress)
                if world.size > 1:
                    dist.barrier()
            else:
                trainer = Trainer(config, world, progress)
                trainer.lock_held = True
                result = trainer.run(name, resume, overwrite)
    return result


def _teacher_pipe(config: Config):
    from ..flash_core.pipeline import FlashPipeline

    return FlashPipeline.from_checkpoint(config.model.teacher, tokenizers=config.model.tokenizers or None,
                                         dtype=config.model.dtype, device=config.model.device)
