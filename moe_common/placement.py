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


def rebalance_home(home: list[list[int]], keep: list[int], num_new: int) -> list[list[int]]:
    """Home placement after servers join or leave, moving as few experts as possible.

    home: the current placement, server indices of the old list. keep: the old servers
    that stay, in their new order (new index i is old server keep[i]); num_new servers
    join after them (new indices len(keep)..). Returns the new placement in new indices:
    every server holds floor or ceil(E / N) experts of each layer, as home_placement
    does, and a staying server keeps as many of its experts as that allows.
    """
    num_servers = len(keep) + num_new
    if num_servers < 1:
        raise ValueError("need at least one expert server")
    new_index = {old: i for i, old in enumerate(keep)}
    result = []
    for row in home:
        num_experts = len(row)
        held: list[list[int]] = [[] for _ in range(num_servers)]  # experts each new server keeps, ascending
        orphans = []
        for e, old in enumerate(row):
            if old in new_index:
                held[new_index[old]].append(e)
            else:
                orphans.append(e)  # home server leaves
        # The ceil quotas go to the servers holding the most already (ties: lower index),
        # so that no staying server gives up an expert it could have kept.
        base, extra = divmod(num_experts, num_servers)
        by_holding = sorted(range(num_servers), key=lambda s: (-len(held[s]), s))
        quota = [base] * num_servers
        for s in by_holding[:extra]:
            quota[s] += 1
        for s in range(num_servers):
            orphans.extend(held[s][quota[s]:])  # an over-full server gives up its last experts
            del held[s][quota[s]:]
        orphans.sort()
        new_row = [-1] * num_experts
        for s in range(num_servers):
            for e in held[s]:
                new_row[e] = s
            while len(held[s]) < quota[s]:
                e = orphans.pop(0)
                held[s].append(e)
                new_row[e] = s
        result.append(new_row)
    return result


def moved_experts(before: list[list[int]], after: list[list[int]], keep: list[int]) -> int:
    """How many logical experts change home server between two placements (see rebalance_home)."""
    old_of_new = dict(enumerate(keep))
    return sum(old_of_new.get(a, -1) != b for row_b, row_a in zip(before, after) for b, a in zip(row_b, row_a))
