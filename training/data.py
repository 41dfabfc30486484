"""Stage 0, teacher data (docs/algorithm.md "Stage 0"): prompts -> teacher samples in resumable safetensors shards.

Per sample: the initial noise, the teacher's latents at every stored sigma (the student grids are on the teacher's
path exactly: the teacher's shifted schedule is merged with them), the final x0, and the text conditioning with and
without T5. Conditioning is stored unpadded (the encoders' own widths) and padded to the SD3 widths on load.

Files: ``manifest.json`` (sigmas, prompts, widths, shards) and ``shard_NNNNN.safetensors``. A shard is written to a
temporary name and renamed, then recorded in the manifest (also written atomically); a rerun skips recorded shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..flash_core.atomic import atomic_write
from ..flash_core.checkpoint import atomic_save
from ..flash_core.errors import FlashError
from ..flash_core.pipeline import FlashPipeline, check_size
from ..flash_core.schedule import (
    STUDENT_SIGMAS,
    cfg_velocity,
    initial_noise,
    sigma_to_timestep,
    teacher_sigmas,
)
from ..flash_core.text import CLIP_L_WIDTH, CONTEXT_DIM
from ..flash_core.vae import LATENT_CHANNELS
from .config import Config, ConfigError

MANIFEST = "manifest.json"
FORMAT = "sd35_flash.teacher_data/1"


def store_sigmas(config: Config) -> list[float]:
    """Every student grid a later stage may ask for: both defaults and the configured one, with 0."""
    grids = {s for grid in STUDENT_SIGMAS.values() for s in grid} | set(config.student.sigmas) | {0.0}
    return sorted(grids, reverse=True)


def teacher_path(steps: int, shift: float, through: list[float]) -> torch.Tensor:
    """The teacher's shifted schedule with the ``through`` sigmas inserted (so its path passes them exactly)."""
    sigmas = {round(float(s), 6) for s in teacher_sigmas(steps, shift)} | {round(s, 6) for s in through}
    return torch.tensor(sorted(sigmas, reverse=True), dtype=torch.float32)


def latent_shape(config: Config, downscale: int) -> tuple[int, int, int]:
    """``(16, height / f, width / f)``: the teacher's latents, sized by its VAE's ``downscale_factor`` f (8 for
    the released VAE, 1 for the toy world's; docs/toyworld.md "World": 16 px, patch 2, 64 image tokens)."""
    try:
        check_size(config.data.width, config.data.height, downscale)
    except FlashError as e:
        raise ConfigError(f"data.width/height: {e}") from None
    return (LATENT_CHANNELS, config.data.height // downscale, config.data.width // downscale)


def _read_text(path: Path, what: str, expected: str) -> str:
    """A UTF-8 text file, or a :class:`ConfigError` naming ``what`` and the file (missing, unreadable, binary)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file '{path}'") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot read '{path}' ({e.strerror or e}); expected {expected}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: '{path}' is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          f"expected {expected}") from None


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    text = _read_text(path, "data.prompts", "a text file of prompts, one per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"data.prompts: '{path}' holds no prompts (one per line expected)")
    return prompts


def conditioning_widths(text_encoder) -> tuple[int, int, int]:
    """Unpadded widths: the CLIP part of the context, the T5 part (0 without T5), and CLIP-L's share of both the
    CLIP part and the pooled vector (768 zeros stand for an absent CLIP-L, as in ComfyUI)."""
    l_width = text_encoder.clip_l.config.hidden_size if text_encoder.clip_l is not None else CLIP_L_WIDTH
    g_width = text_encoder.clip_g.config.hidden_size if text_encoder.clip_g is not None else 0
    t5_width = text_encoder.t5.config.d_model if text_encoder.t5 is not None else 0
    return l_width + g_width, t5_width, l_width


def _write_json(path: Path, value) -> None:
    """Write ``value`` as JSON, whole or not at all (flash_core/atomic.py)."""
    text = json.dumps(value, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


_MANIFEST_FIELDS = {"settings": dict, "prompts": list, "sigmas": list, "latent": list, "clip_width": int,
                    "clip_l_width": int, "t5_width": int, "count": int, "shards": list}


def _check_shard(path: Path, shard) -> None:
    """A manifest's shard record: ``{"file": a plain file name, "first": int, "count": int}``."""
    if not (isinstance(shard, dict) and isinstance(shard.get("file"), str)
            and isinstance(shard.get("first"), int) and isinstance(shard.get("count"), int)):
        raise ConfigError(f"{path}: a shard record is {str(shard)[:80]!r}; expected {{file, first, count}}")
    name = shard["file"]
    if not name or Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"{path}: shard file {name!r} is not a plain file name in the data folder")


