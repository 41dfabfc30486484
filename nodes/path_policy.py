"""Where a workflow may read and write: inside ComfyUI's folders, nowhere else (GitHub issue 13).

ComfyUI treats a workflow as untrusted: users queue graphs that strangers shared. So every path a widget or a
``config_toml`` key of our nodes names is a *name inside* one of ComfyUI's folders for its kind:

* models (a teacher, a student's start, a teacher stage's components, text encoders, VAEs, tokenizers): a file
  (tokenizers: a folder) in ComfyUI's model folders of that kind, found as ComfyUI's own loaders find them
  (``folder_paths.get_full_path``; the pack's demo folder counts; links an administrator put there are followed);
* prompt files and image folders: inside ComfyUI's ``input/`` folder, links followed;
* run folders and everything a run writes: inside ComfyUI's ``output/`` folder, links followed; a saved student
  goes to ``models/checkpoints`` as a new numbered file (:func:`numbered_name`).

A name is refused, in one sentence naming the widget or key, when it is not text, empty, too long, holds a NUL
or another control character, is absolute (``/x``, ``\\x``, ``C:\\x``, ``\\\\server\\share``), holds ``:`` (a
drive, a stream or a URL), starts with ``~``, climbs with ``..`` (``/`` and ``\\`` are both separators), or
leads out of its folder through a symbolic link. The functions are pure: the allowed folders are arguments, so
they are tested without ComfyUI. The command line (``sd35-flash``, ``sd35-flash-train``) is the user's own and
keeps any path: :mod:`..training` and :mod:`..flash_core` are not restricted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..flash_core.errors import CheckpointError, FlashError

MAX_CHARS = 1024  # longer "names" are not names
INPUT, OUTPUT = "input", "output"
INPUT_PLACE, OUTPUT_PLACE, RUN_PLACE = "ComfyUI's input folder", "ComfyUI's output folder", "the run folder"
TOYWORLD = "toyworld"  # teacher.dataset's built-in dataset (not a path)
SUFFIX = ".safetensors"

# Every str key of training/config.py that holds a path, and where a ComfyUI node lets it point:
# ("model", kinds): a file in those model folders; ("model_folder", kinds): a folder in them;
# ("input" / "output", ()): inside that folder; ("run", ()): inside the run folder (train.out).
# The third field: an empty value means "not set" (the config's default) and is accepted.
CONFIG_PATHS: dict[tuple[str, str], tuple[str, tuple[str, ...], bool]] = {
    ("model", "teacher"): ("model", ("checkpoints",), False),
    ("model", "student_init"): ("model", ("checkpoints", "diffusion_models"), True),
    ("model", "tokenizers"): ("model_folder", ("text_encoders",), True),
    ("data", "prompts"): (INPUT, (), False),
    ("data", "dir"): ("run", (), False),
    ("train", "out"): (OUTPUT, (), False),
    ("teacher", "dataset"): (INPUT, (), False),
    ("teacher", "components"): ("model", ("checkpoints",), True),
    ("teacher", "init"): ("model", ("checkpoints", "diffusion_models"), True),
}
CONFIG_NOT_PATHS = {("model", "device"), ("data", "negative")}  # the config's other str keys: no path


class UnsafePathError(FlashError, ValueError):
    """A widget or config key names a path outside the ComfyUI folder it must stay in; one sentence."""


def show(value) -> str:
    """``value`` as an error shows it: quoted, escaped (one line), cut when long."""
    if not isinstance(value, str):
        return f"{type(value).__name__} {value!r}"[:80]
    return repr(value if len(value) <= 80 else value[:60] + "..." + value[-12:])


def _refuse(what: str, value, reason: str, place: str) -> UnsafePathError:
    return UnsafePathError(f"{what} {show(value)} {reason}: it must stay inside {place}")


def model_place(kinds: Sequence[str]) -> str:
    """``ComfyUI's models/checkpoints or models/diffusion_models folder``: where model files of ``kinds`` are."""
    return f"ComfyUI's {' or '.join(f'models/{k}' for k in kinds)} folder"


def relative_parts(value, what: str, place: str) -> tuple[str, ...]:
    """The components of ``value``, a relative path inside ``place`` (a phrase: "ComfyUI's input folder"; ``.``
    and empty components dropped; ``/`` and ``\\`` both separate), or :class:`UnsafePathError` naming ``what``."""
    if not isinstance(value, str):
        raise _refuse(what, value, "is not text", place)
    if not value.strip():
        raise _refuse(what, value, "is empty", place)
    if len(value) > MAX_CHARS:
        raise _refuse(what, value, f"is longer than {MAX_CHARS} characters", place)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise _refuse(what, value, "holds a NUL or another control character", place)
    if value[0] in "/\\":
        raise _refuse(what, value, "is an absolute path", place)
    if ":" in value:
        raise _refuse(what, value, "holds ':' (a drive, stream or URL)", place)
    if value.startswith("~"):
        raise _refuse(what, value, "starts with '~' (a home folder)", place)
    parts = tuple(p for p in re.split(r"[\\/]", value) if p not in ("", "."))
    if ".." in parts:
        raise _refuse(what, value, "climbs out with '..'", place)
    return parts


