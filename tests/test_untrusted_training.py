"""Issue 13 items 3, 4 (non-finite losses) and 5: headless training does not lose work.

Each attack of the issue is a regression test here: a run folder holding another run, --overwrite, a truncated
or foreign newest state, every state unreadable, a damaged run record or state file, a lock held by a live
process (in this process, in another, on another host), a stale lock, two processes on one folder (also under
torchrun), log rows duplicated by kill-and-resume, lr = inf and a diverging lr, Ctrl-C / SIGTERM in the middle
of an update, temporary files of a killed write. Kill-and-resume stays bit-exact, a fallback to an older state
included (per-step seeding recomputes the steps in between exactly).

A tiny teacher and its teacher data are made once per module; each run trains a few pretraining steps on CPU.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd35_flash.flash_core.atomic import atomic_write
from sd35_flash.flash_core.console import run_guarded
from sd35_flash.training.cli import main as train_main
from sd35_flash.training.config import config_from_dict, to_toml
from sd35_flash.training.distributed import World
from sd35_flash.training.run_folder import LOCK, RECORD, RunLock, RunRecord
from sd35_flash.training.stages import pretrain as pretrain_stage
from sd35_flash.training.state import StateError, load_state, save_state
from sd35_flash.training.trainer import NonFiniteLossError, Trainer, run_stages

from factories import write_tiny_checkpoint

ONE_STEP_AT_A_TIME = {"checkpoint_every": 1, "keep_last": 100}


def base_config(root: Path, tokenizers: Path, out: Path, **sections) -> dict:
    config = {
        "model": {"teacher": str(root / "teacher.safetensors"), "tokenizers": str(tokenizers)},
        "data": {"prompts": str(root / "prompts.txt"), "dir": str(root / "data"), "samples_per_prompt": 2,
                 "teacher_steps": 8, "width": 32, "height": 32, "shard_size": 4},
        "train": {"out": str(out), "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "keep_last": 3},
        "pretrain": {"iterations": 6},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


@pytest.fixture(scope="module")
def root(module_tmp, tokenizers_dir) -> Path:
    """A tiny teacher, prompts and their teacher data (the data stage, run once)."""
    root = module_tmp("untrusted_training")
    write_tiny_checkpoint(root / "teacher.safetensors")
    (root / "prompts.txt").write_text("a red circle\na blue square\na green triangle\n")
    run_stages(config_from_dict(base_config(root, tokenizers_dir, root / "data_run")), "data", progress=False)
    return root


@pytest.fixture
def make(root, tokenizers_dir, tmp_path):
    """``make(name, **sections)``: a config training into ``tmp_path/name``."""
    def make(name: str, **sections):
        return config_from_dict(base_config(root, tokenizers_dir, tmp_path / name, **sections))
    return make


def toml(config, path: Path) -> str:
    path.write_text(to_toml(config))
    return str(path)


def cli(*argv: str) -> int:
    return train_main([*argv, "--threads", "1", "--quiet"])


def stderr_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip()]


class Killed(Exception):
    """A crash (not a user's stop): nothing is saved on the way out."""


def kill_after(n: int):
    def on_step(stage, step, total, values):
        if step == n:
            raise Killed
    return on_step


def train(config, stage: str = "pretrain", resume: bool = False, **kwargs) -> Trainer:
    trainer = Trainer(config, World(), progress=False, **kwargs)
    trainer.run(stage, resume=resume)
    return trainer


def killed_beside_a_whole_run(make, first: str = "whole"):
    """``(first, broken)``: a run trained to the end, and one of the same config killed at step 5 (states at
    steps 2 and 4)."""
    done = make(first)
    train(done)
    broken = make("broken")
    with pytest.raises(Killed):
        train(broken, on_step=kill_after(5))
    return done, broken


def states(config, stage: str = "pretrain") -> Path:
    return Path(config.train.out) / "state" / stage


def state_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_state(a: Path, b: Path) -> None:
    ours, theirs = state_tensors(a), state_tensors(b)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{a.name}: {different[:3]} differ"


def recorded(config, stage: str = "pretrain"):
    return RunRecord.load(Path(config.train.out)).stages[stage]


def log_steps(config, stage: str = "pretrain") -> list[int]:
    with (Path(config.train.out) / f"log_{stage}.csv").open(newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------------- one run per folder


def test_a_new_run_where_another_runs_states_are_is_refused(make, tmp_path, capsys):
    config = make("run", pretrain={"iterations": 4})
    path = toml(config, tmp_path / "run.toml")
    assert cli(path, "--stage", "pretrain") == 0
    capsys.readouterr()
    old = recorded(config)
    before = {p.name: p.read_bytes() for p in states(config).iterdir()}
    assert cli(path, "--stage", "pretrain") == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("sd35-flash-train: error: ") and f"'{config.train.out}'" in line
    assert f"run {old.run}" in line and "pass --resume to continue it or --overwrite to start over" in line
    assert {p.name: p.read_bytes() for p in states(config).iterdir()} == before  # nothing touched
    assert not (Path(config.train.out) / LOCK).exists()  # the lock went with the refusal
    assert cli(path, "--stage", "all") == 2  # checked before the data stage and any other work
    assert "holds the pretrain states" in stderr_lines(capsys)[0]


def test_overwrite_moves_the_old_run_aside_and_starts_over(make, tmp_path, capsys):
    config = make("run", pretrain={"iterations": 4})
    path = toml(config, tmp_path / "run.toml")
    assert cli(path, "--stage", "pretrain") == 0
    old, old_log = recorded(config), (Path(config.train.out) / "log_pretrain.csv").read_text()
    old_states = {p.name: p.read_bytes() for p in states(config).iterdir()}
    capsys.readouterr()
    assert cli(path, "--stage", "pretrain", "--overwrite") == 0
    [warning] = stderr_lines(capsys)
    aside = Path(config.train.out) / "replaced" / f"pretrain-{old.run}"
    assert warning.startswith("sd35-flash-train: warning: pretrain: --overwrite moved") and f"'{aside}'" in warning
    assert {p.name: p.read_bytes() for p in aside.glob("step_*")} == old_states  # kept whole, not deleted
    assert (aside / "log_pretrain.csv").read_text() == old_log
    assert json.loads((aside / RECORD).read_text())["stages"]["pretrain"]["run"] == old.run
    new = recorded(config)
    assert new.run != old.run and new.states == [2, 4]
    assert log_steps(config) == [1, 2, 3, 4]  # a log of its own, not appended to the old one
    with pytest.raises(SystemExit) as stop:  # they exclude each other: argparse's one line
        cli(path, "--stage", "pretrain", "--resume", "--overwrite")
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_resume_takes_the_runs_own_newest_state_not_the_largest_step_number(make, caplog):
    """The issue's case: a larger step number in the folder that this run did not save is not resumed, and
    keep_last never deletes the run's own states in its favour."""
    whole = make("whole", train=ONE_STEP_AT_A_TIME, pretrain={"iterations": 4})
    train(whole)
    other = make("other", pretrain={"iterations": 6})
    train(other)
    broken = make("broken", train={"checkpoint_every": 1, "keep_last": 2}, pretrain={"iterations": 4})
    with pytest.raises(Killed):
        train(broken, on_step=kill_after(3))
    shutil.copy(states(other) / "step_000006.safetensors", states(broken) / "step_000006.safetensors")
    caplog.set_level("WARNING")
    train(broken, resume=True)
    assert [r.getMessage() for r in caplog.records] == [
        f"pretrain: ignoring state files that run {recorded(broken).run} did not record: step_000006.safetensors"]
    assert recorded(broken).states == [3, 4]
    assert (states(broken) / "step_000006.safetensors").exists()  # not its own: neither resumed nor deleted
    assert_same_state(states(broken) / "step_000004.safetensors", states(whole) / "step_000004.safetensors")


def test_a_truncated_newest_state_falls_back_to_the_previous_one_and_the_result_is_bit_exact(make, caplog):
    whole, broken = killed_beside_a_whole_run(make)  # states at steps 2 and 4
    newest = states(broken) / "step_000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:5000])
    caplog.set_level("WARNING")
    train(broken, resume=True)  # steps 3 and 4 are trained again
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"'{newest}' is unreadable" in warning
    assert f"resuming from '{states(broken) / 'step_000002.safetensors'}' (step 2)" in warning
    assert (states(broken) / "step_000004.safetensors.unreadable").exists()  # kept aside, never read again
    assert recorded(broken).states == [2, 4, 6]
    for step in (4, 6):
        assert_same_state(states(broken) / f"step_{step:06d}.safetensors",
                          states(whole) / f"step_{step:06d}.safetensors")
    assert log_steps(broken) == [1, 2, 3, 4, 5, 6]


def test_a_folder_from_before_run_records_is_adopted_on_resume(make, caplog):
    """States written by an older version (no run.json, no run id in them) resume in step order."""
    whole, broken = killed_beside_a_whole_run(make)
    (Path(broken.train.out) / RECORD).unlink()
    caplog.set_level("WARNING")
    train(broken, resume=True)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "has no record of the run that saved its states" in warning
    assert recorded(broken).adopted and recorded(broken).states == [2, 4, 6]
    assert_same_state(states(broken) / "step_000006.safetensors", states(whole) / "step_000006.safetensors")


def test_a_newest_state_saved_by_another_run_is_skipped(make, caplog):
    other, broken = killed_beside_a_whole_run(make, "other")
    shutil.copy(states(other) / "step_000004.safetensors", states(broken) / "step_000004.safetensors")
    caplog.set_level("WARNING")
    train(broken, resume=True)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"was saved by run {recorded(other).run}, not by run {recorded(broken).run}" in warning
    assert "(step 2)" in warning


def test_every_state_unreadable_is_one_line_and_changes_nothing(make, tmp_path, capsys):
    config = make("run")
    path = toml(config, tmp_path / "run.toml")
    with pytest.raises(Killed):
        train(config, on_step=kill_after(5))
    (states(config) / "step_000004.safetensors").write_bytes(b"\0" * 10)
    (states(config) / "step_000002.safetensors").unlink()
    before = sorted(p.name for p in states(config).iterdir())
    assert cli(path, "--stage", "pretrain", "--resume") == 2
    [line] = stderr_lines(capsys)
    assert line.startswith("sd35-flash-train: error: cannot resume pretrain") and "no state of run" in line
    assert "step_000004.safetensors' is unreadable" in line and "step_000002.safetensors' is missing" in line
    assert "pass --overwrite to start over" in line
    assert sorted(p.name for p in states(config).iterdir()) == before


@pytest.mark.parametrize(("record", "says"), [
    (b"\xff\xfe", "not UTF-8 text"),
    (b"{", "not valid JSON"),
    (b'{"format": "sd35_flash.run/1", "stages": {"pretrain": {"run": "../../x", "states": []}}}', "stages.pretrain.run"),
    (b'{"format": "sd35_flash.run/1", "stages": {"pretrain": {"run": "a", "states": ["../../etc/passwd"]}}}',
     "stages.pretrain.states"),
    (b'{"format": "sd35_flash.run/1", "stages": {"nope": {}}}', "'stages' must be an object"),
    (b'{"format": "other"}', "format 'other'"),
])
def test_a_damaged_run_record_is_one_line_naming_it(make, tmp_path, capsys, record, says):
    config = make("run")
    path = toml(config, tmp_path / "run.toml")
    Path(config.train.out).mkdir()
    (Path(config.train.out) / RECORD).write_bytes(record)
    assert cli(path, "--stage", "pretrain", "--resume") == 2
    [line] = stderr_lines(capsys)
    assert f"'{Path(config.train.out) / RECORD}'" in line and says in line


def test_a_damaged_state_file_is_refused_with_one_line_not_a_traceback(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = save_state(tmp_path, 1, {"m": model}, {"m": optimizer}, {}, keep_last=None)
    tensors = state_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["sd35_flash.state"])

    def rewrite(name: str, tensors: dict, meta: dict | None) -> Path:
        from safetensors.torch import save_file
        save_file(tensors, str(tmp_path / name), None if meta is None else {"sd35_flash.state": json.dumps(meta)})
        return tmp_path / name

    groups = json.loads(json.dumps(meta))
    groups["optimizers"]["m"]["param_groups"][0]["lr"] = "fast"
    cases = {
        rewrite("index.safetensors", {**tensors, "optim.m.state.7::exp_avg": torch.zeros(2)}, meta): "names no parameter",
        rewrite("shape.safetensors", {**tensors, "m.weight": torch.zeros(5, 5)}, meta): "'m.weight' is torch.float32 [5, 5]",
        rewrite("moment.safetensors", {**tensors, "optim.m.state.0::exp_avg": torch.zeros(9)}, meta): "has shape [9]",
        rewrite("nan.safetensors", {**tensors, "m.bias": torch.tensor([1.0, math.nan])}, meta): "NaN or infinite",
        rewrite("nometa.safetensors", tensors, None): "no 'sd35_flash.state' metadata",
        rewrite("step.safetensors", tensors, {**meta, "step": -1}): "step -1",
        rewrite("lr.safetensors", tensors, groups): "setting 'lr' is 'fast'",
    }
    for bad, says in cases.items():
        fresh = torch.nn.Linear(3, 2)
        weight = fresh.weight.detach().clone()
        with pytest.raises(StateError) as info:
            load_state(bad, {"m": fresh}, {"m": torch.optim.AdamW(fresh.parameters())})
        assert f"'{bad}'" in str(info.value) and says in str(info.value), str(info.value)
        assert torch.equal(fresh.weight, weight), bad  # checked before anything is loaded


# ------------------------------------------------------------------------------------- the lock


def test_a_lock_held_in_this_process_refuses_a_second_training(make, tmp_path, capsys):
    config = make("run")
    path = toml(config, tmp_path / "run.toml")
    with RunLock.acquire(Path(config.train.out)):
        assert cli(path, "--stage", "pretrain") == 2
        [line] = stderr_lines(capsys)
        assert f"'{config.train.out}' is in use: process {os.getpid()} on {socket.gethostname()}" in line
        with pytest.raises(Exception, match=f"process {os.getpid()}"):
            train(config)
    assert not (Path(config.train.out) / LOCK).exists() and not states(config).exists()
    train(config)  # released: the folder is free again


def test_a_lock_file_naming_a_live_process_is_refused_naming_its_pid(make, tmp_path, capsys):
    config = make("run")
    path = toml(config, tmp_path / "run.toml")
    Path(config.train.out).mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = Path(config.train.out) / LOCK
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "today"}))
        assert cli(path, "--stage", "pretrain") == 2
        [line] = stderr_lines(capsys)
        assert f"process {sleeper.pid} on {socket.gethostname()} (since today)" in line and f"'{lock}'" in line
        assert json.loads(lock.read_text())["pid"] == sleeper.pid  # left as it was
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_from_another_host_is_refused(make, tmp_path, capsys):
    config = make("run")
    Path(config.train.out).mkdir()
    (Path(config.train.out) / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "since": "x"}))
    assert cli(toml(config, tmp_path / "run.toml"), "--stage", "pretrain") == 2
    [line] = stderr_lines(capsys)
    assert "process 1 on elsewhere.example" in line and "delete the lock file" in line


