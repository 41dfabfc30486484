"""Tokenizers travel with the files the project writes (issue 12 items 5-7).

* A quantized copy of the demo model and a trained checkpoint carry their project-made tokenizers in the
  ``sd35_flash.tokenizers`` metadata entry, so they generate with no tokenizer folder anywhere.
* The search order: an explicit path, the checkpoint's own (a folder beside it, then the embedded ones),
  ``$SD35_FLASH_TOKENIZERS``; an unusable entry warns once, naming the key, and the search goes on.
* ``FlashPipeline(...)(prompt)`` without a size draws the model's native size (the CLI's default), and the
  README's Python snippet runs as written on the demo model.
* Words a model's tokenizer cannot read give one warning naming them.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sd35_flash.flash_core import cli, text, tokenizer_files
from sd35_flash.flash_core.checkpoint import read_metadata
from sd35_flash.flash_core.checkpoint_info import largest_side, native_image_size
from sd35_flash.flash_core.mmdit import MMDiTConfig
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.flash_core.quant_io import quantize_checkpoint
from sd35_flash.flash_core.text import tokenizers as text_tokenizers
from sd35_flash.flash_core.tokenizer_files import MAX_CHARS, METADATA_KEY
from sd35_flash.training.config import config_from_dict
from sd35_flash.training.toyworld import world
from sd35_flash.training.toyworld.build import PRESETS, Build, model_card, prompt_guide
from sd35_flash.training.toyworld.tokenizer import save_tokenizers
from sd35_flash.training.trainer import Trainer, World

from factories import tiny_mmdit
from tokenizer_factories import write_tokenizers

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "sd35_flash_demo.safetensors"
DEMO_TOKENIZERS = REPO / "demo" / "tokenizers"
PROMPT = "a red circle in the center"
TOKEN_ROW = 12  # the demo's declared rows (tokenizer_config.json model_max_length)

# The README's "Python" section as it should read (the text proposed for README.md), run as written.


def readme_python_snippet() -> str:
    """The README's "## Python" code block, as a user copies it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Python\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(autouse=True)
def no_env_tokenizers(monkeypatch):
    monkeypatch.delenv(text.ENV_TOKENIZERS, raising=False)


@pytest.fixture(scope="module")
def quantized(module_tmp) -> Path:
    """The demo model quantized to int8 into a folder of its own: no tokenizers/ folder beside it."""
    path = module_tmp("quantized") / "demo_int8.safetensors"
    quantize_checkpoint(DEMO, path, fmt="int8", progress=False)
    return path


@pytest.fixture(scope="module")
def demo_pipe() -> FlashPipeline:
    return FlashPipeline.from_checkpoint(DEMO, device="cpu", dtype="fp32")


