"""Attention Matching on arrays (numpy + numba; nothing here imports the engine).

Per (layer, KV head): pick a subset of the original keys, fit a bias beta per kept key so that
attention mass matches, and refit the values so that attention outputs match (Zweiger et al.
2026, arXiv 2602.16284; see ../shared/docs/attention-matching-spec.md).
"""

from .budgets import BUDGETS, JsonBudget, SensitivityBudget, UniformBudget, allocate, swap_allocation
from .compact import CompactionReport, Compactor
from .fit import AnchoredValues, BoxNNLS, DirectValues, LeastSquaresValues, ZeroBeta
from .methods import DEFAULT_METHOD, METHODS, ONLINE_METHOD, Method, get_method
from .metrics import head_errors
from .omp import OMP, PROGRESSIVE_SCHEDULE
from .problem import HeadProblem, HeadResult
from .select import HighestAttnKeys, RandomKeys, Recent, SinksAndRecent
from .spans import GroupSelector, SharedSpans

__all__ = [
    "BUDGETS", "DEFAULT_METHOD", "METHODS", "ONLINE_METHOD", "OMP", "PROGRESSIVE_SCHEDULE",
    "AnchoredValues", "BoxNNLS", "GroupSelector", "SharedSpans",
    "CompactionReport", "Compactor", "DirectValues", "HeadProblem", "HeadResult", "HighestAttnKeys", "JsonBudget",
    "LeastSquaresValues", "Method", "RandomKeys", "Recent", "SensitivityBudget", "SinksAndRecent", "UniformBudget",
    "ZeroBeta", "allocate", "get_method", "head_errors", "swap_allocation",
]
