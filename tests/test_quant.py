"""Weight-only quantization: formats against a reference round trip, files, loading, backends, memory tiers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35_flash.flash_core import quant
from sd35_flash.flash_core.checkpoint import (
    CheckpointError,
    index_checkpoint,
    load_mmdit,
    read_metadata,
)
from sd35_flash.flash_core.cli import main
from sd35_flash.flash_core.errors import FlashError
from sd35_flash.flash_core.memory import GIB, Tier, parse_budget, plan_memory
from sd35_flash.flash_core.pipeline import FlashPipeline
from sd35_flash.flash_core.text import build_t5

from factories import tiny_mmdit, tiny_t5, write_tiny_checkpoint

# Velocity error of the tiny random model vs its fp32 self, per format (measured 0.8 %, 3.6 %, 3.0 %, 15 %).
VELOCITY_BOUND = {"int8": 0.015, "fp8": 0.06, "int6": 0.05, "int4": 0.25}


def _weight(shape=(48, 192), seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    if outliers:
        w[3, 7] = 1.5  # one large weight: per-channel / per-group scales must contain it
    w[5] = 0.0         # an all-zero row: scales never divide by zero
    return w


def reference_round_trip(w: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """The formats' definitions written plainly (loops over groups, no packing)."""
    if fmt == "fp8":
        s = max(w.abs().max().item() / quant.FP8_MAX, quant.MIN_SCALE)
        return (w / s).to(torch.float8_e4m3fn).float() * s
    qmax = quant.QMAX[fmt]
    out = torch.empty_like(w)
    if fmt == "int8":
        for r in range(w.shape[0]):
            s = max(w[r].abs().max().item() / qmax, quant.MIN_SCALE)
            out[r] = torch.round(w[r] / s).clamp(-qmax, qmax) * s
        return out
    group = quant.layer_group(w.shape[1], group_size)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            chunk = w[r, c:c + group]
            s = torch.tensor(max(chunk.abs().max().item() / qmax, quant.MIN_SCALE)).half().float()
            out[r, c:c + group] = torch.round(chunk / s).clamp(-qmax, qmax) * s
    return out


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_dequantize_matches_the_reference_round_trip(fmt):
    w = _weight()
    qw = quant.quantize_weight(w, fmt, group_size=64)
    torch.testing.assert_close(quant.dequantize(qw), reference_round_trip(w, fmt, 64), rtol=0, atol=1e-7)
    assert qw.data.dtype == quant.STORED_DTYPE[fmt] and qw.shape == tuple(w.shape)


@pytest.mark.parametrize("fmt", ["int8", "int6", "int4"])
def test_integer_error_is_at_most_half_a_step(fmt):
    w = _weight(seed=1)
    qw = quant.quantize_weight(w, fmt, group_size=32)
    scale = qw.scale.float()
    step = scale[:, None].expand_as(w) if fmt == "int8" else scale.repeat_interleave(32, dim=1)
    assert ((quant.dequantize(qw) - w).abs() <= step / 2 + 1e-7).all()


def test_fp8_error_is_half_an_ulp():
    w = _weight(seed=2)
    qw = quant.quantize_weight(w, "fp8")
    scaled = w.abs() / qw.scale
    bound = torch.where(scaled >= 2.0**-6, scaled * 2.0**-4, torch.full_like(scaled, 2.0**-10)) * qw.scale
    assert ((quant.dequantize(qw) - w).abs() <= bound + 1e-9).all()


@pytest.mark.parametrize("fmt", ["int6", "int4"])
def test_packing_is_lossless_and_self_describing(fmt):
    g = torch.Generator().manual_seed(3)
    top = 64 if fmt == "int6" else 16
    u = torch.randint(0, top, (7, 24), generator=g, dtype=torch.uint8)
    packed = quant.pack_int6(u) if fmt == "int6" else quant.pack_int4(u)
    assert packed.shape[1] == 24 * quant.BITS[fmt] // 8
    assert quant.logical_in_features(fmt, packed.shape[1]) == 24
    assert torch.equal(quant.unpack_int6(packed) if fmt == "int6" else quant.unpack_int4(packed), u)


