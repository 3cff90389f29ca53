
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.ao.quantization import observer as tao

from fewbits import PerChannel, PerGroup, PerTensor, QuantSpec, choose_qparams, dequantize, fake_quantize, quantize
from fewbits.numerics import to_rows

TORCH_DTYPE = {True: torch.qint8, False: torch.quint8}


def _spec(bits, signed, symmetric, granularity=PerTensor(), **kw):
    return QuantSpec(bits=bits, signed=signed, symmetric=symmetric, granularity=granularity, **kw)


# ---- choose_qparams against independent references -------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_choose_qparams_matches_torch_ao_per_tensor(bits, signed, symmetric):
    spec = _spec(bits, signed, symmetric)
    kw = {} if bits == 8 else {"quant_min": spec.qmin, "quant_max": spec.qmax}
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    for seed in range(20):
        x = torch.randn(257, generator=torch.Generator().manual_seed(seed)) * 3 + (seed % 5 - 2)
        obs = tao.MinMaxObserver(dtype=TORCH_DTYPE[signed], qscheme=qscheme, **kw)
        obs(x)
        ref_scale, ref_zp = obs.calculate_qparams()
        scale, zp = choose_qparams(x.min(), x.max(), spec)
        if symmetric and not signed and bits != 8:
            # torch.ao picks the rounded-down midpoint for a customised unsigned range; fewbits
            # keeps the rounded-up one of the default range (128 for uint8) at every width.
            assert torch.equal(scale, ref_scale.reshape(()))
            assert zp.item() == (spec.qmin + spec.qmax + 1) // 2
            continue
        assert torch.equal(scale, ref_scale.reshape(())), seed  # bit-exact: same float32 arithmetic
        assert zp.item() == ref_zp.item()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_choose_qparams_matches_torch_ao_per_channel(signed, symmetric):
    spec = _spec(8, signed, symmetric, PerChannel(0))
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 5, 16)[:, None]
    qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    obs = tao.PerChannelMinMaxObserver(ch_axis=0, dtype=TORCH_DTYPE[signed], qscheme=qscheme)
    obs(x)
    ref_scale, ref_zp = obs.calculate_qparams()
    scale, zp = choose_qparams(x.amin(1), x.amax(1), spec)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(zp.long(), ref_zp.long())


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_narrow_range_symmetric_is_tensorflow_convention(bits):
    # TensorFlow's restricted range: scale = max|x| / (2^(b-1) - 1), zero point 0.
    spec = QuantSpec(bits=bits, narrow_range=True)
    scale, zp = choose_qparams(torch.tensor(-2.5), torch.tensor(1.0), spec)
    assert scale.item() == pytest.approx(2.5 / (2 ** (bits - 1) - 1), rel=1e-7)  # float32 division
    assert zp.item() == 0


def test_seed_formula_asymmetric():
    # The seeds: s = (max - min) / (qmax - qmin), z = qmin - round(min / s).
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    scale, zp = choose_qparams(-1.0, 3.0, spec)
    assert scale.item() == pytest.approx(4 / 255, rel=1e-7)  # float32
    assert zp.item() == 0 - round(-1.0 / (4 / 255))


