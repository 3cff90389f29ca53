"""Non-uniform grids: level sets against their closed forms, grid invariants, specs round-trip."""
import math

import pytest
import torch

from fewbits.numerics.levels import (apot_magnitudes, apot_terms, choose_levels, kmeans_1d, level_indices,
                                     pow2_magnitudes, quantize_levels)
from fewbits.recipe import TensorRecipe
from fewbits.spec import (APoTSpec, BinarySpec, CodebookSpec, PerChannel, PerGroup, PerTensor, Pow2Spec, QuantSpec,
                          TernarySpec, spec_from_dict)

ALL_SPECS = [Pow2Spec(3), Pow2Spec(5, PerChannel(0)), APoTSpec(4), APoTSpec(5, PerChannel(0)), CodebookSpec(2),
             CodebookSpec(4, PerChannel(0)), BinarySpec(), BinarySpec(granularity=PerChannel(0), scaled=False), TernarySpec(),
             TernarySpec(granularity=PerChannel(0), learned=True)]


def test_pow2_levels_are_powers_of_two():
    assert pow2_magnitudes(3).tolist() == [0.0, 0.25, 0.5, 1.0]  # 2^-j, j = 0 … 2^(b-1) − 2
    assert pow2_magnitudes(4).numel() == 2 ** 3  # with the sign: 2^4 − 1 codes


def test_apot_levels_match_the_paper():
    # Li et al. 2020: 3 magnitude bits (4-bit signed) = {0, 2^0, 2^-2, 2^-4} + {0, 2^-1}, normalised
    assert apot_terms(4) == [[0, 2, 4], [1]]
    expected = sorted({a + b for a in (0, 1, 0.25, 0.0625) for b in (0, 0.5)})
    assert torch.allclose(apot_magnitudes(4), torch.tensor(expected, dtype=torch.float64) / 1.5, rtol=0, atol=0)
    for bits in range(3, 9):  # 2^(bits-1) distinct magnitudes: the sums never coincide
        assert apot_magnitudes(bits).unique().numel() == 2 ** (bits - 1)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.kind}{s.bits}-{type(s.granularity).__name__}")
def test_grid_invariants(spec):
    torch.manual_seed(0)
    w = torch.randn(6, 50)
    levels, boundaries = choose_levels(w, spec)
    groups = 1 if isinstance(spec.granularity, PerTensor) else 6
    assert levels.shape[0] == groups and boundaries.shape == (groups, levels.shape[1] - 1)
    assert levels.shape[1] <= 2 ** spec.bits  # every index fits the spec's width
    assert (levels[:, 1:] >= levels[:, :-1]).all()  # sorted
    q = quantize_levels(w, levels, boundaries, spec)
    rows = q.reshape(groups, -1)
    assert all(set(rows[g].tolist()) <= set(levels[g].tolist()) for g in range(groups))
    # values already on the grid stay exactly where they are
    again = quantize_levels(q, levels, boundaries, spec)
    assert torch.equal(again, q)


@pytest.mark.parametrize("spec", [Pow2Spec(4), APoTSpec(5), CodebookSpec(3)], ids=lambda s: s.kind)
def test_nearest_level_grids_pick_the_closest_level(spec):
    torch.manual_seed(1)
    w = torch.randn(200)
    levels, boundaries = choose_levels(w, spec)
    q = quantize_levels(w, levels, boundaries, spec)
    best = (w[:, None] - levels[0][None, :]).abs().min(1).values
    # midpoints between float32 levels: equal distance up to one float32 rounding of the midpoint
    assert torch.allclose((w - q).abs(), best, rtol=0, atol=1e-6)