def plain_name(value, what: str, place: str) -> str:
    """``value`` as one plain file or folder name (no separator, not hidden), or :class:`UnsafePathError`."""
    parts = relative_parts(value, what, place)
    if len(parts) != 1 or parts[0] != value:
        raise _refuse(what, value, "is not a plain name (no '/' or '\\')", place)
    if value.startswith("."):
        raise _refuse(what, value, "starts with '.' (a hidden or temporary file)", place)
    return value


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` is ``root`` or below it, both with links followed."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents


def inside(root: str | os.PathLike, value, what: str, place: str, *, under: str = "",
           allow_root: bool = False) -> Path:
    """``root / under / value`` with links followed (it need not exist), refused unless it stays inside ``root``
    (and, unless ``allow_root``, is not ``root`` itself). ``under``: a fixed subfolder (``sd35_flash``)."""
    parts = relative_parts(value, what, place)
    try:
        base = Path(root).resolve()
        target = base.joinpath(*Path(under).parts, *parts).resolve()
    except (OSError, RuntimeError):  # a loop of links
        raise _refuse(what, value, "cannot be resolved (a loop of symbolic links)", place) from None
    if not (target == base or base in target.parents):
        raise _refuse(what, value, "leads out through a symbolic link", place)
    if target == base and not allow_root:
        raise _refuse(what, value, "names the folder itself, not something in it", place)
    return target


def model_file(value, roots: Sequence[str | os.PathLike], what: str, place: str, *,
               folder: bool = False) -> Path | None:
    """The file (``folder``: the folder) ``value`` names in the first of the model folders ``roots`` having it,
    as ComfyUI's ``folder_paths.get_full_path`` finds it; None when none has it (the caller names the folders).
    A name is checked as in :func:`relative_parts` first."""
    parts = relative_parts(value, what, place)
    for root in roots:
        path = Path(root).joinpath(*parts)
        if path.is_dir() if folder else path.is_file():
            return path
    return None


def numbered_name(prefix: str, existing: Iterable[str], suffix: str = SUFFIX) -> str:
    """The next ``prefix_NNNNN_<suffix>``: ComfyUI's ``filename_prefix`` counter (``folder_paths.
    get_save_image_path``, as SaveImage and CheckpointSave number files), one past the largest ``N`` of the
    ``existing`` names of the form ``prefix_N_...``."""
    counters = [0]
    for name in existing:
        head, rest = name[:len(prefix) + 1], name[len(prefix) + 1:]
        if os.path.normcase(head[:-1]) == os.path.normcase(prefix) and head.endswith("_"):
            digits = rest.split("_")[0]
            counters.append(int(digits) if digits.isascii() and digits.isdigit() else 0)
    return f"{prefix}_{max(counters) + 1:05}_{suffix}"


def confine_config(data: dict, *, models: Mapping[str, Sequence[str | os.PathLike]], input_dir: str | os.PathLike,
                   output_dir: str | os.PathLike, run: str | os.PathLike, source: str = "config_toml") -> dict:
    """A copy of the parsed TOML ``data`` whose path keys (:data:`CONFIG_PATHS`) are replaced by the paths they
    name inside ComfyUI's folders; :class:`UnsafePathError` (``"config_toml: [train] out '/x' is an absolute
    path: ..."``) for one that would lead out, :class:`CheckpointError` for a model name no model folder has.
    ``train.out`` is relative to ``output_dir`` (default: ``run``) and ``data.dir`` to the run folder; an empty
    value of an optional key (``student_init``, ``tokenizers``, ``components``, ``init``) and ``teacher.dataset =
    "toyworld"`` are no paths. Values that are not text are left for the config's own checks."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    train = out.get("train")
    if isinstance(train, dict) and isinstance(train.get("out"), str):
        train["out"] = str(inside(output_dir, train["out"], f"{source}: [train] out", OUTPUT_PLACE))
        run = train["out"]
    for (section, key), (kind, kinds, optional) in CONFIG_PATHS.items():
        table = out.get(section)
        if (section, key) == ("train", "out") or not isinstance(table, dict) or not isinstance(table.get(key), str):
            continue
        value, what = table[key], f"{source}: [{section}] {key}"
        if (optional and value == "") or ((section, key) == ("teacher", "dataset") and value == TOYWORLD):
            continue
        table[key] = str(_confined(value, what, kind, kinds, models, input_dir, run))
    return out


def _confined(value: str, what: str, kind: str, kinds: tuple[str, ...], models, input_dir, run) -> Path:
    if kind == INPUT:
        return inside(input_dir, value, what, INPUT_PLACE)
    if kind == "run":
        return inside(run, value, what, RUN_PLACE, allow_root=True)
    place = model_place(kinds)
    path = model_file(value, [r for k in kinds for r in models.get(k, ())], what, place,
                      folder=kind == "model_folder")
    if path is None:
        raise CheckpointError(f"{what} {show(value)} is not {'a folder' if kind == 'model_folder' else 'a file'} "
                              f"in {place}")
    return path
