"""The node pack without ComfyUI: it imports, its schemas are complete, and its ComfyUI-free logic is right.

With a real ComfyUI the same nodes are run in tests/comfyui/.
"""

import inspect
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import sd35_flash
from sd35_flash.flash_core.checkpoint import FlashMetadata, index_checkpoint
from sd35_flash.flash_core.checkpoint_info import loader_report
from sd35_flash.flash_core.errors import FlashError
from sd35_flash.flash_core.quant import DEFAULT_GROUP_SIZE, FORMATS, SCALE_KEY, quantize_weight
from sd35_flash.nodes import quant_ops, sampling
from sd35_flash.nodes.attributes import METADATA_ATTRIBUTE

from factories import write_tiny_checkpoint

NODES = sd35_flash.NODE_CLASS_MAPPINGS


def test_pack_imports_without_comfyui():
    code = ("import sys, sd35_flash; "
            "print(sorted(m for m in ('comfy', 'folder_paths', 'server', 'nodes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert len(NODES) == 13 and set(NODES) == set(sd35_flash.NODE_DISPLAY_NAME_MAPPINGS)


@pytest.mark.parametrize("name", list(NODES))
def test_schema_is_complete(name):
    cls = NODES[name]
    schema = cls.INPUT_TYPES()
    assert set(schema) <= {"required", "optional", "hidden"} and schema["required"]
    for section in ("required", "optional"):
        for input_name, spec in schema.get(section, {}).items():
            assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, input_name
            assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert cls.CATEGORY in ("SD3.5 Flash", "SD3.5 Flash/training") and cls.DESCRIPTION
    assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    parameters = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    expected = [n for section in schema.values() for n in section]
    assert [n for n in expected if n not in parameters] == []


def test_widget_defaults_are_allowed_values():
    for name, cls in NODES.items():
        for input_name, spec in cls.INPUT_TYPES()["required"].items():
            kind, options = spec[0], spec[1]
            if isinstance(kind, list) and kind and "default" in options:
                assert options["default"] in kind, f"{name}.{input_name}"
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], f"{name}.{input_name}"


def fake_model(metadata=None, shift=3.0):
    """What the scheduler reads from a ComfyUI MODEL: model_sampling.shift and our metadata attribute."""
    inner = SimpleNamespace(**({METADATA_ATTRIBUTE: metadata} if metadata else {}))
    sampling_object = SimpleNamespace(shift=shift)
    return SimpleNamespace(model=inner, get_model_object=lambda name: sampling_object)


def test_scheduler_uses_the_stored_grid_then_the_default_then_the_teacher_schedule():
    stored = FlashMetadata(student_sigmas=[1.0, 0.8, 0.6, 0.3, 0.0])
    (sigmas,) = NODES["SD35FlashScheduler"]().get_sigmas(fake_model(stored), 4, 1.0)
    assert sigmas.tolist() == pytest.approx([1.0, 0.8, 0.6, 0.3, 0.0])
    (sigmas,) = NODES["SD35FlashScheduler"]().get_sigmas(fake_model(), 2, 1.0)
    assert sigmas.tolist() == pytest.approx([1.0, 0.75, 0.0])
    three, one = (NODES["SD35FlashScheduler"]().get_sigmas(fake_model(shift=s), 6, 1.0)[0] for s in (3.0, 1.0))
    assert len(three) == 7 and three[3] > one[3]  # the model's shift (ModelSamplingSD3) shapes teacher schedules
    with pytest.raises(ValueError, match="steps must be between"):
        sampling.model_sigmas(fake_model(), 0)


def test_sampler_mode_follows_metadata_on_auto():
    assert sampling.sampler_mode(fake_model(FlashMetadata(sampler_mode="renoise")), "auto") == "renoise"
    assert sampling.sampler_mode(fake_model(), "auto") == "euler"
    assert sampling.sampler_mode(fake_model(FlashMetadata(sampler_mode="renoise")), "euler") == "euler"
    with pytest.raises(ValueError, match="'dpm'"):
        sampling.sampler_mode(fake_model(), "dpm")


def test_latent_size_check_names_the_bad_side():
    sampling.check_latent(torch.zeros(1, 16, 128, 126))
    with pytest.raises(FlashError, match="height 1000 is not a multiple of 16"):
        sampling.check_latent(torch.zeros(1, 16, 125, 128))
    with pytest.raises(FlashError, match="width 1000"):
        sampling.check_latent(torch.zeros(1, 16, 128, 125))


def test_loader_report_describes_the_checkpoint(tmp_path):
    meta = FlashMetadata(student_sigmas=[1.0, 0.75, 0.0], sampler_mode="renoise")
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", metadata=meta)
    files = index_checkpoint(path)
    report = loader_report(files, source="tiny.safetensors", weight_dtype=torch.bfloat16, t5="off", metadata=meta)
    assert report["components"] == {"mmdit": True, "vae": True, "clip_l": True, "clip_g": True, "t5": True}
    assert report["architecture"].startswith("custom MM-DiT-X") and report["weight_format"] == "bf16"
    assert report["student_sigmas"] == [1.0, 0.75, 0.0] and report["sampler_mode"] == "renoise"
    memory = report["memory_bytes"]
    assert memory["total"] == memory["mmdit"] + memory["vae"] + memory["text_encoders"]
    with_t5 = loader_report(files, source="tiny.safetensors", weight_dtype=torch.bfloat16, t5="on")
    assert with_t5["memory_bytes"]["text_encoders"] > memory["text_encoders"]  # T5 off is not counted
    as_stored = loader_report(files, source="tiny.safetensors", t5="off")
    assert as_stored["weight_format"] == "fp32" and as_stored["memory_bytes"]["mmdit"] == 2 * memory["mmdit"]


def test_quantize_options_are_the_engine_formats():
    loader = NODES["SD35FlashCheckpointLoader"].INPUT_TYPES()
    # optional and last: API prompts and workflows saved before it existed still run, their widgets in order
    assert list(loader["optional"]) == ["quantize"]
    assert loader["optional"]["quantize"][0] == ["none", *FORMATS]
    assert loader["optional"]["quantize"][1]["default"] == "none"
    node = NODES["SD35FlashQuantizeModel"]
    inputs = node.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "format", "group_size"] and inputs["format"][0] == list(FORMATS)
    assert inputs["group_size"][1]["default"] == DEFAULT_GROUP_SIZE and inputs["group_size"][1]["min"] == 0
    assert node.RETURN_TYPES == ("MODEL",) and node.CATEGORY == "SD3.5 Flash"
    assert sd35_flash.NODE_DISPLAY_NAME_MAPPINGS["SD35FlashQuantizeModel"] == "Quantize MODEL (SD3.5 Flash)"


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_format_is_recognised_from_dtype_and_width(fmt):
    qw = quantize_weight(torch.randn(8, 192), fmt)
    assert quant_ops._packed_format(qw.data, SCALE_KEY[fmt], 192) == fmt
    assert quant_ops._packed_format(qw.data, SCALE_KEY[fmt], 100) in (fmt if fmt in ("int8", "fp8") else None,)
