"""The tokenizers of SD3's three text encoders: where their files are found, how they are read, and the token rows.

Token rows as ComfyUI's ``comfy/text_encoders/sd3_clip.py`` makes them (docs/comfyui.md), so that a prompt of at most
75 tokens gives the same ids as ComfyUI:

* One row of 77 per CLIP: ``BOS + up to 75 tokens + EOS``, then padding. CLIP-L pads with its end
  token (49407), CLIP-G pads with 0 (ComfyUI's ``SDXLClipGTokenizer`` / ``pad_with_end=False``). Longer prompts
  are truncated to 75 tokens here, where ComfyUI would open a second chunk of 77.
* T5: no start token, the prompt, EOS (1), padding with 0 up to ``t5_max_length`` (default 77, ComfyUI's
  ``min_length``). Longer prompts are truncated to ``t5_max_length - 1`` tokens + EOS (ComfyUI never truncates;
  equal for prompts that fit).

Tokenizer folders are searched, in order, at a path given, under ``$SD35_FLASH_TOKENIZERS`` and in the ComfyUI
installation this pack runs in (found without importing it); several layouts are accepted under each
(:func:`load_tokenizers`). A folder whose ``tokenizer.json`` is read as-is (a project-made vocabulary, like the
toy world's) may declare its own row length (:func:`declared_length`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5TokenizerFast

from ..errors import TokenizerNotFoundError

logger = logging.getLogger(__name__)

CLIP_LENGTH = 77  # BOS + 75 prompt tokens + EOS
CLIP_G_PAD_ID = 0  # CLIP-G pads with 0; CLIP-L pads with its end token
T5_DEFAULT_LENGTH = 77
ENV_TOKENIZERS = "SD35_FLASH_TOKENIZERS"
T5_SUBFOLDERS = ("t5xxl", "t5", "t5_tokenizer")
UNKNOWN_SHOWN = 12  # unknown words a warning names (repr: control characters stay escaped on one line)
# tokenizer_config.json classes whose tokenizer.json is used as-is (not rebuilt as CLIP's BPE / T5's Unigram)
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


@dataclass
class Tokenizers:
    """The tokenizers of the three encoders (transformers tokenizers); ``t5`` is None when not available.

    ``clip_length`` and ``t5_length`` are the token rows' lengths: SD3's 77 and 77 (ComfyUI's), unless a folder read
    as-is declares its own (:func:`declared_length`: a model trained on shorter rows, like the demo model)."""

    clip_l: object
    clip_g: object
    t5: object | None = None
    clip_length: int = CLIP_LENGTH
    t5_length: int = T5_DEFAULT_LENGTH


def _generic_tokenizer_config(folder: Path) -> dict | None:
    """tokenizer_config.json of a folder whose tokenizer.json is read as-is (``tokenizer_class``
    PreTrainedTokenizerFast, e.g. the toy world's word-level tokenizer); None for any other folder."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    generic = isinstance(config, dict) and config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES
    return config if generic and (folder / "tokenizer.json").is_file() else None


def declared_length(folder, default: int) -> int:
    """The token-row length a tokenizer folder declares: ``model_max_length`` of a folder read as-is (a
    project-made vocabulary, e.g. the toy world's, whose model was trained on rows of that length); ``default``
    (SD3's 77) for CLIP's BPE and T5's Unigram files, whose ``model_max_length`` is the encoder's limit instead."""
    return config_length(_generic_tokenizer_config(Path(folder)), default)


def config_length(config: Mapping | None, default: int) -> int:
    """The row length a read-as-is ``tokenizer_config.json`` (as a dict; None for other tokenizers) declares:
    its ``model_max_length`` when it is a sensible whole number, else ``default``. Shared by folders
    (:func:`declared_length`) and tokenizers embedded in a checkpoint (:mod:`..tokenizer_files`)."""
    length = config.get("model_max_length") if config is not None else None
    if not isinstance(length, int) or isinstance(length, bool) or not 2 <= length <= CLIP_LENGTH * 64:
        return default
    return length


def _is_clip_dir(folder: Path) -> bool:
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return True
    config = _generic_tokenizer_config(folder)  # a CLIP row needs a start token: T5 folders have none
    return config is not None and bool(config.get("bos_token")) and bool(config.get("eos_token"))


def _is_t5_dir(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()


def _layouts(root: Path) -> list[tuple[str, Path, Path, list[Path]]]:
    """Tokenizer layouts tried under ``root``: (description, CLIP-L dir, CLIP-G dir, T5 dir candidates)."""
    comfy_pkg = root / "comfy" if (root / "comfy").is_dir() else root
    direct_t5 = [root / n for n in T5_SUBFOLDERS] + [root.parent / n for n in T5_SUBFOLDERS]
    return [
        ("diffusers folder (tokenizer/, tokenizer_2/, tokenizer_3/)", root / "tokenizer", root / "tokenizer_2",
         [root / "tokenizer_3"]),
        ("clip/ and t5xxl/ subfolders", root / "clip", root / "clip", [root / n for n in T5_SUBFOLDERS]),
        ("ComfyUI (comfy/sd1_tokenizer/, comfy/text_encoders/t5_tokenizer/)", comfy_pkg / "sd1_tokenizer",
         comfy_pkg / "sd1_tokenizer", [comfy_pkg / "text_encoders" / "t5_tokenizer"]),
        ("CLIP files (vocab.json, merges.txt) in the folder itself, T5 in t5xxl/ inside or beside it", root,
         root, direct_t5),
    ]


def comfyui_root() -> Path | None:
    """The folder of the ComfyUI ``comfy`` package this pack runs in, found without importing ComfyUI."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _tokenizer_roots(path) -> list[tuple[str, Path]]:
    """Where to look: the given path only; otherwise $SD35_FLASH_TOKENIZERS, then the ComfyUI installation."""
    if path is not None:
        return [("path given", Path(path).expanduser())]
    roots = []
    if os.environ.get(ENV_TOKENIZERS):
        roots.append((f"${ENV_TOKENIZERS}", Path(os.environ[ENV_TOKENIZERS]).expanduser()))
    comfy = comfyui_root()
    if comfy is not None:
        roots.append(("ComfyUI installation", comfy))
    return roots


def _not_found_message(looked: list[str]) -> str:
    where = "\n".join(f"  - {line}" for line in looked) or (
        f"  - nowhere: no path was given, ${ENV_TOKENIZERS} is not set and ComfyUI is not installed"
    )
    return (
        "No CLIP tokenizer found (vocab.json + merges.txt, or a PreTrainedTokenizerFast tokenizer.json with a "
        "start token). Looked in:\n" + where + "\n"
        "Fix: pass --tokenizers PATH (or load_tokenizers(PATH)), set "
        f"{ENV_TOKENIZERS}=PATH, or point at a diffusers model folder (with tokenizer/, tokenizer_2/, "
        "tokenizer_3/). PATH may also hold clip/ and t5xxl/ subfolders, or the CLIP files themselves."
    )


def _load_clip_tokenizer(folder: Path):
    cls = PreTrainedTokenizerFast if _generic_tokenizer_config(folder) is not None else CLIPTokenizer
    return cls.from_pretrained(str(folder), local_files_only=True)


def _load_t5_tokenizer(folder: Path):
    cls = PreTrainedTokenizerFast if _generic_tokenizer_config(folder) is not None else T5TokenizerFast
    return cls.from_pretrained(str(folder), local_files_only=True)


@dataclass(frozen=True)
class TokenizerDirs:
    """The folders :func:`load_tokenizers` reads: CLIP-L's, CLIP-G's (often the same) and T5's (None if absent)."""

    clip_l: Path
    clip_g: Path
    t5: Path | None = None


def reads_as_is(folder) -> bool:
    """Whether a tokenizer folder's ``tokenizer.json`` is read as-is with ``PreTrainedTokenizerFast`` (e.g. the toy
    world's word-level vocabulary) rather than as CLIP's BPE / T5's Unigram files."""
    return _generic_tokenizer_config(Path(folder)) is not None


def tokenizers_beside(checkpoint) -> Path | None:
    """The ``tokenizers/`` folder beside a checkpoint file (the demo model's layout:
    ``demo/sd35_flash_demo.safetensors`` and ``demo/tokenizers/clip``, ``demo/tokenizers/t5xxl``), when it holds a
    layout :func:`load_tokenizers` accepts; None otherwise, and for a folder checkpoint (a diffusers folder carries
    its own tokenizers)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return None
    folder = path.parent / "tokenizers"
    if not folder.is_dir():
        return None
    try:
        find_tokenizer_dirs(folder)
    except TokenizerNotFoundError:
        return None
    return folder


def find_tokenizer_dirs(path=None) -> TokenizerDirs:
    """Where :func:`load_tokenizers` would read from (same search, same errors), without loading anything."""
    looked = []
    for origin, root in _tokenizer_roots(path):
        for description, l_dir, g_dir, t5_dirs in _layouts(root):
            looked.append(f"{l_dir} ({origin}: {description})")
            if not (_is_clip_dir(l_dir) and _is_clip_dir(g_dir)):
                continue
            t5_dir = next((d for d in t5_dirs if _is_t5_dir(d)), None)
            if t5_dir is None:
                logger.info("No T5 tokenizer beside %s (looked in %s); T5 prompts unavailable", l_dir,
                            ", ".join(map(str, t5_dirs)))
            return TokenizerDirs(l_dir, g_dir, t5_dir)
    raise TokenizerNotFoundError(_not_found_message(looked))


def load_tokenizers(path=None) -> Tokenizers:
    """Load the CLIP-L, CLIP-G and (if present) T5 tokenizers from local files only.

    ``path`` may be a diffusers model folder, a folder with ``clip/`` and ``t5xxl/`` subfolders (the layout of
    the demo model's ``tokenizers/``), a ComfyUI installation, or a folder holding
    vocab.json + merges.txt (T5 then in a ``t5xxl``/``t5``/``t5_tokenizer`` folder inside or beside it). When
    ``path`` is None the environment variable ``SD35_FLASH_TOKENIZERS`` and then the ComfyUI this pack runs in
    are tried. The T5 tokenizer is optional (None when absent). Raises TokenizerNotFoundError listing every
    place looked.

    Order of precedence for a checkpoint (``FlashPipeline.from_checkpoint``, ``sd35-flash generate`` and the
    Flash Checkpoint Loader; :func:`..tokenizer_files.checkpoint_tokenizers`): an explicit path
    (``--tokenizers``), then the checkpoint's own tokenizers (a diffusers folder's ``tokenizer*/``, a
    ``tokenizers/`` folder beside a checkpoint file: :func:`tokenizers_beside`, or tokenizers embedded in the
    file's metadata), then ``$SD35_FLASH_TOKENIZERS``, then the ComfyUI installation. A model's own tokenizers
    come before the environment's because they are the ones its text encoders were made with.
    """
    dirs = find_tokenizer_dirs(path)
    clip_l = _load_clip_tokenizer(dirs.clip_l)
    clip_g = clip_l if dirs.clip_g == dirs.clip_l else _load_clip_tokenizer(dirs.clip_g)
    t5 = _load_t5_tokenizer(dirs.t5) if dirs.t5 is not None else None
    t5_length = declared_length(dirs.t5, T5_DEFAULT_LENGTH) if dirs.t5 is not None else T5_DEFAULT_LENGTH
    return Tokenizers(clip_l=clip_l, clip_g=clip_g, t5=t5, clip_length=declared_length(dirs.clip_l, CLIP_LENGTH),
                      t5_length=t5_length)


def _text_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt without special tokens, no truncation (that is done by the callers)."""
    return tokenizer(list(prompts), add_special_tokens=False, verbose=False)["input_ids"]


def unknown_words(tokenizer, prompts: list[str]) -> list[str]:
    """The pieces of ``prompts`` that ``tokenizer`` reads as its unknown token, in order, each once (a word
    outside a project-made vocabulary, a character T5's Unigram lacks). Empty for tokenizers whose unknown token
    is also a start/end/pad token (CLIP's byte-level BPE, which has a token for every byte) and for slow ones."""
    unk = getattr(tokenizer, "unk_token_id", None)
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    if unk is None or unk in specials or not getattr(tokenizer, "is_fast", False):
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    words: list[str] = []
    for prompt, ids, offsets in zip(prompts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        for token, (start, end) in zip(ids, offsets, strict=True):
            word = prompt[start:end]
            if token == unk and word not in words:
                words.append(word)
    return words


def warn_unknown_words(tokenizers: Tokenizers, prompts: list[str], use_t5: bool) -> list[str]:
    """One warning naming every word of ``prompts`` that a tokenizer in use reads as unknown (the model cannot
    read them: they all become one and the same token); returns those words."""
    used = [tokenizers.clip_l, tokenizers.clip_g] + ([tokenizers.t5] if use_t5 and tokenizers.t5 else [])
    words: list[str] = []
    for tokenizer in dict.fromkeys(used):  # CLIP-L and CLIP-G often share one tokenizer
        words += [w for w in unknown_words(tokenizer, prompts) if w not in words]
    if words:
        shown = ", ".join(repr(w if len(w) <= 40 else w[:40] + "...") for w in words[:UNKNOWN_SHOWN])
        more = f" and {len(words) - UNKNOWN_SHOWN} more" if len(words) > UNKNOWN_SHOWN else ""
        logger.warning("unknown words for this model's tokenizer: %s%s (each is read as one unknown token)", shown,
                       more)
    return words


def tokenize_clip(tokenizer, prompts: list[str], pad_id: int, length: int = CLIP_LENGTH) -> torch.Tensor:
    """[B, 77] CLIP ids: BOS + up to 75 prompt tokens + EOS, padded with ``pad_id`` (ComfyUI's first chunk)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rows = []
    for ids in _text_ids(tokenizer, prompts):
        if len(ids) > length - 2:
            logger.warning("CLIP prompt of %d tokens truncated to %d", len(ids), length - 2)
        row = [bos, *ids[: length - 2], eos]
        rows.append(row + [pad_id] * (length - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def tokenize_t5(tokenizer, prompts: list[str], max_length: int = T5_DEFAULT_LENGTH) -> torch.Tensor:
    """[B, max_length] T5 ids: the prompt (truncated to max_length - 1 tokens), EOS, then pad ids."""
    if max_length < 2:
        raise ValueError(f"t5_max_length must be at least 2 (prompt + EOS), got {max_length}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for ids in _text_ids(tokenizer, prompts):
        if len(ids) > max_length - 1:
            logger.warning("T5 prompt of %d tokens truncated to %d", len(ids), max_length - 1)
        row = [*ids[: max_length - 1], eos]
        rows.append(row + [pad] * (max_length - len(row)))
    return torch.tensor(rows, dtype=torch.long)

__all__ = [
    "CLIP_G_PAD_ID",
    "CLIP_LENGTH",
    "ENV_TOKENIZERS",
    "GENERIC_TOKENIZER_CLASSES",
    "T5_DEFAULT_LENGTH",
    "T5_SUBFOLDERS",
    "UNKNOWN_SHOWN",
    "TokenizerDirs",
    "Tokenizers",
    "config_length",
    "declared_length",
    "find_tokenizer_dirs",
    "load_tokenizers",
    "reads_as_is",
    "tokenize_clip",
    "tokenize_t5",
    "tokenizers_beside",
    "unknown_words",
    "warn_unknown_words",
]
