"""``python -m sd35_flash.training.toyworld [--preset ci|full] [--out DIR]``: rebuild the toy world from nothing
(:mod:`.build`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .build import PRESETS, STAGES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sd35_flash.training.toyworld",
                                     description="Rebuild the toy world: data, tokenizer, encoders, VAE, evaluator, "
                                                 "teacher, teacher data, students and the demo model.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="ci: the whole chain at test size (minutes); full: the demo model's budgets (default)")
    parser.add_argument("--out", default="toyworld_build", help="output folder (default: toyworld_build)")
    parser.add_argument("--resume", action="store_true",
                        help="skip stages build.json records as done; resume interrupted training from its state")
    parser.add_argument("--until", choices=list(STAGES), help="stop after this stage")
    parser.add_argument("--seeds", type=int, default=None,
                        help="training seeds of the quality table's variant runs (default: the preset's, 3)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice; TOYWORLD.md: 1-2 on a shared 2-core CPU)")
    parser.add_argument("--install-demo", nargs="?", const=True, default=None, metavar="DIR",
                        help="then copy the demo model, its tokenizers, sample and model card into DIR (default: "
                             "this package's demo/ folder, what `sd35-flash generate` uses with no checkpoint)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ...flash_core.cli import one_line
    from ...flash_core.errors import FlashError
    from ..config import ConfigError
    from .build import build

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        build(args.out, args.preset, progress=not args.quiet, resume=args.resume, until=args.until,
              seeds=args.seeds, install=args.install_demo)
    except (ConfigError, FlashError, FileNotFoundError, ValueError) as e:
        print(f"toyworld build: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