def test_group_is_the_gcd_of_group_size_and_width():
    qw = quant.quantize_weight(_weight((8, 96)), "int4", group_size=64)  # gcd(64, 96) = 32
    assert qw.scale.shape == (8, 3)
    assert quant.quantize_weight(_weight((8, 96)), "int4", group_size=0).scale.shape == (8, 1)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_nbytes_from_shape_equals_the_stored_bytes(fmt):
    qw = quant.quantize_weight(_weight((40, 192)), fmt, group_size=64)
    assert quant.quantized_nbytes((40, 192), fmt, 64) == qw.nbytes
    ratio = qw.nbytes / (40 * 192 * 2)  # vs bf16
    assert ratio <= {"int8": 0.53, "fp8": 0.51, "int6": 0.40, "int4": 0.28}[fmt]


def test_bad_requests_are_refused():
    with pytest.raises(quant.QuantError, match="'int3' is not one of"):
        quant.quantize_weight(_weight(), "int3")
    with pytest.raises(quant.QuantError, match="whole bytes"):
        quant.quantize_weight(torch.randn(4, 6), "int6")
    with pytest.raises(quant.QuantError, match="2-D"):
        quant.quantize_weight(torch.randn(4, 4, 4), "int8")


# ------------------------------------------------------------------------------------------------ modules


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantized_linear_runs_the_dequantized_weight(fmt):
    layer = torch.nn.Linear(128, 64)
    holder = torch.nn.Sequential(layer)
    dense = layer.weight.detach().clone()
    names = quant.quantize_module(holder, quant.QuantScheme(fmt))
    assert names == ["0"] and isinstance(holder[0], quant.QuantizedLinear)
    x = torch.randn(3, 5, 128)
    expected = torch.nn.functional.linear(x, quant.dequantize(quant.quantize_weight(dense, fmt)), layer.bias)
    torch.testing.assert_close(holder(x), expected)


def test_int8mm_backend_agrees_with_dequant():
    holder = torch.nn.Sequential(torch.nn.Linear(128, 64))
    quant.quantize_module(holder, quant.QuantScheme("int8"))
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    reference = holder(x).float()
    quant.set_backend(holder, "int8mm")
    assert holder[0].backend == "int8mm"
    assert quant.relative_rms_error(reference, holder(x).float()) < 0.01


def test_dtype_casts_keep_the_packed_tensors():
    holder = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quant.quantize_module(holder, quant.QuantScheme("fp8"))
    holder.to(torch.bfloat16)
    assert holder[0].weight.dtype == torch.float8_e4m3fn and holder[0].scale.dtype == torch.float32
    assert holder[0].bias.dtype == torch.bfloat16


def test_default_scheme_keeps_embedders_and_final_layer():
    model = tiny_mmdit()
    names = quant.quantize_module(model, quant.QuantScheme.default("mmdit", "int8"))
    assert names and not any(n.startswith(("x_embedder", "t_embedder", "y_embedder", "context_embedder",
                                           "final_layer")) for n in names)
    assert isinstance(model.final_layer.linear, torch.nn.Linear)
    assert isinstance(model.joint_blocks[0].x_block.attn.qkv, quant.QuantizedLinear)


