"""Rebuild the toy world from nothing, in one command (issue 6 "Reproduction"; docs/toyworld.md "Budgets"):

``python -m sd35_flash.training.toyworld --preset ci|full --out DIR``

world prompts -> tokenizer -> text encoders -> VAE (trained) -> evaluator classifier (trained) -> teacher (the
``teacher`` stage of :mod:`sd35_flash.training`) -> teacher data -> students (trajectory guidance at 4 and 2
steps, then DMD, then split fine-tuning and the merge) -> the demo checkpoint folder.

Every training stage after the evaluator goes through ``training/`` (the :class:`~..trainer.Trainer` and the
data stage) from TOML configs written into ``DIR`` first, so any of them can be rerun by hand:
``sd35-flash-train DIR/teacher/teacher.toml --stage teacher``, ``sd35-flash-train DIR/students/step4.toml
--stage dmd`` ... There is no second code path for distillation.

Outputs (under ``DIR``): ``world/`` (prompts, evaluation prompts, a grid of real scenes), ``tokenizers/``,
``components.safetensors`` (VAE + text encoders: the teacher's frozen parts), ``evaluator.safetensors``,
``teacher/``, ``data/``, ``students/step{4,2}/``, ``students/step{4,2}/variants/<reading>_s<seed>/`` (the
quality table's DMD and split runs, each with its TOML config beside its folder), ``demo/``
(``sd35_flash_demo.safetensors``: the 4-step student with its encoders and VAE in the official single-file
layout with metadata, ``tokenizers/`` and a sample image) and ``build.json`` (each stage's wall time and
outputs). ``--resume`` skips the stages ``build.json`` records as done with the same preset, and resumes
interrupted training stages from their saved state.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ...flash_core.atomic import atomic_write
from ...flash_core.checkpoint import FlashMetadata, component_state_dict, index_checkpoint, save_checkpoint
from ...flash_core.demo import DEMO_FILE_NAME, DEMO_FOLDER
from ...flash_core.errors import CheckpointError
from ...flash_core.tokenizer_files import written_tokenizer_metadata
from ..config import SCORE_SAMPLES, config_from_dict, to_toml
from ..distributed import World
from ..stages.previews import image_grid
from ..trainer import Trainer, run_stages
from . import encoders, evaluator, tokenizer, world
from .dataset import DATASETS

DEMO_PROMPT = "a blue triangle at the top"
# The shipped teacher (a clone of the repository has it; the students and the table rebuild from it)
TEACHER_FOLDER = Path(__file__).resolve().parents[2] / "toyworld_teacher"
TEACHER_FILE_NAME = "teacher.safetensors"
# Stage C's boundary on 1000 * sigma, halving each student grid: 4 steps {1, .9} / {.75, .5}; 2 steps {1} / {.75}.
# (docs/algorithm.md's default 500 would split the 4-step grid 3:1, and lies below the whole 2-step grid.)
SPLIT_BOUNDARY = {4: 825.0, 2: 875.0}


# ------------------------------------------------------------------------------------------------ presets


@dataclass(frozen=True)
class Preset:
    """Every budget of one rebuild. The training sections are ``training.config`` tables (TOML keys)."""

    name: str
    seed: int = 0
    prompts: int = 1024                 # distinct distillation prompts (one teacher trajectory each)
    # Token rows of the build's tokenizer (CLIP and T5 each; SD3's are 77): the longest caption is 8 words, and
    # the MM-DiT's cost grows with every context token (64 image tokens + 2 x 77 text tokens cost 2x 64 + 2 x 12).
    text_length: int = 12
    vae: dict = field(default_factory=dict)          # encoders.train_vae keywords
    classifier: dict = field(default_factory=dict)   # evaluator.train_classifier keywords
    teacher: dict = field(default_factory=dict)      # [teacher]
    teacher_dropout: dict = field(default_factory=dict)  # [dropout] of the teacher stage
    data: dict = field(default_factory=dict)         # [data]
    train: dict = field(default_factory=dict)        # [train] of the student runs
    pretrain: dict = field(default_factory=dict)
    dmd: dict = field(default_factory=dict)
    split: dict = field(default_factory=dict)
    student_steps: tuple[int, ...] = (4, 2)          # trajectory guidance for each
    dmd_steps: tuple[int, ...] = (4, 2)              # then DMD and split + merge for these (the demo's chain)
    # The quality table's variants (stage ``variants``): for each of ``student_steps``, DMD from the trajectory
    # guidance student with each ``score_sample`` reading, and split + merge on ``readings[0]`` (the full method),
    # each trained with ``seeds`` training seeds (seed + 0, + 1, ...; ``--seeds`` overrides).
    readings: tuple[str, ...] = SCORE_SAMPLES
    # dmd.fake_sample settings each shared reading is trained with (renoise always uses "renoise"); the first is
    # the one of the full method (split + merge) and of the demo chain
    fake_samples: tuple[str, ...] = ("renoise", "shared")
    # per reading, DMD settings that replace the preset's [dmd] ones (each reading's best learning rate and anchor
    # weight from a sweep: docs/toyworld.md "The build")
    reading_dmd: dict = field(default_factory=dict)
    anchor_control: bool = True        # the anchor-only control: Stage A continued for DMD's generator updates
    seeds: int = 3
    workers: int = 2                   # processes (one torch thread each) training the variants side by side
    # processes (one torch thread each) training the teacher through torchrun, the global batch split over them
    # (the same draws as one process: training/trainer.py); 1: in this process
    teacher_workers: int = 1
    teacher_probe_samples: int = 240   # the teacher's samples read by the evaluator after its stage (TeacherProbe)
    eval_samples: int = 480            # samples per row of the quality table (stage ``table``)
    # SHA-256 of a given teacher checkpoint (``--from-teacher``; set by :func:`build`): its MM-DiT, VAE and text
    # encoders replace the encoders, VAE and teacher stages' training. Empty: train them.
    from_teacher: str = ""


PRESETS = {
    # The whole chain at unit-test size (docs/toyworld.md "Budgets": check plumbing, not quality): a few minutes.
    "ci": Preset(
        name="ci", prompts=8, teacher_probe_samples=24,
        vae={"iterations": 40, "batch_size": 16},
        classifier={"iterations": 30, "batch_size": 32, "width": 16},
        teacher={"iterations": 30, "batch_size": 16, "dataset_size": 256, "depth": 2, "hidden_size": 128,
                 "pos_embed_max_size": 8, "optim": {"lr": 2e-3, "warmup_steps": 5}},
        data={"teacher_steps": 8, "teacher_cfg": 2.0, "shard_size": 4},
        train={"batch_size": 4, "checkpoint_every": 5},
        pretrain={"iterations": 6, "optim": {"lr": 1e-3}},
        dmd={"iterations": 3, "fake_updates_per_step": 1, "fake_warmup_steps": 1, "trajectory_weight": 50.0,
             "optim": {"lr": 1e-4}, "fake_optim": {"lr": 1e-4}},
        split={"iterations": 2},
        eval_samples=48,
    ),
    # The rebuild of the demo model and the table (target: under 45 minutes on 2 CPU cores). The teacher keeps
    # hidden = 64 * depth so ComfyUI's architecture detection (depth = hidden / 64) loads it and its students.
    "full": Preset(
        name="full", prompts=1024,
        vae={"iterations": 400, "batch_size": 32},
        classifier={"iterations": 400, "batch_size": 128, "width": 32},
        # docs/toyworld.md "Teacher": SD3's shifted training density (the one the shift-3 sampler assumes), a
        # cosine schedule, and the loss weighted 30x where circle, square and triangle differ (region_weight);
        # what the shipped toyworld_teacher/ was trained with
        teacher={"iterations": 8000, "batch_size": 64, "dataset_size": 100000, "depth": 2, "hidden_size": 128,
                 "pos_embed_max_size": 8, "dual_attention_layers": [0], "logit_normal_mean": 1.1,
                 "logit_normal_std": 1.0, "ema_decay": 0.999, "region_weight": 30.0,
                 "optim": {"lr": 1e-3, "warmup_steps": 200, "schedule": "cosine", "min_lr": 2e-5}},
        teacher_dropout={"t5": 0.5}, teacher_workers=2,
        data={"teacher_steps": 32, "teacher_cfg": 2.0, "shard_size": 128, "sample_batch": 32},
        # The fair protocol (docs/toyworld.md "The build"), fitted to 90 minutes on 2 cores from the shipped
        # teacher: batch 16 (trajectory guidance runs twice the iterations for the same scenes); DMD's fake score
        # warmed up 50 iterations (its held-out loss is flat from about 50 on), then 300 generator updates on
        # fresh noise, the fake score fit on a batch of its own; split + merge 100 iterations a branch with a
        # bias-corrected EMA (ema_decay_at): it forgets the DMD start, which a plain 0.99 EMA keeps 37 % of after 100.
        train={"batch_size": 16, "checkpoint_every": 100, "keep_last": 4, "log_every": 10},
        pretrain={"iterations": 800, "optim": {"lr": 3e-4}},
        dmd={"iterations": 350, "fake_updates_per_step": 2, "fake_warmup_steps": 50, "trajectory_weight": 50.0,
             "real_cfg": 2.0, "normaliser": "per_batch", "noise": "fresh", "fake_batch": "other",
             "optim": {"lr": 1e-5}, "fake_optim": {"lr": 1e-4}},
        split={"iterations": 100, "objective": "dmd"},
        # benchmarks/dmd_sweep.py (docs/toyworld.md "The build"): lr {1e-5, 3e-5} x anchor {10, 50}, 150 updates,
        # 4 steps; every reading's best (unpaired FD_T, ties within 1 broken by paired MSE) is lr 1e-5, anchor 50
        reading_dmd={reading: {"trajectory_weight": 50.0, "optim": {"lr": 1e-5}} for reading in SCORE_SAMPLES},
        dmd_steps=(4,), eval_samples=256,
    ),
}


# ------------------------------------------------------------------------------------------------ the build


@dataclass
class Build:
    """One rebuild in ``out``: its paths, its preset, and the record of what ran (``build.json``)."""

    out: Path
    preset: Preset
    progress: bool = True
    resume: bool = False
    record: dict = field(default_factory=dict)
    teacher_file: Path | None = None  # ``--from-teacher``: the checkpoint whose parts the build takes

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    @property
    def record_path(self) -> Path:
        return self.path("build.json")

    def load_record(self, log: Callable[[str], None] = print) -> None:
        """``build.json`` when resuming: stages are kept up to the first one whose preset settings
        (:data:`STAGE_SETTINGS`) changed since; that one and every later one run again."""
        preset = json.loads(json.dumps(asdict(self.preset)))  # as build.json holds it (tuples as lists)
        if self.resume and self.record_path.exists():
            record = json.loads(self.record_path.read_text())
            old = record.get("preset", {})
            changed = [k for k in preset if k != "name" and old.get(k) != preset[k]]
            first = next((i for i, stage in enumerate(STAGES) if set(STAGE_SETTINGS.get(stage, ())) & set(changed)),
                         None)
            if first is not None:
                again = list(STAGES)[first:]
                log(f"{self.record_path}: {', '.join(changed)} changed; stages from '{again[0]}' on run again")
                record["stages"] = {k: v for k, v in record.get("stages", {}).items() if k not in again}
            elif changed:
                log(f"{self.record_path}: {', '.join(changed)} changed; no recorded stage depends on it")
            record["preset"] = preset
            self.record = record
        self.record.setdefault("preset", preset)
        self.record.setdefault("stages", {})

    def save_record(self) -> None:
        self.record_path.write_text(json.dumps(self.record, indent=1, default=str) + "\n")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


HELD_OUT_ATTRIBUTES = ("layout", "colour", "shape", "position", "colour_2", "shape_2")


def scene_key(prompt: str) -> tuple[int, ...]:
    """What a prompt asks for, size aside: two prompts with one key (either phrasing of a relation, with or
    without a size word) ask for the same combination."""
    labels = world.parse_caption(prompt)
    return tuple(labels[name] for name in HELD_OUT_ATTRIBUTES)


def distillation_prompts(count: int, seed: int) -> list[str]:
    """``count`` distinct captions of the toy grammar, in the order a seeded draw of scenes first meets them,
    none asking for a combination of an evaluation prompt (:func:`scene_key`): the students are measured on
    combinations they were never distilled on (docs/toyworld.md "Metrics that discriminate")."""
    held_out = {scene_key(prompt) for prompt in world.EVAL_PROMPTS}
    found: dict[str, None] = {}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(100):
        captions = world.sample(4 * count, generator).captions
        found.update(dict.fromkeys(c for c in captions if scene_key(c) not in held_out))
        if len(found) >= count:
            break
    return list(found)[:count]


# ---------------------------------------------------------------------------------------------- the stages


def stage_world(b: Build) -> dict:
    """The world's prompt files (distillation and evaluation) and a grid of real scenes to look at."""
    folder = b.path("world")
    folder.mkdir(parents=True, exist_ok=True)
    prompts = distillation_prompts(b.preset.prompts, b.preset.seed + 7)
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (folder / "eval_prompts.txt").write_text("\n".join(world.EVAL_PROMPTS) + "\n")
    real = world.sample_for_prompts(list(world.EVAL_PROMPTS), b.preset.seed)
    from ...flash_core.pipeline import latents_to_images

    image_grid(latents_to_images(real.images), columns=8).resize((8 * 64, 3 * 64), 0).save(folder / "real.png")
    return {"prompts": len(prompts), "files": ["world/prompts.txt", "world/eval_prompts.txt", "world/real.png"]}


