"""The whole pipeline against ComfyUI: the same checkpoint, prompt, seed, size and steps, cold and warm.

    COMFYUI_ROOT=/path/to/ComfyUI /path/to/comfyui-python benchmarks/pipeline_vs_comfyui.py \\
        --file /tmp/sd35_medium_random.safetensors --size 128 --repeats 3

Run it with ComfyUI's Python (every contestant then uses the same torch); the file is the one
benchmarks/peak_memory.py makes. Contestants, each in a fresh process per repeat, in alternating order:
- ``cli``: ``sd35-flash generate`` (cold only: one prompt a process);
- ``pipeline``: ``FlashPipeline.from_checkpoint``, a first prompt (cold), then a second (warm);
- ``comfy stock``: ComfyUI's stock SD3 graph in-process (CheckpointLoaderSimple -> ModelSamplingSD3 -> CLIPTextEncode
  -> EmptySD3LatentImage -> KSampler euler/simple at CFG 1 -> VAEDecode -> PNG), then a second prompt;
- ``comfy flash``: the pack's graph (Flash Checkpoint Loader -> CLIPTextEncode -> Flash Sampler -> VAEDecode).
Cold is process start to the first PNG written; warm is the second prompt's encode, sampling, decode and PNG. All
in fp32 on the CPU with ComfyUI's bundled CLIP tokenizer, T5 off (the file has none). Ratios are per repeat
against ``comfy stock``: the median with the range. The last column is the largest ``VmHWM`` of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CONTESTANTS = ("cli", "pipeline", "comfy stock", "comfy flash")
PROMPTS = ("a red circle in the center", "a blue square at the top")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=CONTESTANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def save(image, path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8)).save(path)


def comfy_setup(args):
    root = os.environ["COMFYUI_ROOT"]
    sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(args.file.parent))


def comfy_graph(args, flash: bool):
    """One function per prompt: the graph from the loader (first call) or from the loaded models (later)."""
    import torch
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    import nodes as comfy_nodes

    models = {}

    def run(prompt: str, out: Path) -> None:
        with torch.inference_mode():
            if not models:
                if flash:
                    from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

                    model, clip, vae = ours["SD35FlashCheckpointLoader"]().load(args.file.name, "off", "fp32")
                else:
                    model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(args.file.name)[:3]
                    model = ModelSamplingSD3().patch(model, shift=3.0)[0]
                models.update(model=model, clip=clip, vae=vae)
            model, clip, vae = models["model"], models["clip"], models["vae"]
            (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, prompt)
            latent = EmptySD3LatentImage.execute(width=args.size, height=args.size, batch_size=1)[0]
            if flash:
                from sd35_flash.nodes import NODE_CLASS_MAPPINGS as ours

                (samples,) = ours["SD35FlashSampler"]().sample(model, positive, latent, seed=0, steps=args.steps,
                                                               cfg=1.0, mode="euler")
            else:
                (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
                (samples,) = comfy_nodes.KSampler().sample(model, 0, args.steps, 1.0, "euler", "simple", positive,
                                                           negative, latent)
            (image,) = comfy_nodes.VAEDecode().decode(vae, samples)
            save(image, out)

    return run


def peak_rss() -> int:
    """This process's resident-memory high-water mark (``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> dict:
    """One contestant in this (fresh) process: seconds from ``$BENCH_T0`` to the first PNG, the second prompt's
    seconds (None for the CLI), and the process's peak resident memory."""
    t0 = float(os.environ["BENCH_T0"])
    tokenizers = os.environ["COMFYUI_ROOT"]  # ComfyUI's bundled CLIP tokenizer, as its own graph uses
    first, second = args.out / "first.png", args.out / "second.png"
    if args.child == "cli":
        from sd35_flash.flash_core import cli

        argv = ["generate", "-c", str(args.file), "--tokenizers", tokenizers, "-p", PROMPTS[0], "-o", str(first),
                "--width", str(args.size), "--height", str(args.size), "--steps", str(args.steps), "--seed", "0",
                "--dtype", "fp32", "--no-t5", "--mode", "euler", "--quiet", "--show-at", "0"]
        assert cli.main(argv) == 0
        return {"cold": time.time() - t0, "warm": None, "peak": peak_rss()}
    if args.child == "pipeline":
        from sd35_flash.flash_core.pipeline import FlashPipeline

        pipe = FlashPipeline.from_checkpoint(args.file, tokenizers=tokenizers, use_t5=False, dtype="fp32")

        def run(prompt: str, out: Path) -> None:
            pipe(prompt, steps=args.steps, width=args.size, height=args.size, seed=0, use_t5=False, mode="euler",
                 progress=False)[0].save(out)
    else:
        comfy_setup(args)
        run = comfy_graph(args, flash=args.child == "comfy flash")
    run(PROMPTS[0], first)
    cold = time.time() - t0
    tic = time.perf_counter()
    run(PROMPTS[1], second)
    return {"cold": cold, "warm": time.perf_counter() - tic, "peak": peak_rss()}


def spawn(args, name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="pipeline_vs_comfyui_") as out:
        env = {**os.environ, "BENCH_T0": repr(time.time())}
        result = subprocess.run([sys.executable, str(HERE), "--file", str(args.file), "--size", str(args.size),
                                 "--steps", str(args.steps), "--child", name, "--out", out], env=env,
                                capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"pipeline_vs_comfyui: {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    if not os.environ.get("COMFYUI_ROOT"):
        raise SystemExit("pipeline_vs_comfyui: set COMFYUI_ROOT to a ComfyUI checkout (and run its Python)")
    runs: dict[str, list[dict]] = {name: [] for name in CONTESTANTS}
    for i in range(args.repeats):
        order = CONTESTANTS if i % 2 == 0 else CONTESTANTS[::-1]
        for name in order:
            runs[name].append(spawn(args, name))
            print(f"repeat {i + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    stock = runs["comfy stock"]
    print(f"{args.file.name}, {args.size} px, {args.steps} steps, fp32, CPU, T5 off; {args.repeats} repeats, "
          "a fresh process each")
    print("| contestant | cold s | cold / ComfyUI cold (range) | warm s | warm / ComfyUI warm (range) | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for name in CONTESTANTS:
        cold = [r["cold"] for r in runs[name]]
        ratios = [r["cold"] / s["cold"] for r, s in zip(runs[name], stock, strict=True)]
        row = [f"{statistics.median(cold):.1f}", f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]
        if runs[name][0]["warm"] is None:
            row += ["-", "-"]
        else:
            warm = [r["warm"] for r in runs[name]]
            wr = [r["warm"] / s["warm"] for r, s in zip(runs[name], stock, strict=True)]
            row += [f"{statistics.median(warm):.2f}", f"{statistics.median(wr):.2f} ({min(wr):.2f}-{max(wr):.2f})"]
        row.append(f"{max(r['peak'] for r in runs[name]) / 2**30:.2f}")
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
