"""Tests of flash_core/text/: docs/algorithm.md "Text encoders and T5 dropout", ComfyUI's sd3_clip.py layout.

Tokenization uses CLIP BPE and T5 SentencePiece files in the released formats, made by the tests
(tokenizer_factories.py: a byte-level BPE with merges learned from a prompt corpus, a unigram model trained on it);
the encoders are tiny random transformers models, checked against direct transformers calls.
"""

import json

import pytest
import sentencepiece
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sd35_flash.flash_core.errors import CheckpointError, TokenizerNotFoundError
from sd35_flash.flash_core.text import (
    RELEASED_WIDTHS,
    Tokenizers,
    TripleTextEncoder,
    load_tokenizers,
    tokenize_clip,
    tokenize_t5,
)
from sd35_flash.flash_core.text import tokenizers as text_tokenizers

PROMPTS = ["a photo of a cat", "a red circle at the top left, with a long shadow"]
CLIP_VOCAB, T5_VOCAB = 49408, 32128  # the released vocabularies, and the tiny encoders' here
T5_EOS, T5_PAD, T5_UNK = 1, 0, 2
L_WIDTH, G_WIDTH, G_PROJ, T5_WIDTH = 64, 128, 96, 64
CONTEXT = 4096


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizers(tokenizers_dir):
    return load_tokenizers(tokenizers_dir)


@pytest.fixture(scope="module")
def vocab(tokenizers_dir) -> dict[str, int]:
    """CLIP's vocab.json of the self-made files: token -> id."""
    return json.loads((tokenizers_dir / "clip" / "vocab.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bos_eos(vocab) -> tuple[int, int]:
    """CLIP's start and end ids: the vocabulary's last two, as in CLIP (49406, 49407 there)."""
    return vocab["<|startoftext|>"], vocab["<|endoftext|>"]


@pytest.fixture(scope="module")
def spiece(tokenizers_dir):
    """The T5 unigram model itself, read by SentencePiece (the reference for the transformers tokenizer)."""
    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizers_dir / "t5xxl" / "spiece.model"))


def _clip_config(width, act, proj, bos, eos):
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
        num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act, projection_dim=proj,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )


@pytest.fixture(scope="module")
def ref_models(bos_eos):
    """Tiny random reference models: CLIP-L (64, quick_gelu), CLIP-G (128, gelu, projection 96), T5 (64, gated).
    The CLIPs' configs name the tokenizer's end id, where transformers' own pooler_output reads."""
    torch.manual_seed(0)
    clip_l = CLIPTextModel(_clip_config(L_WIDTH, "quick_gelu", L_WIDTH, *bos_eos)).eval()
    clip_g = CLIPTextModelWithProjection(_clip_config(G_WIDTH, "gelu", G_PROJ, *bos_eos)).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=T5_VOCAB, d_model=T5_WIDTH, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )).eval()
    return {"clip_l": clip_l, "clip_g": clip_g, "t5": t5}


def _file_key(slot, key):
    """The file layout (``text_model.*``); transformers 5's CLIPTextModel drops that prefix in its own keys."""
    if slot == "clip_l" and not key.startswith("text_model."):
        return "text_model." + key
    return key


def _sds(ref_models):
    """File-layout state dicts of the reference models, as a text encoder .safetensors file holds them."""
    return {
        slot: {_file_key(slot, k): v.clone() for k, v in m.state_dict().items()} for slot, m in ref_models.items()
    }


@pytest.fixture(scope="module")
def encoder(ref_models, tokenizers):
    return TripleTextEncoder.from_state_dicts(**_sds(ref_models), tokenizers=tokenizers)


# ---------------------------------------------------------------------------------------- tokenization


