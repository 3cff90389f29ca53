"""mobilenetv2-probe: the ImageNet MobileNetV2, frozen, read out by a linear probe on Fashion-MNIST.

Images are upsampled to 64 px, replicated to 3 channels and ImageNet-normalised. A logistic
regression probe is fitted once on fp32 features (raw, C = 0.05: standardising features would
divide the quantization noise of near-constant features by their tiny spread); the metric is its
accuracy on the quantized backbone's features, plus top-1 agreement of the 1,000-class head with
fp32 and the feature cosine. For quantization-aware training the task has 4,096 further
training images without labels (disjoint from the probe's and calibration's) and
``train_forward`` = the pooled features: a quantized backbone trains toward the fp32 features.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Task
from .data.fashion_mnist import load_fashion_mnist
from .models.mobilenetv2 import load_mobilenetv2

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


def to_imagenet(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    x = F.interpolate(images.float().unsqueeze(1) / 255.0, size=(size, size), mode="bilinear", align_corners=False)
    return (x.expand(-1, 3, -1, -1) - IMAGENET_MEAN) / IMAGENET_STD


@torch.no_grad()
def features_and_logits(model: nn.Module, x: torch.Tensor, batch: int = 100):
    """Pooled 1,280-d features (the classifier's input) and the 1,000-class logits.

    A stand-in for the network (an ONNX Runtime session, say) may provide its own
    ``features_and_logits(x)``.
    """
    if hasattr(model, "features_and_logits"):
        return model.features_and_logits(x)
    inner = getattr(model, "model", model)  # a QuantizedModel wraps the network
    feats, logits = [], []
    hook = inner.classifier.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach()))
    try:
        for i in range(0, len(x), batch):
            logits.append(model(x[i:i + batch]))
    finally:
        hook.remove()
    return _real(torch.cat(feats), inner.classifier), torch.cat(logits)


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's input (pooled features), differentiable: what training compares."""
    inner = getattr(model, "model", model)
    captured = []
    hook = inner.classifier.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return _real(captured[0], inner.classifier)


def _real(feats: torch.Tensor, classifier: nn.Module) -> torch.Tensor:
    """Features in real units: an integer model hands its classifier levels on the classifier's
    input grid (``fewbits.convert`` chains the global pool into it)."""
    if torch.is_floating_point(feats):
        return feats
    layer = next(m for m in classifier.modules() if hasattr(m, "x_scale"))
    return ((feats.to(torch.float64) - float(layer.x_zero_point)) * float(layer.x_scale)).to(torch.float32)


def mobilenet_task(small: bool = False) -> Task:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ImportError("the mobilenetv2-probe task needs scikit-learn: pip install scikit-learn") from None
    model = load_mobilenetv2()
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    n_fit, n_test = (500, 300) if small else (2000, 1000)
    fit_x, fit_y = to_imagenet(x_train[:n_fit]), y_train[:n_fit]
    cal_x = to_imagenet(x_train[n_fit:n_fit + 256])
    test_x, test_y = to_imagenet(x_test[:n_test]), y_test[:n_test].numpy()
    fit_feats, _ = features_and_logits(model, fit_x)
    probe = LogisticRegression(C=0.05, max_iter=2000).fit(fit_feats.numpy(), fit_y.numpy())
    ref_feats, ref_logits = features_and_logits(model, test_x)

    def evaluate(m) -> dict:
        feats, logits = features_and_logits(m, test_x)
        acc = float((probe.predict(feats.numpy()) == test_y).mean() * 100)
        agree = (logits.argmax(1) == ref_logits.argmax(1)).double().mean().item() * 100
        cos = F.cosine_similarity(feats, ref_feats, dim=1).mean().item()
        return {"probe_accuracy": acc, "top1_agreement": agree, "feature_cosine": cos}

    start = n_fit + 256  # after the probe's and calibration's images
    n_train = 512 if small else 4096
    return Task("mobilenetv2-probe", f"ImageNet MobileNetV2 + linear probe on Fashion-MNIST at 64 px ({n_test} test images)",
                model, list(cal_x.split(32)), "probe_accuracy", evaluate,
                train_data=lambda: [(b, None) for b in to_imagenet(x_train[start:start + n_train]).split(64)],
                train_forward=pooled_features)
