"""Issue 12 item 3: every command-line mistake is one stderr line and exit status 2, found before any work where
it can be, with no traceback and nothing written. Runs the embedded demo model (16 px, no download)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd35_flash.flash_core import atomic, cli, memory
from sd35_flash.flash_core.devices import resolve_device
from sd35_flash.flash_core.errors import FlashError
from sd35_flash.training.cli import main as train_main
from sd35_flash.training.config import ConfigError
from sd35_flash.training.data import TeacherData

DEMO = cli.DEMO_CHECKPOINT
DEMO_TOKENIZERS = DEMO.parent / "tokenizers"
PROMPT = "a red circle in the center"

pytestmark = pytest.mark.skipif(not DEMO.exists(), reason=f"the embedded demo model is not at {DEMO}")


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in sorted(folder.rglob("*"))}


def _one_line(main, argv, capsys, folder: Path) -> str:
    """Run ``main(argv)``: status 2, exactly one non-empty stderr line without a traceback, ``folder`` unchanged."""
    before = _snapshot(folder)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's errors
        code = stop.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert _snapshot(folder) == before, "something was written"
    return lines[0]


def _generate(capsys, folder: Path, *extra: str, out: str | Path = "a.png") -> str:
    return _one_line(cli.main, ["generate", "-p", PROMPT, "-o", str(folder / out), "-q", *extra], capsys, folder)


# ------------------------------------------------------------------------------------------------- --device


@pytest.mark.parametrize("device", ["gpu", "garbage", "cuda:x", "CUDA", "meta"])
def test_a_device_that_is_no_device_is_one_line(device, tmp_path, capsys):
    err = _generate(capsys, tmp_path, "--device", device)
    assert f"--device '{device}'" in err and "expected auto, cpu, cuda or cuda:N" in err


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_machine_without_cuda_is_one_line(device, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _generate(capsys, tmp_path, "--device", device)
    assert f"--device '{device}'" in err and "no CUDA device" in err


def test_a_cuda_index_past_the_last_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _generate(capsys, tmp_path, "--device", "cuda:1")
    assert "--device 'cuda:1'" in err and "1 CUDA device(s), cuda:0 to cuda:0" in err


def test_resolve_device_accepts_what_exists():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(FlashError, match="device 'gpu' is not a device"):
        resolve_device("gpu")


# ---------------------------------------------------------------------------------------------------- --out


def test_out_that_is_a_folder_is_refused_before_sampling(tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    err = _generate(capsys, tmp_path, out="folder.png")
    assert err == f"sd35-flash: error: --out '{tmp_path / 'folder.png'}' is a folder; expected a file name"


def test_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file.png").write_bytes(b"")
    err = _generate(capsys, tmp_path, out="file.png/x.png")
    assert f"'{tmp_path / 'file.png'}' is a file, not a folder" in err and "--out" in err


def test_out_in_a_folder_without_write_permission_is_one_line(tmp_path, capsys, monkeypatch):
    """Root ignores permission bits, so the denial is made by ``os.access`` here; the check also probes."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode))
    err = _generate(capsys, tmp_path)
    assert f"cannot write in folder '{tmp_path}'" in err and "--out" in err


def test_out_where_no_file_can_be_made_is_one_line(tmp_path, capsys):
    """/proc and /sys take no new files, for root too: the probe file finds that out before sampling."""
    for folder in ("/proc", "/sys"):
        err = _one_line(cli.main, ["generate", "-p", PROMPT, "-o", f"{folder}/x.png", "-q"], capsys, tmp_path)
        assert f"--out '{folder}/x.png': cannot write in folder '{folder}'" in err


def test_out_with_a_name_too_long_for_the_file_system_is_one_line(tmp_path, capsys):
    err = _generate(capsys, tmp_path, out="a" * 296 + ".png")
    assert "--out" in err and "is 300 bytes" in err and "allows 255" in err


def test_a_batch_whose_second_file_is_a_folder_writes_nothing(tmp_path, capsys):
    (tmp_path / "out_1.png").mkdir()
    err = _generate(capsys, tmp_path, "--batch", "3", out="out.png")
    assert f"--out '{tmp_path / 'out_1.png'}' is a folder" in err
    assert not (tmp_path / "out_0.png").exists()