def test_binary_and_ternary_closed_forms():
    w = torch.tensor([[-2.0, -0.1, 0.0, 0.3, 1.0, 3.0]])
    levels, _ = choose_levels(w, BinarySpec())
    alpha = w.abs().mean()  # XNOR-Net: α = mean|w|
    assert torch.allclose(levels, torch.stack([-alpha, alpha])[None])
    q = quantize_levels(w, *choose_levels(w, BinarySpec()), BinarySpec())
    assert torch.equal(q.sign(), torch.tensor([[-1.0, -1, 1, 1, 1, 1]]))  # sign(0) = +1, as the XNOR bit
    levels, bounds = choose_levels(w, TernarySpec())
    delta = 0.7 * w.abs().mean()  # TWN: Δ = 0.7·mean|w|, α = mean of |w| above Δ
    big = w.abs() > delta
    alpha = w.abs()[big].mean()
    assert torch.allclose(bounds, torch.stack([-delta, delta])[None])
    assert torch.allclose(levels, torch.tensor([[-alpha, 0.0, alpha]]))
    q = quantize_levels(w, levels, bounds, TernarySpec())
    assert torch.equal(q != 0, big)
    # TTQ starting scales: mean of the positive / negative weights beyond 0.05·max|w|
    levels, bounds = choose_levels(w, TernarySpec(learned=True))
    assert torch.allclose(levels, torch.tensor([[-2.0, 0.0, (0.3 + 1 + 3) / 3]]))  # Δ = 0.15: −0.1 is zero


def test_kmeans_finds_separated_clusters_and_linear_init_keeps_outliers():
    x = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.tensor([10.0])])[None]
    c = kmeans_1d(x, 3, 50)
    assert torch.allclose(c, torch.tensor([[-1.0, 0.5, 10.0]], dtype=torch.float64))
    # mask: only the marked values count
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, -1] = False
    c = kmeans_1d(x, 2, 50, mask)
    assert torch.allclose(c, torch.tensor([[-1.0, 0.5]], dtype=torch.float64))


def test_kmeans_lowers_the_error_of_linear_init():
    torch.manual_seed(2)
    x = torch.randn(1, 4000)
    err = [((quantize_levels(x, *choose_levels(x, CodebookSpec(3, iterations=i)), CodebookSpec(3)) - x) ** 2).mean()
           for i in (0, 30)]
    assert err[1] < 0.7 * err[0]  # Lloyd moves centroids toward the dense middle of a Gaussian


def test_indices_fit_the_bit_width():
    torch.manual_seed(3)
    w = torch.randn(4, 64)
    for spec in ALL_SPECS:
        _, b = choose_levels(w, spec)
        idx = level_indices(w, b, spec)
        assert int(idx.max()) < 2 ** spec.bits and int(idx.min()) >= 0


def test_level_specs_round_trip_and_validate():
    for spec in ALL_SPECS:
        assert spec_from_dict(spec.to_dict()) == spec
        assert TensorRecipe.from_dict(TensorRecipe(spec).to_dict()).spec == spec
    assert spec_from_dict(QuantSpec(4).to_dict()) == QuantSpec(4)
    with pytest.raises(ValueError, match="per tensor or per output channel"):
        Pow2Spec(4, PerGroup(32))
    with pytest.raises(ValueError, match="binary grids take bits in 1..1"):
        BinarySpec(bits=2)
    with pytest.raises(ValueError, match="apot grids take bits in 3..8"):
        APoTSpec(2)
    with pytest.raises(ValueError, match="unknown kmeans spec keys"):
        spec_from_dict({**CodebookSpec(3).to_dict(), "init": "random"})
    with pytest.raises(ValueError, match="spec kind must be one of"):
        spec_from_dict({"version": 1, "kind": "lattice"})
    with pytest.raises(ValueError, match="dynamic must be False"):
        TensorRecipe(CodebookSpec(3), dynamic=True)
    with pytest.raises(ValueError, match="method 'mse' applies to uniform grids"):
        TensorRecipe(Pow2Spec(4), method="mse")
    assert TernarySpec().factor == 0.7 and TernarySpec(learned=True).factor == 0.05
    assert math.isclose(TernarySpec(threshold=0.5).factor, 0.5)
