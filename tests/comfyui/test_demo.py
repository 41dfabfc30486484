"""The demo model inside a real ComfyUI (issue 6 "The demo model"): the pack's demo/ folder is a checkpoints folder,
the Flash loader reads the word-level tokenizers beside the checkpoint, and CLIPTextEncode, the Flash Sampler and
VAEDecode give the conditioning and the image ``sd35-flash generate`` gives.

Fast tests use a demo-shaped random checkpoint (tests/factories.py ``write_demo_like_checkpoint``); ``-m slow``
builds the CI-size toy world and checks the trained demo.
"""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35_flash.flash_core import cli
from sd35_flash.flash_core.pipeline import FlashPipeline

from factories import write_demo_like_checkpoint

DEMO = "sd35_flash_demo.safetensors"
PROMPTS = ["a blue triangle at the top", "a large red circle at the top", "a small cyan square, on the left!", ""]


@pytest.fixture(scope="module")
def demo_folder(comfy, tmp_path_factory):
    """A pack-like demo/ folder (checkpoint + tokenizers/) registered the way the pack registers its own."""
    import folder_paths

    from sd35_flash.nodes import register_demo_folder

    folder = tmp_path_factory.mktemp("pack") / "demo"
    write_demo_like_checkpoint(folder, DEMO)
    assert register_demo_folder(folder)
    assert str(folder) in folder_paths.get_folder_paths("checkpoints")
    return folder


def flash_loader():
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    return ours["SD35FlashCheckpointLoader"]()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def check_conditioning(clip, checkpoint, use_t5: bool) -> None:
    import nodes as comfy_nodes

    pipe = FlashPipeline.from_checkpoint(checkpoint, device="cpu", dtype="fp32", use_t5=use_t5)
    for prompt in PROMPTS:
        with torch.inference_mode():
            ((context, extra),) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        ref_context, ref_pooled = pipe.text_encoder.encode([prompt], use_t5=use_t5)
        enc = pipe.text_encoder  # the rows its tokenizer folder declares: 77 + 77 here, 12 + 12 for a toy build
        tokens = enc.clip_length + (enc.t5_length if use_t5 else 0)
        assert context.shape == ref_context.shape == (1, tokens, 4096), prompt
        torch.testing.assert_close(context, ref_context, atol=1e-4, rtol=1e-4, msg=f"context of {prompt!r}")
        torch.testing.assert_close(extra["pooled_output"], ref_pooled, atol=1e-4, rtol=1e-4,
                                   msg=f"pooled of {prompt!r}")


def comfy_image(ckpt_name: str, prompt: str, seed: int, t5: str = "auto", steps: int = 4) -> np.ndarray:
    """Flash loader -> CLIPTextEncode -> EmptySD3LatentImage 128x128 -> Flash Sampler -> VAEDecode, as SaveImage
    writes it."""
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    import nodes as comfy_nodes
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    with torch.inference_mode():  # as ComfyUI's executor runs every prompt
        model, clip, vae = flash_loader().load(ckpt_name, t5, "fp32")
        (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
        latent = EmptySD3LatentImage.execute(width=128, height=128, batch_size=1)[0]
        (samples,) = ours["SD35FlashSampler"]().sample(model, positive, latent, seed=seed, steps=steps, cfg=1.0,
                                                       mode="auto")
        (image,) = comfy_nodes.VAEDecode().decode(vae, samples)
    return np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8)


def cli_image(checkpoint, prompt: str, seed: int, out, no_t5: bool = False, steps: int = 4) -> np.ndarray:
    """``sd35-flash generate`` with no --tokenizers and no size: the tokenizers beside the file, 16 px (kept, not
    enlarged: ``--show-at 0``)."""
    args = ["generate", "-c", str(checkpoint), "-p", prompt, "-o", str(out), "--seed", str(seed),
            "--steps", str(steps), "--dtype", "fp32", "--device", "cpu", "--quiet", "--show-at", "0"]
    args += ["--no-t5"] if no_t5 else []
    assert cli.main(args) == 0
    return np.asarray(Image.open(out).convert("RGB"))


# ----------------------------------------------------------------------------------------------- fast


def test_the_demo_folder_is_a_checkpoints_folder(demo_folder, tmp_path):
    import folder_paths

    from sd35_flash.nodes import register_demo_folder

    assert DEMO in folder_paths.get_filename_list("checkpoints")
    assert DEMO in flash_loader().INPUT_TYPES()["required"]["ckpt_name"][0]
    assert not register_demo_folder(tmp_path / "no_demo")  # an installation without the demo: nothing added
    assert str(tmp_path / "no_demo") not in folder_paths.get_folder_paths("checkpoints")


@pytest.mark.parametrize("t5", ["auto", "off"])
def test_clip_text_encode_matches_the_engine_with_the_tokenizers_beside(demo_folder, monkeypatch, t5):
    monkeypatch.delenv("SD35_FLASH_TOKENIZERS", raising=False)
    _, clip, _ = flash_loader().load(DEMO, t5, "fp32")
    tokens = clip.tokenize(PROMPTS[0])
    assert max(t for t, _ in tokens["l"][0]) < 29 and max(t for t, _ in tokens["t5xxl"][0]) < 29  # the toy ids
    check_conditioning(clip, demo_folder / DEMO, use_t5=t5 == "auto")


