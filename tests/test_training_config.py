"""The training config (training/config.py): defaults, refusals that name the key path, TOML round-trip, hash."""

import dataclasses
import math
from pathlib import Path

import pytest

from sd35_flash.training.config import Config, ConfigError, DMDConfig, config_from_dict, load_config, to_toml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def parse(text: str) -> Config:
    return config_from_dict(tomllib.loads(text))


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def roundtrip(config: Config) -> Config:
    return config_from_dict(tomllib.loads(to_toml(config)))


# -------------------------------------------------------------------------------------------------- defaults


def test_an_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    config = load_config(path)
    assert config == Config()
    assert config.student.steps == 4 and config.student.sigmas == []
    assert config.dmd.score_sample == "shared_next" and config.dmd.fake_updates_per_step == 5
    assert config.dmd.renoise_range == [0.02, 0.98] and config.dmd.normaliser == "per_sample"
    assert config.split.ema_decay == 0.99 and config.split.merge_alpha == 0.5 and config.split.boundary == 500.0
    assert config.pretrain.loss == "l2" and config.data.teacher_steps == 32 and config.data.teacher_cfg == 4.0
    # nested defaults are separate objects, not shared between instances
    assert config.pretrain.optim is not config.dmd.optim and config.dmd.optim is not config.dmd.fake_optim


def test_values_are_read_into_their_tables():
    config = parse('[dmd]\nscore_sample = "renoise"\nreal_cfg = 3.5\n[dmd.fake_optim]\nlr = 2e-6\n'
                   '[student]\nsteps = 2\n[train]\ngradient_checkpointing = true\nsample_seeds = [7]\n')
    assert config.dmd.score_sample == "renoise" and config.dmd.real_cfg == 3.5
    assert config.dmd.fake_optim.lr == 2e-6 and config.dmd.optim.lr == 1e-5
    assert config.student.steps == 2 and config.train.gradient_checkpointing is True
    assert config.train.sample_seeds == [7]
    assert config.model == Config().model  # untouched tables keep their defaults


def test_int_is_accepted_for_a_float_field():
    config = parse("[dmd]\nreal_cfg = 3\ng_clip = 0\nrenoise_range = [0, 1]\n")
    assert config.dmd.real_cfg == 3.0 and isinstance(config.dmd.real_cfg, float)
    assert isinstance(config.dmd.g_clip, float)
    assert config.dmd.renoise_range == [0.0, 1.0] and all(isinstance(v, float) for v in config.dmd.renoise_range)


# ------------------------------------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key_names_it_and_lists_the_tables():
    message = refused("optimizer = 1\n")
    assert "optimizer: unknown key" in message
    assert "allowed here: data, distributed, dmd, dropout, model, pretrain, split, student, teacher, train" in message


def test_unknown_nested_key_names_the_dotted_path():
    message = refused('[dmd]\nscore_sampel = "renoise"\n')
    assert "dmd.score_sampel" in message and "unknown key" in message
    allowed = ", ".join(sorted(f.name for f in dataclasses.fields(DMDConfig)))
    assert allowed in message and "score_sample" in allowed
    assert "dmd.optim.lrr" in refused("[dmd.optim]\nlrr = 1.0\n")


def test_a_table_must_be_a_table():
    assert "dmd: expected a table" in refused("dmd = 3\n")
    assert "pretrain.optim: expected a table" in refused("[pretrain]\noptim = 1e-4\n")


# ---------------------------------------------------------------------------------------------------- types


@pytest.mark.parametrize(("text", "path", "expected"), [
    ('[train]\nbatch_size = "4"\n', "train.batch_size", "expected an integer"),
    ("[train]\nbatch_size = 4.0\n", "train.batch_size", "expected an integer"),
    ("[train]\nbatch_size = true\n", "train.batch_size", "expected an integer"),
    ("[dmd]\nreal_cfg = true\n", "dmd.real_cfg", "expected a number"),
    ('[dmd]\nreal_cfg = "2"\n', "dmd.real_cfg", "expected a number"),
    ("[train]\ngradient_checkpointing = 1\n", "train.gradient_checkpointing", "expected true or false"),
    ("[model]\nteacher = 5\n", "model.teacher", "expected a string"),
    ('[dmd]\nscore_sample = "shared"\n', "dmd.score_sample",
     "expected one of 'shared_next', 'shared_current', 'renoise'"),
    ("[student]\nsteps = 3\n", "student.steps", "expected one of 2, 4"),
    ("[student]\nsteps = 4.0\n", "student.steps", "expected one of 2, 4"),
    ("[student]\nsteps = true\n", "student.steps", "expected one of 2, 4"),
    ('[model]\ndtype = "float16"\n', "model.dtype", "expected one of 'fp32', 'bf16', 'fp16'"),
    ("[dmd]\nrenoise_range = 0.5\n", "dmd.renoise_range", "expected a list of a number"),
    ('[train]\nsample_seeds = [0, "a"]\n', "train.sample_seeds[1]", "expected an integer"),
])
def test_wrong_types_name_the_path_and_what_is_expected(text, path, expected):
    message = refused(text)
    assert f"{path}: {expected}" in message


def test_messages_start_with_the_source():
    with pytest.raises(ConfigError, match=r"^my\.toml: train\.batch_size"):
        config_from_dict({"train": {"batch_size": "x"}}, "my.toml")


