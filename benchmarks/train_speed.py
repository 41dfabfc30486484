"""Seconds per iteration of every training stage on this machine, for a small random-weight SD3.5-shaped teacher.

    python benchmarks/train_speed.py                      # depth 3, hidden 192, 32 px, batch 4
    python benchmarks/train_speed.py --depth 4 --hidden 256 --size 64 --batch 8

Prints one table: the median seconds per iteration of each stage (after the first, which warms up), and what one
iteration does (model calls with and without gradient), so the numbers can be scaled to other sizes.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sd35_flash.flash_core.checkpoint import save_checkpoint  # noqa: E402
from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig, count_parameters  # noqa: E402
from sd35_flash.training.config import config_from_dict  # noqa: E402
from sd35_flash.training.trainer import run_stages  # noqa: E402

from factories import text_state_dict, tiny_clip_g, tiny_clip_l, tiny_t5, tiny_vae  # noqa: E402
from tokenizer_factories import write_tokenizers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=192, help="a multiple of 64")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (multiple of 16)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--fake-updates", type=int, default=5)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="train_speed_"))
    config = MMDiTConfig(depth=args.depth, hidden_size=args.hidden, pos_embed_max_size=max(16, args.size // 16),
                         dual_attention_layers=(0,), qk_norm=True)
    mmdit = MMDiT(config)
    save_checkpoint(root / "teacher.safetensors", mmdit=mmdit, vae=tiny_vae(), clip_l=text_state_dict(tiny_clip_l()),
                    clip_g=text_state_dict(tiny_clip_g()), t5=text_state_dict(tiny_t5()))
    (root / "prompts.txt").write_text("a red circle\na blue square\na green triangle\na grey star\n")
    tokenizers = write_tokenizers(root / "tokenizer_files")  # CLIP BPE + T5 SentencePiece, made as the tests do
    it = args.iterations
    run = config_from_dict({
        "model": {"teacher": str(root / "teacher.safetensors"), "tokenizers": str(tokenizers)},
        "data": {"prompts": str(root / "prompts.txt"), "samples_per_prompt": 2, "teacher_steps": 8,
                 "width": args.size, "height": args.size},
        "train": {"out": str(root / "run"), "batch_size": args.batch, "log_every": 1, "checkpoint_every": 10**6},
        "pretrain": {"iterations": it}, "dmd": {"iterations": it, "fake_updates_per_step": args.fake_updates},
        "split": {"iterations": it},
    })
    run_stages(run, "all", progress=False)

    n = args.fake_updates
    calls = {
        "pretrain": "1 student step with grad",
        "dmd": f"{n} fake updates (rollout + fake step) + rollout, student step with grad, teacher (CFG) and fake",
        "split": "a DMD iteration for each of the 2 branches",
    }
    print(f"MM-DiT depth {args.depth}, hidden {args.hidden} ({count_parameters(mmdit) / 1e6:.1f} M parameters), "
          f"{args.size}x{args.size} px, batch {args.batch}, CPU")
    print(f"| stage | s/it (median of {it - 1}) | one iteration |")
    print("|---|---|---|")
    for stage, what in calls.items():
        with open(root / "run" / f"log_{stage}.csv") as f:
            times = [float(row["sec_per_it"]) for row in csv.DictReader(f)][1:]
        print(f"| {stage} | {statistics.median(times):.3f} | {what} |")


if __name__ == "__main__":
    main()
