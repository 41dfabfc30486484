"""Fixtures shared across test modules, and the collection of the repository root as a plain folder."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tokenizer_factories import write_tokenizers

REPOSITORY = Path(__file__).resolve().parents[1]


class RootAsPlainDirectory:
    """Collect the repository root as a plain ``pytest.Dir``, not a ``Package``.

    The root's ``__init__.py`` is the ComfyUI pack's entry point (relative imports). Collected as a Package,
    pytest imports it under the checkout folder's name, which fails for the name ``git clone`` gives
    (``ComfyUI-SD35-Flash`` is no module name: "attempted relative import with no known parent package").
    The tests import the library as ``sd35_flash`` and never need that import. A conftest's
    ``pytest_collect_directory`` is consulted for its folder's children only, so this hook is registered as a
    plugin of its own (:func:`pytest_configure`), which pytest asks for the root too."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        if Path(path).resolve() == REPOSITORY:
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("sd35-flash-root-as-directory"):
        config.pluginmanager.register(RootAsPlainDirectory(), "sd35-flash-root-as-directory")


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Iterator[Callable[[str], Path]]:
    """``module_tmp(name)`` makes a folder for files a test module's tests share. The folders go when the module's
    last test ends, unless a test failed. The training modules write hundreds of MB each (the tiny checkpoints
    carry full-size CLIP/T5 vocabularies); kept until the session's end, as ``tmp_path_factory`` keeps them, the
    suite held 5 GB at once and filled a shared disk in CI. Tests' own ``tmp_path`` folders go when the test
    passes (``tmp_path_retention_policy`` in pyproject.toml)."""
    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    failures = request.session.testsfailed

    def mktemp(name: str) -> Path:
        path = root / name
        path.mkdir()
        return path

    yield mktemp
    if request.session.testsfailed == failures:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizers_dir(tmp_path_factory) -> Path:
    """The self-made CLIP BPE and T5 SentencePiece files (tokenizer_factories.py) in the clip/ + t5xxl/ layout,
    written once per session."""
    return write_tokenizers(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="session")
def ci_build(tmp_path_factory):
    """One toy-world build at the ``ci`` preset, through its command line, with one torch thread (docs/toyworld.md
    "Pitfalls" 5). Built once per session and shared by the slow tests that read a build (the build's own checks,
    the quality table, the demo CLI): each of them used to build its own."""
    from sd35_flash.training.toyworld.__main__ import main

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("toyworld_ci")
    try:
        assert main(["--preset", "ci", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out
