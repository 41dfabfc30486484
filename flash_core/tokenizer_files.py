"""Tokenizers that travel with a checkpoint: small project-made vocabularies embedded in its safetensors metadata.

A model whose text encoders were made with a project-made vocabulary (a tokenizer folder read as-is,
:func:`.text.reads_as_is`: e.g. the toy world's word-level ``tokenizer.json``) cannot be prompted without it. So
the files this project writes from such a model (``sd35-flash quantize``, the training's checkpoints) carry those
tokenizers in one ``__metadata__`` entry, a few KB of JSON::

    sd35_flash.tokenizers = {"clip":  {"tokenizer.json": "...", "tokenizer_config.json": "..."},
                             "t5xxl": {"tokenizer.json": "...", "tokenizer_config.json": "..."}}

``clip`` serves CLIP-L and CLIP-G (as the ``clip/`` folder of the demo's layout does); ``t5xxl`` is optional.
Released CLIP BPE / T5 Unigram tokenizers (megabytes) are never embedded: they are found as before.

Which tokenizers a checkpoint is prompted with, first found (:func:`checkpoint_tokenizers`):

1. an explicit path (``--tokenizers``, ``tokenizers=``);
2. the checkpoint's own: a diffusers folder's ``tokenizer*/``, a ``tokenizers/`` folder beside the file, the
   tokenizers embedded in the file;
3. ``$SD35_FLASH_TOKENIZERS``;
4. the ComfyUI installation.

The metadata is untrusted: an entry that is too large, is not valid JSON, has the wrong shape or does not build
a tokenizer gives one warning naming the key, and the search goes on as if the entry were absent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from .errors import TokenizerNotFoundError
from .text.tokenizers import (
    CLIP_LENGTH,
    GENERIC_TOKENIZER_CLASSES,
    T5_DEFAULT_LENGTH,
    TokenizerDirs,
    Tokenizers,
    config_length,
    declared_length,
    find_tokenizer_dirs,
    load_tokenizers,
    reads_as_is,
    tokenizers_beside,
)

logger = logging.getLogger(__name__)

METADATA_KEY = "sd35_flash.tokenizers"
SLOTS = ("clip", "t5xxl")
FILES = ("tokenizer.json", "tokenizer_config.json")
MAX_CHARS = 1 << 20  # the whole entry; the toy world's two tokenizers take about 6 KB
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
NEEDED_SPECIALS = {"clip": ("bos_token", "eos_token"), "t5xxl": ("eos_token", "pad_token")}


class EmbeddedTokenizerError(ValueError):
    """Why a checkpoint's embedded tokenizers cannot be used (the text of the one warning)."""


# ------------------------------------------------------------------------------------------------ writing


def folder_entry(dirs: TokenizerDirs) -> dict[str, dict[str, str]] | None:
    """The entry's value for tokenizer folders that are all read as-is (project-made vocabularies); None for
    released tokenizers (not embedded), for CLIP-L and CLIP-G folders that differ (one ``clip`` serves both) and
    for vocabularies too large to embed."""
    folders = [dirs.clip_l, dirs.clip_g] + ([dirs.t5] if dirs.t5 is not None else [])
    if not all(reads_as_is(folder) for folder in folders):
        return None
    entry = {"clip": _folder_files(dirs.clip_l)}
    if dirs.clip_g != dirs.clip_l and _folder_files(dirs.clip_g) != entry["clip"]:
        logger.info("CLIP-L and CLIP-G tokenizers differ (%s, %s): not embedded", dirs.clip_l, dirs.clip_g)
        return None
    if dirs.t5 is not None:
        entry["t5xxl"] = _folder_files(dirs.t5)
    if len(json.dumps(entry)) > MAX_CHARS:
        logger.info("tokenizers in %s exceed %d characters: not embedded", dirs.clip_l, MAX_CHARS)
        return None
    return entry


def _folder_files(folder: Path) -> dict[str, str]:
    return {name: (Path(folder) / name).read_text() for name in FILES}


def tokenizer_metadata(entry: Mapping | None) -> dict[str, str]:
    """``{METADATA_KEY: JSON}`` to add to a file's ``__metadata__``; ``{}`` when there is nothing to embed."""
    return {METADATA_KEY: json.dumps(entry, separators=(",", ":"))} if entry else {}


