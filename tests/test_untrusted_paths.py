"""A shared workflow is untrusted (GitHub issue 13): every path our nodes take from a widget or a config_toml key
stays inside ComfyUI's folders for its kind (nodes/path_policy.py), and Save Flash Checkpoint never replaces a
model it did not write.

ComfyUI's ``folder_paths`` is stubbed with temporary folders (models/, input/, output/ and an ``outside/``
folder holding what an attack would read or write). Every refusal is one line naming the widget or key, and
leaves the whole temporary tree as it was: no run folder, no file created or changed anywhere.
"""

import dataclasses
import hashlib
import os
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from sd35_flash.flash_core.errors import FlashError
from sd35_flash.nodes import path_policy
from sd35_flash.nodes.loaders import FlashCheckpointLoader, FlashTextEncoderLoader, FlashVAELoader
from sd35_flash.nodes.path_policy import UnsafePathError
from sd35_flash.nodes.training import (
    LEDGER,
    FlashTrainData,
    FlashTrainMerge,
    FlashTrainPretrain,
    FlashTrainSave,
    FlashTrainSetup,
)
from sd35_flash.training.config import Config, ConfigError, config_from_dict

SECRET = "root:x:0:0:root:/root:/bin/bash\n"
USERS_MODEL = b"the user's own sd3.5_large weights"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind, and content hash / link target / nothing."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                entries[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[rel] = ("dir",)
            else:
                st = path.stat()
                entries[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns)
    return entries


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """A stubbed ComfyUI: models/{checkpoints,...}, a second checkpoints folder (the pack's demo folder),
    input/ and output/; ``outside/`` is what no workflow may reach. Links inside input/ and output/ lead out."""
    root = tmp_path / "comfy"
    kinds = ("checkpoints", "diffusion_models", "text_encoders", "vae")
    folders = {kind: [root / "models" / kind] for kind in kinds}
    folders["checkpoints"].append(root / "demo")
    for paths in folders.values():
        for p in paths:
            p.mkdir(parents=True)
    inp, out, outside = root / "input", root / "output", tmp_path / "outside"
    for p in (inp, out, outside):
        p.mkdir()
    (outside / "passwd").write_text(SECRET)
    (outside / "model.safetensors").write_bytes(b"an outside model")
    (outside / "images").mkdir()
    (root / "models" / "checkpoints" / "teacher.safetensors").write_bytes(b"teacher")
    (root / "models" / "checkpoints" / "sd3.5_large.safetensors").write_bytes(USERS_MODEL)
    (root / "models" / "text_encoders" / "tokenizers").mkdir()
    (inp / "mine").mkdir()
    (inp / "mine" / "prompts.txt").write_text("a red circle\n")
    (inp / "images").mkdir()
    (inp / "secret.txt").symlink_to(outside / "passwd")  # links inside input/ that lead out
    (inp / "escape").symlink_to(outside, target_is_directory=True)
    (inp / "alias.txt").symlink_to(inp / "mine" / "prompts.txt")  # one that stays inside
    (out / "sd35_flash").mkdir()
    (out / "sd35_flash" / "linked").symlink_to(outside, target_is_directory=True)
    stub = SimpleNamespace(
        get_folder_paths=lambda kind: [str(p) for p in folders[kind]],
        get_filename_list=lambda kind: sorted(p.name for f in folders[kind] for p in f.iterdir()),
        get_input_directory=lambda: str(inp), get_output_directory=lambda: str(out))
    monkeypatch.setitem(sys.modules, "folder_paths", stub)
    return SimpleNamespace(tmp=tmp_path, root=root, input=inp, output=out, outside=outside,
                           checkpoints=root / "models" / "checkpoints", demo=root / "demo")


def setup(config_toml: str = "", run_name: str = "run", teacher: str = "teacher.safetensors",
          prompts: str = "a red circle\na blue square") -> Config:
    (config,) = FlashTrainSetup().setup(teacher, prompts, run_name, 4, 64, 64, 1, 1, 0, config_toml=config_toml)
    return config


