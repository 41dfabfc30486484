"""The training config: one TOML file parsed into typed dataclasses (every [choice] of docs/algorithm.md is a field).

Unknown keys and bad values are refused with the key's dotted path and what is allowed. The resolved config
(defaults filled in) is written beside every checkpoint as ``config.toml``, and its hash goes into the
checkpoint's provenance metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..flash_core.schedule import grid_problem

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the key path."""


# ------------------------------------------------------------------------------------------- allowed values
#
# Every field says what it allows next to its default (``allowed(...)``: a :class:`Range` for a number or each
# item of a list, a list length, a string pattern, a rule on the whole value), so the check and the message
# come from one place. :func:`check_config` walks them; a few rules that tie two keys together follow it.

SEED_MAX = 2**64 - 1        # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (train.sample_seeds)
DATA_SEED_MAX = 2**63 - 1   # teacher sample i is drawn with data.seed + i: headroom below SEED_MAX
TRAIN_SEED_MAX = 2**32 - 1  # every step's seed is train.seed * 1_000_003 + ...: it stays below SEED_MAX
MAX_STUDENT_SIGMAS = 65     # student.sigmas: 64 steps and the final 0 at most
ALLOWED = "allowed"         # the dataclass field metadata key holding an :class:`Allowed`


def _show(x) -> str:
    """A bound as a message says it: ``1000``, ``1e-05``, ``2**64 - 1``."""
    if isinstance(x, int) and x >= 2**31 and (x + 1) & x == 0:
        return f"2**{x.bit_length()} - 1"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _shown(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a message stays one short line whatever the value)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Range:
    """The numbers a field (or each item of a list field) allows: bounds, open or closed; a step; whether inf
    is allowed. NaN never is: ``allows`` only says yes when every comparison holds, and each fails for NaN."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple: int = 1
    finite: bool = True
    note: str = ""

    def allows(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return False
        if self.finite and not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        if self.high is not None and not (value < self.high if self.high_open else value <= self.high):
            return False
        return self.multiple == 1 or value % self.multiple == 0

    def text(self, integer: bool) -> str:
        """``an integer >= 1``, ``a finite number in (0, 1000)``, ``a multiple of 16 in [16, 16384]``."""
        kind = (f"a multiple of {self.multiple}" if self.multiple > 1 else "an integer" if integer
                else "a finite number" if self.finite else "a number")
        if self.low is not None and self.high is not None:
            bounds = (f" in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}"
                      f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            bounds = f" {'>' if self.low_open else '>='} {_show(self.low)}"
        elif self.high is not None:
            bounds = f" {'<' if self.high_open else '<='} {_show(self.high)}"
        else:
            bounds = ""
        return kind + bounds + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Allowed:
    """What one field allows beyond its type: ``numbers`` for the number or each list item, a list ``length``
    (min, max), a string ``pattern`` (full match) and a ``rule`` on the whole value; ``text`` says the pattern
    or the rule (and the length, when given) in messages."""

    numbers: Range | None = None
    length: tuple[int, int] | None = None
    pattern: str = ""
    rule: Callable[[Any], bool] | None = None
    text: str = ""

    def check(self, path: str, value, integer: bool) -> None:
        """A :class:`ConfigError` naming ``path`` (or ``path[i]``) and the allowed values, when ``value`` is not
        one of them; ``integer``: the number (or item) is an ``int`` field."""
        if self.length is not None and not self.length[0] <= len(value) <= self.length[1]:
            raise ConfigError(f"{path}: expected {self.text or self._list_text(integer)}, got {_shown(value)}")
        if self.numbers is not None:
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                if not self.numbers.allows(item):
                    where = path if i is None else f"{path}[{i}]"
                    raise ConfigError(f"{where}: expected {self.numbers.text(integer)}, got {_shown(item)}")
        if (self.pattern and not re.fullmatch(self.pattern, value)) or (self.rule and not self.rule(value)):
            raise ConfigError(f"{path}: expected {self.text}, got {_shown(value)}")

    def _list_text(self, integer: bool) -> str:
        low, high = self.length
        count = f"{low}" if low == high else f"{low} to {high}"
        return f"a list of {count} items" + (f", each {self.numbers.text(integer)}" if self.numbers else "")


def allowed(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **spec) -> Any:
    """A dataclass field (``default``, or ``factory`` for a list) with what it allows (:class:`Allowed`)."""
    metadata = {ALLOWED: Allowed(**spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _student_grid(sigmas: list[float]) -> bool:
    """``[]`` (the default grid), or a student grid as a checkpoint may store it (``schedule.grid_problem``) that
    starts at 1.0."""
    return not sigmas or (grid_problem(sigmas) is None and sigmas[0] == 1.0)


def _not_blank(text: str) -> bool:
    """Not empty nor only spaces (a rule, not a regular expression: linear even in a 16 MB value)."""
    return bool(text.strip())


def _increasing(pair: list[float]) -> bool:
    return pair[0] < pair[1]


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0.0, low_open=True)                        # a finite number > 0
NON_NEGATIVE = Range(0.0)                                   # a finite number >= 0
PROBABILITY = Range(0.0, 1.0)
DECAY = Range(0.0, 1.0, high_open=True)                     # EMA decays, Adam betas: 1 would never move
GUIDANCE = Range(0.0, 100.0)                                # CFG scales (ComfyUI's cfg widget stops at 100 too)
CLIP_NORM = Range(0.0, finite=False, note="0 or inf: not clipped")
PIXELS = Range(16, 16384, multiple=16)                      # the VAE's 8 x the MM-DiT's patch 2
NOT_EMPTY = {"rule": _not_blank, "text": "a non-empty path"}
DEVICE = {"pattern": r"auto|cpu|mps|(cuda|xpu)(:[0-9]{1,3})?", "text": "auto, cpu, cuda, cuda:N, xpu, xpu:N or mps"}
GRID_TEXT = "sigmas from 1.0 strictly decreasing within (0, 1] (a final 0 optional)"


@dataclass
class ModelConfig:
    teacher: str = ""                  # checkpoint with the teacher MM-DiT (and text encoders, VAE for data/previews)
    student_init: str = ""             # checkpoint the student starts from; default: the teacher
    tokenizers: str = ""               # tokenizer folder for the data stage (default: SD35_FLASH_TOKENIZERS etc.)
    device: str = allowed("auto", **DEVICE)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # weight dtype of the frozen teacher


@dataclass
class DataConfig:
    prompts: str = ""                  # text file, one prompt a line
    dir: str = allowed("data", **NOT_EMPTY)  # shards + manifest.json, relative to train.out
    samples_per_prompt: int = allowed(1, numbers=AT_LEAST_1)
    teacher_steps: int = allowed(32, numbers=Range(1, 10_000))
    teacher_cfg: float = allowed(4.0, numbers=GUIDANCE)
    negative: str = ""
    shift: float = allowed(3.0, numbers=POSITIVE)
    width: int = allowed(64, numbers=PIXELS)
    height: int = allowed(64, numbers=PIXELS)
    shard_size: int = allowed(64, numbers=AT_LEAST_1)
    sample_batch: int = allowed(8, numbers=AT_LEAST_1)  # samples per teacher forward (x2 with CFG); shards do not depend on it
    seed: int = allowed(0, numbers=Range(0, DATA_SEED_MAX))


@dataclass
class StudentConfig:
    steps: Literal[2, 4] = 4
    # default []: docs/algorithm.md's grid for `steps`; else `steps` sigmas (checked against `steps` by check_config)
    sigmas: list[float] = allowed(factory=list, numbers=PROBABILITY, length=(0, MAX_STUDENT_SIGMAS),
                                  rule=_student_grid, text=f"at most {MAX_STUDENT_SIGMAS} {GRID_TEXT}")
    sampler_mode: Literal["euler", "renoise"] = "euler"


@dataclass
class DropoutConfig:
    t5: float = allowed(0.1, numbers=PROBABILITY)       # per batch: the 77-token CLIP-only conditioning
    clip_l: float = allowed(0.05, numbers=PROBABILITY)  # per sample: CLIP-L's channels zeroed
    clip_g: float = allowed(0.05, numbers=PROBABILITY)


@dataclass
class OptimConfig:
    lr: float = allowed(1e-5, numbers=POSITIVE)
    betas: list[float] = allowed(factory=lambda: [0.9, 0.999], numbers=DECAY, length=(2, 2),
                                 text="[beta1, beta2], each a finite number in [0, 1)")
    weight_decay: float = allowed(0.0, numbers=NON_NEGATIVE)
    grad_clip: float = allowed(1.0, numbers=CLIP_NORM)
    warmup_steps: int = allowed(0, numbers=AT_LEAST_0)
    # after the warm-up: constant, or a cosine from lr down to min_lr at the stage's last iteration
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = allowed(0.0, numbers=NON_NEGATIVE)


@dataclass
class TrainConfig:
    out: str = allowed("runs/flash", **NOT_EMPTY)
    batch_size: int = allowed(4, numbers=AT_LEAST_1)
    seed: int = allowed(0, numbers=Range(0, TRAIN_SEED_MAX))
    autocast: Literal["none", "bf16"] = "none"
    gradient_checkpointing: bool = False
    checkpoint_every: int = allowed(100, numbers=AT_LEAST_1)
    keep_last: int = allowed(3, numbers=AT_LEAST_1)
    log_every: int = allowed(10, numbers=AT_LEAST_1)
    sample_every: int = allowed(0, numbers=AT_LEAST_0)  # 0: no preview grids
    # at least one when sample_every > 0 (check_config)
    sample_seeds: list[int] = allowed(factory=lambda: [0, 1, 2, 3], numbers=Range(0, SEED_MAX), length=(0, 256))


@dataclass
class PretrainConfig:
    iterations: int = allowed(2000, numbers=AT_LEAST_1)
    loss: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: float = allowed(1e-3, numbers=POSITIVE)
    optim: OptimConfig = field(default_factory=OptimConfig)


ScoreSample = Literal["shared_next", "shared_current", "renoise"]  # the readings of timestep sharing
SCORE_SAMPLES: tuple[str, ...] = typing.get_args(ScoreSample)


@dataclass
class DMDConfig:
    iterations: int = allowed(1200, numbers=AT_LEAST_1)
    score_sample: ScoreSample = "shared_next"
    real_cfg: float = allowed(2.0, numbers=GUIDANCE)
    fake_updates_per_step: int = allowed(5, numbers=AT_LEAST_1)
    fake_warmup_steps: int = allowed(0, numbers=AT_LEAST_0)
    trajectory_weight: float = allowed(0.0, numbers=NON_NEGATIVE)  # the Stage-A loss kept as an anchor
    normaliser: Literal["per_sample", "per_batch"] = "per_sample"
    g_clip: float = allowed(0.0, numbers=CLIP_NORM)                # 0: |g| not clipped
    renoise_range: list[float] = allowed(factory=lambda: [0.02, 0.98], numbers=PROBABILITY, length=(2, 2),
                                         rule=_increasing, text="[low, high] with 0 <= low < high <= 1")
    # the student's rollout noise: the teacher data's stored noise of the batch, or fresh N(0, 1) every iteration
    noise: Literal["data", "fresh"] = "data"
    # the fake score's updates: on the batch the generator step scores next, or on another batch drawn for them
    fake_batch: Literal["same", "other"] = "same"
    # where the fake score is fit: x0 re-noised at a fresh shifted sigma, or (shared readings only) the student's
    # own trajectory point the scores are read at, with the student's velocity there as the target
    fake_sample: Literal["renoise", "shared"] = "renoise"
    optim: OptimConfig = field(default_factory=OptimConfig)
    fake_optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class SplitConfig:
    iterations: int = allowed(400, numbers=AT_LEAST_1)
    # on the model timestep 1000 * sigma: high branch > boundary
    boundary: float = allowed(500.0, numbers=Range(0.0, 1000.0, low_open=True, high_open=True))
    objective: Literal["dmd", "trajectory"] = "dmd"
    ema_decay: float = allowed(0.99, numbers=DECAY)
    merge_alpha: float = allowed(0.5, numbers=PROBABILITY)  # theta = a * theta_high + (1 - a) * theta_low


def _teacher_optim() -> OptimConfig:
    return OptimConfig(lr=1e-3, warmup_steps=100)


@dataclass
class TeacherConfig:
    """The teacher stage: an MM-DiT trained from scratch by rectified flow on VAE latents of (image, caption)
    pairs (docs/toyworld.md "Teacher"; docs/algorithm.md "Notation"). Its output, ``train.out/teacher.safetensors``, is an
    official checkpoint that ``model.teacher`` of the distillation stages can name."""

    iterations: int = allowed(1500, numbers=AT_LEAST_1)
    batch_size: int = allowed(128, numbers=AT_LEAST_1)
    # "toyworld", or a folder of images each with a same-named .txt caption
    dataset: str = allowed("toyworld", rule=_not_blank, text="a dataset name the caller provides (toyworld) or a folder")
    dataset_size: int = allowed(20000, numbers=AT_LEAST_1)  # toyworld: scenes drawn once (seed train.seed); folder: a cap
    # pixels (square); latents are image_size / the VAE's downscale factor, patched by 2
    image_size: int = allowed(16, numbers=Range(2, 8192, multiple=2))
    components: str = ""               # checkpoint holding the frozen VAE and text encoders (an MM-DiT is ignored)
    depth: int = allowed(2, numbers=Range(1, 128))  # ComfyUI infers depth = hidden_size / 64: keep them so
    hidden_size: int = allowed(128, numbers=Range(64, 16384))  # a multiple of 64 (MMDiTConfig says so)
    # latent pixels per token side: 2 as SD3 (ComfyUI reads it from x_embedder's weight); 1 for fine detail
    patch_size: int = allowed(2, numbers=Range(1, 8))
    pos_embed_max_size: int = allowed(16, numbers=Range(1, 1024))  # patches per side (>= latent side / patch)
    # MM-DiT-X layers (each below depth: MMDiTConfig says so)
    dual_attention_layers: list[int] = allowed(factory=lambda: [0], numbers=Range(0, 127), length=(0, 128))
    qk_norm: bool = True
    logit_normal_mean: float = allowed(0.0, numbers=Range())  # sigma = sigmoid(N(mean, std)) (SD3's sampling)
    logit_normal_std: float = allowed(1.0, numbers=POSITIVE)
    caption_dropout: float = allowed(0.1, numbers=PROBABILITY)  # per sample: the empty caption (CFG's null prompt)
    # the loss weight is 1 + region_weight x the dataset's region map (toyworld: where its shapes differ), over
    # its mean on the dataset; 0: plain rectified flow (a folder dataset has no region maps)
    region_weight: float = allowed(0.0, numbers=NON_NEGATIVE)
    ema_decay: float = allowed(0.999, numbers=DECAY)  # the EMA is what is saved; warmed up as min(decay, (1 + n) / (10 + n))
    # a checkpoint whose MM-DiT (of this architecture) the teacher starts from instead of a fresh init: to
    # fine-tune a trained teacher, e.g. on another sigma density; "" trains from scratch
    init: str = ""
    optim: OptimConfig = field(default_factory=_teacher_optim)


@dataclass
class DistributedConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # under torchrun: nccl on GPU, gloo on CPU (auto)
    fsdp: bool = False                 # shard weights, gradients and optimizer state (FSDP2) instead of DDP


@dataclass
class Config:
    """The whole config. Every construction is checked (:func:`check_config`), ``dataclasses.replace`` too: the
    ComfyUI training nodes put their widget values in with it, and they get the same refusals as a file."""

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

    def __post_init__(self) -> None:
        check_config(self)

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
            raise ConfigError(f"{path}: expected a table, got {_shown(value)}")
        return _build(kind, value, path + ".")
    if origin is Literal:
        choices = typing.get_args(kind)
        if value in choices and type(value) is type(choices[0]):
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
    raise ConfigError(f"{path}: expected {_describe(kind)}, got {_shown(value)}")


def _build(cls, data: dict, prefix: str = ""):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed here: {', '.join(sorted(names))}")
    values = {name: _coerce(prefix + name, hints[name], data[name]) for name in data}
    return cls(**values)


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_config(config: Config) -> None:
    """Every field's type and allowed values (its :class:`Allowed`), then the rules that tie keys together; the
    first problem is a :class:`ConfigError` naming the key path and what is allowed."""
    _check_fields(config, "")
    for rule in (_check_grid_steps, _check_sample_seeds, _check_teacher, _check_fake_sample):
        rule(config)


def _check_fields(obj, prefix: str) -> None:
    """The fields of one table, tables within it recursively (a value set after parsing is checked as well)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        path, kind, value = prefix + f.name, hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, kind):
                raise ConfigError(f"{path}: expected a table, got {_shown(value)}")
            _check_fields(value, path + ".")
            continue
        _coerce(path, kind, value)  # the type (values put in with dataclasses.replace skipped the parser)
        spec = f.metadata.get(ALLOWED)
        if spec is not None:
            item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
            spec.check(path, value, item is int)


