"""Statistics of the benchmark's timings: the distribution-free confidence interval of a median, paired
per-round ratios, and :class:`Timings` (every pass time of every row of one timed run)."""
import math
import statistics
from typing import Dict, Iterable, List, Optional


def median_ci(values: List[float], confidence: float = 0.95) -> Optional[List[float]]:
    """A distribution-free confidence interval of the median: the order statistics x_(r), x_(n+1-r) with the
    largest r whose coverage 1 - 2 P(Binomial(n, 1/2) < r) is at least ``confidence``.  Host noise is not
    Gaussian (a pass is only ever slowed down), so no normal approximation.  None when even the min-max range
    (r = 1, coverage 1 - 2^(1-n)) falls short: with fewer than 6 values at 95% (n=5 gives 93.75%)."""
    v, n = sorted(values), len(values)
    if n == 0 or 1 - 2 * 0.5 ** n < confidence:
        return None
    best, total = 1, 1 << n
    comb, count = 1, 1  # C(n, r - 1) and the sum of C(n, i) for i < r, carried from r to r + 1
    for r in range(2, (n + 1) // 2 + 1):
        comb = comb * (n - r + 2) // (r - 1)
        count += comb
        below = count / total  # P(Binomial(n, 1/2) <= r - 1), exact integers divided once
        if 1 - 2 * below < confidence:
            break
        best = r
    return [v[best - 1], v[n - best]]


def paired(ratios: List[float]) -> Dict:
    """Median of per-round ratios, their range, and the 95% confidence interval of the median (None with fewer
    than 6 rounds)."""
    return {'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios), 'ci': median_ci(ratios)}


# A row whose pass times spread more than this (interquartile range over the median) was held back while it was
# timed.  In the committed runs every row of the CPU runs spread at most 9%, and every row of the GPU runs' DeiT-Ti
# sections at batch 256 at most 3%, but one: in cuda.json a host slowed during the section held its eager rows
# back (spreads of 10-16%, a median pass up to 1.9x the fastest), while its CUDA-graph rows, which barely use the
# host, spread 1%.
UNSTEADY_SPREAD = 0.10


def spread(values: List[float]) -> Optional[float]:
    """How far apart a row's pass times are: their interquartile range over their median (0: every pass the same).
    Robust to a single slow or fast pass; None with fewer than 4 values (the original protocol's one mean per
    row) or any that is not a finite positive number of seconds."""
    if len(values) < 4 or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in values):
        return None
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


NO_RATIO = {'median': None, 'min': None, 'max': None, 'ci': None}  # a ratio that could not be measured


def point(ratio: float) -> Dict:
    """A ratio of two single figures (no rounds to pair): no range and no confidence interval."""
    return {'median': ratio, 'min': ratio, 'max': ratio, 'ci': None}


def as_fields(key: str, summary: Dict) -> Dict:
    """A ``paired`` (or ``point``) summary as report fields: ``key`` (the median), ``key_range`` and ``key_ci``
    (None when the figures were not timed in rounds)."""
    return {key: summary['median'], f'{key}_range': [summary['min'], summary['max']], f'{key}_ci': summary['ci']}


class Timings:
    """Seconds per forward pass of every row of one timed run, one list per row.

    ``paired=True`` (our protocol): one entry per round, the rows interleaved, so the i-th entries of two rows
    were timed in the same round and a speed-up is the median of the per-round ratios.  ``paired=False`` (the
    original code's protocol): one entry per row, its mean pass time; rows were timed one after another, so a
    speed-up is the ratio of two means, with no interval.
    """

    def __init__(self, seconds: Dict[str, List[float]], batch: int, paired: bool = True):
        self.seconds, self.batch, self.paired = seconds, batch, paired

    def problem(self, name: str) -> Optional[str]:
        """Why ``name``'s pass times are no measurement (none at all, or one that is not a finite positive number
        of seconds: the median of a list with a NaN in it is whatever sorting left in the middle), or None."""
        s = self.seconds[name]
        bad = sum(not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0) for x in s)
        if not s or bad:
            return (f'{bad} of its {len(s)} pass times not a finite positive number of seconds' if s
                    else 'no pass timed')
        return None

    def images_per_s(self, name: str) -> float:
        return self.batch / statistics.median(self.seconds[name])

    def ratio(self, fast: str, slow: str) -> Dict:
        """Speed of ``fast`` over ``slow`` (> 1: ``fast`` is faster); NO_RATIO when the pass times of either are
        no measurement (``problem``).  The two rows have one entry per round of the same rounds (or one mean each):
        lists of other lengths are a timing loop's fault, raised, never paired up to the shorter one."""
        if self.problem(fast) or self.problem(slow):
            return dict(NO_RATIO)
        pairs = [s / f for f, s in zip(self.seconds[fast], self.seconds[slow], strict=True)]
        return paired(pairs) if self.paired else point(statistics.median(pairs))

    def unsteady(self) -> Dict[str, float]:
        """The rows whose pass times spread more than UNSTEADY_SPREAD (``spread``), with their spread."""
        out = {name: spread(s) for name, s in self.seconds.items()}
        return {name: v for name, v in out.items() if v is not None and v > UNSTEADY_SPREAD}

    def fastest(self, names: Iterable[str]) -> Optional[str]:
        """The row with the most images/s among ``names`` (None if there are none)."""
        names = list(names)
        return max(names, key=self.images_per_s) if names else None
