"""Training nodes: the distillation of :mod:`..training` inside ComfyUI, step by step in a graph.

Flash Distillation Setup -> Flash Teacher Data -> Flash Trajectory Pre-training -> Flash DMD -> Flash Split
Fine-tune (merges) -> Save Flash Checkpoint. The nodes pass a ``FLASH_TRAINING`` value (the training config,
whose run folder holds the data, states and stage outputs) and return each stage's student as a native MODEL to
sample right away. They run the same entry points as ``sd35-flash-train``: ComfyUI's progress bar and Cancel work
(a Cancel saves the last finished step; ``resume`` continues from it), loss values stream to the chart in
web/js/train_chart_ext.js, and preview grids appear on the node.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
from pathlib import Path

import torch

from ..flash_core.atomic import TEMP_SUFFIX, atomic_write, remove_stale_temps
from ..flash_core.checkpoint import FlashMetadata, index_checkpoint
from ..training.config import Config, config_from_dict
from . import loaders, path_policy
from .loaders import full_path
from .path_policy import OUTPUT_PLACE, SUFFIX, UnsafePathError
from .schema import UNIQUE_ID, combo, config_widget, inputs, outputs

CATEGORY = "SD3.5 Flash/training"
PROGRESS_EVENT = "sd35_flash.train_progress"
# Widget maxima where training/config.py sets none (ComfyUI wants finite bounds); the config's own bounds, defaults
# and choices are the widgets' (nodes/schema.config_widget).
MAX_ITERATIONS = 1_000_000
MAX_LR = 1.0
MAX_SAMPLES_PER_PROMPT = 100_000
MAX_BATCH_SIZE = 1024
MAX_FAKE_UPDATES = 100
MAX_TRAJECTORY_WEIGHT = 1000.0
MERGE_ALPHA = config_widget("split.merge_alpha", step=0.01,
                            tooltip="Merged = alpha * high branch + (1 - alpha) * low branch.")
RESUME = {"default": False,
          "tooltip": "Continue from the newest saved state of this stage in the run folder (after a Cancel, say)."}
RUNS = "sd35_flash"  # runs go to <ComfyUI output>/sd35_flash/<run_name>
RUNS_PLACE = f"ComfyUI's output/{RUNS} folder"
CHECKPOINTS_PLACE = "ComfyUI's models/checkpoints folder"
MODEL_KINDS = ("checkpoints", "diffusion_models", "text_encoders")  # the kinds config_toml's model keys name
LEDGER = "saved_checkpoints.json"  # in the run folder: the files Save Flash Checkpoint wrote for this run
MAX_FILENAME_BYTES = 200  # the saved name, with its temporary name's 27 more, fits a file system's 255


def _send(node_id, payload: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    if node_id is not None and getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_sync(PROGRESS_EVENT, {"node": str(node_id), **payload})


def run_folder(name: str) -> Path:
    """``<ComfyUI output>/sd35_flash/<name>`` (links followed), refusing names that would leave it."""
    import folder_paths

    path_policy.plain_name(name, "run_name", RUNS_PLACE)
    return path_policy.inside(folder_paths.get_output_directory(), name, "run_name", OUTPUT_PLACE, under=RUNS)


def comfy_folders() -> dict:
    """ComfyUI's folders, as :func:`.path_policy.confine_config` takes them."""
    import folder_paths

    return {"models": {kind: folder_paths.get_folder_paths(kind) for kind in MODEL_KINDS},
            "input_dir": folder_paths.get_input_directory(), "output_dir": folder_paths.get_output_directory()}


def checked_run(training) -> Path:
    """The run folder of ``training`` (links followed), which must be a config from Flash Distillation Setup
    whose run folder is inside ComfyUI's output folder (a FLASH_TRAINING input can also be given as a value)."""
    import folder_paths

    if not isinstance(training, Config):
        raise TypeError(f"training must be linked from Flash Distillation Setup (FLASH_TRAINING), "
                        f"not given as a {type(training).__name__} value")
    output = folder_paths.get_output_directory()
    out = Path(training.train.out)
    if not out.is_absolute() or not path_policy.is_inside(out, output) or path_policy.is_inside(output, out):
        raise UnsafePathError(f"training: the run folder {path_policy.show(str(out))} must stay inside "
                              f"{OUTPUT_PLACE}")
    return out.resolve()


