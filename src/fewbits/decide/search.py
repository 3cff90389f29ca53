"""One format per layer, chosen exactly: an integer linear program over the sensitivity scores
and the costs (as HAWQ-v3 does), and the Pareto front of damage against a cost.

Variables ``x[l, c] ∈ {0, 1}`` (layer ``l`` in candidate ``c``), one per layer and candidate the
layer can take; constraints ``Σ_c x[l, c] = 1`` per layer and ``Σ cost[key] · x ≤ budget[key]``
per budget; objective ``min Σ damage · x``. A cost with chain savings (latency: two integer
neighbours skip the conversions between them, two float ones share layout changes) adds per
chain edge ``e = (a, b)`` and domain pair ``(da, db)`` a variable ``z = x[a ∈ da] ∧ x[b ∈ db]``
(``z ≤ X[a, da]``, ``z ≤ X[b, db]``, ``z ≥ X[a, da] + X[b, db] − 1``, ``X`` the sum of ``x``
over a domain's formats), with ``− saving · z`` in that cost's row; a group of
:mod:`fewbits.decide.layout` (a layout region, siblings sharing an input quantization) adds one
such AND over all its members. Solved by ``scipy.optimize.milp`` (HiGHS): the
optimum, not a greedy approximation. Damages are assumed additive over layers (each layer's
score measured alone), which is the model HAWQ and the papers after it use; how far that holds
is for the caller to check by quantizing the chosen configuration.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..recipe import Recipe
from .candidates import formats_recipe
from .cost import Costs, domain, is_integer
from .graph import own_output_grids
from .sensitivity import Sensitivity

COST_KEYS = ("bytes", "bops", "energy_pj", "latency_s")


@dataclass(frozen=True)
class Choice:
    """A format per layer, its predicted damage (sum of the layers' scores) and its costs;
    ``outputs``: the integer convolutions given an output grid of their own (no integer reader
    to hand their output on to: ``fewbits.decide.graph``)."""

    formats: dict
    damage: float
    costs: dict
    outputs: tuple = ()
    embeddings: tuple = ()  # the layers that are embeddings: their format's weights only (indices in)

    def to_dict(self) -> dict:
        return {"formats": dict(self.formats), "damage": self.damage, "costs": dict(self.costs),
                "outputs": list(self.outputs), "embeddings": list(self.embeddings)}

    def recipe(self, name: str = "mixed") -> Recipe:
        """A recipe giving each layer its format by exact name (``fewbits.prepare`` takes it,
        ``to_json`` writes it), the convolutions in ``outputs`` with a uint8 output grid so
        that ONNX Runtime runs them on integers: no ops between layers, no algorithm steps."""
        return formats_recipe(self.formats, self.outputs, self.embeddings, name)


def _options(sens: Sensitivity, costs: Costs) -> list[tuple[str, str]]:
    """``(layer, candidate)`` pairs with both a score and a cost."""
    missing = sorted(set(sens.scores) ^ set(costs.table))
    if missing:
        raise ValueError(f"sensitivity and costs cover different layers: {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}; compute both on the same model")
    pairs = []
    for layer, scores in sens.scores.items():
        usable = [(layer, c) for c, s in scores.items() if s is not None and c in costs.table[layer]]
        if not usable:
            raise ValueError(f"layer '{layer}' has no candidate format with both a score and a cost")
        pairs += usable
    return pairs


def _program(sens: Sensitivity, costs: Costs, budgets: dict, objective=None):
    """The integer program's pairs, objective, constraints and chain variables: minimise the
    summed damage (or ``objective``, a cost key) within ``budgets``."""
    from scipy.optimize import LinearConstraint

    unknown = sorted(set(budgets) - set(COST_KEYS))
    if unknown:
        raise ValueError(f"unknown budget keys {unknown}; known: {list(COST_KEYS)}")
    pairs = _options(sens, costs)
    keys = set(budgets) | ({objective} if objective else set())
    for key in keys:
        lacking = [f"{l} | {c}" for l, c in pairs if key not in costs.table[l][c]]
        if lacking:
            raise ValueError(f"cost {key!r} is not known for {lacking[:3]}{' …' if len(lacking) > 3 else ''}"
                             + ("; build a latency table (latency_table) and pass it to layer_costs"
                                if key == "latency_s" else ""))
    # one variable per chain edge and domain pair with a saving: z = (a in domain da) AND (b in db)
    edges = [(i, e, combo) for i, e in enumerate(costs.chains) for combo, saving in costs.chain_savings[i].items()
             if any(k in saving for k in keys)]
    # and one per group with a saving: z = every member in one of its domains
    groups = [g for g in costs.groups if any(k in g for k in keys)]
    n, m = len(pairs), len(edges) + len(groups)
    row_of = {layer: i for i, layer in enumerate(sens.scores)}
    one_each = np.zeros((len(row_of), n + m))
    for j, (l, _) in enumerate(pairs):
        one_each[row_of[l], j] = 1.0
    constraints = [LinearConstraint(one_each, 1.0, 1.0)]
    if m:
        ands = [{a: {da}, b: {db}} for _, (a, b), combo in edges for da, db in [combo.split("|")]]
        ands += [{layer: set(doms) for layer, doms in g["members"].items()} for g in groups]
        uppers, lower = [], np.zeros((m, n + m))
        for k, members in enumerate(ands):
            lower[k, n + k] = 1.0
            for layer, doms in members.items():
                up = np.zeros(n + m)
                up[n + k] = 1.0
                for j, (l, c) in enumerate(pairs):
                    if l == layer and domain(c) in doms:
                        up[j] = -1.0  # z ≤ x[layer in its domains]
                        lower[k, j] = -1.0  # z ≥ Σ x[member in its domains] − (members − 1)
                uppers.append(up)
        constraints += [LinearConstraint(np.array(uppers), -np.inf, 0.0),
                        LinearConstraint(lower, -np.array([len(a) - 1.0 for a in ands]), np.inf)]

    def row(key: str) -> np.ndarray:
        values = [costs.table[l][c][key] for l, c in pairs]
        values += [-costs.chain_savings[i][combo].get(key, 0.0) for i, _, combo in edges]
        values += [-g.get(key, 0.0) for g in groups]
        return np.array(values, dtype=float)

    for key, limit in budgets.items():
        values = row(key)
        scale = float(np.abs(values).max()) or 1.0  # rows near 1: the solver's tolerances are absolute
        limit = float(limit) - costs.constant.get(key, 0.0)
        constraints.append(LinearConstraint(values[None, :] / scale, -np.inf, limit / scale))
    if objective:
        target = row(objective)
        target = target / (float(np.abs(target).max()) or 1.0)
    else:
        target = np.array([sens.scores[l][c] for l, c in pairs] + [0.0] * m, dtype=float)
    return pairs, target, constraints


def _run(target, constraints):
    from scipy.optimize import Bounds, milp

    return milp(target, constraints=constraints, integrality=np.ones(len(target)), bounds=Bounds(0, 1))


def solve(sens: Sensitivity, costs: Costs, budgets: dict) -> Choice:
    """The least damaging configuration within ``budgets`` (``{"bytes": 2e6, ...}``, keys from
    ``bytes``, ``bops``, ``energy_pj``, ``latency_s``). No configuration fits: an error giving the
    smallest reachable value of each budget."""
    pairs, target, constraints = _program(sens, costs, budgets)
    result = _run(target, constraints)
    if result.status != 0 or result.x is None:
        floors = {k: _cheapest(costs, sens, k) for k in budgets}
        raise ValueError(f"no configuration fits the budgets {budgets}; the smallest reachable: {floors}")
    formats = {l: c for (l, c), x in zip(pairs, result.x) if x > 0.5}
    return _choice(formats, sens, costs)


def _cheapest(costs: Costs, sens: Sensitivity, key: str, budgets: dict | None = None) -> float:
    """The smallest value of cost ``key`` any configuration within the other ``budgets`` reaches
    (solved exactly: chains' savings make it more than a per-layer minimum)."""
    others = {k: v for k, v in (budgets or {}).items() if k != key}
    pairs, target, constraints = _program(sens, costs, others, objective=key)
    result = _run(target, constraints)
    if result.status != 0 or result.x is None:
        raise ValueError(f"no configuration fits the budgets {others}")
    formats = {l: c for (l, c), x in zip(pairs, result.x) if x > 0.5}
    return float(costs.total(formats, key))


def _choice(formats: dict, sens: Sensitivity, costs: Costs) -> Choice:
    integer = {l for l, c in formats.items() if is_integer(c)}
    return Choice(formats, float(sum(sens.scores[l][c] for l, c in formats.items())),
                  {k: float(costs.total(formats, k)) for k in COST_KEYS
                   if all(k in costs.table[l][c] for l, c in formats.items())},
                  tuple(own_output_grids(integer, set(costs.heads), costs.chains)),
                  tuple(sorted(l for l in formats if costs.types.get(l) == "Embedding")))


def pareto_front(sens: Sensitivity, costs: Costs, key: str = "bytes", points: int = 16,
                 budgets: dict | None = None, lower: float | None = None) -> list[Choice]:
    """Configurations from the cheapest to the least damaging in ``key``, each the optimum at its
    budget (budgets spaced evenly between the cheapest — or ``lower`` — and the least damaging
    configuration's cost; every point also within ``budgets``), dominated and repeated points
    removed; sorted by cost."""
    if key not in COST_KEYS:
        raise ValueError(f"pareto_front key must be one of {list(COST_KEYS)}, got {key!r}")
    if points < 2:
        raise ValueError(f"pareto_front needs at least 2 points, got {points}")
    budgets = dict(budgets or {})
    best = solve(sens, costs, budgets)
    lo, hi = (_cheapest(costs, sens, key, budgets) if lower is None else lower), best.costs[key]
    if key in budgets:
        hi = min(hi, budgets[key])
    front = []
    for budget in np.linspace(lo, hi, points):
        front.append(solve(sens, costs, {**budgets, key: float(budget) * (1 + 1e-12) + 1e-9}))  # the end points exactly
    front.sort(key=lambda c: (c.costs[key], c.damage))
    kept = []
    for c in front:
        if not kept or c.damage < kept[-1].damage - 1e-15:
            kept.append(c)
    return kept
