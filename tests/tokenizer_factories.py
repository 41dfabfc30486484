"""Self-made tokenizer files in the formats of the released SD3 tokenizers, built at test time (nothing is downloaded
and nothing outside the repository is read).

:func:`write_tokenizers` writes the "clip/ and t5xxl/ subfolders" layout that ``flash_core.text.load_tokenizers``
reads:

* ``clip/``: CLIP's byte-level BPE files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
  ``special_tokens_map.json``) as ``transformers.CLIPTokenizer`` reads them. The vocabulary is laid out like
  OpenAI's: the 256 byte symbols of ``bytes_to_unicode`` (ids 0-255), the same with the end-of-word mark ``</w>``
  (256-511), one token per merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids.
  The merges are learned here by a plain BPE loop over :data:`CORPUS` (merge the most frequent adjacent pair until
  no pair occurs twice), so every corpus word seen at least twice is one token, as common words are in CLIP.
* ``t5xxl/``: a SentencePiece unigram model (``spiece.model``) trained here on the same corpus with T5's special
  ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no start token), and T5's ``tokenizer_config.json``, as
  ``transformers.T5TokenizerFast`` reads them.

Both are deterministic (the same bytes on every build) and take well under a second. Their ids stay far below the
vocabularies of the tiny encoders in ``factories.py`` (CLIP 49408, T5 32128).
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, appended by the tokenizer after the model's pieces
T5_VOCAB_SIZE = 400  # pieces asked of the unigram trainer (a soft limit: a small corpus gives fewer)
MERGES_VERSION = "#version: 0.2"
# tokenizer_config.json's model_max_length of ComfyUI's copy of CLIP's files (OpenAI's says 77) and of T5's: limits
# of the encoders' tokenizers, never a row length (flash_core.text.declared_length reads it for other folders only)
CLIP_MODEL_MAX_LENGTH, T5_MODEL_MAX_LENGTH = 8192, 512

COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple", "white", "black", "grey",
           "pink", "brown")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ring", "cross", "diamond")
SIZES = ("small", "large", "tiny", "big")
POSITIONS = ("at the top", "at the bottom", "on the left", "on the right", "in the centre", "at the top left",
             "at the bottom right", "next to a tree")
SCENES = (
    "a photo of a cat",
    "a photo of a dog running on the beach",
    "a lighthouse on a cliff at sunset, with a long shadow",
    "a painting of a mountain lake in the morning",
    "a red car parked in front of a house",
    "an old man reading a book by the window",
    "a bowl of fruit on a wooden table",
    "a city street at night, in the rain",
    "a white horse standing in a field of flowers",
    "two birds flying over the sea!",
    "a castle on a hill, under a cloudy sky",
    "a cup of coffee next to a laptop",
)


def corpus() -> list[str]:
    """A few hundred words of prompt-like English: shape prompts cycling through colours, sizes, shapes and
    positions, and everyday scenes, each scene twice (once capitalised, for T5's case-sensitive vocabulary)."""
    shapes = [f"a {SIZES[i % len(SIZES)]} {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]} "
              f"{POSITIONS[i % len(POSITIONS)]}" for i in range(52)]
    return shapes + list(SCENES) + [scene.capitalize() + "." for scene in SCENES]


CORPUS = tuple(corpus())


# ---------------------------------------------------------------------------------------------------- CLIP BPE


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's map of the 256 byte values to printable characters: printable Latin-1 bytes map to
    themselves (in that order first), the others to code points from 256 up."""
    byte_values = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(byte_values)
    others = [byte for byte in range(256) if byte not in byte_values]  # mapped to 256, 257, ... in byte order
    byte_values += others
    codes += [256 + i for i in range(len(others))]
    return {byte: chr(code) for byte, code in zip(byte_values, codes, strict=True)}


def clip_words(text: str) -> list[str]:
    """CLIP's pre-tokenization of lower-cased text (ASCII form): contractions, letter runs, single digits and runs
    of other symbols; whitespace separates."""
    return re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def word_symbols(word: str) -> tuple[str, ...]:
    """A word as BPE starts from it: one byte symbol per UTF-8 byte, the last one marked ``</w>``."""
    table = bytes_to_unicode()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return tuple(symbols)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``symbols`` with every left-to-right occurrence of ``pair`` joined into one symbol."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_bpe_merges(texts, min_count: int = 2) -> list[tuple[str, str]]:
    """BPE merges of ``texts`` in CLIP's symbols: repeatedly join the most frequent adjacent pair (ties: the
    smallest pair) until no pair occurs ``min_count`` times."""
    words = Counter(word_symbols(w) for text in texts for w in clip_words(text))
    merges = []
    while True:
        pairs = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols[:-1], symbols[1:], strict=True):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_count:
            return merges
        merges.append(best)
        merged = Counter()
        for symbols, count in words.items():
            merged[_merge_pair(symbols, best)] += count
        words = merged


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: byte symbols, byte symbols + ``</w>``, merge results, start and end tokens."""
    base = list(bytes_to_unicode().values())
    tokens = base + [symbol + END_OF_WORD for symbol in base]
    tokens += list(dict.fromkeys(a + b for a, b in merges))  # a token two merges both make is listed once
    tokens += [CLIP_BOS, CLIP_EOS]
    return {token: i for i, token in enumerate(tokens)}


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_clip_tokenizer(folder: Path, texts=CORPUS) -> Path:
    """``folder`` with vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (the files of
    OpenAI's CLIP tokenizer, with merges learned from ``texts``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe_merges(texts)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    lines = [MERGES_VERSION, *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    specials = {"bos_token": _added_token(CLIP_BOS), "eos_token": _added_token(CLIP_EOS), "pad_token": CLIP_EOS,
                "unk_token": _added_token(CLIP_EOS)}
    config = {**specials, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": CLIP_MODEL_MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------------------------- T5 SentencePiece


def train_unigram(texts=CORPUS, vocab_size: int = T5_VOCAB_SIZE) -> bytes:
    """A serialized SentencePiece unigram model of ``texts`` with T5's special ids (pad 0, eos 1, unk 2, no bos).
    One thread and no input shuffling: the same bytes on every run."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece=T5_PAD, eos_piece=T5_EOS, unk_piece=T5_UNK, num_threads=1, shuffle_input_sentence=False,
        minloglevel=2)
    return model.getvalue()


def write_t5_tokenizer(folder: Path, texts=CORPUS) -> Path:
    """``folder`` with spiece.model (trained on ``texts``), tokenizer_config.json and special_tokens_map.json:
    the files of T5's slow tokenizer, which ``T5TokenizerFast.from_pretrained`` converts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(train_unigram(texts))
    specials = {"eos_token": T5_EOS, "pad_token": T5_PAD, "unk_token": T5_UNK}
    config = {**specials, "extra_ids": T5_EXTRA_IDS, "model_max_length": T5_MODEL_MAX_LENGTH,
              "tokenizer_class": "T5Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder


def write_tokenizers(folder) -> Path:
    """Write ``folder/clip`` and ``folder/t5xxl`` and return ``folder``: what ``load_tokenizers(folder)``,
    ``--tokenizers folder`` and ``FlashPipeline.from_checkpoint(..., tokenizers=folder)`` accept."""
    folder = Path(folder)
    write_clip_tokenizer(folder / "clip")
    write_t5_tokenizer(folder / "t5xxl")
    return folder