def refused(comfy, call, error, *fragments) -> str:
    """``call()`` raises ``error`` with one line holding ``fragments``, and nothing under the temporary folder
    (ComfyUI's folders and ``outside/``) was created, removed or changed."""
    before = snapshot(comfy.tmp)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, message
    assert snapshot(comfy.tmp) == before
    return message


# ------------------------------------------------------------------------------------------------ the policy


@pytest.mark.parametrize("value, reason", [
    ("/etc/passwd", "is an absolute path"),
    ("\\etc\\passwd", "is an absolute path"),
    ("\\\\server\\share\\model.safetensors", "is an absolute path"),
    ("C:\\Windows\\system.ini", "holds ':'"),
    ("C:model.safetensors", "holds ':'"),
    ("file:///etc/passwd", "holds ':'"),
    ("../outside/passwd", "climbs out with '..'"),
    ("mine/../../outside", "climbs out with '..'"),
    ("..\\..\\outside", "climbs out with '..'"),
    ("~/.ssh/id_rsa", "starts with '~'"),
    ("", "is empty"),
    ("   ", "is empty"),
    ("mine\x00.txt", "NUL"),
    ("mine\n/etc/passwd", "control character"),
    ("a" * 2000, "longer than"),
    (7, "is not text"),
])
def test_relative_parts_refuses_names_that_leave_the_folder(value, reason):
    with pytest.raises(UnsafePathError) as info:
        path_policy.relative_parts(value, "config_toml: [data] prompts", path_policy.INPUT_PLACE)
    message = str(info.value)
    assert message.startswith("config_toml: [data] prompts ") and reason in message, message
    assert message.endswith("it must stay inside ComfyUI's input folder") and "\n" not in message


def test_relative_parts_takes_both_separators_and_drops_dots():
    assert path_policy.relative_parts("a/./b\\c.txt", "w", "p") == ("a", "b", "c.txt")
    assert path_policy.plain_name("run_1", "run_name", "p") == "run_1"
    for bad in ("a/b", "a\\b", ".hidden", "..", "x/"):
        with pytest.raises(UnsafePathError, match="run_name"):
            path_policy.plain_name(bad, "run_name", "p")


def test_inside_follows_links_and_refuses_those_leading_out(comfy):
    assert path_policy.inside(comfy.input, "alias.txt", "w", "p") == (comfy.input / "mine" / "prompts.txt")
    assert path_policy.inside(comfy.input, "new/file.txt", "w", "p") == comfy.input.resolve() / "new" / "file.txt"
    for value in ("secret.txt", "escape/passwd", "escape"):
        with pytest.raises(UnsafePathError, match="leads out through a symbolic link"):
            path_policy.inside(comfy.input, value, "w", "p")
    with pytest.raises(UnsafePathError, match="names the folder itself"):
        path_policy.inside(comfy.input, ".", "w", "p")
    assert path_policy.inside(comfy.input, ".", "w", "p", allow_root=True) == comfy.input.resolve()
    loop = comfy.input / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UnsafePathError, match="w 'loop/x' "):
        path_policy.inside(comfy.input, "loop/x", "w", "p")


def test_model_file_finds_names_as_comfyui_does(comfy):
    (comfy.demo / "sub").mkdir()
    (comfy.demo / "sub" / "demo.safetensors").write_bytes(b"demo")
    roots = [comfy.checkpoints, comfy.demo]
    assert path_policy.model_file("teacher.safetensors", roots, "w", "p") == comfy.checkpoints / "teacher.safetensors"
    assert path_policy.model_file("sub\\demo.safetensors", roots, "w", "p") == comfy.demo / "sub" / "demo.safetensors"
    assert path_policy.model_file("missing.safetensors", roots, "w", "p") is None
    assert path_policy.model_file("sub", roots, "w", "p") is None  # a folder is no model file
    assert path_policy.model_file("sub", roots, "w", "p", folder=True) == comfy.demo / "sub"


