"""``python -m sd35_flash.training.toyworld [--preset ci|full] [--out DIR]``: rebuild the toy world from nothing
(:mod:`.build`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ...flash_core.atomic import sigterm_raises
from ...flash_core.console import OneLineParser, run_guarded
from ...flash_core.threads import AUTO, load_average, parse_threads, set_threads, usable_cores
from .build import PRESETS, STAGES


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m sd35_flash.training.toyworld",
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
    parser.add_argument("--threads", type=parse_threads, default=AUTO, metavar="auto|N",
                        help="torch CPU threads per process (default auto: one core left free and none of the cores "
                             "the load average says are busy; torch's own default collapses on a shared CPU)")
    parser.add_argument("--install-demo", nargs="?", const=True, default=None, metavar="DIR",
                        help="then copy the demo model, its tokenizers, sample and model card into DIR (default: "
                             "this package's demo/ folder, what `sd35-flash generate` uses with no checkpoint)")
    parser.add_argument("--install-teacher", nargs="?", const=True, default=None, metavar="DIR",
                        help="then copy the teacher and its model card into DIR (default: the repository's "
                             "toyworld_teacher/ folder, the teacher --from-teacher rebuilds the students from)")
    parser.add_argument("--from-teacher", metavar="PATH",
                        help="take this teacher checkpoint (e.g. the shipped toyworld_teacher/teacher.safetensors) "
                             "with its VAE and text encoders instead of training them")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    """The build; expected failures are one stderr line and status 2, a stop (Ctrl-C, SIGTERM) one line too."""
    from .build import build

    def work() -> int:
        build(args.out, args.preset, progress=not args.quiet, resume=args.resume, until=args.until,
              seeds=args.seeds, install=args.install_demo, from_teacher=args.from_teacher,
              install_teacher_to=args.install_teacher)
        return 0

    threads = set_threads(args.threads)
    if not args.quiet:
        print(f"torch threads: {threads} ({usable_cores()} cores, load average {load_average():.1f})",
              file=sys.stderr)
    return run_guarded("toyworld build", work, f"; --resume continues the build in {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with sigterm_raises():  # SIGTERM unwinds like Ctrl-C: temporary files are removed
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
