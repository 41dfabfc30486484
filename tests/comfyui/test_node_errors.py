"""Bad input in a real ComfyUI: each node error is one sentence naming the file or value (what ComfyUI's error
dialog shows is ``str(exception)``), raised before anything is half-built."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sd35_flash.flash_core.errors import CheckpointError, FlashError

from factories import text_state_dict, tiny_clip_g, tiny_clip_l, write_tiny_checkpoint


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("bad_models")
    for folder in ("checkpoints", "text_encoders"):
        (root / folder).mkdir()
        folder_paths.add_model_folder_path(folder, str(root / folder))
    write_tiny_checkpoint(root / "checkpoints" / "no_t5.safetensors", with_t5=False)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)},
              str(root / "checkpoints" / "sdxl_like.safetensors"))
    save_file(text_state_dict(tiny_clip_l()), str(root / "text_encoders" / "clip_l.safetensors"))
    save_file(text_state_dict(tiny_clip_g()), str(root / "text_encoders" / "clip_g.safetensors"))
    save_file(text_state_dict(clip_l_sized()), str(root / "text_encoders" / "clip_l_768.safetensors"))
    return root


def clip_l_sized():
    """A CLIP of CLIP-L's width (768), kept small otherwise, in half precision."""
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    return CLIPTextModel(config).half()


def one_sentence(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message and len(message) < 300, message
    return message


def loaders():
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    return ours["SD35FlashCheckpointLoader"](), ours["SD35FlashTextEncoderLoader"]()


def test_non_sd3_checkpoint_names_the_file(models):
    with pytest.raises(CheckpointError) as err:
        loaders()[0].load("sdxl_like.safetensors", "auto", "fp32")
    assert "sdxl_like.safetensors" in one_sentence(err.value) and "not an SD3" in str(err.value)


def test_t5_on_without_t5_names_the_file(models):
    with pytest.raises(CheckpointError) as err:
        loaders()[0].load("no_t5.safetensors", "on", "fp32")
    assert "no_t5.safetensors" in one_sentence(err.value) and "T5" in str(err.value)


def test_missing_t5_file_names_it(models):
    with pytest.raises(CheckpointError) as err:
        loaders()[1].load("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
    assert "t5xxl_fp16.safetensors" in one_sentence(err.value)


def test_text_encoder_of_the_wrong_size_names_file_and_width(models):
    with pytest.raises(CheckpointError) as err:
        loaders()[1].load("clip_l.safetensors", "clip_l_768.safetensors", "none")
    message = one_sentence(err.value)
    assert "clip_l_768.safetensors" in message and "width 768" in message and "CLIP-G" in message


def test_width_not_a_multiple_of_16_names_the_value(models):
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

    model = loaders()[0].load("no_t5.safetensors", "auto", "fp32")[0]
    latent = {"samples": torch.zeros(1, 16, 8, 125)}  # 1000 px wide
    with pytest.raises(FlashError) as err:
        ours["SD35FlashSampler"]().sample(model, [], latent, seed=0, steps=4, cfg=1.0, mode="auto")
    assert "width 1000" in one_sentence(err.value) and "multiple of 16" in str(err.value)