def read_manifest(path: Path) -> dict:
    """The teacher-data index (``manifest.json``), checked: a :class:`ConfigError` naming the file when it is
    not one (binary, not JSON, another format, missing fields, shard names outside the folder)."""
    text = _read_text(path, "teacher data", "the teacher-data manifest written by the data stage")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected the teacher-data "
                          "manifest written by the data stage") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"{path}: format {found!r}, expected {FORMAT!r}")
    for key, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise ConfigError(f"{path}: '{key}' is missing or not a {kind.__name__}")
    for shard in manifest["shards"]:
        _check_shard(path, shard)
    return manifest


class _Progress:
    """tqdm plus an optional ``callback(done, total)``."""

    def __init__(self, total: int, enabled: bool, callback=None):
        self.bar, self.callback, self.done, self.total = tqdm(total=total, desc="teacher data",
                                                              disable=not enabled), callback, 0, total

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        self.bar.close()


@torch.no_grad()
def teacher_sample(mmdit, noise: torch.Tensor, cond: tuple, uncond: tuple | None, cfg: float,
                   path: torch.Tensor, keep: list[float]) -> torch.Tensor:
    """Euler with CFG along ``path`` from ``noise`` (docs/algorithm.md "Stage 0"); the latents at the ``keep`` sigmas,
    ``[B, len(keep), C, H, W]``. A batch of B samples is one forward of 2B per step: the cond rows, then ``uncond``
    (one negative, expanded) for each."""
    dtype = mmdit.dtype
    context, pooled = cond
    guided = uncond is not None and cfg != 1.0
    if guided:
        context = torch.cat([context, uncond[0].expand(len(context), -1, -1)])
        pooled = torch.cat([pooled, uncond[1].expand(len(pooled), -1)])
    context, pooled = context.to(dtype), pooled.to(dtype)
    x, kept = noise * path[0], {}
    wanted = {round(s, 6) for s in keep}
    for i in range(len(path)):
        sigma = round(float(path[i]), 6)
        if sigma in wanted:
            kept[sigma] = x.clone()
        if i == len(path) - 1:
            break
        xin = torch.cat([x, x]) if guided else x
        t = sigma_to_timestep(path[i].expand(len(xin)).to(x.device))
        v = mmdit(xin.to(dtype), t, context, pooled).float()
        if guided:
            v = cfg_velocity(*v.chunk(2), cfg)
        x = x + (path[i + 1] - path[i]) * v
    return torch.stack([kept[round(s, 6)] for s in keep], dim=1)


