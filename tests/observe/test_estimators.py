import pytest
import torch

from fewbits import (
    CalibrationMethod, HistogramObserver, choose_qparams, MinMaxObserver, MovingAverageObserver, PerChannel, QuantSpec,
    calibrate_qparams, estimate_range, fake_quantize, make_observer, sample_stats,
)
from fewbits.observe import aciq_clip_ratio


def _data(kind, n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    if kind == "laplace":
        return (-torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())).float()
    if kind == "gaussian":
        return torch.randn(n, generator=g)
    if kind == "relu":
        return torch.randn(n, generator=g).clamp_min(0)
    raise KeyError(kind)


def _histogram(x, bins=2048):
    obs = HistogramObserver(bins=bins)
    for part in x.chunk(4):
        obs.update(part)
    return obs.state()


def _mse_of_range(x, lo, hi, spec):
    s, z = choose_qparams(lo, hi, spec)
    return (fake_quantize(x, s, z, spec).double() - x.double()).pow(2).mean().item()


def _brute_force_best(x, spec, points=1500):
    """Minimum true MSE over a fine grid of clip values (the independent reference)."""
    amax = x.abs().max().item()
    best = float("inf")
    for a in torch.linspace(amax / points, amax, points).tolist():
        lo = max(-a, x.min().item()) if not spec.symmetric else -a
        best = min(best, _mse_of_range(x, torch.tensor(lo), torch.tensor(a), spec))
    return best


@pytest.mark.parametrize("method", ["mse", "octav"])
@pytest.mark.parametrize("kind,bits", [("laplace", 4), ("laplace", 8), ("gaussian", 4), ("gaussian", 6), ("laplace", 3)])
def test_mse_and_octav_within_two_percent_of_brute_force(method, kind, bits):
    x = _data(kind, n=100_000, seed=bits)
    spec = QuantSpec(bits=bits)
    lo, hi = estimate_range(method, _histogram(x), spec)
    assert _mse_of_range(x, lo, hi, spec) <= 1.02 * _brute_force_best(x, spec)


def test_mse_on_one_sided_data_with_unsigned_grid():
    x = _data("relu", n=100_000, seed=5)
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    lo, hi = estimate_range("mse", _histogram(x), spec)
    assert lo.item() == 0.0 and hi < x.max()
    assert _mse_of_range(x, lo, hi, spec) <= 1.02 * _brute_force_best(x, spec)


def test_mse_per_channel_weights_from_samples():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g) * torch.linspace(0.1, 3, 8)[:, None]
    spec = QuantSpec(bits=3, granularity=PerChannel(0))
    lo, hi = estimate_range("mse", sample_stats(w, spec.granularity, "conv.weight"), spec)
    assert lo.shape == (8,)
    for c in range(8):
        row_spec = QuantSpec(bits=3)
        assert _mse_of_range(w[c], lo[c], hi[c], row_spec) <= 1.02 * _brute_force_best(w[c], row_spec, points=600)


@pytest.mark.parametrize("q", [99.0, 99.9, 99.99])
def test_percentile_matches_torch_quantile_within_one_bin(q):
    x = _data("laplace", seed=1) + 0.7
    stats = _histogram(x)
    width = 2.0 ** stats.level.item()
    lo, hi = estimate_range("percentile", stats, QuantSpec(bits=8, symmetric=False), q=q)
    ref_lo, ref_hi = torch.quantile(x.double(), torch.tensor([1 - q / 100, q / 100], dtype=torch.float64))
    assert abs(hi.item() - ref_hi.item()) <= width and abs(lo.item() - ref_lo.item()) <= width
    _, amax = estimate_range("percentile", stats, QuantSpec(bits=8), q=q)
    ref_amax = torch.quantile(x.double().abs(), q / 100)
    assert abs(amax.item() - ref_amax.item()) <= width


def test_percentile_on_samples_is_torch_quantile():
    w = torch.randn(4, 100)
    lo, hi = estimate_range("percentile", sample_stats(w, PerChannel(0)), QuantSpec(symmetric=False), q=90.0)
    assert torch.equal(hi, torch.quantile(w.double(), 0.9, dim=1).float())


@pytest.mark.parametrize("prior,table", [
    ("laplace", {2: 2.83, 3: 3.89, 4: 5.03, 8: 9.89}),  # Banner et al. 2019, Laplace table
    ("gaussian", {2: 1.71, 3: 2.15, 4: 2.55, 8: 3.92}),  # their Gaussian table
])
def test_aciq_ratio_matches_published_values(prior, table):
    for bits, ratio in table.items():
        assert aciq_clip_ratio(bits, prior) == pytest.approx(ratio, abs=0.011)  # published to 2 decimals


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
def test_aciq_equals_its_closed_form(prior):
    x = _data(prior, seed=2) * 0.3
    spec = QuantSpec(bits=4)
    _, hi = estimate_range("aciq", sample_stats(x, spec.granularity), spec, prior=prior)
    xd = x.double()
    spread = xd.abs().mean() if prior == "laplace" else xd.pow(2).mean().sqrt()
    assert hi.item() == pytest.approx((aciq_clip_ratio(4, prior) * spread).item(), rel=1e-6)  # float32 result
    _, hi_h = estimate_range("aciq", _histogram(x), spec, prior=prior)
    assert hi_h.item() == pytest.approx(hi.item(), rel=2e-3)  # histogram moments vs exact moments


