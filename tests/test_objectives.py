"""The distillation losses (training/objectives.py) on tiny hand-checkable cases (docs/algorithm.md's formulas)."""

import math

import pytest
import torch

from sd35_flash.flash_core.schedule import shift_sigma
from sd35_flash.training import objectives as obj

F64 = torch.float64
GRID4 = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=F64)
GRID2 = torch.tensor([1.0, 0.75, 0.0], dtype=F64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bcast(values) -> torch.Tensor:
    """Per-sample numbers ``[B]`` as ``[B, 1, 1, 1]``."""
    return torch.as_tensor(values, dtype=F64).reshape(-1, 1, 1, 1)


def linear_student(w: torch.Tensor):
    """``v(x, s) = w * x`` with a scalar parameter ``w``; records the sigmas it was called with."""
    calls = []

    def student(x, sigma):
        calls.append(sigma.detach().clone())
        return w * x

    student.calls = calls
    return student


def linear_rollout(noise: torch.Tensor, sigmas: torch.Tensor, k: int, w: float) -> torch.Tensor:
    """Euler for ``v = w x`` in closed form: ``x_k = noise * prod_i (1 + w (s_{i+1} - s_i))``."""
    factor = math.prod(1 + w * (sigmas[i + 1].item() - sigmas[i].item()) for i in range(k))
    return noise * factor


# ------------------------------------------------------------------------------------------------ notation


def test_euler_x0_and_noised_with_per_sample_sigmas():
    x = torch.arange(8, dtype=F64).reshape(2, 1, 2, 2)
    v = torch.full_like(x, 2.0)
    sigma, sigma_next = torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([0.75, 0.0], dtype=F64)
    # x + (s' - s) v: sample 0 moves by -0.25 * 2, sample 1 by -0.5 * 2
    assert torch.equal(obj.euler_step(x, v, sigma, sigma_next), x + bcast([-0.5, -1.0]))
    # x - s v
    assert torch.equal(obj.x0_from_velocity(x, v, sigma), x - bcast([2.0, 1.0]))
    # (1 - s) x0 + s eps
    eps = torch.full_like(x, 10.0)
    expected = torch.cat([eps[:1], 0.5 * x[1:] + 5.0])
    assert torch.equal(obj.noised(x, eps, sigma), expected)


def test_euler_x0_and_noised_with_scalar_sigmas():
    x = torch.tensor([[[[1.0, -2.0]]], [[[4.0, 0.5]]]], dtype=F64)
    v = torch.tensor([[[[3.0, 1.0]]], [[[-1.0, 2.0]]]], dtype=F64)
    assert torch.allclose(obj.euler_step(x, v, 0.9, 0.75), x - 0.15 * v)
    assert torch.allclose(obj.euler_step(x, v, torch.tensor(0.9), torch.tensor(0.75)), x - 0.15 * v)
    assert torch.allclose(obj.x0_from_velocity(x, v, 0.25), x - 0.25 * v)
    eps = torch.ones_like(x)
    assert torch.allclose(obj.noised(x, eps, 0.25), 0.75 * x + 0.25)
    assert torch.equal(obj.noised(x, eps, 0.0), x)
    assert torch.equal(obj.noised(x, eps, 1.0), eps)


def test_x0_from_velocity_inverts_noised_for_the_true_velocity():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 2, 2, generator=g, dtype=F64), torch.randn(3, 2, 2, 2, generator=g, dtype=F64)
    sigma = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    x = obj.noised(x0, eps, sigma)
    assert torch.allclose(obj.x0_from_velocity(x, eps - x0, sigma), x0)
    # an Euler step with the true velocity stays on the straight line between x0 and eps
    assert torch.allclose(obj.euler_step(x, eps - x0, sigma, 0.1), obj.noised(x0, eps, 0.1))


def test_renoise_sigma_is_the_shifted_uniform():
    u = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    t = 0.02 + u * 0.96
    assert torch.allclose(obj.renoise_sigma(u), 3 * t / (1 + 2 * t))
    assert obj.renoise_sigma(torch.tensor(0.5, dtype=F64)).item() == pytest.approx(0.75)  # t = .5 -> .75
    assert torch.allclose(obj.renoise_sigma(u, 0.1, 0.9, shift=1.0), torch.tensor([0.1, 0.5, 0.9], dtype=F64))


# ------------------------------------------------------------------------------------------ Stage A: trajectory


def segment_case():
    x_start = torch.zeros(2, 1, 2, 2, dtype=F64)
    x_end = torch.tensor([[[[0.0, 2.0], [0.0, 2.0]]], [[[3.0, 1.0], [1.0, 1.0]]]], dtype=F64)
    return x_start, x_end


