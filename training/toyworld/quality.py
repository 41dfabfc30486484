"""The quality table of issue 6 (item 4; docs/toyworld.md "Metrics that discriminate"): every row a checkpoint made by a
toy-world build (``build.json``'s ``variants`` stage), sampled through the product's path, measured with the
build's evaluator.

* **Fixed prompts and noise.** Sample ``i`` has prompt ``EVAL_PROMPTS[i % 24]``; samples are generated in calls of
  :data:`CHUNK` rows, call ``j`` drawing its noise as ComfyUI and :class:`~...flash_core.pipeline.FlashPipeline` do
  (one CPU generator seeded ``NOISE_SEED + j`` for the call's whole latent batch). Every row sees the same noise
  for the same sample, so paired MSE compares like with like and a row reproduces exactly.
* **The product's path.** Generation is ``FlashPipeline.generate_latents`` (its text encoding, its schedule: the
  checkpoint's student grid for 2 and 4 steps, the shifted teacher schedule otherwise, its sampler mode, CFG with
  the empty negative) then its VAE decode. The routed row is the pipeline with the two branches behind
  :class:`~..split.RoutedMMDiT`.
* **Metrics, in the order they are read.** FD_T: Frechet distance in the classifier's feature space to the
  teacher's 32-step CFG samples (T5 on: the distillation target, for every row, T5-off rows included); unpaired
  FD_T: the same distance for the row sampled again from noise the reference never used (seeds from
  :data:`UNPAIRED_NOISE_SEED`), beside its floor, the teacher against itself from that other noise (paired FD_T
  rewards staying paired with the teacher; a student cannot beat the unpaired floor by copying); paired MSE
  to the teacher's sample from the same noise and prompt (decoded images in [-1, 1]); then FD to real images of the
  same prompts (``2 x samples`` of them) beside the real-vs-real floor at the same counts, and attribute accuracy
  against the prompts' labels (all attributes right, and each). Rows trained with several seeds give the mean and
  the sample standard deviation over seeds.
* **Cache** (docs/toyworld.md "Pitfalls" 5): the teacher's reference samples, their features, the real features and the
  floor go to ``DIR/quality/cache/reference_<samples>.safetensors``, keyed by the teacher's and evaluator's bytes
  and every setting that changes them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...flash_core.checkpoint import atomic_save
from ...flash_core.pipeline import Conditioning, FlashPipeline, latents_to_images
from ...flash_core.vae import process_out
from ..split import load_routed
from ..stages.previews import image_grid
from . import evaluator, world

CHUNK = 96                        # samples per generation call (a ComfyUI batch); call j uses noise seed NOISE_SEED + j
NOISE_SEED = 0
UNPAIRED_NOISE_SEED = 100_000     # unpaired FD_T: every row again from noise the reference never used
REAL_SEED = 1234                  # the real reference set; the floor's second draw uses REAL_SEED + 1
REFERENCE_STEPS = 32
GRID_PROMPTS = world.EVAL_PROMPTS[::3]   # 8 prompts: 4 one-object, 4 relations
GRID_SEEDS = (0, 1, 2, 3)
GRID_SCALE = 4                    # 16 px -> 64 px cells
CACHE_FORMAT = "sd35_flash.toy_quality_reference/2"
METRICS = ("fd_t", "fd_t_unpaired", "paired_mse", "fd_real", "acc_all")


# ------------------------------------------------------------------------------------------------ rows


@dataclass
class Row:
    """One line of the table: a model (one checkpoint per training seed; a (high, low) pair for the routed row)
    sampled with ``steps`` and ``cfg``, T5 on or off."""

    key: str
    label: str
    steps: int
    cfg: float
    use_t5: bool
    checkpoints: list = field(default_factory=list)
    boundary: float | None = None     # routed rows: the branches' boundary on 1000 * sigma
    reference: bool = False           # the teacher's 32-step CFG samples themselves
    split_from: str | None = None     # merged rows: the key of the DMD row the split started from

    @property
    def calls(self) -> int:
        """Model forwards per image: steps, doubled by CFG (cond and uncond)."""
        return self.steps * (2 if self.cfg != 1.0 else 1)


def read_record(build_dir: str | Path) -> dict:
    """``build.json``'s ``variants`` record (the table's checkpoints), with a sentence when it is missing."""
    path = Path(build_dir) / "build.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no build record; build first: python -m sd35_flash.training.toyworld "
                                f"--out {build_dir}")
    record = json.loads(path.read_text())
    if "variants" not in record.get("stages", {}) or "evaluator" not in record["stages"]:
        raise FileNotFoundError(f"{path}: the build has no 'variants' stage yet; finish it with "
                                f"python -m sd35_flash.training.toyworld --out {build_dir} --resume")
    return record


def build_samples(build_dir: str | Path, default: int = 480) -> int:
    """The samples per row a build's own ``table`` stage uses (its preset's ``eval_samples``)."""
    return int(read_record(build_dir)["preset"].get("eval_samples", default))


def table_rows(build_dir: str | Path) -> list[Row]:
    """The table's rows, from the build record: the teacher's reference; then for each student step count the
    naive teacher at that many steps (with CFG, and without: the same model calls as the student), the
    trajectory-guidance students (one per training seed), the anchor-only control, DMD with each ``score_sample``
    reading and fake sample, split + merge, the routed branches; then the headline rows again with T5 off."""
    b = Path(build_dir)
    v = read_record(b)["stages"]["variants"]
    teacher, cfg = b / v["teacher"], float(v["teacher_cfg"])
    rows = [Row("teacher32_cfg", f"teacher, CFG {cfg:g} (reference)", REFERENCE_STEPS, cfg, True, [teacher],
                reference=True)]
    t5_off = [Row("teacher32_cfg_t5off", f"teacher, CFG {cfg:g}", REFERENCE_STEPS, cfg, False, [teacher])]
    for steps in sorted((int(s) for s in v["table"]), reverse=True):
        e = v["table"][str(steps)]
        main = e.get("split_reading", next(iter(e["dmd"])))
        paths = lambda names: [b / n for n in names]  # noqa: E731
        naive = Row(f"teacher{steps}_cfg", f"teacher, CFG {cfg:g} (naive)", steps, cfg, True, [teacher])
        guided = Row(f"tg{steps}", "student: trajectory guidance", steps, 1.0, True,
                     paths(e.get("tg") or [e["pretrain"]]))
        anchor = ([Row(f"anchor{steps}", "+ anchor only (Stage A continued, no DMD)", steps, 1.0, True,
                       paths(e["anchor"]))] if e.get("anchor") else [])
        dmd = [Row(f"dmd{steps}_{r}", f"+ DMD {r.replace('+fake_', ', fake score at ')}", steps, 1.0, True,
                   paths(names)) for r, names in e["dmd"].items()]
        merged = Row(f"merge{steps}", f"+ DMD {main} + split, merged (full method)", steps, 1.0, True,
                     paths(e["merged"]), split_from=f"dmd{steps}_{main}")
        routed = Row(f"routed{steps}", f"+ DMD {main} + split, routed (2 checkpoints)", steps, 1.0, True,
                     [tuple(b / p for p in pair) for pair in e["branches"]], boundary=float(e["boundary"]))
        rows += [naive, Row(f"teacher{steps}", "teacher, CFG 1 (naive)", steps, 1.0, True, [teacher]), guided,
                 *anchor, *dmd, merged, routed]
        headline = [naive, guided, next(r for r in dmd if r.key.endswith(main)), merged]
        t5_off += [Row(r.key + "_t5off", r.label, r.steps, r.cfg, False, r.checkpoints) for r in headline]
    return rows + t5_off


# ------------------------------------------------------------------------------------------------ sampling


def load_pipeline(checkpoint, tokenizers: str | Path, boundary: float | None = None) -> FlashPipeline:
    """The product's pipeline for a checkpoint (CPU, fp32); for a (high, low) pair, the routed two-branch model
    with the high branch's VAE, encoders and metadata."""
    if isinstance(checkpoint, (tuple, list)):
        high, low = checkpoint
        pipe = FlashPipeline.from_checkpoint(high, tokenizers=tokenizers, device="cpu", dtype="fp32")
        routed = load_routed(high, low, boundary if boundary is not None else 500.0, dtype=torch.float32).eval()
        return FlashPipeline(routed, pipe.vae, pipe.text_encoder, pipe.metadata, "cpu",
                             downscale_factor=pipe.downscale_factor)
    return FlashPipeline.from_checkpoint(checkpoint, tokenizers=tokenizers, device="cpu", dtype="fp32")


