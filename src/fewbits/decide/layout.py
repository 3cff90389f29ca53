"""The layout changes ONNX Runtime puts around a layer timed alone, and what a whole model saves
of them and of shared input quantizations: the latency table's corrections beyond chain pairs.

ONNX Runtime runs a float convolution in a blocked channel layout (``ReorderInput`` before it,
``ReorderOutput`` after) and an integer one channels-last (a uint8 ``Transpose`` on each side);
a weight-only one in the model's own layout. Alone, a layer pays both changes. In a model its
transpose optimizer pushes them through the ops that do not care about layout
(:data:`fewbits.decide.graph.LAYOUT_FREE`: additions, activations, max pools), so across a
*layout region* — the tensors joined by such ops between layers, a residual stream — whose every
producer and reader runs in one layout none of them is paid (tests/decide/test_latency.py
checks it on a residual stream: at most 2 transposes where its convolutions alone carry 8).

Sibling layers that read one tensor (a transformer's query, key and value projections) share one
``QuantizeLinear`` of it when integer: ONNX Runtime merges the identical nodes (the same test:
three integer siblings read one quantized input).

Both become *groups* of the cost model: ``{"members": {layer: [domains]}, "latency_s": s}`` —
``s`` is saved when every member's format is in one of its domains (one AND variable each in the
integer program, like a chain edge).
"""
from __future__ import annotations

from pathlib import Path

from .timed import onnx_model

LAYOUT_OPS = ("Transpose", "ReorderInput", "ReorderOutput")
_NOT_CORE = LAYOUT_OPS + ("QuantizeLinear", "DequantizeLinear")
SIDES = ("layout_in", "layout_out")


def _split(nodes: list) -> dict:
    """The layout nodes before the layer's own op and after it, in graph order."""
    core = next((i for i, n in enumerate(nodes) if n.op_type not in _NOT_CORE), len(nodes))
    return {"layout_in": [n for n in nodes[:core] if n.op_type in LAYOUT_OPS],
            "layout_out": [n for n in nodes[core + 1:] if n.op_type in LAYOUT_OPS]}


def _on_uint8(node, nodes: list) -> bool:
    """A layout node between a (de)quantization and an integer kernel moves uint8 values."""
    producers = {o: n.op_type for n in nodes for o in n.output}
    consumers = {i: n.op_type for n in nodes for i in n.input}
    return producers.get(node.input[0]) == "QuantizeLinear" or consumers.get(node.output[0]) == "DequantizeLinear" \
        or producers.get(node.input[0], "").startswith("QLinear")


def layout_graphs(optimized: str, shape_in: tuple, shape_out: tuple, tmp: Path, tag: str) -> dict:
    """``{side: (file, input array)}`` for each side of the layer in the optimized single-layer
    graph ``optimized`` that has layout nodes: those nodes alone, on an input of the shape they
    see there (the layer's input; its output in the layer's own layout)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = list(onnx.load(optimized).graph.node)
    found = {}
    for side, chain in _split(nodes).items():
        if not chain:
            continue
        uint8 = _on_uint8(chain[0], nodes)
        dtype, proto = (np.uint8, TensorProto.UINT8) if uint8 else (np.float32, TensorProto.FLOAT)
        shape = list(shape_in if side == "layout_in" else shape_out)
        x = np.zeros(shape, dtype)
        if side == "layout_out":  # the layer's output before the nodes: undo them on its shape
            first = chain[0]
            if first.op_type == "Transpose":
                perm = list(helper.get_attribute_value(next(a for a in first.attribute if a.name == "perm")))
                before = [0] * len(shape)
                for i, p in enumerate(perm):
                    before[p] = shape[i]
                x = np.zeros(before, dtype)
            elif first.op_type == "ReorderOutput":
                reorder = helper.make_graph([helper.make_node("ReorderInput", ["x"], ["y"], domain="com.microsoft.nchwc")],
                                            "blocked", [helper.make_tensor_value_info("x", proto, shape)],
                                            [helper.make_tensor_value_info("y", proto, None)])
                model = onnx_model(reorder)
                x = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
                    None, {"x": np.zeros(shape, dtype)})[0]
        names = ["x"] + [f"t{i}" for i in range(len(chain))]
        copies = []
        for i, n in enumerate(chain):
            c = helper.make_node(n.op_type, [names[i]], [names[i + 1]], domain=n.domain or None)
            c.attribute.extend(n.attribute)
            copies.append(c)
        graph = helper.make_graph(copies, f"{tag}-{side}", [helper.make_tensor_value_info("x", proto, list(x.shape))],
                                  [helper.make_tensor_value_info(names[-1], proto, None)])
        path = tmp / f"{tag}-{side}.onnx"
        onnx.save(onnx_model(graph), str(path))
        found[side] = (str(path), x)
    return found



def latency_groups(readers, seconds: dict, layout: dict, conversions: dict, domain_formats: dict) -> tuple:
    """The groups (module docstring) of one model, the input quantization an integer sibling
    gives up to its group (``shared[layer]``), and what to add to the fp32 model's time less its
    layers' to leave the part no format changes: the float regions' layout changes (the fp32
    model measured already saved them) and one quantization per sibling group (paid whenever
    any sibling is integer; the group's saving gives it back when none is).
    ``layout[layer][format]``: ``{side: seconds}``; ``conversions[layer]["quantize_input"]``."""
    groups, shared, float_saved = [], {}, 0.0
    for region in readers.layout_regions():
        members = region["producers"] + region["consumers"]
        for dom, fmt in domain_formats.items():
            if any(fmt not in seconds[m] for m in members):
                continue
            saving = sum(layout[p].get(fmt, {}).get("layout_out", 0.0) for p in region["producers"]) \
                + sum(layout[c].get(fmt, {}).get("layout_in", 0.0) for c in region["consumers"])
            if saving > 0:
                groups.append({"members": {m: [dom] for m in sorted(set(members))}, "latency_s": saving,
                               "why": "layout region"})
                if dom == "float":
                    float_saved += saving
    constant = 0.0
    for siblings in readers.siblings:
        q = min(conversions[s]["quantize_input"] for s in siblings)
        others = [d for d in domain_formats if d != "integer"]
        groups.append({"members": {s: others for s in siblings}, "latency_s": q, "why": "siblings"})
        for s in siblings:
            shared[s] = q
        constant += q  # one quantization when any sibling is integer; the group gives it back when none is
    return groups, shared, float_saved + constant
