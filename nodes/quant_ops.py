"""Quantized MM-DiT weights inside ComfyUI's own SD3 model: the ComfyUI-GGUF pattern.

``comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": operations()})`` builds
ComfyUI's own MMDiT (its detection, its sampling, its LoRA key maps) with :func:`operations`' Linear, which keeps
a packed weight (the formats of flash_core/quant/formats.py: int8, fp8, int6, int4) and dequantizes it to the input's
dtype and device on every call with the engine's own :func:`~..flash_core.quant.dequantize_tensors`. Linears
the scheme leaves in 16 bits (embedders, final layer) load as ComfyUI's ``manual_cast`` Linear does.

LoRA on packed weights. ComfyUI's :class:`ModelPatcher` merges a patch into the stored weight
(``patch_weight_to_device``). A merge into a packed weight would re-quantize the LoRA delta (ComfyUI does that
for its scaled fp8 files, with stochastic rounding; at 4 bits a LoRA smaller than a step would vanish), so
:func:`patcher_class` never merges into packed weights: it attaches ComfyUI's own lazy patch object
(``LowVramPatch``, what ComfyUI itself uses for layers it keeps off the GPU) to the layer's ``weight_function``
when the model loads, and the layer applies it to the dequantized fp32 weight on every call. The same path
serves ComfyUI's low-VRAM partial loads, which attach ``LowVramPatch`` themselves. Biases stay float and are
patched the usual way.

Every ``comfy`` import is inside a function: this module imports where ComfyUI is absent.
"""

from __future__ import annotations

import copy

import torch

from ..flash_core import quant
from ..flash_core.errors import CheckpointError, FlashError
from .attributes import CARRIED, QUANT_ATTRIBUTE

PACKED_FLAG = "sd35_flash_packed"  # class attribute of our Linear
# Linear weights whose shapes ComfyUI's SD3 detection reads (comfy/model_detection.py, MMDiT branch). int6 and
# int4 change a packed weight's width, so these are unpacked before detection (the default scheme keeps them
# in 16 bits anyway). final_layer.linear is read for its output width only, which packing keeps.
DETECTION_READS_WIDTH = ("context_embedder", "y_embedder.mlp.0")
_CACHE: dict[str, type] = {}


# ------------------------------------------------------------------------------------------------ the ops


def operations() -> type:
    """The ``custom_operations`` class (one per process, so ComfyUI sees one stable type)."""
    if "ops" not in _CACHE:
        _CACHE["ops"] = _make_operations()
    return _CACHE["ops"]


def is_packed(module) -> bool:
    return getattr(module, PACKED_FLAG, False) and getattr(module, "fmt", None) is not None


def packed_modules(root: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in root.named_modules() if is_packed(m)}


def _packed_format(data: torch.Tensor, scale_name: str, in_features: int) -> str | None:
    """Which format a stored ``(weight, scale)`` pair is, from the scale's name, the weight's dtype and its width
    against the layer's inputs (int4 packs two values a byte, int6 four in three)."""
    if scale_name == quant.SCALE_KEY["fp8"]:
        return "fp8"
    if data.dtype == quant.STORED_DTYPE["int8"]:
        return "int8"
    if data.dtype == torch.uint8 and data.ndim == 2:
        cols = data.shape[1]
        if 2 * cols == in_features:
            return "int4"
        if 4 * cols == 3 * in_features:
            return "int6"
    return None