@torch.no_grad()
def generate(pipe: FlashPipeline, prompts: Sequence[str], steps: int, cfg: float = 1.0, use_t5: bool = True,
             chunk: int = CHUNK, noise_seed: int = NOISE_SEED, progress: str | None = None) -> torch.Tensor:
    """Decoded images ``[N, 3, 16, 16]`` in [-1, 1] for ``prompts``, call ``j`` (rows ``j*chunk ...``) with noise
    seed ``noise_seed + j`` (ComfyUI's batch noise), negative prompt empty when ``cfg != 1``. ``progress``: the
    label of a bar over the calls (none when None)."""
    out = []
    negative = pipe.encode_prompt([world.NULL_PROMPT], use_t5) if cfg != 1.0 else None
    unique = list(dict.fromkeys(prompts))  # encode each distinct prompt once (the encoders are deterministic)
    encoded = pipe.encode_prompt(unique, use_t5)
    index = torch.tensor([unique.index(p) for p in prompts])
    starts = range(0, len(prompts), chunk)
    for j, start in enumerate(tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False)):
        rows = index[start:start + chunk]
        cond = Conditioning(encoded.context[rows], encoded.pooled[rows])
        uncond = negative.repeat(len(rows)) if negative is not None else None
        latents = pipe.generate_latents(cond, seed=noise_seed + j, width=world.IMAGE_SIZE, height=world.IMAGE_SIZE,
                                        steps=steps, cfg=cfg, uncond=uncond)
        images = pipe.vae.decode(process_out(latents.float()).to(pipe.vae.dtype))
        out.append(images.float().clamp(-1.0, 1.0))
    return torch.cat(out)


