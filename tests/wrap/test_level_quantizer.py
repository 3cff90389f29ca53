"""Non-uniform weight grids through the recipe machinery: prepare, save/load, convert, export,
and their training forms (gradients against closed forms)."""
import pytest
import torch
from torch import nn

import fewbits
from fewbits import qat
from fewbits.numerics.levels import level_indices
from fewbits.recipe import LayerRecipe, Recipe, TensorRecipe
from fewbits.report.evaluate import quantized_bytes
from fewbits.spec import APoTSpec, BinarySpec, CodebookSpec, PerChannel, Pow2Spec, QuantSpec, TernarySpec
from fewbits.wrap.levels import LevelQuantizer

U8 = TensorRecipe(QuantSpec(8, signed=False, symmetric=False))
SPECS = [Pow2Spec(4, PerChannel(0)), APoTSpec(5), CodebookSpec(3), BinarySpec(granularity=PerChannel(0)),
         TernarySpec(), TernarySpec(learned=True)]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _recipe(spec, act=U8):
    w = TensorRecipe(spec)
    return Recipe(f"levels-{spec.kind}", (("Linear", LayerRecipe(weight=w, input=act)), ("Conv2d", LayerRecipe(weight=w))))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{'-ttq' if getattr(s, 'learned', 0) else ''}")
def test_prepare_save_load_convert_export(spec, tmp_path):
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    q = fewbits.prepare(_net(), _recipe(spec))
    fewbits.calibrate(q, [x])
    wq = q.model[3].weight_quantizer
    assert isinstance(wq, LevelQuantizer)
    w_hat = q.model[3].quantized_weight()
    assert all(row.unique().numel() <= 2 ** spec.bits for row in w_hat)  # per channel at most
    y = q(x)
    # packed file: level indices at spec.bits each, decoded exactly on load
    path = fewbits.save(q, tmp_path / "m.fewbits")
    back = fewbits.load(path, model=_net())
    assert torch.equal(back(x), y)
    packed = fewbits.load(path)  # without a model: the stored level indices
    assert torch.equal(packed.qdata("3").long(), level_indices(q.model[3].weight, wq.boundaries, spec))
    tables = sum(m.weight_quantizer.levels.numel() + (m.weight_quantizer.boundaries.numel()
                                                        if spec.kind == "ternary" else 0) for m in (q.model[0], q.model[3]))
    # indices at spec.bits, float32 level tables (and TWN's thresholds), float32 biases, the
    # input grid's scale (4 bytes) and zero point (1 byte)
    expected = -(-36 * spec.bits // 8) + -(-1440 * spec.bits // 8) + 4 * tables + 4 * (4 + 10) + 5
    assert quantized_bytes(q) == expected
    # the integer model keeps these layers in float (listed), ONNX holds the decoded levels
    im = fewbits.convert(q)
    assert torch.equal(im(x), y)
    result = fewbits.export_onnx(q, x, tmp_path / "m.onnx")
    assert result.counts() == {"decoded": 2}
    assert result.verification.max_abs < 1e-5  # float32 kernels on the same decoded weights


def test_binary_activations_are_signs_with_a_clipped_gradient():
    q = fewbits.prepare(_net(), _recipe(BinarySpec(), act=TensorRecipe(BinarySpec(scaled=False))))
    assert not q.recipe.needs_calibration  # the sign needs no range
    xq = q.model[3].input_quantizer
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5], requires_grad=True)
    out = xq(x)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # straight through where |x| ≤ 1
    with pytest.raises(ValueError, match="can only be BinarySpec\\(scaled=False\\) on a layer's input"):
        fewbits.prepare(_net(), _recipe(BinarySpec(), act=TensorRecipe(CodebookSpec(2))))


def test_ops_and_algorithms_refuse_or_list_level_grids():
    with pytest.raises(ValueError, match="adds are quantized on uniform grids"):
        Recipe("bad", (("Linear", LayerRecipe(weight=TensorRecipe(Pow2Spec(4)))),), adds=TensorRecipe(Pow2Spec(4)))
    from fewbits.steps import GPTQ

    q = fewbits.prepare(_net(), _recipe(Pow2Spec(4)))
    x = torch.randn(4, 1, 8, 8)
    fewbits.calibrate(q, [x])
    result = fewbits.apply(q, GPTQ(), [x])
    assert not result.layers and {s.name for s in result.skipped} == {"0", "3"}
    assert all("uniform grids" in s.reason for s in result.skipped)