def test_numbered_names_follow_comfyuis_filename_prefix_counter():
    assert path_policy.numbered_name("student", []) == "student_00001_.safetensors"
    existing = ["student_00001_.safetensors", "student_00007_.png", "student.safetensors", "student_x_.txt",
                "students_00099_.safetensors", "other_00050_.safetensors"]
    assert path_policy.numbered_name("student", existing) == "student_00008_.safetensors"
    assert path_policy.numbered_name("sd3.5_large", ["sd3.5_large.safetensors"]) == "sd3.5_large_00001_.safetensors"


def test_every_str_key_of_the_config_is_classified():
    """A str key added to training/config.py must be placed in CONFIG_PATHS (a path, with its ComfyUI folder)
    or CONFIG_NOT_PATHS, so that no new path key reaches a node unchecked."""
    def text_keys(cls, prefix=()):  # every key holding text (str, list[str]), however deep
        for key, kind in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(kind):
                yield from text_keys(kind, (*prefix, key))
            elif kind is str or typing.get_args(kind) == (str,):
                yield (*prefix, key)

    keys = set(text_keys(Config))
    assert ("model", "teacher") in keys and ("data", "negative") in keys
    assert keys == set(path_policy.CONFIG_PATHS) | path_policy.CONFIG_NOT_PATHS


# ------------------------------------------------------------------------------------------------ Setup


@pytest.mark.parametrize("toml, fragments", [
    ('[train]\nout = "{outside}/evil"', ("config_toml: [train] out", "is an absolute path",
                                         "must stay inside ComfyUI's output folder")),
    ('[train]\nout = "../../outside/evil"', ("config_toml: [train] out", "'..'")),
    ('[train]\nout = "."', ("config_toml: [train] out", "names the folder itself")),
    ('[train]\nout = "sd35_flash/linked/evil"', ("config_toml: [train] out", "symbolic link")),
    ('train.out = "C:\\\\evil"', ("config_toml: [train] out", "':'")),
    ('[data]\nprompts = "/etc/passwd"', ("config_toml: [data] prompts '/etc/passwd' is an absolute path",
                                         "must stay inside ComfyUI's input folder")),
    ('[data]\nprompts = "secret.txt"', ("config_toml: [data] prompts 'secret.txt' leads out through a symbolic link",)),
    ('[data]\nprompts = "escape/passwd"', ("config_toml: [data] prompts", "symbolic link")),
    ('[data]\nprompts = "..\\\\..\\\\outside\\\\passwd"', ("config_toml: [data] prompts", "'..'")),
    ('[data]\nprompts = ""', ("config_toml: [data] prompts", "is empty")),
    ('[data]\nprompts = "mine/prompts.txt\\u0000"', ("config_toml: [data] prompts", "NUL")),
    ('[data]\ndir = "../../../outside/shards"', ("config_toml: [data] dir", "'..'", "the run folder")),
    ('[data]\ndir = "{outside}/shards"', ("config_toml: [data] dir", "is an absolute path")),
    ('[model]\nteacher = "{outside}/model.safetensors"', ("config_toml: [model] teacher", "absolute")),
    ('[model]\nteacher = "../../outside/model.safetensors"', ("config_toml: [model] teacher", "'..'",
                                                              "models/checkpoints")),
    ('[model]\nteacher = "elsewhere.safetensors"', ("config_toml: [model] teacher 'elsewhere.safetensors' is not "
                                                    "a file in ComfyUI's models/checkpoints folder",)),
    ('[model]\nstudent_init = "\\\\\\\\server\\\\share\\\\model.safetensors"', ("config_toml: [model] student_init",
                                                                          "absolute")),
    ('[model]\ntokenizers = "~/tokenizers"', ("config_toml: [model] tokenizers", "'~'")),
    ('[model]\ntokenizers = "tokenizers/../../../../outside"', ("config_toml: [model] tokenizers", "'..'")),
    ('[teacher]\ndataset = "escape/images"', ("config_toml: [teacher] dataset", "symbolic link")),
    ('[teacher]\ndataset = "/etc"', ("config_toml: [teacher] dataset", "absolute")),
    ('[teacher]\ncomponents = "file:///etc/passwd"', ("config_toml: [teacher] components", "':'")),
])
def test_config_toml_paths_that_leave_comfyuis_folders_are_refused(comfy, toml, fragments):
    toml = toml.replace("{outside}", comfy.outside.as_posix())
    refused(comfy, lambda: setup(toml), FlashError, *fragments)  # UnsafePathError; CheckpointError: no such model
    assert not (comfy.outside / "evil").exists() and not (comfy.output / "sd35_flash" / "run").exists()


