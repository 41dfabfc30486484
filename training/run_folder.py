"""A run folder (``train.out``) belongs to one run: its record, its lock, and what a stopped process left there.

**The record**, ``run.json`` in the run folder, holds one entry per training stage: the stage's *run* (an id made
of the config hash and the creation time, written when the stage starts from step 0) and the steps of the states
that run saved, in the order it saved them. ``--resume`` continues that run: the newest state by the record (not
the largest number among the file names), falling back to the one before when it is missing, truncated or
damaged, with a warning naming both (the unreadable file is renamed ``*.unreadable``). Starting a stage from
step 0 where another run's states are is refused unless ``overwrite``: then that run's states, its record entry
and its log are moved to ``replaced/<stage>-<run id>/`` in the run folder (nothing is deleted; delete that folder
to free the space). A state folder written before records existed is adopted on ``--resume``, its files in step
order.

**The lock**, ``train.lock`` in the run folder, holds the owner's pid, host and start time and an advisory
``flock`` while a process trains there: a second process is refused with one line naming the owner. A lock whose
pid is no longer running on this host is stale and taken over with a warning; one from another host is
refused (its process cannot be checked from here). Under torchrun rank 0 alone takes it.

**Leftovers**: with the lock held, temporary files of :func:`..flash_core.atomic.atomic_write` for the files the
trainer writes (states, record, logs, outputs, preview grids) cannot belong to a live writer, so they are removed,
whatever their age.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..flash_core.atomic import atomic_write, remove_temps
from .state import STATE_PATTERN, StateError, TrainingError, list_states, read_state, state_name

log = logging.getLogger(__name__)

RECORD = "run.json"
RECORD_FORMAT = "sd35_flash.run/1"
MAX_RECORD_BYTES = 1 << 20
LOCK = "train.lock"
REPLACED = "replaced"
UNREADABLE = ".unreadable"
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_STEP = 10**12
TRAINED_STAGES = ("teacher", "pretrain", "dmd", "split")
# What the trainer writes in the run folder (and its samples/ and state/<stage>/ folders): whose temporary files
# a locked start removes.
RUN_FOLDER_FILES = re.compile(r"(teacher|pretrain|dmd|branch_high|branch_low|merged)\.safetensors|log_\w+\.csv"
                              r"|config\.toml|replicas_\w+\.txt|run\.json")
SAMPLE_FILES = re.compile(r"\w+_\d+\.png")
STATE_FILES = re.compile(r"step_\d+\.safetensors")


class RunFolderError(TrainingError):
    """The run folder holds another run, is in use, or its record cannot be read."""


# ------------------------------------------------------------------------------------------------ the record


@dataclass
class StageRun:
    """One stage's run in the folder: started at step 0 by one command, continued by ``--resume``."""

    run: str
    config_hash: str = ""
    created: str = ""
    host: str = ""
    pid: int = 0
    states: list[int] = field(default_factory=list)  # steps, in the order the run saved them (newest last)
    adopted: bool = False  # made on --resume from state files written before records existed

    @classmethod
    def new(cls, config_hash: str) -> StageRun:
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.6f}"[1:] + "Z"
        return cls(run=f"{config_hash or 'config'}-{stamp}", config_hash=config_hash,
                   created=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)), host=socket.gethostname(),
                   pid=os.getpid())

    def newest(self) -> int | None:
        return self.states[-1] if self.states else None


def _bad(path: Path, what: str) -> RunFolderError:
    return RunFolderError(f"'{path}': {what}; expected the run record the trainer writes (move the file away to "
                          "start the folder over)")


def _stage_run(path: Path, stage: str, entry) -> StageRun:
    """One stage's entry of the record, every field checked."""
    where = f"stages.{stage}"
    if not isinstance(entry, dict):
        raise _bad(path, f"'{where}' is {type(entry).__name__}, not an object")
    run = entry.get("run")
    if not isinstance(run, str) or not RUN_ID.fullmatch(run):
        raise _bad(path, f"'{where}.run' is {run!r}; expected an id of letters, digits, '.', '_' and '-'")
    for key in ("config_hash", "created", "host"):
        if not isinstance(entry.get(key, ""), str):
            raise _bad(path, f"'{where}.{key}' is {entry[key]!r}; expected text")
    pid, adopted, states = entry.get("pid", 0), entry.get("adopted", False), entry.get("states")
    if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(adopted, bool):
        raise _bad(path, f"'{where}.pid' or '{where}.adopted' is not a number / true or false")
    if not isinstance(states, list) or any(not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_STEP
                                           for s in states) or len(set(states)) != len(states):
        raise _bad(path, f"'{where}.states' is {str(states)[:80]}; expected a list of distinct step numbers")
    return StageRun(run=run, config_hash=entry.get("config_hash", ""), created=entry.get("created", ""),
                    host=entry.get("host", ""), pid=pid, states=list(states), adopted=adopted)