def _with_metadata(source: Path, target: Path, **entries: str) -> Path:
    """A copy of ``source`` whose metadata entries are replaced (``None`` values removed)."""
    metadata = {**read_metadata(source), **entries}
    save_file(load_file(str(source)), str(target), {k: v for k, v in metadata.items() if v is not None})
    return target


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _records(caplog, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


# ----------------------------------------------------------------------------------- the quantized demo


def test_the_quantized_demo_carries_its_tokenizers(quantized):
    assert not (quantized.parent / "tokenizers").exists()
    entry = json.loads(read_metadata(quantized)[METADATA_KEY])
    assert set(entry) == {"clip", "t5xxl"}
    for slot in entry:  # the folder's files, byte for byte
        for name, content in entry[slot].items():
            assert content == (DEMO_TOKENIZERS / slot / name).read_text()
    assert len(read_metadata(quantized)[METADATA_KEY]) < 16_000  # a few KB


def test_generate_from_the_quantized_demo_needs_no_tokenizers(quantized, tmp_path):
    base = ["-p", PROMPT, "--seed", "3", "--show-at", "0", "-q"]
    assert cli.main(["generate", "-c", str(quantized), "-o", str(tmp_path / "int8.png"), *base]) == 0
    assert cli.main(["generate", "-c", str(DEMO), "-o", str(tmp_path / "dense.png"), *base]) == 0
    int8, dense = _pixels(tmp_path / "int8.png"), _pixels(tmp_path / "dense.png")
    assert int8.shape == dense.shape == (16, 16, 3)
    diff = np.abs(int8 - dense)  # int8 weights: close to the dense model's image (measured: mean 0.2, max 3)
    assert diff.mean() < 1.0 and diff.max() <= 8


def test_the_shipped_demo_file_alone_carries_its_tokenizers(tmp_path):
    """A user who copies only demo/sd35_flash_demo.safetensors (into ComfyUI's models/checkpoints, say) can still
    generate: the file embeds the same tokenizers its tokenizers/ folder holds."""
    alone = tmp_path / "sd35_flash_demo.safetensors"
    shutil.copyfile(DEMO, alone)
    base = ["-p", PROMPT, "--seed", "3", "--show-at", "0", "-q"]
    assert cli.main(["generate", "-c", str(alone), "-o", str(tmp_path / "alone.png"), *base]) == 0
    assert cli.main(["generate", "-c", str(DEMO), "-o", str(tmp_path / "shipped.png"), *base]) == 0
    assert np.array_equal(_pixels(tmp_path / "alone.png"), _pixels(tmp_path / "shipped.png"))


def test_embedded_tokenizers_equal_the_folder(quantized):
    folder = text.load_tokenizers(DEMO_TOKENIZERS)
    embedded = tokenizer_files.read_embedded(read_metadata(quantized))
    assert (embedded.clip_length, embedded.t5_length) == (folder.clip_length, folder.t5_length) == (TOKEN_ROW,) * 2
    prompts = [PROMPT, "a small cyan triangle left of a large blue square", "", "an unknown word"]
    for slot in ("clip_l", "clip_g", "t5"):
        mine, theirs = getattr(embedded, slot), getattr(folder, slot)
        assert mine(prompts, add_special_tokens=False)["input_ids"] == theirs(prompts, add_special_tokens=False)["input_ids"]
        for special in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            assert getattr(mine, special) == getattr(theirs, special), (slot, special)


def test_a_copy_whose_only_tokenizers_are_embedded_passes_them_on(quantized, tmp_path):
    dense = _with_metadata(DEMO, tmp_path / "dense.safetensors", **{METADATA_KEY: read_metadata(quantized)[METADATA_KEY]})
    again = quantize_checkpoint(dense, tmp_path / "int4.safetensors", fmt="int4", progress=False)
    assert "int4" in again
    assert read_metadata(tmp_path / "int4.safetensors")[METADATA_KEY] == read_metadata(quantized)[METADATA_KEY]


# ----------------------------------------------------------------------------------- the order of the search


def test_a_folder_beside_comes_before_the_embedded_ones_and_a_path_before_both(quantized, tmp_path):
    shutil.copy(quantized, tmp_path / "model.safetensors")
    save_tokenizers(tmp_path / "tokenizers", words=["only", "these", "words"])  # a different vocabulary
    toks = tokenizer_files.checkpoint_tokenizers(tmp_path / "model.safetensors", read_metadata(quantized))
    assert "circle" not in toks.clip_l.get_vocab() and "these" in toks.clip_l.get_vocab()
    toks = tokenizer_files.checkpoint_tokenizers(tmp_path / "model.safetensors", read_metadata(quantized),
                                                 path=DEMO_TOKENIZERS)
    assert "circle" in toks.clip_l.get_vocab()


def test_the_embedded_ones_come_before_the_environment(quantized, monkeypatch, tmp_path):
    monkeypatch.setenv(text.ENV_TOKENIZERS, str(tmp_path / "nowhere"))  # would fail if it were read
    pipe = FlashPipeline.from_checkpoint(quantized, device="cpu", dtype="fp32")
    assert pipe.text_encoder.tokenizers.clip_length == TOKEN_ROW
    assert "circle" in pipe.text_encoder.tokenizers.clip_l.get_vocab()


def test_without_any_tokenizers_the_error_names_the_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(text_tokenizers, "comfyui_root", lambda: None)  # the same answer where a ComfyUI is importable
    bare = _with_metadata(DEMO, tmp_path / "bare.safetensors", **{METADATA_KEY: None})  # no entry, no folder
    code = cli.main(["generate", "-c", str(bare), "-p", PROMPT, "-o", str(tmp_path / "x.png"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "bare.safetensors" in err and METADATA_KEY in err and "--tokenizers" in err


# ----------------------------------------------------------------------------------- untrusted metadata


def _entry(**slots) -> str:
    files = {slot: {n: (DEMO_TOKENIZERS / slot / n).read_text() for n in tokenizer_files.FILES}
             for slot in ("clip", "t5xxl")}
    files.update(slots)
    return json.dumps({k: v for k, v in files.items() if v is not None})


def _config(**changes) -> str:
    config = json.loads((DEMO_TOKENIZERS / "clip" / "tokenizer_config.json").read_text())
    return json.dumps({**config, **changes})


BAD_ENTRIES = {
    "not JSON": "{clip: nope",
    "a list": "[1, 2, 3]",
    "nested too deep": "[" * 100_000,
    "too large": json.dumps({"clip": {"tokenizer.json": "x" * MAX_CHARS, "tokenizer_config.json": "{}"}}),
    "an unknown folder": _entry(vae={"tokenizer.json": "", "tokenizer_config.json": ""}),
    "no clip": _entry(clip=None),
    "a file that is not text": _entry(clip={"tokenizer.json": 5, "tokenizer_config.json": "{}"}),
    "a missing file": _entry(clip={"tokenizer.json": "{}"}),
    "a broken tokenizer.json": _entry(clip={"tokenizer.json": '{"model": 1}', "tokenizer_config.json": _config()}),
    "a released-tokenizer class": _entry(clip={"tokenizer.json": (DEMO_TOKENIZERS / "clip" / "tokenizer.json")
                                               .read_text(), "tokenizer_config.json": _config(tokenizer_class="CLIPTokenizer")}),
    "a start token outside the vocabulary": _entry(clip={"tokenizer.json": (DEMO_TOKENIZERS / "clip" / "tokenizer.json")
                                                         .read_text(), "tokenizer_config.json": _config(bos_token="<s>")}),
    "a special token that is not text": _entry(clip={"tokenizer.json": (DEMO_TOKENIZERS / "clip" / "tokenizer.json")
                                                     .read_text(), "tokenizer_config.json": _config(eos_token=[1])}),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_unusable_metadata_warns_once_and_the_search_goes_on(case, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(text.ENV_TOKENIZERS, str(DEMO_TOKENIZERS))
    metadata = {METADATA_KEY: BAD_ENTRIES[case]}
    with caplog.at_level(logging.WARNING):
        toks = tokenizer_files.checkpoint_tokenizers(tmp_path / "model.safetensors", metadata)
    assert toks.clip_length == TOKEN_ROW  # found in $SD35_FLASH_TOKENIZERS instead
    warnings = _records(caplog, METADATA_KEY)
    assert len(warnings) == 1 and "model.safetensors" in warnings[0].getMessage(), case
    assert len(warnings[0].getMessage().splitlines()) == 1 and len(warnings[0].getMessage()) < 400


def test_a_generate_run_with_unusable_metadata_warns_and_uses_the_environment(tmp_path, monkeypatch):
    broken = _with_metadata(DEMO, tmp_path / "broken.safetensors", **{METADATA_KEY: "{not json"})
    env = {**os.environ, text.ENV_TOKENIZERS: str(DEMO_TOKENIZERS), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sd35_flash.flash_core.cli", "generate", "-c", str(broken),
                             "-p", PROMPT, "-o", str(tmp_path / "x.png"), "-q"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if METADATA_KEY in line]
    assert len(lines) == 1 and "broken.safetensors" in lines[0] and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------- what writes them


def _trainer(tmp_path: Path, teacher: Path, tokenizers: str = "") -> Trainer:
    config = config_from_dict({"model": {"teacher": str(teacher), "tokenizers": tokenizers},
                               "train": {"out": str(tmp_path / "run")}})
    return Trainer(config, World(), progress=False)


def test_a_trained_checkpoint_carries_the_teachers_tokenizers(quantized, tmp_path):
    teacher = tmp_path / "teacher" / "teacher.safetensors"  # the demo's parts, its tokenizers only embedded
    teacher.parent.mkdir()
    shutil.copy(quantized, teacher)
    student = tiny_mmdit(MMDiTConfig(depth=2, hidden_size=128, pos_embed_max_size=8, dual_attention_layers=(0,),
                                     qk_norm=True))
    path = _trainer(tmp_path, teacher).save_output("pretrain", student, 1)
    assert read_metadata(path)[METADATA_KEY] == read_metadata(quantized)[METADATA_KEY]
    pipe = FlashPipeline.from_checkpoint(path, device="cpu", dtype="fp32")
    assert pipe.text_encoder.tokenizers.clip_length == TOKEN_ROW and pipe(PROMPT, progress=False)[0].size == (16, 16)


def test_a_trained_checkpoint_carries_the_configs_tokenizers_and_not_released_ones(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(DEMO, teacher)  # no folder beside this copy
    student = {k: v for k, v in load_file(str(DEMO)).items() if k.startswith("model.diffusion_model.")}
    student = {k.removeprefix("model.diffusion_model."): v for k, v in student.items()}
    path = _trainer(tmp_path, teacher, str(DEMO_TOKENIZERS)).save_output("dmd", student, 1)
    assert set(json.loads(read_metadata(path)[METADATA_KEY])) == {"clip", "t5xxl"}
    write_tokenizers(tmp_path / "released")  # CLIP BPE and T5 Unigram files: found as before, never embedded
    path = _trainer(tmp_path, teacher, str(tmp_path / "released")).save_output("dmd", student, 1)
    assert METADATA_KEY not in read_metadata(path)
    assert torch.equal(load_file(str(path))["model.diffusion_model.pos_embed"], student["pos_embed"])


# ----------------------------------------------------------------------------------- the API's default size


def test_the_native_size_is_the_clis_default():
    assert native_image_size(None) == 1024 and native_image_size(16) == 16 and native_image_size(3072) == 1024
    for released in (MMDiTConfig.sd35_medium(), MMDiTConfig.sd35_large()):  # 6144 and 3072 px at most
        assert native_image_size(largest_side(released, 8)) == 1024


def test_the_pipeline_draws_its_native_size_when_given_none(demo_pipe):
    assert demo_pipe.native_size() == 16
    default = demo_pipe(PROMPT, seed=1, progress=False)[0]
    sized = demo_pipe(PROMPT, seed=1, width=16, height=16, progress=False)[0]
    assert default.size == (16, 16) and np.array_equal(np.asarray(default), np.asarray(sized))
    assert demo_pipe(PROMPT, seed=1, width=8, progress=False)[0].size == (8, 8)  # one side given: square


def test_the_readme_python_snippet_runs_on_the_demo_model(tmp_path):
    """Copied into a script and run from a folder that has the repository's demo/, as a user runs it."""
    (tmp_path / "demo").symlink_to(REPO / "demo")
    (tmp_path / "snippet.py").write_text(readme_python_snippet())
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out.png").size == (16, 16)


# ----------------------------------------------------------------------------------- words it cannot read


def test_out_of_vocabulary_words_warn_once_naming_them(demo_pipe, caplog):
    with caplog.at_level(logging.WARNING):
        demo_pipe.encode_prompt("a magenta hexagon in the center, next to a magenta star")
    warnings = _records(caplog, "unknown words")
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "'magenta', 'hexagon'" in message and "'star'" in message and message.count("magenta") == 1
    assert "'center'" not in message


def test_in_vocabulary_prompts_do_not_warn(demo_pipe, caplog):
    with caplog.at_level(logging.WARNING):
        demo_pipe.encode_prompt([PROMPT, "a small cyan triangle left of a large blue square", ""])
        demo_pipe.encode_prompt("A Red Circle In The Center")  # the tokenizer lower-cases
    assert not _records(caplog, "unknown words")


def test_released_clip_tokenizers_never_report_unknown_words(tmp_path):
    toks = text.load_tokenizers(write_tokenizers(tmp_path / "released"))
    assert text.unknown_words(toks.clip_l, ["a zyxqv ☃ hexagon"]) == []  # byte-level BPE reads every byte


def test_the_cli_says_the_unknown_words_on_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(text.ENV_TOKENIZERS, None)
    result = subprocess.run([sys.executable, "-m", "sd35_flash.flash_core.cli", "generate", "-p",
                             "a purpel circle in the center", "-o", str(tmp_path / "x.png"), "-q"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "unknown words" in line]
    assert lines == ["unknown words for this model's tokenizer: 'purpel' (each is read as one unknown token)"]


# ----------------------------------------------------------------------------------- the demo's model card


def test_the_model_card_lists_the_demos_vocabulary_and_grammar(tmp_path):
    b = Build(tmp_path, PRESETS["ci"], record={"stages": {"demo": {"megabytes": 9.2, "source": "s.safetensors",
                                                                    "seconds": 1.0}}})
    card = model_card(b)
    guide = "\n".join(prompt_guide(b.preset.text_length))
    assert card.endswith(guide) and "## Prompts it understands" in card
    assert "\n".join(prompt_guide(TOKEN_ROW)) in (REPO / "demo" / "README.md").read_text()  # as a rebuild writes it
    vocab = json.loads((DEMO_TOKENIZERS / "clip" / "tokenizer.json").read_text())["model"]["vocab"]
    words = sorted(w for w in vocab if not w.startswith("<"))
    assert f"Vocabulary ({len(words)} words;" in guide and ", ".join(words) in guide


def test_the_model_cards_examples_are_in_the_grammar_and_read_without_warning(demo_pipe, caplog):
    examples = re.findall(r'"([a-z ]+)"', "\n".join(prompt_guide(TOKEN_ROW)))
    assert PROMPT in examples and len(examples) == 3
    for example in examples:
        world.parse_caption(example)  # raises for text outside the grammar
    with caplog.at_level(logging.WARNING):
        demo_pipe.encode_prompt(examples)
    assert not _records(caplog, "unknown words")


def test_the_warning_stays_one_short_line_for_a_hostile_prompt(demo_pipe, caplog):
    prompt = "\x1b[2J " + "x" * 5000 + " " + " ".join(f"word{i}" for i in range(50))
    with caplog.at_level(logging.WARNING):
        demo_pipe.encode_prompt(prompt)
    (warning,) = _records(caplog, "unknown words")
    message = warning.getMessage()
    assert len(message.splitlines()) == 1 and len(message) < 600 and "and 41 more" in message  # 53 - 12
    assert "\x1b" not in message and "'\\x1b['" in message and "'" + "x" * 40 + "...'" in message
