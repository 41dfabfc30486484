"""The toy world's quality table (issue 6 item 4): every row of a toy-world build, at equal model calls.

    python -m sd35_flash.training.toyworld --out toyworld_build            # the build: trains every row
    python benchmarks/toy_quality.py --build toyworld_build                # this: evaluates, trains nothing

Prints the markdown tables (model, steps, model calls, T5, seeds, FD_T, unpaired FD_T, paired MSE, FD real, accuracy;
then accuracy per attribute; then the verdict on the paper's two claims with paired bootstrap intervals) and writes ``BUILD/quality/table.md``, ``table.json``, one sample grid per row
(``BUILD/quality/<row>.png``: 8 prompts x 4 noise seeds), ``real.png`` and ``samples.safetensors`` (per-sample
features and errors, what the verdict resamples). The teacher's 32-step CFG reference
samples are cached in ``BUILD/quality/cache/``. See ``sd35_flash/training/toyworld/quality.py`` for the protocol.
"""

from __future__ import annotations

import argparse
import sys
import time

from sd35_flash.flash_core.threads import AUTO, parse_threads, set_threads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", required=True, help="a toy-world build folder (with build.json)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per row: EVAL_PROMPTS repeated, fixed noise (default: the build's own "
                             "eval_samples, so this prints the table the build wrote)")
    parser.add_argument("--no-grids", action="store_true", help="skip the sample grid PNGs")
    parser.add_argument("--threads", type=parse_threads, default=AUTO, metavar="auto|N",
                        help="torch CPU threads (default auto: sd35_flash.flash_core.threads.auto_threads)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes of one torch thread each that share the rows (default 1: this process)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no per-row timing lines")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.samples is not None and args.samples < 2:
        parser.error("--samples must be at least 2 (a Frechet distance needs a covariance)")
    from sd35_flash.training.toyworld.quality import build_samples, evaluate_build, format_tables

    set_threads(args.threads)
    tic = time.perf_counter()
    log = (lambda _: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
    try:
        samples = args.samples or build_samples(args.build)
        result = evaluate_build(args.build, samples, grids=not args.no_grids, log=log, progress=not args.quiet,
                                workers=args.workers)
    except FileNotFoundError as e:
        print(f"toy_quality: error: {e}", file=sys.stderr)
        return 2
    print(format_tables(result))
    log(f"evaluated {len(result['rows'])} rows in {time.perf_counter() - tic:.1f} s; "
        f"tables and grids in {args.build}/quality/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
