"""How this machine multiplies half-precision weights on the CPU: measured once per process, not guessed.

A bf16 or fp16 Linear layer on the CPU can run as a native half GEMM, or upcast its input and weight to fp32,
multiply there and round the result back (the same math as a half GEMM with fp32 accumulation). Which is faster
depends on the CPU and on torch's kernels, not only on the instruction set it reports: on a 2-core Xeon that
reports AVX512-BF16, a bf16 GEMM ran at 182 GFLOP/s and the fp32 one at 318. So the first half-precision Linear
of each input width and batch of rows times both on a product of that shape (:func:`half_matmul_choice`: the rows
matter, since the upcast path converts the whole weight each call), and the faster one runs from then on. fp32 stays the default unless native is clearly faster (:data:`MARGIN`): the upcast path is
the more precise one, and a near tie should not flip between runs. ``mmdit.CPU_HALF_MATMUL_IN_FP32`` pins
either path (tests and benchmarks); ``sd35-flash info --backends`` prints what runs here.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MARGIN = 1.15  # native half runs only when it is this much faster than the fp32 path
TIMING_OUT = 256  # output features of the timed weight (enough to be a GEMM, small enough to time quickly)
ROW_BUCKETS = (16, 64, 256, 1024)  # input rows are timed at the next of these (the last for more)
REPEATS = 3


@dataclass(frozen=True)
class HalfMatmulChoice:
    """The measured seconds of one half-precision product of ``rows`` x ``width`` inputs, native and upcast."""

    dtype: torch.dtype
    width: int
    rows: int
    native_s: float
    upcast_s: float

    @property
    def upcast(self) -> bool:
        return not self.native_s * MARGIN < self.upcast_s

    def describe(self) -> str:
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))
        path = "in fp32 (upcast)" if self.upcast else f"natively in {name}"
        return (f"{name} Linear layers compute {path}: measured {self.upcast_s * 1e3:.2f} ms fp32 vs "
                f"{self.native_s * 1e3:.2f} ms {name} for {self.rows} x {self.width} inputs")


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
    x = torch.randn(rows, width, generator=generator).to(dtype)
    weight = (torch.randn(TIMING_OUT, width, generator=generator) / width**0.5).to(dtype)
    paths = {"native": lambda: F.linear(x, weight),
             "upcast": lambda: F.linear(x.float(), weight.float()).to(dtype)}  # mmdit.linear's upcast path
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        for fn in paths.values():
            fn()  # warm-up: first-call allocations and kernel selection
        for _ in range(REPEATS):  # interleaved, so a slow moment of a shared CPU hits both
            for name, fn in paths.items():
                tic = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - tic)
    return HalfMatmulChoice(dtype, width, rows, statistics.median(times["native"]), statistics.median(times["upcast"]))


def measured_summary(dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)) -> list[str]:
    """One line per half dtype of ``dtypes`` measured in this process so far: how many layer shapes ran natively
    and how many in fp32 (what ``sd35-flash generate`` prints after a half-precision run on the CPU)."""
    lines = []
    for dtype in dtypes:
        choices = [c for (d, _, _), c in _CHOICES.items() if d == dtype]
        if choices:
            native = sum(not c.upcast for c in choices)
            name = "bf16" if dtype == torch.bfloat16 else "fp16"
            lines.append(f"compute: {name} Linear layers ran natively at {native} of {len(choices)} measured "
                         f"shapes, in fp32 at the other {len(choices) - native} (flash_core/compute.py)")
    return lines
