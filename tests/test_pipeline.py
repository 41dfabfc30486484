"""FlashPipeline end to end on a small random-weight SD3.5-shaped checkpoint with CLIP BPE and T5 SentencePiece
tokenizer files made by the tests (tokenizer_factories.py)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sd35_flash.flash_core import schedule
from sd35_flash.flash_core.checkpoint import FlashMetadata, read_metadata
from sd35_flash.flash_core.errors import CheckpointError, FlashError
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.flash_core.vae import process_out

from factories import tiny_clip_g, tiny_clip_l, tiny_mmdit, tiny_vae, write_tiny_checkpoint

W, H = 64, 48  # 8x6 latent: non-square


@pytest.fixture(scope="module")
def checkpoint(module_tmp):
    meta = FlashMetadata(student_sigmas=[1.0, 0.8, 0.6, 0.4], sampler_mode="euler")
    return write_tiny_checkpoint(module_tmp("pipe") / "tiny.safetensors", metadata=meta)


@pytest.fixture(scope="module")
def pipe(checkpoint, tokenizers_dir):
    return FlashPipeline.from_checkpoint(checkpoint, tokenizers=tokenizers_dir, device="cpu")


def _pixels(images):
    return torch.stack([torch.from_numpy(np.array(im)).float() for im in images])


def test_generates_images_of_the_requested_size(pipe):
    images = pipe("a red circle", steps=4, seed=0, width=W, height=H, progress=False)
    assert len(images) == 1 and images[0].size == (W, H) and images[0].mode == "RGB"


def test_same_seed_same_image_other_seed_other_image(pipe):
    a = _pixels(pipe("a red circle", seed=3, width=W, height=H, progress=False))
    b = _pixels(pipe("a red circle", seed=3, width=W, height=H, progress=False))
    c = _pixels(pipe("a red circle", seed=4, width=W, height=H, progress=False))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1.0


def test_latents_follow_the_stored_student_grid_with_comfyui_noise(pipe):
    """The pipeline is Euler over the checkpoint's grid from ComfyUI's noise: recompute it by hand."""
    cond = pipe.encode_prompt("a blue square")
    latents = pipe.generate_latents(cond, seed=11, width=W, height=H, steps=4)
    x = schedule.initial_noise(11, (1, 16, H // 8, W // 8))
    sigmas = [1.0, 0.8, 0.6, 0.4, 0.0]
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            v = pipe.mmdit(x, torch.tensor([1000.0 * s]), cond.context, cond.pooled)
            x = x + (s_next - s) * v
    assert torch.allclose(latents, x, atol=1e-5)
    decoded = pipe.decode(latents)
    expected = pipe.vae.decode(process_out(x))
    assert torch.allclose(_pixels(decoded), ((expected.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1), atol=1.0)


def test_batch_draws_noise_for_the_whole_batch_at_once(pipe):
    images = pipe("a red circle", seed=5, width=W, height=H, batch=2, progress=False)
    assert len(images) == 2
    a, b = _pixels(images)
    assert (a - b).abs().mean() > 1.0  # different noise rows
    cond = pipe.encode_prompt("a red circle").repeat(2)
    latents = pipe.generate_latents(cond, seed=5, width=W, height=H)
    assert torch.equal(_pixels(pipe.decode(latents)), _pixels(images))


def test_t5_off_changes_the_conditioning_not_the_machinery(pipe):
    cond_t5 = pipe.encode_prompt("a red circle", use_t5=True)
    cond_clip = pipe.encode_prompt("a red circle", use_t5=False)
    assert cond_t5.context.shape[1] == 154 and cond_clip.context.shape[1] == 77
    images = pipe("a red circle", seed=0, width=W, height=H, use_t5=False, progress=False)
    assert images[0].size == (W, H)


def test_cfg_and_renoise_and_teacher_schedules_run(pipe):
    steps_seen = []
    images = pipe("a red circle", negative="", cfg=3.0, steps=6, mode="renoise", seed=1, width=W, height=H,
                  progress=lambda i, n: steps_seen.append((i, n)))
    assert images[0].size == (W, H)
    assert steps_seen == [(i, 6) for i in range(1, 7)]


def test_t5_is_not_loaded_when_off(checkpoint, tokenizers_dir):
    pipe = FlashPipeline.from_checkpoint(checkpoint, tokenizers=tokenizers_dir, use_t5=False, device="cpu")
    assert not pipe.text_encoder.has_t5


def test_split_files_fill_a_diffusion_model_only_checkpoint(tmp_path, tokenizers_dir):
    from factories import text_state_dict

    save_file(tiny_mmdit().state_dict(), str(tmp_path / "dit.safetensors"))
    save_file(tiny_vae().state_dict(), str(tmp_path / "vae.safetensors"))
    save_file(text_state_dict(tiny_clip_l()), str(tmp_path / "clip_l.safetensors"))
    save_file(text_state_dict(tiny_clip_g()), str(tmp_path / "clip_g.safetensors"))
    with pytest.raises(CheckpointError, match="no VAE"):
        FlashPipeline.from_checkpoint(tmp_path / "dit.safetensors", tokenizers=tokenizers_dir, device="cpu")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors' was given as the clip_l file"):
        FlashPipeline.from_checkpoint(tmp_path / "dit.safetensors", vae=tmp_path / "vae.safetensors",
                                      clip_l=tmp_path / "vae.safetensors", tokenizers=tokenizers_dir, device="cpu")
    pipe = FlashPipeline.from_checkpoint(tmp_path / "dit.safetensors", vae=tmp_path / "vae.safetensors",
                                         clip_l=tmp_path / "clip_l.safetensors",
                                         clip_g=tmp_path / "clip_g.safetensors", tokenizers=tokenizers_dir, device="cpu")
    assert pipe("x", width=W, height=H, progress=False)[0].size == (W, H)


def test_bad_sizes_and_modes_are_named(pipe):
    with pytest.raises(FlashError, match="width 70"):
        pipe("x", width=70, height=H, progress=False)
    with pytest.raises(FlashError, match="sampler mode 'ddim'"):
        pipe("x", width=W, height=H, mode="ddim", progress=False)


def _write_diffusers_folder(root, single_file, tokenizers):
    """The same weights as ``single_file`` laid out as a diffusers SD3 folder, with its own tokenizers (copies of
    ``tokenizers``' clip/ and t5xxl/)."""
    import shutil

    from safetensors.torch import load_file

    from sd35_flash.flash_core.checkpoint import official_to_diffusers

    by_folder: dict[str, dict] = {}
    for key, value in official_to_diffusers(load_file(str(single_file))).items():
        folder, _, rest = key.partition(".")
        by_folder.setdefault(folder, {})[rest] = value
    names = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
    metadata = read_metadata(single_file)  # our student grid travels with the transformer's weights
    for folder, sd in by_folder.items():
        (root / folder).mkdir(parents=True)
        save_file(sd, str(root / folder / f"{names.get(folder, 'model')}.safetensors"),
                  metadata=metadata if folder == "transformer" else None)
    for sub, source in (("tokenizer", "clip"), ("tokenizer_2", "clip"), ("tokenizer_3", "t5xxl")):
        shutil.copytree(tokenizers / source, root / sub)
    return root


def test_diffusers_folder_gives_the_same_image_as_the_single_file(checkpoint, pipe, tokenizers_dir, tmp_path):
    folder = _write_diffusers_folder(tmp_path / "sd35-tiny", checkpoint, tokenizers_dir)
    from_folder = FlashPipeline.from_checkpoint(folder, device="cpu")  # tokenizers from the folder itself
    assert from_folder.text_encoder.has_t5
    a = _pixels(pipe("a green triangle", seed=2, width=W, height=H, progress=False))
    b = _pixels(from_folder("a green triangle", seed=2, width=W, height=H, progress=False))
    assert (a - b).abs().max() <= 1.0  # the same weights; at most a rounding step apart
