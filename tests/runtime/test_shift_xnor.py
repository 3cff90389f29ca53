"""Multiplier-free kernels: shift-and-add for power-of-two / APoT weights, XNOR–popcount for
binary layers, both bit-exact with the products they replace."""
import numpy as np
import pytest
import torch

from fewbits.numerics.levels import choose_levels, groups_view, quantize_levels
from fewbits.runtime.shift import shift_add_matmul, shift_linear, shift_weights
from fewbits.runtime.xnor import compiled_kernel, kernel_error, pack_signs, sign_matmul, xnor_linear, xnor_matmul
from fewbits.spec import APoTSpec, PerChannel, Pow2Spec
from fewbits.wrap.levels import LevelQuantizer
from fewbits.recipe import TensorRecipe


@pytest.mark.parametrize("spec", [Pow2Spec(4, PerChannel(0)), Pow2Spec(6), APoTSpec(5), APoTSpec(6, PerChannel(0))],
                         ids=lambda s: f"{s.kind}{s.bits}")
def test_shift_add_equals_the_integer_product(spec):
    torch.manual_seed(0)
    w = torch.randn(8, 48)
    levels, bounds = choose_levels(w, spec)
    w_int, unit = shift_weights(w, levels, bounds, spec)
    decoded = groups_view(quantize_levels(w, levels, bounds, spec), spec).double()
    # the decoded float32 levels are unit · w_int up to float32 rounding of the levels themselves
    assert torch.allclose(w_int.double() * unit.reshape(-1, 1), decoded, rtol=2**-23, atol=0)
    terms_allowed = 1 if isinstance(spec, Pow2Spec) else (spec.bits - 1 + 1) // 2
    assert max(bin(int(v)).count("1") for v in w_int.abs().reshape(-1)) <= terms_allowed
    x = torch.randint(-128, 128, (5, 48))
    acc, terms = shift_add_matmul(x, w_int.reshape(8, -1))
    assert torch.equal(acc, x @ w_int.reshape(8, -1).t())  # exact in int64
    assert terms == sum(bin(int(v)).count("1") for v in w_int.abs().reshape(-1))


def test_shift_linear_matches_the_float_layer():
    torch.manual_seed(1)
    w = torch.randn(6, 32)
    q = LevelQuantizer(TensorRecipe(Pow2Spec(5, PerChannel(0))), "w", "weight")
    q.set_from(w)
    x_int = torch.randint(0, 256, (4, 32))
    s_x, z_x = 0.02, 128
    y = shift_linear(x_int, s_x, z_x, w, q)
    ref = (s_x * (x_int - z_x).double()) @ q(w).double().t()
    assert torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-6)  # float32 result of an exact integer sum


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 65, 5), (33, 128, 17), (4, 1000, 9)])
@pytest.mark.parametrize("kernel", ["numpy", "c"])
def test_xnor_popcount_is_bit_exact(shape, kernel):
    if kernel == "c" and compiled_kernel() is None:
        pytest.skip(f"no compiled kernel: {kernel_error()}")
    m, k, n = shape
    g = torch.Generator().manual_seed(m + k + n)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    a[0, 0] = 0.0  # sign(0) = +1 on both paths
    out = xnor_matmul(pack_signs(a), pack_signs(b), k, kernel)
    assert np.array_equal(out, sign_matmul(a, b).numpy())


def test_pack_signs_layout_and_checks():
    bits = pack_signs(torch.tensor([[1.0, -1.0, 0.0] + [-1.0] * 62]))
    assert bits.shape == (1, 2) and bits[0, 0] == 0b101 and bits[0, 1] == 0  # little-endian, padding 0
    with pytest.raises(ValueError, match="cannot hold K=200"):
        xnor_matmul(bits, bits, 200)
    with pytest.raises(ValueError, match="kernel must be"):
        xnor_matmul(bits, bits, 65, "gpu")


def test_xnor_linear_is_xnor_net_scaling():
    torch.manual_seed(2)
    x, w = torch.randn(3, 70), torch.randn(4, 70)
    alpha = w.abs().mean(1)
    y = xnor_linear(x, pack_signs(w), alpha, 70)
    sx, sw = torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0)
    ref = (x.abs().mean(1, keepdim=True) * sx) @ (alpha[:, None] * sw).t()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)  # float32 scaling of exact integer dots
