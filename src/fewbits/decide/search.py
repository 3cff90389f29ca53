"""One format per layer, chosen exactly: an integer linear program over the sensitivity scores
and the costs (as HAWQ-v3 does), and the Pareto front of damage against a cost.

Variables ``x[l, c] ∈ {0, 1}`` (layer ``l`` in candidate ``c``), one per layer and candidate the
layer can take; constraints ``Σ_c x[l, c] = 1`` per layer and ``Σ cost[key] · x ≤ budget[key]``
per budget; objective ``min Σ damage · x``. Solved by ``scipy.optimize.milp`` (HiGHS): the
optimum, not a greedy approximation. Damages are assumed additive over layers (each layer's
score measured alone), which is the model HAWQ and the papers after it use; how far that holds
is for the caller to check by quantizing the chosen configuration.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..recipe import Recipe
from .candidates import CANDIDATES
from .cost import Costs
from .sensitivity import Sensitivity

COST_KEYS = ("bytes", "bops", "energy_pj")


@dataclass(frozen=True)
class Choice:
    """A format per layer, its predicted damage (sum of the layers' scores) and its costs."""

    formats: dict
    damage: float
    costs: dict

    def to_dict(self) -> dict:
        return {"formats": dict(self.formats), "damage": self.damage, "costs": dict(self.costs)}

    def recipe(self, name: str = "mixed") -> Recipe:
        """A recipe giving each layer its format by exact name (``fewbits.prepare`` takes it,
        ``to_json`` writes it): no ops between layers, no algorithm steps."""
        by_name = tuple((_exact_pattern(layer), CANDIDATES[cand].layer) for layer, cand in self.formats.items())
        return Recipe(name, (), by_name)


def _exact_pattern(name: str) -> str:
    """A glob matching ``name`` only (``[`` is the one metacharacter a module path can hold)."""
    return name.replace("[", "[[]")


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


def solve(sens: Sensitivity, costs: Costs, budgets: dict) -> Choice:
    """The least damaging configuration within ``budgets`` (``{"bytes": 2e6, ...}``, keys from
    ``bytes``, ``bops``, ``energy_pj``). No configuration fits: an error giving the smallest
    reachable value of each budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    unknown = sorted(set(budgets) - set(COST_KEYS))
    if unknown:
        raise ValueError(f"unknown budget keys {unknown}; known: {list(COST_KEYS)}")
    pairs = _options(sens, costs)
    row_of = {layer: i for i, layer in enumerate(sens.scores)}
    n = len(pairs)
    damage = np.array([sens.scores[l][c] for l, c in pairs], dtype=float)
    one_each = np.zeros((len(row_of), n))
    for j, (l, _) in enumerate(pairs):
        one_each[row_of[l], j] = 1.0
    constraints = [LinearConstraint(one_each, 1.0, 1.0)]
    for key, limit in budgets.items():
        row = np.array([costs.table[l][c][key] for l, c in pairs], dtype=float)
        constraints.append(LinearConstraint(row[None, :], -np.inf, float(limit)))
    result = milp(damage, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if result.status != 0 or result.x is None:
        floors = {k: _cheapest(costs, sens, k) for k in budgets}
        raise ValueError(f"no configuration fits the budgets {budgets}; the smallest reachable: {floors}")
    formats = {l: c for (l, c), x in zip(pairs, result.x) if x > 0.5}
    return _choice(formats, sens, costs)


def _cheapest(costs: Costs, sens: Sensitivity, key: str) -> float:
    return sum(min(costs.table[l][c][key] for c, s in sens.scores[l].items() if s is not None and c in costs.table[l])
               for l in sens.scores)


def _choice(formats: dict, sens: Sensitivity, costs: Costs) -> Choice:
    return Choice(formats, float(sum(sens.scores[l][c] for l, c in formats.items())),
                  {k: float(costs.total(formats, k)) for k in COST_KEYS})


def pareto_front(sens: Sensitivity, costs: Costs, key: str = "bytes", points: int = 16,
                 budgets: dict | None = None) -> list[Choice]:
    """Configurations from the cheapest to the least damaging in ``key``, each the optimum at its
    budget (budgets spaced evenly between the cheapest and the least damaging configuration's
    cost; every point also within ``budgets``), dominated and repeated points removed; sorted by
    cost."""
    if key not in COST_KEYS:
        raise ValueError(f"pareto_front key must be one of {list(COST_KEYS)}, got {key!r}")
    if points < 2:
        raise ValueError(f"pareto_front needs at least 2 points, got {points}")
    budgets = dict(budgets or {})
    best = solve(sens, costs, budgets)
    lo, hi = _cheapest(costs, sens, key), best.costs[key]
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