def _load_linear(layer, state_dict, prefix: str, missing_keys: list) -> None:
    """Take a Linear's tensors from the state dict: packed (a scale key is present) or float (cast to the model's
    dtype, as ComfyUI's own Linear copies it)."""
    wkey, bkey = f"{prefix}weight", f"{prefix}bias"
    weight = state_dict.get(wkey)
    scale_names = [s for s in dict.fromkeys(quant.SCALE_KEY.values()) if f"{prefix}{s}" in state_dict]
    expected = (layer.out_features, layer.in_features)
    if weight is None:
        missing_keys.append(wkey)
    elif scale_names:
        skey = f"{prefix}{scale_names[0]}"
        scale = state_dict[skey]
        fmt = _packed_format(weight, scale_names[0], layer.in_features)
        if fmt is None:
            raise CheckpointError(f"'{wkey}' ({weight.dtype}, shape {list(weight.shape)}) with '{skey}' is no packed "
                                  f"format of a Linear with {layer.in_features} inputs")
        shape = quant.stored_layers({wkey: weight, skey: scale}, fmt, "the MM-DiT")[prefix[:-1]]
        if shape != expected:
            raise CheckpointError(f"'{wkey}' unpacks to {list(shape)}, expected {list(expected)} for the architecture "
                                  "detected from the other weights")
        layer.fmt = fmt
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        setattr(layer, quant.SCALE_KEY[fmt], torch.nn.Parameter(scale, requires_grad=False))
    else:
        if tuple(weight.shape) != expected:
            raise CheckpointError(f"'{wkey}' has shape {list(weight.shape)}, expected {list(expected)}")
        layer.weight = torch.nn.Parameter(weight.to(layer.float_dtype or weight.dtype, copy=True), requires_grad=False)
    if layer.has_bias:
        bias = state_dict.get(bkey)
        if bias is None:
            missing_keys.append(bkey)
        else:
            layer.bias = torch.nn.Parameter(bias.to(layer.float_dtype or bias.dtype, copy=True), requires_grad=False)


def _lazy_patches(functions: list) -> list:
    """The layer's weight functions with ComfyUI's LoRA patch objects once per key (a low-VRAM load may attach
    one for a key that the model load already attached)."""
    import comfy.model_patcher

    seen, out = set(), []
    for f in functions:
        if isinstance(f, comfy.model_patcher.LowVramPatch):
            if f.key in seen:
                continue
            seen.add(f.key)
        out.append(f)
    return out


def _make_operations() -> type:
    import comfy.model_management
    import comfy.ops

    class FlashQuantOps(comfy.ops.manual_cast):
        """ComfyUI's ``manual_cast`` operations with a Linear that keeps packed weights."""

        class Linear(comfy.ops.manual_cast.Linear):
            sd35_flash_packed = True

            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                torch.nn.Module.__init__(self)  # no float weight is allocated: the state dict brings the tensors
                self.in_features, self.out_features = in_features, out_features
                self.has_bias, self.float_dtype, self.fmt = bias, dtype, None
                self.register_parameter("weight", None)
                self.register_parameter("bias", None)

            def reset_parameters(self):
                return None

            def extra_repr(self):
                fmt = self.fmt or (str(self.weight.dtype)[6:] if self.weight is not None else "empty")
                return f"in_features={self.in_features}, out_features={self.out_features}, format={fmt}"

            @property
            def scale(self) -> torch.Tensor:
                return getattr(self, quant.SCALE_KEY[self.fmt])

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                _load_linear(self, state_dict, prefix, missing_keys)

            def _apply(self, fn, recurse=True):
                """Device moves move packed tensors; dtype casts (``model.to(torch.float16)``) never convert them:
                their dtypes are the format."""
                if self.fmt is None:
                    return super()._apply(fn, recurse)
                held = {n: self._parameters.pop(n) for n in ("weight", quant.SCALE_KEY[self.fmt])}
                try:
                    super()._apply(fn, recurse)
                finally:
                    for name, param in held.items():
                        moved = fn(param.data)
                        if moved.dtype != param.dtype:
                            moved = param.data.to(moved.device)
                        self._parameters[name] = torch.nn.Parameter(moved, requires_grad=False)
                return self

            def dequantized_weight(self, dtype: torch.dtype, device=None) -> torch.Tensor:
                non_blocking = comfy.model_management.device_supports_non_blocking(device)
                data = self.weight.to(device, non_blocking=non_blocking)
                scale = self.scale.to(device, non_blocking=non_blocking)
                return quant.dequantize_tensors(self.fmt, data, scale, dtype)

            def packed_weight_bias(self, input: torch.Tensor):
                """ComfyUI's ``cast_bias_weight`` for a packed layer: the weight dequantized to the input's dtype
                and device, with pending LoRA patches (and training weight wrappers) applied in fp32."""
                dtype, device = input.dtype, input.device
                bias = None
                if self.bias is not None:
                    bias = comfy.model_management.cast_to(self.bias, dtype, device,
                                                          copy=len(self.bias_function) > 0)
                    for f in self.bias_function:
                        bias = f(bias)
                functions = _lazy_patches(self.weight_function)
                weight = self.dequantized_weight(torch.float32 if functions else dtype, device)
                for f in functions:
                    weight = f(weight)
                return weight.to(dtype), bias

            def forward_comfy_cast_weights(self, input, *args, **kwargs):
                if self.fmt is None:
                    return super().forward_comfy_cast_weights(input, *args, **kwargs)
                weight, bias = self.packed_weight_bias(input)
                return torch.nn.functional.linear(input, weight, bias)

            def forward(self, *args, **kwargs):
                if self.fmt is not None:
                    return self.forward_comfy_cast_weights(*args, **kwargs)
                return super().forward(*args, **kwargs)

    return FlashQuantOps


