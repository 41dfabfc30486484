"""How this machine multiplies half-precision weights on the CPU: measured once per process, not guessed.

A bf16 or fp16 Linear layer on the CPU can run as a native half GEMM, or upcast its input and weight to fp32,
multiply there and round the result back (the same math as a half GEMM with fp32 accumulation). Which is faster
depends on the CPU and on torch's kernels, not only on the instruction set it reports: on a 2-core Xeon that
reports AVX512-BF16, a bf16 GEMM ran at 182 GFLOP/s and the fp32 one at 318. So the first half-precision Linear
of each input width and batch of rows times both on a product of that shape (:func:`half_matmul_choice`: the rows
matter, since the upcast path converts the whole weight each call), and the faster one runs from then on. fp32 stays the default unless native is clearly faster (:data:`MARGIN`): the upcast path is
the more precise one, and a near tie should not flip between runs. ``mmdit.CPU_HALF_MATMUL_IN_FP32`` pins
either path (tests and benchmarks); ``sd35-flash info --backends`` prints what runs here.

Attention is chosen the same way (:func:`attention_choice`): SDPA as torch picks its kernel (flash attention on
CPUs), its math kernel, and, for half inputs, SDPA on inputs upcast to fp32; torch's own pick stays unless another
is clearly faster. ``--dtype auto`` on the CPU (:func:`auto_cpu_dtype`) stores a large model in bf16 when its
Linear layers run as fast in bf16 (natively or upcast) as in fp32: half the memory at no cost in speed.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .devices import DTYPES

MARGIN = 1.15  # native half runs only when it is this much faster than the fp32 path
TIMING_OUT = 256  # output features of the timed weight (enough to be a GEMM, small enough to time quickly)
ROW_BUCKETS = (16, 64, 256, 1024)  # input rows are timed at the next of these (the last for more)
REPEATS = 3
ATTENTION_ROW_BUCKETS = (256, 1024)  # attention is timed at the next of these rows (the last for more)
ATTENTION_TIMING_HEADS = 4  # heads of the timed attention: its cost is linear in heads, so few stand for many
AUTO_HALF_MIN_BYTES = 2**30  # ``--dtype auto`` keeps models under this many fp32 bytes in fp32 (exact, small)


@dataclass(frozen=True)
class HalfMatmulChoice:
    """The measured seconds of one half-precision product of ``rows`` x ``width`` inputs, native and upcast."""

    dtype: torch.dtype
    width: int
    rows: int
    native_s: float
    upcast_s: float
    fp32_s: float | None = None  # the same product with fp32 weights: what an fp32 model runs

    @property
    def upcast(self) -> bool:
        return not self.native_s * MARGIN < self.upcast_s

    @property
    def half_s(self) -> float:
        """The seconds of the path that runs: native or upcast."""
        return self.upcast_s if self.upcast else self.native_s

    @property
    def as_fast_as_fp32(self) -> bool:
        """The half model's Linear layers are no slower than an fp32 model's, within :data:`MARGIN`."""
        return self.fp32_s is not None and self.half_s <= self.fp32_s * MARGIN

    def describe(self) -> str:
        name = _dtype_name(self.dtype)
        path = "in fp32 (upcast)" if self.upcast else f"natively in {name}"
        fp32 = "" if self.fp32_s is None else f"; fp32 weights {self.fp32_s * 1e3:.2f} ms"
        return (f"{name} Linear layers compute {path}: measured {self.upcast_s * 1e3:.2f} ms upcast vs "
                f"{self.native_s * 1e3:.2f} ms {name} for {self.rows} x {self.width} inputs{fp32}")


_CHOICES: dict[tuple[torch.dtype, int, int], HalfMatmulChoice] = {}


def row_bucket(rows: int) -> int:
    return next((bucket for bucket in ROW_BUCKETS if rows <= bucket), ROW_BUCKETS[-1])


def half_matmul_choice(dtype: torch.dtype, width: int, rows: int = 256) -> HalfMatmulChoice:
    """Native or upcast for CPU Linear layers of ``dtype`` with ``width`` input features on ``rows`` input rows
    (timed at :func:`row_bucket` of it); measured on the first call for this shape, then kept for the process."""
    key = (dtype, width, row_bucket(rows))
    if key not in _CHOICES:
        _CHOICES[key] = _measure(*key)
    return _CHOICES[key]


def _measure(dtype: torch.dtype, width: int, rows: int) -> HalfMatmulChoice:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator)
    weight = torch.randn(TIMING_OUT, width, generator=generator) / width**0.5
    x_half, weight_half = x.to(dtype), weight.to(dtype)
    times = interleaved_medians({
        "native": lambda: F.linear(x_half, weight_half),
        "upcast": lambda: F.linear(x_half.float(), weight_half.float()).to(dtype),  # mmdit.linear's upcast path
        "fp32": lambda: F.linear(x, weight),
    })
    return HalfMatmulChoice(dtype, width, rows, times["native"], times["upcast"], times["fp32"])


def interleaved_medians(paths: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds of each path over :data:`REPEATS` interleaved calls (so a slow moment of a shared CPU hits
    all of them), after one warm-up call each (first-call allocations and kernel selection)."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        for fn in paths.values():
            fn()
        for _ in range(REPEATS):
            for name, fn in paths.items():
                tic = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


# ------------------------------------------------------------------------------------------------ attention

ATTENTION_PATHS = ("sdpa", "math", "upcast")  # torch's kernel pick; the math kernel; half inputs upcast to fp32


@dataclass(frozen=True)
class AttentionChoice:
    """The measured seconds of each attention path for one dtype and row bucket, and the one that runs."""

    dtype: torch.dtype
    rows: int
    seconds: dict[str, float]

    @property
    def path(self) -> str:
        fastest = min(self.seconds, key=self.seconds.get)
        return fastest if self.seconds[fastest] * MARGIN < self.seconds["sdpa"] else "sdpa"

    def describe(self) -> str:
        timed = ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in self.seconds.items())
        return (f"{_dtype_name(self.dtype)} attention runs through {self.path}: measured {timed} for "
                f"{self.rows} rows x {ATTENTION_TIMING_HEADS} heads")


_ATTENTION: dict[tuple[torch.dtype, int], AttentionChoice] = {}


def attention_choice(dtype: torch.dtype, rows: int) -> AttentionChoice:
    """How CPU attention over ``rows`` query/key rows in ``dtype`` runs here: measured at the row bucket
    (:data:`ATTENTION_ROW_BUCKETS`) on the first call, then kept for the process."""
    key = (dtype, next((b for b in ATTENTION_ROW_BUCKETS if rows <= b), ATTENTION_ROW_BUCKETS[-1]))
    if key not in _ATTENTION:
        _ATTENTION[key] = _measure_attention(*key)
    return _ATTENTION[key]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, path: str = "sdpa") -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over ``[B, heads, N, d]`` through ``path`` (:data:`ATTENTION_PATHS`)."""
    if path == "upcast":
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    if path == "math":
        with _math_kernel():
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _math_kernel() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _measure_attention(dtype: torch.dtype, rows: int) -> AttentionChoice:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, ATTENTION_TIMING_HEADS, rows, 64, generator=generator).to(dtype) for _ in range(3))
    paths = [p for p in ATTENTION_PATHS if p != "upcast" or dtype != torch.float32]
    seconds = interleaved_medians({path: (lambda path=path: sdpa(q, k, v, path)) for path in paths})
    return AttentionChoice(dtype, rows, seconds)


