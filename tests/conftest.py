"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def ci_build(tmp_path_factory):
    """One toy-world build at the ``ci`` preset, through its command line, with one torch thread (TOYWORLD.md
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
