"""The logged numbers of short seeded runs of the DMD and split stages, pinned: a change made for speed (the
student trajectory shared by the fake-score updates and the generator step, the optimizer's kernels) must leave
every logged loss where it was, to 1e-6 (docs/algorithm.md "Stage B"). The pinned values
(tests/data/training_numbers.json) were written by this file's ``__main__`` before those changes; the split run's
again when its low branch began to be rolled out through the high branch (docs/algorithm.md "Stage C"), a
change of the algorithm, not of speed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sd35_flash.training.config import config_from_dict
from sd35_flash.training.distributed import World
from sd35_flash.training.trainer import Trainer, run_stages

from factories import write_tiny_checkpoint
from tokenizer_factories import write_tokenizers

LOGGED = ("loss", "fake", "dmd", "trajectory", "g_abs", "grad_norm")
RUNS = {  # name: (stage, sections)
    "dmd_shared_next": ("dmd", {"dmd": {"score_sample": "shared_next", "fake_warmup_steps": 1}}),
    "dmd_renoise": ("dmd", {"dmd": {"score_sample": "renoise"}}),
    "split": ("split", {"split": {"iterations": 2}}),
}


def make_root(root: Path) -> Path:
    write_tiny_checkpoint(root / "teacher.safetensors")
    write_tokenizers(root / "tokenizer_files")
    (root / "prompts.txt").write_text("a red circle\na blue square\na green triangle\n")
    return root


def config(root: Path, name: str, sections: dict):
    data = {
        "model": {"teacher": str(root / "teacher.safetensors"), "tokenizers": str(root / "tokenizer_files")},
        "data": {"prompts": str(root / "prompts.txt"), "dir": str(root / "data"), "samples_per_prompt": 2,
                 "teacher_steps": 8, "width": 32, "height": 32},
        "train": {"out": str(root / name), "batch_size": 4, "checkpoint_every": 100, "log_every": 1},
        "pretrain": {"iterations": 2},
        "dmd": {"iterations": 4, "fake_updates_per_step": 3, "trajectory_weight": 1.0},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return config_from_dict(data)


def logged(root: Path, name: str) -> dict[str, list[float]]:
    """Each run's values as the trainer reports them (full floats, not the CSV's 6 digits): ``{"stage.key":
    [per step]}`` for the keys in :data:`LOGGED`."""
    stage, sections = RUNS[name]
    run = config(root, name, sections)
    run_stages(run, "pretrain", progress=False)
    values: dict[str, list[float]] = {}

    def on_step(stage_name, step, total, step_values):
        for key in LOGGED:
            if key in step_values:
                values.setdefault(f"{stage_name}.{key}", []).append(float(step_values[key]))

    for s in ("dmd", "split") if stage == "split" else ("dmd",):
        Trainer(run, World(), progress=False, on_step=on_step).run(s)
    return values


PINNED_FILE = Path(__file__).parent / "data" / "training_numbers.json"  # printed by __main__ below


@pytest.fixture(scope="module")
def root(module_tmp) -> Path:
    root = make_root(module_tmp("numbers"))
    run_stages(config(root, "data", {}), "data", progress=False)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_the_logged_numbers_are_unchanged(root, name):
    got, pinned = logged(root, name), json.loads(PINNED_FILE.read_text())[name]
    assert got.keys() == pinned.keys()
    for key, expected in pinned.items():
        assert len(got[key]) == len(expected), key
        for step, (a, b) in enumerate(zip(got[key], expected, strict=True)):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"{name} {key} step {step + 1}: {a!r} != {b!r}"


if __name__ == "__main__":  # write the values to pin (only ever before a change meant to keep them); argv: only these runs
    import sys
    import tempfile

    names = sys.argv[1:] or list(RUNS)
    with tempfile.TemporaryDirectory(prefix="numbers_") as tmp:
        folder = make_root(Path(tmp))
        run_stages(config(folder, "data", {}), "data", progress=False)
        pinned = json.loads(PINNED_FILE.read_text()) if PINNED_FILE.exists() else {}
        pinned.update({name: logged(folder, name) for name in names})
    PINNED_FILE.write_text(json.dumps(pinned, indent=1) + "\n")
