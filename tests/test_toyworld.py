"""Tests of training/toyworld: the world, its tokenizer, encoders and VAE, and the evaluator (issue 6,
docs/toyworld.md). Fast by default (a few seconds each, one torch thread); the CI-sized training runs are ``slow``."""

import math
import time

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sd35_flash.flash_core.checkpoint import save_checkpoint
from sd35_flash.flash_core.errors import TokenizerNotFoundError
from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.flash_core.text import CLIP_G_PAD_ID, load_tokenizers, tokenize_clip, tokenize_t5
from sd35_flash.flash_core.vae import VAEConfig, process_in
from sd35_flash.training.toyworld import encoders, evaluator, tokenizer, world

from factories import randomize_


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # module scope: set before the module's other fixtures run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_tokenizer_dir(module_tmp):
    return tokenizer.save_tokenizers(module_tmp("toy_tokenizers"))


@pytest.fixture(scope="module")
def toy_tokenizers(toy_tokenizer_dir):
    return load_tokenizers(toy_tokenizer_dir)


def _saturated(images: torch.Tensor) -> torch.Tensor:
    """[N, 16, 16] mask of object pixels: the backgrounds are near grey, every object colour is saturated."""
    rgb = (images + 1) / 2
    return (rgb.amax(1) - rgb.amin(1)) > 0.45