def stage_tokenizer(b: Build) -> dict:
    """The word-level tokenizer, declaring the preset's row lengths (every model of the build uses them)."""
    longest = max(len(c.split()) for c in world.EVAL_PROMPTS + tuple(b.path("world", "prompts.txt").read_text()
                                                                      .splitlines()))
    if b.preset.text_length < longest + 2:
        raise ValueError(f"text_length: {b.preset.text_length} tokens cannot hold a {longest}-word caption with its "
                         f"start and end tokens")
    tokenizer.save_tokenizers(b.path("tokenizers"), clip_length=b.preset.text_length, t5_length=b.preset.text_length)
    return {"vocabulary": tokenizer.vocab_size(), "text_length": b.preset.text_length,
            "files": ["tokenizers/clip", "tokenizers/t5xxl"]}


TEACHER_PARTS = ("mmdit", "vae", "clip_l", "clip_g", "t5")


def given_teacher(path: Path):
    """The checkpoint of ``--from-teacher``, checked: an official file holding every part of a toy-world teacher
    whose text encoders read this build's vocabulary. Raises CheckpointError naming the file and what is wrong."""
    files = index_checkpoint(path)
    missing = [part for part in TEACHER_PARTS if not files.has(part)]
    if missing:
        raise CheckpointError(f"--from-teacher '{path}': no {', '.join(missing)} weights; expected a toy-world "
                              "teacher with its VAE and CLIP-L, CLIP-G and T5 encoders (teacher/teacher.safetensors "
                              "of a build)")
    for slot in ("clip_l", "clip_g", "t5"):
        rows = max((r.shape[0] for k, r in files.components[slot].items()
                    if k.endswith(("token_embedding.weight", "shared.weight"))), default=None)
        if rows != tokenizer.vocab_size():
            raise CheckpointError(f"--from-teacher '{path}': its {slot} encoder has a {rows}-token vocabulary; this "
                                  f"build's tokenizer has {tokenizer.vocab_size()}")
    return files


