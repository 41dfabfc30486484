"""The CPU's half-precision matmul path, its attention path and ``--dtype auto`` are measured, kept per shape,
and what :func:`mmdit.linear`, :func:`mmdit.attention` and ``generate`` run."""

import pytest
import torch

from sd35_flash.flash_core import compute, mmdit


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(compute, "_CHOICES", {})
    monkeypatch.setattr(compute, "_ATTENTION", {})
    monkeypatch.setattr(mmdit, "CPU_HALF_MATMUL_IN_FP32", None)
    monkeypatch.setattr(mmdit, "CPU_ATTENTION_PATH", None)


def test_native_runs_only_when_clearly_faster():
    assert compute.HalfMatmulChoice(torch.bfloat16, 64, 16, native_s=1.0, upcast_s=2.0).upcast is False
    assert compute.HalfMatmulChoice(torch.bfloat16, 64, 16, native_s=1.0, upcast_s=1.05).upcast is True  # a near tie
    assert compute.HalfMatmulChoice(torch.bfloat16, 64, 16, native_s=2.0, upcast_s=1.0).upcast is True


def test_a_shape_is_measured_once_per_row_bucket():
    first = compute.half_matmul_choice(torch.bfloat16, 64, rows=100)
    assert first.rows == 256 and first.native_s > 0 and first.upcast_s > 0 and first.fp32_s > 0
    assert compute.half_matmul_choice(torch.bfloat16, 64, rows=200) is first
    assert compute.half_matmul_choice(torch.bfloat16, 64, rows=10).rows == 16
    assert compute.half_matmul_choice(torch.bfloat16, 64, rows=10**6).rows == compute.ROW_BUCKETS[-1]


@pytest.mark.parametrize("upcast", [True, False])
def test_linear_follows_the_measured_choice(upcast):
    fast, slow = 1.0, 2.0
    choice = compute.HalfMatmulChoice(torch.bfloat16, 32, 16, native_s=slow if upcast else fast,
                                      upcast_s=fast if upcast else slow)
    compute._CHOICES[(torch.bfloat16, 32, 16)] = choice
    x = torch.randn(4, 32).to(torch.bfloat16)
    assert mmdit.matmul_dtype(x) == (torch.float32 if upcast else torch.bfloat16)
    weight = torch.randn(8, 32).to(torch.bfloat16)
    out = mmdit.linear(x, weight)
    assert out.dtype == torch.bfloat16
    reference = torch.nn.functional.linear(x.float(), weight.float())
    assert torch.allclose(out.float(), reference, rtol=2e-2, atol=2e-2)


def test_a_pinned_path_is_not_measured(monkeypatch):
    monkeypatch.setattr(mmdit, "CPU_HALF_MATMUL_IN_FP32", True)
    assert mmdit.matmul_dtype(torch.zeros(2, 16, dtype=torch.float16)) == torch.float32
    assert compute._CHOICES == {}
    assert mmdit.matmul_dtype(torch.zeros(2, 16)) == torch.float32  # fp32 inputs never ask


def test_the_summary_counts_the_shapes_that_ran():
    compute._CHOICES[(torch.bfloat16, 32, 16)] = compute.HalfMatmulChoice(torch.bfloat16, 32, 16, 1.0, 2.0)
    compute._CHOICES[(torch.bfloat16, 64, 16)] = compute.HalfMatmulChoice(torch.bfloat16, 64, 16, 2.0, 1.0)
    assert compute.measured_summary() == [
        "compute: bf16 Linear layers ran natively at 1 of 2 measured shapes, in fp32 at the other 1 "
        "(flash_core/compute.py)"]


def test_generate_reports_the_path_only_for_a_half_precision_run(tmp_path, capsys):
    from sd35_flash.flash_core import cli

    compute._CHOICES[(torch.bfloat16, 32, 16)] = compute.HalfMatmulChoice(torch.bfloat16, 32, 16, 1.0, 2.0)
    argv = ["generate", "-p", "a red circle in the center", "-o", str(tmp_path / "a.png"), "-q"]
    assert cli.main(argv) == 0
    assert "compute:" not in capsys.readouterr().err  # fp32: an earlier run's measurements are not this one's
    assert cli.main([*argv, "--dtype", "bf16"]) == 0
    assert "compute: bf16 Linear layers ran natively at" in capsys.readouterr().err


def test_half_counts_as_fast_as_fp32_within_the_margin():
    def choice(native, upcast, fp32):
        return compute.HalfMatmulChoice(torch.bfloat16, 64, 16, native_s=native, upcast_s=upcast, fp32_s=fp32)

    assert choice(1.0, 2.0, 1.1).as_fast_as_fp32  # native runs, 1.0 vs 1.1
    assert choice(3.0, 1.1, 1.0).as_fast_as_fp32  # upcast runs, within 15 %
    assert not choice(3.0, 1.3, 1.0).as_fast_as_fp32
    assert not choice(1.0, 2.0, None).as_fast_as_fp32  # fp32 never timed


