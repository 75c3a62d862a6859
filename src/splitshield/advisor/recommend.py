"""From a table of cuts to a recommendation: leakage scores, Pareto fronts, budgets and the best cut.

Pure functions of numbers: no model, no data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranking:
    """A leakage measure cuts are ranked by.

    Attributes
    ----------
    column:
        The :class:`~splitshield.advisor.PointAdvice` field holding it.
    higher_leaks:
        Whether a higher value means more leakage (SSIM) or less (the MSE floor).
    label:
        How sentences and plots name it.
    """

    column: str
    higher_leaks: bool
    label: str

    def leak(self, value: float | None) -> float | None:
        """``value`` oriented so that higher always means more leakage (``None`` stays ``None``)."""
        return None if value is None else value if self.higher_leaks else -value


RANKINGS: dict[str, Ranking] = {
    "ssim": Ranking("ssim", True, "fast-attack SSIM"),
    "psnr": Ranking("psnr", True, "fast-attack PSNR (dB)"),
    "ce_floor": Ranking("ce_floor", False, "CE floor (MSE)"),
    "gpz": Ranking("gpz_r2_norm", True, "GPZ R̄²/V"),
}


def strongest_measure(ranking: str | None) -> str:
    """What each cut's strongest fast attack is chosen by: ``psnr`` when the cuts are ranked by PSNR, else
    ``ssim``."""
    return "psnr" if ranking == "psnr" else "ssim"


def pareto_front(costs: Sequence[float], leaks: Sequence[float | None]) -> list[int]:
    """Indices of the cuts no other cut beats on both cost and leakage (lower is better for both).

    Cut j dominates cut i when ``costs[j] <= costs[i]`` and ``leaks[j] <= leaks[i]`` with one of them strict; cuts
    with no leakage value take no part. Equal cuts do not dominate each other, so both stay on the front.
    """
    known = [i for i, leak in enumerate(leaks) if leak is not None]

    def dominated(i: int) -> bool:
        return any(costs[j] <= costs[i] and leaks[j] <= leaks[i] and (costs[j] < costs[i] or leaks[j] < leaks[i])
                   for j in known)

    return [i for i in known if not dominated(i)]


def fixed(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, but whole and without an exponent from 10^digits on:
    0.0123 -> '0.0123', 123.4 -> '123', 3214.6 -> '3,215' (where ``format(value, '.3g')`` gives '3.21e+03').
    Small values keep their exponent (7.9e-07: an MSE floor)."""
    text = f"{value:.{digits}g}"
    return f"{value:,.0f}" if "e+" in text else text


def _over(value: float, limit: float) -> str:
    """``value`` with as many digits as it takes to read as more than ``limit`` (5.004 against 5 -> '5.004')."""
    for digits in range(3, 16):
        text = fixed(value, digits)
        if float(text.replace(",", "")) > limit:
            return text
    return repr(value)


def budget_reasons(head_ms: float, kbytes: float, max_edge_ms: float | None,
                   max_kbytes: float | None) -> list[str]:
    """Which budgets a cut breaks, in words (empty when it meets them all)."""
    reasons = []
    if max_edge_ms is not None and head_ms > max_edge_ms:
        reasons.append(f"head {_over(head_ms, max_edge_ms)} ms > {fixed(max_edge_ms, 6)} ms")
    if max_kbytes is not None and kbytes > max_kbytes:
        reasons.append(f"{_over(kbytes, max_kbytes)} kB > {fixed(max_kbytes, 6)} kB")
    return reasons


def best_cut(leaks: Sequence[float | None], feasible: Sequence[bool], tiebreak: Sequence[tuple]) -> int | None:
    """The feasible cut that leaks least; among equals, the one with the smallest ``tiebreak`` (e.g. fewer head
    multiply-adds, fewer bytes). ``None`` when no feasible cut has a leakage value."""
    candidates = [i for i, leak in enumerate(leaks) if leak is not None and feasible[i]]
    if not candidates:
        return None
    return min(candidates, key=lambda i: (leaks[i], *tiebreak[i], i))
