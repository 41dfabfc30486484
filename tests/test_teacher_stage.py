"""The teacher stage (issue 6; docs/toyworld.md "Teacher"): an MM-DiT trained from scratch by rectified flow on the toy
world's VAE latents, through the Trainer's machinery, saved in the official layout that FlashPipeline and the
distillation stages read. Tiny settings (a 64-wide, 2-block MM-DiT, batches of 8-16): plumbing and loss decrease,
not quality."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd35_flash.flash_core.checkpoint import (
    FlashMetadata,
    component_state_dict,
    index_checkpoint,
    save_checkpoint,
)
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.training import objectives as obj
from sd35_flash.training.cli import main as train_main
from sd35_flash.training.config import ConfigError, config_from_dict, to_toml
from sd35_flash.training.data import TeacherData
from sd35_flash.training.distributed import World
from sd35_flash.training.teacher import (
    NULL_CAPTION,
    LatentPool,
    folder_images,
    load_dataset,
    logit_normal_sigmas,
)
from sd35_flash.training.toyworld import encoders, tokenizer
from sd35_flash.training.toyworld.dataset import DATASETS
from sd35_flash.training.trainer import Trainer


class Killed(Exception):
    pass


def kill_after(n: int):
    def on_step(stage, step, total, values):
        if step == n:
            raise Killed
    return on_step


def load_output(folder: Path, name: str) -> dict[str, torch.Tensor]:
    newest = sorted(folder.glob("step_*.safetensors"))[-1]
    with safe_open(str(newest), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(module_tmp) -> Path:
    """The toy tokenizer and a components checkpoint (the toy text encoders and an untrained toy VAE)."""
    root = module_tmp("teacher")
    tokenizer.save_tokenizers(root / "tokenizers")
    text = {slot: encoders.text_state_dict(m) for slot, m in encoders.make_text_encoders(0).items()}
    save_checkpoint(root / "components.safetensors", vae=encoders.make_vae(seed=0), **text)
    return root


def teacher_config(root: Path, out: Path, **teacher) -> dict:
    return {
        "model": {"tokenizers": str(root / "tokenizers"), "teacher": str(out / "teacher.safetensors")},
        "train": {"out": str(out), "log_every": 1, "checkpoint_every": 2},
        "teacher": {"components": str(root / "components.safetensors"), "iterations": 4, "batch_size": 8,
                    "dataset_size": 64, "depth": 2, "hidden_size": 64, "pos_embed_max_size": 8,
                    "optim": {"lr": 2e-3, "warmup_steps": 2}, **teacher},
        "data": {"prompts": str(root / "prompts.txt"), "dir": str(out / "data"), "teacher_steps": 4,
                 "teacher_cfg": 2.0, "width": 16, "height": 16, "shard_size": 2},
        "pretrain": {"iterations": 2},
    }


@pytest.fixture(scope="module")
def trained(root, module_tmp) -> Path:
    """One teacher run of 40 iterations at batch 16 (about ten seconds), through the CLI."""
    out = module_tmp("teacher_run")
    path = out / "config.toml"
    path.write_text(to_toml(config_from_dict(teacher_config(root, out, iterations=40, batch_size=16,
                                                            dataset_size=256, optim={"lr": 3e-3, "warmup_steps": 5}))))
    assert train_main([str(path), "--stage", "teacher", "--quiet"]) == 0
    return out


def losses(out: Path) -> list[float]:
    rows = (out / "log_teacher.csv").read_text().splitlines()
    column = rows[0].split(",").index("loss")
    return [float(r.split(",")[column]) for r in rows[1:]]


def test_teacher_loss_decreases_on_a_tiny_budget(trained):
    values = losses(trained)
    assert len(values) == 40 and all(np.isfinite(values))
    assert np.mean(values[-8:]) < 0.85 * np.mean(values[:4])


def test_saved_teacher_is_an_official_checkpoint_that_generates(root, trained):
    files = index_checkpoint(trained / "teacher.safetensors")
    assert all(files.has(c) for c in ("mmdit", "vae", "clip_l", "clip_g", "t5"))
    meta = FlashMetadata.from_safetensors(files.metadata)
    assert not meta.is_flash and meta.sampler_mode is None
    assert meta.training["stage"] == "teacher" and meta.training["iterations"] == 40
    assert meta.architecture["dual_attention_layers"] == [0] and meta.architecture["hidden_size"] == 64
    pipe = FlashPipeline.from_checkpoint(trained / "teacher.safetensors", tokenizers=root / "tokenizers",
                                         device="cpu")
    assert pipe.downscale_factor == 1
    for use_t5 in (True, False):
        image = pipe("a red circle at the top", steps=8, cfg=2.0, width=16, height=16, use_t5=use_t5,
                     progress=False)[0]
        assert image.size == (16, 16)
    assert (trained / "state" / "teacher").is_dir() and (trained / "config.toml").exists()


def test_killed_and_resumed_teacher_ends_with_the_same_weights(root, tmp_path):
    whole = config_from_dict(teacher_config(root, tmp_path / "whole"))
    Trainer(whole, World(), progress=False, datasets=DATASETS).run("teacher")
    broken = replace(whole, train=replace(whole.train, out=str(tmp_path / "broken")))
    with pytest.raises(Killed):
        Trainer(broken, World(), progress=False, on_step=kill_after(3),
                datasets=DATASETS).run("teacher")  # state saved at step 2
    Trainer(broken, World(), progress=False, datasets=DATASETS).run("teacher", resume=True)
    for name in ("teacher", "ema"):
        ours = load_output(tmp_path / "whole" / "state" / "teacher", name)
        theirs = load_output(tmp_path / "broken" / "state" / "teacher", name)
        assert ours and ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"{name} differs after resume"


def test_the_trained_teacher_feeds_teacher_data_and_a_student_at_the_vae_latent_size(root, trained, tmp_path):
    """The data stage sizes latents by the teacher's VAE (16 px -> 16x16 with the toy VAE), and trajectory
    guidance trains on them; the student generates a 16 px image."""
    (root / "prompts.txt").write_text("a red circle at the top\na blue square left of a green triangle\n")
    config = teacher_config(root, tmp_path)
    config["model"]["teacher"] = str(trained / "teacher.safetensors")
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config_from_dict(config)))
    assert train_main([str(path), "--stage", "data", "--quiet"]) == 0
    data = TeacherData.load(tmp_path / "data")
    assert data.tensors["trajectory"].shape[-3:] == (16, 16, 16)
    assert train_main([str(path), "--stage", "pretrain", "--quiet"]) == 0
    pipe = FlashPipeline.from_checkpoint(tmp_path / "pretrain.safetensors", tokenizers=root / "tokenizers",
                                         device="cpu")
    assert pipe.metadata.is_flash
    assert pipe("a red circle at the top", steps=4, width=16, height=16, progress=False)[0].size == (16, 16)


def test_latent_pool_holds_every_caption_once_with_the_null_prompt(root):
    from sd35_flash.flash_core.text import load_tokenizers

    dataset = load_dataset("toyworld", 48, 16, seed=0, datasets=DATASETS)
    text = encoders.text_encoder(load_tokenizers(root / "tokenizers"))
    pool = LatentPool.build(dataset, encoders.make_vae(), text)
    assert pool.latents.shape == (48, 16, 16, 16) and len(pool) == 48
    assert set(pool.captions) == set(dataset.captions) | {NULL_CAPTION}
    assert [pool.captions[i] for i in pool.caption_index] == dataset.captions
    rows = pool.caption_rows([dataset.captions[0], NULL_CAPTION])
    with_t5, pooled = pool.conditioning_for(rows, True)
    clip_only, _ = pool.conditioning_for(rows, False)
    assert with_t5.shape == (2, 77 + 77, 4096) and clip_only.shape == (2, 77, 4096) and pooled.shape == (2, 2048)
    context, _ = text.encode([dataset.captions[0], NULL_CAPTION])
    torch.testing.assert_close(with_t5, context)


def test_the_pool_keeps_the_toy_worlds_shape_regions_and_weights_them_around_one(root):
    """``teacher.region_weight``: ``(1 + w * region) / (1 + w * mean region)``, so the weights average 1 over the
    pool; a weight of 1 everywhere is the plain loss, and a weight on the regions changes it."""
    from sd35_flash.flash_core.text import load_tokenizers

    dataset = load_dataset("toyworld", 48, 16, seed=0, datasets=DATASETS)
    pool = LatentPool.build(dataset, encoders.make_vae(), encoders.text_encoder(load_tokenizers(root / "tokenizers")))
    assert torch.equal(pool.regions, dataset.regions)  # 1 latent pixel a pixel: the max-pool keeps the maps
    assert pool.region_weights(torch.arange(48), 0.0) is None
    weights = pool.region_weights(torch.arange(48), 10.0)
    assert weights.shape == (48, 1, 16, 16) and weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert weights.max() > 5 * weights.min()
    x0, eps = pool.latents[:4], torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((4,), 0.7)
    model = lambda x, s: torch.zeros_like(x)  # noqa: E731
    plain = obj.flow_matching_loss(model, x0, eps, sigma)
    assert obj.flow_matching_loss(model, x0, eps, sigma, torch.ones(4, 1, 16, 16)) == plain
    assert obj.flow_matching_loss(model, x0, eps, sigma, weights[:4]) != plain


def test_region_weight_trains_on_the_toy_world_and_is_refused_for_a_folder(root, tmp_path):
    config = config_from_dict(teacher_config(root, tmp_path / "toy", iterations=2, region_weight=10.0))
    Trainer(config, World(), progress=False, datasets=DATASETS).run("teacher")
    assert all(np.isfinite(losses(tmp_path / "toy"))) and (tmp_path / "toy" / "teacher.safetensors").exists()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "red.txt").write_text("a red square\n")
    config = config_from_dict(teacher_config(root, tmp_path / "folder", region_weight=10.0, dataset=str(tmp_path)))
    with pytest.raises(ConfigError, match=f"teacher.region_weight: the dataset '{tmp_path}' has no region maps"):
        Trainer(config, World(), progress=False, datasets=DATASETS).run("teacher")
    assert not (tmp_path / "folder" / "teacher.safetensors").exists()


def test_a_folder_of_captioned_images_is_a_dataset(tmp_path):
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        Image.new("RGB", (40, 24), colour).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}\n")
    dataset = folder_images(tmp_path, 16)
    assert dataset.images.shape == (2, 3, 16, 16) and dataset.captions == ["caption 0", "caption 1"]
    assert dataset.images[0, 0].min() > 0.99 and dataset.images[1, 2].min() > 0.99
    assert load_dataset(str(tmp_path), 1, 16, seed=0, datasets=DATASETS).images.shape[0] == 1
    (tmp_path / "1.txt").unlink()
    with pytest.raises(ConfigError, match="1.png' has no caption file"):
        folder_images(tmp_path, 16)
    with pytest.raises(ConfigError, match="neither 'toyworld' nor a folder"):
        load_dataset(str(tmp_path / "nowhere"), 4, 16, seed=0, datasets=DATASETS)
    with pytest.raises(ConfigError, match="toy world is 16 px"):
        load_dataset("toyworld", 4, 32, seed=0, datasets=DATASETS)


def test_logit_normal_sigmas_and_the_ema_warm_up():
    sigmas = logit_normal_sigmas(20000, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert 0 < sigmas.min() and sigmas.max() < 1 and abs(sigmas.median() - 0.5) < 0.02
    assert (sigmas.sub(0.5).abs() < 0.25).float().mean() > 0.7  # P(|z| < ln 3) = 0.73; uniform: 0.5
    shifted = logit_normal_sigmas(20000, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert shifted.median() > 0.7
    assert obj.ema_decay_at(0, 0.999) == pytest.approx(0.1) and obj.ema_decay_at(10**6, 0.999) == 0.999


@pytest.mark.parametrize(("teacher", "key"), [
    ({"hidden_size": 96}, "teacher: hidden_size must be a multiple of 64"),
    ({"caption_dropout": 1.5}, "teacher.caption_dropout"),
    ({"batch_size": 0}, "teacher.batch_size"),
    ({"logit_normal_std": 0.0}, "teacher.logit_normal_std"),
    ({"region_weight": -1.0}, "teacher.region_weight"),
])
def test_bad_teacher_config_names_the_key(teacher, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({"teacher": teacher})


def test_teacher_stage_without_components_says_which_key(tmp_path):
    config = config_from_dict({"train": {"out": str(tmp_path)}})
    with pytest.raises(ConfigError, match="teacher.components: no checkpoint given"):
        Trainer(config, World(), progress=False).run("teacher")



def test_a_teacher_fine_tunes_from_a_given_checkpoint(root, trained, tmp_path):
    """``teacher.init``: the run starts from that MM-DiT (a learning rate of 1e-12 leaves it where it was)."""
    given = trained / "teacher.safetensors"
    config = config_from_dict(teacher_config(root, tmp_path / "ft", iterations=1, init=str(given),
                                             optim={"lr": 1e-12, "warmup_steps": 0}))
    Trainer(config, World(), progress=False, datasets=DATASETS).run("teacher")
    before = component_state_dict(index_checkpoint(given), "mmdit")
    after = component_state_dict(index_checkpoint(tmp_path / "ft" / "teacher.safetensors"), "mmdit")
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


@pytest.mark.parametrize("init, match", [
    ("other_architecture", "not an unquantized MM-DiT of \\[teacher\\]'s architecture"),
    ("missing.safetensors", "teacher.init: .*missing.safetensors"),
    ("components.safetensors", "teacher.init: .*no MM-DiT"),
])
def test_a_teacher_init_that_does_not_fit_names_the_key(root, trained, tmp_path, init, match):
    path = trained / "teacher.safetensors" if init == "other_architecture" else root / init
    config = config_from_dict(teacher_config(root, tmp_path / "bad", init=str(path),
                                             hidden_size=128 if init == "other_architecture" else 64))
    with pytest.raises(ConfigError, match=match):
        Trainer(config, World(), progress=False, datasets=DATASETS).run("teacher")
    assert not (tmp_path / "bad" / "teacher.safetensors").exists()
