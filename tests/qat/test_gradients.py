"""Gradient estimators, LSQ and PACT: forward passes against torch's fake quantization,
gradients against their closed forms."""
import math

import pytest
import torch

from fewbits import QuantSpec
from fewbits.qat import QATQuantizer, fake_quantize_estimated
from fewbits.recipe import TensorRecipe
from fewbits.wrap.quantizer import TensorQuantizer

U8 = QuantSpec(bits=8, signed=False, symmetric=False)
U4 = QuantSpec(bits=4, signed=False, symmetric=False)


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


@pytest.mark.parametrize("estimator", ["identity", "clipped", "relu", "soft"])
def test_forward_is_torch_fake_quantize_bit_for_bit(estimator, gen):
    x = torch.randn(1000, generator=gen) * 3
    ours = fake_quantize_estimated(x, torch.tensor(0.02), torch.tensor(100), U8, estimator)
    torch_fq = torch.fake_quantize_per_tensor_affine(x, 0.02, 100, 0, 255)
    assert torch.equal(ours, torch_fq)


def test_gradients_of_the_straight_through_estimators():
    # grid of step 1 with zero point 2 on 4 bits: levels 0..15 cover [-2, 13]
    x = torch.tensor([-5.0, -2.4, -1.0, 0.3, 7.5, 12.9, 13.6, 20.0])
    s, z = torch.tensor(1.0), torch.tensor(2)
    g = {e: _grad(lambda t, e=e: fake_quantize_estimated(t, s, z, U4, e), x) for e in ("identity", "clipped", "relu")}
    assert g["identity"].tolist() == [1.0] * 8
    # round(x) + 2 within [0, 15] ⇔ x rounds into [-2, 13]
    assert g["clipped"].tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
    assert g["relu"].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]  # no upper clip
    # torch's own mask agrees with "clipped"
    assert torch.equal(g["clipped"], _grad(lambda t: torch.fake_quantize_per_tensor_affine(t, 1.0, 2, 0, 15), x))


def test_soft_estimator_averages_one_per_step_and_peaks_at_the_thresholds():
    k = 4.0
    x = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000 + 3.0  # one step, sampled evenly
    grad = _grad(lambda t: fake_quantize_estimated(t.float(), torch.tensor(1.0), torch.tensor(0), U8, "soft", k), x)
    # ∫ k/(2 tanh(k/2)) sech²(k(f − ½)) df over [0, 1] = 1 exactly; midpoint sampling errs < 1e-6
    assert abs(grad.double().mean().item() - 1.0) < 1e-5
    at_threshold = _grad(lambda t: fake_quantize_estimated(t, torch.tensor(1.0), torch.tensor(0), U8, "soft", k),
                         torch.tensor([3.5]))
    assert at_threshold.item() == pytest.approx(k / (2 * math.tanh(k / 2)), rel=1e-6)  # float32 cosh


def test_lsq_step_gradient_matches_the_paper(gen):
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    q = QATQuantizer(TensorQuantizer(TensorRecipe(spec), "t.input", "input"), method="lsq").train()
    x = torch.randn(8, 16, generator=gen) * 2
    q(x)  # first batch: the step starts from the batch's min-max grid
    s, z = q.learned_value.detach().clone(), q.zero_point.clone()
    q.learned_value.grad = None
    xr = x.clone().requires_grad_(True)
    out = q(xr)
    out.backward(torch.ones_like(out))
    v = x / s + z
    inside = (v >= 0) & (v <= 15)
    # ∂ŷ/∂s: round(v) − v inside, qmin − z / qmax − z where clipped; scaled by 1/√(N·Qp)
    d = torch.where(inside, torch.round(v) - v, torch.where(v < 0, 0 - z, 15 - z).float())
    expected = d.sum() / math.sqrt(16 * (15 - int(z)))
    assert q.learned_value.grad.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)  # float32 sums
    assert torch.equal(xr.grad, inside.float())
    # forward equals the fixed-grid fake quantization within float32 division vs reciprocal
    fq = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), 0, 15)
    assert torch.allclose(out, fq, atol=float(s) * 1e-5)


def test_pact_learns_the_clip_from_values_above_it():
    q = QATQuantizer(TensorQuantizer(TensorRecipe(U8), "t.input", "input"), method="pact").train()
    q(torch.tensor([0.0, 4.0]))  # α starts at the first range: 4
    assert q.learned_value.item() == 4.0 and not bool(q.two_sided)
    with torch.no_grad():
        q.learned_value.fill_(2.0)
    x = torch.tensor([0.5, 1.0, 2.5, 3.0, 10.0]).requires_grad_(True)
    y = q(x)
    y.sum().backward()
    assert q.learned_value.grad.item() == 3.0  # three values at or above α
    assert x.grad.tolist() == [1, 1, 0, 0, 0]
    assert y.detach().max().item() == pytest.approx(2.0, abs=2.0 / 255)  # clipped at α, on the grid
    assert torch.equal(q.zero_point, torch.tensor(0, dtype=torch.int32))


def test_moving_average_ranges_and_the_eval_grid():
    q = QATQuantizer(TensorQuantizer(TensorRecipe(U8), "t.input", "input"), momentum=0.25).train()
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-3.0, 5.0]))
    assert q.running_min.item() == pytest.approx(-1.5) and q.running_max.item() == pytest.approx(2.0)
    q.eval()
    x = torch.linspace(-4, 4, 50)
    s = 3.5 / 255  # the EMA range [-1.5, 2.0] on 255 steps
    zp = round(1.5 / s)
    assert torch.allclose(q(x), torch.fake_quantize_per_tensor_affine(x, s, zp, 0, 255), atol=1e-6)
    q.train()
    q.ranges_frozen = True
    q(torch.tensor([-100.0, 100.0]))
    assert q.running_min.item() == pytest.approx(-1.5)  # frozen


def test_bad_options_are_named():
    base = TensorQuantizer(TensorRecipe(U8), "t.input", "input")
    with pytest.raises(ValueError, match="QAT method"):
        QATQuantizer(base, method="adam")
    with pytest.raises(ValueError, match="gradient estimator"):
        QATQuantizer(base, estimator="magic")
    with pytest.raises(ValueError, match="momentum"):
        QATQuantizer(base, momentum=0.0)