def sample_grid(pipe: FlashPipeline, steps: int, cfg: float = 1.0, use_t5: bool = True):
    """8 prompts (columns) x 4 noise seeds (rows), each cell scaled up 4x (nearest): the README's picture of a
    row."""
    images = []
    for seed in GRID_SEEDS:
        images += latents_to_images(generate(pipe, GRID_PROMPTS, steps, cfg, use_t5, chunk=len(GRID_PROMPTS),
                                             noise_seed=seed))
    grid = image_grid(images, columns=len(GRID_PROMPTS))
    return grid.resize((grid.width * GRID_SCALE, grid.height * GRID_SCALE), 0)


def real_grid():
    """Real scenes for the grid prompts, laid out as :func:`sample_grid` (what the rows should look like)."""
    images = []
    for seed in GRID_SEEDS:
        images += latents_to_images(world.sample_for_prompts(list(GRID_PROMPTS), REAL_SEED + 10 + seed).images)
    grid = image_grid(images, columns=len(GRID_PROMPTS))
    return grid.resize((grid.width * GRID_SCALE, grid.height * GRID_SCALE), 0)


def rows_figure(result: dict, real_path: Path | None = None, label_width: int = 330):
    """One picture of the whole table: per row (in table order) its grid's first line (the 8 grid prompts, noise
    seed 0, training seed 0), labelled with the row's label, steps and T5; real scenes of the same prompts on top.
    What the README shows beside the table."""
    from PIL import Image, ImageDraw

    strips = []
    if real_path is not None and Path(real_path).exists():
        strips.append(("real images (the world itself)", Image.open(real_path).convert("RGB")))
    for r in result["rows"]:
        if r.get("grid") and Path(r["grid"]).exists():
            strips.append((f"{r['label']}, {r['steps']} steps{'' if r['t5'] else ', T5 off'}",
                           Image.open(r["grid"]).convert("RGB")))
    if not strips:
        raise FileNotFoundError("no row grids to draw: evaluate with grids=True first")
    cell = 16 * GRID_SCALE
    width = label_width + len(GRID_PROMPTS) * cell
    figure = Image.new("RGB", (width, cell * len(strips)), "white")
    draw = ImageDraw.Draw(figure)
    for i, (label, grid) in enumerate(strips):
        figure.paste(grid.crop((0, 0, len(GRID_PROMPTS) * cell, cell)), (label_width, i * cell))
        draw.text((6, i * cell + cell // 2 - 6), label, fill="black")
    return figure


# ------------------------------------------------------------------------------------------------ teacher probe

PROBE_REAL_SEED = 7  # the probe's real images: a seed of their own (the floor's second draw is PROBE_REAL_SEED + 1)
# the accuracy per attribute, then per asked shape (evaluator.shape_accuracy)
PROBE_COLUMNS = ("shape", "colour", "position", "colour_2", "shape_2", "size", "layout", "all", *world.SHAPES)


def frozen_parts(build_dir: str | Path):
    """A build's VAE and text encoders (a teacher's frozen parts, ``components.safetensors``) and the VAE's
    downscale factor."""
    from ...flash_core import checkpoint as ckpt
    from ...flash_core.text import TripleTextEncoder, load_tokenizers
    from ...flash_core.vae import VAEConfig

    b = Path(build_dir)
    files = ckpt.index_checkpoint(b / "components.safetensors")
    vae = ckpt.load_vae(ckpt.component_state_dict(files, "vae"))
    text = TripleTextEncoder.from_state_dicts(
        **{slot: ckpt.component_state_dict(files, slot) if files.has(slot) else None
           for slot in ("clip_l", "clip_g", "t5")},
        tokenizers=load_tokenizers(b / "tokenizers"))
    return vae.eval(), text.eval(), VAEConfig.from_state_dict(ckpt.component_shapes(files, "vae")).downscale_factor


class TeacherProbe:
    """What a teacher draws on the evaluation prompts (docs/toyworld.md "Teacher"): ``samples`` samples
    (``EVAL_PROMPTS`` repeated, fixed noise) with ``steps`` Euler steps and CFG ``cfg`` as the table's reference
    is made, read by the build's evaluator: the accuracy per attribute, ``all`` (every attribute right), and FD
    to real images of the same prompts (twice as many) beside the real-vs-real floor at those counts."""

    def __init__(self, build_dir: str | Path, samples: int = 240, steps: int = REFERENCE_STEPS, cfg: float = 2.0):
        self.samples, self.steps, self.cfg = samples, steps, cfg
        b = Path(build_dir)
        self.classifier = evaluator.load_classifier(b / "evaluator.safetensors")
        self.vae, self.text, self.downscale = frozen_parts(b)
        self.prompts = evaluator.repeat_prompts(world.EVAL_PROMPTS, samples)
        self.labels = world.caption_labels(self.prompts)
        real = world.sample_for_prompts(evaluator.repeat_prompts(world.EVAL_PROMPTS, 2 * samples), PROBE_REAL_SEED)
        self.real_features = self.classifier.features(real.images)
        self.floor = evaluator.real_vs_real_floor(self.classifier, world.EVAL_PROMPTS, samples, 2 * samples,
                                                  PROBE_REAL_SEED + 1)

    def __call__(self, mmdit: torch.nn.Module) -> dict[str, float]:
        """``{attribute or asked shape: accuracy, ... (PROBE_COLUMNS order), "fd_real", "floor"}`` of ``mmdit``'s
        samples."""
        from ...flash_core.checkpoint import FlashMetadata

        pipe = FlashPipeline(mmdit.eval(), self.vae, self.text, FlashMetadata(), "cpu",
                             downscale_factor=self.downscale)
        images = generate(pipe, self.prompts, self.steps, self.cfg, True)
        pred = self.classifier.predict(images)
        accuracy = {**evaluator.attribute_accuracy(pred, self.labels), **evaluator.shape_accuracy(pred, self.labels)}
        accuracy = {k: accuracy[k] for k in PROBE_COLUMNS if k in accuracy}
        return {**accuracy, "fd_real": evaluator.frechet_distance(self.classifier.features(images),
                                                                  self.real_features), "floor": self.floor}


# ------------------------------------------------------------------------------------------------ reference


@dataclass
class Reference:
    """The fixed evaluation set: prompts and their labels, the teacher's 32-step CFG samples and features, the
    real reference features and the real-vs-real floor."""

    prompts: list[str]
    labels: dict[str, torch.Tensor]
    images: torch.Tensor
    features: torch.Tensor
    real_features: torch.Tensor
    real_accuracy: dict[str, float]
    floor: float
    unpaired_features: torch.Tensor  # the teacher's own samples from the unpaired noise: FD_T's floor
    cached: bool = False

    @property
    def fd_t_floor(self) -> float:
        """Unpaired FD_T of the teacher against itself."""
        return evaluator.frechet_distance(self.unpaired_features, self.features)


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def reference_key(teacher: Path, classifier_path: Path, samples: int, cfg: float) -> str:
    """What the cached reference depends on: the teacher's and evaluator's bytes and every sampling setting."""
    return json.dumps({"format": CACHE_FORMAT, "teacher": _digest(teacher), "evaluator": _digest(classifier_path),
                       "samples": samples, "cfg": cfg, "steps": REFERENCE_STEPS, "chunk": CHUNK,
                       "noise_seed": NOISE_SEED, "unpaired_noise_seed": UNPAIRED_NOISE_SEED, "real_seed": REAL_SEED,
                       "prompts": list(world.EVAL_PROMPTS)},
                      sort_keys=True)


def reference(build_dir: str | Path, classifier: evaluator.AttributeClassifier, samples: int,
              log: Callable[[str], None] = print, progress: bool = False) -> Reference:
    """The reference set of ``samples`` samples, from the cache when its key matches, else made and cached
    (``progress``: a bar over the teacher's sampling)."""
    b = Path(build_dir)
    v = read_record(b)["stages"]["variants"]
    teacher, cfg = b / v["teacher"], float(v["teacher_cfg"])
    prompts = evaluator.repeat_prompts(world.EVAL_PROMPTS, samples)
    labels = world.caption_labels(prompts)
    key = reference_key(teacher, b / "evaluator.safetensors", samples, cfg)
    path = b / "quality" / "cache" / f"reference_{samples}.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") == key:
                t = {k: f.get_tensor(k) for k in f.keys()}
                return Reference(prompts, labels, t["images"], t["features"], t["real_features"],
                                 json.loads(meta["real_accuracy"]), float(meta["floor"]), t["unpaired_features"],
                                 cached=True)
    tic = time.perf_counter()
    pipe = load_pipeline(teacher, b / v["tokenizers"])
    images = generate(pipe, prompts, REFERENCE_STEPS, cfg, True, progress="teacher reference" if progress else None)
    unpaired = generate(pipe, prompts, REFERENCE_STEPS, cfg, True, noise_seed=UNPAIRED_NOISE_SEED,
                        progress="teacher, unpaired noise" if progress else None)
    real = world.sample_for_prompts(evaluator.repeat_prompts(world.EVAL_PROMPTS, 2 * samples), REAL_SEED)
    real_features = classifier.features(real.images)
    real_accuracy = evaluator.attribute_accuracy(classifier.predict(real.images),
                                                 world.caption_labels(real.captions))
    floor = evaluator.real_vs_real_floor(classifier, world.EVAL_PROMPTS, samples, 2 * samples, REAL_SEED + 1)
    ref = Reference(prompts, labels, images, classifier.features(images), real_features, real_accuracy, floor,
                    classifier.features(unpaired))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": ref.images.contiguous(), "features": ref.features.contiguous(),
               "real_features": real_features.contiguous(),
               "unpaired_features": ref.unpaired_features.contiguous()}, str(path),
              {"key": key, "floor": repr(floor), "real_accuracy": json.dumps(real_accuracy)})
    log(f"reference: teacher {REFERENCE_STEPS} steps CFG {cfg:g}, {samples} samples, "
        f"{time.perf_counter() - tic:.1f} s (cached in {path})")
    return ref


