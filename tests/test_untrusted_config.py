"""Issue 13 items 4 and 6: config values and checkpoint metadata are untrusted input.

Config values are checked for meaning, not only type (training/config.py: each field's allowed values sit next to
it): a bad one is a one-line ``ConfigError`` naming the key path and the allowed range, from a file, from the
``sd35-flash-train`` command line (status 2, one stderr line) and from values put into a config afterwards (what
the ComfyUI training nodes do with their widgets). Our ``sd35_flash.*`` metadata values are checked when a file
is read (flash_core/checkpoint.py ``FlashMetadata``, flash_core/quant/scheme.py schemes): a malformed value that decides
the image is refused naming the file and the key, never replaced by a default; a descriptive one is ignored with
a warning naming the key; a huge one is never parsed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35_flash.flash_core import cli, schedule
from sd35_flash.flash_core.checkpoint import FlashMetadata, read_metadata
from sd35_flash.flash_core.errors import CheckpointError
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.flash_core.quant import METADATA_KEY as QUANT_KEY
from sd35_flash.flash_core.quant_io import quantize_checkpoint
from sd35_flash.training import config as config_module
from sd35_flash.training.cli import main as train_main
from sd35_flash.training.config import Config, ConfigError, config_from_dict, load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEMO = cli.DEMO_CHECKPOINT
needs_demo = pytest.mark.skipif(not DEMO.exists(), reason=f"the embedded demo model is not at {DEMO}")


def refusal(text: str) -> str:
    """The one-line ConfigError a TOML text gives (``source`` 'run.toml')."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(tomllib.loads(text), "run.toml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("run.toml: ")
    return message.removeprefix("run.toml: ")


# ------------------------------------------------------------------------------------------ config values