def test_a_stale_lock_is_taken_over_with_a_warning(make, tmp_path, capsys):
    config = make("run", pretrain={"iterations": 2})
    Path(config.train.out).mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid no longer runs
    lock = Path(config.train.out) / LOCK
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "since": "yesterday"}))
    assert cli(toml(config, tmp_path / "run.toml"), "--stage", "pretrain") == 0
    [warning] = stderr_lines(capsys)
    assert warning == (f"sd35-flash-train: warning: '{lock}': taking over the lock of process {gone.pid} (no "
                       "longer running on this host)")
    assert not lock.exists() and recorded(config).states == [2]


# ------------------------------------------------------------------------------------- leftovers and logs


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(make, tmp_path):
    config = make("run", pretrain={"iterations": 2})
    out = Path(config.train.out)
    (out / "state" / "pretrain").mkdir(parents=True)
    (out / "samples").mkdir()
    ours = [out / "state" / "pretrain" / ".step_000004.safetensors.k2j4h5g6.tmp", out / ".run.json.abcd_123.tmp",
            out / ".log_pretrain.csv.zz99aa11.tmp", out / "samples" / ".pretrain_000002.png.q1w2e3r4.tmp",
            out / ".pretrain.safetensors.a1b2c3d4.tmp"]
    others = [out / ".notes.txt.a1b2c3d4.tmp", out / "keep.tmp", out / ".student_init.safetensors.a1b2c3d4.tmp"]
    for path in ours + others:
        path.write_bytes(b"\0" * 100_000)  # new files: removed because the lock is held, whatever their age
    train(config)
    assert [p for p in ours if p.exists()] == []
    assert all(p.exists() for p in others)


