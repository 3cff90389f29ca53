"""Weights used functionally: F.linear with a module's own parameters becomes a quantized layer;
parameters read any other way are listed, never skipped silently."""
import torch
from torch import nn
from torch.nn import functional as F

import fewbits
from fewbits.wrap import quantization_disabled


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 16) / 4)
        self.b1 = nn.Parameter(torch.randn(32))
        self.w2 = nn.Parameter(torch.randn(8, 32) / 6)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w1, self.b1))
        return self.out(F.linear(h, weight=self.w2))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.gamma = nn.Parameter(torch.ones(16))

    def forward(self, x):
        return F.linear(x, self.w) * self.gamma + x @ self.w  # w read twice: not a layer


def test_f_linear_with_own_parameters_becomes_a_quantized_layer():
    torch.manual_seed(0)
    model = Functional().eval()
    x = torch.randn(4, 16)
    q = fewbits.prepare(model, "w8")
    assert sorted(q.quantized_layers()) == ["out", "w1_linear", "w2_linear"]
    assert q.left_float == []
    with quantization_disabled(q), torch.no_grad():
        assert torch.equal(q(x), model(x))  # the rewrite computes exactly the same function
    assert [n for n, _ in model.named_parameters()] == ["w1", "b1", "w2", "out.weight", "out.bias"]  # untouched


def test_parameters_used_otherwise_are_listed_with_the_module():
    q = fewbits.prepare(nn.Sequential(Tied(), nn.Linear(16, 2)), "w8a8")
    assert list(q.quantized_layers()) == ["1"]
    (entry,) = q.left_float
    assert entry.name == "0" and entry.reason == "fewbits has no quantized Tied"


def test_a_block_with_its_own_parameter_still_quantizes_its_layers():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.layer_scale = nn.Parameter(torch.full((8,), 0.1))

        def forward(self, x):
            return x + self.fc(x) * self.layer_scale

    q = fewbits.prepare(nn.Sequential(Scaled(), nn.Linear(8, 2)), "w8a8")
    assert sorted(q.quantized_layers()) == ["0.fc", "1"]
    assert [lf.name for lf in q.left_float] == ["0"] and "layer_scale" in q.left_float[0].reason


def test_f_conv_with_own_parameters_becomes_a_quantized_convolution():
    class FunctionalConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 2, 3, 3) / 4)  # groups=2: 4 input channels
            self.b = nn.Parameter(torch.randn(8))
            self.k = nn.Parameter(torch.randn(4, 8, 1) / 3)

        def forward(self, x):
            h = F.relu(F.conv2d(x, self.w, self.b, stride=2, padding=1, groups=2))
            return F.conv1d(h.flatten(2), self.k)

    torch.manual_seed(0)
    model = FunctionalConv().eval()
    x = torch.randn(2, 4, 8, 8)
    q = fewbits.prepare(model, "w8")
    assert sorted(q.quantized_layers()) == ["k_conv", "w_conv"] and q.left_float == []
    conv = q.model.w_conv
    assert (conv.stride, conv.padding, conv.groups, conv.in_channels) == ((2, 2), (1, 1), 2, 4)
    with quantization_disabled(q), torch.no_grad():
        assert torch.equal(q(x), model(x))  # the same function before quantization
