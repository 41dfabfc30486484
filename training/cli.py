"""``sd35-flash-train CONFIG [--stage teacher|data|pretrain|dmd|split|merge|all] [--resume | --overwrite]`` (also
``python -m sd35_flash.training``, which is what ``torchrun --nproc_per_node N -m sd35_flash.training CONFIG``
runs).

Bad input (a missing file, an unknown config key, a bad value, a run folder in use or holding another run) ends
with exit status 2 and one line naming it. Ctrl-C (SIGTERM) lets the current step finish, saves its state and
ends with one line, "<stage> stopped at step N; state saved to '<path>'", and status 130 (143).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..flash_core.atomic import Terminated, sigterm_raises
from ..flash_core.console import OneLineParser, run_guarded
from ..flash_core.threads import AUTO, parse_threads, set_threads
from .config import load_config

PROG = "sd35-flash-train"
STAGE_CHOICES = ("teacher", "data", "pretrain", "dmd", "split", "merge", "all")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="SD3.5-Flash distillation.")
    parser.add_argument("config", help="a TOML config file (see training/config.py for every key)")
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="all",
                        help="teacher: train the teacher by flow matching ([teacher]); data: teacher samples; "
                             "pretrain: trajectory guidance; dmd; split: fine-tune and merge; "
                             "merge: re-merge saved branches; all: every stage in order (default)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue each stage's run in train.out from its newest readable state (an unreadable "
                            "newest one is skipped, with a warning, for the one before)")
    again.add_argument("--overwrite", action="store_true",
                       help="start each stage over where train.out holds another run's states: they, their record "
                            "and their log are moved to train.out/replaced/<stage>-<run id>/ (nothing is deleted)")
    parser.add_argument("--threads", type=parse_threads, default=AUTO, metavar="auto|N",
                        help="torch CPU threads per process (default auto: $OMP_NUM_THREADS when set, as torchrun "
                             "sets it; else one core left free and none the load average says are busy)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def report_stop(stop: KeyboardInterrupt) -> int:
    """The one line of a training stopped by Ctrl-C or SIGTERM (where it stopped, where its state is); the exit
    status 130 or 143. A stop outside the training loop is left to the guard."""
    where = getattr(stop, "training_stop", None)
    if where is None:
        raise stop
    terminated = isinstance(stop, Terminated)
    then = "; --resume continues from it" if where.state is not None else ""
    print(f"{PROG}: {'SIGTERM: ' if terminated else ''}{where}{then}", file=sys.stderr)
    return 128 + Terminated.signum if terminated else 130


def run(args: argparse.Namespace) -> int:
    """Load the config and run the stages, the toy world plugged in as a dataset (``teacher.dataset =
    "toyworld"``); expected failures are one stderr line and status 2."""
    from .toyworld.dataset import DATASETS
    from .trainer import run_stages

    def work() -> int:
        config = load_config(args.config)
        try:
            result = run_stages(config, args.stage, resume=args.resume, overwrite=args.overwrite,
                                progress=not args.quiet, datasets=DATASETS)
        except KeyboardInterrupt as stop:
            return report_stop(stop)
        print(result)
        return 0

    set_threads(args.threads)
    return run_guarded(PROG, work, "; --resume continues from the last saved state")


class _Warnings(logging.Handler):
    """The library's warnings (a skipped unreadable state, a stale lock taken over) as ``PROG: warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{PROG}: warning: {record.getMessage()}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    library = logging.getLogger(__name__.rsplit(".", 2)[0])
    handler = _Warnings(logging.WARNING)
    library.addHandler(handler)
    try:
        with sigterm_raises():  # SIGTERM unwinds like Ctrl-C: temporary files are removed
            return run(args)
    finally:
        library.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
