"""Paired-ratio statistics: how two arms compare when each round measures both.

On a shared machine the speed drifts from round to round by more than the differences sought, so
a comparison takes the ratio of the two arms within each round (the drift cancels) and reports the
median of those ratios, with a distribution-free interval for it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Ratio:
    """The median of paired ratios, and an interval that covers it with `confidence`."""

    median: float
    low: float
    high: float
    confidence: float

    def interval(self) -> str:
        """`0.923-1.019 (98%)`."""
        return f"{self.low:.3f}-{self.high:.3f} ({100 * self.confidence:.0f}%)"


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """numerators[i] / denominators[i]: one ratio per round (the sequences pair up by round)."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def median_interval(values: Sequence[float], confidence: float = 0.9) -> tuple[float, float, float]:
    """A distribution-free interval for the median that `values` are samples of: their k-th
    smallest and k-th largest, k as large as keeps P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2
    (at least 1: the extremes); returned with the confidence it reaches, 1 - 2 P(... < k)."""
    n, ordered = len(values), sorted(values)

    def below(k: int) -> float:
        return sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k < n // 2 and below(k + 1) <= (1 - confidence) / 2:
        k += 1
    return ordered[k - 1], ordered[n - k], 1 - 2 * below(k)


def summarize(ratios: Sequence[float], confidence: float = 0.9) -> Ratio:
    """The median of per-round ratios, with its interval."""
    return Ratio(statistics.median(ratios), *median_interval(ratios, confidence))


def paired_ratio(
    numerators: Sequence[float], denominators: Sequence[float], confidence: float = 0.9
) -> Ratio:
    """The median over rounds of numerators[i] / denominators[i], with its interval."""
    return summarize(paired_ratios(numerators, denominators), confidence)