def test_the_log_has_each_step_once_after_kill_and_resume(make):
    config = make("run", train={"checkpoint_every": 2, "log_every": 1}, pretrain={"iterations": 6})
    with pytest.raises(Killed):
        train(config, on_step=kill_after(5))  # logged 1..5, state at 4
    log = Path(config.train.out) / "log_pretrain.csv"
    with log.open("a", newline="") as f:
        f.write("6,0.123")  # a stopped append: a partial last line
    train(config, resume=True)
    assert log_steps(config) == [1, 2, 3, 4, 5, 6]
    with log.open(newline="") as f:
        assert all(len(row) == len(next(csv.reader([log.read_text().splitlines()[0]]))) for row in csv.reader(f))


# ------------------------------------------------------------------------------------- non-finite training


def test_lr_inf_stops_at_the_first_step_naming_it_and_saves_no_nan(make, capsys):
    """The issue's case (lr = inf, as a config check could let through): one line naming the step and the last
    good state, exit 2, no state or checkpoint with NaN written."""
    config = make("run", train={"checkpoint_every": 1}, pretrain={"iterations": 4})
    train(replace(config, pretrain=replace(config.pretrain, iterations=2)))  # states 1, 2: good
    config.pretrain.optim.lr = math.inf  # past the config's checks
    before = {p.name: p.read_bytes() for p in states(config).iterdir()}
    output = (Path(config.train.out) / "pretrain.safetensors").read_bytes()  # the 2-step run's

    def work() -> int:
        train(config, resume=True)
        return 0

    assert run_guarded("sd35-flash-train", work) == 2
    [line] = stderr_lines(capsys)
    good = states(config) / "step_000002.safetensors"
    assert line.startswith("sd35-flash-train: error: pretrain: the training diverged at step 3 (lr=inf")
    assert f"the last good state is '{good}' (step 2)" in line and "--resume" in line
    assert {p.name: p.read_bytes() for p in states(config).iterdir()} == before  # kept, nothing added
    assert (Path(config.train.out) / "pretrain.safetensors").read_bytes() == output  # no NaN checkpoint