# ---------------------------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(("text", "path"), [
    ("[data]\nwidth = 100\n", "data.width"),
    ("[data]\nheight = 8\n", "data.height"),
    ("[data]\nwidth = 0\n", "data.width"),
    ("[dropout]\nt5 = 1.5\n", "dropout.t5"),
    ("[dropout]\nclip_g = -0.1\n", "dropout.clip_g"),
    ("[train]\nbatch_size = 0\n", "train.batch_size"),
    ("[train]\nkeep_last = 0\n", "train.keep_last"),
    ("[dmd]\nfake_updates_per_step = 0\n", "dmd.fake_updates_per_step"),
    ("[split]\nema_decay = 1.5\n", "split.ema_decay"),
    ("[split]\nmerge_alpha = -0.5\n", "split.merge_alpha"),
    ("[student]\nsigmas = [1.0, 0.75]\n", "student.sigmas"),  # 2 sigmas for the default 4 steps
    ("[student]\nsteps = 2\nsigmas = [1.0, 0.75, 0.5]\n", "student.sigmas"),
    ("[student]\nsigmas = [0.9, 0.8, 0.7, 0.6]\n", "student.sigmas"),  # does not start at 1
    ("[student]\nsigmas = [1.0, 0.5, 0.75, 0.25]\n", "student.sigmas"),  # not decreasing
    ("[student]\nsigmas = [1.0, 0.9, 0.9, 0.5]\n", "student.sigmas"),  # not strictly decreasing
    ("[student]\nsigmas = [1.0, 0.9, 0.0, 0.75, 0.5]\n", "student.sigmas"),  # 0 only at the end
    ("[student]\nsigmas = [1.0, 0.9, 0.75, 0.5, -0.1]\n", "student.sigmas[4]"),  # no negative sigma
    ("[student]\nsigmas = [1.0, 0.9, 0.75, 0.5, 0.0, 0.0]\n", "student.sigmas"),
    ("[student]\nsigmas = [0.0]\n", "student.sigmas"),
    ("[dmd]\nrenoise_range = [0.9, 0.1]\n", "dmd.renoise_range"),
    ("[dmd]\nrenoise_range = [0.5, 0.5]\n", "dmd.renoise_range"),
    ("[dmd]\nrenoise_range = [0.1]\n", "dmd.renoise_range"),
    ("[dmd]\nrenoise_range = [0.1, 1.5]\n", "dmd.renoise_range[1]"),
])
def test_range_checks_name_the_key(text, path):
    assert f"{path}: expected" in refused(text)


def test_valid_edges_pass():
    assert parse("[data]\nwidth = 16\nheight = 1024\n").data.width == 16
    assert parse("[dropout]\nt5 = 1.0\nclip_l = 0.0\n").dropout.t5 == 1.0
    assert parse("[student]\nsigmas = [1.0, 0.9, 0.75, 0.5]\n").student.sigmas == [1.0, 0.9, 0.75, 0.5]
    assert parse("[student]\nsigmas = [1.0, 0.8, 0.6, 0.4, 0.0]\n").student.sigmas[-1] == 0.0
    assert parse("[student]\nsteps = 2\nsigmas = [1.0, 0.6]\n").student.sigmas == [1.0, 0.6]
    assert parse("[dmd]\nrenoise_range = [0.0, 1.0]\n").dmd.renoise_range == [0.0, 1.0]


# ------------------------------------------------------------------------------------------- files and TOML


def test_load_config_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such config file") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[dmd\nreal_cfg = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_bad_value_names_the_file_and_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[dmd]\nnormaliser = 'batch'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: dmd.normaliser: expected one of 'per_sample', 'per_batch'")


def test_to_toml_round_trips_the_defaults():
    text = to_toml(Config())
    assert "[dmd.optim]" in text and "[pretrain.optim]" in text
    assert roundtrip(Config()) == Config()


def test_to_toml_round_trips_changed_values():
    config = Config()
    config.model.teacher = 'C:\\models\\sd3.5 "large".safetensors'
    config.data.negative = "blurry, 低品質, \U0001F600\ttabs\nand lines"
    config.data.width = 1024
    config.student.steps = 2
    config.student.sigmas = [1.0, 0.7, 0.0]
    config.train.gradient_checkpointing = True
    config.train.sample_seeds = []
    config.dmd.score_sample = "shared_current"
    config.dmd.real_cfg = 1e-7
    config.dmd.renoise_range = [0.1, 0.9]
    config.dmd.fake_optim.betas = [0.0, 0.99]
    config.pretrain.optim.grad_clip = math.inf
    config.split.boundary = 333.25
    restored = roundtrip(config)
    assert restored == config
    assert restored.data.negative == config.data.negative and restored.pretrain.optim.grad_clip == math.inf
    assert roundtrip(restored) == config


def test_to_toml_through_a_file(tmp_path):
    config = parse('[dmd]\nscore_sample = "renoise"\n[split]\nmerge_alpha = 0.3\n')
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_hash_is_stable_and_changes_with_any_value():
    base = Config().hash()
    assert base == Config().hash() and len(base) == 16 and int(base, 16) >= 0
    assert roundtrip(Config()).hash() == base
    changed = [Config(), Config(), Config(), Config()]
    changed[0].dmd.score_sample = "renoise"
    changed[1].dmd.fake_optim.lr = 2e-5
    changed[2].student.sigmas = [1.0, 0.9, 0.75, 0.5]
    changed[3].train.out = "runs/other"
    hashes = {c.hash() for c in changed}
    assert base not in hashes and len(hashes) == 4


def test_resolve_is_relative_to_the_run_folder(tmp_path):
    config = Config()
    config.train.out = str(tmp_path / "run")
    assert config.resolve("data") == tmp_path / "run" / "data"
    assert config.resolve(str(tmp_path / "abs")) == tmp_path / "abs"
    assert isinstance(config.resolve("x"), Path)
