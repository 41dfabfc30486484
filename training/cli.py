"""``sd35-flash-train CONFIG [--stage teacher|data|pretrain|dmd|split|merge|all] [--resume]`` (also ``python -m
sd35_flash.training``, which is what ``torchrun --nproc_per_node N -m sd35_flash.training CONFIG`` runs).

Bad input (a missing file, an unknown config key, a bad value) ends with exit status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..flash_core.cli import one_line
from ..flash_core.errors import FlashError
from .config import ConfigError, load_config

STAGE_CHOICES = ("teacher", "data", "pretrain", "dmd", "split", "merge", "all")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd35-flash-train", description="SD3.5-Flash distillation.")
    parser.add_argument("config", help="a TOML config file (see training/config.py for every key)")
    parser.add_argument("--stage", choices=STAGE_CHOICES, default="all",
                        help="teacher: train the teacher by flow matching ([teacher]); data: teacher samples; pretrain: trajectory guidance; dmd; split: fine-tune and merge; "
                             "merge: re-merge saved branches; all: every stage in order (default)")
    parser.add_argument("--resume", action="store_true", help="continue each stage from its newest saved state")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .trainer import run_stages

    try:
        config = load_config(args.config)
        out = run_stages(config, args.stage, resume=args.resume, progress=not args.quiet)
    except (ConfigError, FlashError, FileNotFoundError, ValueError) as e:
        print(f"sd35-flash-train: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
