"""The toy-world rebuild (issue 6 "Reproduction"): the ``ci`` preset runs the whole chain, through the same code as
``--preset full``, in well under a minute on one thread. Marked slow: run with ``pytest -m slow``."""

import json
from dataclasses import asdict, replace

import pytest

from sd35_flash.flash_core.checkpoint import FlashMetadata, index_checkpoint
from sd35_flash.flash_core.demo import DEMO_FILE_NAME
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
def test_the_teacher_is_probed_and_installs_with_its_model_card(built, tmp_path):
    """The teacher stage reads its teacher's samples with the evaluator (build.json, one line on stderr), and
    ``install_teacher`` copies it with a model card naming its recipe, probe and SHA-256."""
    import hashlib

    record = json.loads((built / "build.json").read_text())["stages"]["teacher"]
    probe = record["probe"]
    assert {"shape", "colour", "position", "all", "fd_real", "floor"} <= probe.keys()
    assert all(0 <= probe[k] <= 1 for k in ("shape", "colour", "position", "all")) and probe["floor"] > 0
    b = build.Build(built, build.PRESETS["ci"], False, False)
    b.record = json.loads((built / "build.json").read_text())
    path = build.install_teacher(b, tmp_path / "shipped")
    assert path.read_bytes() == (built / "teacher" / "teacher.safetensors").read_bytes()
    card = (tmp_path / "shipped" / "README.md").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in card
    assert f"{100 * probe['shape']:.0f} %" in card and "--from-teacher toyworld_teacher/teacher.safetensors" in card
    assert f"{build.PRESETS['ci'].teacher['iterations']} iterations" in card and "Vocabulary" in card


@pytest.mark.slow
def test_the_teacher_curve_reads_every_saved_state(built, tmp_path, capsys):
    """benchmarks/teacher_curve.py: one row per saved teacher state (its EMA) and the final teacher, each with
    the probe's accuracies and FD to real images."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_curve.py"
    spec = importlib.util.spec_from_file_location("teacher_curve", script)
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    assert curve.main(["--build", str(built), "--run", str(built / "teacher"), "--samples", "8", "--steps", "4",
                       "--threads", "1", "--json", str(tmp_path / "curve.json")]) == 0
    rows = json.loads((tmp_path / "curve.json").read_text())
    states = sorted((built / "teacher" / "state" / "teacher").glob("step_*.safetensors"))
    assert [r["iteration"] for r in rows] == [p.stem.removeprefix("step_").lstrip("0") for p in states] + ["final"]
    assert all(0 <= r["shape"] <= 1 and r["fd_real"] > 0 for r in rows)
    assert "| final |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_demo_checkpoint_generates_with_its_tokenizers(built):
    path = built / "demo" / DEMO_FILE_NAME
    files = index_checkpoint(path)
    assert all(files.has(c) for c in ("mmdit", "vae", "clip_l", "clip_g", "t5"))
    meta = FlashMetadata.from_safetensors(files.metadata)
    assert meta.student_sigmas == [1.0, 0.9, 0.75, 0.5, 0.0] and meta.training["toyworld_preset"] == "ci"
    # the best 4-step student of the build's own quality table (lowest mean unpaired FD_T), its first seed. The
    # table as the build's table stage measured it (build.json): benchmarks/toy_quality.py may rewrite
    # quality/table.json later with another sample count, where near-tied rows can swap places
    means = json.loads((built / "build.json").read_text())["stages"]["table"]["rows"]
    students = [key for key in means if key.startswith(("tg4", "anchor4", "dmd4_", "merge4"))
                and not key.endswith("_t5off")]
    assert meta.training["table_row"] == min(students, key=lambda key: means[key]["fd_t_unpaired"])
    assert meta.training["source"].startswith("students/step4/") and (built / meta.training["source"]).exists()
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


@pytest.mark.slow
def test_install_demo_copies_the_demo_with_a_model_card(built, tmp_path, capsys):
    dest = tmp_path / "demo"
    assert main(["--preset", "ci", "--out", str(built), "--quiet", "--resume", "--install-demo", str(dest)]) == 0
    assert f"demo model installed: {dest / DEMO_FILE_NAME}" in capsys.readouterr().out
    assert (dest / DEMO_FILE_NAME).read_bytes() == (built / "demo" / DEMO_FILE_NAME).read_bytes()
    assert (dest / "tokenizers" / "clip" / "tokenizer.json").exists() and (dest / "sample.png").exists()
    card = (dest / "README.md").read_text()
    record = json.loads((built / "build.json").read_text())["stages"]["demo"]
    assert "--preset ci" in card and f"`{record['source']}`" in card and "FD_T" in card
    assert not list(dest.rglob(".*.tmp"))


def test_resume_reruns_from_the_first_stage_a_changed_setting_feeds(tmp_path):
    """--resume after editing the preset keeps the stages before the first one the edit feeds."""
    ci = build.PRESETS["ci"]
    record = {"preset": json.loads(json.dumps(asdict(ci))), "stages": {s: {"seconds": 1.0} for s in build.STAGES}}
    (tmp_path / "build.json").write_text(json.dumps(record))
    lines = []
    for changes, first in (({"dmd": {**ci.dmd, "iterations": 9}}, "dmd"), ({"seeds": 2}, "variants"),
                           ({"eval_samples": 24}, "table"), ({"text_length": 16}, "tokenizer"),
                           ({"from_teacher": "ab12"}, "encoders"), ({"workers": 1}, None)):
        b = build.Build(tmp_path, replace(ci, **changes), resume=True)
        b.load_record(lines.append)
        kept = list(build.STAGES)[:list(build.STAGES).index(first)] if first else list(build.STAGES)
        assert list(b.record["stages"]) == kept, changes
        assert b.record["preset"] == json.loads(json.dumps(asdict(replace(ci, **changes))))
    assert "dmd changed; stages from 'dmd' on run again" in lines[0]
    fresh = build.Build(tmp_path, replace(ci, seeds=2), resume=False)
    fresh.load_record(lines.append)
    assert fresh.record["stages"] == {}


def test_a_bad_stage_name_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--until", "nowhere", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err


def small_teacher(build_dir, path, **drop):
    """A toy-world teacher file: a small MM-DiT with the build's VAE and text encoders (``drop``: parts left out)."""
    from sd35_flash.flash_core.checkpoint import component_state_dict, save_checkpoint
    from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig

    files = index_checkpoint(build_dir / "components.safetensors")
    parts = {slot: component_state_dict(files, slot) for slot in ("vae", "clip_l", "clip_g", "t5") if slot not in drop}
    config = MMDiTConfig(depth=1, hidden_size=64, pos_embed_max_size=8, qk_norm=True)
    return save_checkpoint(path, mmdit=MMDiT(config), **parts)