def test_a_full_disk_names_the_output_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    err = _generate(capsys, tmp_path, out="x.png")
    assert err == f"sd35-flash: error: cannot write '{tmp_path / 'x.png'}': No space left on device"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- texts and numbers


@pytest.mark.parametrize("option", ["--prompt", "--negative"])
def test_text_that_is_not_utf8_is_one_line_naming_the_option(option, tmp_path, capsys):
    """Python hands bytes that are not UTF-8 to ``sys.argv`` as lone surrogates (\\xff -> \\udcff)."""
    argv = ["generate", "-p", PROMPT, "-o", str(tmp_path / "a.png"), "-q", option, "a \udcff"]
    err = _one_line(cli.main, argv, capsys, tmp_path)
    assert err == f"sd35-flash: error: {option} is not valid UTF-8 text (byte 0xff at character 3)"


def test_a_prompt_of_raw_bytes_from_the_shell_is_one_line(tmp_path):
    """The real process: argv bytes as a shell passes ``-p $'a \\xff'``, stderr as the user sees it."""
    result = subprocess.run([sys.executable, "-m", "sd35_flash.flash_core.cli", "generate", "-p", b"a \xff",
                             "-o", str(tmp_path / "a.png"), "-q"], capture_output=True, timeout=300)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.splitlines() == ["sd35-flash: error: --prompt is not valid UTF-8 text (byte 0xff at character 3)"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [str(2**64), "-1", "1e3", "abc"])
def test_seeds_outside_comfyuis_range_are_one_line(seed, tmp_path, capsys):
    err = _generate(capsys, tmp_path, "--seed", seed)
    assert f"argument --seed: expected a whole number from 0 to {2**64 - 1}" in err and f"got '{seed}'" in err


def test_the_largest_comfyui_seed_is_accepted():
    args = cli.build_parser().parse_args(["generate", "-p", "x", "-o", "a.png", "--seed", str(2**64 - 1)])
    assert args.seed == 2**64 - 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc"])
def test_cfg_must_be_a_finite_number(value, tmp_path, capsys):
    err = _generate(capsys, tmp_path, f"--cfg={value}")  # "--cfg -inf" would read -inf as an option
    assert "argument --cfg: expected a" in err and f"got '{value}'" in err


@pytest.mark.parametrize(("option", "value"), [("--steps", "four"), ("--batch", "0"), ("--width", "-16"),
                                               ("--show-at", "-1")])
def test_numbers_name_their_option_in_plain_words(option, value, tmp_path, capsys):
    err = _generate(capsys, tmp_path, option, value)
    assert f"argument {option}: expected a whole number" in err and "invalid" not in err


def test_group_size_that_is_not_a_number_is_one_line(tmp_path, capsys):
    argv = ["quantize", str(DEMO), str(tmp_path / "q.safetensors"), "--format", "int4", "--group-size", "abc"]
    err = _one_line(cli.main, argv, capsys, tmp_path)
    assert "argument --group-size: expected a whole number, 0 or more, got 'abc'" in err
    assert "invalid int value" not in err


def test_quantize_into_a_folder_is_refused_before_reading(tmp_path, capsys):
    (tmp_path / "q.safetensors").mkdir()
    argv = ["quantize", str(DEMO), str(tmp_path / "q.safetensors"), "--format", "int8", "-q"]
    err = _one_line(cli.main, argv, capsys, tmp_path)
    assert f"output '{tmp_path / 'q.safetensors'}' is a folder" in err


# ------------------------------------------------------------------------------------------------- memory


def test_a_batch_too_large_for_the_machine_is_refused_with_the_estimate(tmp_path, capsys):
    err = _generate(capsys, tmp_path, "--batch", "100000")
    assert "this run needs about" in err and "GiB" in err and "--batch 100000" in err and "--memory" in err


def test_steps_too_many_for_the_machine_are_refused_with_the_estimate(tmp_path, capsys):
    err = _generate(capsys, tmp_path, "--steps", str(10**13))
    assert "this run needs about" in err and f"{10**13} steps" in err


