"""Specification of the MM-DiT: config inference, strict loading, shapes, dtypes and errors."""

from __future__ import annotations

import pytest
import torch

from sd35_flash.flash_core import mmdit
from sd35_flash.flash_core.errors import CheckpointError
from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig, count_parameters, timestep_embedding

SMALL = MMDiTConfig(
    depth=3,
    hidden_size=128,
    pos_embed_max_size=16,
    adm_in_channels=32,
    context_in_channels=48,
    dual_attention_layers=(0,),
)


def randomise(model: MMDiT, seed: int = 0) -> MMDiT:
    """Every parameter random (adaLN and final layer are zero-init, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith(("ln_q.weight", "ln_k.weight")) else 0.1 * noise)
    return model


def inputs(
    config: MMDiTConfig, batch: int = 2, height: int = 12, width: int = 8, tokens: int = 7, seed: int = 1
):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, height, width, generator=gen)
    t = torch.linspace(900.0, 100.0, batch)
    context = torch.randn(batch, tokens, config.context_in_channels, generator=gen)
    y = torch.randn(batch, config.adm_in_channels, generator=gen)
    return x, t, context, y


def test_config_is_inferred_from_an_official_state_dict():
    sd = MMDiT(SMALL).state_dict()
    assert MMDiTConfig.from_state_dict(sd) == SMALL
    plain = MMDiTConfig(depth=2, hidden_size=64, pos_embed_max_size=8, qk_norm=False, adm_in_channels=16)
    assert MMDiTConfig.from_state_dict(MMDiT(plain).state_dict()) == plain


def test_released_shapes_and_heads():
    medium, large = MMDiTConfig.sd35_medium(), MMDiTConfig.sd35_large()
    assert (medium.depth, medium.hidden_size, medium.num_heads, medium.pos_embed_max_size) == (
        24,
        1536,
        24,
        384,
    )
    assert medium.dual_attention_layers == tuple(range(13)) and medium.qk_norm
    assert (large.depth, large.hidden_size, large.num_heads, large.pos_embed_max_size) == (38, 2432, 38, 192)
    assert large.dual_attention_layers == () and large.qk_norm


def test_medium_state_dict_has_the_official_key_hints():
    with torch.device("meta"):
        model = MMDiT(MMDiTConfig.sd35_medium())
    sd = model.state_dict()
    assert sd["joint_blocks.0.context_block.adaLN_modulation.1.bias"].shape == (9216,)
    assert sd["pos_embed"].shape == (1, 147456, 1536)
    assert sd["joint_blocks.23.context_block.adaLN_modulation.1.weight"].shape == (2 * 1536, 1536)
    assert "joint_blocks.23.context_block.attn.proj.weight" not in sd
    assert "joint_blocks.23.context_block.mlp.fc1.weight" not in sd
    assert (
        "joint_blocks.12.x_block.attn2.ln_k.weight" in sd
        and "joint_blocks.13.x_block.attn2.qkv.weight" not in sd
    )
    assert MMDiTConfig.from_state_dict(sd) == MMDiTConfig.sd35_medium()


def test_config_round_trips_through_a_json_dict():
    import json

    d = json.loads(json.dumps(SMALL.to_dict()))
    assert MMDiTConfig.from_dict(d) == SMALL


def test_strict_load_of_an_official_state_dict_reproduces_the_model():
    source = randomise(MMDiT(SMALL))
    target = MMDiT(MMDiTConfig.from_state_dict(source.state_dict()))
    target.load_state_dict(source.state_dict(), strict=True)
    x, t, context, y = inputs(SMALL)
    with torch.no_grad():
        assert torch.equal(source(x, t, context, y), target(x, t, context, y))


def test_pos_embed_is_a_persistent_state_dict_entry():
    model = MMDiT(SMALL)
    assert model.state_dict()["pos_embed"].shape == (1, 16 * 16, 128)
    assert "pos_embed" not in dict(model.named_parameters())


@pytest.mark.parametrize("height,width", [(12, 8), (6, 10), (2, 2), (32, 32)])
def test_velocity_has_the_latent_shape_for_non_square_and_odd_patch_counts(height, width):
    model = randomise(MMDiT(SMALL))
    x, t, context, y = inputs(SMALL, height=height, width=width)
    with torch.no_grad():
        v = model(x, t, context, y)
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()


def test_batch_elements_are_independent():
    model = randomise(MMDiT(SMALL))
    x, t, context, y = inputs(SMALL, batch=2)
    with torch.no_grad():
        both = model(x, t, context, y)
        second = model(x[1:], t[1:], context[1:], y[1:])
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)


def test_scalar_timestep_is_broadcast():
    model = randomise(MMDiT(SMALL))
    x, _, context, y = inputs(SMALL)
    with torch.no_grad():
        assert torch.equal(
            model(x, torch.tensor(500.0), context, y), model(x, torch.full((2,), 500.0), context, y)
        )


def test_grad_mode_matches_inference_mode_and_every_parameter_gets_a_gradient():
    model = randomise(MMDiT(SMALL))
    x, t, context, y = inputs(SMALL)
    with torch.inference_mode():
        fast = model(x, t, context, y)
    slow = model(x, t, context, y)
    torch.testing.assert_close(slow.detach(), fast, atol=1e-5, rtol=1e-5)
    slow.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("fp32_matmul", [None, False], ids=["auto-matmul", "native-half-matmul"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_runs_and_stays_finite(dtype, fp32_matmul, monkeypatch):
    monkeypatch.setattr(mmdit, "CPU_HALF_MATMUL_IN_FP32", fp32_matmul)
    reference = randomise(MMDiT(SMALL))
    model = MMDiT(SMALL, dtype=dtype)
    model.load_state_dict(reference.state_dict())
    assert model.dtype == dtype
    x, t, context, y = inputs(SMALL)
    with torch.no_grad():
        v = model(x.to(dtype), t, context.to(dtype), y.to(dtype))
        v32 = reference(x, t, context, y)
    assert v.dtype == dtype and torch.isfinite(v).all()
    assert (v.float() - v32).abs().max() < 0.1 * v32.abs().max()


def test_float32_inputs_to_a_half_model_come_back_in_float32():
    model = MMDiT(SMALL, dtype=torch.bfloat16)
    x, t, context, y = inputs(SMALL)
    with torch.no_grad():
        assert model(x, t, context, y).dtype == torch.float32


def test_latent_larger_than_the_positional_table_is_refused():
    model = MMDiT(SMALL)
    x, t, context, y = inputs(SMALL, height=34, width=8)
    with pytest.raises(ValueError, match="larger than the positional table"):
        model(x, t, context, y)


def test_latent_not_a_multiple_of_the_patch_is_refused():
    model = MMDiT(SMALL)
    x, t, context, y = inputs(SMALL, height=7, width=8)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x, t, context, y)


def test_fresh_model_predicts_zero_velocity():
    """A freshly built model (zero-init adaLN and final layer) predicts exactly zero velocity."""
    x, t, context, y = inputs(SMALL)
    with torch.no_grad():
        assert torch.equal(MMDiT(SMALL)(x, t, context, y), torch.zeros_like(x))


def test_timestep_embedding_is_cos_first_fp32():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]))
    assert emb.dtype == torch.float32 and emb.shape == (2, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))


@pytest.mark.parametrize(
    "missing", ["x_embedder.proj.weight", "joint_blocks.0.context_block.attn.qkv.weight", "pos_embed"]
)
def test_config_inference_names_the_missing_key(missing):
    sd = MMDiT(SMALL).state_dict()
    del sd[missing]
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        MMDiTConfig.from_state_dict(sd)


def test_prefixed_keys_get_a_hint():
    sd = {f"model.diffusion_model.{k}": v for k, v in MMDiT(SMALL).state_dict().items()}
    with pytest.raises(CheckpointError, match="prefix"):
        MMDiTConfig.from_state_dict(sd)


def test_strict_load_names_a_missing_key():
    sd = MMDiT(SMALL).state_dict()
    del sd["joint_blocks.1.x_block.mlp.fc2.bias"]
    with pytest.raises(RuntimeError, match=r"joint_blocks\.1\.x_block\.mlp\.fc2\.bias"):
        MMDiT(SMALL).load_state_dict(sd, strict=True)


def test_count_parameters_excludes_the_positional_table():
    model = MMDiT(SMALL)
    assert count_parameters(model) == sum(
        v.numel() for k, v in model.state_dict().items() if k != "pos_embed"
    )


class _Wrapped(torch.nn.Module):
    """A stand-in for a quantized or LoRA-wrapped Linear: same weights, its own forward."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.inner = linear
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.nn.functional.linear(x, self.inner.weight, self.inner.bias)


