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
import math
import shutil
from pathlib import Path

import torch

from ..flash_core.atomic import atomic_write
from ..flash_core.checkpoint import FlashMetadata, index_checkpoint
from ..training.config import Config, config_from_dict
from .loaders import full_path

CATEGORY = "SD3.5 Flash/training"
TRAINING = "FLASH_TRAINING"
PROGRESS_EVENT = "sd35_flash.train_progress"
MERGE_ALPHA = ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                         "tooltip": "Merged = alpha * high branch + (1 - alpha) * low branch."})
RESUME_TIP = "Continue from the newest saved state of this stage in the run folder (after a Cancel, say)."


def _send(node_id, payload: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    if node_id is not None and getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_sync(PROGRESS_EVENT, {"node": str(node_id), **payload})


def run_folder(name: str) -> Path:
    """``<ComfyUI output>/sd35_flash/<name>``, refusing names that would leave it."""
    import folder_paths

    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"run_name '{name}' must be a plain folder name (no '/' or '..')")
    return Path(folder_paths.get_output_directory()) / "sd35_flash" / name


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

    from ..training.trainer import Trainer, World

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
        return trainer.run(stage, resume)


# ------------------------------------------------------------------------------------------------ nodes


class FlashTrainSetup:
    """The run: teacher, prompts, sizes, student steps; optional student MODEL and TOML overrides."""

    @classmethod
    def INPUT_TYPES(cls):
        from .loaders import filenames

        return {
            "required": {
                "teacher": (filenames("checkpoints"), {"tooltip": "The teacher: an SD3.5 single file with its "
                                                                  "text encoders and VAE (models/checkpoints)."}),
                "prompts": ("STRING", {"multiline": True, "default": "a red circle at the top left\n"
                                                                     "a blue square at the bottom right",
                                       "tooltip": "Training prompts, one per line."}),
                "run_name": ("STRING", {"default": "flash_run", "tooltip":
                                        "Folder under output/sd35_flash/ for data, states, logs and outputs."}),
                "student_steps": ([4, 2], {"default": 4, "tooltip": "Distil a 4-step or a 2-step student."}),
                "width": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 16,
                                  "tooltip": "Training image width in pixels."}),
                "height": ("INT", {"default": 512, "min": 16, "max": 4096, "step": 16,
                                   "tooltip": "Training image height in pixels."}),
                "samples_per_prompt": ("INT", {"default": 4, "min": 1, "max": 100000,
                                               "tooltip": "Teacher samples per prompt (different seeds)."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 1024, "tooltip": "Images per training step."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                 "tooltip": "Seed for the teacher noise and every training draw."}),
            },
            "optional": {
                "student_init": ("MODEL", {"tooltip": "Start the student from this MODEL (LoRA applied) instead "
                                                      "of the teacher, e.g. SD3.5 Medium under a Large teacher."}),
                "config_toml": ("STRING", {"multiline": True, "default": "", "tooltip":
                                           "Any other setting as TOML, as in an sd35-flash-train config, e.g. "
                                           "'[dropout]\\nt5 = 0.2'. Overrides the widgets."}),
            },
        }

    RETURN_TYPES = (TRAINING,)
    RETURN_NAMES = ("training",)
    OUTPUT_TOOLTIPS = ("The run's settings, for the stage nodes.",)
    FUNCTION = "setup"
    CATEGORY = CATEGORY
    DESCRIPTION = "Sets up an SD3.5-Flash distillation run (the same config as sd35-flash-train)."

    def setup(self, teacher, prompts, run_name, student_steps, width, height, samples_per_prompt, batch_size, seed,
              student_init=None, config_toml=""):
        from ..training.config import ConfigError, tomllib

        out = run_folder(run_name)
        out.mkdir(parents=True, exist_ok=True)
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not lines:
            raise ValueError("prompts is empty: give at least one prompt, one per line")
        prompts_file = out / "prompts.txt"
        prompts_file.write_text("\n".join(lines) + "\n")
        data = {
            "model": {"teacher": str(full_path(teacher, "checkpoints"))},
            "data": {"prompts": str(prompts_file), "width": width, "height": height,
                     "samples_per_prompt": samples_per_prompt, "seed": seed},
            "student": {"steps": int(student_steps)},
            "train": {"out": str(out), "batch_size": batch_size, "seed": seed},
        }
        if config_toml.strip():
            try:
                extra = tomllib.loads(config_toml)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config_toml is not valid TOML: {e}") from None
            for section, values in extra.items():
                if isinstance(values, dict):
                    data.setdefault(section, {}).update(values)
                else:
                    data[section] = values
        if student_init is not None:
            data["model"]["student_init"] = str(save_native_model(student_init, out / "student_init.safetensors"))
        return (config_from_dict(data, "Flash Distillation Setup"),)