def test_backend_choice_is_measured_or_requested():
    choice = quant.choose_backend("int8", "cpu", torch.bfloat16, width=256)
    assert set(choice.timings_ms) == set(quant.available_backends("int8", torch.device("cpu"))) >= {"dequant", "int8mm"}
    assert choice.backend == min(choice.timings_ms, key=choice.timings_ms.get)
    assert quant.choose_backend("int6", "cpu", torch.float32).backend == "dequant"
    assert quant.choose_backend("int8", "cpu", torch.float32, requested="dequant").reason == "requested"
    with pytest.raises(quant.QuantError, match="cannot run int6"):
        quant.choose_backend("int6", "cpu", torch.float32, requested="int8mm")


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def checkpoint(module_tmp):
    return write_tiny_checkpoint(module_tmp("quant") / "tiny.safetensors")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 16, 8, 8, generator=g), torch.tensor([500.0, 800.0]),
            torch.randn(2, 7, 4096, generator=g), torch.randn(2, 2048, generator=g))


@pytest.fixture(scope="module")
def quantized_files(checkpoint, module_tmp):
    folder = module_tmp("quantized")
    out = {}
    for fmt in quant.FORMATS:
        out[fmt] = folder / f"tiny_{fmt}.safetensors"
        assert main(["quantize", str(checkpoint), str(out[fmt]), "--format", fmt, "--t5", "int8", "-q"]) == 0
    return out


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantized_file_reloads_alone_and_stays_close(fmt, checkpoint, quantized_files, inputs):
    dense = load_mmdit(checkpoint)
    model = load_mmdit(quantized_files[fmt])  # the 16-bit file is not read
    assert quant.quantized_layers(model)
    error = quant.relative_rms_error(dense(*inputs), model(*inputs))
    assert error < VELOCITY_BOUND[fmt], f"{fmt}: velocity error {error:.4f}"


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_file_layout_and_metadata(fmt, quantized_files):
    path = quantized_files[fmt]
    meta = json.loads(read_metadata(path)[quant.METADATA_KEY])
    assert meta["mmdit"]["format"] == fmt and meta["mmdit"]["layers"] == 29 and meta["t5"]["format"] == "int8"
    sd = load_file(str(path))
    qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
    assert sd[f"{qkv}.weight"].dtype == quant.STORED_DTYPE[fmt]
    assert f"{qkv}.{quant.SCALE_KEY[fmt]}" in sd
    if fmt == "fp8":  # ComfyUI's scaled-fp8 layout: the marker and the table its detection reads
        assert "model.diffusion_model.scaled_fp8" in sd and "model.diffusion_model.pos_embed" in sd
    else:             # the sin-cos table is rebuilt on load
        assert "model.diffusion_model.pos_embed" not in sd and meta["mmdit"]["pos_embed"]["table"] == "sincos"


def test_a_learned_pos_embed_is_kept(tmp_path):
    model = tiny_mmdit()
    with torch.no_grad():
        model.pos_embed.add_(0.01 * torch.randn_like(model.pos_embed))
    sd = {k: v for k, v in model.state_dict().items()}
    scheme = quant.QuantScheme.default("mmdit", "int8")
    assert "pos_embed" in quant.elide_pos_embed(sd, scheme) and "pos_embed" not in scheme.extra


def test_quantized_t5_encodes_close_to_the_float_one():
    t5 = tiny_t5()
    sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    scheme = quant.QuantScheme.default("t5", "int8")
    linears = list(quant.linear_layers(t5))
    packed = quant.quantize_state_dict(sd, linears, scheme)
    model = build_t5(packed, quant_scheme=scheme)
    assert len(quant.quantized_layers(model)) == len(linears) == scheme.layers
    ids = torch.randint(0, 100, (2, 9))
    error = quant.relative_rms_error(t5(ids).last_hidden_state, model(ids).last_hidden_state)
    assert error < 0.02