def test_the_graph_makes_the_cli_image(demo_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("SD35_FLASH_TOKENIZERS", raising=False)
    ours = comfy_image(DEMO, PROMPTS[0], seed=3)
    theirs = cli_image(demo_folder / DEMO, PROMPTS[0], seed=3, out=tmp_path / "cli.png")
    value = psnr(ours, theirs)
    print(f"demo-shaped model, ComfyUI vs CLI: PSNR {value:.1f} dB")
    assert ours.shape == theirs.shape == (16, 16, 3)
    assert ours.std() > 2  # a real image, not a flat one that would match trivially
    assert value >= 40.0


def test_a_small_vocabulary_without_its_tokenizers_is_a_clear_error(demo_folder, tmp_path):
    import folder_paths

    from sd35_flash.flash_core.errors import CheckpointError

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(demo_folder / DEMO, alone / "toy_without_tokenizers.safetensors")
    folder_paths.add_model_folder_path("checkpoints", str(alone))
    with pytest.raises(CheckpointError, match="vocabulary of 29 ids.*tokenizers/ folder"):
        flash_loader().load("toy_without_tokenizers.safetensors", "auto", "fp32")


# ----------------------------------------------------------------------------------------------- the built demo


@pytest.fixture(scope="module")
def built_demo(comfy, ci_build, tmp_path_factory):
    """The ci-size toy world's demo folder (tests/conftest.py), registered as a checkpoints folder. The ci preset
    keeps hidden = 64 * depth, so ComfyUI's detection (depth = hidden / 64, docs/comfyui.md 4b) loads it."""
    import folder_paths

    out = ci_build
    folder = out / "demo"
    named = tmp_path_factory.mktemp("built") / "demo"  # under another file name than the fast tests' demo
    named.mkdir()
    shutil.copy(folder / DEMO, named / "built_demo.safetensors")
    shutil.copytree(folder / "tokenizers", named / "tokenizers")
    folder_paths.add_model_folder_path("checkpoints", str(named))
    return named / "built_demo.safetensors"


@pytest.mark.slow
def test_the_built_demo_conditioning_matches(built_demo, monkeypatch):
    monkeypatch.delenv("SD35_FLASH_TOKENIZERS", raising=False)
    for t5 in ("auto", "off"):
        _, clip, _ = flash_loader().load(built_demo.name, t5, "fp32")
        check_conditioning(clip, built_demo, use_t5=t5 == "auto")


def assert_graph_makes_the_cli_image(checkpoint, out, t5: str, label: str) -> None:
    prompt = "a blue triangle at the top"
    ours = comfy_image(checkpoint.name, prompt, seed=0, t5=t5)
    theirs = cli_image(checkpoint, prompt, seed=0, out=out, no_t5=t5 == "off")
    value = psnr(ours, theirs)
    print(f"{label} (t5 {t5}), ComfyUI vs CLI: PSNR {value:.1f} dB")
    assert ours.shape == theirs.shape == (16, 16, 3)
    assert ours.std() > 2
    assert value >= 40.0


@pytest.mark.slow
@pytest.mark.parametrize("t5", ["auto", "off"])
def test_the_built_demo_makes_the_cli_image(built_demo, tmp_path, monkeypatch, t5):
    monkeypatch.delenv("SD35_FLASH_TOKENIZERS", raising=False)
    assert_graph_makes_the_cli_image(built_demo, tmp_path / "cli.png", t5, "built demo")


# ----------------------------------------------------------------------------------------------- the shipped demo

SHIPPED = Path(__file__).resolve().parents[2] / "demo" / DEMO


@pytest.fixture(scope="module")
def shipped_demo(comfy, tmp_path_factory):
    """The pack's own demo/ model (12-token text rows), under another file name than the fast tests' demo."""
    import folder_paths

    if not SHIPPED.exists():
        pytest.skip(f"no demo model at {SHIPPED}")
    named = tmp_path_factory.mktemp("shipped") / "demo"
    named.mkdir()
    shutil.copy(SHIPPED, named / "shipped_demo.safetensors")
    shutil.copytree(SHIPPED.parent / "tokenizers", named / "tokenizers")
    folder_paths.add_model_folder_path("checkpoints", str(named))
    return named / "shipped_demo.safetensors"


@pytest.mark.parametrize("t5", ["auto", "off"])
def test_the_shipped_demo_conditions_and_draws_as_the_cli(shipped_demo, tmp_path, monkeypatch, t5):
    monkeypatch.delenv("SD35_FLASH_TOKENIZERS", raising=False)
    _, clip, _ = flash_loader().load(shipped_demo.name, t5, "fp32")
    check_conditioning(clip, shipped_demo, use_t5=t5 == "auto")
    assert_graph_makes_the_cli_image(shipped_demo, tmp_path / "cli.png", t5, "shipped demo")
