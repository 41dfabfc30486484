"""Quantize MODEL (SD3.5 Flash): any loaded SD3.x MODEL -> the same model with packed Linears (nodes/quant_ops.py)."""

from __future__ import annotations

from ..flash_core.quant import DEFAULT_GROUP_SIZE, FORMATS
from . import quant_ops
from .loaders import CATEGORY
from .schema import combo, inputs, outputs

MAX_GROUP_SIZE = 4096


class FlashQuantizeModel:
    """A loaded SD3 / SD3.5 MODEL (any loader) -> the same MODEL with its MM-DiT Linears quantized."""

    NODE_TYPE = "SD35FlashQuantizeModel"
    INPUT_TYPES = inputs(
        NODE_TYPE,
        model={"tooltip": "An SD3 / SD3.5 / SD3.5-Flash MODEL from any loader. Its LoRA patches, "
                          "ModelSamplingSD3 shift and other model patches carry over."},
        format=combo(list(FORMATS), default="int8",
                     tooltip="int8: per-output-channel scales, about half the 16-bit memory; fp8: e4m3 with one "
                             "scale per layer (ComfyUI's scaled-fp8 layout); int6 / int4: per-group scales, about "
                             "0.4 / 0.3 of the memory, with more error."),
        group_size={"default": DEFAULT_GROUP_SIZE, "min": 0, "max": MAX_GROUP_SIZE, "step": 1,
                    "tooltip": "Inputs that share one scale in int6 / int4 (64 is what the CLI uses; 0 = one "
                               "scale per output row). Ignored by int8 and fp8."},
    )
    RETURN_TYPES, RETURN_NAMES = outputs(NODE_TYPE)
    OUTPUT_TOOLTIPS = ("The quantized MODEL: embedders and final layer stay 16-bit, every other Linear is packed "
                       "and dequantized per layer while sampling.",)
    FUNCTION = "quantize"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Quantizes the MM-DiT of any loaded SD3.x MODEL to int8, fp8, int6 or int4 weights "
                   "(weight-only, dequantized per layer); LoRAs applied before or after still apply.")

    def quantize(self, model, format: str, group_size: int = DEFAULT_GROUP_SIZE):  # noqa: A002 (the input's name)
        return (quant_ops.quantize_model(model, format, group_size),)