# ------------------------------------------------------------------------------------------------ the patcher


def patcher_class() -> type:
    """ComfyUI's ModelPatcher that never merges a patch into a packed weight (see the module doc)."""
    if "patcher" not in _CACHE:
        _CACHE["patcher"] = _make_patcher()
    return _CACHE["patcher"]


def _owner(model: torch.nn.Module, key: str):
    """``(module, attribute)`` for a state-dict key, or ``(None, None)``."""
    name, _, attribute = key.rpartition(".")
    try:
        return model.get_submodule(name), attribute
    except AttributeError:
        return None, None


def _packed_weight_owner(model, key: str):
    module, attribute = _owner(model, key)
    return module if attribute == "weight" and is_packed(module) else None


def _make_patcher() -> type:
    import comfy.model_patcher

    class LazyPatch(comfy.model_patcher.LowVramPatch):
        """A LoRA patch the packed layer applies per call (attached by the patcher on every load)."""

    class FlashQuantModelPatcher(comfy.model_patcher.ModelPatcher):
        """ModelPatcher for a model with packed Linears: their patches stay lazy (applied per call, in fp32, to
        the dequantized weight); everything else is ComfyUI's."""

        def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
            if _packed_weight_owner(self.model, key) is not None:
                return  # attached in load(); the packed weight itself never changes
            return super().patch_weight_to_device(key, device_to, inplace_update)

        def load(self, *args, **kwargs):
            result = super().load(*args, **kwargs)
            for name, module in packed_modules(self.model).items():
                key = f"{name}.weight"
                functions = [f for f in module.weight_function if not isinstance(f, LazyPatch)]
                present = any(isinstance(f, comfy.model_patcher.LowVramPatch) and f.key == key for f in functions)
                if key in self.patches and not present:
                    functions.insert(0, LazyPatch(key, self.patches))  # before weight wrappers, as ComfyUI orders
                module.weight_function = functions
            return result

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for module in packed_modules(self.model).values():
                    module.weight_function = [f for f in module.weight_function if not isinstance(f, LazyPatch)]
            return super().unpatch_model(device_to, unpatch_weights)

        def patch_hook_weight_to_device(self, hooks, combined_patches, key, original_weights, memory_counter):
            if _packed_weight_owner(self.model, key) is not None:
                raise FlashError(f"'{key}' is a quantized weight: hook LoRAs (Create Hook LoRA) cannot patch it; "
                                 "apply the LoRA with LoraLoader / LoraLoaderModelOnly instead")
            return super().patch_hook_weight_to_device(hooks, combined_patches, key, original_weights,
                                                       memory_counter)

        def get_key_patches(self, filter_prefix=None):
            """Packed weights as their fp32 values, so model merging and LoRA extraction read real weights."""
            patches = super().get_key_patches(filter_prefix)
            for key, entries in patches.items():
                module = _packed_weight_owner(self.model, key)
                if module is not None:
                    patches[key] = [(module.dequantized_weight(torch.float32, module.weight.device),
                                     lambda a, **kwargs: a)] + entries[1:]
            return patches

    return FlashQuantModelPatcher


