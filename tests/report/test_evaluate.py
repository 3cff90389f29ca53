import math
from dataclasses import replace

import torch
from torch import nn

import fewbits
from fewbits.report import model_bytes, quantized_bytes, sqnr_db


def test_sizes_count_weights_at_their_bit_width():
    lin = nn.Linear(16, 4)
    q = fewbits.prepare(nn.Sequential(lin), "w8")
    assert model_bytes(lin) == (64 + 4) * 4
    # int8 weights + one float32 scale per output channel (symmetric: no zero points) + fp32 bias
    assert quantized_bytes(q) == 64 + 4 * 4 + 4 * 4
    q4 = fewbits.prepare(nn.Sequential(nn.Linear(256, 8)), "w4-g128")
    assert quantized_bytes(q4) == 256 * 8 // 2 + 8 * 2 * 4 + 8 * 4
    q8 = fewbits.prepare(nn.Sequential(nn.Linear(16, 4)), "w8a8")
    fewbits.calibrate(q8, [torch.randn(2, 16)])
    assert quantized_bytes(q8) == 64 + 16 + 16 + (4 + 1)  # plus the input's scale and zero point


def test_layer_sqnr_matches_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    q = fewbits.prepare(model, "w4a8")
    batches = [torch.randn(10, 16) for _ in range(3)]
    fewbits.calibrate(q, batches)
    report = fewbits.evaluate(q, model, batches=batches,
                              metric_fn=lambda m: {"out_norm": m(batches[0]).norm().item()}, metric="out_norm")
    rows = {r.name: r for r in report.layers}
    assert rows["0"].weight_sqnr_db == round(sqnr_db(model[0].weight, q.model[0].quantized_weight()), 3)
    x = torch.cat(batches)
    with torch.no_grad():
        ref, out = model(x), q(x)
    expected = 10 * math.log10(ref.double().pow(2).sum().item() / (ref.double() - out.double()).pow(2).sum().item())
    assert abs(rows["2"].output_sqnr_db - expected) < 1e-3  # rounded to 3 decimals
    # each layer's own error: the last layer quantized alone on the exact fp32 input of it
    with torch.no_grad():
        h = model[1](model[0](x))
        own_out = q.model[2](h)
        ref2 = model[2](h)
    own = 10 * math.log10(ref2.double().pow(2).sum().item() / (ref2.double() - own_out.double()).pow(2).sum().item())
    assert abs(rows["2"].isolated_sqnr_db - own) < 1e-3  # rounded to 3 decimals
    assert rows["0"].isolated_sqnr_db == rows["0"].output_sqnr_db  # the first layer's input is exact in both
    assert rows["2"].isolated_sqnr_db > rows["2"].output_sqnr_db  # the accumulated error includes layer 0's
    assert report.worst_layers(1, isolated=True)[0].name in rows
    assert report.fp32["out_norm"] != report.quantized["out_norm"]
    assert report.to_dict()["schema_version"] == 1


def test_evaluate_on_a_task():
    from fewbits.tasks import load_task

    task = load_task("digits", small=True)
    q = fewbits.prepare(task.model, "w8a8")
    fewbits.calibrate(q, task.calibration)
    report = fewbits.evaluate(q, task)
    assert report.metric == "accuracy" and report.size_bytes["quantized"] < report.size_bytes["fp32"] / 3
    assert all(r.output_sqnr_db is not None and r.output_sqnr_db > 15 for r in report.layers)


class _Tied(nn.Module):
    """An embedding table shared with the output head, as language models tie them."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 32), nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_a_tied_weight_counts_once_per_form_it_is_stored_in():
    ids = torch.randint(0, 50, (2, 7))
    assert model_bytes(_Tied()) == 50 * 32 * 4  # one fp32 array
    q = fewbits.prepare(_Tied(), "w4-g32")  # embedding rows at 8 bits, the head at 4 bits in groups of 32
    fewbits.calibrate(q, [ids])
    rows_int8 = 50 * 32 + 50 * 4  # int8 levels, one float32 scale per row
    head_int4 = 50 * 32 // 2 + 50 * 4  # packed int4 levels, one float32 scale per group
    assert quantized_bytes(q) == rows_int8 + head_int4
    kept = fewbits.prepare(_Tied(), replace(fewbits.get_recipe("w4-g32"), exclude=("head",)))
    fewbits.calibrate(kept, [ids])
    assert quantized_bytes(kept) == rows_int8 + 50 * 32 * 4  # the head reads the table in float: a copy
