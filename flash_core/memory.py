"""Memory tiers: which parts load where, in which format, and the peak that plan should reach.

docs/algorithm.md "Quantization": the 16-bit pipeline with T5 is the largest; the MM-DiT in 8 bits with T5 off is
the paper's consumer tier. ``sd35-flash generate --memory auto|<GiB>`` asks :func:`plan_memory` for the
first of these tiers whose estimated peak fits the budget:

1. everything resident, as requested;
2. the text encoders released after encoding, the MM-DiT after denoising (each part is loaded when its phase
   starts: the peak is the largest phase, not the sum);
3. as 2, with T5 in int8;
4. as 2, with T5 off (77 CLIP tokens);
5. as 4, with the MM-DiT in int8, then in int4 (when the weights format was not fixed by the caller).

Estimates come from the checkpoint headers (exact weight bytes, packed formats included) plus activation
terms for the phase's tensors; they are estimates, and ``benchmarks/quantization.py`` measures the real peak.
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .checkpoint import CheckpointFiles, component_quant, logical_component_shapes, packed_keys
from .checkpoint_info import vae_downscale
from .errors import FlashError
from .quant import DEFAULT_EXCLUDE, DEFAULT_GROUP_SIZE, can_quantize, quantized_nbytes

GIB = 2**30
TEXT = ("clip_l", "clip_g", "t5")
CLIP_TOKENS = 77
T5_TOKENS = 256


@dataclass(frozen=True)
class Tier:
    """One candidate: the MM-DiT's weight format (None: as stored / requested dtype), T5's (``"dtype"``,
    a quantized format, or ``"off"``) and whether parts are released after their phase."""

    mmdit: str | None
    t5: str
    offload: bool


@dataclass
class MemoryPlan:
    tier: Tier
    weights: dict[str, int]                 # bytes per component as it will be held
    activations: dict[str, int]             # bytes per phase: encode, denoise, decode
    phases: dict[str, int] = field(default_factory=dict)  # estimated bytes held during each phase
    budget: int | None = None

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def use_t5(self) -> bool:
        return self.tier.t5 != "off"

    @property
    def t5_weights(self) -> str | None:
        return None if self.tier.t5 in ("dtype", "off") else self.tier.t5

    def describe(self) -> str:
        t5 = {"off": "off (77 CLIP tokens)", "dtype": "on"}.get(self.tier.t5, f"on, {self.tier.t5}")
        lines = [f"memory plan: MM-DiT {self.tier.mmdit or 'as stored'}, T5 {t5}, "
                 f"{'parts released after use' if self.tier.offload else 'all parts resident'}"]
        lines += [f"  {name:<8} {nbytes / GIB:7.2f} GiB" for name, nbytes in self.weights.items() if nbytes]
        lines += [f"  {phase:<8} {nbytes / GIB:7.2f} GiB held (weights + activations)"
                  for phase, nbytes in self.phases.items()]
        budget = f" of a {self.budget / GIB:.2f} GiB budget" if self.budget else ""
        lines.append(f"  estimated peak {self.peak / GIB:.2f} GiB{budget}")
        return "\n".join(lines)


def parse_budget(text: str, device: torch.device) -> int:
    """``auto`` (free memory of the device, less 10 %) or a number of GiB."""
    if text == "auto":
        return int(free_memory(device) * 0.9)
    try:
        gib = float(text)
    except ValueError:
        raise FlashError(f"--memory '{text}' is neither 'auto' nor a number of GiB") from None
    if not math.isfinite(gib) or gib <= 0:
        raise FlashError(f"--memory {text} must be a positive number of GiB")
    return int(gib * GIB)


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's ``mem_get_info``, or the system's MemAvailable for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, ...)
        return None


def return_large_frees() -> None:
    """Serve allocations of 1 MiB and more from their own memory maps (glibc ``M_MMAP_THRESHOLD``), so the
    per-layer temporaries of quantization and of the ``dequant`` backend go back to the system when freed.
    glibc otherwise raises that threshold to 32 MiB after the first large free and keeps such blocks in its
    heap, which held gigabytes in a quantized run. For the ``sd35-flash`` process only (the CLI calls it)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def release_heap() -> None:
    """Collect garbage and hand the heap's free pages back to the system (glibc's ``malloc_trim``)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# ------------------------------------------------------------------------------------------- estimates


def component_bytes(files: CheckpointFiles, component: str, dtype: torch.dtype, fmt: str | None = None,
                    group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes the component takes once loaded: float tensors in ``dtype`` (the VAE always fp32), packed
    tensors as stored, and when ``fmt`` is given, the quantizable Linears in that format."""
    if not files.has(component):
        return 0
    refs = files.components[component]
    keep = packed_keys(refs)
    dtype = torch.float32 if component == "vae" else dtype
    shapes = logical_component_shapes(files, component) if keep else None
    total = 0
    for key, ref in refs.items():
        numel = math.prod(ref.shape)
        if key in keep or not ref.dtype.is_floating_point:
            total += numel * ref.dtype.itemsize
        elif fmt and _quantizable(component, key, ref.shape, fmt):
            total += quantized_nbytes(tuple(ref.shape), fmt, group_size)
        else:
            total += numel * dtype.itemsize
    if shapes is not None and "pos_embed" in shapes and "pos_embed" not in refs:  # elided, rebuilt on load
        total += math.prod(shapes["pos_embed"].shape) * dtype.itemsize
    return total


