"""Thread count for long CPU runs: one core left free, busy cores given up, an explicit count used as given."""

import argparse

import pytest
import torch

from sd35_flash.flash_core import threads


@pytest.mark.parametrize(("cores", "load", "expected"), [
    (2, 0.0, 1),    # a 2-core machine keeps one core for the rest: never the collapse of 2 threads under load
    (2, 1.9, 1),
    (1, 0.0, 1),
    (16, 0.1, 15),
    (16, 6.0, 10),
    (16, 40.0, 1),  # an overloaded machine still runs
])
def test_auto_threads_leaves_a_core_and_the_busy_ones(cores, load, expected):
    assert threads.auto_threads(cores, load) == expected


def test_parse_threads_reads_auto_and_counts():
    assert threads.parse_threads("auto") == threads.AUTO
    assert threads.parse_threads("0") == threads.AUTO
    assert threads.parse_threads("3") == 3
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{bad}'"):
            threads.parse_threads(bad)


def test_set_threads_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "auto_threads", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert threads.set_threads(2) == 2 and torch.get_num_threads() == 2
        assert threads.set_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torchrun's per-process setting wins over auto
        assert threads.set_threads() == 2 and torch.get_num_threads() == 2
        assert threads.set_threads(1) == 1
    finally:
        torch.set_num_threads(before)


def test_toyworld_command_line_takes_auto_and_refuses_nonsense(capsys):
    from sd35_flash.training.toyworld.__main__ import build_parser

    assert build_parser().parse_args(["--threads", "auto"]).threads == threads.AUTO
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--threads", "many"])
    assert exit_info.value.code == 2 and "--threads" in capsys.readouterr().err