# ------------------------------------------------------------------------------------------------ metrics


def measure(images: torch.Tensor, ref: Reference, classifier: evaluator.AttributeClassifier,
            unpaired_features: torch.Tensor) -> dict[str, float]:
    """FD_T and paired MSE against the teacher's reference, unpaired FD_T of ``unpaired_features`` (the row's
    samples from the other noise), FD to real images, attribute accuracy (``acc_<name>`` per attribute,
    ``acc_all``)."""
    features = classifier.features(images)
    accuracy = evaluator.attribute_accuracy(classifier.predict(images), ref.labels)
    return {"fd_t": evaluator.frechet_distance(features, ref.features),
            "fd_t_unpaired": evaluator.frechet_distance(unpaired_features, ref.features),
            "paired_mse": evaluator.paired_mse(images, ref.images),
            "fd_real": evaluator.frechet_distance(features, ref.real_features),
            **{f"acc_{k}": v for k, v in accuracy.items()}}


def evaluate_row(row: Row, ref: Reference, classifier: evaluator.AttributeClassifier, tokenizers: Path,
                 grid_path: Path | None = None) -> dict:
    """The row's metrics for each checkpoint (training seed), and its sample grid from the first one."""
    per_seed: list[dict[str, float]] = []
    per_sample: dict[str, list[torch.Tensor]] = {"unpaired_features": [], "paired_se": []}
    tic = time.perf_counter()
    for i, checkpoint in enumerate(row.checkpoints):
        pipe = None if row.reference and grid_path is None else load_pipeline(checkpoint, tokenizers, row.boundary)
        images = ref.images if row.reference else generate(pipe, ref.prompts, row.steps, row.cfg, row.use_t5)
        unpaired = ref.unpaired_features if row.reference else classifier.features(
            generate(pipe, ref.prompts, row.steps, row.cfg, row.use_t5, noise_seed=UNPAIRED_NOISE_SEED))
        per_seed.append(measure(images, ref, classifier, unpaired))
        per_sample["unpaired_features"].append(unpaired)
        per_sample["paired_se"].append((images.double() - ref.images.double()).pow(2).flatten(1).mean(1))
        if i == 0 and grid_path is not None:
            grid_path.parent.mkdir(parents=True, exist_ok=True)
            sample_grid(pipe, row.steps, row.cfg, row.use_t5).save(grid_path)
    metrics = {k: [m[k] for m in per_seed] for k in per_seed[0]}
    return {"key": row.key, "label": row.label, "steps": row.steps, "calls": row.calls, "cfg": row.cfg,
            "t5": row.use_t5, "seeds": len(per_seed), "metrics": metrics, "split_from": row.split_from,
            "grid": str(grid_path) if grid_path is not None else None,
            "seconds": round(time.perf_counter() - tic, 2),
            # per evaluation sample, every seed ([N, seeds, ...]): what the verdict's paired bootstrap resamples
            "per_sample": {k: torch.stack(v, dim=1).float() for k, v in per_sample.items()}}


