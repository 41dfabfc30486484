"""The demo model from the command line (issue 6 "The demo model"): tokenizers found beside a checkpoint, image
sizes from the model (its VAE's pixels per latent, its position table), and the ComfyUI graph embedded in the PNG
sized for the same run. Fast tests use a demo-shaped random checkpoint; ``-m slow`` builds the real CI demo."""

import json

import pytest
from PIL import Image

from sd35_flash.flash_core import cli, text
from sd35_flash.flash_core.checkpoint import index_checkpoint
from sd35_flash.flash_core.checkpoint_info import describe_checkpoint, largest_image_size, vae_downscale
from sd35_flash.flash_core.errors import FlashError, TokenizerNotFoundError
from sd35_flash.flash_core.memory import activation_bytes
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.nodes import sampling

from factories import write_demo_like_checkpoint, write_tiny_checkpoint
from workflow_check import check_graph

PROMPT = "a blue triangle at the top"


@pytest.fixture(scope="module")
def demo(module_tmp):
    """A demo-shaped checkpoint with its tokenizers/ folder beside it."""
    return write_demo_like_checkpoint(module_tmp("demo"))


@pytest.fixture
def no_env_tokenizers(monkeypatch):
    monkeypatch.delenv(text.ENV_TOKENIZERS, raising=False)


def _nodes(prompt: dict, class_type: str) -> list[dict]:
    return [n["inputs"] for n in prompt.values() if n["class_type"] == class_type]


# ----------------------------------------------------------------------------------- tokenizers beside a file


def test_tokenizers_beside_a_checkpoint_are_found(demo, tmp_path):
    assert text.tokenizers_beside(demo) == demo.parent / "tokenizers"
    assert text.tokenizers_beside(tmp_path / "alone.safetensors") is None  # no folder beside it
    (tmp_path / "tokenizers").mkdir()
    assert text.tokenizers_beside(tmp_path / "empty.safetensors") is None  # a folder load_tokenizers cannot read
    dirs = text.find_tokenizer_dirs(demo.parent / "tokenizers")
    assert dirs.clip_l.name == "clip" and dirs.t5.name == "t5xxl" and text.reads_as_is(dirs.clip_l)


def test_pipeline_reads_the_tokenizers_beside_the_checkpoint(demo, no_env_tokenizers):
    pipe = FlashPipeline.from_checkpoint(demo, device="cpu", dtype="fp32")
    ids = pipe.text_encoder.tokenize([PROMPT])
    assert int(ids["clip_l"].max()) < 29 and int(ids["t5"].max()) < 29  # the word-level vocabulary's ids
    assert pipe.downscale_factor == 1


def test_beside_comes_before_the_environment_and_after_an_explicit_path(demo, tmp_path, monkeypatch):
    monkeypatch.setenv(text.ENV_TOKENIZERS, str(tmp_path / "nowhere"))  # would fail if it were read
    pipe = FlashPipeline.from_checkpoint(demo, device="cpu", dtype="fp32")
    assert pipe.text_encoder.tokenizers.clip_l.vocab_size < 100
    with pytest.raises(TokenizerNotFoundError, match="given_path"):  # an explicit path is the only place looked
        FlashPipeline.from_checkpoint(demo, tokenizers=tmp_path / "given_path", device="cpu", dtype="fp32")


# ----------------------------------------------------------------------------------- sizes from the model


def test_sizes_come_from_the_vae_and_the_position_table(demo, tmp_path):
    files = index_checkpoint(demo)
    assert vae_downscale(files) == 1 and largest_image_size(files) == 16
    tiny = index_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    assert vae_downscale(tiny) == 8 and largest_image_size(tiny) == 16 * 2 * 8
    assert "max resolution: 16 px" in describe_checkpoint(demo)
    # 16 px at 1 pixel per latent is 64 image tokens, as 128 px with the released VAE
    demo_acts = activation_bytes(files, width=16, height=16, batch=1, cfg=1.0, use_t5=False)
    tiny_acts = activation_bytes(tiny, width=128, height=128, batch=1, cfg=1.0, use_t5=False)
    assert demo_acts["denoise"] == pytest.approx(tiny_acts["denoise"], rel=0.6)


