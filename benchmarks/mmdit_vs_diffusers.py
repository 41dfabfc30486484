"""Our MM-DiT vs diffusers' SD3Transformer2DModel at SD3.5 Medium width, the same weights in both.

    python benchmarks/mmdit_vs_diffusers.py --depth 2 --res 512 --dtypes fp32,bf16

SD3.5 Medium width: hidden 1536, 24 heads, RMS qk-norm, dual attention on the first half of the blocks.
``--depth`` trims the number of blocks so that it runs on a laptop CPU; the last block is the pre-only one.
Random weights at a realistic scale are drawn for ours and converted to diffusers with our keymap.

Per dtype, one row: seconds per forward (median of interleaved repeats after warm-up, inference_mode),
the ratio ours / diffusers (median of the per-pair ratios, with their interquartile range: the noise), peak memory of one forward for each contestant, our achieved FLOP/s (analytic
count: all Linear layers and the attention matmuls) and the FLOP/s of one large Linear-layout matmul
(``[n, n] @ [n, n]^T``) in the same dtype, measured in the same run.

Memory, CPU: each contestant runs in a fresh subprocess (same config, own random weights); after one warm-up
forward the kernel's RSS high-water mark is reset (``/proc/self/clear_refs``), a second forward runs, and
the reported number is ``VmHWM - VmRSS before the forward``: the resident memory the forward adds at its peak
(weights and inputs excluded). glibc is told to mmap every allocation over 64 KiB so freed tensors go back
to the OS and the RSS follows live memory. CUDA: ``max_memory_allocated`` over the forward minus the
allocation before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from sd35_flash.flash_core import mmdit
from sd35_flash.flash_core.keymaps.mmdit import diffusers_config, official_to_diffusers
from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig, sincos_pos_embed_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONTESTANTS = ("ours", "diffusers")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=2, help="number of joint blocks (Medium has 24)")
    ap.add_argument("--res", type=int, default=512, help="pixel resolution (latent = res / 8, square)")
    ap.add_argument("--tokens", type=int, default=154, help="context length (77 CLIP + 77 T5)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per contestant and dtype")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--pos-embed-max-size",
        type=int,
        default=96,
        help="positional table side in patches (Medium ships 384; raised if the latent needs more)",
    )
    ap.add_argument("--matmul-size", type=int, default=2048, help="n for the reference [n,n]@[n,n]^T matmul")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (opt-in)")
    ap.add_argument(
        "--native-half-matmul",
        action="store_true",
        help="ours: keep bf16/fp16 Linear layers in half precision on CPU (default: fp32 compute on CPUs "
        "without native half matmul, see sd35_flash.flash_core.mmdit.CPU_HALF_MATMUL_IN_FP32)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the per-contestant memory subprocesses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dtype", dest="child_dtype", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def medium_width_config(args) -> MMDiTConfig:
    patches = args.res // 8 // 2
    return MMDiTConfig(
        depth=args.depth,
        hidden_size=1536,
        pos_embed_max_size=max(args.pos_embed_max_size, patches),
        qk_norm=True,
        dual_attention_layers=tuple(range((args.depth + 1) // 2)),
    )


# ------------------------------------------------------------------------------------------- models


def random_ours(config: MMDiTConfig, dtype: torch.dtype, device: str, seed: int) -> MMDiT:
    """Our model with every parameter random at a realistic scale (adaLN and final layer included)."""
    with torch.device("meta"):
        model = MMDiT(config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        model.pos_embed.copy_(sincos_pos_embed_table(config.hidden_size, config.pos_embed_max_size))
    return model.to(device=device, dtype=dtype).eval()


def diffusers_from(ours: MMDiT):
    """diffusers' model holding our weights (converted with our keymap; shared storage where renamed)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**diffusers_config(ours.config))
    model.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True, assign=True)
    return model.eval()


def make_inputs(args, config: MMDiTConfig, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(args.seed + 1)
    lat = args.res // 8
    b = args.batch
    x = torch.randn(b, config.in_channels, lat, lat, generator=gen)
    t = torch.full((b,), 750.0)
    ctx = torch.randn(b, args.tokens, config.context_in_channels, generator=gen)
    y = torch.randn(b, config.adm_in_channels, generator=gen)
    x, ctx, y = (v.to(args.device, dtype) for v in (x, ctx, y))
    return x, t.to(args.device), ctx, y


def runner(name: str, model, inputs):
    x, t, ctx, y = inputs
    if name == "ours":
        return lambda: model(x, t, ctx, y)
    return lambda: model(
        hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=y, return_dict=False
    )[0]


# ------------------------------------------------------------------------------------- measurements


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_flops(config: MMDiTConfig, batch: int, n_img: int, n_ctx: int) -> int:
    """Multiply-adds x 2 of one forward: every Linear (incl. patchify, embedders, adaLN) + attention matmuls."""
    d, m, p = config.hidden_size, config.mlp_hidden_size, config.patch_size
    lin = 0  # per-sample rows x in x out
    lin += n_img * config.in_channels * p * p * d + n_ctx * config.context_in_channels * d
    lin += 256 * d + d * d + config.adm_in_channels * d + d * d
    attn = 0
    for i in range(config.depth):
        last, dual = i == config.depth - 1, i in config.dual_attention_layers
        lin += (2 if last else 6) * d * d + (9 if dual else 6) * d * d  # adaLN
        lin += n_img * (3 * d * d + d * d + 2 * d * m)  # x: qkv, proj, mlp
        lin += n_ctx * 3 * d * d + (0 if last else n_ctx * (d * d + 2 * d * m))
        attn += 2 * (n_img + n_ctx) ** 2 * d  # QK^T and AV
        if dual:
            lin += n_img * 4 * d * d
            attn += 2 * n_img**2 * d
    lin += 2 * d * d + n_img * d * p * p * config.out_channels
    return 2 * batch * (lin + attn)


def matmul_flops_per_s(n: int, dtype: torch.dtype, device: str, repeats: int = 3) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    w = torch.randn(n, n, device=device).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, w)
            sync(device)
            if i:
                times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def time_interleaved(fns: dict, args) -> dict[str, list[float]]:
    """Seconds of each call, per contestant; the order alternates each repeat so drift and contention hit
    both, and repeat r of one contestant is paired with repeat r of the other."""
    names = list(fns)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for n in names:
                fns[n]()
        for r in range(args.repeats):
            for n in names if r % 2 == 0 else names[::-1]:
                sync(args.device)
                t0 = time.perf_counter()
                fns[n]()
                sync(args.device)
                times[n].append(time.perf_counter() - t0)
                print(f"    {n:9s} repeat {r}: {times[n][-1]:.3f} s", file=sys.stderr, flush=True)
    return times


