"""The toy-world teacher's accuracy curve: each saved state of a teacher run, sampled and read by the evaluator.

    python benchmarks/teacher_curve.py --build toyworld_build --run toyworld_build/teacher

``--build``: a toy-world build with its frozen parts (``components.safetensors``, ``evaluator.safetensors``,
``tokenizers/``). ``--run``: a teacher stage's output folder; every ``state/teacher/step_*.safetensors`` in it
(the run keeps ``train.keep_last`` of them: raise it for a long curve) is read as its EMA weights, the EMA the
stage saves, and ``teacher.safetensors``, when there, as the last row. Each row samples ``--samples`` images on
the evaluation prompts (``EVAL_PROMPTS`` repeated, fixed noise) with ``--steps`` Euler steps and CFG ``--cfg``, as
the quality table's reference does, and prints the accuracy per attribute, ``all`` (every attribute right), and
FD to real images of the same prompts (twice as many) beside the real-vs-real floor at those counts
(docs/toyworld.md "Metrics that discriminate").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from sd35_flash.flash_core import checkpoint as ckpt
from sd35_flash.flash_core.threads import AUTO, parse_threads, set_threads
from sd35_flash.training.toyworld import quality

COLUMNS = quality.PROBE_COLUMNS


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(iteration, file) of every saved state of the run's teacher stage, then its output, in order."""
    found = []
    for path in (run / "state" / "teacher").glob("step_*.safetensors"):
        match = re.fullmatch(r"step_(\d+)\.safetensors", path.name)
        if match:
            found.append((int(match.group(1)), path))
    found.sort()
    if (run / "teacher.safetensors").exists():
        found.append((found[-1][0] + 1 if found else -1, run / "teacher.safetensors"))
    return found


def ema_mmdit(path: Path) -> torch.nn.Module:
    """The MM-DiT of a teacher state's EMA (``ema.*``), or of a saved teacher checkpoint."""
    if path.name == "teacher.safetensors":
        return ckpt.load_mmdit(path).eval()
    state = load_file(str(path))
    ema = {k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")}
    if not ema:
        raise SystemExit(f"{path}: no 'ema.*' tensors (not a teacher stage state)")
    return ckpt.load_mmdit(ema).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, required=True, help="toy-world build with its frozen parts")
    parser.add_argument("--run", type=Path, required=True, help="a teacher stage's output folder")
    parser.add_argument("--samples", type=int, default=240, help="samples per row (default 240: 10 per prompt)")
    parser.add_argument("--steps", type=int, default=quality.REFERENCE_STEPS)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--every", type=int, default=1, help="evaluate every Nth saved state (the last always)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--threads", type=parse_threads, default=AUTO, metavar="auto|N")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    found = checkpoints(args.run)
    if not found:
        print(f"{args.run}: no teacher states or teacher.safetensors", file=sys.stderr)
        return 2
    found = [c for i, c in enumerate(found) if i % args.every == 0 or i == len(found) - 1]
    probe = quality.TeacherProbe(args.build, args.samples, args.steps, args.cfg)
    print(f"teacher run {args.run}: {args.samples} samples, {args.steps} Euler steps, CFG {args.cfg:g}; "
          f"real-vs-real FD floor {probe.floor:.1f}")
    print("| iteration | " + " | ".join(COLUMNS) + " | FD real | FD / floor | s |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    rows = []
    for iteration, path in found:
        tic = time.perf_counter()
        result = probe(ema_mmdit(path))
        label = "final" if path.name == "teacher.safetensors" else str(iteration)
        rows.append({"iteration": label, **result})
        cells = " | ".join(f"{100 * result[c]:.0f} %" if c in result else "-" for c in COLUMNS)
        fd = result["fd_real"]
        print(f"| {label} | {cells} | {fd:.1f} | {fd / probe.floor:.1f}x | {time.perf_counter() - tic:.0f} |",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