def test_generate_defaults_to_the_demo_and_its_size(demo, tmp_path, monkeypatch, no_env_tokenizers):
    """No --checkpoint, no --tokenizers, no --width: the demo model, its tokenizers and its 16 px, saved enlarged
    (nearest) to 128 px as the demo workflow's ImageScale does; --show-at 0 keeps the model's pixels."""
    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", demo)
    out = tmp_path / "out.png"
    assert cli.main(["generate", "--prompt", PROMPT, "--out", str(out), "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (128, 128)
    prompt, workflow = json.loads(image.text["prompt"]), json.loads(image.text["workflow"])
    assert check_graph(prompt, workflow) == []
    # ComfyUI's EmptySD3LatentImage divides by 8: 128 makes the 16x16 latent that decodes to 16 px
    assert _nodes(prompt, "EmptySD3LatentImage") == [{"width": 128, "height": 128, "batch_size": 1}]
    assert _nodes(prompt, "SD35FlashCheckpointLoader")[0]["ckpt_name"] == demo.name
    assert [(n["width"], n["upscale_method"]) for n in _nodes(prompt, "ImageScale")] == [(128, "nearest-exact")]
    native = tmp_path / "native.png"
    assert cli.main(["generate", "--prompt", PROMPT, "--out", str(native), "--quiet", "--show-at", "0"]) == 0
    small = Image.open(native)
    assert small.size == (16, 16) and _nodes(json.loads(small.text["prompt"]), "ImageScale") == []
    assert small.resize((128, 128), Image.Resampling.NEAREST).tobytes() == image.convert(small.mode).tobytes()


def test_default_size_is_1024_or_the_largest_the_model_makes(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path / "tiny.safetensors")  # position table 16, 8 px per latent: 256 px
    out = tmp_path / "tiny.png"
    args = cli.build_parser().parse_args(["generate", "-p", "x", "-o", str(out)])
    assert cli.image_size(args, index_checkpoint(tiny)) == 8 and (args.width, args.height) == (256, 256)
    args = cli.build_parser().parse_args(["generate", "-p", "x", "-o", str(out), "--height", "128"])
    cli.image_size(args, index_checkpoint(tiny))
    assert (args.width, args.height) == (128, 128)


def test_sizes_the_demo_cannot_make_are_one_line(demo, tmp_path, capsys, no_env_tokenizers):
    for size, words in (("32", "larger than this model's largest image side, 16 px"),
                        ("15", "not a positive multiple of 2")):
        assert cli.main(["generate", "-c", str(demo), "-p", "x", "-o", str(tmp_path / "a.png"),
                         "--width", size]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err


def test_the_flash_sampler_checks_latents_by_the_vae_factor():
    import torch

    sampling.check_latent(torch.zeros(1, 16, 16, 16), downscale=1)  # the demo's 16 px
    with pytest.raises(FlashError, match="width 15 is not a multiple of 2"):
        sampling.check_latent(torch.zeros(1, 16, 16, 15), downscale=1)
    with pytest.raises(FlashError, match="width 1000 is not a multiple of 16"):
        sampling.check_latent(torch.zeros(1, 16, 128, 125))


# ----------------------------------------------------------------------------------- the real (CI-size) demo


@pytest.fixture(scope="module")
def built_demo(ci_build):
    return ci_build / "demo" / "sd35_flash_demo.safetensors"


@pytest.mark.slow
def test_generate_without_a_checkpoint_uses_the_built_demo(built_demo, tmp_path, monkeypatch, no_env_tokenizers):
    monkeypatch.setattr(cli, "DEMO_CHECKPOINT", built_demo)
    out = tmp_path / "out.png"
    assert cli.main(["generate", "--prompt", PROMPT, "--out", str(out), "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (128, 128)
    assert _nodes(json.loads(image.text["prompt"]), "EmptySD3LatentImage")[0]["width"] == 128