def paired_ratios(times: dict[str, list[float]]) -> list[float]:
    """ours / diffusers for each interleaved pair: robust to slow drift of the machine's speed."""
    return sorted(o / d for o, d in zip(times["ours"], times["diffusers"], strict=True))


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args) -> None:
    """Runs in a fresh process: peak extra memory of one forward of one contestant (see the module doc)."""
    dtype = DTYPES[args.child_dtype]
    config = medium_width_config(args)
    ours = random_ours(config, dtype, args.device, args.seed)
    model = ours if args.memory_child == "ours" else diffusers_from(ours)
    if args.memory_child != "ours":
        del ours
    fn = runner(args.memory_child, model, make_inputs(args, config, dtype))
    with torch.inference_mode():
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status_kib("VmRSS")
            fn()
            peak = (_status_kib("VmHWM") - before) * 1024
    print(json.dumps({"peak_bytes": peak}))


def measure_memory(args, contestant: str, dtype_name: str) -> float | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", contestant, "--_dtype", dtype_name]
    for flag in ("depth", "res", "tokens", "batch", "device", "pos_embed_max_size", "seed"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.native_half_matmul:
        cmd.append("--native-half-matmul")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        print(
            f"memory subprocess failed for {contestant} {dtype_name}:\n{proc.stderr[-2000:]}", file=sys.stderr
        )
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.native_half_matmul:
        mmdit.CPU_HALF_MATMUL_IN_FP32 = False
    if args.memory_child:
        memory_child(args)
        return
    import diffusers

    config = medium_width_config(args)
    lat = args.res // 8
    n_img = (lat // config.patch_size) ** 2
    flops = forward_flops(config, args.batch, n_img, args.tokens)
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, device {args.device}, "
        f"threads {torch.get_num_threads()}, ours' half Linear layers on CPU: "
        f"{'native half' if args.native_half_matmul else 'fp32 compute where the CPU lacks native half matmul'}"
    )
    print(
        f"config: depth {config.depth}, hidden {config.hidden_size}, heads {config.num_heads}, dual layers "
        f"{list(config.dual_attention_layers)}, pos table {config.pos_embed_max_size}, latent {lat}x{lat} "
        f"({n_img} image tokens) + {args.tokens} context tokens, batch {args.batch}, "
        f"{flops / 1e9:.1f} GFLOP per forward"
    )
    mem_note = (
        "torch.cuda.max_memory_allocated during a forward, above the allocation before it"
        if args.device.startswith("cuda")
        else "peak RSS added by one forward (VmHWM after clear_refs minus VmRSS before), own subprocess each"
    )
    print(f"memory column: {mem_note}")
    print(f"timing: median of {args.repeats} interleaved repeats after {args.warmup} warm-up, inference_mode; "
          "ratio: median of the per-pair ratios")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        print(f"[{dtype_name}] building models", file=sys.stderr, flush=True)
        ours = random_ours(config, dtype, args.device, args.seed)
        theirs = diffusers_from(ours)
        ours_model = torch.compile(ours) if args.compile else ours
        inputs = make_inputs(args, config, dtype)
        fns = {"ours": runner("ours", ours_model, inputs), "diffusers": runner("diffusers", theirs, inputs)}
        times = time_interleaved(fns, args)
        secs = {n: statistics.median(v) for n, v in times.items()}
        del ours, theirs, ours_model, fns
        mm = matmul_flops_per_s(args.matmul_size, dtype, args.device)
        mem = {c: None if args.no_memory else measure_memory(args, c, dtype_name) for c in CONTESTANTS}
        rows.append((dtype_name, secs, paired_ratios(times), mem, flops / secs["ours"], mm))

    def mib(v):
        return "n/a" if v is None else f"{v / 2**20:.0f}"

    print()
    print(
        "| dtype | ours s/fwd | diffusers s/fwd | ours/diffusers | ratio IQR | ours peak MiB | diffusers peak MiB "
        f"| ours GFLOP/s | matmul {args.matmul_size}^3 GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name, secs, ratios, mem, achieved, mm in rows:
        low, high = quartiles(ratios)
        print(
            f"| {dtype_name} | {secs['ours']:.3f} | {secs['diffusers']:.3f} | "
            f"{statistics.median(ratios):.3f} | {low:.3f}-{high:.3f} | {mib(mem['ours'])} | {mib(mem['diffusers'])} | "
            f"{achieved / 1e9:.1f} | {mm / 1e9:.1f} |"
        )
    from sd35_flash.flash_core.compute import measured_summary

    for line in measured_summary() or ["compute: fp32 Linear layers (no half-precision path to choose)"]:
        print(line)  # which path our half-precision Linear layers ran (flash_core/compute.py)


if __name__ == "__main__":
    main()