def own_tokenizer_folder(checkpoint) -> Path | None:
    """The checkpoint's own tokenizer folder: a diffusers folder holding tokenizers, or a ``tokenizers/`` folder
    beside a checkpoint file (:func:`.text.tokenizers_beside`); None when it has neither."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        return tokenizers_beside(path)
    try:
        find_tokenizer_dirs(path)
    except TokenizerNotFoundError:
        return None
    return path


def written_tokenizer_metadata(checkpoint, metadata: Mapping[str, str], path=None) -> dict[str, str]:
    """The tokenizer entry for a file written from ``checkpoint`` (a quantized copy, a trained model): the
    read-as-is tokenizers of ``path`` when given, else the checkpoint's own (its folder, or the ones embedded in
    ``metadata``); ``{}`` when those are released tokenizers, or there are none."""
    if path is None:
        path = own_tokenizer_folder(checkpoint)
    if path is not None:
        try:
            return tokenizer_metadata(folder_entry(find_tokenizer_dirs(path)))
        except TokenizerNotFoundError:
            logger.warning("no tokenizers in %s: the file written from %s carries none", path, checkpoint)
            return {}
    try:
        return tokenizer_metadata(read_entry(metadata))
    except EmbeddedTokenizerError as err:
        _warn(checkpoint, err)
        return {}


# ------------------------------------------------------------------------------------------------ reading


def read_entry(metadata: Mapping[str, str]) -> dict[str, dict[str, str]] | None:
    """The checked entry of a file's metadata (each tokenizer built once to prove it), None when absent.
    Raises EmbeddedTokenizerError saying what is wrong with it."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    entry = _parse(raw)
    _tokenizers(entry)
    return entry


def read_embedded(metadata: Mapping[str, str]) -> Tokenizers | None:
    """The tokenizers embedded in a file's metadata, built in memory; None when there are none. Raises
    EmbeddedTokenizerError saying what is wrong with the entry."""
    raw = metadata.get(METADATA_KEY)
    return None if raw is None else _tokenizers(_parse(raw))


def embedded_tokenizers(metadata: Mapping[str, str], source: str) -> Tokenizers | None:
    """:func:`read_embedded`, with one warning naming the key instead of an error for an unusable entry."""
    try:
        return read_embedded(metadata)
    except EmbeddedTokenizerError as err:
        _warn(source, err)
        return None


def _warn(source, err: EmbeddedTokenizerError) -> None:
    logger.warning("%s: metadata '%s' ignored (%s); looking for the model's tokenizers elsewhere", source,
                   METADATA_KEY, err)


def _parse(raw) -> dict[str, dict[str, str]]:
    """The entry as ``{slot: {file name: text}}``, its shape checked."""
    if not isinstance(raw, str):
        raise EmbeddedTokenizerError(f"a {type(raw).__name__}, not JSON text")
    if len(raw) > MAX_CHARS:
        raise EmbeddedTokenizerError(f"{len(raw)} characters, more than the {MAX_CHARS} allowed")
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise EmbeddedTokenizerError(f"not valid JSON: {_first_line(err)}") from None
    if not isinstance(entry, dict):
        raise EmbeddedTokenizerError(f"a JSON {type(entry).__name__}, not an object of tokenizer folders")
    unknown = sorted(set(entry) - set(SLOTS))
    if unknown:
        raise EmbeddedTokenizerError(f"an unknown folder {unknown[0][:40]!r}; expected {' and '.join(SLOTS)}")
    if "clip" not in entry:
        raise EmbeddedTokenizerError("no 'clip' tokenizer")
    for slot, files in entry.items():
        if not (isinstance(files, dict) and set(files) == set(FILES)
                and all(isinstance(text, str) for text in files.values())):
            raise EmbeddedTokenizerError(f"'{slot}' must map {' and '.join(FILES)} to their text")
    return entry


def _tokenizers(entry: Mapping[str, Mapping[str, str]]) -> Tokenizers:
    """Build the tokenizers in memory, with the row lengths their configs declare (as for a folder)."""
    clip, clip_config = _build("clip", entry["clip"])
    if "t5xxl" not in entry:
        return Tokenizers(clip_l=clip, clip_g=clip, clip_length=config_length(clip_config, CLIP_LENGTH))
    t5, t5_config = _build("t5xxl", entry["t5xxl"])
    return Tokenizers(clip_l=clip, clip_g=clip, t5=t5, clip_length=config_length(clip_config, CLIP_LENGTH),
                      t5_length=config_length(t5_config, T5_DEFAULT_LENGTH))