@pytest.mark.parametrize("kind", ["l2", "pseudo_huber"])
def test_trajectory_loss_is_zero_for_the_segment_slope(kind):
    g = torch.Generator().manual_seed(1)
    x_start, x_end = torch.randn(2, 2, 2, 2, generator=g, dtype=F64), torch.randn(2, 2, 2, 2, generator=g, dtype=F64)
    sigma, sigma_next = torch.tensor([1.0, 0.75], dtype=F64), torch.tensor([0.9, 0.5], dtype=F64)
    seen = []

    def exact(x, s):
        seen.append(s)
        return (x_end - x) / bcast(sigma_next - s)

    loss = obj.trajectory_loss(exact, x_start, x_end, sigma, sigma_next, kind=kind)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(seen[0], sigma)  # the student sees the per-sample sigmas


def test_trajectory_loss_values_by_hand():
    x_start, x_end = segment_case()  # per-sample mse for a zero velocity: (0+4+0+4)/4 = 2, (9+1+1+1)/4 = 3
    zero = lambda x, s: torch.zeros_like(x)  # noqa: E731
    assert obj.trajectory_loss(zero, x_start, x_end, 0.9, 0.75).item() == pytest.approx(2.5)
    # pseudo-Huber on the per-sample mse (not elementwise): sqrt(mse + c^2) - c
    c = 0.5
    huber = obj.trajectory_loss(zero, x_start, x_end, 0.9, 0.75, kind="pseudo_huber", huber_c=c).item()
    assert huber == pytest.approx(((math.sqrt(2 + c**2) - c) + (math.sqrt(3 + c**2) - c)) / 2)
    assert huber == pytest.approx((1.0 + math.sqrt(3.25) - 0.5) / 2)

    # a constant velocity 4 over a step of -0.25 moves every element by -1: mse (1+9+1+9)/4 = 5, (16+4+4+4)/4 = 7
    four = lambda x, s: torch.full_like(x, 4.0)  # noqa: E731
    assert obj.trajectory_loss(four, x_start, x_end, 1.0, 0.75).item() == pytest.approx(6.0)


def test_trajectory_loss_scalar_sigma_reaches_the_student_as_a_batch():
    x_start, x_end = segment_case()
    student = linear_student(torch.tensor(1.0, dtype=F64))
    obj.trajectory_loss(student, x_start, x_end, 0.9, 0.75)
    assert student.calls[0].shape == (2,)
    assert student.calls[0].tolist() == pytest.approx([0.9, 0.9])


def test_trajectory_loss_carries_the_student_gradient():
    x_start, x_end = segment_case()
    x_start = x_start + 1.0
    w = torch.tensor(0.0, dtype=F64, requires_grad=True)
    loss = obj.trajectory_loss(linear_student(w), x_start, x_end, 1.0, 0.5)
    loss.backward()
    # err = x_start - 0.5 w x_start - x_end at w = 0: (1, -1, 1, -1) and (-2, 0, 0, 0);
    # d mse / dw = mean(2 err * -0.5 x_start) = -mean(err): 0 and 0.5
    assert w.grad.item() == pytest.approx((0.0 + 0.5) / 2)


def test_trajectory_loss_rejects_an_unknown_kind():
    x_start, x_end = segment_case()
    with pytest.raises(ValueError, match="huber"):
        obj.trajectory_loss(lambda x, s: x, x_start, x_end, 1.0, 0.9, kind="l1")


# ---------------------------------------------------------------------------------------------- Stage B: DMD


def test_rollout_follows_euler_for_a_constant_velocity():
    noise = torch.randn(2, 1, 2, 2, dtype=F64)
    c = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], dtype=F64)
    for k in range(5):
        x = obj.rollout(lambda x, s: c.expand_as(x), noise, GRID4, k)
        assert torch.allclose(x, noise + (GRID4[k] - 1.0) * c)  # the steps telescope to (s_k - s_0) c
    assert torch.equal(obj.rollout(lambda x, s: c, noise, GRID4, 0), noise)


