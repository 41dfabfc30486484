"""Sampling math: the shift map, the student grids, Euler and re-noise, CFG, ComfyUI-compatible noise."""

import pytest
import torch

from sd35_flash.flash_core import schedule


def test_shift_map_matches_sd3_time_shift():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    expected = 3 * t / (1 + 2 * t)
    assert torch.allclose(schedule.shift_sigma(t, 3.0), expected)
    assert schedule.shift_sigma(0.5, 1.0) == 0.5


def test_student_grids_are_dmd2_timesteps_through_shift_3():
    for steps in (2, 4):
        t = torch.arange(steps, 0, -1, dtype=torch.float64) / steps  # {1, .75, .5, .25} / {1, .5}
        shifted = schedule.shift_sigma(t, 3.0)
        grid = schedule.student_sigmas(steps)
        assert torch.allclose(grid[:-1].double(), shifted, atol=1e-7)
        assert grid[-1] == 0.0
    assert schedule.student_sigmas(4).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert schedule.student_sigmas(2).tolist() == pytest.approx([1.0, 0.75, 0.0])


def test_stored_grid_wins_and_is_validated():
    assert schedule.student_sigmas(2, [1.0, 0.6]).tolist() == pytest.approx([1.0, 0.6, 0.0])
    with pytest.raises(ValueError, match="3 steps, not 2"):
        schedule.student_sigmas(2, [1.0, 0.8, 0.6])
    with pytest.raises(ValueError, match="decrease"):
        schedule.student_sigmas(2, [0.6, 1.0])
    with pytest.raises(ValueError, match="2 or 4 steps"):
        schedule.student_sigmas(3)


def test_flash_sigmas_student_for_distilled_counts_teacher_otherwise():
    assert schedule.flash_sigmas(4).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    teacher = schedule.flash_sigmas(8)
    assert len(teacher) == 9 and teacher[0] == 1.0 and teacher[-1] == 0.0
    assert torch.allclose(teacher, schedule.teacher_sigmas(8))
    # A stored 4-step grid does not leak into a 2-step request.
    assert schedule.flash_sigmas(2, [1.0, 0.95, 0.8, 0.6]).tolist() == pytest.approx([1.0, 0.75, 0.0])
    assert schedule.flash_sigmas(4, [1.0, 0.95, 0.8, 0.6]).tolist() == pytest.approx([1.0, 0.95, 0.8, 0.6, 0.0])


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    sigmas = schedule.flash_sigmas(4, denoise=0.5)
    assert torch.allclose(sigmas, schedule.teacher_sigmas(8)[-5:])
    with pytest.raises(ValueError, match="denoise"):
        schedule.flash_sigmas(4, denoise=0.0)


def test_initial_noise_is_comfyui_prepare_noise():
    # ComfyUI: generator = torch.manual_seed(seed); torch.randn(size, dtype=float32, generator=generator, device="cpu")
    generator = torch.manual_seed(1234)
    expected = torch.randn((2, 16, 8, 6), dtype=torch.float32, generator=generator, device="cpu")
    assert torch.equal(schedule.initial_noise(1234, (2, 16, 8, 6)), expected)
    assert not torch.equal(schedule.initial_noise(1235, (2, 16, 8, 6)), expected)


def test_euler_integrates_a_straight_flow_exactly():
    # A perfect rectified flow from x0 to eps has constant velocity eps - x0 along the path x_s = (1-s) x0 + s eps.
    x0 = torch.randn(2, 16, 4, 4)
    eps = torch.randn(2, 16, 4, 4)

    def velocity(x, sigma):
        return eps - x0

    out = schedule.sample_euler(velocity, eps.clone(), schedule.student_sigmas(4))
    assert torch.allclose(out, x0, atol=1e-5)


def test_euler_reports_x0_hat_each_step():
    x0 = torch.zeros(1, 16, 2, 2)
    seen = []
    schedule.sample_euler(lambda x, s: x - x0, torch.ones(1, 16, 2, 2), schedule.student_sigmas(2),
                          callback=lambda i, x, x0_hat: seen.append((i, x0_hat.abs().max().item())))
    assert [i for i, _ in seen] == [0, 1]


def test_renoise_mixes_x0_hat_with_fresh_noise_at_the_next_sigma():
    x0 = torch.full((1, 16, 2, 2), 0.5)
    fresh = torch.full((1, 16, 2, 2), -1.0)
    calls = []

    def velocity(x, sigma):
        calls.append((x.clone(), sigma.clone()))
        return (x - x0) / sigma.view(-1, 1, 1, 1)  # any point maps back to x0

    out = schedule.sample_renoise(velocity, torch.randn(1, 16, 2, 2), torch.tensor([1.0, 0.75, 0.0]),
                                  noise_fn=lambda: fresh)
    assert torch.allclose(out, x0)
    x_second, sigma_second = calls[1]
    assert sigma_second.item() == pytest.approx(0.75)
    assert torch.allclose(x_second, 0.25 * x0 + 0.75 * fresh)


def test_renoise_noise_stream_matches_comfyui_lcm_sampler():
    like = torch.zeros(1, 16, 4, 4)
    draw = schedule.renoise_sampler(7, like)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(7)
    assert torch.equal(draw(), torch.randn(like.size(), dtype=like.dtype, generator=generator))
    assert torch.equal(draw(), torch.randn(like.size(), dtype=like.dtype, generator=generator))


def test_cfg_is_linear_guidance():
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert schedule.cfg_velocity(cond, uncond, 1.0).item() == 2.0
    assert schedule.cfg_velocity(cond, uncond, 4.0).item() == 5.0


def test_timestep_is_thousand_times_sigma():
    assert schedule.sigma_to_timestep(torch.tensor([0.75], dtype=torch.bfloat16)).dtype == torch.float32
    assert schedule.sigma_to_timestep(torch.tensor([0.75])).item() == 750.0
