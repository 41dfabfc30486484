"""The training nodes in a real ComfyUI, in-process and under ``torch.inference_mode`` as ComfyUI's executor runs
them: setup (with a native MODEL as the student's start) -> teacher data -> pre-training -> DMD -> split + merge ->
save, then the saved student in the Flash loader; and a Cancel that keeps the trained steps for a resume."""

import pytest
import torch

from factories import write_tiny_checkpoint

TEACHER = "tiny_teacher.safetensors"


@pytest.fixture(scope="module")
def comfy_dirs(comfy, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("training_nodes")
    (root / "checkpoints").mkdir()
    write_tiny_checkpoint(root / "checkpoints" / TEACHER)
    folder_paths.add_model_folder_path("checkpoints", str(root / "checkpoints"), is_default=True)
    folder_paths.set_output_directory(str(root / "output"))
    return root


def nodes():
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS

    return {name.removeprefix("SD35Flash"): cls() for name, cls in NODE_CLASS_MAPPINGS.items()}


def setup(run_name: str, student_init=None):
    n = nodes()
    extra = "[train]\ncheckpoint_every = 1\n[dmd]\nfake_updates_per_step = 1\n"
    (training,) = n["TrainSetup"].setup(TEACHER, "a red circle\na blue square", run_name, 4, 32, 32, 2, 2, 0,
                                        student_init=student_init, config_toml=extra)
    (training,) = n["TrainData"].make(training, 4, 2.0)
    return training


@torch.inference_mode()
def test_the_training_chain_runs_in_comfyui_and_saves_a_loadable_student(comfy_dirs):
    n = nodes()
    teacher_model = n["CheckpointLoader"].load(TEACHER, "auto", "fp32")[0]
    training = setup("chain", student_init=teacher_model)
    assert (comfy_dirs / "output" / "sd35_flash" / "chain" / "student_init.safetensors").exists()
    training, model = n["TrainPretrain"].train(training, 2, 1e-4, "l2", False)
    training, model = n["TrainDMD"].train(training, 2, 1e-5, "shared_next", 2.0, 1, 0.0, False)
    training, model = n["TrainSplit"].train(training, 2, 1e-5, 500.0, 0.5, False)
    training, remerged = n["TrainMerge"].train(training, 0.3)
    result = n["TrainSave"].save(training, "latest", "distilled_student")  # a new numbered file, as SaveImage's
    assert (comfy_dirs / "checkpoints" / "distilled_student_00001_.safetensors").exists(), result
    loaded, clip, vae = n["CheckpointLoader"].load("distilled_student_00001_.safetensors", "auto", "fp32")
    from sd35_flash.nodes.native import flash_metadata

    assert flash_metadata(loaded).student_sigmas == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert flash_metadata(loaded).training["stage"] == "merge"
    import nodes as comfy_nodes

    (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, "a red circle")
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    (out,) = n["Sampler"].sample(loaded, cond, latent, seed=1, steps=4, cfg=1.0, mode="auto")
    assert torch.isfinite(out["samples"]).all()


@torch.inference_mode()
def test_cancel_keeps_the_trained_steps_and_resume_continues(comfy_dirs):
    import comfy.model_management
    import comfy.utils

    training = setup("cancel")
    calls = []

    def hook(value, total, preview, node_id=None):  # what ComfyUI's server installs: an interrupt point
        calls.append(value)
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            nodes()["TrainPretrain"].train(training, 4, 1e-4, "l2", False)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    states = comfy_dirs / "output" / "sd35_flash" / "cancel" / "state" / "pretrain"
    assert calls[:2] == [1, 2] and sorted(p.name for p in states.iterdir())[-1] == "step_000002.safetensors"
    training, model = nodes()["TrainPretrain"].train(training, 4, 1e-4, "l2", True)
    assert sorted(p.name for p in states.iterdir())[-1] == "step_000004.safetensors"
