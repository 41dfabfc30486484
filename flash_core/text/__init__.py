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

from . import encoders, tokenizers
from .encoders import *  # noqa: F403 (each module's __all__)
from .tokenizers import *  # noqa: F403 (each module's __all__)

__all__ = [*encoders.__all__, *tokenizers.__all__]