def test_generate_from_a_quantized_file_and_quantize_on_load(checkpoint, quantized_files, tokenizers_dir, tmp_path):
    args = ["--prompt", "a red circle", "--width", "64", "--height", "64", "--tokenizers", str(tokenizers_dir), "-q"]
    assert main(["generate", "--checkpoint", str(quantized_files["int4"]), "--out", str(tmp_path / "a.png"),
                 *args]) == 0
    assert main(["generate", "--checkpoint", str(checkpoint), "--weights", "int8", "--out",
                 str(tmp_path / "b.png"), *args]) == 0
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_quantize_on_load_equals_loading_the_quantized_file(checkpoint, quantized_files, inputs, tokenizers_dir):
    on_load = FlashPipeline.from_checkpoint(checkpoint, tokenizers=tokenizers_dir, weights="int6", dtype="fp32",
                                            device="cpu", quant_backend="dequant")
    from_file = load_mmdit(quantized_files["int6"])
    torch.testing.assert_close(on_load.mmdit(*inputs), from_file(*inputs))
    assert on_load.quant_report["mmdit"].startswith("int6, 29 layers")


def test_a_quantized_file_is_not_requantized(quantized_files, tokenizers_dir):
    with pytest.raises(FlashError, match="stores the mmdit in int8; it cannot be re-quantized to int4"):
        FlashPipeline.from_checkpoint(quantized_files["int8"], tokenizers=tokenizers_dir, weights="int4")


def _malform(src, dst, edit):
    sd = load_file(str(src))
    edit(sd)
    save_file(sd, str(dst), metadata=read_metadata(src))
    return dst