def test_rollout_follows_euler_for_v_equals_x_and_takes_no_gradient():
    noise = torch.randn(3, 2, 1, 2, dtype=F64)
    w = torch.tensor(1.0, dtype=F64, requires_grad=True)
    student = linear_student(w)
    x = obj.rollout(student, noise, GRID4, 3)
    # x_3 = noise * (1 - .1) (1 - .15) (1 - .25)
    assert torch.allclose(x, noise * 0.9 * 0.85 * 0.75)
    assert not x.requires_grad
    assert [s.tolist() for s in student.calls] == [[1.0] * 3, [0.9] * 3, [0.75] * 3]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_generator_step_shared_next_scores_the_next_trajectory_point(k):
    noise = torch.randn(2, 1, 2, 2, dtype=F64)
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    out = obj.generator_step(linear_student(w), noise, GRID4, k, "shared_next",
                             renoise_eps=torch.zeros_like(noise), renoise_u=torch.zeros(2))
    x_k = linear_rollout(noise, GRID4, k, 0.5)
    s_k, s_next = GRID4[k].item(), GRID4[k + 1].item()
    assert torch.allclose(out.x_k, x_k)
    assert out.sigma_k.tolist() == pytest.approx([s_k, s_k])
    assert torch.allclose(out.x0_hat, x_k - s_k * 0.5 * x_k)
    assert torch.allclose(out.x_score, x_k + (s_next - s_k) * 0.5 * x_k)
    assert out.sigma_score.tolist() == pytest.approx([s_next, s_next])
    # the gradient flows through step k only: d sum(x0_hat) / dw = -s_k sum(x_k)
    assert out.x0_hat.requires_grad and not out.x_k.requires_grad
    out.x0_hat.sum().backward()
    assert w.grad.item() == pytest.approx(-s_k * x_k.sum().item())


def test_generator_step_shared_next_renoises_on_a_grid_sigma_at_the_last_step():
    noise = torch.randn(5, 1, 2, 2, dtype=F64)
    eps = torch.randn(5, 1, 2, 2, dtype=F64)
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    u = torch.tensor([0.1, 0.26, 0.74, 0.999, 0.2499], dtype=F64)  # floor(4u) -> grid index 0, 1, 2, 3, 0
    out = obj.generator_step(linear_student(w), noise, GRID4, 3, "shared_next", renoise_eps=eps, renoise_u=u)
    x_k = linear_rollout(noise, GRID4, 3, 0.5)
    assert torch.allclose(out.x0_hat, x_k * (1 - 0.5 * 0.5))
    assert out.sigma_score.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 1.0])
    s = bcast(out.sigma_score)
    assert torch.allclose(out.x_score, (1 - s) * out.x0_hat + s * eps)
    assert out.x0_hat.requires_grad and not out.x_k.requires_grad


def test_generator_step_shared_next_last_step_on_the_two_step_grid():
    noise = torch.randn(3, 1, 1, 2, dtype=F64)
    eps = torch.randn(3, 1, 1, 2, dtype=F64)
    u = torch.tensor([0.49, 0.5, 1.0], dtype=F64)  # u = 1 is clamped to the last grid sigma
    out = obj.generator_step(lambda x, s: -x, noise, GRID2, 1, "shared_next", renoise_eps=eps, renoise_u=u)
    x_1 = noise * (1 - (0.75 - 1.0))  # v = -x: x_1 = noise (1 + 0.25)
    assert torch.allclose(out.x_k, x_1)
    assert torch.allclose(out.x0_hat, x_1 + 0.75 * x_1)
    assert out.sigma_score.tolist() == pytest.approx([1.0, 0.75, 0.75])
    s = bcast([1.0, 0.75, 0.75])
    assert torch.allclose(out.x_score, (1 - s) * out.x0_hat + s * eps)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_generator_step_shared_current_scores_the_step_input(k):
    noise = torch.randn(2, 1, 2, 2, dtype=F64)
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    out = obj.generator_step(linear_student(w), noise, GRID4, k, "shared_current",
                             renoise_eps=torch.randn_like(noise), renoise_u=torch.rand(2))
    x_k = linear_rollout(noise, GRID4, k, 0.5)
    s_k = GRID4[k].item()
    assert torch.allclose(out.x_score, x_k) and torch.allclose(out.x_k, x_k)
    assert out.sigma_score.tolist() == pytest.approx([s_k, s_k])
    assert torch.allclose(out.x0_hat, x_k * (1 - 0.5 * s_k))
    assert out.x0_hat.requires_grad and not out.x_score.requires_grad
    if k == 0:
        assert torch.equal(out.x_score, noise)  # sigma_0 = 1: the input is the noise itself


