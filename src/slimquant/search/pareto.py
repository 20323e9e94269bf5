"""Pareto fronts of evaluated configurations (pure functions of their objective values)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def dominates(a: Mapping[str, float], b: Mapping[str, float], maximize: Mapping[str, bool]) -> bool:
    """``a`` is at least as good as ``b`` in every objective of ``maximize`` and better in one."""
    better = False
    for key, up in maximize.items():
        x, y = (a[key], b[key]) if up else (-a[key], -b[key])
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(points: Sequence[Mapping[str, float]], maximize: Mapping[str, bool]) -> list[int]:
    """Indices of the points no other point dominates (``maximize``: objective -> True when higher is better),
    in input order; points with a missing or non-finite objective are left out. Equal points are all kept."""
    if not maximize:
        raise ValueError("pareto_front needs at least one objective")
    ok = [i for i, p in enumerate(points) if all(k in p and math.isfinite(p[k]) for k in maximize)]
    return [i for i in ok if not any(dominates(points[j], points[i], maximize) for j in ok if j != i)]