def as_quant_patcher(patcher):
    """The same model behind :func:`patcher_class` (a fresh patcher from ComfyUI's loader: nothing to carry)."""
    cls = patcher_class()
    return cls(patcher.model, patcher.load_device, patcher.offload_device)


# Patcher state that belongs to the model object rather than to the patcher's list of patches.
_MODEL_BOUND = {"model", "size", "backup", "object_patches_backup", "hook_backup", "cached_hook_patches",
                "is_injected", "load_device", "offload_device"}


def rebind(patcher, base_model):
    """A :func:`patcher_class` patcher of ``base_model`` carrying everything ``patcher`` carries (LoRA and other
    weight patches, object patches such as ModelSamplingSD3's, model options, wrappers, callbacks, hooks)."""
    cls = patcher_class()
    out = cls(base_model, patcher.load_device, patcher.offload_device,
              weight_inplace_update=patcher.weight_inplace_update)
    for name, value in vars(patcher.clone()).items():
        if name not in _MODEL_BOUND:
            setattr(out, name, value)
    out.size = 0
    out.model_size()
    return out


def check_loaded(diffusion_model: torch.nn.Module, what: str) -> int:
    """Every Linear of ours holds a weight (ComfyUI loads non-strictly and only logs missing keys); returns the
    number of packed layers."""
    for name, module in diffusion_model.named_modules():
        if getattr(module, PACKED_FLAG, False):
            if module.weight is None:
                raise CheckpointError(f"{what}: missing key '{name}.weight'")
            if module.has_bias and module.bias is None:
                raise CheckpointError(f"{what}: missing key '{name}.bias'")
    return len(packed_modules(diffusion_model))


# ------------------------------------------------------------------------------------------------ loading