def _stage_inputs(iterations: int, lr: float, extra: dict | None = None) -> dict:
    required = {
        "training": (TRAINING, {"tooltip": "From Flash Distillation Setup or the previous stage."}),
        "iterations": ("INT", {"default": iterations, "min": 1, "max": 1_000_000, "tooltip": "Training steps."}),
        "lr": ("FLOAT", {"default": lr, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                         "tooltip": "AdamW learning rate of the student."}),
        **(extra or {}),
        "resume": ("BOOLEAN", {"default": False, "tooltip": RESUME_TIP}),
    }
    return {"required": required, "hidden": {"unique_id": "UNIQUE_ID"}}


class _StageNode:
    RETURN_TYPES = (TRAINING, "MODEL")
    RETURN_NAMES = ("training", "MODEL")
    OUTPUT_TOOLTIPS = ("The run, for the next stage.", "This stage's student as a native MODEL, to sample now.")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    STAGE = ""

    def _run(self, config: Config, resume: bool, unique_id):
        path = run_stage(config, self.STAGE, resume, unique_id)
        return config, _native_model(path)


class FlashTrainData:
    """Stage 0: the teacher's samples for every prompt (resumable shards)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "training": (TRAINING, {"tooltip": "From Flash Distillation Setup."}),
            "teacher_steps": ("INT", {"default": 32, "min": 1, "max": 1000, "tooltip": "Teacher Euler steps."}),
            "teacher_cfg": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                      "tooltip": "The teacher's guidance scale."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = (TRAINING,)
    RETURN_NAMES = ("training",)
    OUTPUT_TOOLTIPS = ("The run, with its teacher data made.",)
    FUNCTION = "make"
    CATEGORY = CATEGORY
    DESCRIPTION = "Generates the teacher samples (noise, trajectory at the student sigmas, conditioning with and " \
                  "without T5) that the training stages learn from."

    def make(self, training: Config, teacher_steps: int, teacher_cfg: float, unique_id=None):
        import comfy.utils

        from ..training.data import make_teacher_data
        from ..training.trainer import _teacher_pipe

        config = _with(training, data={"teacher_steps": teacher_steps, "teacher_cfg": teacher_cfg})
        bar = comfy.utils.ProgressBar(1)
        make_teacher_data(config, _teacher_pipe(config), progress=True,
                          callback=lambda done, total: bar.update_absolute(done, total))
        return (config,)


class FlashTrainPretrain(_StageNode):
    """Stage A: trajectory-guidance pre-training."""

    STAGE = "pretrain"
    DESCRIPTION = "Stage A: the student learns the teacher's trajectory segment by segment."

    @classmethod
    def INPUT_TYPES(cls):
        return _stage_inputs(2000, 1e-5, {"loss": (["l2", "pseudo_huber"], {"tooltip": "Segment-matching loss."})})

    def train(self, training: Config, iterations: int, lr: float, loss: str, resume: bool, unique_id=None):
        config = _with(training, pretrain={"iterations": iterations, "loss": loss,
                                           "optim": dataclasses.replace(training.pretrain.optim, lr=lr)})
        return self._run(config, resume, unique_id)


class FlashTrainDMD(_StageNode):
    """Stage B: DMD with timestep sharing."""

    STAGE = "dmd"
    DESCRIPTION = "Stage B: distribution matching with timestep sharing (or the re-noise baseline)."

    @classmethod
    def INPUT_TYPES(cls):
        return _stage_inputs(1200, 1e-5, {
            "score_sample": (["shared_next", "shared_current", "renoise"], {
                "tooltip": "Where the scores are read: the student's next trajectory point (timestep sharing), "
                           "its current point, or a re-noised x0 (DMD2 baseline)."}),
            "real_cfg": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "Guidance of the teacher's (real) score."}),
            "fake_updates_per_step": ("INT", {"default": 5, "min": 1, "max": 100,
                                              "tooltip": "Fake-score updates per student update."}),
            "trajectory_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                                            "tooltip": "Weight of the Stage-A loss kept as an anchor."}),
        })

    def train(self, training: Config, iterations: int, lr: float, score_sample: str, real_cfg: float,
              fake_updates_per_step: int, trajectory_weight: float, resume: bool, unique_id=None):
        config = _with(training, dmd={
            "iterations": iterations, "score_sample": score_sample, "real_cfg": real_cfg,
            "fake_updates_per_step": fake_updates_per_step, "trajectory_weight": trajectory_weight,
            "optim": dataclasses.replace(training.dmd.optim, lr=lr)})
        return self._run(config, resume, unique_id)


class FlashTrainSplit(_StageNode):
    """Stage C: split-timestep fine-tuning of two branches with EMA, then the merge."""

    STAGE = "split"
    DESCRIPTION = "Stage C: two branches fine-tuned on high / low noise steps, merged into one student."

    @classmethod
    def INPUT_TYPES(cls):
        return _stage_inputs(400, 1e-5, {
            "boundary": ("FLOAT", {"default": 500.0, "min": 0.0, "max": 1000.0, "step": 1.0,
                                   "tooltip": "Model timestep (1000 * sigma) between the branches."}),
            "merge_alpha": MERGE_ALPHA,
        })

    def train(self, training: Config, iterations: int, lr: float, boundary: float, merge_alpha: float,
              resume: bool, unique_id=None):
        config = _with(training, split={"iterations": iterations, "boundary": boundary, "merge_alpha": merge_alpha},
                       dmd={"optim": dataclasses.replace(training.dmd.optim, lr=lr)})
        return self._run(config, resume, unique_id)


class FlashTrainMerge(_StageNode):
    """Re-merge the saved branches with another alpha (no training)."""

    STAGE = "merge"
    DESCRIPTION = "Merges the split stage's branch EMAs again with another alpha."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "training": (TRAINING, {"tooltip": "A run whose split stage has finished."}),
            "merge_alpha": MERGE_ALPHA,
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, training: Config, merge_alpha: float, unique_id=None):
        return self._run(_with(training, split={"merge_alpha": merge_alpha}), False, unique_id)


OUTPUTS = {"merged": "merged", "dmd": "dmd", "pretrain": "pretrain"}


class FlashTrainSave:
    """Copy a stage's student checkpoint into models/checkpoints, where the Flash loader lists it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "training": (TRAINING, {"tooltip": "The run."}),
            "stage": (["latest", *OUTPUTS], {"tooltip": "Which student: the newest stage output, or a named one."}),
            "filename": ("STRING", {"default": "sd35_flash_student", "tooltip":
                                    "Name in models/checkpoints (.safetensors is added)."}),
        }}

    RETURN_TYPES = ()
    OUTPUT_TOOLTIPS = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves the distilled student (with the teacher's text encoders and VAE, and our metadata)."

    def save(self, training: Config, stage: str, filename: str):
        import folder_paths

        out = Path(training.train.out)
        names = list(OUTPUTS.values()) if stage == "latest" else [OUTPUTS[stage]]
        source = next((out / f"{n}.safetensors" for n in names if (out / f"{n}.safetensors").exists()), None)
        if source is None:
            raise FileNotFoundError(f"no {stage} output in '{out}': run that stage first")
        if not filename or Path(filename).name != filename:
            raise ValueError(f"filename '{filename}' must be a plain file name")
        folder = Path(folder_paths.get_folder_paths("checkpoints")[0])
        target = folder / (filename if filename.endswith(".safetensors") else f"{filename}.safetensors")
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))  # whole or not at all, umask's mode
        return {"ui": {"text": [f"saved {source.name} as {target}"]}}
