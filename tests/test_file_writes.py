"""Issue 12 item 4: files the project writes get the umask's permissions, are whole or absent, leave no temporary
file when a write fails or the process is stopped, and stale temporary files of ours are cleaned up."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from sd35_flash.flash_core import atomic, checkpoint, cli
from sd35_flash.flash_core.atomic import OutputError, atomic_write, check_destination, remove_stale_temps
from sd35_flash.training import data
from sd35_flash.training.toyworld import build


@pytest.fixture
def umask():
    """Set the process umask for one test; restored after."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _writers(folder: Path) -> dict[str, Path]:
    """Each writer of the project, used once; returns name -> file written."""
    source = folder / "source.bin"
    source.write_bytes(b"payload")
    cli.save_png(Image.new("RGB", (4, 4)), folder / "image.png", {"prompt": {}})
    checkpoint.atomic_save({"a": torch.ones(2)}, folder / "weights.safetensors")
    data._write_json(folder / "manifest.json", {"a": 1})
    build._copy_atomic(source, folder / "copy" / "demo.safetensors")
    atomic_write(folder / "plain.txt", lambda tmp: tmp.write_text("x"))
    return {name: folder / name for name in ("image.png", "weights.safetensors", "manifest.json",
                                              "copy/demo.safetensors", "plain.txt")}


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_permissions_the_umask_gives(mask, expected, tmp_path, umask):
    umask(mask)
    assert atomic.current_umask() == mask
    for name, path in _writers(tmp_path).items():
        assert _mode(path) == expected, name


def test_the_training_log_rewrite_follows_the_umask(tmp_path, umask):
    from sd35_flash.training.trainer import CSVLog

    umask(0o027)
    log = CSVLog(tmp_path / "log.csv", enabled=True)
    log.write(1, {"loss": 1.0})
    log.write(2, {"loss": 0.5, "fake_loss": 2.0})  # a new column: the file is rewritten through a temporary file
    assert (tmp_path / "log.csv").read_text().splitlines() == ["step,loss,fake_loss", "1,1,", "2,0.5,2"]
    assert _mode(tmp_path / "log.csv") == 0o640
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_failing_write_leaves_no_temporary_file_and_no_destination(tmp_path):
    def full(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "out.png"
    with pytest.raises(OutputError) as info:
        atomic_write(target, full)
    assert str(info.value) == f"cannot write '{target}': No space left on device"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [ValueError("bad data"), KeyboardInterrupt(), atomic.Terminated()])
def test_any_failure_or_stop_keeps_the_old_file_and_removes_the_temporary_one(error, tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"new, half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_an_error_about_another_file_is_passed_on_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        build._copy_atomic(tmp_path / "missing.bin", tmp_path / "out.bin")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_safetensors_names_the_checkpoint(tmp_path, monkeypatch):
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    target = tmp_path / "model.safetensors"
    with pytest.raises(OutputError, match=f"cannot write '{target}': No space left on device"):
        checkpoint.atomic_save({"a": torch.ones(2)}, target)
    assert list(tmp_path.iterdir()) == []


def test_the_written_files_are_whole(tmp_path):
    files = _writers(tmp_path)
    assert Image.open(files["image.png"]).size == (4, 4)
    assert torch.equal(load_file(str(files["weights.safetensors"]))["a"], torch.ones(2))
    assert files["copy/demo.safetensors"].read_bytes() == b"payload"
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_stale_temporary_files_of_ours_are_removed_before_writing(tmp_path):
    target = tmp_path / "out.png"
    two_hours_ago = time.time() - 7200
    stale = tmp_path / ".out.png.k3j_x9q2.tmp"
    fresh = tmp_path / ".out.png.a1b2c3d4.tmp"
    unrelated = [tmp_path / ".other.png.k3j_x9q2.tmp", tmp_path / ".out.png.tmp", tmp_path / "notes.txt",
                 tmp_path / ".out.png.TOOLONG99.tmp", tmp_path / "out.png.k3j_x9q2.tmp"]
    for path in [stale, fresh, *unrelated]:
        path.write_bytes(b"x")
    for path in [stale, *unrelated]:
        os.utime(path, (two_hours_ago, two_hours_ago))
    cli.save_png(Image.new("RGB", (2, 2)), target)
    assert not stale.exists()
    assert fresh.exists() and all(p.exists() for p in unrelated)
    assert target.is_file()


def test_a_stale_folder_of_our_pattern_is_left_alone(tmp_path):
    folder = tmp_path / ".out.png.k3j_x9q2.tmp"
    folder.mkdir()
    os.utime(folder, (time.time() - 7200,) * 2)
    assert remove_stale_temps(tmp_path / "out.png") == []
    assert folder.is_dir()


def test_a_long_name_still_gets_a_temporary_file_that_fits(tmp_path):
    target = tmp_path / ("n" * 245 + ".png")  # 249 bytes: fits, but not with 14 more for the temporary name
    cli.save_png(Image.new("RGB", (2, 2)), target)
    assert target.is_file() and sorted(tmp_path.iterdir()) == [target]


def test_check_destination_leaves_nothing_behind(tmp_path):
    check_destination(tmp_path / "new" / "deeper" / "out.png")
    assert list(tmp_path.iterdir()) == []  # no folder made, no probe file left
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_destination(tmp_path / "plain" / "deeper" / "out.png")


def test_sigterm_removes_the_temporary_file(tmp_path):
    """A real process stopped by SIGTERM mid-write: the handler the CLIs install unwinds it, cleanup runs."""
    target = tmp_path / "out.safetensors"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from sd35_flash.flash_core.atomic import Terminated, atomic_write, sigterm_raises

        def slow(tmp):
            tmp.write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(60)

        with sigterm_raises():
            try:
                atomic_write(Path({str(target)!r}), slow)
            except Terminated:
                print("terminated", flush=True)
                sys.exit(143)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [p.name.endswith(".tmp") for p in tmp_path.iterdir()] == [True]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert out.strip() == "terminated" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_handler_is_restored_after_the_cli(tmp_path, capsys):
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    cli.main(["info", str(tmp_path / "missing.safetensors")])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    capsys.readouterr()


def test_the_comfyui_save_node_copies_with_the_umask(tmp_path, umask, monkeypatch):
    from types import SimpleNamespace

    from sd35_flash.nodes.training import FlashTrainSave
    from sd35_flash.training.config import config_from_dict

    run, models = tmp_path / "output" / "sd35_flash" / "run", tmp_path / "checkpoints"
    run.mkdir(parents=True)
    models.mkdir()
    (run / "dmd.safetensors").write_bytes(b"student")
    monkeypatch.setitem(sys.modules, "folder_paths", SimpleNamespace(
        get_folder_paths=lambda kind: [str(models)], get_output_directory=lambda: str(tmp_path / "output")))
    umask(0o022)
    FlashTrainSave().save(config_from_dict({"train": {"out": str(run)}}), "dmd", "student")
    assert [p.name for p in models.iterdir()] == ["student_00001_.safetensors"]
    assert (models / "student_00001_.safetensors").read_bytes() == b"student"
    assert _mode(models / "student_00001_.safetensors") == 0o644