def encode_unpadded(text_encoder, prompts: list[str], use_t5: bool,
                    widths: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(clip, t5, pooled)`` of ``prompts`` as stored: each part of the context cut to its encoders' widths
    (:func:`conditioning_widths`), ``t5`` None without it; :func:`pad_context` pads them back."""
    context, pooled = text_encoder.encode(prompts, use_t5=use_t5)
    clip_width, t5_width, _ = widths
    n = text_encoder.clip_length
    clip = context[:, :n, :clip_width]
    t5 = context[:, n:, :t5_width] if use_t5 else None
    return clip, t5, pooled


def teacher_pipeline(config: Config) -> FlashPipeline:
    """The teacher ``model.teacher`` as a :class:`~..flash_core.pipeline.FlashPipeline` (its tokenizers,
    ``model.dtype``, ``model.device``): what :func:`make_teacher_data` samples with."""
    return FlashPipeline.from_checkpoint(config.model.teacher, tokenizers=config.model.tokenizers or None,
                                         dtype=config.model.dtype, device=config.model.device)


def make_teacher_data(config: Config, pipe, progress: bool = True, callback=None) -> Path:
    """Stage 0: write (or complete) the teacher data for ``config`` with the teacher ``pipe`` (a FlashPipeline).

    Returns the data folder. Shards already recorded in the manifest are kept; the rest are generated.
    ``callback(done, total)`` is called after every batch of samples (the ComfyUI node's progress bar).
    """
    out = config.resolve(config.data.dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(config.data.prompts)
    keep = store_sigmas(config)
    path = teacher_path(config.data.teacher_steps, config.data.shift, keep)
    widths = conditioning_widths(pipe.text_encoder)
    has_t5 = pipe.text_encoder.has_t5
    total = len(prompts) * config.data.samples_per_prompt
    shape = latent_shape(config, pipe.downscale_factor)
    settings = {k: getattr(config.data, k) for k in ("teacher_steps", "teacher_cfg", "negative", "shift", "width",
                                                     "height", "shard_size", "seed", "samples_per_prompt")}
    manifest_path = out / MANIFEST
    manifest = read_manifest(manifest_path) if manifest_path.exists() else None
    if manifest is not None and (manifest["settings"] != settings or manifest["prompts"] != prompts):
        raise ConfigError(f"{manifest_path}: holds data made with other settings or prompts; use a new data.dir")
    if manifest is None:
        manifest = {"format": FORMAT, "settings": settings, "prompts": prompts, "sigmas": keep, "latent": shape,
                    "clip_width": widths[0], "clip_l_width": widths[2], "t5_width": widths[1] if has_t5 else 0,
                    "count": total, "shards": []}
    done = {s["file"] for s in manifest["shards"]}

    uncond = {use: encode_unpadded(pipe.text_encoder, [config.data.negative], use, widths)
              for use in {False, has_t5}}
    atomic_save({"clip": uncond[False][0], "pooled": uncond[False][2],
                 **({"clip_t5": uncond[True][0], "t5": uncond[True][1], "pooled_t5": uncond[True][2]}
                    if has_t5 else {})}, out / "uncond.safetensors")
    n_shards = -(-total // config.data.shard_size)
    bar = _Progress(total, progress, callback)
    for shard in range(n_shards):
        name = f"shard_{shard:05d}.safetensors"
        first, last = shard * config.data.shard_size, min(total, (shard + 1) * config.data.shard_size)
        if name in done:
            bar.update(last - first)
            continue
        tensors = _make_shard(pipe, config, prompts, range(first, last), shape, path, keep, widths, has_t5,
                              uncond, bar)
        atomic_save(tensors, out / name)
        manifest["shards"].append({"file": name, "first": first, "count": last - first})
        _write_json(manifest_path, manifest)
    bar.close()
    return out


def _make_shard(pipe, config, prompts, indices, shape, path, keep, widths, has_t5, uncond, bar) -> dict:
    """The samples ``indices`` of one shard (docs/algorithm.md "Stage 0"), ``data.sample_batch`` of them per teacher
    forward (cond and uncond halves together, see :func:`teacher_sample`). Sample ``i``'s noise comes from its own
    seed ``data.seed + i``, so no sample depends on the batch it was made in, nor the shard on the batch size."""
    rows = {"noise": [], "trajectory": [], "clip": [], "pooled": [], "t5": [], "pooled_t5": [], "prompt_index": []}
    device, cfg = pipe.device, config.data.teacher_cfg
    u_clip, u_t5, u_pooled = uncond[has_t5]
    negative = (pad_context(u_clip, u_t5), u_pooled)
    for start in range(indices.start, indices.stop, config.data.sample_batch):
        batch = range(start, min(indices.stop, start + config.data.sample_batch))
        prompt_index = torch.tensor([i // config.data.samples_per_prompt for i in batch])
        texts = [prompts[p] for p in prompt_index.tolist()]
        noise = torch.cat([initial_noise(config.data.seed + i, (1, *shape)) for i in batch]).to(device)
        clip, _, pooled = encode_unpadded(pipe.text_encoder, texts, False, widths)
        cond = (pad_context(clip, None), pooled)
        if has_t5:
            clip_t5, t5, pooled_t5 = encode_unpadded(pipe.text_encoder, texts, True, widths)
            cond = (pad_context(clip_t5, t5), pooled_t5)
            rows["t5"].append(t5.cpu())
            rows["pooled_t5"].append(pooled_t5.cpu())
        trajectory = teacher_sample(pipe.mmdit, noise, cond, negative, cfg, path.to(device), keep)
        rows["noise"].append(noise.cpu())
        rows["trajectory"].append(trajectory.cpu())
        rows["clip"].append(clip.cpu())
        rows["pooled"].append(pooled.cpu())
        rows["prompt_index"].append(prompt_index)
        bar.update(len(batch))
    return {k: torch.cat(v).contiguous() for k, v in rows.items() if v}


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """A teacher-data safetensors file's tensors, or a :class:`ConfigError` naming it (missing, not safetensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; rerun the data stage (--stage data) to remake it") from None
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"{path}: not a teacher-data safetensors file ({str(e)[:120]}); rerun the data "
                          "stage in a new data.dir") from None


def pad_context(clip: torch.Tensor, t5: torch.Tensor | None) -> torch.Tensor:
    """Unpadded CLIP (and T5) parts -> the SD3 context ``[B, 77 (+T), 4096]``."""
    parts = [torch.nn.functional.pad(clip, (0, CONTEXT_DIM - clip.shape[-1]))]
    if t5 is not None:
        parts.append(torch.nn.functional.pad(t5, (0, CONTEXT_DIM - t5.shape[-1])))
    return torch.cat(parts, dim=1)


@dataclass
class TeacherData:
    """Teacher data in memory, with batches assembled for a stage (conditioning padded, encoder dropout applied)."""

    sigmas: list[float]
    tensors: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    clip_l_width: int
    has_t5: bool

    @classmethod
    def load(cls, folder: str | Path) -> TeacherData:
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not manifest_path.exists():
            raise ConfigError(f"{folder}: no {MANIFEST}; run the data stage first (--stage data)")
        manifest = read_manifest(manifest_path)
        if sum(s["count"] for s in manifest["shards"]) != manifest["count"]:
            raise ConfigError(f"{manifest_path}: the data is incomplete; rerun the data stage to finish it")
        parts: dict[str, list[torch.Tensor]] = {}
        for shard in sorted(manifest["shards"], key=lambda s: s["first"]):
            for key, tensor in read_shard(folder / shard["file"]).items():
                parts.setdefault(key, []).append(tensor)
        uncond = read_shard(folder / "uncond.safetensors")
        return cls(manifest["sigmas"], {k: torch.cat(v) for k, v in parts.items()}, uncond,
                   manifest["clip_l_width"], manifest["t5_width"] > 0)

    def __len__(self) -> int:
        return len(self.tensors["noise"])

    def sigma_indices(self, grid: list[float]) -> list[int]:
        """Positions of ``grid``'s sigmas in the stored trajectory (an error names a sigma that is not stored)."""
        stored = [round(s, 6) for s in self.sigmas]
        missing = [s for s in grid if round(s, 6) not in stored]
        if missing:
            raise ConfigError(f"student.sigmas: {missing} not in the teacher data (stored: {self.sigmas})")
        return [stored.index(round(s, 6)) for s in grid]

    def batch(self, indices: torch.Tensor, use_t5: bool, drop_l: torch.Tensor, drop_g: torch.Tensor) -> dict:
        """Noise, trajectory, and (context, pooled) for ``indices``; ``drop_l``/``drop_g`` ([B] bool) zero that
        CLIP's channels (its absent-encoder conditioning, docs/algorithm.md "Text encoders and T5 dropout")."""
        t = self.tensors
        use_t5 = use_t5 and self.has_t5
        clip = t["clip"][indices].clone()
        pooled = (t["pooled_t5"] if use_t5 else t["pooled"])[indices].clone()
        drop_clip(clip, pooled, drop_l, drop_g, self.clip_l_width)
        context = pad_context(clip, t["t5"][indices] if use_t5 else None)
        return {"noise": t["noise"][indices], "trajectory": t["trajectory"][indices], "context": context,
                "pooled": pooled}

    def uncond_batch(self, n: int, use_t5: bool) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.uncond
        if use_t5 and self.has_t5:
            return pad_context(u["clip_t5"], u["t5"]).expand(n, -1, -1), u["pooled_t5"].expand(n, -1)
        return pad_context(u["clip"], None).expand(n, -1, -1), u["pooled"].expand(n, -1)


def drop_clip(clip: torch.Tensor, pooled: torch.Tensor, drop_l: torch.Tensor, drop_g: torch.Tensor,
               l_width: int) -> None:
    """Zero CLIP-L's channels (the first ``l_width`` of the CLIP context and of pooled) or CLIP-G's (the rest)
    per sample, in place."""
    clip[drop_l, :, :l_width] = 0
    clip[drop_g, :, l_width:] = 0
    pooled[drop_l, :l_width] = 0
    pooled[drop_g, l_width:] = 0