def test_clip_files_have_clips_byte_level_bpe_layout(tokenizers_dir, vocab, bos_eos, tokenizers):
    """vocab.json: the 256 byte symbols of bytes_to_unicode, the same with </w>, one token per merge of
    merges.txt in its order, then start and end: the layout of OpenAI's files, smaller."""
    symbols = list(bytes_to_unicode().values())
    ids = sorted(vocab, key=vocab.get)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert ids[:256] == symbols and ids[256:512] == [s + "</w>" for s in symbols]
    lines = (tokenizers_dir / "clip" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) > 200
    merged = list(dict.fromkeys("".join(line.split(" ")) for line in lines[1:]))
    assert ids[512:-2] == merged
    assert ids[-2:] == ["<|startoftext|>", "<|endoftext|>"] and bos_eos == (len(vocab) - 2, len(vocab) - 1)
    assert (tokenizers.clip_l.bos_token_id, tokenizers.clip_l.eos_token_id) == bos_eos
    assert len(vocab) < CLIP_VOCAB


def test_clip_tokens_known_prompt_and_padding(tokenizers, vocab, bos_eos):
    bos, eos = bos_eos
    l_ids = tokenize_clip(tokenizers.clip_l, ["a photo of a cat"], pad_id=tokenizers.clip_l.eos_token_id)
    g_ids = tokenize_clip(tokenizers.clip_g, ["a photo of a cat"], pad_id=0)
    words = [vocab[w + "</w>"] for w in ("a", "photo", "of", "a", "cat")]  # corpus words: one token each
    assert words[0] == 320  # "a</w>" as in CLIP: 256 + the 64th byte symbol ("!" is the 0th)
    head = [bos, *words, eos]
    assert l_ids.shape == g_ids.shape == (1, 77)
    assert l_ids[0].tolist() == head + [eos] * (77 - len(head))  # CLIP-L pads with its end token
    assert g_ids[0].tolist() == head + [0] * (77 - len(head))  # CLIP-G with 0
    shouted = tokenize_clip(tokenizers.clip_l, ["A  PHOTO of a Cat"], pad_id=eos)
    assert torch.equal(shouted, l_ids)  # lower-cased, whitespace collapsed


def test_clip_splits_unseen_words_into_byte_pieces(tokenizers, vocab, bos_eos):
    """A word outside the corpus falls apart into merged pieces and single bytes (never an unknown token);
    non-ASCII letters are their UTF-8 bytes; punctuation is a word of its own."""
    clip = tokenizers.clip_l
    ids = tokenize_clip(clip, ["zebra café, 3 cats!"], pad_id=0)[0].tolist()
    row = ids[1:ids.index(bos_eos[1])]
    pieces = clip.convert_ids_to_tokens(row)
    assert "zebra</w>" not in vocab and len(pieces) > 6 and all(i < bos_eos[0] for i in row)
    assert pieces[-1] == "!</w>" and ",</w>" in pieces and "3</w>" in pieces
    assert "Ã" in pieces and "©</w>" in pieces  # "é" is bytes C3 A9, shown as GPT-2's symbols
    assert clip.decode(row) == "zebra café , 3 cats !"  # CLIP's decoder puts a space at every word end


def test_t5_tokens_no_start_token_end_with_one(tokenizers, spiece):
    t5 = tokenizers.t5
    assert (t5.eos_token_id, t5.pad_token_id, t5.unk_token_id, t5.bos_token_id) == (T5_EOS, T5_PAD, T5_UNK, None)
    cat = spiece.encode("a photo of a cat")  # the unigram model's own segmentation
    assert len(cat) >= 5 and max(cat) < spiece.get_piece_size() and T5_UNK not in cat
    ids = tokenize_t5(t5, ["a photo of a cat", ""], max_length=77)
    assert ids.shape == (2, 77)
    assert ids[0].tolist() == cat + [T5_EOS] + [T5_PAD] * (76 - len(cat))
    assert ids[1].tolist() == [T5_EOS] + [T5_PAD] * 76  # ComfyUI's empty prompt: EOS then 76 pads
    assert len(t5) == spiece.get_piece_size() + 100 < T5_VOCAB  # the pieces, then T5's 100 sentinels