def save_native_model(model, path: Path) -> Path:
    """A native MODEL's MM-DiT (LoRA and other patches applied) as an official-layout file."""
    import comfy.model_management

    from ..flash_core.checkpoint import save_checkpoint

    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    state = {k: v.detach().float().cpu() for k, v in model.model.diffusion_model.state_dict().items()}
    return save_checkpoint(path, mmdit=state)


def _with(config: Config, **sections) -> Config:
    """A copy of ``config`` with some fields of some sections replaced (upstream outputs are never changed)."""
    changes = {name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()}
    return dataclasses.replace(config, **changes)


def _native_model(path: Path):
    from .native import build_model

    files = index_checkpoint(path)
    return build_model(files, "auto", FlashMetadata.from_safetensors(files.metadata, str(path)))


def run_stage(config: Config, stage: str, resume: bool, node_id) -> Path:
    """Run one training stage with ComfyUI's progress bar (an interrupt point), chart events and previews."""
    import comfy.model_management
    import comfy.utils

    from ..training.distributed import World
    from ..training.trainer import Trainer

    bar = comfy.utils.ProgressBar(1)

    def on_step(stage_name, step, total, values):
        bar.update_absolute(step, total)
        _send(node_id, {"stage": stage_name, "step": step, "total": total,  # NaN is not JSON: None instead
                        "values": {k: float(v) if math.isfinite(v) else None for k, v in values.items()}})

    def on_preview(stage_name, step, image):
        bar.update_absolute(step, None, ("PNG", image, 512))

    _send(node_id, {"stage": stage, "step": 0, "total": 0, "values": {}})
    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs prompts under inference_mode
        trainer = Trainer(config, World(), progress=True, on_step=on_step)
        trainer.on_preview = on_preview
        trainer.interrupts = (KeyboardInterrupt, comfy.model_management.InterruptProcessingException)
        # resume off starts the stage over: an earlier run's states are moved aside (run folder's replaced/), not lost
        return trainer.run(stage, resume, overwrite=not resume)


# ------------------------------------------------------------------------------------------------ nodes


