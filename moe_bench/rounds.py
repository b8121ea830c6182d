"""The order in which moe-bench measures its configurations (pure; exact-value tests).

A *configuration* is (expert servers, mode); the single-process model is (0, MONOLITHIC).
Every configuration serves an interleaved share of the measured requests in each of
`rounds` rounds. Round r runs the configurations forward when r is even and backward when
it is odd (ABBA: with two rounds the single-process model runs first and last, the
one-server run twice in the middle), so a drift of the machine's speed over the run
hits every configuration alike and each ratio is against a baseline measured around it.
"""

from __future__ import annotations

MONOLITHIC = "monolithic"


def configurations(counts: list[int], modes: list[str], one_server: bool) -> list[tuple[int, str]]:
    """The single-process model, then every mode at every server count, then one expert
    server in mode off (the disaggregation overhead) when asked and not already a count."""
    configs = [(0, MONOLITHIC)] + [(n, m) for n in counts for m in modes]
    if one_server and 1 not in counts:
        configs.append((1, "off"))
    return configs


def abba_order(configs: list[tuple[int, str]], rounds: int) -> list[tuple[tuple[int, str], int]]:
    """(configuration, round index) in the order they run: forward in even rounds,
    backward in odd ones."""
    return [(c, r) for r in range(rounds) for c in (configs if r % 2 == 0 else configs[::-1])]


def server_segments(steps: list[tuple[tuple[int, str], int]]) -> list[tuple[int, list[tuple[str, int]]]]:
    """Consecutive steps on the same server count, as (count, [(mode, round), ...]): one
    start of that many expert servers serves each segment (count 0: the single-process model)."""
    out: list[tuple[int, list[tuple[str, int]]]] = []
    for (n, mode), r in steps:
        if out and out[-1][0] == n:
            out[-1][1].append((mode, r))
        else:
            out.append((n, [(mode, r)]))
    return out
