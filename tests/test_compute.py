"""The CPU's half-precision matmul path is measured, kept per shape, and what :func:`mmdit.linear` runs."""

import pytest
import torch

from sd35_flash.flash_core import compute, mmdit


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(compute, "_CHOICES", {})
    monkeypatch.setattr(mmdit, "CPU_HALF_MATMUL_IN_FP32", None)


def test_native_runs_only_when_clearly_faster():
    assert compute.HalfMatmulChoice(torch.bfloat16, 64, 16, native_s=1.0, upcast_s=2.0).upcast is False
    assert compute.HalfMatmulChoice(torch.bfloat16, 64, 16, native_s=1.0, upcast_s=1.05).upcast is True  # a near tie
    assert compute.HalfMatmulChoice(torch.bfloat16, 64, 16, native_s=2.0, upcast_s=1.0).upcast is True


def test_a_shape_is_measured_once_per_row_bucket():
    first = compute.half_matmul_choice(torch.bfloat16, 64, rows=100)
    assert first.rows == 256 and first.native_s > 0 and first.upcast_s > 0
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