BAD_VALUES = [  # (TOML, the whole message after the source)
    ("[dmd.optim]\nlr = inf", "dmd.optim.lr: expected a finite number > 0, got inf"),
    ("[pretrain.optim]\nlr = nan", "pretrain.optim.lr: expected a finite number > 0, got nan"),
    ("[dmd.fake_optim]\nlr = 0.0", "dmd.fake_optim.lr: expected a finite number > 0, got 0.0"),
    ("[teacher.optim]\nlr = -1e-4", "teacher.optim.lr: expected a finite number > 0, got -0.0001"),
    ("[pretrain.optim]\nwarmup_steps = -10", "pretrain.optim.warmup_steps: expected an integer >= 0, got -10"),
    ("[pretrain]\niterations = 0", "pretrain.iterations: expected an integer >= 1, got 0"),
    ("[dmd]\niterations = -3", "dmd.iterations: expected an integer >= 1, got -3"),
    ("[teacher]\niterations = 0", "teacher.iterations: expected an integer >= 1, got 0"),
    ("[train]\ncheckpoint_every = 0", "train.checkpoint_every: expected an integer >= 1, got 0"),
    ("[train]\nlog_every = 0", "train.log_every: expected an integer >= 1, got 0"),
    ("[train]\nkeep_last = -1", "train.keep_last: expected an integer >= 1, got -1"),
    ("[train]\nsample_every = -5", "train.sample_every: expected an integer >= 0, got -5"),
    ("[teacher]\nbatch_size = 0", "teacher.batch_size: expected an integer >= 1, got 0"),
    ("[data]\nshard_size = 0", "data.shard_size: expected an integer >= 1, got 0"),
    ("[data]\nteacher_steps = 0", "data.teacher_steps: expected an integer in [1, 10000], got 0"),
    ("[data]\nheight = 520", "data.height: expected a multiple of 16 in [16, 16384], got 520"),
    ("[teacher]\nimage_size = 15", "teacher.image_size: expected a multiple of 2 in [2, 8192], got 15"),
    ("[student]\nsigmas = [1.0, nan, 0.5, 0.25]", "student.sigmas[1]: expected a finite number in [0, 1], got nan"),
    ("[student]\nsigmas = [1.0, inf, 0.5, 0.25]", "student.sigmas[1]: expected a finite number in [0, 1], got inf"),
    ("[split]\nmerge_alpha = 1.5", "split.merge_alpha: expected a finite number in [0, 1], got 1.5"),
    ("[split]\nboundary = 1000", "split.boundary: expected a finite number in (0, 1000), got 1000.0"),
    ("[split]\nboundary = 0", "split.boundary: expected a finite number in (0, 1000), got 0.0"),
    ("[split]\nema_decay = 1.0", "split.ema_decay: expected a finite number in [0, 1), got 1.0"),
    ("[teacher]\nema_decay = nan", "teacher.ema_decay: expected a finite number in [0, 1), got nan"),
    ("[dmd]\nreal_cfg = -1", "dmd.real_cfg: expected a finite number in [0, 100], got -1.0"),
    ("[data]\nteacher_cfg = inf", "data.teacher_cfg: expected a finite number in [0, 100], got inf"),
    ("[dmd]\ntrajectory_weight = nan", "dmd.trajectory_weight: expected a finite number >= 0, got nan"),
    ("[dmd]\ntrajectory_weight = -1", "dmd.trajectory_weight: expected a finite number >= 0, got -1.0"),
    ("[pretrain.optim]\ngrad_clip = nan",
     "pretrain.optim.grad_clip: expected a number >= 0 (0 or inf: not clipped), got nan"),
    ("[dmd]\ng_clip = -inf", "dmd.g_clip: expected a number >= 0 (0 or inf: not clipped), got -inf"),
    ("[pretrain]\nhuber_c = 0", "pretrain.huber_c: expected a finite number > 0, got 0.0"),
    ("[data]\nshift = nan", "data.shift: expected a finite number > 0, got nan"),
    ("[teacher]\nlogit_normal_mean = inf", "teacher.logit_normal_mean: expected a finite number, got inf"),
    ("[pretrain.optim]\nbetas = [0.9, 1.0]", "pretrain.optim.betas[1]: expected a finite number in [0, 1), got 1.0"),
    ("[dmd.optim]\nbetas = [0.9]",
     "dmd.optim.betas: expected [beta1, beta2], each a finite number in [0, 1), got [0.9]"),
    ("[pretrain.optim]\nweight_decay = -0.01",
     "pretrain.optim.weight_decay: expected a finite number >= 0, got -0.01"),
    ("[dmd]\nscore_sample = 'shared'",
     "dmd.score_sample: expected one of 'shared_next', 'shared_current', 'renoise', got 'shared'"),
    ("[train]\nseed = -1", "train.seed: expected an integer in [0, 2**32 - 1], got -1"),
    ("[data]\nseed = 9223372036854775808", "data.seed: expected an integer in [0, 2**63 - 1], got 9223372036854775808"),
    ("[train]\nsample_seeds = [0, 18446744073709551616]",
     "train.sample_seeds[1]: expected an integer in [0, 2**64 - 1], got 18446744073709551616"),
    ("[train]\nsample_every = 10\nsample_seeds = []",
     "train.sample_seeds: expected at least one seed when train.sample_every > 0 (it is 10), got []"),
    ("[model]\ndevice = 'gpu'", "model.device: expected auto, cpu, cuda, cuda:N, xpu, xpu:N or mps, got 'gpu'"),
    ("[train]\nout = ''", "train.out: expected a non-empty path, got ''"),
    ("[dropout]\nt5 = nan", "dropout.t5: expected a finite number in [0, 1], got nan"),
    ("[teacher]\ndual_attention_layers = [-1]",
     "teacher.dual_attention_layers[0]: expected an integer in [0, 127], got -1"),
    ("[teacher]\npos_embed_max_size = 0", "teacher.pos_embed_max_size: expected an integer in [1, 1024], got 0"),
]


