"""``sd35-flash info`` (issue 12 item 8): dual-attention layers as block indices, the T5-off token count from the
file's own tokenizers, metadata values cut to a readable length, and a tensor whose shape does not fit the
inferred architecture reported from the headers, as ``generate`` would refuse it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35_flash.flash_core import cli, text
from sd35_flash.flash_core.checkpoint import FlashMetadata, read_metadata, save_checkpoint
from sd35_flash.flash_core.checkpoint_info import METADATA_SHOWN, describe_checkpoint, dual_attention
from sd35_flash.flash_core.errors import CheckpointError
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.flash_core.quant_io import quantize_checkpoint
from sd35_flash.flash_core.tokenizer_files import METADATA_KEY

from factories import TINY_MMDIT, tiny_mmdit

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "sd35_flash_demo.safetensors"


@pytest.fixture(autouse=True)
def no_env_tokenizers(monkeypatch):
    monkeypatch.delenv(text.ENV_TOKENIZERS, raising=False)


def _copy(tmp_path: Path, name: str, change: dict | None = None, metadata: dict | None = None) -> Path:
    """The demo's tensors in ``tmp_path/name`` (no tokenizers beside it), with tensors replaced by ``change``
    and metadata entries by ``metadata``."""
    tensors = {**load_file(str(DEMO)), **(change or {})}
    path = tmp_path / name
    save_file(tensors, str(path), {**read_metadata(DEMO), **(metadata or {})})
    return path


def _line(report: str, start: str) -> str:
    lines = [line.strip() for line in report.splitlines() if line.strip().startswith(start)]
    assert len(lines) == 1, (start, report)
    return lines[0]


# ----------------------------------------------------------------------------------- dual attention


def test_dual_attention_layers_are_block_indices():
    assert dual_attention(tuple(range(13)), 24) == "blocks 0-12 (13 of 24 blocks)"  # SD3.5 Medium's
    assert dual_attention((0,), 3) == "block 0 (1 of 3 blocks)"
    assert dual_attention((0, 2), 4) == "blocks 0, 2 (2 of 4 blocks)"
    assert dual_attention((), 38) == "none (0 of 38 blocks)"


def test_info_says_which_blocks_have_dual_attention(tmp_path):
    assert _line(describe_checkpoint(DEMO), "dual-attention layers") == "dual-attention layers: block 0 (1 of 2 blocks)"
    tiny = save_checkpoint(tmp_path / "tiny.safetensors", mmdit=tiny_mmdit(TINY_MMDIT))
    report = describe_checkpoint(tiny)
    assert _line(report, "dual-attention layers") == "dual-attention layers: block 0 (1 of 3 blocks)"
    assert "PROBLEM" not in report


# ----------------------------------------------------------------------------------- token rows


def test_the_demo_reads_12_tokens_with_t5_off(tmp_path):
    report = describe_checkpoint(DEMO)
    rows = _line(report, "text tokens:")
    assert "CLIP rows of 12, T5 rows of 12" in rows and "T5 off: 12 context tokens, T5 on: 24" in rows
    assert str(REPO / "demo" / "tokenizers") in rows or "demo/tokenizers" in rows
    assert _line(report, "t5:").startswith("t5: optional: 12 CLIP tokens when off")


def test_embedded_tokenizers_give_the_rows_and_are_summarised(tmp_path):
    quantized = tmp_path / "q.safetensors"
    quantize_checkpoint(DEMO, quantized, fmt="int8", progress=False)
    report = describe_checkpoint(quantized)
    assert "T5 off: 12 context tokens" in _line(report, "text tokens:") and "embedded" in _line(report, "text tokens:")
    assert _line(report, "tokenizers:").startswith("tokenizers: embedded: clip, t5xxl (")
    assert '{"clip"' not in report  # the JSON itself is not printed


def test_a_model_without_tokenizers_of_its_own_reads_sd3s_77(tmp_path):
    tiny = save_checkpoint(tmp_path / "tiny.safetensors", mmdit=tiny_mmdit(TINY_MMDIT),
                           metadata=FlashMetadata(t5="optional: 77 CLIP tokens when off"))
    report = describe_checkpoint(tiny)
    assert "CLIP rows of 77, T5 rows of 77 (SD3's: no tokenizers of its own); T5 off: 77 context tokens" in report
    assert _line(report, "t5:") == "t5: optional: 77 CLIP tokens when off"


def test_unusable_embedded_tokenizers_are_said_not_raised(tmp_path, capsys):
    broken = _copy(tmp_path, "broken.safetensors", metadata={METADATA_KEY: json.dumps({"clip": "nope"})})
    assert cli.main(["info", str(broken)]) == 0
    out = capsys.readouterr().out
    assert _line(out, "tokenizers:").startswith("tokenizers: embedded but unusable, ignored ('clip' must map")
    assert "SD3's: its embedded tokenizers are unusable" in _line(out, "text tokens:")


# ----------------------------------------------------------------------------------- metadata values


def test_long_metadata_values_are_cut(tmp_path):
    note = "x" * 5000
    path = save_checkpoint(tmp_path / "long.safetensors", mmdit=tiny_mmdit(TINY_MMDIT),
                           metadata=FlashMetadata(training={"note": note}))
    line = _line(describe_checkpoint(path), "training:")
    full = json.dumps({"note": note})
    assert line == f"training: {full[:METADATA_SHOWN]}… ({len(full)} chars)"
    short = _line(describe_checkpoint(DEMO), "sampler_mode:")
    assert short == "sampler_mode: euler"


# ----------------------------------------------------------------------------------- shapes


MISFITS = {  # component -> (key, a shape the architecture inferred from the other tensors cannot take)
    "MM-DiT": ("model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight", (128, 256)),
    "VAE": ("first_stage_model.decoder.conv_out.weight", (3, 16, 3, 3)),
    "CLIP-L": ("text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1.weight", (64, 32)),
    "T5-XXL": ("text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo.weight", (64, 96)),
}


@pytest.mark.parametrize("component", list(MISFITS))
def test_a_misshapen_tensor_is_reported_by_info_as_generate_refuses_it(component, tmp_path, capsys):
    key, shape = MISFITS[component]
    path = _copy(tmp_path, "misfit.safetensors", {key: torch.zeros(shape)})
    shutil.copytree(REPO / "demo" / "tokenizers", tmp_path / "tokenizers")
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    name = key.split(".transformer.")[-1].removeprefix("model.diffusion_model.").removeprefix("first_stage_model.")
    problems = [line.strip() for line in out.splitlines() if line.strip().startswith("PROBLEM:")]
    assert len(problems) == 2 and name in problems[0] and "shape" in problems[0]
    assert "generate refuses this file" in problems[1]
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if name in line)
    owner = next(line for line in reversed(lines[:at]) if line.startswith("  ") and not line.startswith("    "))
    assert owner.strip().startswith(f"{component}:")  # said under the component it belongs to
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        FlashPipeline.from_checkpoint(path, device="cpu", dtype="fp32")


def test_the_demo_and_its_quantized_copy_fit(tmp_path):
    quantized = tmp_path / "q.safetensors"
    quantize_checkpoint(DEMO, quantized, fmt="int4", t5_fmt="int8", progress=False)
    for path in (DEMO, quantized):
        assert "PROBLEM" not in describe_checkpoint(path)


def test_an_architecture_that_cannot_be_inferred_is_a_problem_not_a_crash(tmp_path, capsys):
    tensors = load_file(str(DEMO))
    del tensors["model.diffusion_model.final_layer.linear.weight"]
    path = tmp_path / "headless.safetensors"
    save_file(tensors, str(path), read_metadata(DEMO))
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PROBLEM: the architecture cannot be inferred" in out and "final_layer.linear.weight" in out