def test_an_explicit_memory_budget_overrides_the_machine_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 2**20)  # a machine with 1 MiB free
    err = _generate(capsys, tmp_path)
    assert "more than the 0.00 GiB free on cpu" in err
    assert cli.main(["generate", "-p", PROMPT, "-o", str(tmp_path / "a.png"), "-q", "--memory", "1"]) == 0
    assert (tmp_path / "a.png").is_file()


# ---------------------------------------------------------------------------------------------- NaN weights


def test_a_checkpoint_with_nan_weights_is_an_error_not_a_black_png(tmp_path, capsys):
    with safe_open(str(DEMO), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(DEMO))
    key = "model.diffusion_model.final_layer.adaLN_modulation.1.weight"
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    broken = tmp_path / "models" / "nan.safetensors"
    broken.parent.mkdir()
    save_file(tensors, str(broken), metadata=metadata)
    out = tmp_path / "out"
    out.mkdir()
    err = _one_line(cli.main, ["generate", "-c", str(broken), "--tokenizers", str(DEMO_TOKENIZERS), "-p", PROMPT,
                               "-o", str(out / "a.png"), "-q"], capsys, out)
    assert f"'{broken}'" in err and "NaN or infinite" in err


# --------------------------------------------------------------------------------------------- training CLI


def test_a_binary_config_file_is_one_line_naming_it(tmp_path, capsys):
    path = tmp_path / "some.bin"
    path.write_bytes(bytes(range(256)) * 4)
    err = _one_line(train_main, [str(path)], capsys, tmp_path)
    assert f"{path}: not a TOML config file (not UTF-8 text" in err and "codec" not in err


def test_a_folder_as_config_is_one_line(tmp_path, capsys):
    err = _one_line(train_main, [str(tmp_path)], capsys, tmp_path)
    assert f"{tmp_path}: is a folder; expected a TOML config file" in err


def test_training_argument_errors_are_one_line(tmp_path, capsys):
    err = _one_line(train_main, ["--stage", "nope", "x.toml"], capsys, tmp_path)
    assert "argument --stage" in err


@pytest.mark.parametrize(("content", "expected"), [
    (bytes(range(128, 256)), "is not UTF-8 text"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "format 'list'"),
    (b'{"format": "sd35_flash.teacher_data/1"}', "'settings' is missing"),
])
def test_a_teacher_data_index_that_is_not_one_is_refused_naming_it(tmp_path, content, expected):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ConfigError) as info:
        TeacherData.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "manifest.json") in message and expected in message and "\n" not in message


def test_a_binary_teacher_data_index_through_the_training_cli(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_bytes(bytes(range(128, 256)))
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\nteacher = "{DEMO}"\n[data]\ndir = "{data}"\n[train]\nout = "{tmp_path / "run"}"\n')
    before = _snapshot(data)
    assert train_main([str(config), "--stage", "pretrain", "-q"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip().splitlines() == [
        f"sd35-flash-train: error: teacher data: '{data / 'manifest.json'}' is not UTF-8 text (byte 0x80 at "
        "offset 0); expected the teacher-data manifest written by the data stage"]
    assert _snapshot(data) == before


# ------------------------------------------------------------------------------ the entry points' shared guard


@pytest.mark.parametrize(("raised", "status", "says"), [
    (FlashError("bad file 'x.safetensors'"), 2, "prog: error: bad file 'x.safetensors'"),
    (ConfigError("train.lr: expected a number"), 2, "prog: error: train.lr: expected a number"),
    (OSError(28, "No space left on device"), 2, "prog: error: [Errno 28] No space left on device"),
    (MemoryError(), 2, "prog: error: out of memory"),
    (KeyboardInterrupt(), 130, "prog: interrupted; resume with --resume"),
    (atomic.Terminated(), 143, "prog: stopped (SIGTERM); resume with --resume"),
])
def test_every_entry_point_ends_a_failure_or_a_stop_in_one_line(raised, status, says, capsys):
    def work() -> int:
        raise raised

    assert cli.run_guarded("prog", work, "; resume with --resume") == status
    err = capsys.readouterr().err
    assert err.startswith(says) and len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_unexpected_error_is_not_hidden():
    def work() -> int:
        raise RuntimeError("a bug")  # not an out-of-memory error: a traceback is what a bug should give

    with pytest.raises(RuntimeError, match="a bug"):
        cli.run_guarded("prog", work)
