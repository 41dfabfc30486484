"""Checkpoint I/O: every layout loads to the same weights; bad files give errors that name file and key."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd35_flash.flash_core import checkpoint as ckpt
from sd35_flash.flash_core.errors import CheckpointError
from sd35_flash.flash_core.keymaps import mmdit as mmdit_keys
from sd35_flash.flash_core.keymaps import vae as vae_keys
from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig

from factories import TINY_MMDIT, randomize_, tiny_mmdit, tiny_vae, write_tiny_checkpoint


@pytest.fixture(scope="module")
def single_file(module_tmp):
    meta = ckpt.FlashMetadata(student_sigmas=[1.0, 0.9, 0.75, 0.5], sampler_mode="euler",
                              training={"stage": "dmd", "iterations": 1200})
    return write_tiny_checkpoint(module_tmp("ckpt") / "flash.safetensors", metadata=meta)


def _inputs(config: MMDiTConfig, batch: int = 2, h: int = 8, w: int = 6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 16, h, w, generator=g), torch.tensor([1000.0, 500.0][:batch]),
            torch.randn(batch, 5, config.context_in_channels, generator=g),
            torch.randn(batch, config.adm_in_channels, generator=g))


def _same_model(a: MMDiT, b: MMDiT) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    inputs = _inputs(a.config)
    with torch.no_grad():
        assert torch.allclose(a(*inputs), b(*inputs), atol=1e-5, rtol=0)  # same weights; BLAS may differ by alignment


def test_single_file_indexes_every_component(single_file):
    files = ckpt.index_checkpoint(single_file)
    assert files.layout == "official single file"
    assert [c for c in ckpt.COMPONENTS if files.has(c)] == ["mmdit", "vae", "clip_l", "clip_g", "t5"]
    assert "joint_blocks.0.x_block.attn2.qkv.weight" in files.components["mmdit"]
    assert "text_model.embeddings.token_embedding.weight" in files.components["clip_g"]


def test_metadata_round_trips(single_file):
    meta = ckpt.FlashMetadata.from_safetensors(ckpt.read_metadata(single_file))
    assert meta.student_sigmas == [1.0, 0.9, 0.75, 0.5]
    assert meta.sampler_mode == "euler"
    assert meta.training == {"stage": "dmd", "iterations": 1200}
    assert MMDiTConfig.from_dict(meta.architecture) == TINY_MMDIT
    assert meta.format_version == ckpt.FORMAT_VERSION


def test_bad_metadata_names_the_field(tmp_path):
    with pytest.raises(CheckpointError, match="sd35_flash.student_sigmas"):
        ckpt.FlashMetadata.from_safetensors({"sd35_flash.student_sigmas": "[1.0, 0.75"}, "x.safetensors")


def test_load_mmdit_from_file_keeps_dtype_and_weights(single_file):
    reference = ckpt.load_mmdit(load_file(str(single_file)))
    loaded = ckpt.load_mmdit(single_file)
    assert loaded.config == TINY_MMDIT
    assert loaded.dtype == torch.float32
    assert not any(p.is_meta for p in loaded.parameters())
    _same_model(loaded, reference)
    assert ckpt.load_mmdit(single_file, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_load_mmdit_accepts_bare_official_and_diffusers_state_dicts():
    model = tiny_mmdit()
    sd = model.state_dict()
    _same_model(ckpt.load_mmdit(sd), model)
    _same_model(ckpt.load_mmdit({f"model.diffusion_model.{k}": v for k, v in sd.items()}), model)
    _same_model(ckpt.load_mmdit(mmdit_keys.official_to_diffusers(sd)), model)


def test_diffusers_folder_with_sharded_transformer_loads_the_same_weights(tmp_path, single_file):
    model = ckpt.load_mmdit(single_file)
    diffusers_sd = mmdit_keys.official_to_diffusers(model.state_dict())
    folder = tmp_path / "sd35"
    (folder / "transformer").mkdir(parents=True)
    keys = sorted(diffusers_sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: diffusers_sd[k].contiguous() for k in shard_keys}, str(folder / "transformer" / name))
        weight_map.update(dict.fromkeys(shard_keys, name))
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "vae").mkdir()
    vae = tiny_vae()
    save_file(vae_keys.official_to_diffusers(vae.state_dict()), str(folder / "vae" / "diffusion_pytorch_model.safetensors"))

    files = ckpt.index_checkpoint(folder)
    assert files.layout == "diffusers folder"
    assert files.has("mmdit") and files.has("vae") and not files.has("t5")
    assert len(files.sources["mmdit"]) == 2
    _same_model(ckpt.load_mmdit(folder), model)
    vae_sd = ckpt.component_state_dict(files, "vae")
    assert vae_sd.keys() == vae.state_dict().keys()
    assert all(torch.equal(vae_sd[k], v) for k, v in vae.state_dict().items())


def test_missing_shard_is_named(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"pos_embed.pos_embed": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard-1.safetensors"):
        ckpt.index_checkpoint(tmp_path)


def test_split_component_files_are_classified(tmp_path):
    save_file(tiny_mmdit().state_dict(), str(tmp_path / "dit.safetensors"))
    save_file(tiny_vae().state_dict(), str(tmp_path / "vae.safetensors"))
    assert ckpt.index_checkpoint(tmp_path / "dit.safetensors").has("mmdit")
    assert ckpt.index_checkpoint(tmp_path / "vae.safetensors").has("vae")


def test_whole_checkpoint_key_conversion_round_trips_exactly(single_file):
    sd = load_file(str(single_file))
    diffusers = ckpt.official_to_diffusers(sd)
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q") for k in diffusers)
    assert any(k.startswith("vae.encoder.down_blocks.0") for k in diffusers)
    assert any(k.startswith("text_encoder_3.encoder.block.0") for k in diffusers)
    back = ckpt.diffusers_to_official(diffusers)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------- bad input


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*pickle"):
        ckpt.index_checkpoint(path)


def test_not_a_safetensors_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04" + bytes(300))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a safetensors file"):
        ckpt.index_checkpoint(path)


def test_truncated_file_is_named(tmp_path, single_file):
    data = single_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        ckpt.index_checkpoint(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.safetensors"):
        ckpt.index_checkpoint(tmp_path / "nothere.safetensors")


def test_missing_key_is_named(tmp_path):
    sd = {f"model.diffusion_model.{k}": v for k, v in tiny_mmdit().state_dict().items()}
    del sd["model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*missing key 'joint_blocks\.1\.x_block\.mlp\.fc2\.weight'"):
        ckpt.load_mmdit(path)


def test_wrong_shape_is_named_with_the_expected_shape(tmp_path):
    sd = tiny_mmdit().state_dict()
    sd["joint_blocks.1.context_block.mlp.fc1.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"joint_blocks\.1\.context_block\.mlp\.fc1\.bias.*\(7,\).*\(768,\)"):
        ckpt.load_mmdit(sd)


def test_sdxl_checkpoint_is_not_sd3(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match=r"sdxl\.safetensors.*not an SD3-class.*SDXL"):
        ckpt.index_checkpoint(path)


def test_flux_transformer_is_not_sd3(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(path))
    with pytest.raises(CheckpointError, match=r"flux\.safetensors.*Flux"):
        ckpt.index_checkpoint(path)


def test_atomic_save_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "out.safetensors"
    ckpt.atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises((ValueError, TypeError, AttributeError)):
        ckpt.atomic_save({"a": torch.ones(2), "b": "not a tensor"}, path)
    assert torch.equal(load_file(str(path))["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_saved_checkpoint_reloads_with_the_same_outputs(tmp_path):
    model = randomize_(MMDiT(TINY_MMDIT), seed=5).eval()
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", mmdit=model)
    _same_model(ckpt.load_mmdit(path), model)
    assert MMDiTConfig.from_dict(ckpt.FlashMetadata.from_safetensors(ckpt.read_metadata(path)).architecture) == TINY_MMDIT


def test_single_file_without_text_encoders(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "no_te.safetensors", with_text=False)
    files = ckpt.index_checkpoint(path)
    assert files.has("mmdit") and files.has("vae")
    assert not any(files.has(c) for c in ("clip_l", "clip_g", "t5"))