# ------------------------------------------------------------------------------------------- --dtype auto


def auto_cpu_dtype(width: int, fp32_bytes: int, rows: int = 1024) -> tuple[torch.dtype, str]:
    """``--dtype auto`` on the CPU for a model of hidden ``width`` whose weights take ``fp32_bytes`` in fp32:
    bf16 when the model is large (:data:`AUTO_HALF_MIN_BYTES`) and its bf16 Linear layers run as fast as fp32
    ones here (measured on ``rows`` rows), else fp32. Returns the dtype and why, in one line."""
    if fp32_bytes < AUTO_HALF_MIN_BYTES:
        return torch.float32, (f"dtype auto: fp32 (the MM-DiT's fp32 weights, {fp32_bytes / 2**30:.2f} GiB, are "
                               f"under {AUTO_HALF_MIN_BYTES / 2**30:.0f} GiB)")
    choice = half_matmul_choice(torch.bfloat16, width, rows)
    fast = choice.as_fast_as_fp32
    return (torch.bfloat16 if fast else torch.float32,
            f"dtype auto: {'bf16' if fast else 'fp32'} (bf16 Linear layers measured "
            f"{choice.half_s * 1e3:.2f} ms {'upcast' if choice.upcast else 'native'} vs "
            f"{choice.fp32_s * 1e3:.2f} ms fp32 for {choice.rows} x {width} inputs; bf16 halves the weights' memory)")


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))


def measured_summary(dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)) -> list[str]:
    """One line per half dtype of ``dtypes`` measured in this process so far: how many layer shapes ran natively
    and how many in fp32 (what ``sd35-flash generate`` prints after a half-precision run on the CPU)."""
    lines = []
    for dtype in dtypes:
        choices = [c for (d, _, _), c in _CHOICES.items() if d == dtype]
        if choices:
            native = sum(not c.upcast for c in choices)
            lines.append(f"compute: {_dtype_name(dtype)} Linear layers ran natively at {native} of {len(choices)} "
                         f"measured shapes, in fp32 at the other {len(choices) - native} (flash_core/compute.py)")
        paths = sorted({c.path for (d, _), c in _ATTENTION.items() if d == dtype})
        if paths:
            lines.append(f"compute: {_dtype_name(dtype)} attention ran through {' and '.join(paths)} "
                         "(flash_core/compute.py)")
    return lines
