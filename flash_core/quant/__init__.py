"""Weight-only quantization of the MM-DiT and T5 Linears (docs/algorithm.md "Quantization").

A quantized Linear keeps its weight packed in one of four formats (int8, fp8, int6, int4) with a scale, never the
float weight, and unpacks it for each call (or hands it to a faster kernel). A file stores the packed tensors
under the official names and describes itself in ``__metadata__["sd35_flash.quantization"]``.

The package is cut the way ComfyUI-GGUF cuts its own (dequantization math, ops layer, file format, backends);
each module imports only those before it:

- :mod:`.formats`: the formats and their math (pack / unpack, quantize / dequantize one weight, sizes);
- :mod:`.layer`: :class:`QuantizedLinear`, the ``nn.Module`` that holds a packed weight, and finding Linears;
- :mod:`.scheme`: what is stored on disk: :class:`QuantScheme`, applying it to a model or a state dict, the
  metadata, the elided ``pos_embed``, and the checks that build a model from an untrusted file;
- :mod:`.backends`: how the layers run on this machine (``dequant``, ``int8mm``, ``quanto``; ``auto`` times them).
"""

from . import backends, formats, layer, scheme
from .backends import *  # noqa: F403 (each module's __all__)
from .formats import *  # noqa: F403 (each module's __all__)
from .layer import *  # noqa: F403 (each module's __all__)
from .scheme import *  # noqa: F403 (each module's __all__)

__all__ = [*backends.__all__, *formats.__all__, *layer.__all__, *scheme.__all__]
