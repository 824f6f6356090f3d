"""ThresholdClip: forward values, the straight-through gradient of SPEC.md, positivity of λ."""

import pytest
import torch

from eclsnn import ThresholdClip
from eclsnn.core.functional import LAMBDA_MIN, threshold_clip


def _expected_grads(z: torch.Tensor, lam: float, h: torch.Tensor):
    inside = (z > 0) & (z < lam)
    dz = inside.to(z.dtype)
    dlam = torch.where(z >= lam, torch.ones_like(z), torch.where(inside, (h - z) / lam, torch.zeros_like(z)))
    return dz, dlam


@pytest.mark.parametrize("levels", [1, 2, 4, 8, None])
@pytest.mark.parametrize("lam", [0.5, 1.0, 3.0])
def test_gradients_match_spec_in_every_region(levels, lam):
    # points strictly inside each region: below 0, (0, λ), at and above λ
    z = torch.tensor([-2.0, -0.1, 0.07, 0.3, 0.45, 0.61, 0.77, 0.93, 0.999, 1.0, 1.2, 5.0], dtype=torch.float64) * lam
    z.requires_grad_(True)
    lam_t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    # per-element gradient of λ: differentiate each output separately
    h = threshold_clip(z, lam_t, levels)
    dz_exp, dlam_exp = _expected_grads(z.detach(), lam, h.detach())
    dz, = torch.autograd.grad(h.sum(), z, retain_graph=True)
    assert torch.equal(dz, dz_exp)
    per_elem = torch.stack([torch.autograd.grad(h[i], lam_t, retain_graph=True)[0] for i in range(len(z))])
    assert torch.allclose(per_elem, dlam_exp, rtol=0, atol=1e-12)
    # regions by name, as SPEC.md states them
    assert (dz[z.detach() <= 0] == 0).all() and (per_elem[z.detach() <= 0] == 0).all()
    assert (dz[z.detach() >= lam] == 0).all() and (per_elem[z.detach() >= lam] == 1).all()


def test_lambda_stays_trainable_at_one_level():
    # At L = 1 the output is already λ for z ≥ λ/2; keying regions to z keeps dλ = (λ − z)/λ > 0 there.
    lam = torch.tensor(1.0, requires_grad=True)
    z = torch.tensor([0.6, 0.8])
    h = threshold_clip(z, lam, levels=1)
    assert torch.equal(h.detach(), torch.tensor([1.0, 1.0]))
    h.sum().backward()
    assert lam.grad.item() == pytest.approx((1 - 0.6) + (1 - 0.8))


def test_unquantised_clip_passes_gradcheck_away_from_kinks():
    # Without quantisation the straight-through gradient is the true derivative.
    z = torch.tensor([-0.7, 0.2, 0.5, 1.4, 2.2], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: threshold_clip(a, b, None), (z, lam))


def test_per_channel_threshold_gradient_is_summed_per_channel():
    clip = ThresholdClip(levels=4, init_threshold=1.0, per_channel=True, num_channels=3)
    z = torch.rand(2, 3, 4, 4, dtype=torch.float32) * 2
    out = clip(z)
    out.sum().backward()
    h = out.detach()
    expected = []
    for c in range(3):
        _, dl = _expected_grads(z[:, c], 1.0, h[:, c])
        expected.append(dl.sum())
    assert torch.allclose(clip.threshold_raw.grad, torch.stack(expected))


def test_forward_values_and_levels():
    clip = ThresholdClip(levels=4, init_threshold=2.0)
    z = torch.tensor([-1.0, 0.0, 0.24, 0.26, 1.0, 1.74, 1.76, 9.0])
    # λ/L = 0.5: round(z/0.5) clamped to [0, 4], times 0.5
    assert torch.equal(clip(z).detach(), torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0]))
    plain = ThresholdClip(levels=None, init_threshold=2.0)
    assert torch.equal(plain(z).detach(), z.clamp(0, 2))


def test_lambda_is_kept_positive_and_can_recover():
    clip = ThresholdClip(levels=2, init_threshold=1.0)
    with torch.no_grad():
        clip.threshold_raw.fill_(-0.5)
    z = torch.tensor([0.5, 3.0])
    out = clip(z)
    assert clip.threshold.item() == pytest.approx(LAMBDA_MIN)
    assert (out.detach() >= 0).all() and (out.detach() <= LAMBDA_MIN).all()
    out.sum().backward()
    assert clip.threshold_raw.grad.item() > 0  # gradient descent on −loss would raise it again


def test_computed_in_float32_under_autocast():
    clip = ThresholdClip(levels=8, init_threshold=1.0)
    z = torch.rand(64) * 1.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clip(z.bfloat16())
    assert out.dtype == torch.float32
    assert torch.equal(out, clip(z.bfloat16().float()))


def test_lazy_per_channel_threshold():
    clip = ThresholdClip(per_channel=True, init_threshold=3.0)
    clip(torch.randn(2, 5, 3, 3))
    assert clip.threshold_raw.shape == (5,) and torch.all(clip.threshold_raw == 3.0)
    assert type(clip) is ThresholdClip


@pytest.mark.parametrize("kwargs", [dict(levels=-1), dict(levels=2.5), dict(init_threshold=0.0), dict(init_threshold=-1)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ThresholdClip(**kwargs)