@pytest.mark.parametrize("k", [1, 3])
def test_generator_step_renoise_uses_a_fresh_shifted_sigma(k):
    noise = torch.randn(3, 1, 2, 2, dtype=F64)
    eps = torch.randn(3, 1, 2, 2, dtype=F64)
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    u = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    out = obj.generator_step(linear_student(w), noise, GRID4, k, "renoise", renoise_eps=eps, renoise_u=u)
    t = torch.tensor([0.02, 0.5, 0.98], dtype=F64)
    s_r = 3 * t / (1 + 2 * t)
    assert out.sigma_score.tolist() == pytest.approx(s_r.tolist())
    assert out.sigma_score[1].item() == pytest.approx(0.75)
    x_k = linear_rollout(noise, GRID4, k, 0.5)
    x0_hat = x_k * (1 - 0.5 * GRID4[k].item())
    assert torch.allclose(out.x0_hat, x0_hat)
    assert torch.allclose(out.x_score, (1 - bcast(s_r)) * x0_hat + bcast(s_r) * eps)
    assert out.x0_hat.requires_grad and not out.x_k.requires_grad


def test_generator_step_renoise_range_and_shift_are_used():
    noise = torch.randn(2, 1, 1, 1, dtype=F64)
    out = obj.generator_step(lambda x, s: torch.zeros_like(x), noise, GRID4, 0, "renoise",
                             renoise_eps=torch.zeros_like(noise), renoise_u=torch.tensor([0.25, 0.75], dtype=F64),
                             renoise_range=(0.2, 0.6), shift=2.0)
    expected = [shift_sigma(0.2 + 0.25 * 0.4, 2.0), shift_sigma(0.2 + 0.75 * 0.4, 2.0)]
    assert out.sigma_score.tolist() == pytest.approx(expected)
    assert torch.allclose(out.x_score, (1 - bcast(expected)) * noise)  # x0_hat = noise for v = 0, eps' = 0


def test_generator_step_rejects_an_unknown_score_sample():
    noise = torch.randn(1, 1, 1, 1)
    with pytest.raises(ValueError, match="shared_next"):
        obj.generator_step(lambda x, s: x, noise, GRID4.float(), 0, "shared", renoise_eps=noise,
                           renoise_u=torch.zeros(1))


def dmd_case():
    x0_real = torch.tensor([[[[0.0, 0.0]]], [[[2.0, 2.0]]]])
    x0_hat = torch.tensor([[[[1.0, 3.0]]], [[[1.0, 1.0]]]])  # mean |x0_hat - x0_real|: 2 and 1 (all: 1.5)
    x0_fake = torch.tensor([[[[4.0, -2.0]]], [[[5.0, 0.0]]]])  # x0_fake - x0_real: (4, -2) and (3, -2)
    return x0_hat, x0_real, x0_fake


def test_dmd_gradient_per_sample_and_per_batch():
    x0_hat, x0_real, x0_fake = dmd_case()
    g = obj.dmd_gradient(x0_hat, x0_real, x0_fake)
    assert g.tolist() == [[[[2.0, -1.0]]], [[[3.0, -2.0]]]]
    g = obj.dmd_gradient(x0_hat, x0_real, x0_fake, normaliser="per_batch")
    assert torch.allclose(g, torch.tensor([[[[4.0, -2.0]]], [[[3.0, -2.0]]]]) / 1.5)


