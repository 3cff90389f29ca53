"""BatchNorm folded wherever it consumes a conv/linear output nothing else reads: in an
nn.Sequential or called in a forward (torchvision-style ResNet blocks), in PTQ and in QAT."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fewbits
from fewbits.tasks.models.zoo import BasicBlock  # torchvision's block: BatchNorm called in forward
from fewbits.wrap import fold_batchnorm


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SharedOutput(nn.Module):
    """The conv output is read by the BatchNorm and by the addition: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def _randomized(cls):
    torch.manual_seed(0)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics far from identity, so a wrong fold shows
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    return model.eval()


def test_resnet_blocks_fold_every_batchnorm_and_keep_the_function():
    model = _randomized(TinyResNet)
    x = torch.randn(4, 3, 8, 8)
    folded = _randomized(TinyResNet)
    names, left = fold_batchnorm(folded)
    assert left == [] and len(names) == 6, (names, left)
    assert sorted(names) == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2",
                             "layer1.1.downsample.1"]
    with torch.no_grad():
        # folding multiplies weights by γ/σ and shifts the bias: float32 rounding only
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)
    q = fewbits.prepare(model, "w8a8")
    assert q.left_float == [] and len(q.folded_bn) == 6
    assert len(q.quantized_layers()) == 7  # six convolutions and the classifier


def test_a_conv_output_read_twice_keeps_its_batchnorm_listed():
    q = fewbits.prepare(_randomized(SharedOutput), "w8a8")
    assert [(lf.name, "BatchNorm not directly after" in lf.reason) for lf in q.left_float] == [("bn", True)]


def test_an_untraceable_forward_keeps_its_batchnorm_listed():
    class Branchy(SharedOutput):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    q = fewbits.prepare(_randomized(Branchy), "w8a8")
    assert [lf.name for lf in q.left_float] == ["bn"]
    assert "forward not traceable by torch.fx" in q.float_ops[0].reason  # its additions etc., if any, too


def test_resnet_quantizes_converts_and_trains_its_batchnorm():
    model = _randomized(TinyResNet)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    q = fewbits.prepare(model, "w8a8")
    fewbits.calibrate(q, batches)
    with torch.no_grad():
        ref, out = model(batches[0]), q(batches[0])
    assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99  # 8-bit: a small error
    im = fewbits.convert(q)
    assert len(im.integer_layers()) == 7
    # QAT with BatchNorm training beside each layer finds the same pairs
    from fewbits.qat import finish, prepare_qat

    t = prepare_qat(model, "w8a8", batches=batches, batchnorm="train")
    assert len(t.training_bn) == 6 and t.left_float == []
    t(batches[0])
    finish(t)
    assert len(t.folded_bn) == 6 and t.training_bn == []


@pytest.mark.parametrize("cls", [TinyResNet])
def test_folding_is_idempotent(cls):
    m = _randomized(cls)
    fold_batchnorm(m)
    assert fold_batchnorm(m) == ([], [])
