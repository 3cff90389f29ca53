"""Analytic (data-free) bias correction: clipped-normal means against closed forms and sampling,
the expected shift of a convolution, the driver against the measured shift, with and after CLE."""
import math

import pytest
import torch
from torch import nn

import fewbits
from fewbits.algorithms.bias_correction import clipped_normal_mean, expected_output_shift
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe
from fewbits.spec import PerTensor, QuantSpec
from fewbits.steps import BiasCorrection, CrossLayerEqualization


def test_clipped_normal_mean_closed_forms_and_sampling():
    mu, sigma = torch.tensor([0.0, 1.0, -2.0, 3.0, 9.0]), torch.tensor([1.0, 2.0, 0.5, 0.0, 1.0])
    assert torch.allclose(clipped_normal_mean(mu, sigma), mu.double())  # no clipping: the mean
    relu = clipped_normal_mean(mu, sigma, 0.0)
    assert relu[0].item() == pytest.approx(1 / math.sqrt(2 * math.pi))  # E[max(0, N(0, 1))]
    assert relu[3].item() == 3.0  # sigma = 0: clamp(mu)
    g = torch.Generator().manual_seed(0)
    z = mu.double() + sigma.double() * torch.randn(400_000, 5, generator=g, dtype=torch.float64)
    sampled = z.clamp(0.0, 6.0).mean(0)
    # 400k samples: standard error ≤ 3/√400000 ≈ 0.005
    assert torch.allclose(clipped_normal_mean(mu, sigma, 0.0, 6.0), sampled, atol=0.02)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_expected_shift_of_a_convolution_is_its_response_to_the_constant_mean(groups):
    torch.manual_seed(groups)
    error = torch.randn(4, 4 // groups, 3, 3)
    mean = torch.randn(4)
    image = mean.view(1, -1, 1, 1).expand(1, 4, 5, 5)
    centre = nn.functional.conv2d(image, error, groups=groups)[0, :, 1, 1]  # no padding in view
    assert torch.allclose(expected_output_shift(error, mean, groups).float(), centre, atol=1e-5)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                                      nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))

    def forward(self, x):
        return self.features(x)


def _trained_statistics(seed=0):
    """BatchNorm running statistics set on the data itself (one cumulative pass)."""
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 1.5)
    data = [torch.randn(32, 3, 12, 12) for _ in range(8)]
    net.train()
    with torch.no_grad():
        for x in data:
            net(x)
    return net.eval(), data


def _weights_only(bits=3) -> Recipe:
    layer = LayerRecipe(weight=TensorRecipe(QuantSpec(bits=bits, granularity=PerTensor())))
    return Recipe(f"w{bits}-per-tensor", (("Conv2d", layer),))


def _mean_shift(q, data, name) -> torch.Tensor:
    """Per-channel mean of (quantized − float) output of layer ``name`` on the (BN-folded) fp32
    model's inputs to it: the shift the weight error alone causes."""
    layer, ref = q.model.get_submodule(name), q.float_model.get_submodule(name)
    seen = []
    h = ref.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for x in data:
            q.float_model(x)
        h.remove()
        x = torch.cat(seen)
        diff = layer(x) - ref(x)
    return diff.mean((0, 2, 3))


def test_analytic_correction_removes_the_measured_shift():
    net, data = _trained_statistics()
    before = fewbits.prepare(net, _weights_only())
    after = fewbits.prepare(net, _weights_only())
    result = fewbits.apply(after, BiasCorrection(mode="analytic"), data)
    assert set(result.layers) == {"features.3", "features.6"}
    assert [s.name for s in result.skipped] == ["features.0"]  # the image is no BatchNorm output
    assert result.layers["features.3"]["input_from"] == "features.0"
    for name in ("features.3", "features.6"):
        shift_before, shift_after = _mean_shift(before, data, name), _mean_shift(after, data, name)
        # the BatchNorm statistics describe these inputs (set on the same data) and a conv output is
        # close to normal: measured 0.29 → 0.0007 and 0.064 → 0.0006 (what the normal model and the
        # padded border miss)
        assert shift_after.abs().mean() < shift_before.abs().mean() / 20, (name, shift_before, shift_after)


def test_analytic_correction_after_cle_uses_the_rescaled_statistics():
    net, data = _trained_statistics(1)
    recipe = Recipe("pt", _weights_only().by_type, steps=(CrossLayerEqualization(high_bias_absorption=False),))
    plain = fewbits.calibrate(fewbits.prepare(net, recipe), data)
    corrected = fewbits.calibrate(fewbits.prepare(net, recipe), data)
    fewbits.apply(corrected, BiasCorrection(mode="analytic"), data)
    shift_plain = _mean_shift(plain, data, "features.3")
    shift_fixed = _mean_shift(corrected, data, "features.3")
    assert shift_fixed.abs().mean() < shift_plain.abs().mean() / 20  # measured 0.11 → 0.0002
    with pytest.raises(ValueError, match="bc mode"):
        BiasCorrection(mode="exact")