def test_straight_through_and_binaryconnect_clipping():
    w = torch.tensor([[-1.5, -0.2, 0.3, 0.9]], requires_grad=True)
    for spec, expected in [(BinarySpec(), [1.0, 1, 1, 1]), (BinarySpec(scaled=False), [0.0, 1, 1, 1])]:
        q = LevelQuantizer(TensorRecipe(spec), "w", "weight")
        q.set_from(w)
        w.grad = None
        q(w).sum().backward()
        assert w.grad.tolist() == [expected]


def test_kmeans_training_shares_gradients_per_centroid():
    torch.manual_seed(0)
    w = torch.randn(3, 20)
    q = LevelQuantizer(TensorRecipe(CodebookSpec(2)), "w", "weight")
    q.start_training(w)
    g = torch.randn(3, 20)
    (q(w) * g).sum().backward()
    idx = q.indices.reshape(-1)
    expected = torch.zeros(4).index_add_(0, idx, g.reshape(-1))  # Σ of the gradients of each cluster's weights
    assert torch.allclose(q.learned_levels.grad[0], expected, atol=1e-5)  # float32 sums of 60 terms
    with torch.no_grad():
        q.learned_levels.add_(0.1)
    shared = q.stop_training(w)
    assert q.learned_levels is None and q.indices is None
    assert torch.equal(q(shared.reshape(3, 20)), shared.reshape(3, 20))  # the trained levels hold the shared weights


def test_ttq_gradients_follow_the_paper():
    w = torch.tensor([[-1.0, -0.02, 0.01, 0.5, 2.0]], requires_grad=True)
    q = LevelQuantizer(TensorRecipe(TernarySpec(learned=True)), "w", "weight")
    q.start_training(w.detach())
    alpha_n, alpha_p = q.learned_levels.detach()[0].tolist()
    assert (alpha_n, alpha_p) == (1.0, 1.25)  # Δ = 0.05·2 = 0.1: negatives beyond {−1}, positives {0.5, 2}
    out = q(w)
    assert torch.allclose(out.detach(), torch.tensor([[-1.0, 0, 0, 1.25, 1.25]]))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    (out * g).sum().backward()
    # Zhu et al.: ∂L/∂α_p = Σ_{w>Δ} g, ∂L/∂α_n = −Σ_{w<−Δ} g (α_n enters as −α_n), latent gradient
    # scaled by α_p / 1 / α_n on the three parts
    assert q.learned_levels.grad[0].tolist() == [-1.0, 9.0]
    assert torch.allclose(w.grad, torch.tensor([[1.0 * alpha_n, 2.0, 3.0, 4.0 * alpha_p, 5.0 * alpha_p]]))


@pytest.mark.parametrize("spec", [BinarySpec(granularity=PerChannel(0)), TernarySpec(learned=True), CodebookSpec(2)],
                         ids=lambda s: s.kind + ("-ttq" if getattr(s, "learned", 0) else ""))
def test_qat_with_level_grids_trains_and_finishes(spec):
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x @ torch.randn(20, 3)).argmax(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    recipe = Recipe("t", (("Linear", LayerRecipe(weight=TensorRecipe(spec))),))
    qm = qat.prepare_qat(model, recipe)
    params = list(qm.parameters())
    learned = {id(t) for t in qat.quantizer_parameters(qm)}  # k-means centroids, TTQ scales: an own group
    assert len(learned) == (0 if spec.kind == "binary" else 2) and learned <= {id(t) for t in params}
    opt = torch.optim.Adam(params, 1e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(qm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the quantized network learns; k-means from a random net trains only 4 shared values per
    # layer (and the biases): measured 1.08 → 0.79 there, the others below half
    assert losses[-1] < (0.85 if spec.kind == "kmeans" else 0.7) * losses[0]
    before = qm(x).detach()
    qat.finish(qm)
    assert torch.equal(qm(x).detach(), before)  # finish keeps exactly what training computed
    assert all(m.weight_quantizer.levels.shape[1] <= 2 ** spec.bits for m in qm.quantized_layers().values())
    with pytest.raises(ValueError, match="batchnorm='fold'"):
        qat.prepare_qat(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)),
                        Recipe("c", (("Conv2d", LayerRecipe(weight=TensorRecipe(spec))),)), batchnorm="train")