_WORKER: dict = {}  # a row worker's evaluator, reference and tokenizers (:func:`_start_row_worker`)


def _start_row_worker(build_dir: Path, samples: int) -> None:
    """A table worker process: one torch thread, the build's evaluator and cached reference."""
    torch.set_num_threads(1)
    classifier = evaluator.load_classifier(build_dir / "evaluator.safetensors")
    _WORKER.update(classifier=classifier, ref=reference(build_dir, classifier, samples, log=lambda _: None),
                   tokenizers=build_dir / read_record(build_dir)["stages"]["variants"]["tokenizers"])


def _evaluate_in_worker(row: Row, grid_path: Path | None) -> dict:
    return evaluate_row(row, _WORKER["ref"], _WORKER["classifier"], _WORKER["tokenizers"], grid_path)


def _rows_on_workers(rows: list[Row], grid_paths: list, build_dir: Path, samples: int, workers: int):
    """Yield each row's result, in order, from ``workers`` processes of one torch thread each (rows are
    independent and fixed-noise: the same numbers up to float rounding, in about half the time on 2 cores)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_row_worker, initargs=(build_dir, samples)) as pool:
        futures = [pool.submit(_evaluate_in_worker, row, grid) for row, grid in zip(rows, grid_paths, strict=True)]
        for future in futures:
            yield future.result()


def evaluate_build(build_dir: str | Path, samples: int = 1000, grids: bool = True,
                   log: Callable[[str], None] = print, progress: bool = False, workers: int = 1) -> dict:
    """Every row of :func:`table_rows` measured on ``samples`` fixed samples; writes ``DIR/quality/table.json``,
    ``table.md`` and (``grids``) one grid PNG per row plus ``real.png``. Trains nothing. ``progress``: a bar over
    the reference and the rows. ``workers`` > 1: the rows on that many processes of one torch thread each."""
    b = Path(build_dir)
    rows = table_rows(b)
    tokenizers = b / read_record(b)["stages"]["variants"]["tokenizers"]
    classifier = evaluator.load_classifier(b / "evaluator.safetensors")
    ref = reference(b, classifier, samples, log, progress)
    folder = b / "quality"
    if grids:
        folder.mkdir(parents=True, exist_ok=True)
        real_grid().save(folder / "real.png")
    grid_paths = [folder / f"{row.key}.png" if grids else None for row in rows]
    results = []
    measured = (_rows_on_workers(rows, grid_paths, b, samples, workers) if workers > 1 else
                (evaluate_row(row, ref, classifier, tokenizers, grid) for row, grid in zip(rows, grid_paths, strict=True)))
    for result in tqdm(measured, total=len(rows), desc="quality table", unit="row", disable=not progress):
        results.append(result)
        log(f"{result['key']}: {result['seconds']:.1f} s")
    real = {"fd_real": ref.floor, **{f"acc_{k}": v for k, v in ref.real_accuracy.items()}}
    per_sample = {f"{r['key']}.{k}": v.contiguous() for r in results for k, v in r.pop("per_sample").items()}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save({**per_sample, "reference.features": ref.features.contiguous()}, folder / "samples.safetensors")
    out = {"samples": samples, "real_samples": 2 * samples, "floor": ref.floor, "fd_t_floor": ref.fd_t_floor,
           "verdict": verdict(results, per_sample, ref.features),
           "real": real,
           "reference_cached": ref.cached, "rows": results}
    (folder / "table.json").write_text(json.dumps(out, indent=1) + "\n")
    (folder / "table.md").write_text(format_tables(out))
    if grids:
        rows_figure(out, folder / "real.png").save(folder / "rows.png")
    return out


# ------------------------------------------------------------------------------------------------ the verdict


def comparisons(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(claim, row key, baseline row key) for the paper's two claims at each step count, T5 on: every shared
    reading (and fake-sample variant) of DMD against re-noising, and split + merge against its DMD student."""
    keys = {r["key"] for r in rows}
    out = []
    for steps in sorted({r["steps"] for r in rows if r["key"].startswith("dmd")}, reverse=True):
        renoise = f"dmd{steps}_renoise"
        for key in sorted(k for k in keys if k.startswith(f"dmd{steps}_shared") and not k.endswith("_t5off")):
            if renoise in keys:
                out.append(("timestep sharing", key, renoise))
        merged = next((r for r in rows if r["key"] == f"merge{steps}"), None)
        if merged is not None and merged.get("split_from") in keys:
            out.append(("split + merge", merged["key"], merged["split_from"]))
    return out


