"""The same image from a ComfyUI graph of our nodes and from ``sd35-flash generate`` (PSNR >= 40 dB in fp32).

The graph is run in-process on a real ComfyUI: Flash Checkpoint Loader -> CLIPTextEncode -> EmptySD3LatentImage
-> Flash Sampler -> VAEDecode, and the image is quantised the way SaveImage writes it. The checkpoint is a small
random-weight SD3.5-shaped file (MM-DiT-X with qk-norm, CLIP-L/G and T5 of the same kinds) the test writes.
Both sides tokenize with the tokenizers ComfyUI bundles (the engine reads them from the ComfyUI root), and
CLIPTextEncode's conditioning is checked against the engine's first.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sd35_flash.flash_core import cli
from sd35_flash.flash_core.checkpoint import FlashMetadata

from factories import write_tiny_checkpoint

PROMPT = "a red circle at the top left"
# Prompts of at most 75 CLIP tokens (ComfyUI opens a second chunk of 77 beyond, the engine truncates): an empty one,
# punctuation, capitals, a word outside any corpus and non-ASCII letters.
PROMPTS = [PROMPT, "", "A Lighthouse, at SUNSET; a zebra-striped café!", " ".join(["a blue square"] * 12)]
CHECKPOINT = "tiny_flash.safetensors"
CASES = {
    "4-step euler": dict(steps=4, mode="euler"),
    "2-step renoise": dict(steps=2, mode="renoise"),
    "t5 off": dict(steps=4, mode="euler", t5="off"),
    "cfg 2 with negative": dict(steps=4, mode="euler", cfg=2.0, negative="blurry"),
    "6 teacher steps": dict(steps=6, mode="euler"),
}


@pytest.fixture(scope="module")
def comfy_models(comfy, tmp_path_factory):
    """A models folder ComfyUI knows, holding the tiny checkpoint."""
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    meta = FlashMetadata(student_sigmas=[1.0, 0.9, 0.75, 0.5, 0.0], sampler_mode="euler")
    path = write_tiny_checkpoint(root / "checkpoints" / CHECKPOINT, metadata=meta)
    folder_paths.add_model_folder_path("checkpoints", str(root / "checkpoints"))
    return path


def comfy_image(case: dict, seed: int, width: int, height: int) -> np.ndarray:
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    import nodes as comfy_nodes
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    model, clip, vae = ours["SD35FlashCheckpointLoader"]().load(CHECKPOINT, case.get("t5", "auto"), "fp32")
    (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)
    negative = comfy_nodes.CLIPTextEncode().encode(clip, case["negative"])[0] if "negative" in case else None
    latent = EmptySD3LatentImage.execute(width=width, height=height, batch_size=1)[0]
    (samples,) = ours["SD35FlashSampler"]().sample(model, positive, latent, seed=seed, steps=case["steps"],
                                                   cfg=case.get("cfg", 1.0), mode=case["mode"], negative=negative)
    (image,) = comfy_nodes.VAEDecode().decode(vae, samples)
    return np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8)  # as SaveImage writes it


def cli_image(checkpoint, tokenizers, case: dict, seed: int, width: int, height: int, out) -> np.ndarray:
    args = ["generate", "-c", str(checkpoint), "--tokenizers", str(tokenizers), "-p", PROMPT, "-o", str(out),
            "--width", str(width), "--height", str(height), "--seed", str(seed), "--steps", str(case["steps"]),
            "--mode", case["mode"], "--dtype", "fp32", "--device", "cpu", "--quiet"]
    if case.get("t5") == "off":
        args.append("--no-t5")
    if "negative" in case:
        args += ["--cfg", str(case["cfg"]), "--negative", case["negative"]]
    assert cli.main(args) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.mark.parametrize("t5", ["auto", "off"])
def test_clip_text_encode_matches_the_engine_with_comfyuis_tokenizers(comfy_models, comfy_tokenizers, t5):
    """ComfyUI's own SD3 tokenizer (the Flash loader's CLIP for released-vocabulary encoders) and the engine reading
    the same tokenizer files give the same token rows and the same conditioning."""
    import nodes as comfy_nodes
    from sd35_flash.flash_core.pipeline import FlashPipeline
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    use_t5 = t5 == "auto"
    _, clip, _ = ours["SD35FlashCheckpointLoader"]().load(CHECKPOINT, t5, "fp32")
    encoder = FlashPipeline.from_checkpoint(comfy_models, tokenizers=comfy_tokenizers, dtype="fp32", device="cpu",
                                            use_t5=use_t5).text_encoder
    for prompt in PROMPTS:
        comfy_tokens = clip.tokenize(prompt)
        tokens = encoder.tokenize([prompt], use_t5=use_t5)
        for theirs, mine in (("l", "clip_l"), ("g", "clip_g"), ("t5xxl", "t5")):
            if mine in tokens:
                assert [t for t, _ in comfy_tokens[theirs][0]] == tokens[mine][0].tolist(), (prompt, mine)
        with torch.inference_mode():
            ((context, extra),) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        ref_context, ref_pooled = encoder.encode([prompt], use_t5=use_t5)
        assert context.shape == ref_context.shape == (1, 77 + (77 if use_t5 else 0), 4096), prompt
        torch.testing.assert_close(context, ref_context, atol=1e-4, rtol=1e-4, msg=f"context of {prompt!r}")
        torch.testing.assert_close(extra["pooled_output"], ref_pooled, atol=1e-4, rtol=1e-4,
                                   msg=f"pooled of {prompt!r}")


@pytest.mark.parametrize("name", list(CASES))
def test_graph_and_cli_make_the_same_image(comfy_models, comfy_tokenizers, tmp_path, name):
    case = CASES[name]
    with torch.inference_mode():  # as ComfyUI's executor runs every prompt
        ours = comfy_image(case, seed=7, width=96, height=64)
    theirs = cli_image(comfy_models, comfy_tokenizers, case, seed=7, width=96, height=64, out=tmp_path / "cli.png")
    value = psnr(ours, theirs)
    print(f"{name}: PSNR {value:.1f} dB")
    assert ours.shape == theirs.shape == (64, 96, 3)
    assert ours.std() > 5  # a real image, not a flat one that would match trivially
    assert value >= 40.0