def test_entropy_clips_heavy_tails_but_not_uniform_data():
    g = torch.Generator().manual_seed(3)
    # a Laplace bulk with a few far outliers: the shape of real activations
    heavy = torch.cat([_data("laplace", seed=3), torch.linspace(-60, 60, 20)])
    spec = QuantSpec(bits=8)
    lo, hi = estimate_range("entropy", _histogram(heavy), spec)
    assert hi < 0.5 * heavy.abs().max() and lo == -hi
    # KL trades the outliers for resolution of the bulk: the bulk's 8-bit error must drop
    bulk = heavy[:-20]
    assert _mse_of_range(bulk, lo, hi, spec) < 0.5 * _mse_of_range(bulk, heavy.min(), heavy.max(), spec)
    uniform = torch.rand(200_000, generator=g) * 2 - 1
    _, hi_u = estimate_range("entropy", _histogram(uniform), spec)
    assert hi_u > 0.9  # nothing to gain from clipping a bounded, flat distribution


def test_entropy_one_sided_uses_the_whole_unsigned_grid():
    x = _data("relu", seed=4)
    lo, hi = estimate_range("entropy", _histogram(x), QuantSpec(bits=8, signed=False, symmetric=False))
    assert lo.item() == 0.0 and 0 < hi.item() <= x.max().item()


def test_methods_table_and_names():
    assert [m.value for m in CalibrationMethod] == ["minmax", "ema", "percentile", "mse", "entropy", "aciq", "octav"]
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    assert isinstance(make_observer("ema"), MovingAverageObserver)
    assert all(isinstance(make_observer(m), HistogramObserver) for m in ("percentile", "mse", "entropy", "aciq", "octav"))
    with pytest.raises(ValueError, match="calibration method must be one of minmax, ema, percentile"):
        make_observer("kl")


def test_estimator_needs_matching_statistics():
    obs = MinMaxObserver()
    obs.update(torch.randn(10))
    with pytest.raises(ValueError, match="'mse' needs a value distribution"):
        estimate_range("mse", obs.state(), QuantSpec())
    with pytest.raises(ValueError, match="'ema' needs moving-average statistics"):
        estimate_range("ema", obs.state(), QuantSpec())


@pytest.mark.parametrize("method", [m.value for m in CalibrationMethod])
def test_every_method_end_to_end_and_on_degenerate_data(method):
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    for x in (_data("gaussian", n=5000), torch.zeros(100)):
        obs = make_observer(method, name="act")
        obs.update(x)
        scale, zp = calibrate_qparams(method, obs.state(), spec)
        assert torch.isfinite(scale) and scale > 0 and spec.qmin <= zp <= spec.qmax
        assert torch.isfinite(fake_quantize(x, scale, zp, spec)).all()


def test_weight_statistics_reject_bad_weights_by_name():
    from fewbits import PerTensor

    with pytest.raises(ValueError, match="'fc.weight' has 1 non-finite"):
        sample_stats(torch.tensor([1.0, float("inf")]), PerTensor(), "fc.weight")
    with pytest.raises(ValueError, match="'fc.weight' is empty"):
        sample_stats(torch.zeros(0), PerTensor(), "fc.weight")


def _kl_reference(hist, levels):
    """TensorRT's loop, written out bin by bin (independent of the prefix-sum version)."""
    import math

    h = hist.tolist()
    out = []
    for i in range(levels, len(h) + 1):
        p = h[:i]
        p[-1] += sum(h[i:])
        width = i // levels
        q = [0.0] * i
        for g in range(levels):
            lo, hi = g * width, (i if g == levels - 1 else (g + 1) * width)
            mass = sum(h[lo:hi])
            nz = sum(1 for j in range(lo, hi) if p[j] > 0)
            for j in range(lo, hi):
                q[j] = mass / nz if p[j] > 0 else 0.0
        ps, qs = sum(p), sum(q)
        out.append(sum(pj / ps * math.log((pj / ps) / max(qj / qs, 1e-12)) for pj, qj in zip(p, q) if pj > 0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_kl_prefix_sums_equal_the_bin_by_bin_algorithm(seed):
    from fewbits.observe.search import kl_candidates

    g = torch.Generator().manual_seed(seed)
    hist = torch.poisson(torch.exp(-torch.linspace(0, 6, 150)) * 200, generator=g)
    hist[torch.randint(0, 150, (20,), generator=g)] = 0  # empty bins, including near the end
    levels = [8, 16, 7, 32][seed]
    # float64 sums in a different order: equal to ~1e-12
    assert torch.allclose(kl_candidates(hist, levels), _kl_reference(hist, levels), rtol=1e-9, atol=1e-12)


def test_histogram_float32_fast_path_bins_like_float64():
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.randn(5000, generator=g), -torch.rand(50, generator=g) * 1e-30, torch.tensor([-0.0, 0.0])])
    a, b = HistogramObserver(), HistogramObserver()
    a.update(x)
    b.update(x.double())  # the exact float64 path
    assert torch.equal(a.state().counts, b.state().counts)