def test_t5_is_case_sensitive_and_maps_unknown_characters_to_unk(tokenizers, spiece):
    prompt = "A photo of a cat, \u03a9"  # "Ω" is not in the corpus
    ids = tokenize_t5(tokenizers.t5, [prompt], max_length=32)[0].tolist()
    assert ids[:ids.index(T5_EOS)] == spiece.encode(prompt) and T5_UNK in ids
    assert ids != tokenize_t5(tokenizers.t5, [prompt.lower()], max_length=32)[0].tolist()


def test_long_prompt_truncated(tokenizers, vocab, bos_eos):
    bos, eos = bos_eos
    prompt = " ".join(["cat"] * 120)
    l_ids = tokenize_clip(tokenizers.clip_l, [prompt], pad_id=eos)[0].tolist()
    assert l_ids == [bos] + [vocab["cat</w>"]] * 75 + [eos]
    t5_ids = tokenize_t5(tokenizers.t5, [prompt], max_length=77)[0].tolist()
    assert len(t5_ids) == 77 and t5_ids[-1] == T5_EOS and T5_PAD not in t5_ids
    assert tokenize_t5(tokenizers.t5, [prompt], max_length=256).shape == (1, 256)


def test_encoder_tokenize_dict(encoder, bos_eos):
    bos, eos = bos_eos
    tokens = encoder.tokenize(PROMPTS)
    assert set(tokens) == {"clip_l", "clip_g", "t5"}
    assert all(t.dtype == torch.long and t.shape == (2, 77) for t in tokens.values())
    assert tokens["clip_l"][0, 0] == bos and tokens["clip_g"][1, -1] == 0 and tokens["clip_l"][1, -1] == eos
    assert "t5" not in encoder.tokenize(PROMPTS, use_t5=False)


def test_load_tokenizers_layouts(tokenizers_dir, bos_eos, tmp_path, monkeypatch):
    diffusers = tmp_path / "model"
    diffusers.mkdir()
    for sub, src in (("tokenizer", "clip"), ("tokenizer_2", "clip"), ("tokenizer_3", "t5xxl")):
        (diffusers / sub).symlink_to(tokenizers_dir / src, target_is_directory=True)
    from_diffusers = load_tokenizers(diffusers)
    assert from_diffusers.t5 is not None and from_diffusers.clip_g.eos_token_id == bos_eos[1]
    direct = load_tokenizers(tokenizers_dir / "clip")  # CLIP files in the folder, t5xxl/ beside it
    assert direct.t5 is not None
    clip_only = tmp_path / "a" / "clip_only"
    clip_only.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (clip_only / name).symlink_to(tokenizers_dir / "clip" / name)
    assert load_tokenizers(clip_only).t5 is None
    monkeypatch.setenv("SD35_FLASH_TOKENIZERS", str(tokenizers_dir))
    assert load_tokenizers().t5 is not None


def test_tokenizers_not_found_lists_places(tmp_path, monkeypatch):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(TokenizerNotFoundError) as err:
        load_tokenizers(empty)
    message = str(err.value)
    assert str(empty / "tokenizer") in message and str(empty / "clip") in message and str(empty) in message
    assert "--tokenizers" in message and "SD35_FLASH_TOKENIZERS" in message and "diffusers" in message
    monkeypatch.setenv("SD35_FLASH_TOKENIZERS", str(empty))
    monkeypatch.setattr(text_tokenizers, "comfyui_root", lambda: None)
    with pytest.raises(TokenizerNotFoundError, match=r"\$SD35_FLASH_TOKENIZERS"):
        load_tokenizers()
    monkeypatch.delenv("SD35_FLASH_TOKENIZERS")
    with pytest.raises(TokenizerNotFoundError, match="no path was given"):
        load_tokenizers()


# ---------------------------------------------------------------------------------------- conditioning


def _first_eos(ids, eos):
    return [row.index(eos) for row in ids.tolist()]


