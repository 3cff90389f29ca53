"""Integer-only requantization, checked against arbitrary-precision Python integers."""
import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fewbits import fixed_point_multiplier, requantize
from fewbits.numerics import rounding_right_shift, saturating_rounding_doubling_high_mul

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
int32s = st.integers(INT32_MIN, INT32_MAX)


# ---- references: the definitions, in exact rational arithmetic ------------------------------
def ref_srdhm(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    return math.floor(Fraction(a * b, 2**31) + Fraction(1, 2))  # round half toward +inf


def ref_round_half_away(v: Fraction) -> int:
    magnitude = math.floor(abs(v) + Fraction(1, 2))
    return -magnitude if v < 0 else magnitude


def ref_requantize(acc, m0, shift, zp, qmin, qmax):
    if shift < 31:
        acc = max(INT32_MIN, min(INT32_MAX, acc * 2 ** (31 - shift)))
    high = ref_srdhm(acc, m0)
    out = ref_round_half_away(Fraction(high, 2 ** max(shift - 31, 0)))
    return max(qmin, min(qmax, out + zp))


# ---- fixed_point_multiplier -----------------------------------------------------------------
@given(st.floats(min_value=2.0**-60, max_value=2.0**30, allow_subnormal=False))
def test_multiplier_is_normalised_and_accurate(real):
    m0, shift = fixed_point_multiplier(real)
    assert 2**30 <= m0 < 2**31 and shift >= 0
    # round-to-nearest on a 31-bit mantissa: error at most half a unit of 2^-shift
    assert abs(Fraction(m0, 2**shift) - Fraction(real)) <= Fraction(1, 2 ** (shift + 1))


@pytest.mark.parametrize("real,expected", [(0.5, (2**30, 31)), (0.25, (2**30, 32)), (1.0, (2**30, 30)),
                                           (0.75, (3 * 2**29, 31)), (0.0, (0, 31))])
def test_multiplier_closed_form(real, expected):
    assert fixed_point_multiplier(real) == expected


def test_multiplier_that_rounds_up_to_one_renormalises():
    real = 1 - 2.0**-40  # mantissa rounds to 2^31 at 31 bits
    assert fixed_point_multiplier(real) == (2**30, 30)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), 2.0**31])
def test_multiplier_rejects(bad):
    with pytest.raises(ValueError):
        fixed_point_multiplier(bad)


# ---- the two integer primitives ---------------------------------------------------------------
EDGES = [INT32_MIN, INT32_MIN + 1, -(2**30), -1, 0, 1, 2**30, INT32_MAX - 1, INT32_MAX]


@given(st.lists(st.tuples(int32s, int32s), min_size=1, max_size=50))
def test_srdhm_matches_reference(pairs):
    a = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    got = saturating_rounding_doubling_high_mul(a, b).tolist()
    assert got == [ref_srdhm(x, y) for x, y in pairs]


def test_srdhm_edges_including_saturation():
    pairs = [(x, y) for x in EDGES for y in EDGES]
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    assert saturating_rounding_doubling_high_mul(a, b).tolist() == [ref_srdhm(x, y) for x, y in pairs]
    assert saturating_rounding_doubling_high_mul(torch.tensor([INT32_MIN]), INT32_MIN).item() == INT32_MAX


@given(st.lists(st.tuples(int32s, st.integers(0, 70)), min_size=1, max_size=50))
def test_rounding_right_shift_matches_reference(pairs):
    x = torch.tensor([p[0] for p in pairs])
    e = torch.tensor([p[1] for p in pairs])
    assert rounding_right_shift(x, e).tolist() == [ref_round_half_away(Fraction(v, 2**k)) for v, k in pairs]


@given(st.lists(st.tuples(st.integers(-2**40, 2**40), st.integers(0, 70)), min_size=1, max_size=50))
def test_rounding_right_shift_ties_to_even_matches_reference(pairs):
    x = torch.tensor([p[0] for p in pairs])
    e = torch.tensor([p[1] for p in pairs])
    # Python rounds a Fraction's exact half to the even integer
    assert rounding_right_shift(x, e, "even").tolist() == [round(Fraction(v, 2**k)) for v, k in pairs]


def test_rounding_right_shift_ties_to_even_on_halves():
    x = torch.tensor([1, 3, 5, -1, -3, -5, 7, 6])
    assert rounding_right_shift(x, 1, "even").tolist() == [0, 2, 2, 0, -2, -2, 4, 3]
    with pytest.raises(ValueError, match="ties"):
        rounding_right_shift(x, 1, "up")


