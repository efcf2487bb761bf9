"""Accuracy intervals and paired comparisons of two methods on the same items."""
from __future__ import annotations

import dataclasses
import math

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / n`` (95% by default): (low, high). ``(0, 1)`` for n = 0.

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``, which stays inside [0, 1] and is not empty at
    p = 0 or 1, unlike the normal-approximation interval."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"wilson: correct must be in [0, n={n}], got {correct}")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: under "both methods are as good", each discordant item is a win with
    probability 1/2, so p = min(1, 2 · P[Binomial(wins + losses, 1/2) <= min(wins, losses)]). 1 when there are
    no discordant items."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)


@dataclasses.dataclass(frozen=True)
class Paired:
    """Method ``a`` against method ``b`` on the items both answered: ``wins`` (a right, b wrong), ``losses``
    (a wrong, b right), ``ties`` (both right or both wrong), the exact McNemar ``p``, and the accuracy
    ``difference`` a - b with its 95% interval [``low``, ``high``] (``paired_difference``)."""

    a: str
    b: str
    wins: int
    losses: int
    ties: int
    p: float
    difference: float = 0.0
    low: float = 0.0
    high: float = 0.0


def paired(a: str, b: str, right_a: dict[str, bool], right_b: dict[str, bool]) -> Paired:
    """Compare ``a`` and ``b`` on the item ids both dicts hold (id -> whether the method got it right)."""
    shared = right_a.keys() & right_b.keys()
    wins = sum(right_a[i] and not right_b[i] for i in shared)
    losses = sum(right_b[i] and not right_a[i] for i in shared)
    diff = paired_difference(wins, losses, len(shared)) if shared else (0.0, 0.0, 0.0)
    return Paired(a, b, wins, losses, len(shared) - wins - losses, mcnemar_exact(wins, losses), *diff)


def paired_difference(wins: int, losses: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(difference, low, high): accuracy of a minus accuracy of b on ``n`` shared items, (wins - losses) / n,
    with a 95% interval conditional on the d = wins + losses discordant items: the Wilson interval [lo, hi]
    of wins / d maps to d / n · (2 lo - 1) .. d / n · (2 hi - 1). With no discordant item it is (0, 0, 0)."""
    if n <= 0 or wins < 0 or losses < 0 or wins + losses > n:
        raise ValueError(f"paired_difference: expected 0 <= wins + losses <= n with n > 0, got {wins}, {losses}, {n}")
    d = wins + losses
    if d == 0:
        return 0.0, 0.0, 0.0
    lo, hi = wilson(wins, d, z)
    return (wins - losses) / n, d / n * (2 * lo - 1), d / n * (2 * hi - 1)