def _reference(ref_models, tokens, with_l=True, with_g=True, with_t5=True):
    """SD3 conditioning by direct transformers calls: penultimate hidden states, HF pooled/projected outputs."""
    batch = tokens["clip_l"].shape[0]
    context = torch.zeros(batch, 77, CONTEXT)
    pooled = torch.zeros(batch, 2048)  # L (or 768 zeros), G (or 1280 zeros), zero-padded to the MM-DiT's 2048
    with torch.no_grad():
        if with_l:
            out = ref_models["clip_l"](input_ids=tokens["clip_l"], output_hidden_states=True)
            context[..., :L_WIDTH] = out.hidden_states[-2]
            eos = _first_eos(tokens["clip_l"], ref_models["clip_l"].config.eos_token_id)
            pooled[:, :L_WIDTH] = out.last_hidden_state[torch.arange(batch), eos]
            assert torch.equal(pooled[:, :L_WIDTH], out.pooler_output)
        if with_g:
            out = ref_models["clip_g"](input_ids=tokens["clip_g"], output_hidden_states=True)
            start = L_WIDTH if with_l else 768
            context[..., start:start + G_WIDTH] = out.hidden_states[-2]
            pooled[:, start:start + G_PROJ] = out.text_embeds
        if with_t5:
            t5_context = torch.zeros(batch, tokens["t5"].shape[1], CONTEXT)
            t5_context[..., :T5_WIDTH] = ref_models["t5"](input_ids=tokens["t5"]).last_hidden_state
            context = torch.cat([context, t5_context], dim=1)
    return context, pooled


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_conditioning_matches_direct_transformers(encoder, ref_models):
    context, pooled = encoder.encode(PROMPTS)
    assert context.shape == (2, 154, CONTEXT) and pooled.shape == (2, 2048)
    assert context.dtype == pooled.dtype == torch.float32
    ref_context, ref_pooled = _reference(ref_models, encoder.tokenize(PROMPTS))
    assert _max_diff(context, ref_context) <= 1e-5
    assert _max_diff(pooled, ref_pooled) <= 1e-5
    assert context[:, :77, L_WIDTH + G_WIDTH:].abs().max() == 0  # zero padding of the CLIP tokens
    assert context[:, 77:, T5_WIDTH:].abs().max() == 0


def test_t5_off_gives_77_clip_tokens(encoder):
    context_t5, pooled_t5 = encoder.encode(PROMPTS)
    context, pooled = encoder.encode(PROMPTS, use_t5=False)
    assert context.shape == (2, 77, CONTEXT)
    assert torch.equal(context, context_t5[:, :77]) and torch.equal(pooled, pooled_t5)
    single, _ = encoder.encode(PROMPTS[0])
    assert single.shape == (1, 154, CONTEXT) and _max_diff(single[0], context_t5[0]) <= 1e-5


def test_t5_max_length_configurable(ref_models, tokenizers):
    enc = TripleTextEncoder.from_state_dicts(**_sds(ref_models), tokenizers=tokenizers, t5_max_length=96)
    context, _ = enc.encode(PROMPTS)
    assert context.shape == (2, 77 + 96, CONTEXT)
    ref_context, _ = _reference(ref_models, enc.tokenize(PROMPTS))
    assert _max_diff(context, ref_context) <= 1e-5


def test_missing_clip_l_mirrors_comfyui(ref_models, tokenizers):
    sds = _sds(ref_models)
    enc = TripleTextEncoder.from_state_dicts(clip_g=sds["clip_g"], t5=sds["t5"], tokenizers=tokenizers)
    context, pooled = enc.encode(PROMPTS)
    assert pooled.shape == (2, 2048) and pooled[:, :768].abs().max() == 0
    assert context[:, :77, :768].abs().max() == 0
    ref_context, ref_pooled = _reference(ref_models, enc.tokenize(PROMPTS), with_l=False)
    assert _max_diff(context, ref_context) <= 1e-5 and _max_diff(pooled, ref_pooled) <= 1e-5