def fake_choice(dtype, rows, **seconds):
    compute._ATTENTION[(dtype, rows)] = compute.AttentionChoice(dtype, rows, seconds)
    return compute._ATTENTION[(dtype, rows)]


def test_torchs_attention_kernel_stays_unless_another_is_clearly_faster():
    assert fake_choice(torch.float32, 256, sdpa=1.0, math=0.9).path == "sdpa"  # a near tie
    assert fake_choice(torch.float32, 256, sdpa=1.0, math=0.5).path == "math"
    assert fake_choice(torch.bfloat16, 256, sdpa=1.0, math=2.0, upcast=0.5).path == "upcast"


def test_attention_is_measured_once_per_dtype_and_row_bucket():
    first = compute.attention_choice(torch.float32, rows=100)
    assert first.rows == 256 and set(first.seconds) == {"sdpa", "math"}  # fp32 has nothing to upcast
    assert all(s > 0 for s in first.seconds.values())
    assert compute.attention_choice(torch.float32, rows=200) is first
    assert compute.attention_choice(torch.float32, rows=5000).rows == compute.ATTENTION_ROW_BUCKETS[-1]
    assert set(compute.attention_choice(torch.bfloat16, rows=10).seconds) == set(compute.ATTENTION_PATHS)
    assert "attention runs through" in first.describe()


@pytest.mark.parametrize("path", compute.ATTENTION_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_attention_path_computes_the_same_attention(path, dtype):
    q, k, v = (torch.randn(1, 20, 2, 64).to(dtype) for _ in range(3))  # [B, N, heads, 64]
    reference = mmdit.attention(q.float(), k.float(), v.float())
    fake_choice(dtype, 256, **{**dict.fromkeys(compute.ATTENTION_PATHS, 2.0), path: 0.1})
    with torch.inference_mode():
        assert mmdit.attention_path(q, k) == ("sdpa" if path == "upcast" and dtype == torch.float32 else path)
        out = mmdit.attention(q, k, v)
    assert out.dtype == dtype and out.shape == (1, 20, 128)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), reference, atol=tolerance, rtol=tolerance)


def test_training_and_pinned_attention_are_not_measured(monkeypatch):
    q = torch.randn(1, 8, 2, 64)
    assert mmdit.attention_path(q, q) == "sdpa"  # autograd on: the backward was never timed
    monkeypatch.setattr(mmdit, "CPU_ATTENTION_PATH", "math")
    with torch.no_grad():
        assert mmdit.attention_path(q, q) == "math"
    assert compute._ATTENTION == {}


def test_auto_keeps_a_small_model_in_fp32_without_measuring():
    dtype, reason = compute.auto_cpu_dtype(64, fp32_bytes=2**20)
    assert dtype == torch.float32 and "under 1 GiB" in reason
    assert compute._CHOICES == {}


@pytest.mark.parametrize(("bf16_s", "expected"), [(0.5, torch.bfloat16), (1.1, torch.bfloat16),
                                                  (2.0, torch.float32)])
def test_auto_stores_a_large_model_in_bf16_when_it_runs_as_fast(bf16_s, expected):
    compute._CHOICES[(torch.bfloat16, 1536, 1024)] = compute.HalfMatmulChoice(
        torch.bfloat16, 1536, 1024, native_s=bf16_s, upcast_s=9.0, fp32_s=1.0)
    dtype, reason = compute.auto_cpu_dtype(1536, fp32_bytes=8 * 2**30)
    assert dtype == expected
    assert reason.startswith(f"dtype auto: {'bf16' if expected == torch.bfloat16 else 'fp32'} (bf16 Linear")


def test_run_dtype_measures_only_auto_on_the_cpu(tmp_path):
    from sd35_flash.flash_core.checkpoint import index_checkpoint
    from sd35_flash.flash_core.checkpoint_info import run_dtype
    from sd35_flash.flash_core.demo import DEMO_CHECKPOINT

    files = index_checkpoint(DEMO_CHECKPOINT)
    cpu = torch.device("cpu")
    dtype, reason = run_dtype("auto", cpu, files)
    assert dtype == torch.float32 and "under 1 GiB" in reason  # the demo: small, exact, reproducible
    assert run_dtype("bf16", cpu, files) == (torch.bfloat16, "")
    assert compute._CHOICES == {}


def test_generate_says_when_auto_chose_bf16(tmp_path, capsys, monkeypatch):
    from sd35_flash.flash_core import cli

    monkeypatch.setattr(compute, "AUTO_HALF_MIN_BYTES", 0)  # the demo model stands in for a large one
    compute._CHOICES[(torch.bfloat16, 128, 1024)] = compute.HalfMatmulChoice(
        torch.bfloat16, 128, 1024, native_s=0.5, upcast_s=2.0, fp32_s=1.0)
    assert cli.main(["generate", "-p", "a red circle in the center", "-o", str(tmp_path / "a.png"), "-q"]) == 0
    assert "dtype auto: bf16 (bf16 Linear layers measured 500.00 ms native vs 1000.00 ms fp32" in \
        capsys.readouterr().err
