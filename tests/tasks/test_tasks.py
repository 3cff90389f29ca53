"""The built-in tasks load, score their fp32 model, and survive w8a8 (small subsets)."""
import gzip

import pytest
import torch

import fewbits
from fewbits.tasks import TASK_NAMES, load_task

# fp32 floors well below what each model scores here; w8a8 allowances in the task's metric
# units (points of accuracy / recall), wider for small evaluation sets.
CASES = {
    "digits": ("accuracy", 95.0, 2.0),
    "mnist1d": ("accuracy", 85.0, 3.0),
    "fashion-cnn": ("accuracy", 89.0, 1.0),
    "fashion-mlp": ("accuracy", 88.0, 1.0),
    "mobilenetv2-probe": ("probe_accuracy", 70.0, 3.0),
    "minilm-wordnet": ("recall@1", 20.0, 4.0),
}  # smollm2 (perplexity, lower is better; w8a8 hurts it by design): tests/tasks/test_causal_lm.py


def test_every_task_has_a_test():
    assert set(TASK_NAMES) == set(CASES) | {"smollm2"}


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if n in CASES])
def test_task_fp32_and_w8a8(name):
    metric, floor, allowed_drop = CASES[name]
    task = load_task(name, small=True)
    assert task.metric == metric
    fp32 = task.evaluate(task.model)[metric]
    assert fp32 >= floor
    q = fewbits.prepare(task.model, "w8a8")
    fewbits.calibrate(q, task.calibration)
    scores = task.evaluate(q)
    assert scores[metric] >= fp32 - allowed_drop
    if name == "minilm-wordnet":
        assert scores["cosine_mean"] >= 0.98  # per-token 8-bit activations keep embeddings close


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown task 'cifar'; tasks: fashion-cnn, fashion-mlp, mobilenetv2-probe"):
        load_task("cifar")


def test_mobilenetv2_recognises_the_palace():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_sample_images

    from fewbits.tasks.models import load_mobilenetv2
    from fewbits.tasks.mobilenet_probe import IMAGENET_MEAN, IMAGENET_STD

    china = torch.tensor(load_sample_images().images[0]).permute(2, 0, 1).float().unsqueeze(0) / 255
    x = torch.nn.functional.interpolate(china, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        top = load_mobilenetv2()((x - IMAGENET_MEAN) / IMAGENET_STD).argmax(1).item()
    assert top == 698  # ImageNet class 698: palace


def test_corrupt_fashion_files_are_named(tmp_path, monkeypatch):
    from fewbits.tasks.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "FASHION_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist("test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: not an IDX file"):
        fashion_mnist.load_fashion_mnist("test")
    header = b"\x00\x00\x08\x03" + (10000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + b"\x00" * 100))
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.load_fashion_mnist("test")


def test_mobilenet_training_forward_is_the_probe_features():
    from fewbits.tasks.mobilenet_probe import features_and_logits, pooled_features
    from fewbits.tasks.models import load_mobilenetv2

    model = load_mobilenetv2()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats, _ = features_and_logits(model, x)
    trained = pooled_features(model, x.requires_grad_())
    assert torch.equal(trained.detach(), feats)  # the same forward, kept differentiable
    trained.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