def test_a_diverging_lr_through_the_cli_stops_before_saving_nan(make, tmp_path, capsys):
    config = make("run", train={"checkpoint_every": 1}, pretrain={"iterations": 8, "optim": {"lr": 1e30}})
    assert cli(toml(config, tmp_path / "run.toml"), "--stage", "pretrain") == 2
    [line] = stderr_lines(capsys)
    assert "pretrain: the training diverged at step" in line
    step = int(line.split("diverged at step ")[1].split()[0])
    assert 1 < step <= 8
    for path in states(config).glob("step_*.safetensors"):
        assert all(torch.isfinite(t).all() for t in state_tensors(path).values() if t.is_floating_point())
    assert recorded(config).newest() is not None and recorded(config).newest() < step
    assert not (Path(config.train.out) / "pretrain.safetensors").exists()


def test_the_divergence_error_is_a_flash_error_with_the_step_and_last_state(make):
    config = make("run", pretrain={"iterations": 3})
    config.pretrain.optim.lr = math.inf
    with pytest.raises(NonFiniteLossError) as info:
        train(config)
    assert info.value.step == 1 and info.value.last_state is None and "no state was saved" in str(info.value)


# ------------------------------------------------------------------------------------- user stops


@pytest.mark.parametrize(("signum", "status", "prefix"), [(signal.SIGINT, 130, ""), (signal.SIGTERM, 143, "SIGTERM: ")])
def test_a_stop_in_the_middle_of_an_update_finishes_the_step_saves_it_whole_and_says_where(
        make, tmp_path, capsys, monkeypatch, signum, status, prefix):
    whole = make("whole", train=ONE_STEP_AT_A_TIME, pretrain={"iterations": 5})
    train(whole)
    config = make("run", train={"checkpoint_every": 100}, pretrain={"iterations": 5})
    real, calls = pretrain_stage.optimizer_step, []

    def signalled(*args, **kwargs):  # the signal arrives between the backward pass and the update
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_stage, "optimizer_step", signalled)
    assert cli(toml(config, tmp_path / "run.toml"), "--stage", "pretrain") == status
    [line] = stderr_lines(capsys)
    saved = states(config) / "step_000003.safetensors"
    assert line == (f"sd35-flash-train: {prefix}pretrain stopped at step 3; state saved to '{saved}'; --resume "
                    "continues from it")
    assert_same_state(saved, states(whole) / "step_000003.safetensors")  # the whole step, not half of it
    monkeypatch.setattr(pretrain_stage, "optimizer_step", real)
    assert cli(toml(config, tmp_path / "run.toml"), "--stage", "pretrain", "--resume") == 0
    assert_same_state(states(config) / "step_000005.safetensors", states(whole) / "step_000005.safetensors")
    assert log_steps(config) == [1, 2, 3, 4, 5]