def verdict(results: list[dict], per_sample: dict[str, torch.Tensor], reference_features: torch.Tensor,
            resamples: int = 1000) -> list[dict]:
    """Each comparison of :func:`comparisons` on unpaired FD_T and paired MSE: both rows' means and seed spreads,
    the difference (row minus baseline: negative is better) and its 95 % paired bootstrap interval over the
    evaluation samples (every seed of a row pooled per sample), and the reading: ``better`` or ``worse`` when the
    interval excludes 0, else ``no clear difference``."""
    by_key = {r["key"]: r for r in results}
    width = reference_features.shape[1]

    def fd(rows: torch.Tensor) -> float:
        return evaluator.frechet_distance(rows.reshape(-1, width), reference_features)

    def mse(rows: torch.Tensor) -> float:
        return rows.double().mean().item()

    out = []
    for claim, key, base in comparisons(results):
        entry = {"claim": claim, "row": key, "baseline": base, "steps": by_key[key]["steps"]}
        for metric, name, statistic in (("fd_t_unpaired", "unpaired_features", fd), ("paired_mse", "paired_se", mse)):
            a, b = per_sample[f"{key}.{name}"], per_sample[f"{base}.{name}"]
            diff, low, high = evaluator.paired_bootstrap(a, b, statistic, resamples)
            reading = "better" if high < 0 else "worse" if low > 0 else "no clear difference"
            entry[metric] = {"row": evaluator.spread(by_key[key]["metrics"][metric]),
                             "baseline": evaluator.spread(by_key[base]["metrics"][metric]),
                             "difference": diff, "interval": [low, high], "reading": reading}
        out.append(entry)
    return out


