"""The training driver: the teacher (rectified flow from scratch), then the distillation: Stage A (trajectory
pre-training), Stage B (DMD), Stage C (split fine-tuning) and the merge, from one config (docs/algorithm.md). Each
stage kind is a module of :mod:`.stages` that builds its networks and its step (:class:`.stages.StagePlan`);
the :class:`Trainer` runs every stage the same way (:mod:`.objectives` holds the losses, :mod:`.distributed`
the torchrun plumbing).

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
* The teacher stage's dataset is ``teacher.dataset``: a name the caller provides (``datasets``; the
  ``sd35-flash-train`` command provides the toy world) or a folder of captioned images.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..flash_core.atomic import atomic_write
from ..flash_core.checkpoint import (
    FlashMetadata,
    component_state_dict,
    index_checkpoint,
    load_mmdit,
    load_vae,
    save_checkpoint,
)
from ..flash_core.mmdit import MMDiTConfig
from ..flash_core.schedule import STUDENT_SIGMAS
from ..flash_core.tokenizer_files import written_tokenizer_metadata
from .config import Config, ConfigError, to_toml
from .data import TeacherData, make_teacher_data, teacher_pipeline
from .distributed import World, barrier, check_replicas, min_over_ranks, on_main, run_lock, wrap
from .run_folder import (
    RunRecord,
    StageRun,
    check_start,
    cut_log,
    newest_state,
    record_state,
    start_stage,
    state_folder,
)
from .stages import StagePlan
from .stages import dmd as dmd_stage
from .stages import pretrain as pretrain_stage
from .stages import split as split_stage
from .stages import teacher as teacher_stage
from .stages.networks import enable_gradient_checkpointing
from .stages.previews import sample_grid
from .state import (
    NonFiniteStateError,
    TrainingError,
    apply_state,
    read_state,
    save_state,
    state_name,
    whole,
)
from .teacher import DatasetSource

STAGES = ("pretrain", "dmd", "split", "merge", "teacher")  # the order seeds each stage's generators: append only
DISTILLATION_STAGES = ("pretrain", "dmd", "split")  # what ``all`` runs after the data stage
STAGE_KINDS: dict[str, Callable[[Trainer], StagePlan]] = {
    "teacher": teacher_stage.prepare, "pretrain": pretrain_stage.prepare, "dmd": dmd_stage.prepare,
    "split": split_stage.prepare}
T5_CONVENTION = "optional: 77 CLIP tokens when off"

log = logging.getLogger(__name__)


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator for one step of one stage: identical on every rank and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGES.index(stage) * 100_003 + step)


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
    """Runs one stage (or all) of the distillation described by ``config``. ``datasets``: the named datasets
    ``teacher.dataset`` may name (``(count, seed, image_size) -> CaptionedImages``); a folder needs none."""

    def __init__(self, config: Config, world: World | None = None, progress: bool = True,
                 on_step: Callable[[str, int, int, dict], None] | None = None,
                 datasets: Mapping[str, DatasetSource] | None = None):
        self.config, self.world = config, world or World.from_env(config)
        self.progress = progress and self.world.main
        self.on_step = on_step  # (stage, step, total, values): for the ComfyUI nodes' progress and chart
        self.on_preview: Callable | None = None  # (stage, step, PIL image) after each preview grid
        self.interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt,)  # stops that save state first
        self.datasets: Mapping[str, DatasetSource] = dict(datasets or {})
        self.out = Path(config.train.out)
        self.lock_held = False  # True when the caller holds the run folder's lock (run_stages does)
        self.stage_run: StageRun | None = None  # the running stage's record entry (rank 0)
        self.sigmas = torch.tensor(self.student_grid(), dtype=torch.float32)
        self._data: TeacherData | None = None
        self._teacher: torch.nn.Module | None = None
        self.models: dict[str, torch.nn.Module] = {}  # the last stage's trained networks
        self._vae = None

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

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as this job trains it (:func:`.distributed.wrap`: itself, DDP, or FSDP when sharded)."""
        return wrap(model, self.world, self.sharded)

    @torch.no_grad()
    def preview(self, mmdit: torch.nn.Module) -> Image.Image:
        """A grid of student samples: fixed seeds (``train.sample_seeds``), the first prompts of the data, the
        student grid with Euler, decoded with the teacher's VAE. The same noise every time, so grids compare."""
        if self._vae is None:
            self._vae = load_vae(component_state_dict(index_checkpoint(self.config.model.teacher), "vae"),
                                 device=self.world.device)
        seeds = self.config.train.sample_seeds
        index = torch.arange(len(seeds)) % len(self.data)
        none = torch.zeros(len(seeds), dtype=torch.bool)
        batch = self.data.batch(index, True, none, none)
        return sample_grid(mmdit, self._vae, seeds, batch["noise"].shape[1:], self.sigmas.to(self.world.device),
                           batch["context"], batch["pooled"])

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
                return split_stage.merge(self)
            self.stage_run = on_main(self.world, lambda: start_stage(self.out, stage, self.config.hash(), resume,
                                                                      overwrite))
            plan = STAGE_KINDS[stage](self)
            self._loop(stage, plan, resume)
            self.finish(stage, plan.trained)
            return plan.outputs()

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

    def _loop(self, stage: str, plan: StagePlan, resume: bool) -> None:
        folder = state_folder(self.out, stage)
        start = self._resume(stage, plan.modules, plan.optimizers) if resume else 0
        log_file = CSVLog(self.out / f"log_{stage}.csv", self.world.main, start)
        bar = tqdm(total=plan.iterations, initial=start, desc=stage, disable=not self.progress)
        self._done, self._in_step, self._diverged = start, False, None
        try:
            for step in range(start, plan.iterations):
                self._step(stage, step, plan, log_file, bar, folder)
        except self.interrupts as stop:
            # A user's stop (Ctrl-C, SIGTERM, ComfyUI's Cancel): keep what was trained, say where, then stop.
            stop.training_stop = self._stopped(stage, start, folder, plan)
            log.info("%s", stop.training_stop)
            raise
        finally:
            bar.close()

    def _step(self, stage: str, step: int, plan: StagePlan, log_file: CSVLog, bar, folder: Path) -> None:
        """One training step, its values checked, then its log line, state file, preview and callback, as due.
        A stop by signal waits for all of it (:func:`whole_steps`)."""
        with whole_steps():
            tic = time.perf_counter()
            self._in_step = True
            values = plan.step(step, step_generator(self.config.train.seed, stage, step))
            self._done, self._in_step = step + 1, False
            values["sec_per_it"] = time.perf_counter() - tic
            self._check_values(stage, step + 1, values)
            self._after_step(stage, step + 1, plan, values, log_file, bar, folder)

    def _after_step(self, stage: str, done: int, plan: StagePlan, values: dict[str, float], log_file: CSVLog, bar,
                    folder: Path) -> None:
        """The bookkeeping of step ``done``: progress, log row, state file, preview grid, callback."""
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in values.items() if k in ("loss", "dmd", "fake")})
        if done % self.config.train.log_every == 0 or done == plan.iterations:
            log_file.write(done, values)
        if done % self.config.train.checkpoint_every == 0 or done == plan.iterations:
            self._save(stage, folder, done, plan.modules, plan.optimizers)
        every = self.config.train.sample_every
        if (self.world.main or self.sharded) and every and plan.preview_model is not None and done % every == 0:
            grid = (plan.preview or self.preview)(plan.preview_model)  # under FSDP a collective: all sample
            if self.world.main:
                path = self.out / "samples" / f"{stage}_{done:06d}.png"
                atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
                if self.on_preview is not None:
                    self.on_preview(stage, done, grid)
        if self.on_step is not None:
            self.on_step(stage, done, plan.iterations, values)

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
        first, finite = min_over_ranks(self.world, [float(first), 1.0 if finite else 0.0])
        first, finite = int(first), bool(finite)
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

    def _stopped(self, stage: str, start: int, folder: Path, plan: StagePlan) -> Stopped:
        """After a user's stop: save the last finished step's state unless it is saved already, the stop came
        in the middle of a step (a second Ctrl-C), the weights are not finite, or other ranks run (a save there
        is a collective they are not in). Returns where the stage stopped."""
        last, note = self._last_state(stage), ""
        if self._done > start and (last is None or last[0] != self._done):
            if self._in_step:
                note = " (stopped in the middle of a step)"
            elif self.world.size > 1:
                note = " (a stop under torchrun saves no state)"
            elif not all_finite(saved_tensors(plan.modules, plan.optimizers)):
                note = " (the weights are not finite)"
            else:
                self._save(stage, folder, self._done, plan.modules, plan.optimizers)
                last = self._last_state(stage)
        return Stopped(stage, self._done, last, note)

    def finish(self, stage: str, models: dict[str, torch.nn.Module]) -> None:
        """Keep the stage's networks and, under torchrun, check that every rank holds the same weights."""
        self.models = models
        if self.world.size == 1 or self.sharded:  # FSDP ranks hold different shards by design
            return
        check_replicas(self.world, stage, models)
        if self.world.main:
            text = f"{self.world.size} ranks hold identical weights for {', '.join(models)}\n"
            atomic_write(self.out / f"replicas_{stage}.txt", lambda tmp: tmp.write_text(text))

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


def run_stages(config: Config, stage: str = "all", resume: bool = False, progress: bool = True,
               teacher_pipe_factory: Callable | None = None, overwrite: bool = False,
               datasets: Mapping[str, DatasetSource] | None = None) -> Path:
    """The headless entry point (CLI and ComfyUI nodes): ``data``, one training stage (``teacher`` included), or
    ``all``: the data and the distillation stages in order (the teacher is its own stage: it comes first).
    ``datasets``: the named datasets ``teacher.dataset`` may name (see :class:`Trainer`).

    The run folder's lock is held throughout; before any work, a stage that would start at step 0 where another
    run's states are is refused unless ``resume`` or ``overwrite`` (see :meth:`Trainer.run`)."""
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
                    pipe = (teacher_pipe_factory or teacher_pipeline)(config)
                    result = make_teacher_data(config, pipe, progress)
                barrier(world)
            else:
                trainer = Trainer(config, world, progress, datasets=datasets)
                trainer.lock_held = True
                result = trainer.run(name, resume, overwrite)
    return result
