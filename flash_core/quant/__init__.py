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

from .backends import (
    BACKENDS,
    QUANTO_TYPES,
    BackendChoice,
    available_backends,
    choose_backend,
    quanto_available,
    set_backend,
)
from .formats import (
    BITS,
    DEFAULT_GROUP_SIZE,
    FORMATS,
    FP8_DTYPE,
    FP8_MARKER,
    FP8_MAX,
    GROUPED,
    MIN_SCALE,
    QMAX,
    SCALE_DTYPE,
    SCALE_KEY,
    STORED_DTYPE,
    QuantError,
    QuantizedWeight,
    can_quantize,
    check_format,
    dequantize,
    dequantize_tensors,
    layer_group,
    logical_in_features,
    pack_int4,
    pack_int6,
    quantize_weight,
    quantized_nbytes,
    relative_rms_error,
    sd_nbytes,
    unpack_int4,
    unpack_int6,
)
from .layer import QuantizedLinear, linear_layers, quantized_layers, set_submodule
from .scheme import (
    DEFAULT_EXCLUDE,
    MAX_GROUP_SIZE,
    MAX_LAYERS,
    MAX_POS_EMBED_SIDE,
    MAX_SCHEME_CHARS,
    METADATA_KEY,
    POS_EMBED_DTYPES,
    QuantScheme,
    cast_unpacked,
    check_stored_scheme,
    elide_pos_embed,
    install_packed,
    logical_shapes,
    parse_schemes,
    quantize_module,
    quantize_state_dict,
    read_schemes,
    restore_pos_embed,
    stored_layers,
    write_schemes,
)

__all__ = [
    # formats
    "BITS", "DEFAULT_GROUP_SIZE", "FORMATS", "FP8_DTYPE", "FP8_MARKER", "FP8_MAX", "GROUPED", "MIN_SCALE", "QMAX",
    "SCALE_DTYPE", "SCALE_KEY", "STORED_DTYPE", "QuantError", "QuantizedWeight", "can_quantize", "check_format",
    "dequantize", "dequantize_tensors", "layer_group", "logical_in_features", "pack_int4", "pack_int6",
    "quantize_weight", "quantized_nbytes", "relative_rms_error", "sd_nbytes", "unpack_int4", "unpack_int6",
    # layer
    "QuantizedLinear", "linear_layers", "quantized_layers", "set_submodule",
    # scheme
    "DEFAULT_EXCLUDE", "MAX_GROUP_SIZE", "MAX_LAYERS", "MAX_POS_EMBED_SIDE", "MAX_SCHEME_CHARS", "METADATA_KEY",
    "POS_EMBED_DTYPES", "QuantScheme", "cast_unpacked", "check_stored_scheme", "elide_pos_embed", "install_packed",
    "logical_shapes", "parse_schemes", "quantize_module", "quantize_state_dict", "read_schemes",
    "restore_pos_embed", "stored_layers", "write_schemes",
    # backends
    "BACKENDS", "QUANTO_TYPES", "BackendChoice", "available_backends", "choose_backend", "quanto_available",
    "set_backend",
]
