"""The ``sd35-flash`` command line: images out, one-line errors with status 2, and ``info``."""

import json
import subprocess
import sys

import pytest
from PIL import Image
from safetensors.torch import save_file

from sd35_flash.flash_core import cli
from sd35_flash.flash_core.checkpoint import FlashMetadata

from factories import write_tiny_checkpoint
from workflow_check import check_graph


@pytest.fixture(scope="module")
def checkpoint(module_tmp):
    meta = FlashMetadata(student_sigmas=[1.0, 0.9, 0.75, 0.5], sampler_mode="euler", quantization="fp32")
    return write_tiny_checkpoint(module_tmp("cli") / "tiny.safetensors", metadata=meta)


def test_generate_writes_png_files(checkpoint, tokenizers_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    args = ["generate", "-c", str(checkpoint), "--tokenizers", str(tokenizers_dir), "-p", "a red circle",
            "-o", str(out), "--width", "64", "--height", "32", "--seed", "7", "--quiet"]
    assert cli.main(args) == 0
    assert Image.open(out).size == (64, 32)
    assert cli.main(args[:-1] + ["--batch", "2", "--no-t5", "--steps", "2", "--quiet"]) == 0
    assert Image.open(tmp_path / "img_0.png").size == (64, 32)
    assert Image.open(tmp_path / "img_1.png").size == (64, 32)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_png_carries_the_comfyui_prompt_and_workflow(checkpoint, tokenizers_dir, tmp_path):
    """Each PNG holds the ComfyUI graph of the run, in the chunks ComfyUI's SaveImage writes: dropped on ComfyUI,
    it opens the graph that makes the same image."""
    out = tmp_path / "cat.png"
    assert cli.main(["generate", "-c", str(checkpoint), "--tokenizers", str(tokenizers_dir), "-p", "a red circle",
                     "-o", str(out), "--width", "48", "--height", "32", "--seed", "11", "--steps", "2",
                     "--batch", "2", "--cfg", "2.5", "-n", "blurry", "--no-t5", "--quiet"]) == 0
    for path in (tmp_path / "cat_0.png", tmp_path / "cat_1.png"):
        text = Image.open(path).text
        assert list(text) == ["prompt", "workflow"]
        prompt, workflow = json.loads(text["prompt"]), json.loads(text["workflow"])
        assert check_graph(prompt, workflow) == []
        nodes = {n["class_type"]: n["inputs"] for n in prompt.values() if n["class_type"] != "CLIPTextEncode"}
        assert nodes["SD35FlashCheckpointLoader"] == {"ckpt_name": "tiny.safetensors", "t5": "off",
                                                      "weight_dtype": "auto", "quantize": "none"}
        sampler = nodes["SD35FlashSampler"]
        assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["mode"]) == (11, 2, 2.5, "auto")
        assert nodes["EmptySD3LatentImage"] == {"width": 48, "height": 32, "batch_size": 2}
        texts = {n["_meta"]["title"]: n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "CLIPTextEncode"}
        assert texts == {"Positive Prompt": "a red circle", "Negative Prompt": "blurry"}
        assert nodes["SaveImage"]["filename_prefix"] == "cat"


def _error_line(args, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_width_is_one_line(checkpoint, tmp_path, capsys):
    err = _error_line(["generate", "-c", str(checkpoint), "-p", "x", "-o", str(tmp_path / "a.png"),
                       "--width", "1000"], capsys)
    assert "width 1000" in err and "multiple of 16" in err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    err = _error_line(["generate", "-c", str(tmp_path / "missing.safetensors"), "-p", "x",
                       "-o", str(tmp_path / "a.png")], capsys)
    assert "missing.safetensors" in err


def test_non_sd3_checkpoint_is_one_line(tmp_path, capsys):
    import torch

    path = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    err = _error_line(["generate", "-c", str(path), "-p", "x", "-o", str(tmp_path / "a.png")], capsys)
    assert "sdxl.safetensors" in err and "not an SD3-class" in err


def test_without_checkpoint_says_the_demo_model_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", tmp_path / "absent.safetensors")
    err = _error_line(["generate", "-p", "x", "-o", str(tmp_path / "a.png")], capsys)
    assert "--checkpoint" in err and "demo model" in err


def test_out_must_be_png(checkpoint, tmp_path, capsys):
    err = _error_line(["generate", "-c", str(checkpoint), "-p", "x", "-o", str(tmp_path / "a.jpg")], capsys)
    assert "a.jpg" in err


def test_info_reports_architecture_components_and_metadata(checkpoint, capsys):
    assert cli.main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    for expected in ("official single file", "MM-DiT:", "custom MM-DiT-X", "depth: 3", "dual-attention layers: block 0 (1 of 3 blocks)\n",
                     "qk norm: RMSNorm", "VAE:", "latent channels: 16", "CLIP-L:", "CLIP-G:", "T5-XXL:",
                     "student_sigmas: [1.0, 0.9, 0.75, 0.5]", "sampler_mode: euler", "float32"):
        assert expected in out, expected


def test_console_script_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "sd35_flash.flash_core.cli", "info", "/nonexistent.safetensors"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("sd35-flash: error:") and "/nonexistent.safetensors" in result.stderr


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", "x"])  # --out missing
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out" in err


def test_tokenizers_not_found_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SD35_FLASH_TOKENIZERS", raising=False)
    err = _error_line(["generate", "-c", str(checkpoint), "-p", "x", "-o", str(tmp_path / "a.png"),
                       "--tokenizers", str(tmp_path / "no_tokenizers_here")], capsys)
    assert "no_tokenizers_here" in err and "--tokenizers" in err


def test_released_architectures_are_named():
    from sd35_flash.flash_core.checkpoint_info import architecture_name
    from sd35_flash.flash_core.mmdit import MMDiTConfig

    assert architecture_name(MMDiTConfig.sd35_medium()) == "SD3.5 Medium (MM-DiT-X)"
    assert architecture_name(MMDiTConfig.sd35_large()) == "SD3.5 Large"
    assert architecture_name(MMDiTConfig(depth=24, hidden_size=1536, pos_embed_max_size=192, qk_norm=False)) == "SD3 Medium"
