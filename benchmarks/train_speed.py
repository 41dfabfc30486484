"""Seconds per iteration of every training stage on this machine, for a small random-weight SD3.5-shaped teacher.

    python benchmarks/train_speed.py                      # depth 3, hidden 192, 32 px, batch 4
    python benchmarks/train_speed.py --depth 4 --hidden 256 --size 64 --batch 8
    git worktree add /tmp/before 5971b27                  # an earlier version, to compare against
    python benchmarks/train_speed.py --against /tmp/before --repeats 3 --threads 2

Prints one table: the median seconds per iteration of each stage (after the first, which warms up), and what one
iteration does (model calls with and without gradient), so the numbers can be scaled to other sizes.

``--against DIR`` times the checkout in ``DIR`` (imported as ``sd35_flash`` in its own processes) and this one
in alternating pairs of fresh processes, same settings and seed, and adds each stage's speed-up (theirs / ours:
the median of the per-pair ratios, with their range over the pairs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
STAGES = ("pretrain", "dmd", "split")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=192, help="a multiple of 64")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (multiple of 16)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--fake-updates", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--against", type=Path, help="another checkout of the project to compare with")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of processes with --against")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a child: print the medians
    return parser.parse_args(argv)


def stage_seconds(args: argparse.Namespace, device: str = "cpu") -> tuple[dict[str, float], float]:
    """Train every stage once in a fresh run folder on ``device``; the median s/it per stage, and the teacher's
    size (M parameters)."""
    import torch

    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from sd35_flash.flash_core.checkpoint import save_checkpoint
    from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig, count_parameters
    from sd35_flash.training.config import config_from_dict
    from sd35_flash.training.trainer import run_stages

    from factories import text_state_dict, tiny_clip_g, tiny_clip_l, tiny_t5, tiny_vae
    from tokenizer_factories import write_tokenizers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:  # checkpoints and states: ~0.8 GB
        root = Path(tmp)
        config = MMDiTConfig(depth=args.depth, hidden_size=args.hidden,
                             pos_embed_max_size=max(16, args.size // 16), dual_attention_layers=(0,), qk_norm=True)
        mmdit = MMDiT(config)
        save_checkpoint(root / "teacher.safetensors", mmdit=mmdit, vae=tiny_vae(),
                        clip_l=text_state_dict(tiny_clip_l()), clip_g=text_state_dict(tiny_clip_g()),
                        t5=text_state_dict(tiny_t5()))
        (root / "prompts.txt").write_text("a red circle\na blue square\na green triangle\na grey star\n")
        tokenizers = write_tokenizers(root / "tokenizer_files")  # CLIP BPE + T5 SentencePiece, as the tests
        it = args.iterations
        run = config_from_dict({
            "model": {"teacher": str(root / "teacher.safetensors"), "tokenizers": str(tokenizers),
                      "device": device},
            "data": {"prompts": str(root / "prompts.txt"), "samples_per_prompt": 2, "teacher_steps": 8,
                     "width": args.size, "height": args.size},
            "train": {"out": str(root / "run"), "batch_size": args.batch, "log_every": 1,
                      "checkpoint_every": 10**6},
            "pretrain": {"iterations": it},
            "dmd": {"iterations": it, "fake_updates_per_step": args.fake_updates},
            "split": {"iterations": it},
        })
        run_stages(run, "all", progress=False)
        medians = {}
        for stage in STAGES:
            with open(root / "run" / f"log_{stage}.csv") as f:
                seconds = [float(row["sec_per_it"]) for row in csv.DictReader(f)]
                medians[stage] = statistics.median(seconds[1:])
        return medians, count_parameters(mmdit) / 1e6


def child_seconds(args: argparse.Namespace, checkout: Path) -> dict[str, float]:
    """:func:`stage_seconds` in a fresh process that imports ``checkout`` as ``sd35_flash``."""
    with tempfile.TemporaryDirectory(prefix="train_speed_path_") as path:
        os.symlink(checkout.resolve(), Path(path) / "sd35_flash")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")])}
        argv = sys.argv[1:]
        if "--against" in argv:
            i = argv.index("--against")
            del argv[i:i + 2]
        result = subprocess.run([sys.executable, str(HERE), *argv, "--json"], env=env, capture_output=True,
                                text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"train_speed: the run of {checkout} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


WHAT = {
    "pretrain": "1 student step with grad",
    "dmd": "{n} fake updates (the student's x0 + a fake step) after one shared student rollout, student step "
           "with grad, teacher (CFG) and fake",
    "split": "a DMD iteration for each of the 2 branches",
}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.json:
        print(json.dumps(stage_seconds(args)[0]))
        return
    header = (f"MM-DiT depth {args.depth}, hidden {args.hidden}, {args.size}x{args.size} px, batch "
              f"{args.batch}, {args.fake_updates} fake updates, CPU, threads "
              f"{args.threads or 'torch default'}")
    if args.against is None:
        medians, millions = stage_seconds(args)
        print(f"{header} ({millions:.1f} M parameters)")
        print(f"| stage | s/it (median of {args.iterations - 1}) | one iteration |")
        print("|---|---|---|")
        for stage in STAGES:
            print(f"| {stage} | {medians[stage]:.3f} | {WHAT[stage].format(n=args.fake_updates)} |")
        return
    ours_checkout = HERE.parents[1]
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "theirs": []}
    for i in range(args.repeats):  # alternate, and alternate who goes first
        order = (("ours", ours_checkout), ("theirs", args.against))
        for name, checkout in order if i % 2 == 0 else order[::-1]:
            runs[name].append(child_seconds(args, checkout))
    print(f"{header}; {args.repeats} pairs of fresh processes, alternating")
    print(f"| stage | before ({args.against.name}) s/it | after s/it | speed-up (range) |")
    print("|---|---|---|---|")
    for stage in STAGES:
        ours = [r[stage] for r in runs["ours"]]
        theirs = [r[stage] for r in runs["theirs"]]
        ratios = [t / o for t, o in zip(theirs, ours, strict=True)]
        print(f"| {stage} | {statistics.median(theirs):.3f} | {statistics.median(ours):.3f} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