def detection_safe(sd: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Unpack the weights whose width ComfyUI's detection reads when the format changes widths (int6 / int4,
    only in files quantized with a custom exclude list); they load as float layers."""
    if fmt not in quant.GROUPED:
        return sd
    out = dict(sd)
    for layer in DETECTION_READS_WIDTH:
        skey = f"{layer}.{quant.SCALE_KEY[fmt]}"
        if skey in out:
            scale = out.pop(skey)
            out[f"{layer}.weight"] = quant.dequantize_tensors(fmt, out[f"{layer}.weight"], scale, dtype or torch.float32)
    return out


def mmdit_state_dict(files, quantize: str, dtype: torch.dtype | None):
    """``(state dict, QuantScheme or None)`` of the checkpoint's MM-DiT for ComfyUI's loader.

    A quantized file (its metadata says so) comes as stored, validated layer by layer; with ``quantize`` set,
    a 16-bit file is quantized while it is read, by the engine's own code path
    (:func:`..flash_core.quant_io.quantizable_state`: ``QuantScheme.default("mmdit", fmt)``, the weights cast
    to ``dtype`` first, as ``sd35-flash generate --weights`` does)."""
    from ..flash_core.quant_io import quantizable_state

    source = f"'{files.sources['mmdit'][0]}'"
    if quantize != "none":
        quant.check_format(quantize, "quantize")
    sd, scheme = quantizable_state(files, "mmdit", None if quantize == "none" else quantize, dtype)
    if scheme is None:
        # ComfyUI's own scaled-fp8 files (scale_weight, no metadata of ours) take ComfyUI's stock path.
        integer = sorted(k for k in sd if k.endswith(f".{quant.SCALE_KEY['int8']}"))
        if integer:
            raise CheckpointError(f"{source}: holds quantized layers (e.g. '{integer[0]}') but no "
                                  f"'{quant.METADATA_KEY}' metadata saying their format")
        return sd, None
    quant.stored_layers(sd, scheme.fmt, source)
    sd = quant.restore_pos_embed(sd, scheme)
    return detection_safe(sd, scheme.fmt, dtype), scheme


def finish_loaded(patcher, scheme, what: str):
    """Check what ComfyUI loaded with :func:`operations` and wrap it in :func:`patcher_class`."""
    layers = check_loaded(patcher.model.diffusion_model, what)
    setattr(patcher.model, QUANT_ATTRIBUTE, {**scheme.to_json(), "layers": layers})
    return as_quant_patcher(patcher)


# ------------------------------------------------------------------------------------------------ quantize MODEL


def _float_dtype(base_model) -> torch.dtype:
    dtype = base_model.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def source_tensors(patcher):
    """``(key, tensor)`` of the diffusion model's unpatched weights, one at a time: merged LoRA weights are
    read from ComfyUI's backup, packed layers (ours, or ComfyUI's scaled fp8) come dequantized."""
    base = patcher.model
    diffusion = base.diffusion_model
    dtype = _float_dtype(base)
    skip = set(quant.SCALE_KEY.values()) | {"scale_input"}
    for key, tensor in diffusion.state_dict().items():
        full = f"diffusion_model.{key}"
        if full in patcher.backup:
            tensor = patcher.backup[full].weight
        if full in patcher.hook_backup:
            tensor = patcher.hook_backup[full][0]
        module, attribute = _owner(diffusion, key)
        if is_packed(module):
            if attribute == "weight":
                yield key, module.dequantized_weight(module.float_dtype or dtype, module.weight.device)
            elif attribute not in skip:
                yield key, tensor
            continue
        scale = getattr(module, "scale_weight", None) if module is not None else None
        if isinstance(scale, torch.Tensor):  # ComfyUI's scaled fp8 layer: weight * scale_weight
            if attribute == "weight":
                yield key, tensor.to(dtype) * scale.to(tensor.device, dtype)
            elif attribute not in skip:
                yield key, tensor
            continue
        yield key, tensor


def quantize_model(patcher, fmt: str, group_size: int = quant.DEFAULT_GROUP_SIZE):
    """A quantized copy of an SD3.x MODEL: ComfyUI's same model class and config with :func:`operations`, its
    Linears quantized with ``QuantScheme.default("mmdit", fmt, group_size)`` one at a time, and every patch,
    object patch and model option of ``patcher`` carried over (:func:`rebind`)."""
    import comfy.model_base

    base = patcher.model
    if not isinstance(base, comfy.model_base.SD3):
        raise FlashError(f"Quantize MODEL takes an SD3 / SD3.5 model; this MODEL is {type(base).__name__}")
    scheme = quant.QuantScheme.default("mmdit", quant.check_format(fmt), int(group_size))
    names = [n for n, m in base.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)]
    sd = quant.quantize_state_dict(source_tensors(patcher), names, scheme)
    sd.pop(quant.FP8_MARKER, None)
    config = copy.copy(base.model_config)
    config.custom_operations = operations()
    new = config.get_model({}, "", device=patcher.offload_device)
    missing, unexpected = new.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise FlashError("the quantized model does not match the input's layout: "
                         + (f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"))
    del sd
    layers = check_loaded(new.diffusion_model, "the quantized MODEL")
    new.to(patcher.offload_device)
    for name in CARRIED:
        if hasattr(base, name):
            setattr(new, name, getattr(base, name))
    setattr(new, QUANT_ATTRIBUTE, {**scheme.to_json(), "layers": layers})
    return rebind(patcher, new)


def describe(base_model) -> str:
    info = getattr(base_model, QUANT_ATTRIBUTE, None)
    if not info:
        return "none"
    group = f", group {info['group_size']}" if "group_size" in info else ""
    return f"{info['format']}, {info['layers']} layers{group}"


__all__ = ["as_quant_patcher", "describe", "mmdit_state_dict", "operations", "patcher_class", "quantize_model",
           "rebind"]