def format_verdict(entries: list[dict]) -> list[str]:
    """The verdict as markdown lines (empty when the table has no comparison)."""
    if not entries:
        return []
    lines = ["", "The paper's claims, row against baseline (T5 on): mean ± seed spread; the difference (negative: the "
             "row is better) with its 95 % paired bootstrap interval over the evaluation samples:", "",
             "| claim | steps | row | baseline | unpaired FD_T | difference [95 %] | paired MSE | difference [95 %] |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        cells = []
        for metric, fmt, diff_fmt in (("fd_t_unpaired", ".2f", "+.2f"), ("paired_mse", ".4f", "+.1e")):
            m = e[metric]
            (ra, sa), (rb, sb) = m["row"], m["baseline"]
            low, high = m["interval"]
            cells += [f"{ra:{fmt}} ± {sa:{fmt}} vs {rb:{fmt}} ± {sb:{fmt}}",
                      f"{m['difference']:{diff_fmt}} [{low:{diff_fmt}}, {high:{diff_fmt}}]: {m['reading']}"]
        lines.append(f"| {e['claim']} | {e['steps']} | {e['row']} | {e['baseline']} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------ the table


def _cell(values: list[float], fmt: str) -> str:
    if any(not math.isfinite(v) for v in values):
        return "nan"
    mean, sd = evaluator.spread(values)
    return f"{mean:{fmt}} ± {sd:{fmt}}" if len(values) > 1 else f"{mean:{fmt}}"


def _percent(values: list[float]) -> list[float]:
    return [100 * v for v in values]


def format_tables(result: dict) -> str:
    """The markdown tables: the main one (FD_T and paired MSE first), then accuracy per attribute."""
    rows = result["rows"]
    floor_t = result.get("fd_t_floor", float("nan"))
    lines = [f"Toy-world quality: {result['samples']} samples (24 fixed prompts, fixed noise); FD_T and paired MSE "
             f"against the teacher's {REFERENCE_STEPS}-step CFG samples (T5 on), unpaired FD_T from other noise "
             f"(teacher-against-itself floor {floor_t:.2f}); FD real against {result['real_samples']} real images "
             f"(real-vs-real floor {result['floor']:.2f}). Mean ± standard deviation over training seeds where a "
             "row has several (seeds column).", "",
             "| model | steps | model calls | T5 | seeds | FD_T | FD_T unpaired | paired MSE | FD real | accuracy (all) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        unpaired = _cell(m["fd_t_unpaired"], ".2f") if "fd_t_unpaired" in m else "-"
        lines.append(f"| {r['label']} | {r['steps']} | {r['calls']} | {'on' if r['t5'] else 'off'} | {r['seeds']} | "
                     f"{_cell(m['fd_t'], '.2f')} | {unpaired} | {_cell(m['paired_mse'], '.4f')} | "
                     f"{_cell(m['fd_real'], '.2f')} | {_cell(_percent(m['acc_all']), '.1f')} % |")
    real = result["real"]
    lines.append(f"| real images (a second draw) | | | | | | | | {real['fd_real']:.2f} (floor) | "
                 f"{100 * real['acc_all']:.1f} % |")
    names = [k[4:] for k in rows[0]["metrics"] if k.startswith("acc_") and k != "acc_all"]
    lines += ["", "Attribute accuracy (%), per attribute the prompts name:", "",
              "| model | steps | T5 | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = " | ".join(_cell(_percent(r["metrics"][f"acc_{n}"]), ".1f") for n in names)
        lines.append(f"| {r['label']} | {r['steps']} | {'on' if r['t5'] else 'off'} | {cells} |")
    lines.append("| real images | | | " + " | ".join(f"{100 * real.get(f'acc_{n}', float('nan')):.1f}"
                                                    for n in names) + " |")
    lines += format_verdict(result.get("verdict", []))
    return "\n".join(lines) + "\n"
