import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.ao.quantization import observer as tao

from fewbits import HistogramObserver, MinMaxObserver, MovingAverageObserver, PerChannel, PerTensor


def _stream(seed, n_batches=6, scale_growth=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 50, generator=g) * (3.0**i if scale_growth else 1.0) + i for i in range(n_batches)]


def _observe(cls, batches, **kw):
    obs = cls(**kw)
    for b in batches:
        obs.update(b)
    return obs


def test_minmax_per_tensor_and_per_channel():
    batches = _stream(0)
    allx = torch.cat(batches)
    st_t = _observe(MinMaxObserver, batches).state()
    assert st_t.min.item() == allx.min().item() and st_t.max.item() == allx.max().item()
    st_c = _observe(MinMaxObserver, batches, granularity=PerChannel(1)).state()
    assert st_c.qshape == (50,)
    assert torch.equal(st_c.min.float(), allx.amin(0)) and torch.equal(st_c.max.float(), allx.amax(0))


def test_moving_average_matches_torch_ao():
    batches = _stream(1)
    ours = _observe(MovingAverageObserver, batches).state()
    ref = tao.MovingAverageMinMaxObserver(averaging_constant=0.01)
    for b in batches:
        ref(b)
    # torch.ao averages in float32, fewbits in float64: equal to float32 precision.
    assert ours.min.item() == pytest.approx(ref.min_val.item(), rel=1e-6)
    assert ours.max.item() == pytest.approx(ref.max_val.item(), rel=1e-6)


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageObserver, HistogramObserver])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0)])
def test_merge_equals_observing_both_streams(cls, granularity):
    batches = _stream(2, n_batches=8)
    whole = _observe(cls, batches, granularity=granularity).state()
    for split in (1, 3, 7):
        a = _observe(cls, batches[:split], granularity=granularity)
        a.merge(_observe(cls, batches[split:], granularity=granularity))
        merged = a.state()
        if cls is MovingAverageObserver:
            # closed-form merge vs the recursion: same value up to float64 rounding
            assert torch.allclose(merged.min, whole.min, rtol=1e-12, atol=1e-12)
            assert torch.allclose(merged.max, whole.max, rtol=1e-12, atol=1e-12)
            assert merged.count == whole.count
        else:
            assert torch.equal(merged.min, whole.min) and torch.equal(merged.max, whole.max)
        if cls is HistogramObserver:  # exact: counts, origin and level identical
            assert torch.equal(merged.counts, whole.counts)
            assert torch.equal(merged.origin, whole.origin) and torch.equal(merged.level, whole.level)


@given(seed=st.integers(0, 2**16), n=st.integers(2, 6), bins=st.sampled_from([8, 64, 2048]),
       log_scales=st.lists(st.integers(-30, 30), min_size=6, max_size=6))
def test_histogram_is_order_and_split_independent(seed, n, bins, log_scales):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(37, generator=g) * 2.0 ** log_scales[i] + torch.randn(1, generator=g) for i in range(n)]
    whole = _observe(HistogramObserver, batches, bins=bins).state()
    perm = torch.randperm(n, generator=g).tolist()
    left = _observe(HistogramObserver, [batches[i] for i in perm[: n // 2]], bins=bins)
    left.merge(_observe(HistogramObserver, [batches[i] for i in perm[n // 2:]], bins=bins))
    other = left.state()
    assert torch.equal(other.counts, whole.counts)
    assert torch.equal(other.origin, whole.origin) and torch.equal(other.level, whole.level)
    assert whole.counts.sum().item() == 37 * n


def test_histogram_bins_hold_their_values_and_memory_is_bounded():
    obs = HistogramObserver(bins=256)
    g = torch.Generator().manual_seed(3)
    values = []
    for i in range(100):  # the range grows by 100x over the stream
        b = torch.randn(1000, generator=g) * (1 + i)
        values.append(b)
        obs.update(b)
        assert obs.counts.shape == (1, 256)
    stats = obs.state()
    edges = stats.edges()[0]
    allx = torch.cat(values).double()
    assert edges[0] <= allx.min() and allx.max() < edges[-1]
    ref = torch.histogram(allx, bins=edges)[0]  # the same bins, counted directly
    assert torch.equal(stats.counts[0], ref)
    # at the chosen level the data spans more than half of the bins (resolution within 2x)
    occupied = torch.nonzero(stats.counts[0]).flatten()
    assert occupied[-1] - occupied[0] + 1 > 128


def test_histogram_of_constant_and_zero_data():
    for value in (0.0, 1000.0, -3e-20):
        obs = HistogramObserver()
        x = torch.full((10,), value)
        obs.update(x)
        stats = obs.state()
        assert stats.counts.sum().item() == 10
        edges = stats.edges()[0]
        assert edges[0] <= x[0].double() < edges[-1]


def test_non_finite_data_names_the_tensor_and_changes_nothing():
    obs = MinMaxObserver(name="layer3.input")
    obs.update(torch.ones(3))
    with pytest.raises(ValueError, match=r"'layer3.input' has 1 non-finite"):
        obs.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"'layer3.input' must be floating point"):
        obs.update(torch.tensor([1, 2]))
    assert obs.state().max.item() == 1.0


def test_empty_stream_is_an_error_not_a_default():
    with pytest.raises(ValueError, match="'fc.output' saw no data"):
        HistogramObserver(name="fc.output").state()


def test_shape_change_and_incompatible_merges_are_errors():
    obs = MinMaxObserver(PerChannel(1), name="conv.input")
    obs.update(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"'conv.input' has qparam shape \(5,\)"):
        obs.update(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="cannot merge"):
        obs.merge(HistogramObserver(PerChannel(1)))
    with pytest.raises(ValueError, match="2048 and 64 bins"):
        HistogramObserver(bins=64).merge(HistogramObserver(bins=2048))
