"""Stock ComfyUI nodes on what our loaders return: KSampler, CLIPTextEncodeSD3, ModelSamplingSD3 + Flash Scheduler
+ SamplerCustomAdvanced, and a LoRA patch. Native types mean these work unchanged (docs/architecture.md)."""

import pytest
import torch

from sd35_flash.flash_core.checkpoint import FlashMetadata

from factories import write_tiny_checkpoint

CHECKPOINT = "stock_nodes.safetensors"


@pytest.fixture(scope="module")
def loaded(comfy, tmp_path_factory):
    import folder_paths

    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    root = tmp_path_factory.mktemp("stock") / "checkpoints"
    write_tiny_checkpoint(root / CHECKPOINT, metadata=FlashMetadata(student_sigmas=[1.0, 0.9, 0.75, 0.5, 0.0]))
    folder_paths.add_model_folder_path("checkpoints", str(root))
    with torch.inference_mode():
        return ours["SD35FlashCheckpointLoader"]().load(CHECKPOINT, "auto", "fp32")


def run(node_class, **inputs):
    """A stock node's output tuple, whether it is a classic (V1) or a V3 node in this ComfyUI version."""
    if hasattr(node_class, "execute"):
        return node_class.execute(**inputs)
    return getattr(node_class(), node_class.FUNCTION)(**inputs)


def encode(clip, text="a red circle"):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def empty_latent(size=64):
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    return EmptySD3LatentImage.execute(width=size, height=size, batch_size=1)[0]


@torch.inference_mode()
def test_ksampler_runs_on_our_model(loaded):
    import nodes

    model, clip, _ = loaded
    (out,) = nodes.KSampler().sample(model, 3, 4, 1.0, "euler", "simple", encode(clip), encode(clip, ""),
                                     empty_latent())
    assert out["samples"].shape == (1, 16, 8, 8) and torch.isfinite(out["samples"]).all()


@torch.inference_mode()
def test_clip_text_encode_sd3_matches_clip_text_encode(loaded):
    from comfy_extras.nodes_sd3 import CLIPTextEncodeSD3

    _, clip, _ = loaded
    (sd3,) = CLIPTextEncodeSD3.execute(clip=clip, clip_l="a red circle", clip_g="a red circle",
                                       t5xxl="a red circle", empty_padding="none")
    plain = encode(clip)
    assert torch.equal(sd3[0][0], plain[0][0])
    assert torch.equal(sd3[0][1]["pooled_output"], plain[0][1]["pooled_output"])


@torch.inference_mode()
def test_scheduler_sees_through_model_sampling_sd3_and_feeds_sampler_custom_advanced(loaded):
    from comfy_extras.nodes_custom_sampler import (
        BasicGuider,
        KSamplerSelect,
        RandomNoise,
        SamplerCustomAdvanced,
    )
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    model, clip, _ = loaded
    (shifted,) = ModelSamplingSD3().patch(model, 6.0)
    scheduler = ours["SD35FlashScheduler"]()
    assert scheduler.get_sigmas(shifted, 4, 1.0)[0].tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    teacher3, teacher6 = (scheduler.get_sigmas(m, 8, 1.0)[0] for m in (model, shifted))
    assert teacher6[4] > teacher3[4]  # the teacher schedule follows the patched shift
    sigmas = scheduler.get_sigmas(model, 4, 1.0)[0]
    noise = run(RandomNoise, noise_seed=5)[0]
    guider = run(BasicGuider, model=model, conditioning=encode(clip))[0]
    sampler = run(KSamplerSelect, sampler_name="euler")[0]
    out = run(SamplerCustomAdvanced, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                        latent_image=empty_latent())[0]
    (flash,) = ours["SD35FlashSampler"]().sample(model, encode(clip), empty_latent(), seed=5, steps=4, cfg=1.0,
                                                 mode="euler")
    assert torch.allclose(out["samples"], flash["samples"], atol=1e-5)


@torch.inference_mode()
def test_a_lora_patches_our_model(loaded):
    import comfy.sd

    model, clip, _ = loaded
    key = "joint_blocks.0.x_block.mlp.fc1"
    weight = model.model.diffusion_model.state_dict()[f"{key}.weight"]
    g = torch.Generator().manual_seed(0)
    lora = {f"diffusion_model.{key}.lora_up.weight": torch.randn(weight.shape[0], 4, generator=g),
            f"diffusion_model.{key}.lora_down.weight": torch.randn(4, weight.shape[1], generator=g)}
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert f"diffusion_model.{key}.weight" in patched.patches
    sample = dict(seed=5, steps=4, cfg=1.0, mode="euler")
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    base = ours["SD35FlashSampler"]().sample(model, encode(clip), empty_latent(), **sample)[0]["samples"]
    with_lora = ours["SD35FlashSampler"]().sample(patched, encode(clip), empty_latent(), **sample)[0]["samples"]
    assert not torch.allclose(base, with_lora, atol=1e-3)