def _check_grid_steps(config: Config) -> None:
    sigmas, steps = config.student.sigmas, config.student.steps
    if sigmas and len([s for s in sigmas if s > 0]) != steps:
        raise ConfigError(f"student.sigmas: expected {steps} {GRID_TEXT} for student.steps = {steps}, "
                          f"got {_shown(sigmas)}")


def _check_sample_seeds(config: Config) -> None:
    if config.train.sample_every > 0 and not config.train.sample_seeds:
        raise ConfigError(f"train.sample_seeds: expected at least one seed when train.sample_every > 0 "
                          f"(it is {config.train.sample_every}), got []")


def _check_fake_sample(config: Config) -> None:
    if config.dmd.fake_sample == "shared" and config.dmd.score_sample == "renoise":
        raise ConfigError("dmd.fake_sample: 'shared' fits the fake score where a shared reading reads it; with "
                          "dmd.score_sample = 'renoise' use 'renoise'")


def _check_teacher(config: Config) -> None:
    try:
        teacher_architecture(config.teacher)
    except ValueError as e:
        raise ConfigError(f"teacher: {e}") from None


def teacher_architecture(teacher: TeacherConfig):
    """The :class:`~flash_core.mmdit.MMDiTConfig` of ``[teacher]`` (16 latent channels, SD3 widths)."""
    from ..flash_core.mmdit import MMDiTConfig

    return MMDiTConfig(depth=teacher.depth, hidden_size=teacher.hidden_size, patch_size=teacher.patch_size,
                       pos_embed_max_size=teacher.pos_embed_max_size,
                       dual_attention_layers=tuple(teacher.dual_attention_layers), qk_norm=teacher.qk_norm)


def config_from_dict(data: dict, source: str = "config") -> Config:
    try:
        config = _build(Config, data)  # Config() checks itself (check_config)
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