class FlashTrainSetup:
    """The run: teacher, prompts, sizes, student steps; optional student MODEL and TOML overrides."""

    NODE_TYPE = "SD35FlashTrainSetup"
    INPUT_TYPES = inputs(
        NODE_TYPE,
        teacher=combo(lambda: loaders.filenames("checkpoints"),
                      tooltip="The teacher: an SD3.5 single file with its text encoders and VAE "
                              "(models/checkpoints)."),
        prompts={"multiline": True, "default": "a red circle at the top left\na blue square at the bottom right",
                 "tooltip": "Training prompts, one per line."},
        run_name={"default": "flash_run",
                  "tooltip": "Folder under output/sd35_flash/ for data, states, logs and outputs."},
        student_steps=config_widget("student.steps", tooltip="Distil a 4-step or a 2-step student."),
        width=config_widget("data.width", tooltip="Training image width in pixels."),
        height=config_widget("data.height", tooltip="Training image height in pixels."),
        samples_per_prompt=config_widget("data.samples_per_prompt", cap=MAX_SAMPLES_PER_PROMPT,
                                         tooltip="Teacher samples per prompt (different seeds)."),
        batch_size=config_widget("train.batch_size", cap=MAX_BATCH_SIZE, tooltip="Images per training step."),
        # it sets data.seed too, whose range holds train.seed's
        seed=config_widget("train.seed", tooltip="Seed for the teacher noise and every training draw."),
        student_init={"tooltip": "Start the student from this MODEL (LoRA applied) instead of the teacher, e.g. "
                                 "SD3.5 Medium under a Large teacher."},
        config_toml={"multiline": True, "default": "",
                     "tooltip": "Any other setting as TOML, as in an sd35-flash-train config, e.g. "
                                "'[dropout]\\nt5 = 0.2'. Overrides the widgets. Paths are names inside ComfyUI's "
                                "folders: [model] teacher, student_init and [teacher] components in "
                                "models/checkpoints, [model] tokenizers in models/text_encoders, [data] prompts and "
                                "[teacher] dataset in input/, [train] out in output/, [data] dir in the run folder."},
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)
    OUTPUT_TOOLTIPS = ("The run's settings, for the stage nodes.",)
    FUNCTION = "setup"
    CATEGORY = CATEGORY
    DESCRIPTION = "Sets up an SD3.5-Flash distillation run (the same config as sd35-flash-train)."

    def setup(self, teacher, prompts, run_name, student_steps, width, height, samples_per_prompt, batch_size, seed,
              student_init=None, config_toml=""):
        """Everything is checked (paths: :mod:`.path_policy`) before the run folder is made or written."""
        for name, value in (("prompts", prompts), ("config_toml", config_toml)):
            if not isinstance(value, str):
                raise ValueError(f"{name} must be text, got {type(value).__name__}")
        out = run_folder(run_name)
        extra = path_policy.confine_config(_parse_toml(config_toml), run=out, **comfy_folders())
        toml_model, toml_data, toml_train = (extra.get(k) if isinstance(extra.get(k), dict) else {}
                                             for k in ("model", "data", "train"))
        if isinstance(toml_train.get("out"), str):  # [train] out, confined to ComfyUI's output folder
            out = Path(toml_train["out"])
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not lines and "prompts" not in toml_data:
            raise ValueError("prompts is empty: give at least one prompt, one per line")
        data = {
            "model": {} if "teacher" in toml_model else
                     {"teacher": str(full_path(teacher, "checkpoints", widget="teacher"))},
            "data": {"prompts": str(out / "prompts.txt"), "width": width, "height": height,
                     "samples_per_prompt": samples_per_prompt, "seed": seed},
            "student": {"steps": int(student_steps)},
            "train": {"out": str(out), "batch_size": batch_size, "seed": seed},
        }
        for section, values in extra.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
        if student_init is not None and isinstance(data["model"], dict):
            data["model"]["student_init"] = str(out / "student_init.safetensors")
        config = config_from_dict(data, "Flash Distillation Setup")
        out.mkdir(parents=True, exist_ok=True)
        if "prompts" not in toml_data:
            atomic_write(out / "prompts.txt", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
        if student_init is not None:
            save_native_model(student_init, Path(config.model.student_init))
        return (config,)


def _parse_toml(text: str) -> dict:
    """``config_toml``'s tables (empty text: none)."""
    from ..training.config import ConfigError, tomllib

    if not text.strip():
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config_toml is not valid TOML: {e}") from None


def _stage_inputs(node_type: str, iterations: str, lr: str, **extra) -> classmethod:
    """A stage node's ``INPUT_TYPES``: the run, the config keys ``iterations`` and ``lr`` (the student's AdamW),
    ``extra``, resume."""
    return inputs(
        node_type, hidden=UNIQUE_ID,
        training={"tooltip": "From Flash Distillation Setup or the previous stage."},
        iterations=config_widget(iterations, cap=MAX_ITERATIONS, tooltip="Training steps."),
        lr=config_widget(lr, cap=MAX_LR, step=1e-6, round=False, tooltip="AdamW learning rate of the student."),
        resume=RESUME, **extra)


class _StageNode:
    OUTPUT_TOOLTIPS = ("The run, for the next stage.", "This stage's student as a native MODEL, to sample now.")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    STAGE = ""

    def _run(self, config: Config, resume: bool, unique_id):
        path = run_stage(config, self.STAGE, resume, unique_id)
        return config, _native_model(path)


class FlashTrainData:
    """Stage 0: the teacher's samples for every prompt (resumable shards)."""

    NODE_TYPE = "SD35FlashTrainData"
    INPUT_TYPES = inputs(
        NODE_TYPE, hidden=UNIQUE_ID,
        training={"tooltip": "From Flash Distillation Setup."},
        teacher_steps=config_widget("data.teacher_steps", tooltip="Teacher Euler steps."),
        teacher_cfg=config_widget("data.teacher_cfg", step=0.1, tooltip="The teacher's guidance scale."),
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)
    OUTPUT_TOOLTIPS = ("The run, with its teacher data made.",)
    FUNCTION = "make"
    CATEGORY = CATEGORY
    DESCRIPTION = "Generates the teacher samples (noise, trajectory at the student sigmas, conditioning with and " \
                  "without T5) that the training stages learn from."

    def make(self, training: Config, teacher_steps: int, teacher_cfg: float, unique_id=None):
        checked_run(training)
        import comfy.utils

        from ..training.data import make_teacher_data, teacher_pipeline

        config = _with(training, data={"teacher_steps": teacher_steps, "teacher_cfg": teacher_cfg})
        bar = comfy.utils.ProgressBar(1)
        make_teacher_data(config, teacher_pipeline(config), progress=True,
                          callback=lambda done, total: bar.update_absolute(done, total))
        return (config,)


class FlashTrainPretrain(_StageNode):
    """Stage A: trajectory-guidance pre-training."""

    STAGE = "pretrain"
    DESCRIPTION = "Stage A: the student learns the teacher's trajectory segment by segment."
    NODE_TYPE = "SD35FlashTrainPretrain"
    INPUT_TYPES = _stage_inputs(NODE_TYPE, "pretrain.iterations", "pretrain.optim.lr",
                                loss=config_widget("pretrain.loss", tooltip="Segment-matching loss."))
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)

    def train(self, training: Config, iterations: int, lr: float, loss: str, resume: bool, unique_id=None):
        checked_run(training)
        config = _with(training, pretrain={"iterations": iterations, "loss": loss,
                                           "optim": dataclasses.replace(training.pretrain.optim, lr=lr)})
        return self._run(config, resume, unique_id)


