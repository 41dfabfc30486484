"""The training config: one TOML file parsed into typed dataclasses (every [choice] of ALGORITHM.md is a field).

Unknown keys and bad values are refused with the key's dotted path and what is allowed. The resolved config
(defaults filled in) is written beside every checkpoint as ``config.toml``, and its hash goes into the
checkpoint's provenance metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the key path."""


@dataclass
class ModelConfig:
    teacher: str = ""                  # checkpoint with the teacher MM-DiT (and text encoders, VAE for data/previews)
    student_init: str = ""             # checkpoint the student starts from; default: the teacher
    tokenizers: str = ""               # tokenizer folder for the data stage (default: SD35_FLASH_TOKENIZERS etc.)
    device: str = "auto"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # weight dtype of the frozen teacher


@dataclass
class DataConfig:
    prompts: str = ""                  # text file, one prompt a line
    dir: str = "data"                  # shards + manifest.json, relative to train.out
    samples_per_prompt: int = 1
    teacher_steps: int = 32
    teacher_cfg: float = 4.0
    negative: str = ""
    shift: float = 3.0
    width: int = 64
    height: int = 64
    shard_size: int = 64
    sample_batch: int = 8              # samples per teacher forward (x2 with CFG); shards do not depend on it
    seed: int = 0


@dataclass
class StudentConfig:
    steps: Literal[2, 4] = 4
    sigmas: list[float] = field(default_factory=list)  # default: ALGORITHM.md's grid for `steps`
    sampler_mode: Literal["euler", "renoise"] = "euler"


@dataclass
class DropoutConfig:
    t5: float = 0.1                    # per batch: the 77-token CLIP-only conditioning
    clip_l: float = 0.05               # per sample: CLIP-L's channels zeroed
    clip_g: float = 0.05


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    out: str = "runs/flash"
    batch_size: int = 4
    seed: int = 0
    autocast: Literal["none", "bf16"] = "none"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0              # 0: no preview grids
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])


@dataclass
class PretrainConfig:
    iterations: int = 2000
    loss: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: float = 1e-3
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class DMDConfig:
    iterations: int = 1200
    score_sample: Literal["shared_next", "shared_current", "renoise"] = "shared_next"
    real_cfg: float = 2.0
    fake_updates_per_step: int = 5
    fake_warmup_steps: int = 0
    trajectory_weight: float = 0.0      # the Stage-A loss kept as an anchor
    normaliser: Literal["per_sample", "per_batch"] = "per_sample"
    g_clip: float = 0.0                 # 0: |g| not clipped
    renoise_range: list[float] = field(default_factory=lambda: [0.02, 0.98])
    optim: OptimConfig = field(default_factory=OptimConfig)
    fake_optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class SplitConfig:
    iterations: int = 400
    boundary: float = 500.0             # on the model timestep 1000 * sigma: high branch > boundary
    objective: Literal["dmd", "trajectory"] = "dmd"
    ema_decay: float = 0.99
    merge_alpha: float = 0.5            # theta = a * theta_high + (1 - a) * theta_low


def _teacher_optim() -> OptimConfig:
    return OptimConfig(lr=1e-3, warmup_steps=100)


@dataclass
class TeacherConfig:
    """The teacher stage: an MM-DiT trained from scratch by rectified flow on VAE latents of (image, caption)
    pairs (TOYWORLD.md "Teacher"; ALGORITHM.md "Notation"). Its output, ``train.out/teacher.safetensors``, is an
    official checkpoint that ``model.teacher`` of the distillation stages can name."""

    iterations: int = 1500
    batch_size: int = 128
    dataset: str = "toyworld"          # "toyworld", or a folder of images each with a same-named .txt caption
    dataset_size: int = 20000          # toyworld: scenes drawn once (seed train.seed) and encoded; folder: a cap
    image_size: int = 16               # pixels (square); latents are image_size / the VAE's downscale factor
    components: str = ""               # checkpoint holding the frozen VAE and text encoders (an MM-DiT is ignored)
    depth: int = 2                     # ComfyUI infers depth = hidden_size / 64: keep them so for ComfyUI use
    hidden_size: int = 128
    pos_embed_max_size: int = 16       # patches per side of the positional table (>= latent side / 2)
    dual_attention_layers: list[int] = field(default_factory=lambda: [0])  # MM-DiT-X layers
    qk_norm: bool = True
    logit_normal_mean: float = 0.0     # sigma = sigmoid(N(mean, std)) (SD3's logit-normal sampling)
    logit_normal_std: float = 1.0
    caption_dropout: float = 0.1       # per sample: the empty caption (the null prompt of CFG)
    ema_decay: float = 0.999           # the EMA is what is saved; warmed up as min(decay, (1 + n) / (10 + n))
    optim: OptimConfig = field(default_factory=_teacher_optim)


@dataclass
class DistributedConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # under torchrun: nccl on GPU, gloo on CPU (auto)
    fsdp: bool = False                 # shard weights, gradients and optimizer state (FSDP2) instead of DDP


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """A short hash of the resolved config (provenance metadata)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def resolve(self, path: str) -> Path:
        """``path`` relative to ``train.out`` (absolute paths stay)."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.train.out) / p


# ------------------------------------------------------------------------------------------------ parsing


def _describe(kind) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if origin is list:
        return f"a list of {_describe(typing.get_args(kind)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))


