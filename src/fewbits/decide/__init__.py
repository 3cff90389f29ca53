"""Deciding per-layer precision: the candidate formats, each layer's sensitivity to them, what
each costs (bytes, BOPs, energy, latency measured on this machine), and the exact choice under a
budget (integer linear programming, the Pareto front)."""
from .auto import AutoResult, auto
from .candidates import CANDIDATES, DEFAULT_CANDIDATES, Candidate, get_candidates
from .cost import Costs, layer_costs
from .latency import LatencyTable, LayerLatency, latency_table
from .search import Choice, pareto_front, solve
from .sensitivity import METHODS, Sensitivity, sensitivity

__all__ = ["CANDIDATES", "DEFAULT_CANDIDATES", "Candidate", "get_candidates", "METHODS", "Sensitivity", "sensitivity",
           "Costs", "layer_costs", "LatencyTable", "LayerLatency", "latency_table", "Choice", "solve", "pareto_front", "auto", "AutoResult"]