class FlashTrainDMD(_StageNode):
    """Stage B: DMD with timestep sharing."""

    STAGE = "dmd"
    DESCRIPTION = "Stage B: distribution matching with timestep sharing (or the re-noise baseline)."
    NODE_TYPE = "SD35FlashTrainDMD"
    INPUT_TYPES = _stage_inputs(
        NODE_TYPE, "dmd.iterations", "dmd.optim.lr",
        score_sample=config_widget("dmd.score_sample",
                                   tooltip="Where the scores are read: the student's next trajectory point (timestep "
                                           "sharing), its current point, or a re-noised x0 (DMD2 baseline)."),
        real_cfg=config_widget("dmd.real_cfg", step=0.1, tooltip="Guidance of the teacher's (real) score."),
        fake_updates_per_step=config_widget("dmd.fake_updates_per_step", cap=MAX_FAKE_UPDATES,
                                            tooltip="Fake-score updates per student update."),
        trajectory_weight=config_widget("dmd.trajectory_weight", cap=MAX_TRAJECTORY_WEIGHT, step=0.1,
                                        tooltip="Weight of the Stage-A loss kept as an anchor."),
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)

    def train(self, training: Config, iterations: int, lr: float, score_sample: str, real_cfg: float,
              fake_updates_per_step: int, trajectory_weight: float, resume: bool, unique_id=None):
        checked_run(training)
        config = _with(training, dmd={
            "iterations": iterations, "score_sample": score_sample, "real_cfg": real_cfg,
            "fake_updates_per_step": fake_updates_per_step, "trajectory_weight": trajectory_weight,
            "optim": dataclasses.replace(training.dmd.optim, lr=lr)})
        return self._run(config, resume, unique_id)