@dataclass
class RunRecord:
    """``run.json``: the run of each stage in the folder and the states it saved."""

    out: Path
    stages: dict[str, StageRun] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.out / RECORD

    @classmethod
    def load(cls, out: Path) -> RunRecord:
        """The folder's record (empty when there is none), checked: a file that is not one is refused."""
        path = Path(out) / RECORD
        if not os.path.lexists(path):
            return cls(Path(out))
        if not path.is_file():
            raise _bad(path, "not a regular file")
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_RECORD_BYTES + 1)
        except OSError as err:
            raise RunFolderError(f"'{path}': cannot read the run record ({err.strerror or err})") from None
        if len(raw) > MAX_RECORD_BYTES:
            raise _bad(path, f"larger than {MAX_RECORD_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise _bad(path, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
        except ValueError as err:
            raise _bad(path, f"not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise _bad(path, f"format {data.get('format') if isinstance(data, dict) else type(data).__name__!r}, "
                             f"not '{RECORD_FORMAT}'")
        stages = data.get("stages")
        if not isinstance(stages, dict) or any(s not in TRAINED_STAGES for s in stages):
            raise _bad(path, f"'stages' must be an object with keys among {', '.join(TRAINED_STAGES)}")
        return cls(Path(out), {stage: _stage_run(path, stage, entry) for stage, entry in stages.items()})

    def save(self) -> None:
        text = json.dumps({"format": RECORD_FORMAT, "stages": {k: asdict(v) for k, v in self.stages.items()}},
                          indent=1) + "\n"
        atomic_write(self.path, lambda tmp: tmp.write_text(text))


def state_folder(out: Path, stage: str) -> Path:
    return Path(out) / "state" / stage


def _steps_on_disk(out: Path, stage: str) -> list[int]:
    return [int(STATE_PATTERN.search(p.name).group(1)) for p in list_states(state_folder(out, stage))]


def _owner(stage_run: StageRun | None, steps_on_disk: list[int]) -> str:
    """Who the states of a stage belong to, for a message."""
    if stage_run is not None and stage_run.states:
        return f"run {stage_run.run} (newest state: step {stage_run.newest()})"
    return f"a run with no record (state files up to step {max(steps_on_disk)})"


def check_start(out: Path, stage: str, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, to start ``stage`` from step 0 where another run's states are, unless
    ``overwrite`` (or ``resume``) says what to do with them."""
    if resume or overwrite:
        return
    current = RunRecord.load(out).stages.get(stage)
    on_disk = _steps_on_disk(out, stage)
    if on_disk or (current is not None and current.states):
        raise RunFolderError(f"'{out}' holds the {stage} states of {_owner(current, on_disk)}; pass --resume to "
                             "continue it or --overwrite to start over")


def start_stage(out: Path, stage: str, config_hash: str, resume: bool, overwrite: bool) -> StageRun:
    """The run ``stage`` trains in ``out``, written to the record: this folder's run when resuming
    (:func:`continued_run`), else a new one once :func:`check_start` allows it (with ``overwrite`` the old run is
    moved aside first: :func:`move_aside`)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or start it over")
    check_start(out, stage, resume, overwrite)
    record = RunRecord.load(out)
    current, on_disk = record.stages.get(stage), _steps_on_disk(out, stage)
    if resume:
        current = continued_run(out, stage, current, on_disk, config_hash)
    else:
        if on_disk or (current is not None and current.states):
            destination = move_aside(out, stage, current)
            log.warning("%s: --overwrite moved the states, record and log of %s to '%s' (delete that folder to "
                        "free the space)", stage, _owner(current, on_disk), destination)
        current = StageRun.new(config_hash)
    record.stages[stage] = current
    record.save()
    return current


def continued_run(out: Path, stage: str, current: StageRun | None, on_disk: list[int],
                  config_hash: str) -> StageRun:
    """The run ``--resume`` continues: the recorded one (state files it did not record are ignored, with a
    warning), else one adopting the state files of a folder written before records existed, else a new one."""
    if current is not None:
        stray = sorted(set(on_disk) - set(current.states))
        if stray:
            log.warning("%s: ignoring state files that run %s did not record: %s", stage, current.run,
                        ", ".join(state_name(s) for s in stray))
        return current
    current = StageRun.new(config_hash)
    if on_disk:
        current.states, current.adopted = sorted(on_disk), True
        log.warning("%s: '%s' has no record of the run that saved its states (an older version); resuming them in "
                    "step order", stage, out)
    return current


def _free_name(folder: Path) -> Path:
    candidate, n = folder, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    return candidate


def move_aside(out: Path, stage: str, current: StageRun | None) -> Path:
    """Move ``stage``'s state files (recorded or not, unreadable ones too), its record entry and its log (CSV
    and TensorBoard) to ``out/replaced/<stage>-<run id>/``; returns that folder."""
    destination = _free_name(Path(out) / REPLACED / f"{stage}-{current.run if current else 'unrecorded'}")
    destination.mkdir(parents=True)
    folder = state_folder(out, stage)
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if STATE_PATTERN.search(path.name) or path.name.endswith(UNREADABLE):
            os.replace(path, destination / path.name)
    for path in (Path(out) / f"log_{stage}.csv", Path(out) / "tensorboard" / f"log_{stage}"):
        if os.path.lexists(path):
            os.replace(path, destination / path.name)
    if current is not None:
        text = json.dumps({"format": RECORD_FORMAT, "stages": {stage: asdict(current)}}, indent=1) + "\n"
        atomic_write(destination / RECORD, lambda tmp: tmp.write_text(text))
    return destination


# ------------------------------------------------------------------------------------------------ resuming


@dataclass
class FoundState:
    """A state file read whole and checked (:func:`..state.read_state`), ready to load."""

    step: int
    path: Path
    meta: dict
    tensors: dict


def _read_own(path: Path, step: int, current: StageRun) -> FoundState:
    """Read a recorded state and check that it is the one recorded: its step, and this run's id."""
    meta, tensors = read_state(path)
    if meta["step"] != step:
        raise StateError(f"'{path}' holds step {meta['step']}, not {step}")
    owner = meta["extra"].get("run")
    if owner != current.run and not current.adopted:  # an adopted folder's files may name no run, or any
        raise StateError(f"'{path}' was saved by run {owner}, not by run {current.run} that recorded it")
    return FoundState(step, path, meta, tensors)


def newest_state(out: Path, stage: str, current: StageRun, repair: bool = False) -> FoundState | None:
    """The newest state ``current`` recorded that reads whole: newer unreadable ones are skipped with one warning
    naming them and the one used (with ``repair`` they are renamed ``*.unreadable`` and dropped from the record).
    None when the run saved none; a :class:`RunFolderError` when none of its states reads."""
    folder, failures = state_folder(out, stage), []
    for step in reversed(current.states):
        try:
            found = _read_own(folder / state_name(step), step, current)
        except StateError as err:
            failures.append((step, str(err)))
            continue
        if failures:
            _skip(out, stage, current, failures, repair)
            log.warning("%s: %s; resuming from '%s' (step %d)", stage, "; ".join(f for _, f in failures),
                        found.path, found.step)
        return found
    if failures:
        raise RunFolderError(f"cannot resume {stage} in '{out}': no state of run {current.run} reads whole: "
                             f"{'; '.join(f for _, f in failures)}; pass --overwrite to start over")
    return None


def _skip(out: Path, stage: str, current: StageRun, failures: list[tuple[int, str]], repair: bool) -> None:
    """Drop unreadable states from the record and rename their files ``*.unreadable`` (kept, never read)."""
    if not repair:
        return
    for step, _ in failures:
        path = state_folder(out, stage) / state_name(step)
        with contextlib.suppress(OSError):
            if path.is_file():
                os.replace(path, path.with_name(path.name + UNREADABLE))
    bad = {step for step, _ in failures}
    current.states = [s for s in current.states if s not in bad]
    record = RunRecord.load(out)
    record.stages[stage] = current
    record.save()


def stage_state(out: Path, stage: str) -> Path | None:
    """The newest readable state of ``stage``'s run in ``out`` (another stage's, read only), else None."""
    current = RunRecord.load(out).stages.get(stage)
    if current is None:
        on_disk = _steps_on_disk(out, stage)
        if not on_disk:
            return None
        current = StageRun(run="unrecorded", states=sorted(on_disk), adopted=True)
    try:
        found = newest_state(out, stage, current)
    except RunFolderError:
        return None
    return None if found is None else found.path


def record_state(out: Path, stage: str, current: StageRun, step: int, keep_last: int) -> None:
    """Record a state ``current`` just saved as its newest, then delete its states beyond the newest
    ``keep_last`` (the record first: a stop in between leaves a file, never a record of a missing one)."""
    current.states = [s for s in current.states if s != step] + [step]
    dropped, current.states = current.states[:-keep_last], current.states[-keep_last:]
    record = RunRecord.load(out)
    record.stages[stage] = current
    record.save()
    for old in dropped:
        (state_folder(out, stage) / state_name(old)).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ the lock


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a process of another user counts)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        try:
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _flock(fd: int) -> bool | None:
    """Take the advisory lock on ``fd`` without waiting: True, False when another holds it, None where the file
    system (or the platform) has none."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _read_owner(fd: int) -> dict | None:
    """The lock file's owner (pid, host, since), or None when it is empty or not ours."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        owner = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int) or not isinstance(owner.get("host"), str):
        return None
    return owner


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "another process"
    return f"process {owner['pid']} on {owner['host']} (since {owner.get('since', 'an unknown time')})"


class RunLock:
    """``train.lock`` in a run folder, held while a process trains there (see the module's docstring)."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, out: Path) -> RunLock:
        """Take the lock of run folder ``out`` (made if missing), or refuse naming the process that holds it."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK
        for _ in range(10):
            fd = _open_lock(path)
            try:
                taken = cls._take(path, fd, out)
            except BaseException:
                os.close(fd)
                raise
            if taken is not None:
                return taken
            os.close(fd)  # the file was replaced while we waited: try the new one
        raise RunFolderError(f"'{path}': the lock file keeps changing; is another training starting there?")

    @classmethod
    def _take(cls, path: Path, fd: int, out: Path) -> RunLock | None:
        locked = _flock(fd)
        if locked is False:
            raise RunFolderError(f"'{out}' is in use: {_describe(_read_owner(fd))} is training there (lock file "
                                 f"'{path}'); wait for it to end")
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                return None
        except OSError:  # removed by its owner meanwhile
            return None
        owner = _read_owner(fd)
        if owner is not None and owner["pid"] != os.getpid():
            _check_owner(path, out, owner)
        elif owner is None and os.fstat(fd).st_size:
            if locked is not True:  # no advisory lock to tell whether a writer holds it
                raise RunFolderError(f"'{path}' is not a lock file this trainer wrote; delete it if no training "
                                     f"runs in '{out}'")
            log.warning("'%s': replacing a lock file this trainer did not write (no process holds it)", path)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        with contextlib.suppress(OSError):
            os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file (when it is still ours) and let go of it."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _open_lock(path: Path) -> int:
    if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
        raise RunFolderError(f"'{path}' is not a regular file; expected the run folder's lock file")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as err:
        raise RunFolderError(f"'{path}': cannot open the lock file ({err.strerror or err})") from None


def _check_owner(path: Path, out: Path, owner: dict) -> None:
    """Refuse a lock another live process (or a process on another host) holds; warn when taking over a stale
    one: its pid no longer runs on this host."""
    if owner["host"] != socket.gethostname():
        raise RunFolderError(f"'{out}' is in use: {_describe(owner)} holds its lock file '{path}'; if no "
                             "training runs there, delete the lock file")
    if _pid_alive(owner["pid"]):
        raise RunFolderError(f"'{out}' is in use: {_describe(owner)} holds its lock file '{path}'; wait for it to "
                             "end, or delete the lock file if that process is not training")
    log.warning("'%s': taking over the lock of process %d (no longer running on this host)", path, owner["pid"])


# ------------------------------------------------------------------------------------------------ leftovers


def remove_leftovers(out: Path) -> list[Path]:
    """Temporary files of a stopped write in the run folder, its ``samples/`` and every ``state/<stage>/``
    (call with the lock held). Returns those removed."""
    out = Path(out)
    removed = remove_temps(out, RUN_FOLDER_FILES) + remove_temps(out / "samples", SAMPLE_FILES)
    states = out / "state"
    for folder in sorted(states.iterdir()) if states.is_dir() else []:
        if folder.is_dir() and not folder.is_symlink():
            removed += remove_temps(folder, STATE_FILES)
    if removed:
        log.info("'%s': removed %d temporary files left by a stopped write", out, len(removed))
    return removed


# ------------------------------------------------------------------------------------------------ logs


def cut_log(path: Path, step: int) -> None:
    """Cut the CSV log ``path`` back to the rows of steps up to ``step`` (the state a run resumes from), one per
    step: the steps trained again after a resume are logged once. A partial last line (a stopped append) goes."""
    if not os.path.lexists(path):
        return
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RunFolderError(f"'{path}': cannot read the training log ({err}); move it away to start a new one") \
            from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    try:
        rows = list(csv.reader(lines))
    except csv.Error as err:
        raise RunFolderError(f"'{path}': not a CSV training log ({err}); move it away to start a new one") from None
    if not rows or not rows[0] or rows[0][0] != "step":
        raise RunFolderError(f"'{path}': its first column is not 'step'; expected a training log (move it away to "
                             "start a new one)")
    header, kept = rows[0], {}
    for row in rows[1:]:
        if len(row) == len(header) and row[0].isdigit() and int(row[0]) <= step:
            kept[int(row[0])] = row
    if len(kept) == len(rows) - 1 and text.endswith("\n") and list(kept) == sorted(kept):
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(kept[s] for s in sorted(kept))
    data = buffer.getvalue()
    atomic_write(path, lambda tmp: tmp.write_text(data, encoding="utf-8", newline=""))