def _coerce(path: str, kind, value):
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {value!r}")
        return _build(kind, value, path + ".")
    if origin is Literal:
        allowed = typing.get_args(kind)
        if value in allowed and type(value) is type(allowed[0]):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{path}[{i}]", typing.get_args(kind)[0], v) for i, v in enumerate(value)]
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"{path}: expected {_describe(kind)}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed here: {', '.join(sorted(names))}")
    values = {name: _coerce(prefix + name, hints[name], data[name]) for name in data}
    return cls(**values)


def _check(config: Config) -> None:
    positive = {"data.samples_per_prompt": config.data.samples_per_prompt, "data.teacher_steps": config.data.teacher_steps,
                "data.shard_size": config.data.shard_size,
                "data.sample_batch": config.data.sample_batch, "train.batch_size": config.train.batch_size,
                "train.keep_last": config.train.keep_last, "dmd.fake_updates_per_step": config.dmd.fake_updates_per_step}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: expected a positive integer, got {value}")
    for key in ("data.width", "data.height"):
        value = getattr(config.data, key.split(".")[1])
        if value < 16 or value % 16:
            raise ConfigError(f"{key}: expected a multiple of 16 pixels, got {value}")
    for name in ("t5", "clip_l", "clip_g"):
        p = getattr(config.dropout, name)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"dropout.{name}: expected a probability in [0, 1], got {p}")
    for key, decay in (("split.ema_decay", config.split.ema_decay), ("split.merge_alpha", config.split.merge_alpha)):
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"{key}: expected a number in [0, 1], got {decay}")
    sigmas = config.student.sigmas
    if sigmas:
        grid = sigmas[:-1] if sigmas[-1] == 0.0 else sigmas  # only a final 0 is optional; no other sigma <= 0
        if (len(grid) != config.student.steps or grid[0] != 1.0 or grid[-1] <= 0.0
                or any(a <= b for a, b in zip(grid, grid[1:], strict=False))):
            raise ConfigError(f"student.sigmas: expected {config.student.steps} decreasing sigmas starting at 1.0 "
                              f"(a final 0 optional), got {sigmas}")
    _check_teacher(config.teacher)
    low, high = config.dmd.renoise_range if len(config.dmd.renoise_range) == 2 else (None, None)
    if low is None or not 0.0 <= low < high <= 1.0:
        raise ConfigError(f"dmd.renoise_range: expected [low, high] with 0 <= low < high <= 1, "
                          f"got {config.dmd.renoise_range}")


def _check_teacher(teacher: TeacherConfig) -> None:
    counts = {"teacher.iterations": teacher.iterations, "teacher.batch_size": teacher.batch_size,
              "teacher.dataset_size": teacher.dataset_size, "teacher.image_size": teacher.image_size}
    for key, value in counts.items():
        if value < (0 if key == "teacher.iterations" else 1):
            raise ConfigError(f"{key}: expected a positive integer, got {value}")
    for key in ("caption_dropout", "ema_decay"):
        value = getattr(teacher, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"teacher.{key}: expected a number in [0, 1], got {value}")
    if teacher.logit_normal_std <= 0:
        raise ConfigError(f"teacher.logit_normal_std: expected a positive number, got {teacher.logit_normal_std}")
    try:
        teacher_architecture(teacher)
    except ValueError as e:
        raise ConfigError(f"teacher: {e}") from None


def teacher_architecture(teacher: TeacherConfig):
    """The :class:`~flash_core.mmdit.MMDiTConfig` of ``[teacher]`` (patch 2, 16 latent channels, SD3 widths)."""
    from ..flash_core.mmdit import MMDiTConfig

    return MMDiTConfig(depth=teacher.depth, hidden_size=teacher.hidden_size,
                       pos_embed_max_size=teacher.pos_embed_max_size,
                       dual_attention_layers=tuple(teacher.dual_attention_layers), qk_norm=teacher.qk_norm)


def config_from_dict(data: dict, source: str = "config") -> Config:
    try:
        config = _build(Config, data)
        _check(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


MAX_CONFIG_BYTES = 16 * 2**20  # a config is a page of TOML; anything larger is the wrong file


def read_config_text(path: Path) -> str:
    """The config file's text: a :class:`ConfigError` naming the file when it is missing, unreadable, a folder,
    too large, or not UTF-8 text (a binary file given by mistake)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a TOML config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; expected a TOML config file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a TOML config file (not UTF-8 text: byte 0x{raw[e.start]:02x} at "
                          f"offset {e.start})") from None


def load_config(path: str | Path) -> Config:
    """Parse and validate a TOML config file."""
    path = Path(path)
    try:
        data = tomllib.loads(read_config_text(path))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(data, str(path))


def _toml_value(value) -> str:
    """A scalar or list as TOML. Not ``json.dumps`` alone: JSON writes non-finite floats as ``Infinity``/``NaN``
    and characters beyond U+FFFF as pairs of surrogate ``\\u`` escapes, both of which TOML rejects."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, str):
        return '"' + "".join("\\" + c if c in '"\\' else c if " " <= c <= "~" else f"\\U{ord(c):08x}"
                             for c in value) + '"'
    return json.dumps(value)


def to_toml(config: Config) -> str:
    """The resolved config as TOML (tables and scalars/lists of scalars only, which is all Config holds)."""
    lines: list[str] = []

    def emit(table: dict, name: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if name:
            lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in table.items():
            if isinstance(v, dict):
                emit(v, f"{name}.{k}" if name else k)

    emit(config.to_dict(), "")
    return "\n".join(lines).lstrip("\n")