@pytest.mark.parametrize("run_name, fragment", [
    ("../../outside/evil", "climbs out with '..'"),
    ("..", "climbs out with '..'"),
    ("/tmp/evil", "is an absolute path"),
    ("a/b", "is not a plain name"),
    ("..\\evil", "'..'"),
    ("", "is empty"),
    ("run\x00", "NUL"),
    ("linked", "leads out through a symbolic link"),
])
def test_run_names_that_leave_the_runs_folder_are_refused(comfy, run_name, fragment):
    refused(comfy, lambda: setup(run_name=run_name), UnsafePathError, "run_name", fragment)


def test_a_runs_folder_linked_out_is_refused(comfy):
    runs = comfy.output / "sd35_flash"
    (runs / "linked").unlink()
    runs.rmdir()
    runs.symlink_to(comfy.outside, target_is_directory=True)
    refused(comfy, lambda: setup(run_name="run"), UnsafePathError, "run_name", "symbolic link",
            "must stay inside ComfyUI's output folder")


@pytest.mark.parametrize("teacher, fragment", [
    ("/etc/passwd", "is an absolute path"), ("../../outside/model.safetensors", "'..'"),
    ("C:\\models\\teacher.safetensors", "':'"),
])
def test_the_teacher_widget_is_a_name_in_the_checkpoints_folders(comfy, teacher, fragment):
    refused(comfy, lambda: setup(teacher=teacher), UnsafePathError, "teacher", fragment, "models/checkpoints")


def test_bad_toml_and_bad_types_are_refused_before_anything_is_written(comfy):
    refused(comfy, lambda: setup("[train\nout = 1"), ConfigError, "config_toml is not valid TOML")
    refused(comfy, lambda: setup('[train]\nout = 5'), ConfigError, "train.out: expected a string")
    refused(comfy, lambda: setup(config_toml=None), ValueError, "config_toml must be text")
    refused(comfy, lambda: setup(prompts=""), ValueError, "prompts is empty")


def test_paths_inside_comfyuis_folders_are_taken(comfy):
    (comfy.demo / "sub").mkdir()
    (comfy.demo / "sub" / "big.safetensors").write_bytes(b"teacher 2")
    config = setup('[model]\nteacher = "sub/big.safetensors"\ntokenizers = "tokenizers"\n'
                   '[data]\nprompts = "alias.txt"\ndir = "shards"\n'
                   '[train]\nout = "sd35_flash/custom"\n[teacher]\ndataset = "images"\n')
    out = comfy.output.resolve() / "sd35_flash" / "custom"
    assert config.model.teacher == str(comfy.demo / "sub" / "big.safetensors")
    assert config.model.tokenizers == str(comfy.checkpoints.parent / "text_encoders" / "tokenizers")
    assert config.data.prompts == str(comfy.input.resolve() / "mine" / "prompts.txt")
    assert config.train.out == str(out) and config.data.dir == str(out / "shards")
    assert config.teacher.dataset == str(comfy.input.resolve() / "images")
    assert sorted(p.name for p in out.iterdir()) == []  # the toml's prompts: no prompts.txt of the widget
    default = setup('[teacher]\ndataset = "toyworld"\n[model]\nstudent_init = ""')
    assert default.teacher.dataset == "toyworld" and default.model.student_init == ""
    assert (Path(default.train.out) / "prompts.txt").read_text() == "a red circle\na blue square\n"
    assert Path(default.train.out) == comfy.output.resolve() / "sd35_flash" / "run"