def test_a_build_takes_a_given_teacher_and_its_parts(tmp_path, capsys):
    from safetensors.torch import load_file

    build.build(tmp_path / "first", "ci", progress=False, until="vae", log=lambda _: None)
    teacher = small_teacher(tmp_path / "first", tmp_path / "teacher.safetensors")
    out = tmp_path / "second"
    assert main(["--preset", "ci", "--out", str(out), "--until", "teacher", "--from-teacher", str(teacher),
                 "--quiet", "--threads", "1"]) == 0
    assert (out / "teacher" / "teacher.safetensors").read_bytes() == teacher.read_bytes()
    given = load_file(str(teacher))
    for name, tensor in load_file(str(out / "components.safetensors")).items():
        assert name in given and given[name].equal(tensor), name
    record = json.loads((out / "build.json").read_text())
    assert record["preset"]["from_teacher"] and not (out / "vae_log.csv").exists()
    assert record["stages"]["teacher"]["from_teacher"] == str(teacher)
    assert (out / "evaluator.safetensors").exists()  # the instrument is still the build's own


def test_a_teacher_without_its_parts_is_refused_in_one_line(tmp_path, capsys):
    build.build(tmp_path / "first", "ci", progress=False, until="vae", log=lambda _: None)
    teacher = small_teacher(tmp_path / "first", tmp_path / "no_t5.safetensors", t5=True)
    assert main(["--preset", "ci", "--out", str(tmp_path / "b"), "--from-teacher", str(teacher), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--from-teacher '{teacher}': no t5 weights" in err
    assert not (tmp_path / "b" / "build.json").exists()  # refused before any stage ran


def test_the_teacher_stage_on_two_processes_trains_the_one_process_teacher(tmp_path):
    """``teacher_workers = 2`` trains the teacher through torchrun and the training CLI, the global batch split
    over two one-thread processes: the same draws, so the same teacher as in this process up to the order of
    the gradient sum (the region weight too: its divisor is the pool's, not a rank's)."""
    import shutil

    from safetensors.torch import load_file

    one = tmp_path / "one"
    build.build(one, "ci", progress=False, until="evaluator", log=lambda _: None)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    preset = build.PRESETS["ci"]
    preset = replace(preset, teacher={**preset.teacher, "region_weight": 10.0})
    for out, workers in ((one, 1), (two, 2)):
        build.build(out, replace(preset, teacher_workers=workers), progress=False, until="teacher", resume=True,
                    log=lambda _: None)
    record = json.loads((two / "build.json").read_text())
    assert record["stages"]["teacher"]["workers"] == 2
    first, second = (load_file(str(out / "teacher" / "teacher.safetensors")) for out in (one, two))
    assert first.keys() == second.keys()
    mmdit = [k for k in first if k.startswith("model.diffusion_model.")]
    assert mmdit and all(first[k].allclose(second[k], atol=1e-4) for k in mmdit)
    # the EMA leaves the fixed sin-cos table exact (the quantizer elides only the exact table)
    from sd35_flash.flash_core.mmdit import sincos_pos_embed_table

    table = first["model.diffusion_model.pos_embed"]
    assert table.equal(sincos_pos_embed_table(table.shape[2], 8).to(table.dtype))


@pytest.mark.slow
def test_the_student_curve_measures_every_saved_state_like_a_table_row(built, tmp_path, capsys):
    """benchmarks/student_curve.py: one row per saved state of a student stage and its output, each with the
    table's metrics against the build's cached teacher reference."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "student_curve.py"
    spec = importlib.util.spec_from_file_location("student_curve", script)
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    run = built / "students" / "step4"
    assert curve.main(["--build", str(built), "--run", str(run), "--stage", "pretrain", "--samples", "8",
                       "--threads", "1", "--json", str(tmp_path / "curve.json")]) == 0
    rows = json.loads((tmp_path / "curve.json").read_text())
    states = sorted((run / "state" / "pretrain").glob("step_*.safetensors"))
    assert [r["state"] for r in rows] == [str(int(p.stem.removeprefix("step_"))) for p in states] + ["final"]
    assert rows[-2]["paired_mse"] == rows[-1]["paired_mse"]  # the last state is the saved student
    assert all(r["fd_t_unpaired"] > 0 and 0 <= r["acc_all"] <= 1 for r in rows)
    assert "| final |" in capsys.readouterr().out
    assert curve.main(["--build", str(built), "--run", str(tmp_path), "--stage", "dmd"]) == 2


@pytest.mark.skipif(not (build.TEACHER_FOLDER / build.TEACHER_FILE_NAME).exists(),
                    reason="the shipped teacher is not here (a wheel does not carry toyworld_teacher/)")
def test_the_shipped_teacher_is_what_its_model_card_says():
    """toyworld_teacher/: an official single file that --from-teacher accepts, at most 20 MB, named by the
    SHA-256 in its model card; the repository's safetensors stay within 30 MB in all."""
    import hashlib
    import re
    from pathlib import Path

    path = build.TEACHER_FOLDER / build.TEACHER_FILE_NAME
    build.given_teacher(path)  # raises on a missing part or a vocabulary other than the world's
    assert path.stat().st_size <= 20 * 2**20
    card = (build.TEACHER_FOLDER / "README.md").read_text()
    assert re.search(r"SHA-256 `([0-9a-f]{64})`", card).group(1) == hashlib.sha256(path.read_bytes()).hexdigest()
    root = Path(build.__file__).resolve().parents[2]
    # the folders the repository ships files in (a build the README's commands make in the root is the user's)
    shipped = [p for folder in ("demo", "toyworld_teacher", "tests", "docs", "example_workflows")
               for p in (root / folder).rglob("*.safetensors")]
    assert sum(p.stat().st_size for p in shipped) <= 30 * 2**20, shipped


@pytest.mark.slow
def test_the_dmd_sweep_trains_and_measures_each_setting(built, tmp_path, capsys):
    """benchmarks/dmd_sweep.py: one DMD run per (reading, lr, anchor) from the build's trajectory-guidance
    student, each config carrying its setting, measured like a table row, and each reading's pick printed."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dmd_sweep.py"
    spec = importlib.util.spec_from_file_location("dmd_sweep", script)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep"
    args = ["--build", str(built), "--out", str(out), "--preset", "ci", "--readings", "renoise", "shared_next",
            "--lr", "1e-4", "3e-4", "--anchor", "50", "--updates", "2", "--samples", "8", "--workers", "1",
            "--threads", "1", "--json", str(tmp_path / "sweep.json")]
    assert sweep.main(args) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert sorted((r["reading"], r["lr"]) for r in rows) == [("renoise", 1e-4), ("renoise", 3e-4),
                                                             ("shared_next", 1e-4), ("shared_next", 3e-4)]
    config = load_config(out / "shared_next_lr0.0003_w50.toml")
    warmup = build.PRESETS["ci"].dmd["fake_warmup_steps"]
    assert (config.dmd.optim.lr, config.dmd.trajectory_weight, config.dmd.iterations) == (3e-4, 50.0, warmup + 2)
    assert config.dmd.score_sample == "shared_next"
    printed = capsys.readouterr().out
    picks = json.loads(printed.split("reading_dmd = ", 1)[1])
    assert set(picks) == {"renoise", "shared_next"} and picks["renoise"]["trajectory_weight"] == 50.0
    assert sweep.main(["--build", str(tmp_path), "--out", str(out)]) == 2