def test_dmd_gradient_over_channels_and_pixels():
    g = torch.Generator().manual_seed(2)
    x0_hat, x0_real, x0_fake = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    expected = (x0_fake - x0_real) / (x0_hat - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(obj.dmd_gradient(x0_hat, x0_real, x0_fake), expected)


def test_dmd_gradient_clip_fp32_and_no_gradient():
    x0_hat, x0_real, x0_fake = dmd_case()
    g = obj.dmd_gradient(x0_hat, x0_real, x0_fake, clip=1.5)
    assert g.tolist() == [[[[1.5, -1.0]]], [[[1.5, -1.5]]]]
    leaf = x0_hat.to(torch.bfloat16).requires_grad_(True)
    g = obj.dmd_gradient(leaf, x0_real.to(torch.bfloat16), x0_fake.to(torch.bfloat16))
    assert g.dtype == torch.float32 and not g.requires_grad
    assert g.tolist() == [[[[2.0, -1.0]]], [[[3.0, -2.0]]]]


def test_dmd_gradient_rejects_an_unknown_normaliser():
    with pytest.raises(ValueError, match="per_sample"):
        obj.dmd_gradient(*dmd_case(), normaliser="global")


def test_dmd_generator_loss_gradient_is_g_over_the_element_count():
    gen = torch.Generator().manual_seed(3)
    x0_hat = torch.randn(2, 3, 2, 2, generator=gen).requires_grad_(True)
    g = torch.randn(2, 3, 2, 2, generator=gen)
    loss = obj.dmd_generator_loss(x0_hat, g)
    assert loss.item() == pytest.approx(0.5 * g.pow(2).mean().item())
    loss.backward()
    assert torch.allclose(x0_hat.grad, g / x0_hat.numel())
    assert not g.requires_grad and g.grad is None


def test_score_x0_is_x_minus_sigma_v_without_gradient():
    x = torch.tensor([[[[2.0]]], [[[4.0]]]])
    w = torch.tensor(1.0, requires_grad=True)
    out = obj.score_x0(lambda x, s: w * x, x, torch.tensor([0.5, 0.25]))
    assert out.flatten().tolist() == [1.0, 3.0]
    assert not out.requires_grad


def test_flow_matching_loss_zero_for_the_true_velocity_and_positive_otherwise():
    gen = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(3, 2, 2, 2, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    assert obj.flow_matching_loss(lambda x, s: eps - x0, x0, eps, sigma).item() == 0.0
    # recovering eps - x0 from the noised input itself checks that the model sees (1 - s) x0 + s eps at s
    from_input = lambda x, s: (x - x0) / s.reshape(-1, 1, 1, 1)  # noqa: E731
    assert obj.flow_matching_loss(from_input, x0, eps, sigma).item() == pytest.approx(0.0, abs=1e-10)
    zero = obj.flow_matching_loss(lambda x, s: torch.zeros_like(x), x0, eps, sigma)
    assert zero.item() > 0
    assert zero.item() == pytest.approx((eps - x0).pow(2).mean().item())


def test_flow_matching_loss_trains_the_model_not_the_student_sample():
    x0 = torch.ones(1, 1, 1, 2, requires_grad=True)
    eps = torch.zeros(1, 1, 1, 2)
    b = torch.tensor(0.0, requires_grad=True)
    loss = obj.flow_matching_loss(lambda x, s: x * 0 + b, x0, eps, torch.tensor([0.5]))
    loss.backward()
    assert loss.item() == pytest.approx(1.0)  # target eps - x0 = -1
    assert b.grad.item() == pytest.approx(2.0)  # d mean((b + 1)^2) / db at b = 0
    assert x0.grad is None


# ------------------------------------------------------------------------------------- Stage C: EMA and merging


def test_ema_update_by_hand():
    ema = {"w": torch.tensor([1.0, 2.0], dtype=F64), "b": torch.tensor([0.0], dtype=F64)}
    tensor = ema["w"]
    params = {"w": torch.tensor([3.0, 0.0], dtype=F64, requires_grad=True), "b": torch.tensor([1.0], dtype=F64)}
    obj.ema_update(ema, params, 0.99)
    assert ema["w"].tolist() == pytest.approx([1.02, 1.98])
    assert ema["b"].tolist() == pytest.approx([0.01])
    obj.ema_update(ema, params, 0.99)
    assert ema["w"].tolist() == pytest.approx([0.99 * 1.02 + 0.03, 0.99 * 1.98])
    assert ema["w"].tolist() == pytest.approx([1.0398, 1.9602])
    assert ema["b"].tolist() == pytest.approx([0.0199])
    assert ema["w"] is tensor and not tensor.requires_grad  # in place


def test_ema_update_keeps_the_ema_dtype():
    ema = {"w": torch.zeros(2)}
    obj.ema_update(ema, {"w": torch.ones(2, dtype=F64)}, 0.5)
    assert ema["w"].dtype == torch.float32 and ema["w"].tolist() == [0.5, 0.5]


def test_merge_weights_interpolates_float_tensors():
    high = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([2.0], dtype=torch.bfloat16),
            "n": torch.tensor([1, 2])}
    low = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([4.0], dtype=torch.bfloat16), "n": torch.tensor([7, 8])}
    merged = obj.merge_weights(high, low, 0.25)
    assert merged["w"].tolist() == [2.5, 5.0]  # 0.25 * high + 0.75 * low
    assert merged["h"].dtype == torch.bfloat16 and merged["h"].tolist() == [3.5]
    assert merged["n"].tolist() == [1, 2] and merged["n"] is not high["n"]  # non-float: a copy of high's
    assert torch.equal(obj.merge_weights(high, low, 1.0)["w"], high["w"])
    assert torch.equal(obj.merge_weights(high, low, 0.0)["w"], low["w"])
    assert high["w"].tolist() == [1.0, 2.0]  # inputs untouched


def test_merge_weights_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="'b'"):
        obj.merge_weights({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1)}, 0.5)