class FlashTrainSplit(_StageNode):
    """Stage C: split-timestep fine-tuning of two branches with EMA, then the merge."""

    STAGE = "split"
    DESCRIPTION = "Stage C: two branches fine-tuned on high / low noise steps, merged into one student."
    NODE_TYPE = "SD35FlashTrainSplit"
    INPUT_TYPES = _stage_inputs(
        NODE_TYPE, "split.iterations", "dmd.optim.lr",  # the split stage trains with [dmd] optim
        boundary=config_widget("split.boundary", step=1.0,
                               tooltip="Model timestep (1000 * sigma) between the branches."),
        merge_alpha=MERGE_ALPHA,
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)

    def train(self, training: Config, iterations: int, lr: float, boundary: float, merge_alpha: float,
              resume: bool, unique_id=None):
        checked_run(training)
        config = _with(training, split={"iterations": iterations, "boundary": boundary, "merge_alpha": merge_alpha},
                       dmd={"optim": dataclasses.replace(training.dmd.optim, lr=lr)})
        return self._run(config, resume, unique_id)


class FlashTrainMerge(_StageNode):
    """Re-merge the saved branches with another alpha (no training)."""

    STAGE = "merge"
    DESCRIPTION = "Merges the split stage's branch EMAs again with another alpha."
    NODE_TYPE = "SD35FlashTrainMerge"
    INPUT_TYPES = inputs(NODE_TYPE, hidden=UNIQUE_ID, training={"tooltip": "A run whose split stage has finished."},
                         merge_alpha=MERGE_ALPHA)
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)

    def train(self, training: Config, merge_alpha: float, unique_id=None):
        checked_run(training)
        return self._run(_with(training, split={"merge_alpha": merge_alpha}), False, unique_id)


OUTPUTS = {"merged": "merged", "dmd": "dmd", "pretrain": "pretrain"}


