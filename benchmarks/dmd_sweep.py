"""The DMD learning-rate x anchor-weight sweep behind the ``full`` preset's ``reading_dmd``: one short DMD run per
(reading, generator learning rate, trajectory weight), each measured like a row of the quality table.

    python benchmarks/dmd_sweep.py --build toyworld_build --out sweep --lr 1e-5 4e-5 --anchor 10 50

``--build``: a toy-world build that has run its ``variants`` stage (its teacher data, the trajectory-guidance
student ``students/step{N}/pretrain.safetensors`` every run starts from, its evaluator; the teacher's reference
samples come from ``quality/cache/`` or are made and cached there). Each run is the preset's DMD (its fake-score
warm-up, noise, fake batch, batch size) for ``--updates`` generator updates with that learning rate
(``dmd.optim.lr``) and anchor weight (``dmd.trajectory_weight``); the runs train on ``--workers`` processes of
one torch thread each (``toyworld.build``'s variant runner), then each student samples ``--samples`` images of
the evaluation prompts on its own grid (CFG 1, T5 on). The table is ordered by reading, then unpaired FD_T
(docs/toyworld.md "Metrics that discriminate"); the last line prints each reading's best setting as the
``reading_dmd`` entry it makes: the lowest unpaired FD_T, where settings within ``--tie`` of it (below the seed
spread) count as tied and the lowest paired MSE among them wins. Runs already finished in ``--out`` are not trained again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from sd35_flash.flash_core.threads import AUTO, parse_threads, set_threads
from sd35_flash.training.config import SCORE_SAMPLES
from sd35_flash.training.toyworld import build as tb
from sd35_flash.training.toyworld import evaluator, quality


def run_name(reading: str, lr: float, anchor: float) -> str:
    return f"{reading}_lr{lr:g}_w{anchor:g}"


def sweep_runs(b: tb.Build, out: Path, steps: int, readings, lrs, anchors, updates: int) -> list[dict]:
    """One variant run (``toyworld.build``'s format) per setting, each from the build's seed-0 trajectory-guidance
    student of ``steps`` steps, with the preset's DMD but ``updates`` generator updates."""
    p = b.preset
    warmup = p.dmd.get("fake_warmup_steps", 0)
    runs = []
    for reading, lr, anchor in itertools.product(readings, lrs, anchors):
        run_out = out / run_name(reading, lr, anchor)
        preset = replace(p, reading_dmd={reading: {"iterations": warmup + updates, "trajectory_weight": anchor,
                                                   "optim": {"lr": lr}}})
        config = tb.student_config(replace(b, preset=preset), steps, run_out, p.seed, reading=reading,
                                   student_init=b.path("students", f"step{steps}", "pretrain.safetensors"))
        runs.append({"reading": reading, "lr": lr, "anchor": anchor, "out": run_out, "config": config,
                     "config_path": run_out.parent / f"{run_out.name}.toml"})  # names hold dots: 1e-4 -> 0.0001
    return runs


def train(runs: list[dict], workers: int) -> dict[str, float]:
    """Train the runs whose ``dmd.safetensors`` is missing, ``workers`` at a time; their wall times."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    todo = [r for r in runs if not (r["out"] / "dmd.safetensors").exists()]
    for run in todo:
        run["config_path"].parent.mkdir(parents=True, exist_ok=True)
        tb.write_config(run["config_path"], run["config"])
    seconds = {}
    with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(tb._train_variant, str(r["config_path"]), ["dmd"], False, 1): r for r in todo}
        for future in as_completed(futures):
            run = futures[future]
            seconds[run["out"].name] = future.result()
            print(f"trained {run['out'].name} in {seconds[run['out'].name]:.0f} s", file=sys.stderr, flush=True)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, required=True, help="toy-world build with its variants stage run")
    parser.add_argument("--out", type=Path, required=True, help="folder of the sweep's runs")
    parser.add_argument("--preset", choices=sorted(tb.PRESETS), default="full", help="whose DMD settings (default full)")
    parser.add_argument("--steps", type=int, default=4, help="student steps (default 4)")
    parser.add_argument("--readings", nargs="+", choices=SCORE_SAMPLES, default=list(SCORE_SAMPLES))
    parser.add_argument("--lr", nargs="+", type=float, default=[1e-5, 4e-5], help="generator learning rates")
    parser.add_argument("--anchor", nargs="+", type=float, default=[10.0, 50.0], help="trajectory weights")
    parser.add_argument("--updates", type=int, default=150, help="generator updates per run (default 150)")
    parser.add_argument("--samples", type=int, default=256, help="samples per row (default 256)")
    parser.add_argument("--tie", type=float, default=1.0,
                        help="unpaired FD_T differences up to this count as ties, broken by paired MSE (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="training processes, one thread each (default 2)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--threads", type=parse_threads, default=AUTO, metavar="auto|N")
    args = parser.parse_args(argv)
    if not (args.build / "students" / f"step{args.steps}" / "pretrain.safetensors").exists():
        print(f"{args.build}: no students/step{args.steps}/pretrain.safetensors (run the build's pretrain stage)",
              file=sys.stderr)
        return 2
    b = tb.Build(args.build, tb.PRESETS[args.preset], progress=False)
    runs = sweep_runs(b, args.out, args.steps, args.readings, args.lr, args.anchor, args.updates)
    seconds = train(runs, args.workers)
    set_threads(args.threads)
    record = quality.read_record(args.build)
    classifier = evaluator.load_classifier(args.build / "evaluator.safetensors")
    ref = quality.reference(args.build, classifier, args.samples, log=lambda line: print(line, file=sys.stderr))
    tokenizers = args.build / record["stages"]["variants"]["tokenizers"]
    rows = []
    for run in runs:
        tic = time.perf_counter()
        pipe = quality.load_pipeline(run["out"] / "dmd.safetensors", tokenizers)
        images = quality.generate(pipe, ref.prompts, args.steps)
        unpaired = classifier.features(quality.generate(pipe, ref.prompts, args.steps,
                                                        noise_seed=quality.UNPAIRED_NOISE_SEED))
        m = quality.measure(images, ref, classifier, unpaired)
        rows.append({"reading": run["reading"], "lr": run["lr"], "anchor": run["anchor"],
                     "train_s": seconds.get(run["out"].name), "eval_s": round(time.perf_counter() - tic, 1), **m})
    rows.sort(key=lambda r: (args.readings.index(r["reading"]), r["fd_t_unpaired"]))
    print(f"DMD sweep on {args.build} ({args.steps} steps, {args.updates} generator updates, {args.samples} samples, "
          f"CFG 1): teacher-vs-itself unpaired FD_T {ref.fd_t_floor:.2f}")
    print("| reading | lr | anchor | unpaired FD_T | FD_T | paired MSE | FD real | shape | all |")
    print("|---" * 9 + "|")
    for r in rows:
        print(f"| {r['reading']} | {r['lr']:g} | {r['anchor']:g} | {r['fd_t_unpaired']:.2f} | {r['fd_t']:.2f} | "
              f"{r['paired_mse']:.4f} | {r['fd_real']:.1f} | {100 * r['acc_shape']:.0f} % | "
              f"{100 * r['acc_all']:.0f} % |")
    best = {}
    for reading in args.readings:
        mine = [r for r in rows if r["reading"] == reading]
        tied = [r for r in mine if r["fd_t_unpaired"] <= mine[0]["fd_t_unpaired"] + args.tie]
        pick = min(tied, key=lambda r: r["paired_mse"])
        best[reading] = {"trajectory_weight": pick["anchor"], "optim": {"lr": pick["lr"]}}
    print("reading_dmd =", json.dumps(best))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
