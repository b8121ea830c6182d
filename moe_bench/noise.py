"""How much a figure's rounds disagree, against the noise the run measured on itself.

Every configuration runs in several ABBA rounds; so does the single-process model, whose
rounds differ only in when they ran. The spread of its rounds' throughput is the
machine's noise during this run (another process on a busy machine shows up there). A
configuration whose rounds spread more than that cannot be read to better than its
spread, and the report says so instead of printing the figure as if it were solid.
"""

from __future__ import annotations


def spread(rates: list[float]) -> float | None:
    """(max - min) / mean of per-round rates; None with fewer than two rounds (no spread to see)."""
    if len(rates) < 2:
        return None
    mean = sum(rates) / len(rates)
    return (max(rates) - min(rates)) / mean if mean > 0 else None


def noisy(figures: dict[str, list[float]], baseline: list[float], floor: float = 0.05) -> dict[str, float]:
    """The figures (name -> per-round rates) whose spread exceeds the baseline's spread, or
    `floor` when that is smaller (two quiet baseline rounds say little about the noise):
    name -> spread."""
    limit = max(spread(baseline) or 0.0, floor)
    return {name: s for name, rates in figures.items() if (s := spread(rates)) is not None and s > limit}
