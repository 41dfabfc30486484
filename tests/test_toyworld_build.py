"""The toy-world rebuild (issue 6 "Reproduction"): the ``ci`` preset runs the whole chain, through the same code as
``--preset full``, in well under a minute on one thread. Marked slow: run with ``pytest -m slow``."""

import json

import pytest

from sd35_flash.flash_core.checkpoint import FlashMetadata, index_checkpoint
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.training.config import load_config
from sd35_flash.training.toyworld import build, world
from sd35_flash.training.toyworld.__main__ import main


@pytest.fixture
def built(ci_build):
    return ci_build


@pytest.mark.slow
def test_every_stage_ran_and_wrote_its_files(built):
    record = json.loads((built / "build.json").read_text())
    assert list(record["stages"]) == list(build.STAGES)
    for name, result in record["stages"].items():
        assert result["seconds"] >= 0, name
        for path in result["files"]:
            assert (built / path).exists(), f"{name}: {path}"
    for steps in (4, 2):
        for name in ("pretrain", "dmd", "merged"):
            assert (built / "students" / f"step{steps}" / f"{name}.safetensors").exists()
    assert len((built / "world" / "prompts.txt").read_text().split("\n")) >= build.PRESETS["ci"].prompts


@pytest.mark.slow
def test_the_configs_rerun_with_the_training_cli(built):
    """Each training stage ran from a TOML config in the build folder (no second code path)."""
    teacher = load_config(built / "teacher" / "teacher.toml")
    assert teacher.teacher.components == str(built / "components.safetensors")
    student = load_config(built / "students" / "step2.toml")
    assert student.student.steps == 2 and student.model.teacher == str(built / "teacher" / "teacher.safetensors")
    assert student.split.boundary == build.SPLIT_BOUNDARY[2]


@pytest.mark.slow
def test_the_demo_checkpoint_generates_with_its_tokenizers(built):
    path = built / "demo" / build.DEMO_NAME
    files = index_checkpoint(path)
    assert all(files.has(c) for c in ("mmdit", "vae", "clip_l", "clip_g", "t5"))
    meta = FlashMetadata.from_safetensors(files.metadata)
    assert meta.student_sigmas == [1.0, 0.9, 0.75, 0.5, 0.0] and meta.training["toyworld_preset"] == "ci"
    assert meta.training["source"] == "students/step4/merged.safetensors"
    assert path.stat().st_size < 20 * 2**20
    pipe = FlashPipeline.from_checkpoint(path, tokenizers=built / "demo" / "tokenizers", device="cpu")
    for use_t5 in (True, False):
        image = pipe(build.DEMO_PROMPT, steps=4, width=world.IMAGE_SIZE, height=world.IMAGE_SIZE,
                     use_t5=use_t5, progress=False)[0]
        assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)


@pytest.mark.slow
def test_resume_skips_finished_stages(built, capsys):
    assert main(["--preset", "ci", "--out", str(built), "--quiet", "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("done before") == len(build.STAGES)


def test_a_bad_stage_name_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--until", "nowhere", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