def test_missing_clip_g_and_t5(ref_models, tokenizers):
    enc = TripleTextEncoder.from_state_dicts(clip_l=_sds(ref_models)["clip_l"], tokenizers=tokenizers)
    assert not enc.has_t5
    context, pooled = enc.encode(PROMPTS)
    assert context.shape == (2, 77, CONTEXT) and pooled.shape == (2, 2048)
    assert pooled[:, L_WIDTH:].abs().max() == 0 and context[..., L_WIDTH:].abs().max() == 0
    ref_context, ref_pooled = _reference(ref_models, enc.tokenize(PROMPTS), with_g=False, with_t5=False)
    assert _max_diff(context, ref_context) <= 1e-5 and _max_diff(pooled, ref_pooled) <= 1e-5


def test_bf16_encoders_give_float32(ref_models, tokenizers, encoder):
    enc = TripleTextEncoder.from_state_dicts(**_sds(ref_models), tokenizers=tokenizers, dtype=torch.bfloat16)
    assert enc.clip_g.text_projection.weight.dtype == torch.bfloat16
    context, pooled = enc.encode(PROMPTS)
    assert context.dtype == pooled.dtype == torch.float32
    ref_context, _ = encoder.encode(PROMPTS)
    assert _max_diff(context, ref_context) < 0.25


def test_tolerated_key_variants(ref_models):
    sds = _sds(ref_models)
    sds["clip_l"]["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sds["clip_l"]["text_projection.weight"] = torch.eye(L_WIDTH)
    sds["t5"]["encoder.embed_tokens.weight"] = sds["t5"].pop("shared.weight")
    enc = TripleTextEncoder.from_state_dicts(**sds)
    assert enc.t5.encoder.embed_tokens.weight is enc.t5.shared.weight
    assert torch.equal(enc.t5.shared.weight, ref_models["t5"].shared.weight)
    assert enc.clip_l.config.hidden_act == "quick_gelu" and enc.clip_g.config.hidden_act == "gelu"
    assert enc.clip_g.config.projection_dim == G_PROJ and enc.t5.config.num_heads == 4
    assert enc.t5.config.is_gated_act and enc.clip_g.config.num_attention_heads == G_WIDTH // 64


# ------------------------------------------------------------------------------------------------ errors


def test_wrong_slot_state_dicts(ref_models):
    sds = _sds(ref_models)
    with pytest.raises(CheckpointError, match=r"T5-XXL.*shared\.weight.*CLIP text encoder of width 128"):
        TripleTextEncoder.from_state_dicts(clip_l=sds["clip_l"], t5=sds["clip_g"])
    with pytest.raises(CheckpointError, match=r"CLIP-G.*token_embedding.*T5 encoder"):
        TripleTextEncoder.from_state_dicts(clip_g=sds["t5"])
    with pytest.raises(CheckpointError, match=r"CLIP-L.*\[49408, 64\].*width 64.*expected width 768"):
        TripleTextEncoder.from_state_dicts(clip_l=sds["clip_l"], expect_widths=RELEASED_WIDTHS)
    with pytest.raises(CheckpointError, match="neither"):
        TripleTextEncoder.from_state_dicts(t5=sds["t5"])


def test_incomplete_or_misshaped_state_dict(ref_models):
    sds = _sds(ref_models)
    broken = dict(sds["clip_g"])
    del broken["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.fc2\.bias"):
        TripleTextEncoder.from_state_dicts(clip_g=broken)
    broken = dict(sds["clip_g"])
    broken["text_model.final_layer_norm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match=r"final_layer_norm\.weight.*\[7\].*\[128\]"):
        TripleTextEncoder.from_state_dicts(clip_g=broken)


def test_t5_without_t5_tokenizer(ref_models, tokenizers):
    enc = TripleTextEncoder.from_state_dicts(**_sds(ref_models), tokenizers=Tokenizers(
        tokenizers.clip_l, tokenizers.clip_g, None))
    with pytest.raises(TokenizerNotFoundError, match="use_t5=False"):
        enc.encode("a cat")
    assert enc.encode("a cat", use_t5=False)[0].shape == (1, 77, CONTEXT)
