"""The toy world's word-level tokenizer, saved where :func:`flash_core.text.load_tokenizers` finds it.

docs/toyworld.md "World": a word-level tokenizer is enough for the toy vocabulary (24 words); it is saved as a
``tokenizers`` WordLevel ``tokenizer.json`` that ``transformers.PreTrainedTokenizerFast`` and
``AutoTokenizer.from_pretrained(folder)`` read. (CLIP's BPE files would not do: transformers 5's ``CLIPTokenizer``
and ``T5TokenizerFast`` rebuild their own BPE / Unigram models and ignore a WordLevel ``tokenizer.json``.)

One vocabulary serves all three encoders; the folder holds it twice with different special tokens, in the
"clip/ and t5xxl/ subfolders" layout of ``load_tokenizers`` (docs/algorithm.md "Text encoders and T5 dropout"):

* ``clip/``: start ``<|startoftext|>``, end ``<|endoftext|>`` (CLIP-L also pads with it), as CLIP's tokenizer.
  CLIP-G pads with id 0, which is ``<pad>`` here.
* ``t5xxl/``: no start token, end ``</s>``, pad ``<pad>``.

The special ids follow T5's own numbering (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), then CLIP's two, then the
words in sorted order, so the ids are fixed by the grammar. Text is lower-cased and split on whitespace and
punctuation; a word outside the vocabulary becomes ``<unk>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from .world import vocabulary

PAD, T5_EOS, UNK, CLIP_BOS, CLIP_EOS = "<pad>", "</s>", "<unk>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, T5_EOS, UNK, CLIP_BOS, CLIP_EOS)
MAX_LENGTH = 77  # SD3's row length for CLIP and T5 (the default; a build may declare shorter rows)
GENERIC_CLASS = "PreTrainedTokenizerFast"  # tokenizer.json read as-is (flash_core.text checks for it)

CLIP_SPECIALS = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS, "unk_token": UNK}
T5_SPECIALS = {"eos_token": T5_EOS, "pad_token": PAD, "unk_token": UNK}


def build_tokenizer(words: list[str] | None = None) -> Tokenizer:
    """A WordLevel ``tokenizers.Tokenizer``: the special tokens (ids 0-4), then ``words`` (default: the toy
    world's :func:`~.world.vocabulary`)."""
    words = list(vocabulary() if words is None else words)
    clash = sorted(set(words) & set(SPECIAL_TOKENS))
    if clash or len(set(words)) != len(words):
        raise ValueError(f"tokenizer words must be unique and not special tokens; got duplicates or {clash}")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _write_folder(folder: Path, tokenizer: Tokenizer, specials: dict[str, str], length: int) -> None:
    """tokenizer.json with this encoder's template for ``add_special_tokens=True`` (CLIP: start + text + end;
    T5: text + end; flash_core adds them itself and does not use it), and its tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    bos, eos = specials.get("bos_token"), specials["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}" if bos else f"$A {eos}",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in (bos, eos) if t])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": GENERIC_CLASS, "model_max_length": length, "clean_up_tokenization_spaces": False,
              **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def save_tokenizers(folder: str | Path, words: list[str] | None = None, clip_length: int = MAX_LENGTH,
                    t5_length: int = MAX_LENGTH) -> Path:
    """Write ``folder/clip`` and ``folder/t5xxl`` (tokenizer.json + tokenizer_config.json each) and return
    ``folder``: what ``load_tokenizers(folder)`` and ``FlashPipeline.from_checkpoint(..., tokenizers=folder)``
    accept, and what ``AutoTokenizer.from_pretrained(folder / "clip")`` reads.

    ``clip_length`` and ``t5_length`` are written as each folder's ``model_max_length``: the token-row lengths
    the text encoders and every model trained on them use (``flash_core.text.declared_length``). SD3's 77 by
    default; the toy world's captions fit in far fewer, and the MM-DiT's cost grows with every context token."""
    folder = Path(folder)
    for name, length in (("clip_length", clip_length), ("t5_length", t5_length)):
        if not 2 <= length <= MAX_LENGTH:  # a row holds at least the end token and one more
            raise ValueError(f"{name}: expected 2..{MAX_LENGTH} tokens, got {length}")
    tokenizer = build_tokenizer(words)
    _write_folder(folder / "clip", tokenizer, CLIP_SPECIALS, clip_length)
    _write_folder(folder / "t5xxl", tokenizer, T5_SPECIALS, t5_length)
    return folder


def vocab_size(words: list[str] | None = None) -> int:
    """Number of ids (specials + words): the text encoders' embedding rows."""
    return len(SPECIAL_TOKENS) + len(vocabulary() if words is None else words)