# ------------------------------------------------------------------------------------------------ stage nodes


def test_stage_nodes_refuse_a_training_value_not_from_setup(comfy):
    evil = {"train": {"out": str(comfy.outside / "evil")}}
    refused(comfy, lambda: FlashTrainPretrain().train(evil, 1, 1e-5, "l2", False), TypeError,
            "training must be linked from Flash Distillation Setup")
    refused(comfy, lambda: FlashTrainSave().save(evil, "latest", "x"), TypeError, "training must be linked")
    forged = config_from_dict({"train": {"out": str(comfy.outside / "evil")}})
    for call in (lambda: FlashTrainData().make(forged, 4, 4.0), lambda: FlashTrainMerge().train(forged, 0.5),
                 lambda: FlashTrainSave().save(forged, "latest", "x")):
        refused(comfy, call, UnsafePathError, "training: the run folder", "must stay inside ComfyUI's output folder")
    assert not (comfy.outside / "evil").exists()


# ------------------------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("call, widget", [
    (lambda: FlashCheckpointLoader().load("/etc/passwd"), "ckpt_name"),
    (lambda: FlashCheckpointLoader().load("../../../outside/model.safetensors"), "ckpt_name"),
    (lambda: FlashVAELoader().load("C:\\vae.safetensors"), "vae_name"),
    (lambda: FlashTextEncoderLoader().load("\\\\server\\clip_l.safetensors", "none"), "clip_l"),
    (lambda: FlashTextEncoderLoader().load("none", "..\\..\\clip_g.safetensors"), "clip_g"),
    (lambda: FlashTextEncoderLoader().load("clip.safetensors", "none", "/t5.safetensors"), "t5xxl"),
])
def test_loaders_refuse_names_outside_the_model_folders(comfy, call, widget):
    (comfy.root / "models" / "text_encoders" / "clip.safetensors").write_bytes(b"not read: names come first")
    refused(comfy, call, UnsafePathError, f"{widget} ", "must stay inside ComfyUI's models/")


# ------------------------------------------------------------------------------------------------ Save


@pytest.fixture
def run(comfy) -> Config:
    """A run whose DMD stage has finished (its student file in the run folder)."""
    config = setup()
    (Path(config.train.out) / "dmd.safetensors").write_bytes(b"distilled student")
    return config


def new_files(before: dict, after: dict) -> dict:
    assert all(after.get(k) == v for k, v in before.items()), "something that existed was changed or removed"
    return {k: v for k, v in after.items() if k not in before}


def test_save_never_replaces_a_model_it_is_named_after(comfy, run):
    before = snapshot(comfy.tmp)
    result = FlashTrainSave().save(run, "latest", "sd3.5_large")
    assert (comfy.checkpoints / "sd3.5_large.safetensors").read_bytes() == USERS_MODEL
    assert (comfy.checkpoints / "sd3.5_large_00001_.safetensors").read_bytes() == b"distilled student"
    assert sorted(new_files(before, snapshot(comfy.tmp))) == [
        "comfy/models/checkpoints/sd3.5_large_00001_.safetensors", f"comfy/output/sd35_flash/run/{LEDGER}"]
    assert "sd3.5_large_00001_.safetensors" in result["ui"]["text"][0]
    FlashTrainSave().save(run, "dmd", "sd3.5_large.safetensors")  # the suffix is the same name
    assert (comfy.checkpoints / "sd3.5_large_00002_.safetensors").exists()


def test_save_numbers_past_every_checkpoints_folder(comfy, run):
    (comfy.checkpoints / "student_00004_.safetensors").write_bytes(b"old")
    (comfy.demo / "student_00005_.safetensors").write_bytes(b"old, demo folder")
    before = snapshot(comfy.tmp)
    FlashTrainSave().save(run, "latest", "student")
    assert "comfy/models/checkpoints/student_00006_.safetensors" in new_files(before, snapshot(comfy.tmp))


