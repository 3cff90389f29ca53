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
