"""``sd35-flash``: generate images and inspect checkpoints from the command line.

Bad input (a missing file, a wrong checkpoint, a width that is not a multiple of 16) ends with exit status 2
and one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .atomic import atomic_write, check_destination, sigterm_raises
from .console import OneLineParser, run_guarded
from .demo import DEMO_CHECKPOINT
from .errors import FlashError
from .quant import BACKENDS, DEFAULT_EXCLUDE, DEFAULT_GROUP_SIZE, FORMATS
from .vae import RELEASED_DOWNSCALE


class UsageError(FlashError):
    """A command-line argument is wrong."""


MAX_SEED = 2**64 - 1  # ComfyUI's seed widget: 0 .. 0xffffffffffffffff


def _whole(text: str, expected: str) -> int:
    """``text`` as an int, or argparse's one-line error saying what was ``expected``."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None


def _positive_int(text: str) -> int:
    """A whole number of at least 1 (steps, batch, width, height)."""
    value = _whole(text, "a whole number of at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got '{text}'")
    return value


def _count(text: str) -> int:
    """A whole number, 0 or more (group size, --show-at)."""
    value = _whole(text, "a whole number, 0 or more")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got '{text}'")
    return value


def _seed(text: str) -> int:
    """A noise seed in ComfyUI's range, 0 to 2**64 - 1."""
    expected = f"a whole number from 0 to {MAX_SEED} (ComfyUI's seed range)"
    value = _whole(text, expected)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'")
    return value