def test_two_processes_on_one_folder_and_ctrl_c_of_the_cli(make, tmp_path, capsys):
    """A real second process: while it trains, this one is refused naming its pid; its Ctrl-C ends with one
    line, status 130, and the state of its last step."""
    config = make("run", train={"checkpoint_every": 100_000}, pretrain={"iterations": 100_000})
    path = toml(config, tmp_path / "run.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sd35_flash.training", path, "--stage", "pretrain", "--quiet", "--threads", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    log = Path(config.train.out) / "log_pretrain.csv"
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert process.poll() is None and time.monotonic() < deadline, "the training did not start"
            time.sleep(0.2)
        assert cli(path, "--stage", "pretrain", "--resume") == 2
        [line] = stderr_lines(capsys)
        assert f"is in use: process {process.pid} on {socket.gethostname()}" in line
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    [line] = err.strip().splitlines()
    step = recorded(config).newest()
    assert line == (f"sd35-flash-train: pretrain stopped at step {step}; state saved to "
                    f"'{states(config) / f'step_{step:06d}.safetensors'}'; --resume continues from it")
    assert step >= 2 and log_steps(config)[-1] == step and not (Path(config.train.out) / LOCK).exists()


class Cancelled(Exception):
    """What ComfyUI's Cancel raises from the progress hook (InterruptProcessingException)."""


def test_a_cancel_in_a_worker_thread_saves_the_step_and_resume_continues(make):
    """The ComfyUI nodes' path (nodes/training.py run_stage): the trainer in a worker thread (no signal handlers
    there), Cancel registered in ``interrupts``, then a resume in the same folder."""
    import threading

    whole = make("whole", pretrain={"iterations": 4})
    train(whole)
    config = make("run", train={"checkpoint_every": 100}, pretrain={"iterations": 4})
    outcome = {}

    def cancel(stage, step, total, values):
        if step == 2:
            raise Cancelled

    def work():
        trainer = Trainer(config, World(), progress=False, on_step=cancel)
        trainer.interrupts = (KeyboardInterrupt, Cancelled)
        try:
            trainer.run("pretrain")
        except Cancelled as stop:
            outcome["stop"] = stop

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    stopped = outcome["stop"].training_stop
    assert str(stopped) == f"pretrain stopped at step 2; state saved to '{states(config) / 'step_000002.safetensors'}'"
    assert not (Path(config.train.out) / LOCK).exists()
    train(config, resume=True)
    assert_same_state(states(config) / "step_000004.safetensors", states(whole) / "step_000004.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_pretrain(config, tmp_path) -> subprocess.CompletedProcess:
    """``sd35-flash-train`` on ``config``'s pretrain stage in 2 gloo processes (torchrun), one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "sd35_flash.training", toml(config, tmp_path / "run.toml"), "--stage",
               "pretrain", "--quiet", "--threads", "1"]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=240)


def test_under_torchrun_every_rank_stops_when_rank_0_refuses_the_folder(make, tmp_path):
    """Rank 0 alone reads the folder and takes the lock; its refusal reaches the other rank, which would wait
    in a collective forever otherwise."""
    config = make("run", pretrain={"iterations": 2})
    train(config)
    result = torchrun_pretrain(config, tmp_path)
    assert result.returncode != 0
    # one line from each rank (their lines may interleave; torchrun adds its own report)
    assert result.stderr.count("pass --resume to continue it or --overwrite") == 2, result.stderr[-3000:]
    assert recorded(config).states == [2] and not (Path(config.train.out) / LOCK).exists()


def test_under_torchrun_a_divergence_stops_every_rank_at_the_next_save_without_saving_it(make, tmp_path):
    """Each rank notes its first non-finite step (no sync per step); at the next state save the ranks agree (one
    all-reduce) and all stop naming that step, before anything non-finite is written."""
    config = make("run", train={"checkpoint_every": 3}, pretrain={"iterations": 8, "optim": {"lr": 1e30}})
    result = torchrun_pretrain(config, tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("pretrain: the training diverged at step 2 (") == 2, result.stderr[-3000:]
    assert result.stderr.count("no state was saved before it") == 2
    assert not list(states(config).glob("step_*")) and not (Path(config.train.out) / "pretrain.safetensors").exists()


def test_the_start_removes_the_names_atomic_write_gives(tmp_path):
    """The cleanup's patterns follow atomic_write's temporary names for every file the trainer writes."""
    from sd35_flash.flash_core.atomic import ANY_TEMP
    from sd35_flash.training.run_folder import RUN_FOLDER_FILES, SAMPLE_FILES, STATE_FILES

    for name, pattern in (("step_000001.safetensors", STATE_FILES), ("run.json", RUN_FOLDER_FILES),
                          ("log_dmd.csv", RUN_FOLDER_FILES), ("merged.safetensors", RUN_FOLDER_FILES),
                          ("config.toml", RUN_FOLDER_FILES), ("split_000012.png", SAMPLE_FILES)):
        names: list[str] = []
        atomic_write(tmp_path / name, lambda tmp, names=names: (names.append(tmp.name), tmp.write_bytes(b"x")))
        found = ANY_TEMP.fullmatch(names[0])
        assert found and found["destination"] == name and pattern.fullmatch(name), names