@pytest.mark.parametrize("lo,hi", [(0.0, 0.0), (5.0, 5.0), (-3.0, -3.0), (1e-30, 1e-30)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_degenerate_ranges_give_finite_scale(lo, hi, symmetric):
    spec = _spec(8, True, symmetric)
    scale, zp = choose_qparams(lo, hi, spec)
    assert torch.isfinite(scale) and scale > 0
    assert spec.qmin <= zp.item() <= spec.qmax
    x = torch.tensor([lo, 0.0])
    assert torch.isfinite(fake_quantize(x, scale, zp, spec)).all()


@given(lo=st.floats(-1e3, 0, allow_subnormal=False), hi=st.floats(0, 1e3, allow_subnormal=False),
       bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans())
def test_zero_is_exact(lo, hi, bits, signed, symmetric):
    spec = _spec(bits, signed, symmetric)
    scale, zp = choose_qparams(lo, hi, spec)
    assert fake_quantize(torch.zeros(3), scale, zp, spec).eq(0).all()


def test_range_is_widened_to_contain_zero():
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    scale, zp = choose_qparams(2.0, 6.0, spec)
    assert zp.item() == 0 and scale.item() == pytest.approx(6 / 255, rel=1e-7)  # float32


def test_choose_qparams_rejects_bad_ranges():
    with pytest.raises(ValueError, match="non-finite"):
        choose_qparams(float("nan"), 1.0, QuantSpec())
    with pytest.raises(ValueError, match="min_val > max_val"):
        choose_qparams(2.0, 1.0, QuantSpec())


# ---- fake_quantize against torch.fake_quantize_* ----------------------------------------------
def _tie_heavy_input(scale, n=4000, seed=0):
    """Random values plus exact half-steps, where rounding mode and x·(1/s) vs x/s matter."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-300, 300, (n // 2,), generator=g).float()
    return torch.cat([torch.randn(n // 2, generator=g) * 100 * scale, (k + 0.5) * scale])


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_per_tensor_bit_exact_with_torch(bits, signed, symmetric):
    spec = _spec(bits, signed, symmetric)
    x = _tie_heavy_input(0.037, seed=bits)
    scale, zp = choose_qparams(x.quantile(0.05), x.quantile(0.95), spec)
    x.requires_grad_(True)
    ours = fake_quantize(x, scale, zp, spec)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(ref_x, scale, zp, spec.qmin, spec.qmax)
    assert torch.equal(ours, ref)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, ref_x.grad)  # the STE mask is the same


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_fake_quantize_per_channel_bit_exact_with_torch(bits, axis):
    spec = _spec(bits, True, False, PerChannel(axis))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, 7, generator=g) * torch.rand(6, 5, 7, generator=g) * 4
    rows = to_rows(x, spec.granularity)
    scale, zp = choose_qparams(rows.quantile(0.1, dim=1), rows.quantile(0.9, dim=1), spec)
    x.requires_grad_(True)
    ours = fake_quantize(x, scale, zp, spec)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_channel_affine(ref_x, scale, zp, axis % 3, spec.qmin, spec.qmax)
    assert torch.equal(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.equal(x.grad, ref_x.grad)


def test_ste_gradient_is_identity_inside_zero_outside():
    spec = QuantSpec(bits=4)
    scale, zp = choose_qparams(-1.0, 1.0, spec)  # grid [-8, 7]·(1/7.5)
    x = torch.tensor([-2.0, -1.0, 0.3, 0.9, 1.5], requires_grad=True)
    fake_quantize(x, scale, zp, spec).sum().backward()
    # -1.0 → level -7.5 rounds to -8 (inside); 1.5 → level 11.25 (clipped)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


# ---- granularity -----------------------------------------------------------------------------
def test_per_group_matches_explicit_loop():
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(8, axis=1))
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(3))
    rows = to_rows(x, spec.granularity)
    scale, zp = choose_qparams(rows.amin(1).reshape(3, 3), rows.amax(1).reshape(3, 3), spec)
    out = fake_quantize(x, scale, zp, spec)
    for i in range(3):
        for gi in range(3):
            block = x[i, gi * 8:(gi + 1) * 8]
            s, z = choose_qparams(block.min(), block.max(), QuantSpec(bits=4, symmetric=False))
            ref = torch.fake_quantize_per_tensor_affine(block, s, z, -8, 7)
            assert torch.equal(out[i, gi * 8:(gi + 1) * 8], ref)


@pytest.mark.parametrize("size", [8, 7, 30])
def test_a_partial_last_group_is_a_group_of_its_own(size):
    # 20 columns: groups of 8 end in a group of 4, of 7 in one of 6, of 30 are one partial group
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(size, axis=1))
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    rows = to_rows(x, spec.granularity)
    n = -(-20 // size)
    scale, zp = choose_qparams(rows.amin(1).reshape(3, n), rows.amax(1).reshape(3, n), spec)
    assert scale.shape == (3, n)
    out = fake_quantize(x, scale, zp, spec)
    for i in range(3):
        for gi in range(n):
            block = x[i, gi * size:(gi + 1) * size]  # the last one shorter
            s, z = choose_qparams(block.min(), block.max(), QuantSpec(bits=4, symmetric=False))
            assert torch.equal(out[i, gi * size:(gi + 1) * size], torch.fake_quantize_per_tensor_affine(block, s, z, -8, 7))


def test_per_group_on_a_middle_axis():
    spec = QuantSpec(bits=8, granularity=PerGroup(2, axis=1))
    x = torch.randn(2, 6, 3)
    rows = to_rows(x, spec.granularity)  # [2·3·3, 2]
    amax = rows.abs().amax(1)
    from fewbits.numerics import from_rows
    scale, zp = choose_qparams(-from_rows(amax, x.shape, spec.granularity), from_rows(amax, x.shape, spec.granularity), spec)
    assert scale.shape == (2, 3, 3)
    out = fake_quantize(x, scale, zp, spec)
    ref_block = x[1, 2:4, 2]  # group 1 of row (1, ·, 2)
    s, z = choose_qparams(-ref_block.abs().max(), ref_block.abs().max(), QuantSpec())
    assert torch.equal(out[1, 2:4, 2], torch.fake_quantize_per_tensor_affine(ref_block, s, z, -128, 127))


def test_granularity_errors_name_the_field():
    x = torch.randn(4, 6)
    s, z = torch.ones(4), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"PerChannel.axis=2 is out of range .* \(allowed: -2..1\)"):
        quantize(x, s, z, QuantSpec(granularity=PerChannel(2)))
    with pytest.raises(ValueError, match=r"expected \(4, 2\)"):  # 6 columns in groups of 4: two, one partial
        quantize(x, s, z, QuantSpec(granularity=PerGroup(4)))
    with pytest.raises(ValueError, match=r"expected \(6,\)"):
        quantize(x, s, z, QuantSpec(granularity=PerChannel(1)))


# ---- rounding modes --------------------------------------------------------------------------
def test_floor_and_ceil_bracket_nearest():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    base = QuantSpec(bits=6, symmetric=False)
    scale, zp = choose_qparams(x.min(), x.max(), base)
    q = {m: quantize(x, scale, zp, base.replace(rounding=m)).int() for m in ("floor", "nearest", "ceil")}
    assert (q["floor"] <= q["nearest"]).all() and (q["nearest"] <= q["ceil"]).all()
    assert ((q["ceil"] - q["floor"]) <= 1).all()
    real = x / scale + zp  # floor/ceil: the level is on the correct side of the real value
    inside = (real > base.qmin) & (real < base.qmax)
    assert (q["floor"][inside] <= real[inside] + 1e-4).all()  # 1e-4: x·(1/s) vs x/s differ by ulps
    assert (q["ceil"][inside] >= real[inside] - 1e-4).all()


def test_stochastic_rounding_is_seeded_and_unbiased():
    spec = QuantSpec(bits=4, rounding="stochastic")
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    x = torch.full((200_000,), 0.137)
    a = quantize(x, scale, zp, spec, generator=torch.Generator().manual_seed(7))
    b = quantize(x, scale, zp, spec, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {1, 2}
    mean = dequantize(a, scale, zp, spec).double().mean().item()
    # P(round up) = 0.37: std of the mean = 0.1·sqrt(0.37·0.63/2e5) ≈ 1.1e-4; allow 5 sigma.
    assert abs(mean - 0.137) < 5.5e-4


# ---- invariants ------------------------------------------------------------------------------
@given(bits=st.integers(2, 16), signed=st.booleans(), symmetric=st.booleans(),
       amax=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_grid_values_survive_and_error_is_at_most_half_a_step(bits, signed, symmetric, amax, seed):
    spec = _spec(bits, signed, symmetric)
    g = torch.Generator().manual_seed(seed)
    scale, zp = choose_qparams(-amax, amax / 3, spec)
    q = torch.randint(spec.qmin, spec.qmax + 1, (64,), generator=g)
    on_grid = dequantize(q, scale, zp, spec)
    assert torch.equal(quantize(on_grid, scale, zp, spec).long(), q)
    lo, hi = dequantize(torch.tensor([spec.qmin, spec.qmax]), scale, zp, spec)
    x = lo + (hi - lo) * torch.rand(256, generator=g)
    err = (fake_quantize(x, scale, zp, spec) - x).abs()
    # half a step, plus float32 rounding (one unit eps relative each) of x·(1/s), of adding the zero
    # point (levels up to 2^bits) and of the dequantized product: the range's larger end sets the size
    # (was |hi| alone: at 16 bits, range [-111.6, 37.2], an error of 1.7e-5 over the bound was found)
    eps = torch.finfo(torch.float32).eps
    rounding = eps * (2 * max(lo.abs(), hi.abs()) + (spec.qmax - spec.qmin + 1) * scale)
    assert (err <= scale * 0.5 * (1 + 1e-5) + rounding).all()


def test_quantize_dtype_follows_bits():
    x = torch.randn(5)
    for bits, signed, dtype in [(8, True, torch.int8), (4, False, torch.uint8), (12, True, torch.int16), (16, False, torch.int32)]:
        spec = QuantSpec(bits=bits, signed=signed, symmetric=False)
        s, z = choose_qparams(x.min(), x.max(), spec)
        assert quantize(x, s, z, spec).dtype == dtype


def test_inputs_are_not_modified():
    x = torch.randn(10)
    before = x.clone()
    spec = QuantSpec(bits=3)
    s, z = choose_qparams(x.min(), x.max(), spec)
    fake_quantize(x, s, z, spec)
    quantize(x, s, z, spec)
    assert torch.equal(x, before)
