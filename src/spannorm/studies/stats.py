"""The paired comparison of two variants: the differences of runs that share everything but the
variant (setting, cell and seed, so the same data order and init draw), summarized by their
median, a bootstrap 95% interval of their mean and the two-sided Wilcoxon signed-rank test.

The Wilcoxon test asks whether the differences are symmetric about zero without assuming they
are normal: a pair where one run stayed on the unigram plateau differs by a nat or more while most
differ by hundredths, which would dominate a t-test. Zeros are dropped (Wilcoxon's rule). Its p-value
is exact (the distribution of the signed-rank sum over every sign assignment) up to 50 pairs without
ties and up to 13 pairs with ties; otherwise the normal approximation with the tie correction and
no continuity correction. These are the rules `scipy.stats.wilcoxon` follows by default, which the
tests check it against; scipy is not needed here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed, so that a report regenerates the same interval


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            result[k] = (i + j) / 2 + 1
        i = j + 1
    return result


@dataclass
class Wilcoxon:
    n: int  # non-zero differences
    r_plus: float  # the rank sum of the positive differences
    p_value: float
    method: str  # "exact" or "normal approximation"


def signed_rank_distribution(ranks: list[float]) -> dict[int, int]:
    """{2 x rank sum: number of sign assignments giving it}: the exact null distribution of the
    positive rank sum (ranks are whole or half numbers, hence the doubling)."""
    counts = {0: 1}
    for rank in ranks:
        step = round(2 * rank)
        grown: dict[int, int] = dict(counts)
        for total, count in counts.items():
            grown[total + step] = grown.get(total + step, 0) + count
        counts = grown
    return counts


def wilcoxon(differences: list[float]) -> Wilcoxon:
    """The two-sided Wilcoxon signed-rank test of `differences` against zero."""
    d = [x for x in differences if x != 0 and not math.isnan(x)]
    n = len(d)
    if n == 0:
        return Wilcoxon(0, 0.0, math.nan, "none")
    ranks = average_ranks([abs(x) for x in d])
    r_plus = sum(r for r, x in zip(ranks, d, strict=True) if x > 0)
    ties = len(set(map(abs, d))) < n
    zeros = len(d) < len([x for x in differences if not math.isnan(x)])
    if (not ties and not zeros and len(differences) <= 50) or (
        (ties or zeros) and len(differences) <= 13
    ):
        counts = signed_rank_distribution(ranks)
        total = 2**n
        observed = round(2 * r_plus)
        low = sum(c for s, c in counts.items() if s <= observed) / total
        high = sum(c for s, c in counts.items() if s >= observed) / total
        return Wilcoxon(n, r_plus, min(1.0, 2 * min(low, high)), "exact")
    mean = n * (n + 1) / 4
    tie_counts: dict[float, int] = {}
    for x in d:
        tie_counts[abs(x)] = tie_counts.get(abs(x), 0) + 1
    tie_term = sum(t**3 - t for t in tie_counts.values())
    spread = math.sqrt((n * (n + 1) * (2 * n + 1) - tie_term / 2) / 24)
    z = (r_plus - mean) / spread
    return Wilcoxon(n, r_plus, math.erfc(abs(z) / math.sqrt(2)), "normal approximation")


def bootstrap_interval(
    values: list[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (resampled with replacement,
    a fixed seed); (NaN, NaN) for fewer than two values."""
    if len(values) < 2:
        return math.nan, math.nan
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Paired:
    n: int
    lower: int  # pairs where the second variant ends lower
    median: float
    mean: float
    interval: tuple[float, float]
    test: Wilcoxon


def paired_summary(differences: list[float]) -> Paired:
    """The summary of second-minus-first differences (NaN ones, a diverged run's, left out)."""
    d = [x for x in differences if not math.isnan(x)]
    return Paired(
        n=len(d),
        lower=sum(x < 0 for x in d),
        median=statistics.median(d) if d else math.nan,
        mean=statistics.mean(d) if d else math.nan,
        interval=bootstrap_interval(d),
        test=wilcoxon(d),
    )
