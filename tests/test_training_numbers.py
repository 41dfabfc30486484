"""The logged numbers of short seeded runs of the DMD and split stages, pinned: a change made for speed (the
student trajectory shared by the fake-score updates and the generator step, the optimizer's kernels) must leave
every logged loss where it was, to 1e-6 (docs/algorithm.md "Stage B"). The pinned values were printed by this
file's ``__main__`` before those changes."""

from __future__ import annotations

import math
import sys
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


PINNED: dict[str, dict[str, list[float]]] = {
    "dmd_shared_next": {
        "dmd.fake": [2.267091671625773, 2.2452050050099692, 2.163362741470337, 2.148961067199707],
        "dmd.loss": [0.23705381155014038, 0.021140892058610916, 0.29859739542007446],
        "dmd.dmd": [0.2327491044998169, 0.00391768105328083, 0.2943573594093323],
        "dmd.trajectory": [0.004304702393710613, 0.017223211005330086, 0.004240029025822878],
        "dmd.g_abs": [0.5474326014518738, 0.06937989592552185, 0.6027880907058716],
        "dmd.grad_norm": [0.9022544622421265, 0.25040510296821594, 0.9194285869598389],
    },
    "dmd_renoise": {
        "dmd.loss": [0.00590137392282486, 0.008292061276733875, 0.02098277024924755, 0.008899226784706116],
        "dmd.fake": [2.267091671625773, 2.2445759773254395, 2.1622812747955322, 2.1484198570251465],
        "dmd.dmd": [0.0037138175684958696, 0.004162644501775503, 0.0043390351347625256, 0.0047898017801344395],
        "dmd.trajectory": [0.0021875561214983463, 0.004129416774958372, 0.016643734648823738, 0.0041094254702329636],
        "dmd.g_abs": [0.06920493394136429, 0.072060726583004, 0.07358704507350922, 0.07718490064144135],
        "dmd.grad_norm": [0.15024960041046143, 0.15794244408607483, 0.25038063526153564, 0.1487189531326294],
    },
    "split": {
        "dmd.loss": [0.24480992555618286, 0.24124647676944733, 0.02055007964372635, 0.2981940507888794],
        "dmd.fake": [2.267091671625773, 2.24479873975118, 2.16227658589681, 2.148777723312378],
        "dmd.dmd": [0.24262237548828125, 0.23712040483951569, 0.0038906473200768232, 0.294070839881897],
        "dmd.trajectory": [0.0021875561214983463, 0.004126077052205801, 0.016659433022141457, 0.004123213235288858],
        "dmd.g_abs": [0.5566393733024597, 0.5523357391357422, 0.06910044699907303, 0.6022617816925049],
        "dmd.grad_norm": [1.0483613014221191, 0.9082050323486328, 0.24438463151454926, 0.9151277542114258],
        "split.loss": [0.16177434008568525, 0.19291187822818756],
    },
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = make_root(tmp_path_factory.mktemp("numbers"))
    run_stages(config(root, "data", {}), "data", progress=False)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_the_logged_numbers_are_unchanged(root, name):
    got = logged(root, name)
    assert got.keys() == PINNED[name].keys()
    for key, expected in PINNED[name].items():
        assert len(got[key]) == len(expected), key
        for step, (a, b) in enumerate(zip(got[key], expected, strict=True)):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"{name} {key} step {step + 1}: {a!r} != {b!r}"


if __name__ == "__main__":  # print the values to pin
    import tempfile

    folder = make_root(Path(tempfile.mkdtemp(prefix="numbers_")))
    run_stages(config(folder, "data", {}), "data", progress=False)
    print({name: logged(folder, name) for name in RUNS}, file=sys.stdout)
