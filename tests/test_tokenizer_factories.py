"""The self-made tokenizer files (tokenizer_factories.py): deterministic, quick, and read by transformers as the
algorithms they stand for (CLIP's byte-level BPE applied merge by merge, T5's SentencePiece unigram)."""

from __future__ import annotations

import json
import time
from collections import Counter

import sentencepiece

from sd35_flash.flash_core.text import load_tokenizers

from tokenizer_factories import CORPUS, clip_words, word_symbols, write_tokenizers

UNSEEN = ["zebra", "lighthouses", "sunsetting", "photographs", "quixotic", "cafe", "x"]


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The BPE of one word written plainly: join the adjacent pair of lowest merge rank until none is left."""
    symbols = list(word_symbols(word))
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols[:-1], symbols[1:],
                                                                               strict=True))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def test_two_builds_are_byte_identical_and_quick(tmp_path):
    start = time.perf_counter()
    first, second = write_tokenizers(tmp_path / "a"), write_tokenizers(tmp_path / "b")
    assert time.perf_counter() - start < 10  # about 0.3 s each here
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert [str(p) for p in files] == [
        "clip/merges.txt", "clip/special_tokens_map.json", "clip/tokenizer_config.json", "clip/vocab.json",
        "t5xxl/special_tokens_map.json", "t5xxl/spiece.model", "t5xxl/tokenizer_config.json"]
    assert all((first / p).read_bytes() == (second / p).read_bytes() for p in files)


def test_clip_tokenizer_applies_the_learned_merges_in_rank_order(tokenizers_dir):
    lines = (tokenizers_dir / "clip" / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(lines)}
    vocab = json.loads((tokenizers_dir / "clip" / "vocab.json").read_text(encoding="utf-8"))
    clip = load_tokenizers(tokenizers_dir).clip_l
    frequent = [word for word, count in Counter(w for text in CORPUS for w in clip_words(text)).items() if count > 1]
    assert len(frequent) > 50
    for word in frequent + UNSEEN:
        ids = clip(word, add_special_tokens=False)["input_ids"]
        assert ids == [vocab[s] for s in bpe(word, ranks)], word
    assert all(len(bpe(word, ranks)) == 1 for word in frequent)  # every word seen twice is one token
    assert all(len(bpe(word, ranks)) > 1 for word in UNSEEN[:-1])


def test_t5_tokenizer_is_the_unigram_model(tokenizers_dir):
    model = sentencepiece.SentencePieceProcessor(model_file=str(tokenizers_dir / "t5xxl" / "spiece.model"))
    assert [model.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"] and model.bos_id() == -1
    t5 = load_tokenizers(tokenizers_dir).t5
    for text in [*CORPUS[::7], *UNSEEN, "Two BIRDS, 3 cats & a zebra!"]:
        assert t5(text, add_special_tokens=False)["input_ids"] == model.encode(text), text
    assert t5.convert_tokens_to_ids("<extra_id_0>") == model.get_piece_size() + 99  # T5's sentinels, last first
