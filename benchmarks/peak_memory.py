"""Peak resident memory of ``sd35-flash generate`` on a full-size SD3.5 Medium-shaped file, against its weights.

    python benchmarks/peak_memory.py --file /tmp/sd35_medium_random.safetensors     # made on first use (6.3 GB)
    python benchmarks/peak_memory.py --file ... --dtypes fp32,bf16 --size 128

The file (made by this script, never committed): SD3.5 Medium's MM-DiT (24 blocks, hidden 1536, MM-DiT-X), the
released CLIP-L and CLIP-G shapes and the released VAE, random weights, fp16 on disk, no T5; tokenizers made as
the tests make them. Each row runs ``generate`` (4 steps, T5 off) in a fresh process and reads the kernel's
``VmHWM`` there; "import" is the same process's high-water mark with the modules imported and nothing loaded.
The ratio is ``(peak - import) / weights in the run's dtype``: what loading and sampling cost beyond one copy of
the weights (activations at this size are a few MB).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
GIB = 2**30

RUNNER = r"""
import json, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
import torch, transformers  # noqa: F401
from sd35_flash.flash_core import cli, pipeline  # noqa: F401
imported = hwm()
argv = json.loads(sys.argv[1])
status = cli.main(argv) if argv else 0
print(json.dumps({"status": status, "import": imported, "peak": hwm()}))
"""


def make_file(path: Path) -> None:
    """SD3.5 Medium's MM-DiT, CLIP-L, CLIP-G and the released VAE with random fp16 weights, tensor by tensor."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd35_flash.flash_core.checkpoint import save_checkpoint
    from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig
    from sd35_flash.flash_core.vae import SD3VAE, VAEConfig

    def random_like(shapes: dict, seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, tensor in shapes.items():
            shape = tuple(tensor.shape)
            scale = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
            value = torch.randn(shape, generator=gen) * scale
            out[name] = (value + 1 if name.endswith("norm.weight") or ".ln_" in name else value).to(torch.float16)
        return out

    def clip(width, layers, act, projection):
        config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                num_hidden_layers=layers, num_attention_heads=width // 64, max_position_embeddings=77,
                                hidden_act=act, projection_dim=width, bos_token_id=49406, eos_token_id=49407)
        with torch.device("meta"):
            model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
        sd = {k: v for k, v in model.state_dict().items() if "position_ids" not in k}
        bare = "embeddings.token_embedding.weight" in sd  # transformers names CLIPTextModel's keys without it
        return {f"text_model.{k}" if bare else k: v for k, v in sd.items()}

    with torch.device("meta"):
        mmdit = MMDiT(MMDiTConfig.sd35_medium()).state_dict()
        vae = SD3VAE(VAEConfig()).state_dict()
    parts = {"mmdit": random_like(mmdit, 0), "vae": random_like(vae, 1),
             "clip_l": random_like(clip(768, 12, "quick_gelu", False), 2),
             "clip_g": random_like(clip(1280, 32, "gelu", True), 3)}
    print(f"writing {path} ...", file=sys.stderr)
    save_checkpoint(path, **parts)


def run(argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argv)], capture_output=True, text=True,
                            check=False)
    report = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    if result.returncode != 0 or report.get("status") != 0:
        raise SystemExit(f"peak_memory: the run failed:\n{result.stderr[-3000:]}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, required=True, help="the full-size file (made here when absent)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    if not args.file.exists():
        make_file(args.file)
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from sd35_flash.flash_core.checkpoint import index_checkpoint
    from sd35_flash.flash_core.checkpoint_info import weight_bytes
    from sd35_flash.flash_core.devices import DTYPES

    from tokenizer_factories import write_tokenizers

    files = index_checkpoint(args.file)
    with tempfile.TemporaryDirectory(prefix="peak_memory_") as folder:
        tmp = Path(folder)
        tokenizers = write_tokenizers(tmp / "tokenizers")
        print(f"{args.file.name}: {args.file.stat().st_size / GIB:.2f} GiB on disk; generate {args.size} px, "
              "4 steps, T5 off, fresh process per row")
        print("| dtype | weights | import | peak (VmHWM) | (peak - import) / weights | s |")
        print("|---|---|---|---|---|---|")
        for name in args.dtypes.split(","):
            weights = sum(weight_bytes(files, c, DTYPES[name]) for c in ("mmdit", "clip_l", "clip_g", "vae"))
            tic = time.perf_counter()
            result = run(["generate", "--checkpoint", str(args.file), "--tokenizers", str(tokenizers),
                          "--prompt", "a red circle", "--no-t5", "--dtype", name, "--width", str(args.size),
                          "--height", str(args.size), "--out", str(tmp / "image.png"), "--quiet"])
            seconds = time.perf_counter() - tic
            ratio = (result["peak"] - result["import"]) / weights
            print(f"| {name} | {weights / GIB:.2f} GiB | {result['import'] / GIB:.2f} GiB | "
                  f"{result['peak'] / GIB:.2f} GiB | {ratio:.2f}x | {seconds:.1f} |")


if __name__ == "__main__":
    main()
