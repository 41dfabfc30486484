"""GPU readiness in one table: the MM-DiT, quantization, the pipeline and a short DMD run on CUDA.

    bash benchmarks/gpu.sh                       # on a machine with an NVIDIA GPU, under 8 minutes
    python benchmarks/gpu.py --device cpu --smoke   # the same code on a tiny model, to check the script itself

Rows (SD3.5 Medium's MM-DiT, random weights, bf16 activations, 1024 px: 4096 image tokens + 154 text tokens):
- ``mmdit bf16``: one forward, its analytic FLOP count (benchmarks/mmdit_vs_diffusers.py ``forward_flops``)
  and MFU against ``--peak-tflops`` (default: the dense bf16 peak of the GPU's name, when known);
- ``mmdit int8`` / ``mmdit fp8``: the same forward with the Linears packed (flash_core/quant/), through the
  backend ``auto`` picks on this GPU;
- ``pipeline 4 steps``: ``FlashPipeline`` end to end at 1024 px (text encoders small: their time is not the
  question here), seconds per image after a warm-up;
- ``dmd iteration``: seconds per iteration of the DMD stage of benchmarks/train_speed.py's setup on this device.
Every row reports ``torch.cuda.max_memory_allocated`` over its own run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny model at 64 px: checks the script, not the GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU (0: by name)")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if device.type == "cuda" else "n/a"


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def forward_flops(config, n_img: int, n_ctx: int) -> int:
    spec = importlib.util.spec_from_file_location("mmdit_vs_diffusers", HERE.parent / "mmdit_vs_diffusers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.forward_flops(config, 1, n_img, n_ctx)


def peak_tflops(args, device: torch.device) -> float:
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), 0.0)


def mmdit_rows(args, device: torch.device) -> list[tuple]:
    from sd35_flash.flash_core import quant
    from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig

    config = (MMDiTConfig(depth=2, hidden_size=128, pos_embed_max_size=16, dual_attention_layers=(0,))
              if args.smoke else MMDiTConfig.sd35_medium())
    res, n_ctx = (64, 16) if args.smoke else (1024, 154)
    lat = res // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, lat, lat, generator=gen).to(device, torch.bfloat16)
    ctx = torch.randn(1, n_ctx, config.context_in_channels, generator=gen).to(device, torch.bfloat16)
    y = torch.randn(1, config.adm_in_channels, generator=gen).to(device, torch.bfloat16)
    t = torch.full((1,), 750.0, device=device)
    flops = forward_flops(config, (lat // config.patch_size) ** 2, n_ctx)
    peak = peak_tflops(args, device)
    rows = []
    for fmt in (None, "int8", "fp8"):
        model = MMDiT(config, dtype=torch.bfloat16).to(device).eval()
        backend = "-"
        if fmt is not None:
            choice = quant.choose_backend(fmt, device, torch.bfloat16, width=config.hidden_size)
            quant.quantize_module(model, quant.QuantScheme.default("mmdit", fmt), backend=choice.backend)
            backend = choice.backend
        reset_peak(device)
        with torch.inference_mode():
            seconds = timed(lambda m=model: m(x, t, ctx, y), device, args.repeats)
        mfu = f"{flops / seconds / (peak * 1e12):.1%}" if peak else "n/a"
        rows.append((f"mmdit {fmt or 'bf16'} ({backend})", f"{seconds * 1e3:.1f} ms/forward", f"{flops / 1e12:.2f}",
                     mfu, peak_gib(device)))
        del model
    return rows


def pipeline_row(args, device: torch.device) -> tuple:
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig
    from sd35_flash.flash_core.pipeline import FlashPipeline
    from sd35_flash.flash_core.text import TripleTextEncoder, load_tokenizers
    from sd35_flash.flash_core.vae import SD3VAE, VAEConfig

    from factories import tiny_clip_g, tiny_clip_l, tiny_vae
    from tokenizer_factories import write_tokenizers

    config = (MMDiTConfig(depth=2, hidden_size=128, pos_embed_max_size=16, dual_attention_layers=(0,))
              if args.smoke else MMDiTConfig.sd35_medium())
    res = 64 if args.smoke else 1024
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as folder:  # loaded into memory, then removed
        tokenizers = load_tokenizers(write_tokenizers(Path(folder) / "tokenizers"))
    text = TripleTextEncoder(tiny_clip_l(), tiny_clip_g(), None, tokenizers=tokenizers).to(device, torch.bfloat16)
    vae = (tiny_vae() if args.smoke else SD3VAE(VAEConfig())).to(device)
    pipe = FlashPipeline(MMDiT(config, dtype=torch.bfloat16).to(device).eval(), vae, text, device=device)
    reset_peak(device)
    seconds = timed(lambda: pipe("a red circle", steps=4, width=res, height=res, use_t5=False, progress=False),
                    device, max(1, args.repeats // 2))
    return (f"pipeline 4 steps {res} px", f"{seconds:.2f} s/image", "-", "-", peak_gib(device))


def dmd_row(args, device: torch.device) -> tuple:
    spec = importlib.util.spec_from_file_location("train_speed", HERE.parent / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    speed_args = module.parse_args(["--iterations", "6"] + (["--size", "32"] if args.smoke else
                                                            ["--depth", "8", "--hidden", "512", "--size", "256"]))
    reset_peak(device)
    medians, millions = module.stage_seconds(speed_args, device=str(device))
    return (f"dmd iteration ({millions:.0f} M teacher)", f"{medians['dmd']:.3f} s/it", "-", "-", peak_gib(device))


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py: this machine has no CUDA device (use --device cpu --smoke to check the script)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}{', smoke test (tiny model)' if args.smoke else ''}")
    rows = [*mmdit_rows(args, device), pipeline_row(args, device), dmd_row(args, device)]
    print("| row | time | TFLOP | MFU | peak allocated GiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