def _finite_float(text: str) -> float:
    """A finite number (``nan`` and ``inf`` are refused: they would sample a black image)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sd35-flash", description="SD3.5-Flash: few-step SD3.5 image generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make images from a prompt")
    gen.add_argument("--prompt", "-p", required=True, help="what to draw")
    gen.add_argument("--out", "-o", required=True, type=Path,
                     help="output PNG; with --batch N, files NAME_0.png ... NAME_{N-1}.png")
    gen.add_argument("--checkpoint", "-c", type=Path,
                     help="SD3.5 / SD3.5-Flash weights: a single .safetensors file (with or without text encoders), "
                          "a diffusion-model file, or a diffusers folder. Default: the embedded demo model")
    gen.add_argument("--steps", type=_positive_int, default=4,
                     help="2 or 4 use the student grid; any other count the shift-3 teacher schedule (default 4)")
    gen.add_argument("--seed", type=_seed, default=0, help="noise seed, 0 to 2**64-1 as in ComfyUI (default 0)")
    gen.add_argument("--width", type=_positive_int, help="pixels, a multiple of 16 (of 2 for the demo model: 2 x its VAE's "
                                                "pixels per latent); default 1024, or the model's largest size when "
                                                "smaller (16 for the demo model)")
    gen.add_argument("--height", type=_positive_int, help="pixels, as --width (default: as --width's)")
    gen.add_argument("--cfg", type=_finite_float, default=1.0, help="classifier-free guidance; 1.0 = one forward per step")
    gen.add_argument("--negative", "-n", default="", help="negative prompt (used when --cfg is not 1)")
    gen.add_argument("--no-t5", action="store_true", help="run without T5 (77 CLIP tokens; T5 is not loaded)")
    gen.add_argument("--batch", type=_positive_int, default=1, help="images from one noise draw (default 1)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="MM-DiT weights and compute; auto = bf16/fp16 on a GPU; on the CPU bf16 for a model over "
                          "1 GiB whose bf16 layers measure as fast as fp32 here, else fp32")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    gen.add_argument("--mode", choices=["euler", "renoise"], help="sampler; default: the checkpoint's, else euler")
    gen.add_argument("--vae", type=Path, help="a separate VAE file (replaces the checkpoint's)")
    gen.add_argument("--clip-l", type=Path, help="a separate CLIP-L text encoder file")
    gen.add_argument("--clip-g", type=Path, help="a separate CLIP-G text encoder file")
    gen.add_argument("--t5", type=Path, help="a separate T5-XXL text encoder file")
    gen.add_argument("--tokenizers", type=Path,
                     help="tokenizer folder (clip/ and t5xxl/, or a diffusers folder). Default, first found: the "
                          "checkpoint's own (a tokenizers/ folder beside the file, or a diffusers folder's), "
                          "$SD35_FLASH_TOKENIZERS, the ComfyUI installation")
    gen.add_argument("--weights", choices=FORMATS,
                     help="quantize the MM-DiT while loading (a quantized checkpoint always loads as stored)")
    gen.add_argument("--t5-weights", choices=FORMATS, help="quantize T5 while loading")
    gen.add_argument("--quant-backend", default="auto", choices=["auto", *BACKENDS],
                     help="how quantized layers run; auto times the candidates on this device (default auto)")
    gen.add_argument("--memory", metavar="auto|GiB",
                     help="plan which parts load where to fit this budget (auto: the device's free memory); "
                          "prints the plan and its estimated peak")
    gen.add_argument("--show-at", type=_count, default=None, metavar="PIXELS",
                     help="enlarge the image (nearest, whole pixels kept sharp) to this width before saving, as "
                          "an ImageScale node would; default: 128 for images under 64 px wide (the demo model's "
                          "16 px), else none; 0: never")
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    info = sub.add_parser("info", help="print what a checkpoint holds (reads headers only)")
    info.add_argument("path", type=Path, help="a .safetensors file or a diffusers folder")

    quant = sub.add_parser("quantize", help="write a quantized copy of a checkpoint (MM-DiT, optionally T5)")
    quant.add_argument("input", type=Path, help="a checkpoint in any layout generate reads")
    quant.add_argument("output", type=Path, help="the .safetensors file to write (official single-file layout)")
    quant.add_argument("--format", required=True, choices=FORMATS, help="the MM-DiT's weight format")
    quant.add_argument("--t5", choices=FORMATS, help="also quantize T5 to this format (default: T5 as stored)")
    quant.add_argument("--group-size", type=_count, default=DEFAULT_GROUP_SIZE,
                       help=f"int6 / int4 group along the input dimension (default {DEFAULT_GROUP_SIZE}; 0 = whole row)")
    quant.add_argument("--exclude", metavar="PREFIXES",
                       help="comma-separated MM-DiT layer prefixes kept in 16 bits (default: "
                            f"{','.join(DEFAULT_EXCLUDE['mmdit'])}; '' quantizes every Linear)")
    quant.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def output_paths(out: Path, batch: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out '{out}' must end in .png")
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(batch)]


def checked_outputs(out: Path, batch: int) -> list[Path]:
    """The PNGs to write, each checked before any work: not a folder, not under a file, a name the file
    system takes, in a folder this process can create files in (flash_core/atomic.py ``check_destination``)."""
    paths = output_paths(out, batch)
    for path in paths:
        check_destination(path, "--out")
    return paths


def check_text(option: str, text: str) -> None:
    """Refuse text that is not valid UTF-8: bytes that are not UTF-8 reach ``sys.argv`` as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise UsageError(f"{option} is not valid UTF-8 text ({what} at character {err.start + 1})") from None


def print_path(path: Path) -> None:
    """Print ``path`` on stdout as the file system's bytes, also when they are not valid UTF-8."""
    try:
        print(path)
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(path) + b"\n")
        sys.stdout.buffer.flush()


