"""The README's picture of the demo model: the quick-start command, once per prompt, side by side.

    python docs/demo_figure.py docs/toyworld/demo_prompts.png

Each cell is exactly what ``sd35-flash generate --prompt PROMPT --seed 0 --out CELL.png`` writes with the
installed demo model (``demo/``): 16 px, shown at 128 px with whole pixels. The prompt is written under it.
Pillow and the package only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from sd35_flash.flash_core import cli

# Each shape alone in the centre, in one colour, then two objects in a relation.
PROMPTS = ("a red square in the center", "a red circle in the center", "a red triangle in the center",
           "a yellow circle left of a blue square", "a green triangle above a purple circle")
CELL, LABEL = 128, 34


def quick_start_image(prompt: str, seed: int, folder: Path) -> Image.Image:
    """The README's first command with this prompt and seed, as a user runs it."""
    out = folder / "cell.png"
    if cli.main(["generate", "--prompt", prompt, "--seed", str(seed), "--out", str(out)]) != 0:
        raise SystemExit(f"sd35-flash generate failed for '{prompt}'")
    with Image.open(out) as image:
        return image.convert("RGB").resize((CELL, CELL), Image.NEAREST)


def label(text: str) -> Image.Image:
    """The prompt in two centred lines under its cell."""
    image = Image.new("RGB", (CELL + 24, LABEL), "white")
    draw = ImageDraw.Draw(image)
    words = text.split()
    lines = [" ".join(words[:len(words) // 2 + 1]), " ".join(words[len(words) // 2 + 1:])]
    for i, line in enumerate(lines):
        width = draw.textlength(line)
        draw.text(((image.width - width) / 2, 3 + 14 * i), line, fill="black")
    return image


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gap = 24
    figure = Image.new("RGB", (len(PROMPTS) * (CELL + gap), CELL + LABEL + gap // 2), "white")
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(PROMPTS):
            x = i * (CELL + gap)
            figure.paste(quick_start_image(prompt, args.seed, Path(tmp)), (x + gap // 2, gap // 2))
            figure.paste(label(prompt), (x, CELL + gap // 2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
