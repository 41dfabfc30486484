"""A student run's curve: each saved state of one training stage, measured like a row of the quality table.

    python benchmarks/student_curve.py --build toyworld_build --run toyworld_build/students/step4 --stage dmd

``--build``: a toy-world build that has run its ``variants`` stage (its teacher, tokenizers and evaluator; the
teacher's reference samples come from ``quality/cache/`` or are made and cached there). ``--run``: a student run
folder; every ``state/<stage>/step_*.safetensors`` in it (the run keeps ``train.keep_last`` of them: raise it for
a long curve) is read as its student weights, then ``<stage>.safetensors``, the stage's output, as the last row.
Each row samples ``--samples`` images of the evaluation prompts through the product's pipeline on the run's own
student grid (CFG 1, T5 on) and prints FD_T, unpaired FD_T beside the teacher-against-itself floor, paired MSE,
FD to real images and accuracy (docs/toyworld.md "Metrics that discriminate"): where the numbers stop moving,
the stage has had enough updates.
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
from sd35_flash.training.toyworld import evaluator, quality

STAGES = ("pretrain", "dmd")  # the stages whose state holds one student (split's holds two branches)


def states(run: Path, stage: str) -> list[tuple[str, Path]]:
    """(label, file) of every saved state of ``stage`` in ``run``, in order, then its output as ``final``."""
    found = []
    for path in (run / "state" / stage).glob("step_*.safetensors"):
        match = re.fullmatch(r"step_(\d+)\.safetensors", path.name)
        if match:
            found.append((int(match.group(1)), path))
    rows = [(str(step), path) for step, path in sorted(found)]
    if (run / f"{stage}.safetensors").exists():
        rows.append(("final", run / f"{stage}.safetensors"))
    return rows


def student_weights(path: Path) -> dict[str, torch.Tensor]:
    """The MM-DiT weights of a training state (``student.*``) or of a saved checkpoint."""
    if not path.name.startswith("step_"):
        return ckpt.component_state_dict(ckpt.index_checkpoint(path), "mmdit")
    student = {k.removeprefix("student."): v for k, v in load_file(str(path)).items() if k.startswith("student.")}
    if not student:
        raise SystemExit(f"{path}: no 'student.*' tensors (not a pretrain or dmd state)")
    return student


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, required=True, help="toy-world build with its variants stage run")
    parser.add_argument("--run", type=Path, required=True, help="a student run folder (students/step4, a variant)")
    parser.add_argument("--stage", choices=STAGES, default="dmd")
    parser.add_argument("--samples", type=int, default=240, help="samples per row (default 240: 10 per prompt)")
    parser.add_argument("--every", type=int, default=1, help="evaluate every Nth saved state (the last always)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--threads", type=parse_threads, default=AUTO, metavar="auto|N")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    found = states(args.run, args.stage)
    if not found or found[-1][0] != "final":
        print(f"{args.run}: no {args.stage}.safetensors (the curve reads its states against the finished run)",
              file=sys.stderr)
        return 2
    found = [c for i, c in enumerate(found) if i % args.every == 0 or i == len(found) - 1]
    record = quality.read_record(args.build)
    classifier = evaluator.load_classifier(args.build / "evaluator.safetensors")
    ref = quality.reference(args.build, classifier, args.samples, log=lambda line: print(line, file=sys.stderr))
    pipe = quality.load_pipeline(found[-1][1], args.build / record["stages"]["variants"]["tokenizers"])
    steps = len(pipe.metadata.student_sigmas) - 1
    print(f"{args.run} ({args.stage}): {args.samples} samples, {steps} steps, CFG 1; real-vs-real FD floor "
          f"{ref.floor:.1f}, teacher-vs-itself unpaired FD_T {ref.fd_t_floor:.2f}")
    print("| state | FD_T | unpaired FD_T | paired MSE | FD real | shape | all | s |")
    print("|---" * 8 + "|")
    rows = []
    for label, path in found:
        tic = time.perf_counter()
        pipe.mmdit.load_state_dict(student_weights(path))
        images = quality.generate(pipe, ref.prompts, steps)
        unpaired = classifier.features(quality.generate(pipe, ref.prompts, steps,
                                                        noise_seed=quality.UNPAIRED_NOISE_SEED))
        m = quality.measure(images, ref, classifier, unpaired)
        rows.append({"state": label, **m})
        print(f"| {label} | {m['fd_t']:.2f} | {m['fd_t_unpaired']:.2f} | {m['paired_mse']:.4f} | "
              f"{m['fd_real']:.1f} | {100 * m['acc_shape']:.0f} % | {100 * m['acc_all']:.0f} % | "
              f"{time.perf_counter() - tic:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