def save_png(image, path: Path, chunks: dict | None = None) -> None:
    """Write through a temporary file and a rename (flash_core/atomic.py): a PNG is whole or absent, with the
    umask's permissions. ``chunks`` (name -> JSON value) become PNG text chunks, written as ComfyUI's SaveImage
    writes ``prompt`` and ``workflow``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for name, value in (chunks or {}).items():
        info.add_text(name, json.dumps(value))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info,
                                              compress_level=4))  # SaveImage's compression level


def comfyui_graph(args: argparse.Namespace, checkpoint: Path, downscale_factor: int = RELEASED_DOWNSCALE) -> tuple[dict, dict]:
    """The ComfyUI graph of this run, ``(api_prompt, ui_workflow)``: what the PNG's prompt/workflow chunks hold.
    ``downscale_factor``: the VAE's pixels per latent (the graph's EmptySD3LatentImage is sized for it)."""
    from .graph import generation_graph

    return generation_graph(
        args.prompt, checkpoint=checkpoint, negative=args.negative, steps=args.steps, seed=args.seed,
        width=args.width, height=args.height, cfg=args.cfg, batch=args.batch, use_t5=not args.no_t5,
        dtype=args.dtype, mode=args.mode, vae=args.vae, clip_l=args.clip_l, clip_g=args.clip_g, t5=args.t5,
        quantize=getattr(args, "weights", None) or "none",
        filename_prefix=args.out.stem, downscale_factor=downscale_factor, show_at=show_width(args) or None)


SHOW_BELOW, SHOW_AT = 64, 128  # images narrower than SHOW_BELOW px are saved enlarged to SHOW_AT px by default


def show_width(args: argparse.Namespace) -> int:
    """The width ``--show-at`` enlarges to (0: none): given, else 128 for images under 64 px wide."""
    if args.show_at is not None:
        if args.show_at < 0:
            raise UsageError(f"--show-at {args.show_at}: expected a width in pixels, or 0 for none")
        return args.show_at
    return SHOW_AT if args.width < SHOW_BELOW else 0


def enlarge(image, width: int):
    """Nearest-neighbour enlargement to ``width`` (height in proportion): ComfyUI's ImageScale nearest-exact,
    which for a whole-number factor repeats every pixel, as here."""
    from PIL import Image

    if not width or width == image.width:
        return image
    return image.resize((width, round(width * image.height / image.width)), Image.Resampling.NEAREST)


def run_files(args: argparse.Namespace, checkpoint: Path):
    """The checkpoint's files with the separate ``--vae`` / ``--clip-l`` / ``--clip-g`` / ``--t5`` files in their
    slots (headers only), as ``FlashPipeline.from_checkpoint`` will combine them."""
    from .checkpoint import index_checkpoint
    from .pipeline import _take_component

    files = index_checkpoint(checkpoint)
    for component in ("vae", "clip_l", "clip_g", "t5"):
        extra = getattr(args, component)
        if extra is not None:
            _take_component(files, index_checkpoint(extra, component), component, extra)
    return files


def image_size(args: argparse.Namespace, files) -> int:
    """Fill in ``args.width`` / ``args.height`` (default 1024, or the model's largest size when smaller) and
    check them against the VAE's pixels per latent and the MM-DiT's position table; returns that VAE factor."""
    from .checkpoint_info import largest_image_size, native_image_size, vae_downscale
    from .pipeline import check_size

    downscale = vae_downscale(files)
    largest = largest_image_size(files)
    default = native_image_size(largest)
    args.width = args.width if args.width is not None else (args.height or default)
    args.height = args.height if args.height is not None else args.width
    check_size(args.width, args.height, downscale)
    for name in ("width", "height"):
        value = getattr(args, name)
        if largest is not None and value > largest:
            raise UsageError(f"{name} {value} is larger than this model's largest image side, {largest} px "
                             "(its position table x patch 2 x its VAE's pixels per latent)")
    return downscale


def generate_checkpoint(args: argparse.Namespace) -> Path:
    """``--checkpoint``, or the embedded demo model."""
    if args.checkpoint is not None:
        return args.checkpoint
    if not DEMO_CHECKPOINT.exists():
        raise UsageError("no --checkpoint given and this installation has no embedded demo model "
                         f"(expected at {DEMO_CHECKPOINT}); pass --checkpoint PATH to SD3.5 / SD3.5-Flash weights")
    return DEMO_CHECKPOINT


def check_memory(args: argparse.Namespace, files, device) -> None:
    """Without ``--memory``: refuse a run whose estimated peak (flash_core/memory.py) exceeds the free memory of
    its device, with the estimate, before anything loads."""
    from .checkpoint_info import run_dtype
    from .memory import check_fits

    check_fits(files, device, dtype=run_dtype(args.dtype, device, files)[0], width=args.width, height=args.height,
               batch=args.batch, cfg=args.cfg, steps=args.steps, weights=args.weights,
               t5_weights=args.t5_weights, use_t5=not args.no_t5)


def print_auto_dtype(args: argparse.Namespace, device, files) -> None:
    """Say why ``--dtype auto`` chose a half dtype on the CPU (measured: flash_core/compute.py); the default fp32
    goes unsaid. The measurement is the pipeline's own, kept for the process."""
    if args.dtype != "auto" or device.type != "cpu":
        return
    import torch

    from .checkpoint_info import run_dtype

    dtype, reason = run_dtype(args.dtype, device, files)
    if dtype != torch.float32:
        print(reason, file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .pipeline import FlashPipeline, NonFiniteImageError

    paths = checked_outputs(args.out, args.batch)
    check_text("--prompt", args.prompt)
    check_text("--negative", args.negative)
    device = resolve_device(args.device, what="--device")
    checkpoint = generate_checkpoint(args)
    files = run_files(args, checkpoint)
    downscale = image_size(args, files)
    weights, t5_weights, use_t5, offload = args.weights, args.t5_weights, not args.no_t5, False
    if args.memory is not None:
        plan = memory_plan(args, checkpoint)
        print(plan.describe(), file=sys.stderr)
        weights, t5_weights, use_t5, offload = plan.tier.mmdit, plan.t5_weights, plan.use_t5, plan.tier.offload
    else:
        check_memory(args, files, device)
    args.weights, args.no_t5 = weights, not use_t5  # what the embedded graph records
    pipe = FlashPipeline.from_checkpoint(
        checkpoint, vae=args.vae, clip_l=args.clip_l, clip_g=args.clip_g, t5=args.t5, tokenizers=args.tokenizers,
        use_t5=use_t5, dtype=args.dtype, device=args.device, weights=weights, t5_weights=t5_weights,
        quant_backend=args.quant_backend, offload=offload,
    )
    for component, text in pipe.quant_report.items():
        print(f"{component}: {text}", file=sys.stderr)
    print_auto_dtype(args, device, files)
    try:
        images = pipe(args.prompt, negative=args.negative, steps=args.steps, seed=args.seed, width=args.width,
                      height=args.height, cfg=args.cfg, use_t5=use_t5, batch=args.batch, mode=args.mode,
                      progress=not args.quiet)
    except NonFiniteImageError as err:
        raise FlashError(f"'{checkpoint}': {err}") from None
    import torch

    if device.type == "cpu" and pipe.dtype in (torch.bfloat16, torch.float16):
        from .compute import measured_summary

        for line in measured_summary((pipe.dtype,)):
            print(line, file=sys.stderr)
    prompt, workflow = comfyui_graph(args, checkpoint, downscale)
    for image, path in zip(images, paths, strict=True):
        save_png(enlarge(image, show_width(args)), path, {"prompt": prompt, "workflow": workflow})
        print_path(path)
    return 0


def memory_plan(args: argparse.Namespace, checkpoint: Path):
    """The memory tier for this run (flash_core/memory.py), from the headers of every file involved."""
    from .checkpoint_info import run_dtype
    from .devices import resolve_device
    from .memory import parse_budget, plan_memory

    device = resolve_device(args.device, what="--device")
    files = run_files(args, checkpoint)
    if args.width is None or args.height is None:
        image_size(args, files)
    return plan_memory(files, parse_budget(args.memory, device), dtype=run_dtype(args.dtype, device, files)[0],
                       width=args.width, height=args.height, batch=args.batch, cfg=args.cfg,
                       weights=args.weights, use_t5=not args.no_t5, steps=args.steps)


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint_info import describe_checkpoint

    print(describe_checkpoint(args.path, backends=True))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quant_io import quantize_checkpoint

    check_destination(args.output, "output")
    exclude = None if args.exclude is None else tuple(p.strip() for p in args.exclude.split(",") if p.strip())
    report = quantize_checkpoint(args.input, args.output, fmt=args.format, t5_fmt=args.t5,
                                 group_size=args.group_size, exclude=exclude, progress=not args.quiet)
    print(report)
    return 0


COMMANDS = {"generate": cmd_generate, "info": cmd_info, "quantize": cmd_quantize}


def run_command(args: argparse.Namespace) -> int:
    """Run the subcommand; every expected failure becomes one stderr line and status 2."""
    return run_guarded("sd35-flash", lambda: COMMANDS[args.command](args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "quantize"):
        from .memory import return_large_frees

        return_large_frees()
    with sigterm_raises():  # SIGTERM unwinds like Ctrl-C: temporary files are removed
        return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