def test_overwrite_replaces_only_the_runs_own_file(comfy, run):
    target = comfy.checkpoints / "mine.safetensors"
    FlashTrainSave().save(run, "latest", "mine", True)
    assert target.read_bytes() == b"distilled student"
    (Path(run.train.out) / "dmd.safetensors").write_bytes(b"trained longer")
    FlashTrainSave().save(run, "latest", "mine", True)  # the run's own file: replaced
    assert target.read_bytes() == b"trained longer"
    target.unlink()
    target.write_bytes(b"someone else's")  # replaced behind the run's back: no longer the run's
    refused(comfy, lambda: FlashTrainSave().save(run, "latest", "mine", True), UnsafePathError,
            "filename 'mine'", "run 'run' did not write it")


def test_overwrite_refuses_a_file_the_run_did_not_write(comfy, run):
    refused(comfy, lambda: FlashTrainSave().save(run, "latest", "sd3.5_large", True), UnsafePathError,
            "filename 'sd3.5_large'", "did not write it", "overwrite replaces only this run's own saves")
    other = setup(run_name="other")
    (Path(other.train.out) / "dmd.safetensors").write_bytes(b"another run")
    FlashTrainSave().save(other, "latest", "shared", True)
    refused(comfy, lambda: FlashTrainSave().save(run, "latest", "shared", True), UnsafePathError,
            "run 'run' did not write it")  # another run's save is not this run's
    (comfy.demo / "demo_model.safetensors").write_bytes(b"demo")  # would shadow the demo folder's file
    refused(comfy, lambda: FlashTrainSave().save(run, "latest", "demo_model", True), UnsafePathError,
            "demo_model.safetensors' exists")
    (comfy.checkpoints / "link.safetensors").symlink_to(comfy.outside / "model.safetensors")
    refused(comfy, lambda: FlashTrainSave().save(run, "latest", "link", True), UnsafePathError, "did not write it")
    assert (comfy.outside / "model.safetensors").read_bytes() == b"an outside model"


@pytest.mark.parametrize("filename, fragment", [
    ("../../../outside/evil", "climbs out with '..'"), ("/tmp/evil", "is an absolute path"),
    ("sub/student", "is not a plain name"), ("C:\\evil", "':'"), ("", "is empty"), (".safetensors", "is empty"),
    (".hidden", "starts with '.'"), ("x\x00", "NUL"), ("x" * 300, "longer than 200 bytes"),
])
def test_save_filenames_are_plain_names(comfy, run, filename, fragment):
    refused(comfy, lambda: FlashTrainSave().save(run, "latest", filename), UnsafePathError, "filename", fragment)


def test_save_refuses_a_stage_output_linked_out_of_the_run(comfy, run):
    student = Path(run.train.out) / "dmd.safetensors"
    student.unlink()
    student.symlink_to(comfy.outside / "passwd")
    refused(comfy, lambda: FlashTrainSave().save(run, "dmd", "student"), UnsafePathError,
            "stage:", "leads out of the run folder")
    refused(comfy, lambda: FlashTrainSave().save(run, "dmd", "student", "yes"), ValueError,
            "overwrite must be true or false")
    refused(comfy, lambda: FlashTrainSave().save(run, "../passwd", "student"), ValueError, "stage must be one of")


def test_overwrite_is_an_optional_switch_that_is_off_by_default():
    import inspect

    schema = FlashTrainSave.INPUT_TYPES()
    assert list(schema["optional"]) == ["overwrite"]  # optional: API prompts saved before it existed still run
    assert schema["optional"]["overwrite"][0] == "BOOLEAN" and schema["optional"]["overwrite"][1]["default"] is False
    assert inspect.signature(FlashTrainSave.save).parameters["overwrite"].default is False