def stage_encoders(b: Build) -> dict:
    """The random, frozen CLIP-L-, CLIP-G- and T5-shaped encoders (encoders.py explains why untrained), or a
    given teacher's."""
    if b.teacher_file is not None:
        files = given_teacher(b.teacher_file)
        save_checkpoint(b.path("encoders.safetensors"),
                        **{slot: component_state_dict(files, slot) for slot in ("clip_l", "clip_g", "t5")})
        return {"from_teacher": str(b.teacher_file), "files": ["encoders.safetensors"]}
    models = encoders.make_text_encoders(b.preset.seed)
    save_checkpoint(b.path("encoders.safetensors"),
                    **{slot: encoders.text_state_dict(m) for slot, m in models.items()})
    return {"parameters": encoders.parameter_count(models), "files": ["encoders.safetensors"]}


def stage_vae(b: Build) -> dict:
    """Train the one-level SD3 VAE on toy scenes (or take a given teacher's); write it with the encoders as
    ``components.safetensors``."""
    text = index_checkpoint(b.path("encoders.safetensors"))
    parts = {slot: component_state_dict(text, slot) for slot in ("clip_l", "clip_g", "t5")}
    if b.teacher_file is not None:
        vae = component_state_dict(given_teacher(b.teacher_file), "vae")
        save_checkpoint(b.path("components.safetensors"), vae=vae, **parts)
        return {"from_teacher": str(b.teacher_file), "files": ["components.safetensors"]}
    vae, log = encoders.train_vae(seed=b.preset.seed, progress=b.progress, **b.preset.vae)
    _write_csv(b.path("vae_log.csv"), log)
    save_checkpoint(b.path("components.safetensors"), vae=vae, **parts)
    recon = sum(r["recon"] for r in log[-10:]) / min(10, len(log))
    return {"recon_mse": recon, "files": ["components.safetensors", "vae_log.csv"]}


def stage_evaluator(b: Build) -> dict:
    """The attribute classifier (a measuring instrument, never a training loss: docs/toyworld.md "Pitfalls" 4)."""
    settings = {"width": 32, **b.preset.classifier}
    model, log = evaluator.train_classifier(seed=b.preset.seed + 11, progress=b.progress, **settings)
    _write_csv(b.path("evaluator_log.csv"), log)
    evaluator.save_classifier(b.path("evaluator.safetensors"), model, settings["width"])
    held_out = world.sample(512, b.preset.seed + 99)
    accuracy = evaluator.attribute_accuracy(model.predict(held_out.images), held_out.labels)
    return {"held_out_accuracy": accuracy, "files": ["evaluator.safetensors", "evaluator_log.csv"]}


