"""The README's toy-world pictures, from a finished build folder:

    python docs/toyworld_figures.py toyworld_build docs/toyworld

writes ``rows.png`` (the quality table's sample strip per row, the build's ``quality/rows.png``) and
``curves.png`` (training curves from the build's CSV logs: the teacher's flow-matching loss, the trajectory-guidance
losses of the 4- and 2-step students, the 4-step DMD run's fake-score loss (on its batches and held out) and
trajectory anchor, and the cosine between its DMD direction and the plain CFG gap). Pillow only. A build given
its teacher (``--from-teacher``) has no teacher log: ``--teacher-log`` names the log of the run that trained it.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
PANEL = (420, 260)
MARGIN = 44


def read_log(path: Path, column: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one column of a training CSV log; rows without the column are skipped."""
    steps, values = [], []
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get(column) not in (None, ""):
                steps.append(float(row["step"]))
                values.append(float(row[column]))
    return steps, values


def line_chart(title: str, series: dict[str, tuple[list[float], list[float]]], log: bool = True) -> Image.Image:
    """One panel: each series a polyline on shared axes (log10 y when ``log``), legend top right."""
    image = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(image)
    y_of = (lambda v: math.log10(max(v, 1e-12))) if log else (lambda v: v)
    xs = [x for s, _ in series.values() for x in s]
    ys = [y_of(v) for _, vs in series.values() for v in vs]
    if not xs:
        raise ValueError(f"{title}: no data to draw")
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, top, right, bottom = MARGIN, 24, PANEL[0] - 10, PANEL[1] - 28
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left),  # noqa: E731
                          bottom - (y - y0) / (y1 - y0) * (bottom - top))
    draw.rectangle((left, top, right, bottom), outline="#999999")
    draw.text((left, 6), title, fill="black")
    for value, anchor in ((y0, bottom), (y1, top)):
        label = f"{10 ** value:.3g}" if log else f"{value:.3g}"
        draw.text((4, anchor - 6), label, fill="#444444")
    draw.text((left, bottom + 6), f"{x0:g}", fill="#444444")
    draw.text((right - 30, bottom + 6), f"{x1:g}", fill="#444444")
    draw.text(((left + right) // 2 - 12, bottom + 6), "step", fill="#444444")
    for i, (name, (steps, values)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = [to_px(x, y_of(v)) for x, v in zip(steps, values, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((right - 150, top + 6 + 14 * i), name, fill=colour)
    return image


def curves(build: Path, teacher_log: Path | None = None) -> Image.Image:
    """The panels side by side. ``teacher_log``: the teacher run's CSV log (default: the build's own; a build
    given its teacher with ``--from-teacher`` has none: pass the log of the run that trained it)."""
    students = build / "students"
    teacher_log = teacher_log or build / "teacher" / "log_teacher.csv"
    dmd = students / "step4" / "log_dmd.csv"
    panels = [
        line_chart("teacher: flow-matching loss", {"teacher": read_log(teacher_log, "loss")}),
        line_chart("trajectory guidance: loss", {f"{n}-step": read_log(students / f"step{n}" / "log_pretrain.csv",
                                                                       "loss") for n in (4, 2)}),
        line_chart("DMD, 4 steps (students/step4: shared_next)", {
            "fake score": read_log(dmd, "fake"), "fake score, held out": read_log(dmd, "fake_held_out"),
            "trajectory anchor": read_log(dmd, "trajectory")}),
        line_chart("DMD, 4 steps: cos(DMD direction, CFG gap)", {"cosine": read_log(dmd, "cfg_cos")}, log=False),
    ]
    figure = Image.new("RGB", (PANEL[0] * len(panels), PANEL[1]), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (i * PANEL[0], 0))
    return figure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="a finished toy-world build folder")
    parser.add_argument("out", type=Path, help="folder for rows.png and curves.png")
    parser.add_argument("--teacher-log", type=Path, help="the teacher run's log_teacher.csv (default: the "
                        "build's; a --from-teacher build has none)")
    args = parser.parse_args(argv)
    teacher_log = args.teacher_log or args.build / "teacher" / "log_teacher.csv"
    if not teacher_log.exists():
        print(f"toyworld_figures: error: {teacher_log} is missing (a build given its teacher has no teacher log: "
              "pass --teacher-log)", file=sys.stderr)
        return 2
    rows = args.build / "quality" / "rows.png"
    if not rows.exists():
        print(f"toyworld_figures: error: {rows} is missing; finish the build (its table stage) first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rows, args.out / "rows.png")
    curves(args.build, teacher_log).save(args.out / "curves.png")
    print(args.out / "rows.png")
    print(args.out / "curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