def _build(slot: str, files: Mapping[str, str]) -> tuple[PreTrainedTokenizerFast, dict]:
    """One ``PreTrainedTokenizerFast`` from a tokenizer.json and the special tokens of its config."""
    where = f"'{slot}/tokenizer_config.json'"
    try:
        config = json.loads(files["tokenizer_config.json"])
    except (ValueError, RecursionError) as err:
        raise EmbeddedTokenizerError(f"{where} is not valid JSON: {_first_line(err)}") from None
    if not isinstance(config, dict) or config.get("tokenizer_class") not in GENERIC_TOKENIZER_CLASSES:
        raise EmbeddedTokenizerError(f"{where} does not declare a tokenizer read as-is (tokenizer_class "
                                     f"{' or '.join(GENERIC_TOKENIZER_CLASSES)})")
    specials = {key: config[key] for key in SPECIAL_KEYS if config.get(key) is not None}
    wrong = [key for key, value in specials.items() if not isinstance(value, str)]
    missing = [key for key in NEEDED_SPECIALS[slot] if key not in specials]
    if wrong or missing:
        raise EmbeddedTokenizerError(f"{where}: {(wrong or missing)[0]} is {'not text' if wrong else 'missing'}")
    try:
        backend = Tokenizer.from_str(files["tokenizer.json"])
    except Exception as err:  # the tokenizers library raises a bare Exception for any malformed file
        raise EmbeddedTokenizerError(f"'{slot}/tokenizer.json' is not a tokenizers file: {_first_line(err)}") from None
    absent = [value for value in specials.values() if backend.token_to_id(value) is None]
    if absent:
        raise EmbeddedTokenizerError(f"'{slot}': the special token {absent[0][:40]!r} is not in its vocabulary")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials), config


def _first_line(err: BaseException, limit: int = 120) -> str:
    text = (str(err).splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------ the search


def checkpoint_tokenizers(checkpoint, metadata: Mapping[str, str] | None = None, path=None) -> Tokenizers:
    """The tokenizers to prompt ``checkpoint`` with, first found: ``path`` (the only place looked when given);
    the checkpoint's own (a diffusers folder's, a ``tokenizers/`` folder beside the file, the ones embedded in
    its ``metadata``); ``$SD35_FLASH_TOKENIZERS``; the ComfyUI installation. Raises TokenizerNotFoundError
    listing the places looked."""
    if path is not None:
        return load_tokenizers(path)
    folder = own_tokenizer_folder(checkpoint)
    if folder is not None:
        return load_tokenizers(folder)
    embedded = embedded_tokenizers(metadata or {}, str(checkpoint))
    if embedded is not None:
        logger.info("%s: using the tokenizers embedded in its metadata ('%s')", checkpoint, METADATA_KEY)
        return embedded
    try:
        return load_tokenizers(None)
    except TokenizerNotFoundError as err:
        raise TokenizerNotFoundError(
            f"'{checkpoint}' has no tokenizers of its own (no tokenizer folder in or beside it, none embedded "
            f"in its metadata as '{METADATA_KEY}').\n{err}") from None


def own_row_lengths(checkpoint, metadata: Mapping[str, str]) -> tuple[int, int, str] | None:
    """``(CLIP row, T5 row, where from)`` of the checkpoint's own tokenizers (its folder's declared lengths, or
    the embedded ones'); None when it has none (released encoders: SD3's 77 and 77). Raises
    EmbeddedTokenizerError for an unusable embedded entry."""
    folder = own_tokenizer_folder(checkpoint)
    if folder is not None:
        dirs = find_tokenizer_dirs(folder)
        t5 = declared_length(dirs.t5, T5_DEFAULT_LENGTH) if dirs.t5 is not None else T5_DEFAULT_LENGTH
        return declared_length(dirs.clip_l, CLIP_LENGTH), t5, f"its tokenizers in {folder}"
    toks = read_embedded(metadata)
    if toks is None:
        return None
    return toks.clip_length, toks.t5_length, f"its tokenizers embedded in the metadata ('{METADATA_KEY}')"
