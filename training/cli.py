"""``sd35-flash-train CONFIG [--stage teacher|data|pretrain|dmd|split|merge|all] [--resume]`` (also ``python -m
sd35_flash.training``, which is what ``torchrun --nproc_per_node N -m sd35_flash.training CONFIG`` runs).

Bad input (a missing file, an unknown config key, a bad value) ends with exit status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..flash_core.atomic import sigterm_raises
from ..flash_core.cli import OneLineParser, run_guarded
from ..flash_core.threads import AUTO, parse_threads, set_threads
from .config import load_config

STAGE_CHOICES = ("teacher", "data", "pretrain", "dmd", "split", "merge", "all")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sd35-flash-train", description="SD3.5-Flash distillation.")
    parser.add_argument("config", help="a TOML config file (see training/config.py for every key)")
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="all",
                        help="teacher: train the teacher by flow matching ([teacher]); data: teacher samples; pretrain: trajectory guidance; dmd; split: fine-tune and merge; "
                             "merge: re-merge saved branches; all: every stage in order (default)")
    parser.add_argument("--resume", action="store_true", help="continue each stage from its newest saved state")
    parser.add_argument("--threads", type=parse_threads, default=AUTO, metavar="auto|N",
                        help="torch CPU threads per process (default auto: $OMP_NUM_THREADS when set, as torchrun "
                             "sets it; else one core left free and none the load average says are busy)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the config and run the stages; expected failures are one stderr line and status 2."""
    from .trainer import run_stages

    def work() -> int:
        config = load_config(args.config)
        print(run_stages(config, args.stage, resume=args.resume, progress=not args.quiet))
        return 0

    set_threads(args.threads)
    return run_guarded("sd35-flash-train", work, "; --resume continues from the last saved state")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with sigterm_raises():  # SIGTERM unwinds like Ctrl-C: temporary files are removed
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