def _quantizable(component: str, key: str, shape: Iterable[int], fmt: str) -> bool:
    """A Linear weight :func:`quant.quantize_module` would pack (2-D ``.weight``, not excluded, not an
    embedding table)."""
    shape = tuple(shape)
    if not key.endswith(".weight") or len(shape) != 2 or not can_quantize(fmt, shape[1]):
        return False
    layer = key[: -len(".weight")]
    if component == "t5" and ("shared" in layer or "embed_tokens" in layer or "relative_attention_bias" in layer):
        return False
    return not any(layer == p or layer.startswith(p + ".") for p in DEFAULT_EXCLUDE.get(component, ()))


SCHEDULE_BYTES_PER_STEP = 40  # the sigma schedule: float64 linspace, the shift map's temporaries, float32 result


def activation_bytes(files: CheckpointFiles, *, width: int, height: int, batch: int, cfg: float,
                     use_t5: bool, steps: int = 0) -> dict[str, int]:
    """Rough fp32 activation terms per phase: text-encoder hidden states; the MM-DiT's tokens (residual
    streams, qkv, the 4x MLP, one attention-score block) and the sigma schedule of ``steps``; the VAE
    decoder's full-resolution feature maps."""
    rows = batch * (2 if cfg != 1.0 else 1)
    hidden = 1536
    if files.has("mmdit"):
        hidden = logical_component_shapes(files, "mmdit")["x_embedder.proj.weight"].shape[0]
    text_tokens = CLIP_TOKENS + (T5_TOKENS if use_t5 and files.has("t5") else 0)
    f = vae_downscale(files)  # pixels per latent (8 for the released VAE, 1 for the demo's)
    image_tokens = (height // (2 * f)) * (width // (2 * f))  # patch 2
    tokens = image_tokens + text_tokens
    heads = max(1, hidden // 64)
    denoise = rows * (tokens * hidden * 4 * 12 + heads * tokens * tokens * 4) + (steps + 1) * SCHEDULE_BYTES_PER_STEP
    t5_width = 4096
    encode = rows * text_tokens * t5_width * 4 * 8
    decode = batch * (128 * height * width * 4 * 3 + (height // f * width // f) ** 2 * 4)
    return {"encode": encode, "denoise": denoise, "decode": decode}


def estimate(files: CheckpointFiles, tier: Tier, *, dtype: torch.dtype, activations: dict[str, int],
             budget: int | None = None) -> MemoryPlan:
    t5 = tier.t5
    weights = {
        "mmdit": component_bytes(files, "mmdit", dtype, tier.mmdit),
        "clip_l": component_bytes(files, "clip_l", dtype),
        "clip_g": component_bytes(files, "clip_g", dtype),
        "t5": 0 if t5 == "off" else component_bytes(files, "t5", dtype, None if t5 == "dtype" else t5),
        "vae": component_bytes(files, "vae", dtype),
    }
    text = sum(weights[c] for c in TEXT)
    if tier.offload:
        phases = {"encode": text + activations["encode"], "denoise": weights["mmdit"] + activations["denoise"],
                  "decode": weights["vae"] + activations["decode"]}
    else:
        resident = sum(weights.values())
        phases = {phase: resident + act for phase, act in activations.items()}
    return MemoryPlan(tier, weights, activations, phases, budget)


def candidate_tiers(files: CheckpointFiles, *, weights: str | None, use_t5: bool) -> list[Tier]:
    t5_first = "dtype" if use_t5 and files.has("t5") else "off"
    stored_t5 = component_quant(files, "t5") if files.has("t5") else None
    tiers = [Tier(weights, t5_first, False), Tier(weights, t5_first, True)]
    if t5_first != "off":
        if stored_t5 is None:
            tiers.append(Tier(weights, "int8", True))
        tiers.append(Tier(weights, "off", True))
    if weights is None and component_quant(files, "mmdit") is None:
        tiers += [Tier("int8", "off", True), Tier("int4", "off", True)]
    return list(dict.fromkeys(tiers))


def plan_memory(files: CheckpointFiles, budget: int, *, dtype: torch.dtype, width: int, height: int,
                batch: int = 1, cfg: float = 1.0, weights: str | None = None, use_t5: bool = True,
                steps: int = 0) -> MemoryPlan:
    """The first tier (module docstring) whose estimated peak fits ``budget`` bytes."""
    plans = []
    for tier in candidate_tiers(files, weights=weights, use_t5=use_t5):
        acts = activation_bytes(files, width=width, height=height, batch=batch, cfg=cfg,
                                use_t5=tier.t5 != "off", steps=steps)
        plan = estimate(files, tier, dtype=dtype, activations=acts, budget=budget)
        if plan.peak <= budget:
            return plan
        plans.append(plan)
    leanest = min(plans, key=lambda p: p.peak)
    raise FlashError(f"no memory plan fits {budget / GIB:.2f} GiB: the leanest (MM-DiT "
                     f"{leanest.tier.mmdit or 'as stored'}, T5 {leanest.tier.t5}, parts released after use) "
                     f"needs about {leanest.peak / GIB:.2f} GiB; lower --width/--height/--batch or raise --memory")


def check_fits(files: CheckpointFiles, device: torch.device, *, dtype: torch.dtype, width: int, height: int,
               batch: int = 1, cfg: float = 1.0, steps: int = 0, weights: str | None = None,
               t5_weights: str | None = None, use_t5: bool = True, available: int | None = None) -> MemoryPlan:
    """The run as requested (every part resident): its plan, or a :class:`FlashError` with the estimate when
    the peak exceeds ``available`` bytes (default: the free memory of ``device``, :func:`free_memory`)."""
    t5 = "off" if not (use_t5 and files.has("t5")) else (t5_weights or "dtype")
    acts = activation_bytes(files, width=width, height=height, batch=batch, cfg=cfg, use_t5=t5 != "off",
                            steps=steps)
    plan = estimate(files, Tier(weights, t5, False), dtype=dtype, activations=acts)
    available = free_memory(device) if available is None else available
    if plan.peak > available:
        phase = max(plan.phases, key=plan.phases.get)
        raise FlashError(f"this run needs about {plan.peak / GIB:.2f} GiB (the {phase} phase of --batch {batch} "
                         f"at {width}x{height} px, {steps} steps), more than the {available / GIB:.2f} GiB free on "
                         f"{device}; lower --batch, --width/--height or --steps, or pass --memory auto|GiB to "
                         "plan offloading and quantization (a number insists)")
    return plan
