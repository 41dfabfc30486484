"""Quantized MM-DiTs in a real ComfyUI (nodes/quant_ops.py): the Flash loader's ``quantize`` input and quantized
files, ComfyUI's stock loader on our fp8 file, the Quantize MODEL node, LoRA on packed weights, memory, and the
refusal of malformed files. Tiny random-weight models on the CPU, fp32."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sd35_flash.flash_core.checkpoint import PREFIXES, FlashMetadata, atomic_save, read_metadata
from sd35_flash.flash_core.errors import CheckpointError, FlashError
from sd35_flash.flash_core.mmdit import MMDiT
from sd35_flash.flash_core.quant import (
    FORMATS,
    METADATA_KEY,
    SCALE_KEY,
    STORED_DTYPE,
    QuantScheme,
    linear_layers,
    quantize_module,
    quantize_state_dict,
    quantized_nbytes,
    write_schemes,
)

from factories import TINY_MMDIT, write_tiny_checkpoint

DENSE = "quant_dense.safetensors"
PROMPT = "a red circle at the top left"
# Relative RMS error of 4-step latents against the dense model's (measured: int8 0.002, fp8 0.005, int6 0.006,
# int4 0.02 on this model), with headroom.
LATENT_ERROR = {"int8": 0.01, "fp8": 0.03, "int6": 0.03, "int4": 0.08}
# The weight-byte goals against 16-bit weights, for the packed layers.
BYTES_VS_16BIT = {"int8": 0.53, "fp8": 0.53, "int6": 0.40, "int4": 0.28}
LORA_KEYS = ("joint_blocks.0.x_block.mlp.fc1", "joint_blocks.1.context_block.attn.qkv")


def quantized_name(fmt: str, exclude=None) -> str:
    return f"quant_{fmt}{'' if exclude is None else '_all'}.safetensors"


def write_quantized(source, target, fmt: str, exclude=None, edit=None):
    """``source`` with its MM-DiT packed by the engine (``quantize_state_dict``) and the scheme in the metadata,
    stored under ``model.diffusion_model.`` like every official single file."""
    tensors = load_file(str(source))
    prefix = PREFIXES["mmdit"]
    mmdit = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    with torch.device("meta"):
        names = list(linear_layers(MMDiT(TINY_MMDIT)))
    scheme = QuantScheme.default("mmdit", fmt, exclude=exclude)
    packed = quantize_state_dict(mmdit, names, scheme)
    if edit is not None:
        edit(packed)
    out = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    out.update({prefix + k: v for k, v in packed.items()})
    return atomic_save(out, target, {**read_metadata(source), **write_schemes({"mmdit": scheme})})


@pytest.fixture(scope="module")
def folder(comfy, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("quant") / "checkpoints"
    dense = write_tiny_checkpoint(root / DENSE, metadata=FlashMetadata(student_sigmas=[1.0, 0.9, 0.75, 0.5, 0.0]))
    for fmt in FORMATS:
        write_quantized(dense, root / quantized_name(fmt), fmt)
    write_quantized(dense, root / quantized_name("int4", ()), "int4", exclude=())
    for kind in ("checkpoints", "diffusion_models"):
        folder_paths.add_model_folder_path(kind, str(root))
    return root


def loader():
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    return ours["SD35FlashCheckpointLoader"]()


def quantize_node(model, fmt: str, group_size: int = 64):
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    return ours["SD35FlashQuantizeModel"]().quantize(model, fmt, group_size)[0]


@pytest.fixture(scope="module")
def dense(folder):
    """(MODEL, positive conditioning) of the 16-bit file, loaded in fp32."""
    import nodes

    with torch.inference_mode():
        model, clip, _ = loader().load(DENSE, "auto", "fp32")
        return model, nodes.CLIPTextEncode().encode(clip, PROMPT)[0]


def sample(model, cond, seed: int = 5) -> torch.Tensor:
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    latent = EmptySD3LatentImage.execute(width=64, height=64, batch_size=1)[0]
    with torch.inference_mode():
        return ours["SD35FlashSampler"]().sample(model, cond, latent, seed=seed, steps=4, cfg=1.0,
                                                 mode="euler")[0]["samples"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def packed_layers(model) -> dict:
    from sd35_flash.nodes.quant_ops import packed_modules

    return packed_modules(model.model.diffusion_model)


# ------------------------------------------------------------------------------------------------ (a) CLI parity


def test_flash_loader_int8_makes_the_engines_int8_image(folder, comfy_tokenizers):
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    import nodes
    from sd35_flash.flash_core.pipeline import FlashPipeline
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    with torch.inference_mode():  # as ComfyUI's executor runs every prompt
        model, clip, vae = loader().load(DENSE, "auto", "fp32", "int8")
        (positive,) = nodes.CLIPTextEncode().encode(clip, PROMPT)
        latent = EmptySD3LatentImage.execute(width=96, height=64, batch_size=1)[0]
        (samples,) = ours["SD35FlashSampler"]().sample(model, positive, latent, seed=7, steps=4, cfg=1.0,
                                                       mode="euler")
        (image,) = nodes.VAEDecode().decode(vae, samples)
    ours_image = np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8)  # as SaveImage writes it

    pipe = FlashPipeline.from_checkpoint(folder / DENSE, tokenizers=comfy_tokenizers, dtype="fp32", device="cpu")
    replaced = quantize_module(pipe.mmdit, QuantScheme.default("mmdit", "int8"))
    engine = np.asarray(pipe(PROMPT, steps=4, seed=7, width=96, height=64, mode="euler",
                             progress=False)[0].convert("RGB"))
    assert sorted(packed_layers(model)) == sorted(replaced)
    value = psnr(ours_image, engine)
    print(f"int8 ComfyUI vs engine: PSNR {value:.1f} dB")
    assert ours_image.shape == engine.shape == (64, 96, 3) and ours_image.std() > 5
    assert value >= 60.0


# ------------------------------------------------------------------------------------------------ (b) files, memory


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_file_loads_packed_and_samples_close_to_dense(dense, fmt):
    import comfy.model_management

    from sd35_flash.nodes.quant_ops import patcher_class

    dense_model, cond = dense
    with torch.inference_mode():
        model = loader().load(quantized_name(fmt), "off", "fp32")[0]
        on_load = loader().load(DENSE, "off", "fp32", fmt)[0]
    assert isinstance(model, patcher_class())
    layers = packed_layers(model)
    assert len(layers) == 29 and {m.weight.dtype for m in layers.values()} == {STORED_DTYPE[fmt]}
    assert not hasattr(model.model.diffusion_model.context_embedder, SCALE_KEY[fmt])  # excluded: 16-bit

    out = sample(model, cond)
    assert torch.isfinite(out).all()
    error = rel(out, sample(dense_model, cond))
    print(f"{fmt}: latent error {error:.4f}")
    assert error <= LATENT_ERROR[fmt]
    assert torch.allclose(sample(on_load, cond), out, atol=1e-6)  # quantize on load == the quantized file

    # Memory: the model holds the packed bytes, and ComfyUI's accounting sees them.
    packed = sum(t.numel() * t.element_size() for m in layers.values() for t in (m.weight, m.scale))
    assert packed == sum(quantized_nbytes((m.out_features, m.in_features), fmt) for m in layers.values())
    logical = sum(m.out_features * m.in_features for m in layers.values())
    assert packed / (2 * logical) <= BYTES_VS_16BIT[fmt]
    linear_fp32 = 4 * logical
    assert dense_model.model_size() - model.model_size() == pytest.approx(linear_fp32 - packed, rel=1e-6)
    comfy.model_management.load_models_gpu([model])
    assert model.loaded_size() == model.model_size()


def test_int4_file_with_embedders_packed_still_detects_as_sd3(dense):
    dense_model, cond = dense
    with torch.inference_mode():
        model = loader().load(quantized_name("int4", ()), "auto", "fp32")[0]
    diffusion = model.model.diffusion_model
    assert diffusion.context_embedder.weight.dtype == torch.float32  # unpacked for ComfyUI's detection
    assert diffusion.final_layer.linear.weight.dtype == torch.uint8  # read for its output width only
    assert rel(sample(model, cond), sample(dense_model, cond)) <= LATENT_ERROR["int4"]


# ------------------------------------------------------------------------------------------------ (c) stock loader


def test_stock_unet_loader_reads_our_fp8_file(dense):
    import nodes

    dense_model, cond = dense
    with torch.inference_mode():
        (model,) = nodes.UNETLoader().load_unet(quantized_name("fp8"), "default")
    qkv = model.model.diffusion_model.joint_blocks[0].x_block.attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and float(qkv.scale_weight) != 1.0  # ComfyUI's scaled fp8
    out = sample(model, cond)
    error = rel(out, sample(dense_model, cond))
    print(f"stock fp8 loader: latent error {error:.4f}")
    assert torch.isfinite(out).all() and error <= 0.1


# ------------------------------------------------------------------------------------------------ (d) Quantize MODEL


def lora(model, scale: float = 0.05):
    """A rank-4 LoRA in ComfyUI's key format on two MM-DiT Linears."""
    import comfy.sd

    g = torch.Generator().manual_seed(0)
    weights = {}
    for key in LORA_KEYS:
        out_features, in_features = model.model.diffusion_model.get_submodule(key).weight.shape[0], 192
        weights[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(out_features, 4, generator=g) * scale
        weights[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(4, in_features, generator=g)
    patched, _ = comfy.sd.load_lora_for_models(model, None, weights, 1.0, 0.0)
    assert {f"diffusion_model.{k}.weight" for k in LORA_KEYS} <= set(patched.patches)
    return patched


def test_quantize_model_is_close_and_carries_the_models_state(dense):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    from sd35_flash.nodes.attributes import QUANT_ATTRIBUTE
    from sd35_flash.nodes.native import flash_metadata

    dense_model, cond = dense
    with torch.inference_mode():
        shifted = ModelSamplingSD3().patch(dense_model, 6.0)[0]
        quantized = quantize_node(shifted, "int4", 32)
    assert quantized.get_model_object("model_sampling").shift == 6.0
    assert flash_metadata(quantized).student_sigmas == flash_metadata(dense_model).student_sigmas
    assert getattr(quantized.model, QUANT_ATTRIBUTE)["group_size"] == 32
    assert {m.scale.shape[1] for m in packed_layers(quantized).values()} == {192 // 32, 768 // 32}
    assert quantized.model_size() < dense_model.model_size()
    assert rel(sample(quantized, cond), sample(shifted, cond)) <= LATENT_ERROR["int4"]
    with torch.inference_mode():
        twice = quantize_node(quantize_node(dense_model, "int8"), "int8")  # a quantized input is dequantized first
    assert rel(sample(twice, cond), sample(dense_model, cond)) <= 2 * LATENT_ERROR["int8"]


def test_lora_changes_the_quantized_model_as_it_changes_the_dense_one(dense):
    dense_model, cond = dense
    with torch.inference_mode():
        quantized = quantize_node(dense_model, "int8")
        patched_before = quantize_node(lora(dense_model), "int8")  # LoRA applied first: carried as a patch
        quantized_lora = lora(quantized)
    packed = packed_layers(quantized)[LORA_KEYS[0]].weight.clone()
    base, with_lora = sample(dense_model, cond), sample(lora(dense_model), cond)
    q_base, q_lora = sample(quantized, cond), sample(quantized_lora, cond)
    assert rel(with_lora, base) > 0.02  # the LoRA visibly changes the image
    assert rel(q_lora - q_base, with_lora - base) <= 0.05
    assert torch.allclose(sample(patched_before, cond), q_lora, atol=1e-5)
    assert torch.equal(packed_layers(quantized)[LORA_KEYS[0]].weight, packed)  # never merged
    assert torch.equal(sample(quantized, cond), q_base)  # unpatched again after the LoRA model ran


def test_lora_on_packed_weights_in_low_vram_and_partial_loads(dense):
    import comfy.model_management

    dense_model, cond = dense
    with torch.inference_mode():
        patched = lora(quantize_node(dense_model, "int4"))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")

    def velocity(lowvram_bytes: int = 0, unload_after: bool = False) -> torch.Tensor:
        comfy.model_management.unload_all_models()
        patched.patch_model(device_to=cpu, lowvram_model_memory=lowvram_bytes)
        try:
            if unload_after:
                patched.partially_unload(cpu, memory_to_free=patched.model_size())
            with torch.inference_mode():
                return patched.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond[0][0],
                                                 y=cond[0][1]["pooled_output"])
        finally:
            patched.unpatch_model(cpu)

    full = velocity()
    module = packed_layers(patched)[LORA_KEYS[0]]
    assert module.weight_function == []  # lazy patches are taken off again on unpatch
    assert torch.allclose(velocity(lowvram_bytes=1), full, atol=1e-5)  # ComfyUI's own LowVramPatch path
    assert torch.allclose(velocity(unload_after=True), full, atol=1e-5)  # patch attached twice, applied once
    with torch.inference_mode():
        no_lora = quantize_node(dense_model, "int4")
    comfy.model_management.unload_all_models()
    no_lora.patch_model(device_to=cpu)
    try:
        with torch.inference_mode():
            plain = no_lora.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond[0][0],
                                              y=cond[0][1]["pooled_output"])
    finally:
        no_lora.unpatch_model(cpu)
    assert not torch.allclose(plain, full, atol=1e-4)


# ------------------------------------------------------------------------------------------------ (e) refusals


def test_malformed_quantized_file_is_refused_naming_the_key(folder):
    key = "joint_blocks.0.x_block.attn.qkv.weight_scale"

    def bad_scale(packed):
        packed[key] = torch.ones(5)

    write_quantized(folder / DENSE, folder / "bad_scale.safetensors", "int8", edit=bad_scale)
    with pytest.raises(CheckpointError, match=rf"bad_scale\.safetensors.*'{key}' has shape \[5\], expected \[576\]"):
        loader().load("bad_scale.safetensors", "auto", "fp32")


def test_refusals_say_what_to_do(folder):
    with pytest.raises(FlashError, match="stores the mmdit in int8.*cannot be re-quantized to int4"):
        loader().load(quantized_name("int8"), "auto", "fp32", "int4")
    tensors = load_file(str(folder / quantized_name("int8")))
    metadata = read_metadata(folder / quantized_name("int8"))
    atomic_save(tensors, folder / "no_metadata.safetensors", {k: v for k, v in metadata.items() if k != METADATA_KEY})
    with pytest.raises(CheckpointError, match=r"no_metadata.*quantized layers \(e\.g\. '.*weight_scale'\) but no"):
        loader().load("no_metadata.safetensors", "auto", "fp32")
    t5 = PREFIXES["t5"] + "encoder.block.0.layer.0.SelfAttention.q"
    bad = {**tensors, f"{t5}.weight_scale": torch.ones(3)}  # a T5 scale that fits no packed weight
    schemes = {**json.loads(metadata[METADATA_KEY]), "t5": {"format": "int8", "layers": 1, "exclude": []}}
    atomic_save(bad, folder / "t5_bad.safetensors", {**metadata, METADATA_KEY: json.dumps(schemes)})
    # the stored scheme is checked against the tensors before anything loads (issue 13: metadata is untrusted)
    with pytest.raises(CheckpointError,
                       match=r"t5_bad\.safetensors.*SelfAttention\.q\.weight' is torch\.float32, expected torch\.int8"):
        loader().load("t5_bad.safetensors", "on", "fp32")
    with pytest.raises(FlashError, match="SD3 / SD3.5 model"):
        from types import SimpleNamespace

        quantize_node(SimpleNamespace(model=torch.nn.Module()), "int8")


def test_a_quantized_t5_loads_unpacked_and_encodes_like_the_float_one(folder):
    import nodes
    from sd35_flash.flash_core.cli import main

    target = folder / "quant_t5_int8.safetensors"
    assert main(["quantize", str(folder / DENSE), str(target), "--format", "int8", "--t5", "int8", "-q"]) == 0
    with torch.inference_mode():
        clip_dense = loader().load(DENSE, "on", "fp32")[1]
        clip_quant = loader().load(target.name, "on", "fp32")[1]
        dense_cond = nodes.CLIPTextEncode().encode(clip_dense, PROMPT)[0][0][0]
        quant_cond = nodes.CLIPTextEncode().encode(clip_quant, PROMPT)[0][0][0]
    assert dense_cond.shape == quant_cond.shape and not torch.equal(dense_cond, quant_cond)
    assert rel(quant_cond, dense_cond) < 0.02
