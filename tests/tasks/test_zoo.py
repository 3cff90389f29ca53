"""The architectures benchmarks/reach.py measures: each builds, runs, and prepares without a crash."""
import pytest
import torch

import fewbits
from fewbits.tasks.models.zoo import ZOO


@pytest.mark.parametrize("name", sorted(ZOO))
def test_each_zoo_model_runs_and_prepares(name):
    if name in ("gpt2", "llama"):
        pytest.importorskip("transformers")
    case = ZOO[name]()
    batch = case.batches(1, 0)[0]
    with torch.no_grad():
        out = case.model(**batch) if isinstance(batch, dict) else case.model(batch)
    assert torch.isfinite(out).all()
    q = fewbits.prepare(case.model, "w8a8")
    assert q.quantized_layers(), name  # something is quantized in every one
    assert all(lf.reason for lf in q.left_float)  # and what is not says why


# weight GEMMs ONNX Runtime runs on integer kernels / all it runs, under the default recipe; the
# float one: the U-Net's ConvTranspose2d (no integer kernel in ONNX Runtime). Convolutions read
# by a float op (the ViT's patch convolution, joining a learned token's float cat; the U-Net's
# last, the model's output) get an output grid and fuse.
INTEGER_GEMMS = {"resnet18": (21, 21), "vit": (26, 26), "transformer-encoder": (25, 25), "gpt2": (17, 17),
                 "llama": (29, 29), "unet": (5, 6), "functional": (2, 2), "lstm": (1, 1)}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_each_zoo_model_deploys_on_integer_kernels(name, tmp_path):
    pytest.importorskip("onnxruntime")
    if name in ("gpt2", "llama"):
        pytest.importorskip("transformers")
    case = ZOO[name]()
    batches = case.batches(2, 0)
    q = fewbits.calibrate(fewbits.prepare(case.model, "w8a8"), batches)
    integer = fewbits.convert(q)
    assert integer.integer_layers()  # the integer model runs them too
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float GEMMs above are warned about; counted here
        result = fewbits.export_onnx(q, batches[0], tmp_path / f"{name}.onnx", batches=batches)
    v = result.verification
    # ONNX Runtime equals the integer model: outputs within one output step (a quantized model
    # output, the U-Net's: a one-level flip is one step, plus float32 rounding), at most 1e-3 of the
    # layer-input levels differing (float attention / norms between the layers round differently
    # in ORT) and by at most 3 levels (ResNet-18: ORT's QLinearAdd rounds its float rescale; a
    # 1-level operand difference grows by the operand/output scale ratio, on 9e-6 of the levels)
    assert v.max_steps <= 1.01 and v.differing <= 1e-3 and v.max_levels <= 3, v.summary()
    k = result.kernels
    assert (k.integer, k.integer + k.float) == INTEGER_GEMMS[name]
