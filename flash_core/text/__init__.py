"""SD3 triple text encoder: CLIP-L + CLIP-G + optional T5-XXL, their tokenizers and the conditioning assembly.

Implements docs/algorithm.md "Text encoders and T5 dropout" the way ComfyUI's ``comfy/text_encoders/sd3_clip.py``
does it (docs/comfyui.md), so that a prompt of at most 75 tokens gives the same conditioning as ComfyUI. T5 is
optional: without it (or with ``use_t5=False``) the context holds the 77 CLIP tokens only.

What lives where (:mod:`.encoders` imports :mod:`.tokenizers`, never the reverse):

* :mod:`.tokenizers`: the :class:`Tokenizers` bundle and the search for tokenizer folders (a path given,
  ``$SD35_FLASH_TOKENIZERS``, the ComfyUI installation; :func:`tokenizers_beside` a checkpoint file), loading
  them, the row lengths a folder declares, the CLIP and T5 token rows and the unknown-word warning.
* :mod:`.encoders`: encoder configs inferred from state dicts and checked, the CLIP and T5 models built from
  them, their outputs, the SD3 ``(context, pooled)`` assembly and :class:`TripleTextEncoder`, which ties the
  two together.

Everything public is re-exported here, so ``from sd35_flash.flash_core.text import X`` works for both.
"""

from .encoders import (
    CLIP_ACTIVATIONS,
    CLIP_G_POOLED,
    CLIP_HEAD_DIM,
    CLIP_L_WIDTH,
    CONTEXT_DIM,
    POOLED_DIM,
    RELEASED_WIDTHS,
    SLOT_NAMES,
    TripleTextEncoder,
    assemble_conditioning,
    build_clip,
    build_t5,
    encode_clip,
    encode_t5,
    first_eos_position,
    infer_clip_config,
    infer_t5_config,
)
from .tokenizers import (
    CLIP_G_PAD_ID,
    CLIP_LENGTH,
    ENV_TOKENIZERS,
    GENERIC_TOKENIZER_CLASSES,
    T5_DEFAULT_LENGTH,
    T5_SUBFOLDERS,
    UNKNOWN_SHOWN,
    TokenizerDirs,
    Tokenizers,
    config_length,
    declared_length,
    find_tokenizer_dirs,
    load_tokenizers,
    reads_as_is,
    tokenize_clip,
    tokenize_t5,
    tokenizers_beside,
    unknown_words,
    warn_unknown_words,
)

__all__ = [
    "CLIP_ACTIVATIONS",
    "CLIP_G_PAD_ID",
    "CLIP_G_POOLED",
    "CLIP_HEAD_DIM",
    "CLIP_LENGTH",
    "CLIP_L_WIDTH",
    "CONTEXT_DIM",
    "ENV_TOKENIZERS",
    "GENERIC_TOKENIZER_CLASSES",
    "POOLED_DIM",
    "RELEASED_WIDTHS",
    "SLOT_NAMES",
    "T5_DEFAULT_LENGTH",
    "T5_SUBFOLDERS",
    "UNKNOWN_SHOWN",
    "TokenizerDirs",
    "Tokenizers",
    "TripleTextEncoder",
    "assemble_conditioning",
    "build_clip",
    "build_t5",
    "config_length",
    "declared_length",
    "encode_clip",
    "encode_t5",
    "find_tokenizer_dirs",
    "first_eos_position",
    "infer_clip_config",
    "infer_t5_config",
    "load_tokenizers",
    "reads_as_is",
    "tokenize_clip",
    "tokenize_t5",
    "tokenizers_beside",
    "unknown_words",
    "warn_unknown_words",
]