@pytest.mark.parametrize(("text", "message"), BAD_VALUES, ids=[m.split(":")[0] + "=" + t.split("= ")[-1][:12]
                                                                for t, m in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_key_and_the_range(text, message):
    assert refusal(text) == message


def test_nan_is_refused_wherever_a_number_goes():
    """NaN passes ``not x <= 0`` style checks; every float field (and float list item) must refuse it."""
    for path, kind, default in _leaves():
        if kind is float or typing.get_args(kind) == (float,):
            section, _, key = path.rpartition(".")
            value = "[nan, nan]" if isinstance(default, list) else "nan"
            message = refusal(f"[{section}]\n{key} = {value}")
            assert message.startswith(path) and message.endswith("got nan"), message


def _leaves(cls=Config, prefix=""):
    """``(key path, type, default)`` of every leaf field of the config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield f"{prefix}{f.name}", kind, default


def test_every_number_has_its_range_next_to_it():
    """No numeric field (or list of numbers) without an ``allowed(...)`` range: a new key cannot slip in
    unchecked. The defaults are inside their ranges."""
    config = Config()
    for path, kind, _ in _leaves():
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
        if item in (int, float):
            owner = config
            *sections, name = path.split(".")
            for section in sections:
                owner = getattr(owner, section)
            spec = {f.name: f for f in dataclasses.fields(owner)}[name].metadata.get(config_module.ALLOWED)
            assert spec is not None and spec.numbers is not None, f"{path} has no range"


def test_valid_edges_are_accepted():
    config = config_from_dict(tomllib.loads(
        "[split]\nmerge_alpha = 1.0\nema_decay = 0.0\nboundary = 0.001\n[pretrain.optim]\ngrad_clip = inf\n"
        "warmup_steps = 0\nbetas = [0.0, 0.0]\n[train]\nseed = 4294967295\nsample_seeds = [18446744073709551615]\n"
        "[data]\nseed = 0\nteacher_cfg = 0\n[model]\ndevice = 'cuda:1'\n[student]\nsteps = 2\nsigmas = [1.0, 0.5, 0.0]\n"))
    assert config.pretrain.optim.grad_clip == math.inf and config.train.sample_seeds == [2**64 - 1]
    assert config.split.merge_alpha == 1.0 and config.student.sigmas == [1.0, 0.5, 0.0]


def test_a_huge_value_is_cut_in_the_message_and_checked_in_linear_time():
    message = refusal(f"[train]\nbatch_size = '{'x' * 100_000}'")
    assert message.startswith("train.batch_size: expected an integer, got 'xxx") and len(message) < 200
    start = time.perf_counter()
    for table, key in (("train", "out"), ("data", "dir"), ("teacher", "dataset"), ("model", "device")):
        with pytest.raises(ConfigError, match=f"^huge: {table}.{key}: expected .* characters\\)$"):
            config_from_dict({table: {key: " " * 8_000_000}}, "huge")
    assert time.perf_counter() - start < 10  # no backtracking regular expression over the value


def test_values_put_in_after_parsing_are_checked_too():
    """The ComfyUI training nodes put widget values in with ``dataclasses.replace`` (nodes/training.py ``_with``):
    the config checks itself on every construction, with the full key path."""
    base = Config()
    cases = {
        "pretrain.optim.lr: expected a finite number > 0, got 0.0":
            lambda c: dataclasses.replace(c, pretrain=dataclasses.replace(
                c.pretrain, optim=dataclasses.replace(c.pretrain.optim, lr=0.0))),
        "split.boundary: expected a finite number in (0, 1000), got 1000.0":
            lambda c: dataclasses.replace(c, split=dataclasses.replace(c.split, boundary=1000.0)),
        "data.teacher_cfg: expected a finite number in [0, 100], got nan":
            lambda c: dataclasses.replace(c, data=dataclasses.replace(c.data, teacher_cfg=math.nan)),
        "dmd.iterations: expected an integer, got 2.5":
            lambda c: dataclasses.replace(c, dmd=dataclasses.replace(c.dmd, iterations=2.5)),
    }
    for message, change in cases.items():
        with pytest.raises(ConfigError) as info:
            change(base)
        assert str(info.value) == message


@pytest.mark.parametrize(("text", "key"), [
    ("[pretrain]\niterations = 0\n", "pretrain.iterations: expected an integer >= 1, got 0"),
    ("[train]\ncheckpoint_every = 0\n", "train.checkpoint_every: expected an integer >= 1, got 0"),
    ("[pretrain.optim]\nwarmup_steps = -10\n", "pretrain.optim.warmup_steps: expected an integer >= 0, got -10"),
    ("[dmd.optim]\nlr = inf\n", "dmd.optim.lr: expected a finite number > 0, got inf"),
])
def test_the_training_command_line_says_it_in_one_line_and_writes_nothing(text, key, tmp_path, capsys):
    out = tmp_path / "run"
    path = tmp_path / "bad.toml"
    path.write_text(f"[train]\nout = '{out.as_posix()}'\n" + text if "[train]" not in text
                    else text.replace("[train]\n", f"[train]\nout = '{out.as_posix()}'\n"))
    assert train_main([str(path), "--stage", "pretrain", "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0] == f"sd35-flash-train: error: {path}: {key}"
    assert not out.exists()
    with pytest.raises(ConfigError, match="^" + str(path).replace("\\", "\\\\")):
        load_config(path)


# ------------------------------------------------------------------------------------------- metadata

GRID_KEY = "sd35_flash.student_sigmas"


@pytest.fixture(scope="module")
def demo_parts():
    if not DEMO.exists():
        pytest.skip(f"the embedded demo model is not at {DEMO}")
    return load_file(str(DEMO)), read_metadata(DEMO)


def _copy(demo_parts, folder: Path, name: str = "bad.safetensors", **metadata: str) -> Path:
    """The demo with some ``sd35_flash.*`` metadata replaced (``key=value``, the prefix left out)."""
    tensors, meta = demo_parts
    path = folder / name
    save_file(tensors, str(path), {**meta, **{f"sd35_flash.{k}": v for k, v in metadata.items()}})
    return path


BAD_GRIDS = {  # value -> what the refusal says
    '"fast"': "is not a list of sigmas",
    '{"steps": 4}': "is not a list of sigmas",
    "[]": "has 0 entries",
    json.dumps([1.0] + [0.5] * 999): "has 1000 entries; expected 1 to 64",
    "[1.0, -0.5, 0.25, 0.1]": "must be finite sigmas within (0, 1]",
    "[1.0, NaN, 0.5, 0.25]": "must be finite sigmas within (0, 1]",
    "[1.0, Infinity, 0.5, 0.0]": "must be finite sigmas within (0, 1]",
    "[1.0, 0.5, 0.75, 0.25]": "must decrease strictly",
    "[1.0, 0.9, 0.9, 0.5]": "must decrease strictly",
    "[1.0, 0.9, 0.0, 0.5]": "must be finite sigmas within (0, 1]",
    '[1.0, "0.9", 0.75, 0.5]': "holds '0.9', which is not a number",
    "[1.0, true, 0.5]": "holds 'True', which is not a number",
    "[1.0, 0.75": "is not valid JSON",
    "[" * 30_000 + "]" * 30_000: "is not valid JSON",  # deeper than Python's recursion: not a crash
    "[" + "1.0, " * 1_000_000 + "0.0]": "characters long; at most 65536 expected",  # 10^6 entries, 5 MB
}


@pytest.mark.parametrize("value", list(BAD_GRIDS), ids=[v[:24] for v in BAD_GRIDS])
def test_a_malformed_student_grid_is_refused_naming_the_file_and_key(value):
    with pytest.raises(CheckpointError) as info:
        FlashMetadata.from_safetensors({GRID_KEY: value}, "x.safetensors")
    message = str(info.value)
    assert message.startswith(f"'x.safetensors': metadata '{GRID_KEY}' ") and BAD_GRIDS[value] in message
    assert "\n" not in message and len(message) < 2000


def test_a_bad_stored_grid_is_never_replaced_by_another_schedule():
    """Before: a grid whose positive sigmas did not number ``steps`` (NaN is not > 0) fell back silently to the
    teacher's schedule."""
    for grid in ([1.0, math.nan, 0.5, 0.25, 0.0], [1.0, 0.5, 0.75, 0.25], [2.0, 1.0, 0.5, 0.25]):
        for steps in (4, 8):
            with pytest.raises(ValueError, match=GRID_KEY):
                schedule.flash_sigmas(steps, grid)
        with pytest.raises(ValueError, match=GRID_KEY):
            schedule.flash_sigmas(4, grid, denoise=0.5)
    good = [1.0, 0.8, 0.6, 0.3]
    assert schedule.flash_sigmas(4, good).tolist() == pytest.approx([1.0, 0.8, 0.6, 0.3, 0.0])
    assert len(schedule.flash_sigmas(8, good)) == 9  # another step count: the teacher's schedule, as before


@needs_demo
def test_a_malformed_grid_refuses_the_pipeline_info_and_generate(demo_parts, tmp_path, capsys):
    bad = _copy(demo_parts, tmp_path, student_sigmas="[1.0, NaN, 0.5, 0.25, 0.0]")
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors': metadata '{GRID_KEY}' must be finite"):
        FlashPipeline.from_checkpoint(bad, device="cpu", dtype="fp32")
    image = tmp_path / "a.png"
    for argv in (["info", str(bad)], ["generate", "--checkpoint", str(bad), "-p", "a red circle", "-o", str(image),
                                      "-q", "--steps", "8"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"metadata '{GRID_KEY}'" in err and "bad.safetensors" in err
    assert not image.exists()


@needs_demo
def test_an_unknown_sampler_mode_is_refused(demo_parts, tmp_path, capsys):
    bad = _copy(demo_parts, tmp_path, sampler_mode="dpmpp_2m")
    with pytest.raises(CheckpointError, match="metadata 'sd35_flash.sampler_mode' is 'dpmpp_2m'; expected one of "
                                              "euler, renoise"):
        FlashPipeline.from_checkpoint(bad, device="cpu", dtype="fp32")
    assert cli.main(["info", str(bad)]) == 2
    assert "sd35_flash.sampler_mode" in capsys.readouterr().err


@needs_demo
@pytest.mark.parametrize(("key", "value", "reason"), [
    ("architecture", "[1, 2, 3]", "is not a JSON object"),
    ("training", "x" * 50_000_000, "is 50000000 characters long; at most 65536 expected"),  # 50 MB
    ("t5", "7" * 200_000 + " CLIP tokens", "characters long; at most 1000 expected"),
    ("format_version", "2", "this version reads format 1"),
    ("format_version", '"one"', "this version reads format 1"),
])
def test_a_malformed_descriptive_value_is_ignored_with_a_warning_naming_the_key(demo_parts, tmp_path, caplog,
                                                                                  capsys, key, value, reason):
    path = _copy(demo_parts, tmp_path, **{key: value})
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="sd35_flash.flash_core.checkpoint"):
        assert cli.main(["info", str(path)]) == 0
    assert time.perf_counter() - start < 30  # a huge value is not parsed (nor scanned by a regular expression)
    warnings = [r.getMessage() for r in caplog.records if f"'sd35_flash.{key}'" in r.getMessage()]
    assert len(warnings) == 1 and "ignored" in warnings[0] and reason in warnings[0] and "bad.safetensors" in warnings[0]
    shown = capsys.readouterr().out.split("SD3.5-Flash metadata:")[1]
    assert f"    {key}:" not in shown  # not shown as if it were valid
    assert "student_sigmas: [1.0, 0.9, 0.75, 0.5, 0.0]" in shown  # the rest is read as before
    meta = FlashMetadata.from_safetensors(read_metadata(path), str(path))
    assert meta.student_sigmas == [1.0, 0.9, 0.75, 0.5, 0.0] and meta.format_version == 1


# ---------------------------------------------------------------------------------- quantization schemes


@pytest.fixture(scope="module")
def int4_demo(demo_parts, module_tmp) -> tuple[Path, dict]:
    """The demo quantized to int4 (MM-DiT) and int8 (T5), and its scheme, with the ``pos_embed`` entry of an
    elided sin-cos table. The shipped demo's table is 2.6e-5 off the exact one (its teacher's EMA averaged the
    buffer before ``ema_update`` took parameters only), so the quantizer keeps it whole; here it is set to the
    exact table first."""
    import math

    from sd35_flash.flash_core.mmdit import sincos_pos_embed_table

    folder = module_tmp("int4")
    tensors = load_file(str(DEMO))
    key = "model.diffusion_model.pos_embed"
    side = math.isqrt(tensors[key].shape[1])
    tensors[key] = sincos_pos_embed_table(tensors[key].shape[2], side).to(tensors[key].dtype).contiguous()
    exact = folder / "demo_exact_pos_embed.safetensors"
    save_file(tensors, str(exact), read_metadata(DEMO))
    path = folder / "int4.safetensors"
    quantize_checkpoint(exact, path, fmt="int4", t5_fmt="int8", progress=False)
    return path, json.loads(read_metadata(path)[QUANT_KEY])


def _requant(int4_demo, folder: Path, edit) -> Path:
    """The int4 demo with its scheme edited by ``edit(scheme)`` (in place) or replaced by what it returns."""
    path, scheme = int4_demo
    scheme = json.loads(json.dumps(scheme))
    scheme = edit(scheme) or scheme
    bad = folder / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), {**read_metadata(path),
                                                QUANT_KEY: scheme if isinstance(scheme, str) else json.dumps(scheme)})
    return bad


LYING_SCHEMES = {  # edit of the scheme -> what the refusal says
    "unknown format": (lambda s: s["mmdit"].update(format="int3"), "entry 'mmdit' needs a format"),
    "int8 said, int4 stored": (lambda s: s["mmdit"].update(format="int8"), "is torch.uint8, expected torch.int8"),
    "int6 said, int4 stored": (lambda s: s["mmdit"].update(format="int6"), "packed columns; int6 packs 4 values"),
    "group size not the stored one": (lambda s: s["mmdit"].update(group_size=32),
                                      "says group_size 32, which gives"),
    "group size a string": (lambda s: s["mmdit"].update(group_size="64"), "group_size must be an integer in"),
    "negative group size": (lambda s: s["mmdit"].update(group_size=-64), "group_size must be an integer in"),
    "layer count": (lambda s: s["mmdit"].update(layers=s["mmdit"]["layers"] + 1), "int4 layers; the tensors hold"),
    "t5 said int4, stored int8": (lambda s: s["t5"].update(format="int4"), "expected torch.uint8 for int4"),
    "unknown component": (lambda s: s.update(unet={"format": "int8"}), "names component 'unet'"),
    "exclude not a list": (lambda s: s["mmdit"].update(exclude="final_layer"), "exclude must be a list"),
    "pos_embed dtype": (lambda s: s["mmdit"]["pos_embed"].update(dtype="load"), "pos_embed must be"),
    "pos_embed huge": (lambda s: s["mmdit"]["pos_embed"].update(shape=[1, 10**8, 128]), "pos_embed must be"),
    "pos_embed width": (lambda s: s["mmdit"]["pos_embed"].update(shape=[1, 64, 256]),
                        "elided pos_embed is 256 wide; the MM-DiT is 128"),
    "not JSON": (lambda s: "int4 please", "is not JSON"),
    "huge": (lambda s: json.dumps({**s, "pad": "x" * 100_000}), "expected a JSON object of at most 65536"),
}


@needs_demo
@pytest.mark.parametrize("case", list(LYING_SCHEMES))
def test_a_lying_or_malformed_quantization_scheme_is_refused(case, int4_demo, tmp_path):
    edit, reason = LYING_SCHEMES[case]
    bad = _requant(int4_demo, tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        FlashPipeline.from_checkpoint(bad, device="cpu", dtype="fp32", quant_backend="dequant")
    message = str(info.value)
    assert "bad.safetensors" in message and reason in message and "\n" not in message


@needs_demo
def test_the_int4_demo_itself_loads_and_info_names_the_refusal_of_a_lie(int4_demo, tmp_path, capsys):
    path, scheme = int4_demo
    layers = scheme["mmdit"]["layers"]
    assert cli.main(["info", str(path)]) == 0
    assert f"MM-DiT quantization: int4, {layers} layers, group 64" in capsys.readouterr().out
    bad = _requant(int4_demo, tmp_path, LYING_SCHEMES["layer count"][0])
    assert cli.main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"metadata '{QUANT_KEY}' says {layers + 1} int4 layers" in err


def test_a_restored_pos_embed_uses_only_known_dtypes():
    from sd35_flash.flash_core import quant

    assert quant.POS_EMBED_DTYPES["bfloat16"] is torch.bfloat16 and "load" not in quant.POS_EMBED_DTYPES
    with pytest.raises(ValueError, match="pos_embed must be"):
        quant.parse_schemes(json.dumps({"mmdit": {"format": "int8", "pos_embed": {
            "table": "sincos", "shape": [1, 64, 128], "dtype": "__class__"}}}))


def test_a_config_without_a_teacher_names_the_key(tmp_path, capsys):
    """An empty config file: the distillation stages need ``model.teacher`` and say so (it used to name '.')."""
    from sd35_flash.training.cli import main as train_main

    config = tmp_path / "empty.toml"
    config.write_text("")
    assert train_main([str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.teacher" in err and "Traceback" not in err
