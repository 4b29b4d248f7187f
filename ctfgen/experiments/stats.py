"""Figures over seeds: mean, standard deviation, and the rule that decides whether a gap is a difference."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Spread:
    mean: float
    sd: float  # sample standard deviation (n - 1); 0 for one value
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} +- {self.sd:.2f} (n={self.n})"


def spread(values: Iterable[float]) -> Spread:
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values")
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return Spread(mean, sd, len(xs))


def compare(a: Spread, b: Spread, lower_is_better: bool = True) -> str:
    """'a better', 'b better' or 'tie'. A gap counts only when both sides have at least two seeds and
    their one-sd intervals do not overlap (|mean_a - mean_b| > sd_a + sd_b); one seed proves nothing."""
    if a.n < 2 or b.n < 2 or abs(a.mean - b.mean) <= a.sd + b.sd:
        return "tie"
    a_lower = a.mean < b.mean
    return "a better" if a_lower == lower_is_better else "b better"