QKV = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
MALFORMED = {
    "scale of the wrong shape": ("int4", lambda sd: sd.update({f"{QKV}.weight_scale": torch.ones(5, 3).half()}),
                                 "'joint_blocks.0.x_block.attn.qkv.weight_scale' has shape \\[5, 3\\]"),
    "scale of the wrong dtype": ("int8", lambda sd: sd.update({f"{QKV}.weight_scale": torch.ones(576).half()}),
                                 "weight_scale' is torch.float16, expected torch.float32"),
    "weight of the wrong dtype": ("int8", lambda sd: sd.update({f"{QKV}.weight": torch.ones(576, 192)}),
                                  "qkv.weight' is torch.float32, expected torch.int8"),
    "scale without its weight": ("int8", lambda sd: sd.pop(f"{QKV}.weight"),
                                 "has no packed weight 'joint_blocks.0.x_block.attn.qkv.weight'"),
    "int6 width": ("int6", lambda sd: sd.update({f"{QKV}.weight": torch.zeros(576, 145, dtype=torch.uint8)}),
                   "145 packed columns"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_quantized_file_is_refused_with_the_key(case, quantized_files, tmp_path):
    fmt, edit, message = MALFORMED[case]
    bad = _malform(quantized_files[fmt], tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        load_mmdit(bad)


def test_packed_layers_without_metadata_are_refused(quantized_files, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(quantized_files["int8"])), str(bad))  # metadata dropped
    with pytest.raises(CheckpointError, match="quantized layers .* but no 'sd35_flash.quantization' metadata"):
        load_mmdit(bad)


def test_unknown_format_in_metadata_is_refused(quantized_files, tmp_path):
    bad = tmp_path / "bad.safetensors"
    meta = {**read_metadata(quantized_files["int8"]), quant.METADATA_KEY: json.dumps({"mmdit": {"format": "int3"}})}
    save_file(load_file(str(quantized_files["int8"])), str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="entry 'mmdit' needs a format"):
        load_mmdit(bad)


def test_quantize_cli_errors_are_one_line(checkpoint, quantized_files, tmp_path, capsys):
    assert main(["quantize", str(quantized_files["int8"]), str(tmp_path / "x.safetensors"), "--format", "int4"]) == 2
    assert "already quantized (int8)" in capsys.readouterr().err
    assert main(["quantize", str(checkpoint), str(tmp_path / "x.bin"), "--format", "int4"]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_info_names_the_format_and_the_backend(quantized_files, capsys):
    assert main(["info", str(quantized_files["int8"])]) == 0
    out = capsys.readouterr().out
    assert "MM-DiT quantization: int8, 29 layers; runs here (cpu) through" in out
    assert "T5-XXL quantization: int8, 14 layers" in out
    assert "depth: 3" in out  # the architecture is still read from the packed headers


# ------------------------------------------------------------------------------------------------ memory tiers


def test_memory_tiers_step_down_as_the_budget_shrinks(checkpoint):
    files = index_checkpoint(checkpoint)
    kw = {"dtype": torch.float32, "width": 64, "height": 64}
    roomy = plan_memory(files, 10 * GIB, **kw)
    assert roomy.tier == Tier(None, "dtype", False)
    budgets = {}
    for tier in (Tier(None, "dtype", True), Tier(None, "int8", True), Tier(None, "off", True),
                 Tier("int8", "off", True), Tier("int4", "off", True)):
        from sd35_flash.flash_core.memory import activation_bytes, estimate

        acts = activation_bytes(files, width=64, height=64, batch=1, cfg=1.0, use_t5=tier.t5 != "off")
        budgets[tier] = estimate(files, tier, dtype=torch.float32, activations=acts).peak
    peaks = list(budgets.values())
    assert peaks == sorted(peaks, reverse=True), "every tier is leaner than the one before"
    for peak in peaks:  # the first tier (in the planner's order) that fits
        assert plan_memory(files, peak, **kw).tier == next(t for t, p in budgets.items() if p <= peak)
    with pytest.raises(FlashError, match="no memory plan fits"):
        plan_memory(files, min(peaks) - 1, **kw)


def test_memory_budget_parsing():
    assert parse_budget("1.5", torch.device("cpu")) == int(1.5 * GIB)
    assert parse_budget("auto", torch.device("cpu")) > 0
    for bad in ("lots", "-1", "0", "nan"):
        with pytest.raises(FlashError, match="--memory"):
            parse_budget(bad, torch.device("cpu"))


def test_generate_with_a_tight_budget_drops_t5_and_offloads(checkpoint, tokenizers_dir, tmp_path, capsys):
    files = index_checkpoint(checkpoint)
    from sd35_flash.flash_core.memory import activation_bytes, estimate

    acts = activation_bytes(files, width=64, height=64, batch=1, cfg=1.0, use_t5=False)
    budget = estimate(files, Tier(None, "off", True), dtype=torch.float32, activations=acts).peak
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a cat", "--width", "64", "--height",
                 "64", "--tokenizers", str(tokenizers_dir), "-q", "--memory", str(budget / GIB),
                 "--out", str(tmp_path / "m.png")]) == 0
    err = capsys.readouterr().err
    assert "memory plan: MM-DiT as stored, T5 off (77 CLIP tokens), parts released after use" in err
    assert "estimated peak" in err and (tmp_path / "m.png").exists()


def test_offloaded_pipeline_makes_the_same_image(checkpoint, tokenizers_dir):
    kw = {"tokenizers": tokenizers_dir, "dtype": "fp32", "device": "cpu"}
    resident = FlashPipeline.from_checkpoint(checkpoint, **kw)
    offloaded = FlashPipeline.from_checkpoint(checkpoint, offload=True, **kw)
    args = {"seed": 3, "width": 64, "height": 64, "progress": False}
    a, b = resident("a dog", **args)[0], offloaded("a dog", **args)[0]
    assert a.tobytes() == b.tobytes()
    assert all(slot.module is None for slot in offloaded.slots.values()), "every part was released"


@pytest.mark.skipif(not quant.quanto_available(), reason="optimum-quanto is not installed (pip install '.[quanto]')")
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quanto_backend_runs_our_weights(fmt):
    holder = torch.nn.Sequential(torch.nn.Linear(256, 128))
    quant.quantize_module(holder, quant.QuantScheme(fmt))
    x = torch.randn(4, 256)
    reference = holder(x)
    quant.set_backend(holder, "quanto", torch.float32)
    assert type(holder[0]).__name__ == "QLinear"
    assert quant.relative_rms_error(reference, holder(x)) < 0.01
