"""Weight formats side by side: bytes, velocity error, speed, and the peak memory of each memory tier.

    python benchmarks/quantization.py              # the SD3.5-Medium-proportioned model at 1/8 scale
    python benchmarks/quantization.py --tables 1,2 # skip the generation runs

Three tables:
1. MM-DiT bytes per format / bf16 bytes, for the SD3.5 Medium and Large architectures (from their shapes, on
   the meta device: no weights needed) and for this benchmark's model (the real quantized state dicts).
2. On the benchmark model, bf16 weights as the reference, on fixed inputs: the relative RMS error of the
   velocity, and the time of one MM-DiT forward relative to bf16 (the median over alternating pairs of runs),
   with the backend ``auto`` picked (this CPU; CUDA too when there is one).
3. Peak RSS of a whole 4-step ``sd35-flash generate`` per memory tier (each in a fresh process), relative to
   16-bit with T5.

The benchmark model keeps SD3.5 Medium's proportions at about 1/8 of its parameters (MM-DiT 0.33 B, T5 0.62 B,
CLIP-G 0.10 B, CLIP-L 0.03 B) with random weights (N(0, 1/fan_in) Linears, nothing zero-initialised, so
every layer moves the output). Random Gaussian weights have none of the outliers of trained ones: expect real
checkpoints to show larger errors at 4 and 6 bits. The generation runs tokenize with the CLIP BPE and T5
SentencePiece files the tests make (tests/tokenizer_factories.py), written into the work folder.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sd35_flash.flash_core import quant  # noqa: E402
from sd35_flash.flash_core.checkpoint import load_mmdit, save_checkpoint  # noqa: E402
from sd35_flash.flash_core.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from sd35_flash.flash_core.vae import SD3VAE, VAEConfig  # noqa: E402

from tokenizer_factories import write_tokenizers  # noqa: E402

BENCH_MMDIT = MMDiTConfig(depth=8, hidden_size=1024, pos_embed_max_size=64, dual_attention_layers=(0, 1, 2, 3))
SIZE = 256           # image side for the velocity / speed inputs and the generation runs
TEXT_TOKENS = 77 + 256
TIERS = [  # name, checkpoint (a format key of quantized_files; "bf16" is the 16-bit file), generate arguments
    ("16-bit + T5", "bf16", []),
    ("16-bit, T5 off", "bf16", ["--no-t5"]),
    ("int8 + T5", "int8", []),
    ("int8 + T5 int8", "int8_t5int8", []),
    ("int8, T5 off", "int8", ["--no-t5"]),
    ("int6, T5 off", "int6", ["--no-t5"]),
    ("int4, T5 off", "int4", ["--no-t5"]),
    ("int8 quantized on load, T5 off", "bf16", ["--weights", "int8", "--no-t5"]),
]

# ------------------------------------------------------------------------------------------- the model


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
        elif name.endswith("weight"):  # norms
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(0.02 * torch.randn(param.shape, generator=gen))
    return module


def text_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in model.state_dict().items() if "position_ids" not in k and k != "encoder.embed_tokens.weight"}
    if "embeddings.token_embedding.weight" in sd:
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    return sd


def clip_config(width: int, layers: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act,
                          projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def build_checkpoint(path: Path) -> Path:
    """The benchmark checkpoint in bf16 (official single file), made once and reused."""
    if path.exists():
        return path
    print(f"writing the benchmark checkpoint {path} ...", file=sys.stderr)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=1536, d_kv=64, d_ff=4096, num_layers=20, num_heads=24,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    parts = {
        "mmdit": randomize_(MMDiT(BENCH_MMDIT), 0).to(torch.bfloat16),
        "vae": randomize_(SD3VAE(VAEConfig(base_channels=64)), 1),
        "clip_l": text_sd(randomize_(CLIPTextModel(clip_config(384, 4, "quick_gelu")), 2).to(torch.bfloat16)),
        "clip_g": text_sd(randomize_(CLIPTextModelWithProjection(clip_config(768, 8, "gelu")), 3).to(torch.bfloat16)),
        "t5": text_sd(randomize_(t5, 4).to(torch.bfloat16)),
    }
    return save_checkpoint(path, **parts)


# ------------------------------------------------------------------------------------------- table 1


def mmdit_bytes(config: MMDiTConfig, fmt: str | None) -> int:
    """Bytes of the MM-DiT state dict as :mod:`quant_io` writes it (bf16 for ``fmt=None``), from shapes."""
    with torch.device("meta"):
        model = MMDiT(config, dtype=torch.bfloat16)
    scheme = quant.QuantScheme.default("mmdit", fmt) if fmt else None
    linears = quant.linear_layers(model)
    total = 0
    for key, tensor in model.state_dict().items():
        layer = key.removesuffix(".weight")
        if scheme and layer in linears and not scheme.excludes(layer):
            total += quant.quantized_nbytes(tuple(tensor.shape), fmt)
        elif key == "pos_embed" and fmt and fmt != "fp8":
            continue  # the sin-cos table is rebuilt on load (quant.elide_pos_embed)
        else:
            total += tensor.numel() * 2
    return total


def real_bytes(sd: dict[str, torch.Tensor], fmt: str) -> int:
    scheme = quant.QuantScheme.default("mmdit", fmt)
    with torch.device("meta"):
        names = list(quant.linear_layers(MMDiT(BENCH_MMDIT)))
    packed = quant.quantize_state_dict(sd, names, scheme)
    return quant.sd_nbytes(quant.elide_pos_embed(packed, scheme))


def table_bytes(bench_sd: dict[str, torch.Tensor]) -> list[str]:
    rows = ["| format | SD3.5 Medium | SD3.5 Large | benchmark model (real state dict) | goal |", "|---|---|---|---|---|"]
    goals = {"int8": "<= 0.53", "fp8": "", "int6": "<= 0.40", "int4": "<= 0.28"}
    bf16 = {"medium": mmdit_bytes(MMDiTConfig.sd35_medium(), None), "large": mmdit_bytes(MMDiTConfig.sd35_large(), None)}
    bench_bf16 = quant.sd_nbytes(bench_sd)
    for fmt in quant.FORMATS:
        medium = mmdit_bytes(MMDiTConfig.sd35_medium(), fmt) / bf16["medium"]
        large = mmdit_bytes(MMDiTConfig.sd35_large(), fmt) / bf16["large"]
        rows.append(f"| {fmt} | {medium:.3f} | {large:.3f} | {real_bytes(bench_sd, fmt) / bench_bf16:.3f} | {goals[fmt]} |")
    return rows


# ------------------------------------------------------------------------------------------- table 2


def fixed_inputs(device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=gen)
    ctx = torch.randn(1, TEXT_TOKENS, 4096, generator=gen)
    y = torch.randn(1, 2048, generator=gen)
    t = torch.tensor([750.0], device=device)  # timesteps stay fp32, as the pipeline passes them
    return [x.to(device, dtype), t, ctx.to(device, dtype), y.to(device, dtype)]


@torch.no_grad()
def time_forward(model, inputs, device, reps: int, warmup: bool = True) -> float:
    if warmup:
        model(*inputs)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def table_velocity(checkpoint: Path, device: torch.device, reps: int) -> list[str]:
    """Per format: the velocity error from the weights alone (fp32 compute on both sides) and with bf16
    activations, both against the bf16-weight model; and the bf16-activation forward time relative to bf16."""
    bf16 = torch.bfloat16
    exact = load_mmdit(checkpoint, dtype=torch.float32, device=device)  # the bf16 weights, computed in fp32
    v_exact = exact(*fixed_inputs(device, torch.float32))
    reference = load_mmdit(checkpoint, dtype=bf16, device=device)
    inputs = fixed_inputs(device, bf16)
    v_ref = reference(*inputs).float()
    t_ref = time_forward(reference, inputs, device, reps)
    rows = [f"| format ({device.type}) | velocity error, fp32 compute | velocity error, bf16 activations | "
            "forward time / bf16 | backend (auto) |", "|---|---|---|---|---|",
            f"| bf16 | 0 | {quant.relative_rms_error(v_exact, v_ref):.4f} (vs fp32 compute) | 1.00 "
            f"({t_ref * 1e3:.0f} ms) | - |"]
    for fmt in quant.FORMATS:
        scheme = quant.QuantScheme.default("mmdit", fmt)
        quant.quantize_module(exact, scheme)
        weight_error = quant.relative_rms_error(v_exact, exact(*fixed_inputs(device, torch.float32)))
        exact = load_mmdit(checkpoint, dtype=torch.float32, device=device)
        model = load_mmdit(checkpoint, dtype=bf16, device=device)
        quant.quantize_module(model, scheme)
        choice = quant.choose_backend(fmt, device, bf16, width=BENCH_MMDIT.hidden_size)
        quant.set_backend(model, choice.backend, bf16)
        error = quant.relative_rms_error(v_ref, model(*inputs).float())
        ratio = statistics.median(time_forward(model, inputs, device, 1, warmup=False)
                                  / time_forward(reference, inputs, device, 1, warmup=False)
                                  for _ in range(reps))  # alternating pairs: load drift cancels
        rows.append(f"| {fmt} | {weight_error:.4f} | {error:.4f} | {ratio:.2f} | {choice.backend} |")
        del model
    return rows


# ------------------------------------------------------------------------------------------- table 3


RSS_SCRIPT = """
import sys
from sd35_flash.flash_core.cli import main
rc = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK_RSS_KB", hwm.split()[1], rc)
"""  # VmHWM, not ru_maxrss: ru_maxrss survives fork + exec and would report this parent's size


def quantized_files(checkpoint: Path, work: Path) -> dict[str, Path]:
    """The benchmark checkpoint quantized once by ``sd35-flash quantize`` (cached beside it)."""
    from sd35_flash.flash_core.quant_io import quantize_checkpoint

    files = {"bf16": checkpoint}
    for key, fmt, t5 in (("int8", "int8", None), ("int8_t5int8", "int8", "int8"), ("int6", "int6", None),
                         ("int4", "int4", None)):
        files[key] = work / f"bench_{key}.safetensors"
        if not files[key].exists():
            print(quantize_checkpoint(checkpoint, files[key], fmt=fmt, t5_fmt=t5, progress=False), file=sys.stderr)
    return files


def run_tier(checkpoint: Path, extra: list[str], out: Path, tokenizers: Path) -> tuple[int, float]:
    args = [sys.executable, "-c", RSS_SCRIPT, "generate", "--checkpoint", str(checkpoint), "--prompt",
            "a red circle at the top left", "--width", str(SIZE), "--height", str(SIZE), "--steps", "4",
            "--dtype", "bf16", "--device", "cpu", "--tokenizers", str(tokenizers), "-q", "--out", str(out), *extra]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PEAK_RSS_KB")), None)
    if done.returncode or line is None or not line.endswith(" 0"):
        raise SystemExit(f"generation failed for {extra}:\n{done.stderr[-2000:]}")
    return int(line.split()[1]) * 1024, seconds


def table_rss(checkpoint: Path, work: Path) -> list[str]:
    files = quantized_files(checkpoint, work)
    tokenizers = write_tokenizers(work / "tokenizer_files")
    rows = ["| tier | checkpoint | peak RSS | / 16-bit + T5 | wall time |", "|---|---|---|---|---|"]
    base = None
    for name, key, extra in TIERS:
        rss, seconds = run_tier(files[key], extra, work / "tier.png", tokenizers)
        base = base or rss
        rows.append(f"| {name} | {files[key].name} ({files[key].stat().st_size / 2**30:.2f} GiB) | "
                    f"{rss / 2**30:.2f} GiB | {rss / base:.2f} | {seconds:.0f} s |")
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sd35_flash_quant_bench"),
                        help="where the benchmark checkpoint is written once and reused")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per format (the best counts)")
    parser.add_argument("--tables", default="1,2,3", help="which tables to print (default 1,2,3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = build_checkpoint(args.work / "bench_bf16.safetensors")

    tables = set(args.tables.split(","))
    if "1" in tables:
        bench_sd = load_mmdit(checkpoint).state_dict()
        print("## 1. MM-DiT bytes / bf16 bytes\n")
        print("\n".join(table_bytes(bench_sd)))
        del bench_sd
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices if "2" in tables else []:
        print(f"\n## 2. Benchmark MM-DiT, {SIZE}x{SIZE}, {TEXT_TOKENS} text tokens, bf16 activations, {device.type}\n")
        print("\n".join(table_velocity(checkpoint, device, args.reps)))
    if "3" in tables:
        print(f"\n## 3. Peak RSS of a 4-step generation, {SIZE}x{SIZE}, CPU, bf16 (each tier a fresh process)\n")
        print("\n".join(table_rss(checkpoint, args.work)))
    print(f"\n(torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"model: {json.dumps(BENCH_MMDIT.to_dict())})")


if __name__ == "__main__":
    main()