def _nearest_colour(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] index of the COLOUR_RGB prototype nearest to the mean of the masked pixels of each image."""
    rgb = (images + 1) / 2
    mean = (rgb * mask[:, None]).sum((2, 3)) / mask.sum((1, 2)).clamp(min=1)[:, None]
    return torch.cdist(mean, world.COLOUR_RGB).argmin(1)


# ------------------------------------------------------------------------------------------------ world


def test_world_is_deterministic_given_a_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = world.sample(64, 3), world.sample(64, torch.Generator().manual_seed(3)), world.sample(64, 4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert all(torch.equal(a.labels[k], b.labels[k]) for k in world.ATTRIBUTES)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (64, 3, 16, 16) and a.images.dtype == torch.float32
    assert a.images.min() >= -1 and a.images.max() <= 1


def test_captions_parse_back_to_the_image_labels():
    batch = world.sample(512, 0)
    asked = world.caption_labels(batch.captions)
    for name in world.ATTRIBUTES:
        said = asked[name] >= 0
        assert torch.equal(asked[name][said], batch.labels[name][said]), name
    # Only size (sometimes) and background (always) are left open by a caption.
    assert bool((asked["background"] == -1).all())
    single = batch.labels["layout"] == 0
    assert 0.5 < (asked["size"][single] >= 0).float().mean() < 0.95
    assert set(" ".join(batch.captions).split()) <= set(world.vocabulary())


def test_world_mixes_one_and_two_object_scenes_with_every_relation_phrasing():
    texts = world.sample(400, 1).captions
    for word in ("left of", "right of", "above", "below", "at the top", "in the center", "small", "large"):
        assert any(word in t for t in texts), word
    assert 0.35 < sum(" of " in t or "above" in t or "below" in t for t in texts) / len(texts) < 0.65


def test_rendered_colours_and_places_match_the_caption():
    batch = world.sample(600, 2)
    labels, mask = batch.labels, _saturated(batch.images)
    single = labels["layout"] == 0
    assert bool((_nearest_colour(batch.images, mask)[single] == labels["colour"][single]).all())
    ys, xs = torch.meshgrid(torch.arange(16.0) + 0.5, torch.arange(16.0) + 0.5, indexing="ij")
    def box_centre(coords):  # centre of the object's bounding box (a triangle's mass sits low)
        high = coords.masked_fill(~mask, -1).amax((1, 2))
        return (high + coords.masked_fill(~mask, 99).amin((1, 2))) / 2

    cx, cy = box_centre(xs), box_centre(ys)
    where = {"top": cy < 7, "bottom": cy > 9, "left": cx < 7, "right": cx > 9,
             "center": (cx - 8).abs().lt(1.5) & (cy - 8).abs().lt(1.5)}
    for i, name in enumerate(world.POSITIONS):
        rows = single & (labels["position"] == i)
        assert bool(where[name][rows].all()), name
    # Pairs: the first object is in the left (top) half, the second in the other half.
    for layout, axis in ((1, xs), (2, ys)):
        rows = labels["layout"] == layout
        first, second = mask & (axis < 8), mask & (axis > 8)
        assert bool((_nearest_colour(batch.images, first)[rows] == labels["colour"][rows]).all())
        assert bool((_nearest_colour(batch.images, second)[rows] == labels["colour_2"][rows]).all())


def test_large_objects_cover_more_pixels_than_small_ones():
    batch = world.sample(400, 5)
    area = _saturated(batch.images).sum((1, 2)).float()
    single = batch.labels["layout"] == 0
    small, large = area[single & (batch.labels["size"] == 0)], area[single & (batch.labels["size"] == 1)]
    assert small.max() < large.min()


def test_thousands_of_images_take_well_under_a_second_or_two():
    world.sample(64, 0)
    start = time.perf_counter()
    batch = world.sample(4096, 0)
    assert time.perf_counter() - start < 2.0
    assert len(batch.captions) == 4096


def test_eval_prompts_cover_every_attribute_value_and_render():
    asked = world.caption_labels(list(world.EVAL_PROMPTS))
    for name in ("layout", "colour", "shape", "size", "position", "colour_2", "shape_2"):
        assert set(asked[name][asked[name] >= 0].tolist()) == set(range(len(world.ATTRIBUTES[name]))), name
    for relation in ("left of", "right of", "above", "below"):
        assert any(relation in p for p in world.EVAL_PROMPTS)
    real = world.sample_for_prompts(list(world.EVAL_PROMPTS), 0)
    for name in world.ATTRIBUTES:
        said = asked[name] >= 0
        assert torch.equal(real.labels[name][said], asked[name][said])
    assert bool((real.labels["size"][asked["layout"] == 0] >= 0).all())  # an open size is drawn


def test_distillation_prompts_hold_out_the_evaluation_combinations():
    from sd35_flash.training.toyworld.build import distillation_prompts, scene_key

    prompts = distillation_prompts(1024, 7)
    assert len(prompts) == len(set(prompts)) == 1024
    held_out = {scene_key(p) for p in world.EVAL_PROMPTS}
    assert not held_out & {scene_key(p) for p in prompts}
    # either phrasing of a relation, and a prompt without its size word, ask for the same combination
    assert scene_key("a red circle left of a blue square") == scene_key("a blue square right of a red circle")
    assert scene_key("a red circle at the top") == scene_key("a large red circle at the top")
    assert scene_key("a red circle at the top") != scene_key("a red square at the top")


def test_null_prompt_and_text_outside_the_grammar():
    assert world.NULL_PROMPT == ""
    assert set(world.parse_caption(world.NULL_PROMPT).values()) == {-1}
    with pytest.raises(ValueError, match="null prompt"):
        world.sample_for_prompts([world.NULL_PROMPT], 0)
    with pytest.raises(ValueError, match="not a toy-world caption"):
        world.parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="colour"):
        world.parse_caption("a pink circle left of a blue square")


# -------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_through_transformers(toy_tokenizer_dir):
    text = "A large green triangle at the top"
    for loader in (AutoTokenizer, PreTrainedTokenizerFast):
        clip = loader.from_pretrained(toy_tokenizer_dir / "clip")
        ids = clip(text)["input_ids"]
        assert ids[0] == clip.bos_token_id == 3 and ids[-1] == clip.eos_token_id == 4
        assert clip.unk_token_id not in ids and len(ids) == 9
        assert clip.decode(ids, skip_special_tokens=True) == text.lower()
    t5 = AutoTokenizer.from_pretrained(toy_tokenizer_dir / "t5xxl")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id, t5.bos_token_id) == (0, 1, 2, None)
    assert t5(text)["input_ids"][-1] == 1
    assert t5("a zebra")["input_ids"][1] == t5.unk_token_id
    assert len(t5) == tokenizer.vocab_size() == 5 + len(world.vocabulary())


def test_flash_core_tokenizes_toy_prompts_like_clip_and_t5(toy_tokenizers):
    toks = toy_tokenizers
    prompts = ["a red circle left of a blue square", world.NULL_PROMPT]
    words = toks.clip_l(prompts[0], add_special_tokens=False)["input_ids"]
    clip_l = tokenize_clip(toks.clip_l, prompts, pad_id=toks.clip_l.eos_token_id)
    clip_g = tokenize_clip(toks.clip_g, prompts, pad_id=CLIP_G_PAD_ID)
    assert clip_l.shape == clip_g.shape == (2, 77)
    assert clip_l[0, :10].tolist() == [3, *words, 4] and bool((clip_l[0, 10:] == 4).all())
    assert clip_g[1, :2].tolist() == [3, 4] and bool((clip_g[1, 2:] == 0).all())
    t5 = tokenize_t5(toks.t5, prompts, 12)
    assert t5[0].tolist() == [*words, 1, 0, 0, 0] and t5[1].tolist() == [1] + [0] * 11


def test_a_t5_tokenizer_folder_is_not_taken_for_clip(toy_tokenizer_dir):
    with pytest.raises(TokenizerNotFoundError, match="start token"):
        load_tokenizers(toy_tokenizer_dir / "t5xxl")


# --------------------------------------------------------------------------------------------- encoders


def test_text_encoders_are_tiny_seeded_and_of_sd35_kinds():
    state = torch.random.get_rng_state()
    a, b = encoders.make_text_encoders(0), encoders.make_text_encoders(0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert encoders.parameter_count(a) * 4 < 1.5e6
    assert type(a["clip_l"]).__name__ == "CLIPTextModel" and a["clip_l"].config.hidden_act == "quick_gelu"
    assert type(a["clip_g"]).__name__ == "CLIPTextModelWithProjection" and a["clip_g"].config.hidden_act == "gelu"
    assert a["t5"].config.feed_forward_proj == "gated-gelu"
    assert min(m.config.num_hidden_layers for m in (a["clip_l"], a["clip_g"])) >= 3
    for slot in a:
        sa, sb = encoders.text_state_dict(a[slot]), encoders.text_state_dict(b[slot])
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not any(p.requires_grad for p in a[slot].parameters())


def test_conditioning_is_padded_like_sd35_with_t5_and_without(toy_tokenizers):
    encoder = encoders.text_encoder(toy_tokenizers, seed=0)
    prompts = [*world.EVAL_PROMPTS[:3], world.NULL_PROMPT]
    context, pooled = encoder.encode(prompts)
    clip_width = encoders.CLIP_L_WIDTH + encoders.CLIP_G_WIDTH
    assert context.shape == (4, 77 + 77, 4096) and pooled.shape == (4, 2048)
    assert bool((context[:, :77, clip_width:] == 0).all()) and bool((context[:, 77:, encoders.T5_WIDTH:] == 0).all())
    pooled_width = encoders.CLIP_L_WIDTH + encoders.CLIP_G_PROJECTION
    assert bool((pooled[:, pooled_width:] == 0).all())
    assert 0.3 < context[:, :77, :clip_width].std() < 3 and 0.3 < pooled[:, :pooled_width].std() < 3
    off_context, off_pooled = encoder.encode(prompts, use_t5=False)
    assert off_context.shape == (4, 77, 4096)
    torch.testing.assert_close(off_context, context[:, :77])
    torch.testing.assert_close(off_pooled, pooled)
    no_t5 = encoders.text_encoder(toy_tokenizers, seed=0, with_t5=False)
    assert not no_t5.has_t5
    torch.testing.assert_close(no_t5.encode(prompts)[0], off_context)


def test_a_tokenizer_folder_declares_shorter_rows_and_real_files_keep_77(tmp_path, toy_tokenizers, tokenizers_dir):
    """The build's tokenizer declares 12-token rows; the same prompts give the same leading tokens and features.
    CLIP BPE and T5 SentencePiece files (tokenizers_dir) keep 77 and 77: their model_max_length (8192 in
    ComfyUI's copy of CLIP's, 512 in T5's) is the tokenizer's limit, not a row length."""
    short = load_tokenizers(tokenizer.save_tokenizers(tmp_path / "short", clip_length=12, t5_length=10))
    assert (short.clip_length, short.t5_length) == (12, 10)
    assert (toy_tokenizers.clip_length, toy_tokenizers.t5_length) == (77, 77)
    prompts = [world.EVAL_PROMPTS[0], world.NULL_PROMPT]
    long_encoder, short_encoder = (encoders.text_encoder(t, seed=0) for t in (toy_tokenizers, short))
    context, pooled = short_encoder.encode(prompts)
    assert context.shape == (2, 12 + 10, 4096) and short_encoder.encode(prompts, use_t5=False)[0].shape[1] == 12
    long_context, long_pooled = long_encoder.encode(prompts)
    torch.testing.assert_close(pooled, long_pooled)  # causal CLIP: the pooled end token sees only the prompt
    torch.testing.assert_close(context[:, :12], long_context[:, :12])
    with pytest.raises(ValueError, match="t5_length"):
        tokenizer.save_tokenizers(tmp_path / "bad", t5_length=1)
    bpe = load_tokenizers(tokenizers_dir)
    assert (bpe.clip_l.model_max_length, bpe.t5.model_max_length) == (8192, 512)
    assert (bpe.clip_length, bpe.t5_length) == (77, 77)
    long_prompt = " ".join(["a red circle"] * 40)  # 120 words: longer than a row, shorter than 512
    assert tokenize_clip(bpe.clip_l, [long_prompt], pad_id=0, length=bpe.clip_length).shape == (1, 77)
    assert tokenize_t5(bpe.t5, [long_prompt], bpe.t5_length).shape == (1, 77)


def test_distinct_prompts_get_distinct_conditioning(toy_tokenizers):
    prompts = list(world.EVAL_PROMPTS) + ["a blue square left of a red circle"]  # the first pair, reversed
    context, pooled = encoders.text_encoder(toy_tokenizers, seed=0).encode(prompts)
    for features in (pooled, context.flatten(1)):
        distances = torch.cdist(features, features)
        off_diagonal = distances[~torch.eye(len(prompts), dtype=torch.bool)]
        assert off_diagonal.min() > 0.1 * off_diagonal.median()


def test_toy_vae_keeps_16x16_latents_for_64_image_tokens():
    vae = encoders.make_vae(seed=0)
    assert encoders.TOY_VAE.downscale_factor == 1 and encoders.LATENT_SIZE == 16
    assert (encoders.LATENT_SIZE // 2) ** 2 == 64  # MM-DiT patch 2
    assert VAEConfig.from_state_dict(vae.state_dict()) == encoders.TOY_VAE
    assert not any(".downsample." in k or ".upsample." in k for k in vae.state_dict())
    images = world.sample(4, 0).images
    with torch.no_grad():
        latents = vae.encode(images)
        assert latents.shape == (4, 16, 16, 16)
        assert vae.decode(latents).shape == images.shape
    assert sum(p.numel() for p in vae.parameters()) * 4 < 1e6


def test_kl_to_latent_prior_vanishes_at_sd3_latent_statistics():
    mean = torch.full((2, 16, 4, 4), 0.0609)
    logvar = torch.full_like(mean, math.log(1 / 1.5305 ** 2))
    assert abs(encoders.kl_to_latent_prior(mean, logvar).item()) < 1e-6
    assert encoders.kl_to_latent_prior(mean + 1, logvar).item() > 0.5


def test_vae_training_is_seeded_and_its_loss_decreases():
    _, first = encoders.train_vae(iterations=2, batch_size=4, seed=1, progress=False)
    _, again = encoders.train_vae(iterations=2, batch_size=4, seed=1, progress=False)
    assert first == again
    vae, log = encoders.train_vae(iterations=30, batch_size=8, lr=3e-3, seed=0, progress=False)
    assert len(log) == 30 and set(log[0]) == {"step", "loss", "recon", "kl"}
    start = sum(r["recon"] for r in log[:5]) / 5
    end = sum(r["recon"] for r in log[-5:]) / 5
    assert end < 0.5 * start
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_pipeline_runs_the_toy_components_from_a_checkpoint(tmp_path, toy_tokenizer_dir):
    """The layout the demo model will ship in: FlashPipeline reads the toy tokenizer folder, the narrow encoders
    and the one-level VAE, and sizes latents by the VAE: 16 px <-> a 16x16 latent (64 image tokens)."""
    mmdit = randomize_(MMDiT(MMDiTConfig(depth=2, hidden_size=64, pos_embed_max_size=8)), seed=0)
    text = {slot: encoders.text_state_dict(m) for slot, m in encoders.make_text_encoders(0).items()}
    path = save_checkpoint(tmp_path / "toy.safetensors", mmdit=mmdit, vae=encoders.make_vae(), **text)
    pipe = FlashPipeline.from_checkpoint(path, tokenizers=toy_tokenizer_dir, device="cpu")
    for use_t5 in (True, False):
        images = pipe("a blue triangle at the top", steps=2, seed=0, width=world.IMAGE_SIZE,
                      height=world.IMAGE_SIZE, use_t5=use_t5, progress=False)
        assert images[0].size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert pipe.downscale_factor == 1
    cond = pipe.encode_prompt("a red circle at the top")
    latents = pipe.generate_latents(cond, seed=0, width=world.IMAGE_SIZE, height=world.IMAGE_SIZE, steps=2)
    assert latents.shape == (1, 16, encoders.LATENT_SIZE, encoders.LATENT_SIZE)
    assert encoders.COMFY_EMPTY_LATENT_SIZE // 8 == encoders.LATENT_SIZE  # ComfyUI's EmptySD3LatentImage


# -------------------------------------------------------------------------------------------- evaluator


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    feats = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    assert evaluator.frechet_distance(feats, feats) < 1e-8
    shift = torch.full((8,), 0.5)
    assert evaluator.frechet_distance(feats, feats + shift) == pytest.approx(8 * 0.25, rel=1e-9)
    distances = [evaluator.frechet_distance(feats, feats * (1 + s) + s) for s in (0.1, 0.3, 1.0)]
    assert distances == sorted(distances) and distances[0] > 0


def test_frechet_distance_equals_the_closed_form_for_two_gaussians():
    g = torch.Generator().manual_seed(1)
    var_a, var_b = torch.rand(6, generator=g).double() + 0.2, torch.rand(6, generator=g).double() + 0.2
    mu_a, mu_b = torch.randn(6, generator=g).double(), torch.randn(6, generator=g).double()
    closed = ((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum()
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    cov_a, cov_b = (rotation * var_a) @ rotation.T, (rotation * var_b) @ rotation.T
    exact = evaluator.frechet_distance_gaussian(rotation @ mu_a, cov_a, rotation @ mu_b, cov_b)
    assert exact == pytest.approx(closed.item(), rel=1e-9)
    # From samples: the fitted Gaussians give the same value up to sampling error.
    a = mu_a + torch.randn(40000, 6, generator=g, dtype=torch.float64) * var_a.sqrt()
    b = mu_b + torch.randn(40000, 6, generator=g, dtype=torch.float64) * var_b.sqrt()
    assert evaluator.frechet_distance(a, b) == pytest.approx(closed.item(), rel=0.05)


def test_paired_mse_and_attribute_accuracy():
    a = torch.zeros(2, 3, 4, 4)
    assert evaluator.paired_mse(a, a + 0.5) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="one shape"):
        evaluator.paired_mse(a, a[:1])
    labels = {"colour": torch.tensor([0, 1, 2, 3]), "size": torch.tensor([1, -1, 0, -1]),
              "background": torch.full((4,), -1)}
    pred = {"colour": torch.tensor([0, 1, 0, 3]), "size": torch.tensor([1, 1, 1, 0]),
            "background": torch.zeros(4, dtype=torch.long)}
    acc = evaluator.attribute_accuracy(pred, labels)
    assert acc == {"colour": 0.75, "size": 0.5, "all": 0.75}  # background applies nowhere: left out
    with pytest.raises(ValueError, match="no labelled attribute"):
        evaluator.attribute_accuracy(pred, {"background": torch.full((4,), -1)})
    assert evaluator.spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    # per asked shape, over both objects: circles asked 3 times (2 read as circles), squares once, no triangle
    shapes = {"shape": torch.tensor([0, 0, 1]), "shape_2": torch.tensor([-1, 0, -1])}
    drawn = {"shape": torch.tensor([0, 1, 1]), "shape_2": torch.tensor([2, 0, 0])}
    assert evaluator.shape_accuracy(drawn, shapes) == {"circle": pytest.approx(2 / 3), "square": 1.0}


@pytest.fixture(scope="module")
def tiny_classifier():
    return evaluator.train_classifier(iterations=60, batch_size=64, width=16, seed=0, progress=False)


def test_paired_bootstrap_interval_covers_a_tie_and_excludes_a_shift():
    torch.manual_seed(0)
    a = torch.randn(400)
    diff, low, high = evaluator.paired_bootstrap(a, a.clone(), lambda x: x.mean().item(), resamples=200)
    assert diff == low == high == 0.0  # the same samples resampled together: no spread at all
    diff, low, high = evaluator.paired_bootstrap(a + 0.5, a + 0.01 * torch.randn(400), lambda x: x.mean().item(),
                                                 resamples=200)
    assert 0 < low < diff < high and diff == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="one row per sample"):
        evaluator.paired_bootstrap(a, a[:10], lambda x: x.mean().item())


def test_classifier_is_well_above_chance_after_a_tiny_budget(tiny_classifier):
    classifier, log = tiny_classifier
    assert len(log) == 60 and not classifier.training
    held_out = world.sample(400, 99)
    acc = evaluator.attribute_accuracy(classifier.predict(held_out.images), held_out.labels)
    chance = {name: 1 / len(classes) for name, classes in world.ATTRIBUTES.items()}
    assert acc["layout"] > chance["layout"] + 0.3 and acc["colour"] > chance["colour"] + 0.3
    assert sum(acc[n] > chance[n] + 0.1 for n in world.ATTRIBUTES) >= 6
    assert classifier.features(held_out.images).shape == (400, evaluator.FEATURE_DIM)


def test_real_vs_real_floor_is_small_beside_a_real_difference(tiny_classifier):
    classifier = tiny_classifier[0]
    floor = evaluator.real_vs_real_floor(classifier, count_a=200, count_b=400, seed=0)
    real = world.sample_for_prompts(evaluator.repeat_prompts(world.EVAL_PROMPTS, 200), 1).images
    swapped = real[:, [2, 0, 1]]  # every colour changed, shapes and places kept
    assert 0 < floor < 0.5 * evaluator.frechet_distance(classifier.features(real), classifier.features(swapped))


@pytest.mark.slow
def test_ci_sized_vae_and_classifier_reach_working_quality():
    """The CI-sized versions of the build (about two minutes on one thread): a usable VAE and evaluator."""
    vae, _ = encoders.train_vae(iterations=150, batch_size=32, seed=0, progress=False)
    real = world.sample(512, 7)
    with torch.no_grad():
        latents = vae.encode(real.images)
        assert evaluator.paired_mse(vae.decode(latents), real.images) < 0.03
    model_space = process_in(latents)
    assert abs(model_space.mean()) < 0.5 and 0.5 < model_space.std() < 2.0
    classifier, _ = evaluator.train_classifier(iterations=150, batch_size=128, seed=0, progress=False)
    acc = evaluator.attribute_accuracy(classifier.predict(real.images), real.labels)
    assert acc["colour"] > 0.9 and acc["layout"] > 0.9 and acc["all"] > 0.3


def test_shape_regions_mark_where_the_shapes_differ_whatever_is_drawn():
    """``world.shape_region``: the pixels where a circle, a square and a triangle of one place and size differ
    (a square's corner, not the middle or the background), the same map whichever is drawn; asking for the
    regions draws the same images."""
    plain, with_regions = world.sample(200, 4), world.sample(200, 4, regions=True)
    assert plain.regions is None and torch.equal(plain.images, with_regions.images)
    regions = with_regions.regions
    assert regions.shape == (200, 1, 16, 16) and 0 <= regions.min() and regions.max() <= 1
    assert 0.03 < regions.mean() < 0.3  # a few corners and edges of each object
    centre, half = torch.tensor([8.0]), torch.tensor([3.5])
    region = world.shape_region(centre, centre, half)[0]
    assert region[5, 5] > 0.5 and region[8, 8] == 0 and region[0, 0] == 0  # corner, middle, background
    for shape in range(len(world.SHAPES)):  # the region does not depend on the shape drawn
        labels = {"layout": torch.tensor([0]), "colour": torch.tensor([0]), "shape": torch.tensor([shape]),
                  "size": torch.tensor([1]), "position": torch.tensor([4]), "colour_2": torch.tensor([-1]),
                  "shape_2": torch.tensor([-1]), "background": torch.tensor([0])}
        drawn = world._draw(labels, torch.Generator().manual_seed(0), regions=True)[1]
        if shape == 0:
            first = drawn
        assert torch.equal(drawn, first)
    pair = with_regions.labels["layout"] > 0
    left = regions[pair & (with_regions.labels["layout"] == 1)][..., :8].flatten(1).amax(1)
    right = regions[pair & (with_regions.labels["layout"] == 1)][..., 8:].flatten(1).amax(1)
    assert bool((left > 0.5).all() and (right > 0.5).all())  # both objects of a pair
