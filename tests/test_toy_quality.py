"""The toy world's quality table (issue 6 item 4; training/toyworld/quality.py, benchmarks/toy_quality.py).

Fast: the evaluation helpers on a demo-shaped random checkpoint (fixed noise, the product's path, the reference
cache, the rows, the table's cells). Slow (``pytest -m slow``): a ``ci`` build made here, then the benchmark prints
every row with finite numbers and writes a grid per row."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from sd35_flash.flash_core.pipeline import latents_to_images
from sd35_flash.training.toyworld import build, evaluator, quality, world

from factories import write_demo_like_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_build(folder: Path, teacher_seed: int = 0) -> Path:
    """A build folder with what the evaluation reads: a teacher, tokenizers, an evaluator and a variants record
    (one 4-step student = the teacher file, seeds 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_demo_like_checkpoint(folder / "teacher", "teacher.safetensors", seed=teacher_seed)
    (folder / "tokenizers").mkdir(exist_ok=True)
    for sub in (folder / "teacher" / "tokenizers").iterdir():
        target = folder / "tokenizers" / sub.name
        if not target.exists():
            sub.rename(target)
    torch.manual_seed(0)
    evaluator.save_classifier(folder / "evaluator.safetensors", evaluator.AttributeClassifier(8), 8)
    t = "teacher/teacher.safetensors"
    table = {"4": {"pretrain": t, "boundary": 500.0, "tg": [t, t], "anchor": [t, t],
                   "dmd": {"shared_next": [t, t], "shared_next+fake_shared": [t, t], "renoise": [t, t]},
                   "merged": [t, t], "branches": [[t, t], [t, t]], "seeds": [0, 1], "split_reading": "shared_next"}}
    record = {"preset": {}, "stages": {"evaluator": {}, "variants": {"teacher": t, "tokenizers": "tokenizers",
                                                                     "teacher_cfg": 2.0, "table": table}}}
    (folder / "build.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def fake(module_tmp):
    return fake_build(module_tmp("fake_build"))


def test_generate_is_the_pipelines_own_sampling(fake):
    """A chunk of one sample is exactly what ``FlashPipeline.__call__`` makes for that prompt and seed."""
    pipe = quality.load_pipeline(fake / "teacher" / "teacher.safetensors", fake / "tokenizers")
    prompt = world.EVAL_PROMPTS[3]
    ours = latents_to_images(quality.generate(pipe, [prompt], 4, 2.0, chunk=1, noise_seed=7))[0]
    product = pipe(prompt, steps=4, seed=7, cfg=2.0, width=16, height=16, progress=False)[0]
    assert ours.tobytes() == product.tobytes()


def test_fixed_noise_reproduces_and_pairs_by_chunk(fake):
    pipe = quality.load_pipeline(fake / "teacher" / "teacher.safetensors", fake / "tokenizers")
    prompts = evaluator.repeat_prompts(world.EVAL_PROMPTS, 5)
    a = quality.generate(pipe, prompts, 2, chunk=2)
    assert torch.equal(a, quality.generate(pipe, prompts, 2, chunk=2))
    # Sample i's noise depends only on its chunk: the first chunk alone gives the same two images (up to the
    # round-off of encoding a batch of another size).
    torch.testing.assert_close(a[:2], quality.generate(pipe, prompts[:2], 2, chunk=2), atol=1e-5, rtol=0)
    assert not torch.equal(a[:2], a[2:4])  # other chunks, other noise
    assert a.shape == (5, 3, 16, 16) and a.abs().max() <= 1.0


def test_reference_is_cached_and_keyed_by_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "REFERENCE_STEPS", 2)  # the cache, not the sampling, is under test
    b = fake_build(tmp_path / "b")
    classifier = evaluator.load_classifier(b / "evaluator.safetensors")
    first = quality.reference(b, classifier, 6, log=lambda _: None)
    again = quality.reference(b, classifier, 6, log=lambda _: None)
    assert not first.cached and again.cached
    assert torch.equal(first.images, again.images) and torch.equal(first.features, again.features)
    assert torch.equal(first.real_features, again.real_features) and first.floor == again.floor
    assert first.images.shape == (6, 3, 16, 16) and first.real_features.shape == (12, evaluator.FEATURE_DIM)
    assert quality.reference(b, classifier, 7, log=lambda _: None).cached is False  # another sample count
    write_demo_like_checkpoint(b / "teacher", "teacher.safetensors", seed=5)  # another teacher: made again
    changed = quality.reference(b, classifier, 6, log=lambda _: None)
    assert not changed.cached and not torch.equal(changed.images, first.images)


def test_rows_cover_the_table_at_equal_model_calls(fake):
    rows = {r.key: r for r in quality.table_rows(fake)}
    assert rows["teacher32_cfg"].reference and rows["teacher32_cfg"].calls == 64
    assert rows["teacher4_cfg"].calls == 8 and rows["teacher4"].calls == 4 and rows["tg4"].calls == 4
    assert {"dmd4_shared_next", "dmd4_renoise", "merge4", "routed4"} <= set(rows)
    assert len(rows["tg4"].checkpoints) == 2 and rows["anchor4"].label.startswith("+ anchor only")
    assert rows["dmd4_shared_next+fake_shared"].label == "+ DMD shared_next, fake score at shared"
    assert len(rows["dmd4_renoise"].checkpoints) == 2 and rows["routed4"].boundary == 500.0
    assert all(isinstance(c, tuple) and len(c) == 2 for c in rows["routed4"].checkpoints)
    off = [k for k in rows if k.endswith("_t5off")]
    assert set(off) == {"teacher32_cfg_t5off", "teacher4_cfg_t5off", "tg4_t5off", "dmd4_shared_next_t5off",
                        "merge4_t5off"}
    assert not any(rows[k].use_t5 for k in off)


def test_a_build_without_variants_is_one_sentence(tmp_path):
    (tmp_path / "build.json").write_text(json.dumps({"stages": {"evaluator": {}}}))
    with pytest.raises(FileNotFoundError, match="variants"):
        quality.table_rows(tmp_path)


def test_cells_show_the_seed_spread():
    assert quality._cell([1.0, 2.0, 3.0], ".2f") == "2.00 ± 1.00"
    assert quality._cell([0.5], ".2f") == "0.50"
    assert quality._cell([float("nan"), 1.0], ".2f") == "nan"


# ------------------------------------------------------------------------------------------------ a ci build


@pytest.fixture(scope="module")
def ci_table(ci_build):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = importlib.util.spec_from_file_location("toy_quality", ROOT / "benchmarks" / "toy_quality.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        yield ci_build, bench
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_benchmark_prints_every_row_with_finite_numbers(ci_table, capsys):
    out, bench = ci_table
    assert bench.main(["--build", str(out), "--samples", "24", "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "quality" / "table.json").read_text())
    rows = quality.table_rows(out)
    assert [r["key"] for r in result["rows"]] == [r.key for r in rows]
    for r in result["rows"]:
        assert r["label"] in printed
        for name, values in r["metrics"].items():
            assert all(math.isfinite(v) for v in values), (r["key"], name)
        assert (out / "quality" / f"{r['key']}.png").exists()
    by_key = {r["key"]: r for r in result["rows"]}
    assert by_key["teacher32_cfg"]["metrics"]["fd_t"] == [pytest.approx(0.0, abs=1e-6)]
    assert by_key["teacher32_cfg"]["metrics"]["paired_mse"] == [0.0]
    # unpaired FD_T: the reference row's is the teacher against itself from other noise, the printed floor
    floor = by_key["teacher32_cfg"]["metrics"]["fd_t_unpaired"][0]
    assert floor > 0 and floor == pytest.approx(result["fd_t_floor"])
    assert f"teacher-against-itself floor {floor:.2f}" in printed
    assert all(r["metrics"]["fd_t_unpaired"] != r["metrics"]["fd_t"] for r in result["rows"][1:])
    assert by_key["dmd4_shared_next"]["seeds"] == 3 and "±" in printed
    assert by_key["routed2"]["calls"] == 2 and by_key["teacher2_cfg"]["calls"] == 4
    assert re.search(r"real-vs-real floor \d", printed)
    assert "| timestep sharing | 4 | dmd4_shared_next | dmd4_renoise |" in printed  # the verdict
    assert {e["claim"] for e in result["verdict"]} == {"timestep sharing", "split + merge"}
    assert (out / "quality" / "samples.safetensors").exists()
    assert (out / "quality" / "real.png").exists() and (out / "quality" / "table.md").read_text() in printed + "\n"
    # the rows on two worker processes: the same numbers (fixed noise), the same order
    assert bench.main(["--build", str(out), "--samples", "24", "--quiet", "--no-grids", "--workers", "2"]) == 0
    again = json.loads((out / "quality" / "table.json").read_text())
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in result["rows"]]
    for a, b in zip(again["rows"], result["rows"], strict=True):
        for name, values in b["metrics"].items():
            assert a["metrics"][name] == pytest.approx(values, rel=1e-3, abs=1e-5), (b["key"], name)


@pytest.mark.slow
def test_the_variant_configs_rerun_with_the_training_cli(ci_table):
    """Every variant is a TOML config in the build (rerunnable with sd35-flash-train), recorded in build.json."""
    from sd35_flash.training.config import load_config

    out, _ = ci_table
    record = json.loads((out / "build.json").read_text())["stages"]["variants"]
    for steps in ("4", "2"):
        entry = record["table"][steps]
        assert set(entry["dmd"]) == {"shared_next", "shared_current", "renoise", "shared_next+fake_shared",
                                     "shared_current+fake_shared"}
        assert all(len(paths) == 3 for paths in entry["dmd"].values()) and len(entry["merged"]) == 3
        assert len(entry["tg"]) == len(entry["anchor"]) == 3
        for path in [*sum(entry["dmd"].values(), []), *entry["merged"], *sum(entry["branches"], []),
                     *entry["tg"], *entry["anchor"]]:
            assert (out / path).exists(), path
    # each DMD seed starts from the trajectory-guidance student of its own seed
    variants = out / "students" / "step4" / "variants"
    config = load_config(variants / "renoise_s2.toml")
    assert config.dmd.score_sample == "renoise" and config.dmd.fake_sample == "renoise" and config.train.seed == 2
    assert config.model.student_init == str(variants / "tg_s2" / "pretrain.safetensors")
    shared = load_config(variants / "shared_next+fake_shared_s1.toml")
    assert shared.dmd.fake_sample == "shared" and shared.model.student_init == str(variants / "tg_s1" /
                                                                                    "pretrain.safetensors")
    anchor = load_config(variants / "anchor_s0.toml")
    assert anchor.model.student_init == str(out / "students" / "step4" / "pretrain.safetensors")
    assert anchor.pretrain.iterations == build.generator_updates(build.PRESETS["ci"])


def test_the_verdict_reads_a_clear_difference_and_a_tie():
    """Each claim's row against its baseline on unpaired FD_T and paired MSE, with a paired bootstrap interval
    over the samples: an interval clear of 0 reads as better or worse, one across 0 as no clear difference."""
    torch.manual_seed(0)
    reference = torch.randn(300, 4)
    good = torch.randn(300, 2, 4)  # [samples, seeds, features]: drawn like the reference
    per_sample = {"dmd4_renoise.unpaired_features": good + 1.0,  # shifted: far from the reference
                  "dmd4_shared_next.unpaired_features": good,
                  "merge4.unpaired_features": good + 1e-4 * torch.randn(300, 2, 4),
                  "dmd4_renoise.paired_se": torch.full((300, 2), 0.2),
                  "dmd4_shared_next.paired_se": torch.rand(300, 2) * 0.2,
                  "merge4.paired_se": torch.rand(300, 2) * 0.2}
    metrics = {"fd_t_unpaired": [1.0, 1.2], "paired_mse": [0.1, 0.1]}
    rows = [{"key": "dmd4_renoise", "steps": 4, "metrics": metrics},
            {"key": "dmd4_shared_next", "steps": 4, "metrics": metrics},
            {"key": "merge4", "steps": 4, "metrics": metrics, "split_from": "dmd4_shared_next"}]
    sharing, split = quality.verdict(rows, per_sample, reference, resamples=200)
    assert (sharing["row"], sharing["baseline"], split["baseline"]) == ("dmd4_shared_next", "dmd4_renoise",
                                                                       "dmd4_shared_next")
    assert sharing["fd_t_unpaired"]["reading"] == "better" and sharing["paired_mse"]["reading"] == "better"
    assert sharing["fd_t_unpaired"]["interval"][1] < 0
    assert split["fd_t_unpaired"]["reading"] == "no clear difference"
    assert split["fd_t_unpaired"]["row"] == (1.1, pytest.approx(0.1414, abs=1e-3))  # mean ± spread over seeds
    text = "\n".join(quality.format_verdict([sharing, split]))
    assert "| timestep sharing | 4 | dmd4_shared_next | dmd4_renoise |" in text and ": better |" in text