def test_rounding_right_shift_ties_go_away_from_zero():
    assert rounding_right_shift(torch.tensor([3, -3, 5, -5, INT32_MIN]), torch.tensor([1, 1, 1, 1, 32])).tolist() == [2, -2, 3, -3, -1]


# ---- requantize -----------------------------------------------------------------------------
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 255), (-8, 7)])
def test_requantize_matches_reference_over_many_random_cases(qmin, qmax):
    rng = random.Random(qmin)
    cases = []
    for _ in range(7000):
        m0, shift = fixed_point_multiplier(2.0 ** rng.uniform(-40, 8))
        acc = rng.choice([rng.randint(INT32_MIN, INT32_MAX), rng.randint(-(2**16), 2**16), rng.choice(EDGES)])
        cases.append((acc, m0, shift, rng.randint(qmin, qmax)))
    acc, m0, shift, zp = (torch.tensor(c) for c in zip(*cases))
    got = requantize(acc.to(torch.int32), m0, shift, zp, qmin, qmax).tolist()
    assert got == [ref_requantize(a, m, s, z, qmin, qmax) for a, m, s, z in cases]


def test_requantize_wide_output_range_and_saturating_left_shift():
    # No clamp in the way (int32 output range), multipliers >= 1 that need left shifts.
    accs = torch.tensor(EDGES * 4, dtype=torch.int32)
    for real in [1.0, 1.5, 3.75, 1000.0, 0.999999, 2.0**-31]:
        m0, shift = fixed_point_multiplier(real)
        got = requantize(accs, m0, shift, 0, INT32_MIN, INT32_MAX).tolist()
        assert got == [ref_requantize(a, m0, shift, 0, INT32_MIN, INT32_MAX) for a in accs.tolist()]


def test_requantize_approximates_real_rescaling():
    # Double rounding (high-mul, then shift) may move the result by one from round(acc·M).
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**20), 2**20, (5000,), generator=g, dtype=torch.int32)
    real = 0.0123456
    m0, shift = fixed_point_multiplier(real)
    got = requantize(acc, m0, shift, 0, INT32_MIN, INT32_MAX)
    exact = torch.round(acc.double() * real)
    assert (got.double() - exact).abs().max() <= 1


@pytest.mark.parametrize("qmin,qmax", [(0, 255), (INT32_MIN, INT32_MAX)])
def test_single_rounding_is_one_exact_rounding(qmin, qmax):
    rng = random.Random(7)
    cases = []
    for _ in range(7000):
        m0, shift = fixed_point_multiplier(2.0 ** rng.uniform(-45, 8))
        acc = rng.choice([rng.randint(INT32_MIN, INT32_MAX), rng.randint(-(2**16), 2**16), rng.choice(EDGES)])
        cases.append((acc, m0, shift, rng.randint(0, 255)))
    acc, m0, shift, zp = (torch.tensor(c) for c in zip(*cases))
    got = requantize(acc.to(torch.int32), m0, shift, zp, qmin, qmax, single_rounding=True).tolist()
    # the closed form: acc·m0·2^-shift as an exact fraction, rounded once, half away from zero
    want = [min(max(ref_round_half_away(Fraction(a * m, 2**s)) + z, qmin), qmax) for a, m, s, z in cases]
    assert got == want


def test_single_rounding_fixes_the_double_rounding_case():
    # 4774 · M = 37.4948: SRDHM leaves 6 fractional bits (2399.67 -> 2400 = 37.5), the shift then
    # rounds 37.5 up; measured on a MobileNetV2 depthwise layer
    acc, m0, shift = torch.tensor([4774], dtype=torch.int32), 1079439918, 37
    assert requantize(acc, m0, shift, 0, 0, 255).item() == 38
    assert requantize(acc, m0, shift, 0, 0, 255, single_rounding=True).item() == 37


def test_requantize_per_channel_broadcast():
    acc = torch.tensor([[1000, -1000], [1000, -1000]], dtype=torch.int32)
    pairs = [fixed_point_multiplier(r) for r in (0.01, 0.1)]
    m0 = torch.tensor([p[0] for p in pairs])[:, None]
    shift = torch.tensor([p[1] for p in pairs])[:, None]
    assert requantize(acc, m0, shift, 0, -128, 127).tolist() == [[10, -10], [100, -100]]


def test_requantize_rejects_bad_inputs():
    with pytest.raises(ValueError, match="integer accumulator"):
        requantize(torch.tensor([1.0]), 2**30, 31, 0, -128, 127)
    with pytest.raises(ValueError, match="m0"):
        requantize(torch.tensor([1]), 2**31, 31, 0, -128, 127)
    with pytest.raises(ValueError, match="exceed int32"):
        requantize(torch.tensor([2**31], dtype=torch.int64), 2**30, 31, 0, -128, 127)
