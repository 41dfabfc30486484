"""Files written whole or not at all: a temporary file beside the destination, then a rename.

Every file the project writes (PNGs, checkpoints, quantized copies, teacher data, training logs) goes through
:func:`atomic_write`. The temporary file is named ``.NAME.<random>.tmp`` (``<random>``: the 8 characters of
:mod:`tempfile`'s random part) in the destination's folder, so the rename never crosses file systems. It gets the permissions
the user's umask gives a new file (``tempfile`` makes ``0600`` files), it is removed when the write fails or is
interrupted (KeyboardInterrupt, and SIGTERM inside :func:`sigterm_raises`), and such files older than an hour
beside the destination (left by a killed process) are removed before the next write; :func:`remove_temps` removes
them whatever their age for a caller that holds its folder's lock (the trainer, at the start of a run).

:func:`check_destination` refuses, before any work, a destination that cannot be written.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import FlashError

TEMP_SUFFIX = ".tmp"
STALE_AFTER = 3600.0  # seconds: older temporary files of ours are left over from a stopped process
_RANDOM = "[a-z0-9_]{8}"  # tempfile's random part
_NAME_IN_TEMP = 200  # bytes of the destination's name kept in the temporary name (it adds 14)
_PROBE_PREFIX = ".sd35_flash_probe."


class OutputError(FlashError):
    """A file cannot be written; the message names the destination (never the temporary file)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by :func:`sigterm_raises` so cleanup runs as for Ctrl-C."""

    signum = signal.SIGTERM


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where it is shown (no change to the process), else
    by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()``: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def _temp_stem(path: Path) -> str:
    """The destination's name as the temporary name holds it: cut so ``.NAME.<random>.tmp`` stays under the
    file system's limit when ``NAME`` itself fits."""
    name = path.name
    while len(os.fsencode(name)) > _NAME_IN_TEMP:
        name = name[:-1]
    return name


def temp_pattern(path: str | os.PathLike) -> re.Pattern:
    """The names :func:`atomic_write` gives its temporary files for ``path``."""
    return re.compile(rf"\.{re.escape(_temp_stem(Path(path)))}\.{_RANDOM}{re.escape(TEMP_SUFFIX)}")


def _remove_files_where(folder: str | os.PathLike, wanted: Callable[[os.DirEntry], bool]) -> list[Path]:
    """Remove the plain files of ``folder`` that ``wanted`` picks; returns those removed. Links, folders and
    anything that cannot be read are left alone."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and wanted(entry):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def remove_stale_temps(path: str | os.PathLike, max_age: float = STALE_AFTER) -> list[Path]:
    """Remove our temporary files for ``path`` (see :func:`temp_pattern`) older than ``max_age`` seconds from
    its folder; returns those removed. Anything else, and anything that cannot be read, is left alone."""
    path = Path(path)
    pattern, cutoff = temp_pattern(path), time.time() - max_age
    return _remove_files_where(path.parent, lambda entry: bool(pattern.fullmatch(entry.name))
                               and entry.stat(follow_symlinks=False).st_mtime < cutoff)


ANY_TEMP = re.compile(rf"\.(?P<destination>.+)\.{_RANDOM}{re.escape(TEMP_SUFFIX)}")


def remove_temps(folder: str | os.PathLike, destinations: re.Pattern) -> list[Path]:
    """Remove from ``folder`` every temporary file of :func:`atomic_write` whose destination name matches
    ``destinations`` (``fullmatch``), whatever its age: for a caller that knows no other process writes there
    (it holds the folder's lock), so such files are left over from a stopped process. Returns those removed;
    links, folders and anything that cannot be read are left alone."""
    def wanted(entry: os.DirEntry) -> bool:
        found = ANY_TEMP.fullmatch(entry.name)
        return found is not None and destinations.fullmatch(found["destination"]) is not None

    return _remove_files_where(folder, wanted)


def _existing_folder(path: Path, what: str) -> Path:
    """The nearest existing folder above ``path`` (where the first new entry would be made)."""
    for folder in (path.parent, *path.parent.parents):
        if os.path.lexists(folder):
            if not folder.is_dir():
                raise OutputError(f"{what} '{path}': '{folder}' is a file, not a folder")
            return folder
    return Path(".")


def _check_name_lengths(path: Path, folder: Path, what: str) -> None:
    """Every name to be made below ``folder`` must fit the file system's limit (``NAME_MAX``)."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    new = path.relative_to(folder).parts if path.is_relative_to(folder) else (path.name,)
    for part in new:
        size = len(os.fsencode(part))
        if limit and limit > 0 and size > limit:
            raise OutputError(f"{what}: the name '{part[:24]}...{part[-8:]}' is {size} bytes; the file system "
                              f"of '{folder}' allows {limit}")


def _probe(folder: Path, path: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the check that holds for root and read-only mounts alike."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} '{path}': cannot write in folder '{folder}' (no write permission or "
                          "a read-only file system)")
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    except OSError as err:
        raise OutputError(f"{what} '{path}': cannot write in folder '{folder}' ({_reason(err)})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_destination(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse (:class:`OutputError`, naming ``what`` and ``path``) a destination that cannot be written: a
    folder or another non-file, a path under a regular file, a name longer than the file system allows, or a
    folder this process cannot create files in. Makes no folder and leaves no file."""
    path = Path(path)
    if os.path.lexists(path):
        if path.is_dir():
            raise OutputError(f"{what} '{path}' is a folder; expected a file name")
        if not path.is_file():
            raise OutputError(f"{what} '{path}' exists and is not a regular file")
    folder = _existing_folder(path, what)
    _check_name_lengths(path, folder, what)
    _probe(folder, path, what)


def _about_another_file(err: OSError, tmp: Path, path: Path) -> bool:
    """True when ``err`` names a file other than the temporary one and the destination (a copy's source)."""
    return err.filename is not None and os.fspath(err.filename) not in (os.fspath(tmp), os.fspath(path))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, give it the umask's permissions and rename
    it to ``path``: the destination is whole or untouched. The temporary file is removed on any failure or
    interruption. An OSError of the write becomes :class:`OutputError` naming ``path``. Returns ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, name = tempfile.mkstemp(prefix=f".{_temp_stem(path)}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise OutputError(f"cannot write '{path}': {_reason(err)}") from None
    tmp = Path(name)
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        if _about_another_file(err, tmp, path):
            raise
        raise OutputError(f"cannot write '{path}': {_reason(err)}") from None
    except BaseException:
        _discard(tmp)
        raise
    return path


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread, so
    ``finally`` blocks and :func:`atomic_write`'s cleanup run (Python's default is to die at once). Only when
    SIGTERM has its default handler; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
