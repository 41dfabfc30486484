"""The repository tests itself on its own: nothing read from beside the checkout, any checkout folder name works,
and a default run skips only what a machine may lack (skip_policy.py: COMFYUI_ROOT, CUDA, the quanto extra).

The fresh-clone check copies the repository's files (git's tracked and not-ignored ones) into an empty folder named
as ``git clone`` names it, ``ComfyUI-SD35-Flash`` (no module name: the root ``__init__.py`` must not be imported
under it), with nothing beside it, and runs the default suite there with ``--setup-plan -rs``: every test module
is collected and every test set up as a plan (fixtures are not run, test bodies neither), so each ``skipif`` is
evaluated and each skip lands in the summary. ``.ci/run`` applies the same policy to its full run, which also sees
skips raised while a test runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import skip_policy

REPOSITORY = Path(__file__).resolve().parents[1]
CLONE_NAME = "ComfyUI-SD35-Flash"
MIN_PLANNED = 300  # the default run sets up about 450 tests where COMFYUI_ROOT is unset
# Never copied when the file list cannot come from git: environments, caches, build outputs.
NOT_SOURCES = (".git", ".venv", ".venv-tools", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "build",
               "dist", "out")
# A path out of the checkout to a "shared" folder beside it, or to its tokenizers. Spelt in pieces so that this file
# does not match itself.
SHARED_FOLDER = re.compile("|".join((r"\.\./" + "shared", "shared/" + "tokenizers", r"""["']""" + r"shared" +
                                     r"""["']\s*/""")))


def repository_files(root: Path = REPOSITORY) -> list[Path]:
    """The files a clone of ``root`` holds (relative paths): git's tracked files and new files it does not ignore;
    without git, every file outside :data:`NOT_SOURCES`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=False) if (root / ".git").exists() else None
    if listed is not None and listed.returncode == 0:
        names = sorted({name for name in listed.stdout.decode().split("\0") if name})
        return [Path(name) for name in names if (root / name).is_file()]  # a deleted tracked file is listed too
    skip = shutil.ignore_patterns(*NOT_SOURCES)
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(set(dirs) - skip(folder, dirs))
        files += [Path(folder, name).relative_to(root) for name in sorted(set(names) - skip(folder, names))]
    return files


def copy_repository(target: Path) -> Path:
    """A copy of the repository's files in ``target`` (a new folder)."""
    for name in repository_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / name, target / name)
    return target


def clone_environment(clone: Path, packages: Path) -> dict[str, str]:
    """The environment of a run inside ``clone``: the library imported from the clone itself (``sd35_flash``, a link
    in ``packages`` on PYTHONPATH, ahead of any installed copy), no ComfyUI, one torch thread."""
    (packages / "sd35_flash").symlink_to(clone, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_ROOT", "SD35_FLASH_TOKENIZERS", "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(packages), "OMP_NUM_THREADS": "1"}


def run_pytest(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


# ------------------------------------------------------------------------------------------------ the policy


def test_the_skip_policy_reads_pytests_skip_summary(tmp_path):
    """Real ``-rs`` output of the installed pytest: allowed needs pass, anything else is reported."""
    (tmp_path / "test_needs.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.skipif(True, reason='COMFYUI_ROOT is not set: point it at a ComfyUI checkout')\n"
        "def test_comfy(): pass\n\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA device')\n"
        "def test_cuda(): pass\n\n"
        "@pytest.mark.skipif(True, reason=\"optimum-quanto is not installed (pip install '.[quanto]')\")\n"
        "def test_quanto(): pass\n\n"
        "@pytest.mark.skipif(True, reason='tokenizer files not found at /elsewhere/tokenizers')\n"
        "def test_files(): pass\n\n"
        "def test_runtime():\n    pytest.skip('no data set')\n")
    done = run_pytest(["-q", "-rs", "test_needs.py"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(skip_policy.skips(done.stdout)) == 5
    bad = skip_policy.disallowed_skips(done.stdout)
    assert [line.split(": ", 1)[1] for line in bad] == ["tokenizer files not found at /elsewhere/tokenizers",
                                                         "no data set"]
    assert all(line.startswith("test_needs.py:") for line in bad)
    log = tmp_path / "pytest.log"
    log.write_text(done.stdout)
    assert skip_policy.main([str(log)]) == 1
    log.write_text("\n".join(line for line in done.stdout.splitlines() if "/elsewhere" not in line
                             and "no data set" not in line))
    assert skip_policy.main([str(log)]) == 0


# ------------------------------------------------------------------------------------------- the repository


def test_no_repository_file_points_at_a_folder_beside_the_checkout():
    """Code, tests, benchmarks and CI make their own data: none names a shared/ folder outside the repository
    (Markdown prose may tell its history)."""
    offenders = []
    for name in repository_files():
        if name.suffix == ".md":
            continue
        text = (REPOSITORY / name).read_bytes().decode("utf-8", errors="replace")
        offenders += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}"
                      for m in SHARED_FOLDER.finditer(text)]
    assert offenders == []


def test_a_copy_named_like_a_clone_collects_and_skips_only_for_allowed_reasons(tmp_path):
    clone = copy_repository(tmp_path / "checkout" / CLONE_NAME)
    (tmp_path / "packages").mkdir()
    env = clone_environment(clone, tmp_path / "packages")
    where = subprocess.run([sys.executable, "-c", "import sd35_flash; print(sd35_flash.__file__)"], cwd=clone,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(tmp_path / "packages" / "sd35_flash" / "__init__.py")
    done = run_pytest(["--setup-plan", "-q", "-rs"], cwd=clone, env=env)
    output = done.stdout + done.stderr
    summary = output.strip().splitlines()[-1]
    assert done.returncode == 0 and "error" not in summary and "relative import" not in output, output[-5000:]
    planned = re.findall(r"^\s+tests/\S+::", output, flags=re.MULTILINE)  # a test set up, not skipped
    assert len(planned) >= MIN_PLANNED, output[-5000:]
    assert skip_policy.disallowed_skips(output) == [], output[-5000:]
    assert any("COMFYUI_ROOT" in reason for _, reason in skip_policy.skips(output))  # tests/comfyui was collected