class FlashTrainSave:
    """Copy a stage's student checkpoint into models/checkpoints, where the Flash loader lists it: as a new
    numbered file (ComfyUI's filename_prefix counter), never over a file this run did not write."""

    NODE_TYPE = "SD35FlashTrainSave"
    INPUT_TYPES = inputs(
        NODE_TYPE,
        training={"tooltip": "The run."},
        stage=combo(["latest", *OUTPUTS], tooltip="Which student: the newest stage output, or a named one."),
        filename={"default": "sd35_flash_student",
                  "tooltip": "Name prefix in models/checkpoints: saved as NAME_00001_.safetensors, the next free "
                             "number (as Save Image numbers files)."},
        # optional (in the table): API prompts saved before this input existed still run
        overwrite={"default": False,
                   "tooltip": "Save as NAME.safetensors exactly, replacing it only when this run saved it before "
                              "(never another model); off: a new numbered file."},
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)
    OUTPUT_TOOLTIPS = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves the distilled student (with the teacher's text encoders and VAE, and our metadata)."

    def save(self, training: Config, stage: str, filename: str, overwrite: bool = False):
        import folder_paths

        run = checked_run(training)
        if stage not in ("latest", *OUTPUTS):
            raise ValueError(f"stage must be one of latest, {', '.join(OUTPUTS)}, got {path_policy.show(stage)}")
        if not isinstance(overwrite, bool):
            raise ValueError(f"overwrite must be true or false, got {path_policy.show(overwrite)}")
        prefix = save_prefix(filename)
        source = stage_output(run, stage)
        roots = [Path(p) for p in folder_paths.get_folder_paths("checkpoints")]
        if not roots:
            raise FileNotFoundError("ComfyUI has no models/checkpoints folder to save into")
        if overwrite:
            target = replace_own(source, roots, prefix, run)
        else:
            target = copy_new(source, roots[0], prefix, taken=lambda name: any(os.path.lexists(r / name)
                                                                               for r in roots))
        record_save(run, target)
        return {"ui": {"text": [f"saved {source.name} as {target}"]}}


def save_prefix(filename) -> str:
    """The ``filename`` widget as a plain name without ``.safetensors``, or one sentence naming it."""
    name = filename.removesuffix(SUFFIX) if isinstance(filename, str) else filename
    path_policy.plain_name(name, "filename", CHECKPOINTS_PLACE)
    if len(os.fsencode(name)) > MAX_FILENAME_BYTES:
        raise UnsafePathError(f"filename {path_policy.show(name)} is longer than {MAX_FILENAME_BYTES} bytes")
    return name


def stage_output(run: Path, stage: str) -> Path:
    """The student file of ``stage`` (``latest``: the newest stage's) in the run folder, which it must not leave."""
    names = list(OUTPUTS.values()) if stage == "latest" else [OUTPUTS[stage]]
    source = next((run / f"{n}{SUFFIX}" for n in names if (run / f"{n}{SUFFIX}").is_file()), None)
    if source is None:
        raise FileNotFoundError(f"no {stage} output in '{run}': run that stage first")
    if not path_policy.is_inside(source, run):
        raise UnsafePathError(f"stage: '{source}' leads out of the run folder through a symbolic link")
    return source.resolve()


def _identity(path: Path) -> dict | None:
    """What tells a file from its replacement: device, inode, size and modification time (not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return {"device": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def saved_by_run(run: Path) -> dict[str, dict]:
    """The run's record of the files Save Flash Checkpoint wrote (path -> :func:`_identity`); empty if none or
    unreadable (then nothing counts as the run's own)."""
    try:
        data = json.loads((run / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def record_save(run: Path, target: Path) -> None:
    """Add ``target``, as it is now, to the run's record (written whole)."""
    ledger = {**saved_by_run(run), str(target): _identity(target)}
    atomic_write(run / LEDGER, lambda tmp: tmp.write_text(json.dumps(ledger, indent=1) + "\n", encoding="utf-8"))


def replace_own(source: Path, roots: list[Path], prefix: str, run: Path) -> Path:
    """``overwrite``: ``prefix.safetensors`` in the first checkpoints folder, made new, or replaced only when it
    is the very file this run saved there (a file of that name in another checkpoints folder is never shadowed)."""
    name = f"{prefix}{SUFFIX}"
    target = roots[0] / name
    others = [r / name for r in roots[1:] if os.path.lexists(r / name) and r.resolve() != roots[0].resolve()]
    current = _identity(target)
    if others or (current is not None and saved_by_run(run).get(str(target)) != current):
        raise UnsafePathError(f"filename {path_policy.show(prefix)}: '{others[0] if others else target}' exists and "
                              f"run '{run.name}' did not write it; overwrite replaces only this run's own saves "
                              "(choose another filename, or turn overwrite off for a new numbered file)")
    if current is None:
        return copy_new(source, roots[0], prefix, fixed=name)
    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))  # whole or not at all


def copy_new(source: Path, folder: Path, prefix: str, fixed: str | None = None, taken=os.path.lexists) -> Path:
    """Copy ``source`` whole into ``folder`` under a name no file has: ``fixed``, else the next numbered
    ``prefix_NNNNN_.safetensors`` (:func:`.path_policy.numbered_name`) that ``taken`` (a name -> bool) allows.
    The copy is made under a temporary name (atomic_write's, swept when stale) and then hard-linked to its name,
    which fails rather than replace a file that appeared meanwhile."""
    stem = folder / f"{prefix}{SUFFIX}"
    remove_stale_temps(stem)
    staging = atomic_write(folder / f".{stem.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}",
                           lambda tmp: shutil.copyfile(source, tmp))
    try:
        for _ in range(1000):
            name = fixed or path_policy.numbered_name(prefix, os.listdir(folder))
            while not fixed and taken(name):  # a numbered name in another checkpoints folder: skip it
                name = path_policy.numbered_name(prefix, [*os.listdir(folder), name])
            if _link_new(staging, folder / name):
                return folder / name
            if fixed:
                break
    finally:
        staging.unlink(missing_ok=True)
    raise UnsafePathError(f"filename {path_policy.show(prefix)}: '{folder / (fixed or prefix)}' appeared while "
                          "saving; nothing was replaced")


def _link_new(staging: Path, target: Path) -> bool:
    """``staging`` under the name ``target`` if no file has it (a hard link: atomic); False if one has it."""
    try:
        os.link(staging, target)
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system (FAT, some shares): check, then rename
        if os.path.lexists(target):
            return False
        os.replace(staging, target)
    return True