def test_a_replaced_linear_layer_is_called_through_its_own_forward():
    model = randomise(MMDiT(SMALL))
    x, t, context, y = inputs(SMALL)
    with torch.no_grad():
        expected = model(x, t, context, y)
        for block in model.joint_blocks:
            for stream in (block.context_block, block.x_block):
                stream.attn.qkv = _Wrapped(stream.attn.qkv)
                if stream.mlp is not None:
                    stream.mlp.fc1 = _Wrapped(stream.mlp.fc1)
        got = model(x, t, context, y)
    assert all(b.x_block.attn.qkv.calls == 1 and b.x_block.mlp.fc1.calls == 1 for b in model.joint_blocks)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])  # bf16: ~2 ulps at |x| < 4
def test_rms_norm_inference_path_equals_the_reference(dtype, atol):
    norm = mmdit.RMSNorm(64, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
    x = torch.randn(2, 10, 3, 64).to(dtype)
    expected = torch.nn.functional.rms_norm(x.float(), (64,), norm.weight.float(), mmdit.RMS_EPS)
    with torch.inference_mode():
        got = norm(x)
    assert got.dtype == dtype
    assert (got.float() - expected).abs().max().item() <= atol


def test_zero_padded_context_channels_are_skipped_exactly():
    """embed_context multiplies only the used channels of a zero-padded context (narrow text encoders)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4096, 64)
    context = torch.zeros(2, 9, 4096)
    context[..., :96] = torch.randn(2, 9, 96)
    torch.testing.assert_close(mmdit.embed_context(layer, context), layer(context), rtol=1e-5, atol=1e-5)
    full = torch.randn(2, 9, 4096)
    torch.testing.assert_close(mmdit.embed_context(layer, full), layer(full))
    assert mmdit.embed_context(layer, torch.zeros(1, 3, 4096)).shape == (1, 3, 64)
