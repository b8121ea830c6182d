"""Home placement: which expert server is home to each logical expert.

Pure functions over plain lists; no I/O.
"""

from __future__ import annotations


def home_placement(num_layers: int, num_experts: int, num_servers: int) -> list[list[int]]:
    """home[l][e] = index of the home server of expert e of sparse layer l.

    Experts go round-robin, so every server holds floor or ceil(E / N) experts of
    each layer. The start rotates with the layer so that, when N does not divide E,
    the extra experts do not always land on server 0.
    """
    if num_servers < 1:
        raise ValueError("need at least one expert server")
    return [[(e + layer) % num_servers for e in range(num_experts)] for layer in range(num_layers)]


def experts_of_server(home: list[list[int]], server: int) -> list[tuple[int, int]]:
    """All (layer, expert) pairs whose home is `server`, in (layer, expert) order."""
    return [(layer, e) for layer, row in enumerate(home) for e, s in enumerate(row) if s == server]