def teacher_config(b: Build) -> dict:
    """The teacher stage's config: ``[teacher]`` of the preset on the build's components and tokenizers."""
    p = b.preset
    return {
        "model": {"tokenizers": str(b.path("tokenizers"))},
        # ten states kept along the run: the accuracy curve benchmarks/teacher_curve.py reads
        "train": {"out": str(b.path("teacher")), "seed": p.seed, "log_every": 10, "sample_every": 0,
                  "checkpoint_every": max(100, p.teacher.get("iterations", 0) // 10), "keep_last": 11},
        "dropout": p.teacher_dropout,
        "teacher": {"components": str(b.path("components.safetensors")), **p.teacher},
        "data": {"width": world.IMAGE_SIZE, "height": world.IMAGE_SIZE, **p.data},
    }


def student_config(b: Build, steps: int, out: Path | None = None, seed: int | None = None,
                   reading: str | None = None, student_init: Path | None = None, fake_sample: str | None = None,
                   pretrain_iterations: int | None = None) -> dict:
    """A student run's config (``students/step{steps}``): the build's teacher, shared teacher data. A variant run
    (the quality table's) names its own ``out`` folder, training ``seed``, DMD ``reading`` (``dmd.score_sample``,
    with the preset's ``reading_dmd`` settings for it) and ``fake_sample``, ``student_init`` (the
    trajectory-guidance student it starts from) and, for the anchor-only control, ``pretrain_iterations``."""
    p = b.preset
    dmd = {**p.dmd, **({"score_sample": reading} if reading else {}),
           **({"fake_sample": fake_sample} if fake_sample else {})}
    for key, value in p.reading_dmd.get(reading or main_reading(p), {}).items():
        dmd[key] = {**dmd.get(key, {}), **value} if isinstance(value, dict) else value
    pretrain = {**p.pretrain, **({"iterations": pretrain_iterations} if pretrain_iterations else {})}
    model = {"teacher": str(b.path("teacher", "teacher.safetensors")), "tokenizers": str(b.path("tokenizers"))}
    if student_init is not None:
        model["student_init"] = str(student_init)
    return {
        "model": model,
        "data": {"prompts": str(b.path("world", "prompts.txt")), "dir": str(b.path("data")),
                 "width": world.IMAGE_SIZE, "height": world.IMAGE_SIZE, "seed": p.seed, **p.data},
        "student": {"steps": steps},
        "train": {"out": str(out or b.path("students", f"step{steps}")), **p.train,
                  "seed": p.seed if seed is None else seed},
        "pretrain": pretrain, "dmd": dmd,
        "split": {"boundary": SPLIT_BOUNDARY[steps], **p.split},
    }


def write_config(path: Path, table: dict):
    """Validate ``table`` as a training config and write it as TOML (what ``sd35-flash-train`` reads)."""
    config = config_from_dict(table, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(config))
    return config


def stage_teacher(b: Build) -> dict:
    """The teacher: trained by the ``teacher`` stage of ``training/`` (on ``teacher_workers`` processes), or the
    given one copied whole; then probed (:func:`probe_teacher`)."""
    if b.teacher_file is not None:  # given: copied whole (the students and the table read it from the build)
        given_teacher(b.teacher_file)
        atomic_write(b.path("teacher", "teacher.safetensors"), lambda tmp: shutil.copyfile(b.teacher_file, tmp))
        return {"from_teacher": str(b.teacher_file), "probe": probe_teacher(b),
                "files": ["teacher/teacher.safetensors"]}
    path = b.path("teacher", "teacher.toml")
    config = write_config(path, teacher_config(b))
    tic = time.perf_counter()
    if b.preset.teacher_workers > 1:
        torchrun_stage(path, "teacher", b.preset.teacher_workers, b.resume, b.progress)
    else:
        trainer = Trainer(config, World(), progress=b.progress, datasets=DATASETS)
        trainer.run("teacher", resume=b.resume, overwrite=not b.resume)
    return {"workers": b.preset.teacher_workers, "training_seconds": round(time.perf_counter() - tic, 2),
            "probe": probe_teacher(b),
            "files": ["teacher/teacher.toml", "teacher/teacher.safetensors", "teacher/log_teacher.csv"]}


def probe_teacher(b: Build) -> dict[str, float]:
    """The build's teacher read by its evaluator (:class:`.quality.TeacherProbe`: ``teacher_probe_samples``
    32-step CFG 2 samples on the evaluation prompts), printed as one line and kept in ``build.json``."""
    from ...flash_core.checkpoint import load_mmdit
    from .quality import TeacherProbe

    probe = TeacherProbe(b.out, b.preset.teacher_probe_samples)
    result = probe(load_mmdit(b.path("teacher", "teacher.safetensors")))
    if b.progress:
        print(f"teacher probe ({probe.samples} samples, {probe.steps} steps, CFG {probe.cfg:g}): "
              + ", ".join(f"{k} {100 * v:.0f} %" for k, v in result.items() if k not in ("fd_real", "floor"))
              + f"; FD real {result['fd_real']:.1f} (floor {result['floor']:.1f})", file=sys.stderr)
    return {k: round(v, 4) for k, v in result.items()}


def torchrun_stage(config: Path, stage: str, workers: int, resume: bool, progress: bool) -> None:
    """Run ``stage`` of ``config`` on ``workers`` processes of one torch thread each, through torchrun and the
    training CLI (``python -m torch.distributed.run --standalone --nproc_per_node N -m sd35_flash.training``),
    its progress bar and errors on this terminal; a failure is one line naming the command to rerun."""
    training = __package__.rsplit(".", 1)[0]  # sd35_flash.training, however the package is installed
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
               "-m", training, str(config), "--stage", stage, "--threads", "1",
               "--resume" if resume else "--overwrite", *([] if progress else ["--quiet"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise ChildProcessError(f"{stage} stage on {workers} processes failed (exit status {done.returncode}): "
                           f"{' '.join(command[2:])}")


def stage_teacher_data(b: Build) -> dict:
    """Teacher trajectories for every prompt (both student grids are stored: one data set serves both)."""
    configs = {steps: write_config(b.path("students", f"step{steps}.toml"), student_config(b, steps))
               for steps in b.preset.student_steps}
    run_stages(configs[b.preset.student_steps[0]], "data", progress=b.progress)
    return {"files": ["data/manifest.json", *(f"students/step{s}.toml" for s in configs)]}


def _student_stage(b: Build, stage: str, steps_list: tuple[int, ...]) -> dict:
    outputs = []
    for steps in steps_list:
        config = write_config(b.path("students", f"step{steps}.toml"), student_config(b, steps))
        path = Trainer(config, World(), progress=b.progress).run(stage, resume=b.resume, overwrite=not b.resume)
        outputs.append(str(path.relative_to(b.out)))
    return {"files": outputs}


def stage_pretrain(b: Build) -> dict:
    """Stage A, trajectory guidance, for each student step count (docs/algorithm.md "Stage A")."""
    return _student_stage(b, "pretrain", b.preset.student_steps)


def stage_dmd(b: Build) -> dict:
    """Stage B, DMD with the configured score sample (docs/algorithm.md "Stage B")."""
    return _student_stage(b, "dmd", b.preset.dmd_steps)


def stage_split(b: Build) -> dict:
    """Stage C, split-timestep fine-tuning and the merge (docs/algorithm.md "Stage C")."""
    return _student_stage(b, "split", b.preset.dmd_steps)


def variant_seeds(p: Preset) -> list[int]:
    return [p.seed + i for i in range(p.seeds)]


def main_reading(p: Preset) -> str:
    """The ``score_sample`` of the demo's chain (the ``dmd`` and ``split`` stages): the preset's, else the
    config default."""
    from ..config import DMDConfig

    return p.dmd.get("score_sample", DMDConfig().score_sample)


def fake_samples_for(p: Preset, reading: str) -> tuple[str, ...]:
    """The ``dmd.fake_sample`` settings a reading is trained with: the preset's for shared readings, ``renoise``
    alone for the ``renoise`` reading (docs/algorithm.md "Stage B")."""
    return ("renoise",) if reading == "renoise" else p.fake_samples


def dmd_key(p: Preset, reading: str, fake_sample: str) -> str:
    """The table's name for a DMD variant: the reading, with ``+fake_shared`` when not the preset's first."""
    return reading if fake_sample == p.fake_samples[0] else f"{reading}+fake_{fake_sample}"


def generator_updates(p: Preset) -> int:
    """The DMD student updates of one run: its iterations after the fake-score warm-up."""
    from ..config import DMDConfig

    defaults = DMDConfig()
    return (p.dmd.get("iterations", defaults.iterations)
            - p.dmd.get("fake_warmup_steps", defaults.fake_warmup_steps))


def variant_runs(b: Build) -> list[dict]:
    """The quality table's training runs (docs/toyworld.md "The build"), per step count and training seed:
    trajectory guidance (phase 1); then, each from the trajectory-guidance student of its own seed (phase 2), the
    anchor-only control (Stage A continued for as many updates as DMD's generator gets), DMD with every reading
    and fake sample, and split + merge after the main one. The demo chain's own runs (``students/step{N}``: seed
    ``preset.seed``, main reading, first fake sample) are reused rather than trained again."""
    p = b.preset
    runs = []
    for steps in p.student_steps:
        folder = b.path("students", f"step{steps}")
        tg = {}
        for seed in variant_seeds(p):
            out = folder if seed == p.seed else folder / "variants" / f"tg_s{seed}"
            tg[seed] = out / "pretrain.safetensors"
            runs.append({"steps": steps, "kind": "tg", "seed": seed, "stages": ["pretrain"], "out": out,
                         "config": out.with_suffix(".toml") if seed != p.seed else folder.with_suffix(".toml"),
                         "reused": seed == p.seed, "phase": 1, "init": None})
        for seed in variant_seeds(p) if p.anchor_control else ():
            out = folder / "variants" / f"anchor_s{seed}"
            runs.append({"steps": steps, "kind": "anchor", "seed": seed, "stages": ["pretrain"], "out": out,
                         "config": out.with_suffix(".toml"), "reused": False, "phase": 2, "init": tg[seed]})
        for reading in p.readings:
            for fake_sample in fake_samples_for(p, reading):
                key = dmd_key(p, reading, fake_sample)
                main = reading == p.readings[0] and fake_sample == p.fake_samples[0]
                for seed in variant_seeds(p):
                    stages = ["dmd", "split"] if main else ["dmd"]
                    reused = (reading == main_reading(p) and fake_sample == p.fake_samples[0] and seed == p.seed
                              and steps in p.dmd_steps)
                    out = folder if reused else folder / "variants" / f"{key}_s{seed}"
                    runs.append({"steps": steps, "kind": "dmd", "reading": reading, "fake_sample": fake_sample,
                                 "key": key, "seed": seed, "stages": stages, "out": out,
                                 "config": folder.with_suffix(".toml") if reused else out.with_suffix(".toml"),
                                 "reused": reused, "phase": 2, "init": tg[seed]})
    return runs


def _train_variant(config_path: str, stages: list[str], resume: bool, threads: int) -> float:
    """One variant run in a worker process (its own torch threads): its stages in order, from its TOML config;
    a stage whose output exists already is skipped when resuming. Returns the run's wall time in seconds."""
    from ..config import load_config

    tic = time.perf_counter()
    torch.set_num_threads(threads)
    config = load_config(config_path)
    for stage in stages:
        output = Path(config.train.out) / ("merged" if stage == "split" else stage)
        if resume and output.with_suffix(".safetensors").exists():
            continue  # a finished run of an interrupted variants stage
        Trainer(config, World(), progress=False).run(stage, resume=resume, overwrite=not resume)
    return round(time.perf_counter() - tic, 2)


def _train_variants(b: Build, runs: list[dict]) -> dict[str, float]:
    """Train ``runs`` (each written as its TOML config first) on ``preset.workers`` processes of one torch thread
    each (docs/toyworld.md "Pitfalls" 5: small batches use a second thread poorly); one bar over the runs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    todo = [r for r in runs if not r["reused"]]
    for run in todo:
        options = {"tg": {}, "anchor": {"student_init": run["init"], "pretrain_iterations": generator_updates(b.preset)},
                   "dmd": {"student_init": run["init"], "reading": run.get("reading"),
                           "fake_sample": run.get("fake_sample")}}[run["kind"]]
        write_config(run["config"], student_config(b, run["steps"], run["out"], run["seed"], **options))
    seconds: dict[str, float] = {}
    name = lambda run: str(Path(run["out"]).relative_to(b.out))  # noqa: E731
    bar = tqdm(total=len(todo), desc="variants", unit="run", disable=not b.progress)
    for phase in (1, 2):  # the trajectory-guidance students first: every later run starts from one
        batch = [r for r in todo if r["phase"] == phase]
        if b.preset.workers <= 1:
            for run in batch:
                seconds[name(run)] = _train_variant(str(run["config"]), run["stages"], b.resume,
                                                    torch.get_num_threads())
                bar.update(1)
            continue
        with ProcessPoolExecutor(b.preset.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_variant, str(r["config"]), r["stages"], b.resume, 1): r for r in batch}
            for future in as_completed(futures):
                seconds[name(futures[future])] = future.result()
                bar.update(1)
    bar.close()
    return seconds


def stage_variants(b: Build) -> dict:
    """The quality table's students (issue 6 item 4), each through ``training/`` from its own TOML config
    (``students/step{N}/variants/<reading>_s<seed>.toml``, rerun with ``sd35-flash-train CONFIG --stage dmd``):
    DMD with every ``score_sample`` reading, and split + merge (high and low branches kept for the routed row),
    for each training seed, on ``preset.workers`` processes. Records, per step count, the checkpoints
    :mod:`.quality` evaluates, and each run's wall time."""
    p = b.preset
    table: dict[str, dict] = {}
    files: list[str] = []
    rel = lambda path: str(Path(path).relative_to(b.out))  # noqa: E731
    runs = variant_runs(b)
    seconds = _train_variants(b, runs)
    for run in runs:
        steps = run["steps"]
        pretrain = b.path("students", f"step{steps}", "pretrain.safetensors")
        entry = table.setdefault(str(steps), {"pretrain": rel(pretrain), "boundary": SPLIT_BOUNDARY[steps],
                                              "tg": [], "anchor": [], "dmd": {}, "merged": [], "branches": [],
                                              "seeds": variant_seeds(p)})
        if run["kind"] in ("tg", "anchor"):
            entry[run["kind"]].append(rel(run["out"] / "pretrain.safetensors"))
            files += [rel(run["config"]), rel(run["out"] / "pretrain.safetensors")]
            continue
        entry["dmd"].setdefault(run["key"], []).append(rel(run["out"] / "dmd.safetensors"))
        files += [rel(run["config"]), rel(run["out"] / "dmd.safetensors")]
        if "split" in run["stages"]:
            entry["merged"].append(rel(run["out"] / "merged.safetensors"))
            entry["branches"].append([rel(run["out"] / "branch_high.safetensors"),
                                      rel(run["out"] / "branch_low.safetensors")])
            entry["split_reading"] = run["key"]
            files.append(rel(run["out"] / "merged.safetensors"))
    return {"teacher": "teacher/teacher.safetensors", "tokenizers": "tokenizers",
            "teacher_cfg": float(student_config(b, p.student_steps[0])["data"].get("teacher_cfg", 4.0)),
            "table": table, "runs": sum(not r["reused"] for r in runs), "workers": p.workers,
            "run_seconds": seconds, "files": list(dict.fromkeys(files))}


def stage_table(b: Build) -> dict:
    """The quality table (:mod:`.quality`, what ``benchmarks/toy_quality.py`` prints) on ``preset.eval_samples``
    samples a row, with a sample grid per row in ``quality/``."""
    from .quality import evaluate_build

    result = evaluate_build(b.out, b.preset.eval_samples, grids=True, log=lambda _: None, progress=b.progress,
                            workers=b.preset.workers)
    means = {r["key"]: {m: sum(v) / len(v) for m, v in r["metrics"].items()
                        if m in ("fd_t", "fd_t_unpaired", "paired_mse")}
             for r in result["rows"]}
    return {"samples": result["samples"], "rows": means,
            "files": ["quality/table.md", "quality/table.json", "quality/real.png"]}


def final_student(b: Build, steps: int = 4) -> Path:
    """The furthest-trained student of ``steps``: merged, else DMD, else trajectory guidance."""
    folder = b.path("students", f"step{steps}")
    for name in ("merged", "dmd", "pretrain"):
        if (folder / f"{name}.safetensors").exists():
            return folder / f"{name}.safetensors"
    raise FileNotFoundError(f"no {steps}-step student in {folder}; run the student stages first")


def best_student(b: Build, steps: int = 4) -> tuple[Path, str | None]:
    """The demo's student (issue 6 item 5): of the quality table's one-checkpoint student rows at ``steps`` with
    T5 on, the one with the lowest mean unpaired FD_T (its training seed ``preset.seed``); ``(path, row key)``. Without a
    table (a build stopped before it), :func:`final_student` and None."""
    table = b.path("quality", "table.json")
    if not table.exists():
        return final_student(b, steps), None
    from .quality import table_rows

    checkpoints = {r.key: r.checkpoints[0] for r in table_rows(b.out)
                   if not r.reference and r.boundary is None and r.checkpoints and "teacher" not in r.key}
    rows = [r for r in json.loads(table.read_text())["rows"]
            if r["key"] in checkpoints and r["steps"] == steps and r["t5"]]
    if not rows:
        return final_student(b, steps), None
    metric = "fd_t_unpaired" if all("fd_t_unpaired" in r["metrics"] for r in rows) else "fd_t"  # older tables
    best = min(rows, key=lambda r: sum(r["metrics"][metric]) / len(r["metrics"][metric]))
    return Path(checkpoints[best["key"]]), best["key"]


def stage_demo(b: Build) -> dict:
    """The demo folder: the best 4-step student (:func:`best_student`) with its encoders and VAE in one official
    single file (with the student's metadata and the build's provenance), the tokenizer folder, and a sample made
    through it."""
    from ...flash_core.pipeline import FlashPipeline

    source, row = best_student(b, 4)
    files = index_checkpoint(source)
    meta = FlashMetadata.from_safetensors(files.metadata, str(source))
    meta.training = {**(meta.training or {}), "source": str(source.relative_to(b.out)),
                     "toyworld_preset": b.preset.name, "seed": b.preset.seed, "table_row": row}
    folder = b.path("demo")
    parts = {c: component_state_dict(files, c) for c in ("mmdit", "vae", "clip_l", "clip_g", "t5") if files.has(c)}
    tokenizers = written_tokenizer_metadata(source, files.metadata, b.path("tokenizers"))  # they travel with it
    path = save_checkpoint(folder / DEMO_FILE_NAME, metadata=meta, extra_metadata=tokenizers, **parts)
    shutil.copytree(b.path("tokenizers"), folder / "tokenizers", dirs_exist_ok=True)
    pipe = FlashPipeline.from_checkpoint(path, tokenizers=folder / "tokenizers", device="cpu", dtype="fp32")
    image = pipe(DEMO_PROMPT, steps=4, seed=0, width=world.IMAGE_SIZE, height=world.IMAGE_SIZE, progress=False)[0]
    image.resize((128, 128), 0).save(folder / "sample.png")
    return {"source": str(source.relative_to(b.out)), "table_row": row,
            "megabytes": round(path.stat().st_size / 2**20, 2),
            "files": [f"demo/{DEMO_FILE_NAME}", "demo/tokenizers", "demo/sample.png"]}


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` whole or not at all, with the umask's permissions (flash_core/atomic.py)."""
    from ...flash_core.atomic import atomic_write

    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def prompt_guide(text_length: int) -> list[str]:
    """The model card's "Prompts it understands": the caption grammar (:mod:`.world`) and the tokenizer's
    vocabulary (:func:`.world.vocabulary`, the words of ``tokenizers/*/tokenizer.json``), written from the code so
    that a rebuild keeps them true."""
    single = f"a {world.COLOURS[0]} {world.SHAPES[0]} {world.POSITION_PHRASES['center']}"
    sized = f"a {world.SIZES[1]} {world.COLOURS[4]} {world.SHAPES[1]} {world.POSITION_PHRASES['top']}"
    pair = f"a {world.COLOURS[0]} {world.SHAPES[0]} {world.RELATIONS['horizontal'][0]} a {world.COLOURS[4]} " \
           f"{world.SHAPES[1]}"
    relations = [r for pair_ in world.RELATIONS.values() for r in pair_]
    words = world.vocabulary()
    return [
        "## Prompts it understands", "",
        "Its text encoders and MM-DiT learned one small caption grammar, read by a word-level tokenizer:",
        "",
        f"* one object: `a [{' | '.join(world.SIZES)}] <colour> <shape> <position>`, e.g. \"{single}\", "
        f"\"{sized}\";",
        f"* two objects: `a <colour> <shape> <relation> a <colour> <shape>`, e.g. \"{pair}\".", "",
        f"Colours: {', '.join(world.COLOURS)}. Shapes: {', '.join(world.SHAPES)}. Positions: "
        f"{', '.join(world.POSITION_PHRASES.values())}. Relations: {', '.join(relations)}.", "",
        f"Vocabulary ({len(words)} words; text is lower-cased): {', '.join(words)}. Any other word, and any "
        "punctuation, is the tokenizer's unknown token: `sd35-flash generate` and `FlashPipeline` warn, naming it. "
        f"Token rows are {text_length} long (start, up to {text_length - 2} words, end), for CLIP and T5 alike.", "",
    ]


def build_command(b: Build) -> str:
    """The command line that made this build: its preset, and the given teacher and seed count when used."""
    command = f"python -m sd35_flash.training.toyworld --preset {b.preset.name}"
    given = b.record.get("stages", {}).get("teacher", {}).get("from_teacher")
    if given:
        command += f" --from-teacher {given}"
    if b.preset.name in PRESETS and b.preset.seeds != PRESETS[b.preset.name].seeds:
        command += f" --seeds {b.preset.seeds}"
    return command


def model_card(b: Build) -> str:
    """``demo/README.md``: what the demo model is, how it was made, how it measures (when the build has its
    quality table) and which prompts it understands (:func:`prompt_guide`)."""
    demo = b.record["stages"]["demo"]
    stages = b.record["stages"]
    minutes = sum(r["seconds"] for r in stages.values()) / 60
    lines = [
        "# The SD3.5-Flash demo model (toy world)", "",
        f"A {demo['megabytes']} MB single-file checkpoint in the official layout: a 4-step MM-DiT-X student, its "
        "tiny CLIP-L / CLIP-G / T5-shaped text encoders, its one-level SD3 VAE, and the word-level tokenizer in "
        "`tokenizers/`. It draws 16 px scenes of the toy world (`training/toyworld/`): shapes in six colours, "
        "sizes, positions and relations on textured backgrounds. It exists so the pack runs with no download.", "",
        f"Made by `{build_command(b)} --install-demo` "
        f"(seed {b.preset.seed}; {minutes:.1f} min of stages on a 2-core CPU); the student is "
        f"`{demo['source']}` of that build, the 4-step student with the lowest unpaired FD_T in its quality "
        "table. "
        f"`sample.png`: \"{DEMO_PROMPT}\", 4 steps, seed 0, scaled 8x.", "",
    ]
    table = b.path("quality", "table.json")
    if table.exists():
        rows = {r["key"]: r for r in json.loads(table.read_text())["rows"]}
        key = demo.get("table_row")
        if key in rows:
            m = rows[key]["metrics"]
            mean = lambda k: sum(m[k]) / len(m[k])  # noqa: E731
            seeds = len(m["fd_t"])
            trained = (f"the mean of its {seeds} training seeds, this file being the first" if seeds > 1
                       else "one training seed")
            lines += [f"Quality (the README's toy-world table, row `{rows[key]['label']}`, 4 model calls; "
                      f"{trained}): FD_T "
                      f"{mean('fd_t'):.2f}"
                      + (f" (unpaired {mean('fd_t_unpaired'):.2f})" if "fd_t_unpaired" in m else "")
                      + f", paired MSE {mean('paired_mse'):.4f}, FD to real images "
                      f"{mean('fd_real'):.2f}, all attributes right {100 * mean('acc_all'):.1f} %.", ""]
    lines += prompt_guide(b.preset.text_length)
    return "\n".join(lines)


def install_demo(b: Build, dest: str | Path | None = None) -> Path:
    """Copy the build's demo (checkpoint, tokenizers, sample) into ``dest`` (default:
    :data:`~flash_core.demo.DEMO_FOLDER`), each file through a temporary name, with a model card; returns the
    installed checkpoint."""
    dest = Path(dest) if dest is not None else DEMO_FOLDER
    source = b.path("demo")
    if "demo" not in b.record.get("stages", {}) or not (source / DEMO_FILE_NAME).exists():
        raise FileNotFoundError(f"{source / DEMO_FILE_NAME}: the build has no demo yet; run it through the demo stage")
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        _copy_atomic(path, dest / path.relative_to(source))
    (dest / "README.md").write_text(model_card(b))
    return dest / DEMO_FILE_NAME


def teacher_card(b: Build, checkpoint: Path) -> str:
    """``README.md`` beside an installed teacher: what it is, the recipe and wall time that made it, what it
    draws (the build's probe), its SHA-256, how to rebuild the students from it, and the prompts it knows."""
    record = b.record["stages"]["teacher"]
    recipe = teacher_config(b)["teacher"]
    probe = record.get("probe", {})
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    optim = {**recipe.get("optim", {})}
    lines = [
        "# The toy world's teacher", "",
        f"A {checkpoint.stat().st_size / 2**20:.1f} MB single-file checkpoint in the official layout: the MM-DiT-X "
        "teacher of the toy world (`training/toyworld/`, docs/toyworld.md \"Teacher\"), with the frozen tiny "
        "CLIP-L / CLIP-G / T5-shaped text encoders and one-level SD3 VAE it was trained on, and the word-level "
        "tokenizers in its metadata. The demo model and the README's quality table are distilled from it:", "",
        f"    python -m sd35_flash.training.toyworld --preset full --from-teacher {TEACHER_FOLDER.name}/"
        f"{TEACHER_FILE_NAME} --out toyworld_build", "",
        f"SHA-256 `{digest}`.", "",
        "## How it was made", "",
        f"`python -m sd35_flash.training.toyworld --preset {b.preset.name} --install-teacher` (seed "
        f"{b.preset.seed}), its `teacher` stage: {recipe.get('iterations')} iterations, batch "
        f"{recipe.get('batch_size')}, {recipe.get('dataset_size')} scenes, depth {recipe.get('depth')}, hidden "
        f"{recipe.get('hidden_size')}, patch {recipe.get('patch_size', 2)}, training sigmas `sigmoid(N("
        f"{recipe.get('logit_normal_mean', 0.0)}, {recipe.get('logit_normal_std', 1.0)}))`, AdamW lr "
        f"{optim.get('lr')} ({optim.get('schedule', 'constant')}, warm-up {optim.get('warmup_steps', 0)}), "
        + (f"shape-region loss weight {recipe['region_weight']:g}, " if recipe.get("region_weight") else "")
        + f"EMA {recipe.get('ema_decay', 0.999)}, on {record.get('workers', 1)} "
        f"{'process' if record.get('workers', 1) == 1 else 'processes'} of one thread: "
        f"{record.get('training_seconds', record['seconds']) / 60:.1f} min on a 2-core CPU.", "",
    ]
    if probe:
        names = [k for k in probe if k not in ("fd_real", "floor")]
        lines += ["## What it draws", "",
                  "32 Euler steps, CFG 2 against the empty prompt, on the evaluation prompts (held out from the "
                  f"distillation prompts), {b.preset.teacher_probe_samples} samples read by the build's evaluator:",
                  "", "| " + " | ".join(names) + " | FD to real images |", "|---" * (len(names) + 1) + "|",
                  "| " + " | ".join(f"{100 * probe[k]:.0f} %" for k in names)
                  + f" | {probe['fd_real']:.1f} (real-vs-real floor {probe['floor']:.1f}) |", ""]
    curve = record.get("curve")  # {iteration: probe} of the run's saved states (benchmarks/teacher_curve.py)
    if curve:
        names = [k for k in next(iter(curve.values())) if k not in ("fd_real", "floor")]
        lines += ["Along the run (the EMA of each saved state, `benchmarks/teacher_curve.py`):", "",
                  "| iteration | " + " | ".join(names) + " | FD real |", "|---" * (len(names) + 2) + "|"]
        lines += [f"| {it} | " + " | ".join(f"{100 * row[k]:.0f} %" for k in names) + f" | {row['fd_real']:.1f} |"
                  for it, row in curve.items()]
        lines.append("")
    if record.get("note"):
        lines += [record["note"], ""]
    lines += prompt_guide(b.preset.text_length)
    return "\n".join(lines)


def install_teacher(b: Build, dest: str | Path | None = None) -> Path:
    """Copy the build's teacher into ``dest`` (default: :data:`TEACHER_FOLDER`, the repository's shipped
    teacher) through a temporary name, with its model card (:func:`teacher_card`); returns the checkpoint."""
    dest = Path(dest) if dest is not None else TEACHER_FOLDER
    source = b.path("teacher", "teacher.safetensors")
    if "teacher" not in b.record.get("stages", {}) or not source.exists():
        raise FileNotFoundError(f"{source}: the build has no teacher yet; run it through the teacher stage")
    if "from_teacher" in b.record["stages"]["teacher"]:
        raise ValueError(f"{source}: this build was given its teacher (--from-teacher); install it from the "
                         "build that trained it, whose recipe its model card states")
    target = dest / TEACHER_FILE_NAME
    _copy_atomic(source, target)
    atomic_write(dest / "README.md", lambda tmp: tmp.write_text(teacher_card(b, target)))
    return target


# The preset settings each stage's outputs depend on (besides the stages before it): what --resume compares.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "world": ("seed", "prompts"), "tokenizer": ("text_length",), "encoders": ("from_teacher",), "vae": ("vae",),
    "evaluator": ("classifier",),
    "teacher": ("teacher", "teacher_dropout", "teacher_probe_samples"), "teacher_data": ("data",),
    "pretrain": ("train", "pretrain", "student_steps"), "dmd": ("dmd", "dmd_steps"), "split": ("split",),
    "variants": ("readings", "fake_samples", "reading_dmd", "anchor_control", "seeds"), "table": ("eval_samples",),
}

STAGES: dict[str, Callable[[Build], dict]] = {
    "world": stage_world, "tokenizer": stage_tokenizer, "encoders": stage_encoders, "vae": stage_vae,
    "evaluator": stage_evaluator, "teacher": stage_teacher, "teacher_data": stage_teacher_data,
    "pretrain": stage_pretrain, "dmd": stage_dmd, "split": stage_split, "variants": stage_variants,
    "table": stage_table, "demo": stage_demo,
}


def build(out: str | Path, preset: str | Preset = "ci", progress: bool = True, resume: bool = False,
          until: str | None = None, log: Callable[[str], None] = print, seeds: int | None = None,
          install: str | Path | bool | None = None, from_teacher: str | Path | None = None,
          install_teacher_to: str | Path | bool | None = None) -> dict:
    """Run the stages in order (up to and including ``until``); returns ``build.json``'s record: per stage its
    wall time in seconds and what it wrote. ``seeds`` overrides the preset's training seeds of the variants.
    ``install`` (True: the package's ``demo/``; or a folder) copies the finished demo there (:func:`install_demo`);
    ``install_teacher_to`` (True: :data:`TEACHER_FOLDER`; or a folder) the teacher (:func:`install_teacher`).
    ``from_teacher``: a teacher checkpoint (the shipped one, or a build's) whose MM-DiT, VAE and text encoders
    the build takes instead of training them (:func:`given_teacher` checks it first)."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    teacher_file = None
    if from_teacher is not None:
        teacher_file = Path(from_teacher)
        given_teacher(teacher_file)
        digest = hashlib.sha256(teacher_file.read_bytes()).hexdigest()
        preset = replace(preset, from_teacher=digest)
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"seeds: expected a positive integer, got {seeds}")
        preset = replace(preset, seeds=seeds)
    if until is not None and until not in STAGES:
        raise ValueError(f"until: '{until}' is not a stage; stages: {', '.join(STAGES)}")
    b = Build(Path(out), preset, progress, resume, teacher_file=teacher_file)
    b.out.mkdir(parents=True, exist_ok=True)
    b.load_record(log)
    names = list(STAGES)[:list(STAGES).index(until) + 1] if until else list(STAGES)
    total = time.perf_counter()
    for i, name in enumerate(names, 1):
        if name in b.record["stages"]:
            log(f"[{i}/{len(names)}] {name}: done before ({b.record['stages'][name]['seconds']:.1f} s), skipped")
            continue
        log(f"[{i}/{len(names)}] {name} ...")
        tic = time.perf_counter()
        result = STAGES[name](b)
        result["seconds"] = round(time.perf_counter() - tic, 2)
        b.record["stages"][name] = result
        b.save_record()
        log(f"[{i}/{len(names)}] {name}: {result['seconds']:.1f} s")
    b.record["seconds_this_run"] = round(time.perf_counter() - total, 2)
    b.save_record()
    if install_teacher_to:
        path = install_teacher(b, None if install_teacher_to is True else install_teacher_to)
        log(f"teacher installed: {path}")
    if install:
        path = install_demo(b, None if install is True else install)
        log(f"demo model installed: {path}")
    log("wall time per stage: " + ", ".join(f"{n} {r['seconds']:.1f} s" for n, r in b.record["stages"].items())
        + f"; total this run {b.record['seconds_this_run']:.1f} s")
    return b.record
