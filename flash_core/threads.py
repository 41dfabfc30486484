"""CPU thread count for long CPU runs (the toy-world build, its quality table, headless training).

torch's default, one intra-op thread per core, collapses when the CPU is shared: on a 2-core machine with other
work running, the toy world's ``table`` stage took 855 s at the default and 72 s with one thread (OpenMP's
threads wait on each other while the other work holds a core). ``auto`` therefore leaves a core to the rest of
the machine and also gives up the cores that the load average says are busy; an explicit count is used as given,
and so is ``$OMP_NUM_THREADS`` (torchrun sets it to 1 for each of its processes).
"""

from __future__ import annotations

import os

AUTO = 0  # ``--threads 0``: choose with :func:`auto_threads`


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float:
    """The 1-minute load average (0 where the OS has none)."""
    try:
        return max(0.0, os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """``min(cores - 1, round(cores - load))``, at least 1: one core left to the rest of the machine, and none of
    the cores that other work keeps busy. 2 cores: 1 thread; 16 idle cores: 15; 16 cores at load 6: 10."""
    cores = usable_cores() if cores is None else cores
    load = load_average() if load is None else load
    return max(1, min(cores - 1, round(cores - load)))


def parse_threads(text: str) -> int:
    """argparse type for ``--threads``: ``auto`` or 0 (choose), or a positive count."""
    if text.strip().lower() == "auto":
        return AUTO
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        import argparse

        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of threads, got '{text}'")
    return value


def set_threads(requested: int = AUTO) -> int:
    """Set torch's intra-op threads and return the count: ``requested`` when positive; else ``$OMP_NUM_THREADS``
    when set (what torch already read; torchrun sets it to 1 per process); else :func:`auto_threads`."""
    import torch

    if requested > 0:
        count = requested
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        count = int(os.environ["OMP_NUM_THREADS"])
    else:
        count = auto_threads()
    torch.set_num_threads(count)
    return count
