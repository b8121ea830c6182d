"""Replica planning and token dispatch: pure policies over plain lists, no I/O.

Glossary. A *logical expert* (l, e) is expert e of sparse layer l. Its *home server*
home[l][e] always holds it; a *replica* is a copy on another server; a server's
replica *slots* are how many replicas fit in its memory budget. The *holders* of a
logical expert are its home server and the servers with a ready replica. A *plan* is
the set of replicas (l, e, server) to hold. A *forecast* is the expected tokens per
logical expert, loads[l][e].

Dispatch has two policies:
  "whole"  every logical expert's tokens go to ONE holder (largest experts first, each to
           the holder that finishes it soonest). Each expert still sees exactly the tokens
           HF gives it, in one matmul of the same shape, so outputs stay bit-identical to
           the single-process model. Default.
  "split"  an expert's tokens are split in contiguous chunks over its holders (water-filling
           on current load), so even one very hot expert spreads out. Matmuls of other
           shapes round differently (up to ~2e-6 on outputs of scale 1 for small chunks on
           CPU, benchmarks/exactness.py): outputs match HF only to float
           tolerance, like a different batch composition does in HF itself. Chunk
           sizes rounded to multiples of 4, 16 or 64 rows do not make it exact on
           CPU: whether a chunk's rows equal the whole matmul's depends on the
           whole group's size too (seen for 100 and 844 rows, not for 37 or 257).
  "auto"   per layer call, "whole" when its slowest server finishes within
           AUTO_TOLERANCE (5%) of the "split" assignment's slowest, else "split". A
           layer call that ran whole is bit-identical; one that split rounds as
           "split" does. Few large experts (6 experts on 4 servers, or one very hot
           expert) split; evenly loaded layers stay whole.
The planner models the same policy, so replicas go where the dispatcher can use them.
Times are (tokens + groups x group_cost) / speed, with speed in tokens per unit time
(1.0 = the reference server) and group_cost the fixed cost of one expert group in
tokens' worth: 0 by default; on a launch-bound GPU one group costs as much as ~190
tokens (benchmarks/results/h200/h200-expert-costs.json), so splitting an expert over k holders
costs k - 1 more groups, and split only splits where that still pays.

*Redundancy* K keeps every logical expert on K servers: its home and K-1 *standby*
replicas (standby_replicas), planned before any hot replica and never dropped, so a
crashed server's experts already have ready holders. The dispatcher uses standbys
like any replica, so they also balance load.

A *suspect* server is one whose last layer call failed (it crashed, or the network
did); it is not a holder until it answers its health checks again. A logical expert
whose holders are all suspect gets a *stand-in*: a healthy server that loads it on
demand and computes it in its place (choose_stand_ins), whole, so outputs stay
bit-identical.

Servers that share hardware (several expert servers on one host's CPUs) are one
*compute domain*: a layer cannot finish before the busiest domain has
done all its servers' work, whatever the balance between them. `Sharing` adds that
bound to the planner's layer time, so it does not move weights to balance servers
that would only take turns on the same cores (4 one-thread servers on a 2-core host).
"""

from __future__ import annotations

from dataclasses import dataclass

Replica = tuple[int, int, int]  # (layer, expert, server)
POLICIES = ("whole", "split", "auto")
AUTO_TOLERANCE = 0.05  # "auto" keeps a layer whole when it is at most this much slower than split


# ---------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------

def assign_layer(counts: list[int], holders: list[list[int]], num_servers: int, policy: str = "whole",
                 speeds: list[float] | None = None, group_cost: float = 0.0) -> list[list[tuple[int, int]]]:
    """Which server computes which tokens of each expert of one layer.

    counts[e]: tokens routed to expert e; holders[e]: servers holding e, home first.
    Returns chunks[e] = [(server, n), ...] in token order (contiguous runs), sum n = counts[e].
    Experts whose only holder is their home go first (no choice); then the rest,
    largest first, each to the holder(s) that finish soonest. "auto" returns the
    "whole" assignment unless "split" finishes more than AUTO_TOLERANCE sooner.
    group_cost: the fixed cost of one expert group, in tokens (see the module docstring).
    """
    speeds = speeds or [1.0] * num_servers
    if policy == "auto":
        whole = assign_layer(counts, holders, num_servers, "whole", speeds, group_cost)
        if all(len(h) == 1 for h, n in zip(holders, counts) if n):
            return whole  # no expert with a choice of holders: split would be the same
        split = assign_layer(counts, holders, num_servers, "split", speeds, group_cost)

        def slowest(chunks):
            return max(server_times(chunks, num_servers, speeds, group_cost))

        return whole if slowest(whole) <= (1 + AUTO_TOLERANCE) * slowest(split) else split
    if policy not in POLICIES:
        raise ValueError(f"dispatch policy must be one of {POLICIES}, got {policy!r}")
    busy = [0.0] * num_servers  # tokens assigned so far, per server
    chunks: list[list[tuple[int, int]]] = [[] for _ in counts]
    flexible = []
    for e, n in enumerate(counts):
        if n == 0:
            continue
        if len(holders[e]) == 1:
            chunks[e] = [(holders[e][0], n)]
            busy[holders[e][0]] += n + group_cost
        else:
            flexible.append(e)
    flexible.sort(key=lambda e: (-counts[e], e))
    for e in flexible:
        if policy == "whole":
            best = min(holders[e], key=lambda s: ((busy[s] + counts[e]) / speeds[s], holders[e].index(s)))
            chunks[e] = [(best, counts[e])]
            busy[best] += counts[e] + group_cost
        else:
            # A holder pays one group for its chunk: water-fill from busy + group_cost, so a
            # holder whose start would already be later than the level gets nothing (and no group).
            shares = _waterfill([busy[s] + group_cost for s in holders[e]], [speeds[s] for s in holders[e]], counts[e])
            chunks[e] = [(s, n) for s, n in zip(holders[e], shares) if n > 0]
            for s, n in chunks[e]:
                busy[s] += n + group_cost
    return chunks


def choose_stand_ins(orphans: list[tuple[int, int]], candidates: list[int], busy: list[int],
                     held: list[int]) -> dict[int, int]:
    """A stand-in server for each orphaned expert of one layer: an expert whose every
    holder is suspect (gateway/dispatch.py loads it on the stand-in and runs it there).

    orphans: [(expert, tokens)]; candidates: healthy server indices; busy[s]: tokens
    server s already computes in this layer call; held[s]: experts s holds (memory).
    Largest expert first, each to the candidate with the fewest tokens, then the fewest
    experts held, then the lowest index. Returns {expert: server}. Pure.
    """
    if not candidates:
        return {}
    busy, held = list(busy), list(held)
    chosen = {}
    for expert, n in sorted(orphans, key=lambda o: (-o[1], o[0])):
        s = min(candidates, key=lambda c: (busy[c], held[c], c))
        chosen[expert] = s
        busy[s] += n
        held[s] += 1
    return chosen


def _free_after(replicas: set[Replica], slots: list[int]) -> list[int]:
    free = list(slots)
    for _, _, s in replicas:
        free[s] -= 1
    return free


def _waterfill(busy: list[float], speeds: list[float], amount: int) -> list[int]:
    """Integer shares of `amount` that level (busy + share) / speed as far as possible.

    Continuous level T solves sum max(0, T * speed - busy) = amount; shares are floored and
    the remainder goes, one token each, to whoever then finishes soonest (ties: list order).
    """
    order = sorted(range(len(busy)), key=lambda i: busy[i] / speeds[i])
    level = 0.0
    for k in range(1, len(order) + 1):
        members = order[:k]
        level = (amount + sum(busy[i] for i in members)) / sum(speeds[i] for i in members)
        if k == len(order) or level <= busy[order[k]] / speeds[order[k]]:
            break
    shares = [max(0, int(level * speeds[i] - busy[i])) if i in members else 0 for i in range(len(busy))]
    for _ in range(amount - sum(shares)):
        i = min(range(len(busy)), key=lambda j: ((busy[j] + shares[j] + 1) / speeds[j], j))
        shares[i] += 1
    return shares


def server_loads(chunks: list[list[tuple[int, int]]], num_servers: int) -> list[int]:
    """Tokens per server of one layer's assignment."""
    loads = [0] * num_servers
    for runs in chunks:
        for s, n in runs:
            loads[s] += n
    return loads


def server_times(chunks: list[list[tuple[int, int]]], num_servers: int, speeds: list[float],
                 group_cost: float = 0.0) -> list[float]:
    """Time per server of one layer's assignment: (tokens + groups x group_cost) / speed."""
    times = [0.0] * num_servers
    for runs in chunks:
        for s, n in runs:
            times[s] += n + group_cost
    return [t / speeds[s] for s, t in enumerate(times)]


@dataclass(frozen=True)
class Sharing:
    """Which servers compete for the same hardware. domain[s]: the compute domain of
    server s (an index; servers with the same one share a host's CPUs or a GPU);
    share[s]: the fraction of its domain server s keeps busy when it runs alone (its
    threads over the host's cores, at most 1; 0 on a GPU, whose launch-bound expert
    groups leave room for other servers' kernels: moe_common/hardware.py).
    A server that takes t alone does t x share of its domain's work."""

    domain: list[int]
    share: list[float]

    def busiest(self, times: list[float]) -> float:
        """The work of the busiest domain when its servers take `times` alone."""
        work: dict[int, float] = {}
        for s, t in enumerate(times):
            work[self.domain[s]] = work.get(self.domain[s], 0.0) + t * self.share[s]
        return max(work.values(), default=0.0)

    def span(self, times: list[float]) -> float:
        """Time of one layer whose servers take `times` alone: the slowest server, or the
        busiest domain's work, whichever is longer."""
        return max(max(times, default=0.0), self.busiest(times))


def sharing_of(domains: list[str], shares: list[float]) -> Sharing | None:
    """The Sharing of servers with these compute domains (any string; equal strings
    share) and shares, or None when no domain is oversubscribed (its shares sum to at
    most 1): then the slowest server bounds every layer and the planner needs nothing
    more. Pure."""
    index: dict[str, int] = {}
    domain = [index.setdefault(d, len(index)) for d in domains]
    total = [0.0] * len(index)
    for d, x in zip(domain, shares):
        total[d] += x
    if all(t <= 1.0 + 1e-9 for t in total):
        return None
    return Sharing(domain, [min(1.0, max(0.0, x)) for x in shares])


def span(times: list[float], sharing: Sharing | None) -> float:
    """One layer's time from its servers' times alone (Sharing.span; the slowest server without sharing)."""
    return sharing.span(times) if sharing is not None else max(times, default=0.0)


def balancedness(loads: list[list[float]]) -> float:
    """vLLM's definition over layers l and servers r: sum_l mean_r n[l][r] / sum_l max_r n[l][r].
    1.0 is perfect; 1.0 also when nothing was routed."""
    total_max = sum(max(row) for row in loads)
    if total_max == 0:
        return 1.0
    return sum(sum(row) / len(row) for row in loads) / total_max


# ---------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------

def standby_replicas(home: list[list[int]], k: int, slots: list[int]) -> set[Replica]:
    """K-1 standby replicas of every logical expert, each on the next servers after its
    home in ring order (home + 1, home + 2, ... mod n), skipping a server whose slots are
    full; as balanced as the home placement. Fewer when slots or servers run out:
    compare the size with standby_needed(). Pure."""
    n = len(slots)
    free = list(slots)
    out: set[Replica] = set()
    for layer, row in enumerate(home):
        for e, h in enumerate(row):
            placed = 0
            for step in range(1, n):
                if placed == k - 1:
                    break
                s = (h + step) % n
                if free[s] > 0:
                    out.add((layer, e, s))
                    free[s] -= 1
                    placed += 1
    return out


def standby_needed(home: list[list[int]], k: int, num_servers: int) -> int:
    """How many standby replicas redundancy k needs (k - 1 per logical expert, at most
    one per server other than the home)."""
    return sum(len(row) for row in home) * min(k - 1, num_servers - 1)


@dataclass
class Plan:
    replicas: set[Replica]
    makespan: float  # forecast: sum over layers of the slowest server's time
    baseline_makespan: float  # the same with no replicas
    kept_previous: bool = False  # the previous plan was kept: the new one gained too little


def prefetch_stages(want: set[tuple[int, int]], had: set[tuple[int, int]]) -> list[set[tuple[int, int]]]:
    """The replica sets to send one server one after another, so that the replicas of the
    first layers are ready first (they are needed first: the encoder's first sparse layer
    runs milliseconds into a batch, the decoder's last one much later).

    want, had: (layer, expert) the server is to hold and held until now. Stage k holds the
    wanted replicas of layers up to the k-th layer that has new ones, plus every wanted
    replica it holds already (so no stage evicts one a later stage would load again);
    the last stage is `want`. One stage when the new replicas are all in one layer. Pure.
    """
    new_layers = sorted({layer for layer, _ in want - had})
    if len(new_layers) <= 1:
        return [set(want)]
    kept = want & had
    return [{r for r in want if r[0] <= layer} | kept for layer in new_layers]


def holders_of(home: list[list[int]], replicas: set[Replica]) -> list[list[list[int]]]:
    """holders[l][e] = [home server, replica servers in ascending order]."""
    out = [[[s] for s in row] for row in home]
    for layer, e, s in sorted(replicas):
        if s not in out[layer][e]:
            out[layer][e].append(s)
    return out


def layer_time(loads: list[float], holders: list[list[int]], num_servers: int, policy: str,
               speeds: list[float], group_cost: float = 0.0, sharing: Sharing | None = None) -> float:
    """Forecast time of one layer: its slowest server under the dispatch policy (or its
    busiest compute domain, with `sharing`)."""
    counts = [max(0, int(round(x))) for x in loads]
    return span(server_times(assign_layer(counts, holders, num_servers, policy, speeds, group_cost), num_servers,
                             speeds, group_cost), sharing)


def makespan(loads: list[list[float]], home: list[list[int]], replicas: set[Replica], num_servers: int,
             policy: str = "whole", speeds: list[float] | None = None, group_cost: float = 0.0,
             sharing: Sharing | None = None) -> float:
    speeds = speeds or [1.0] * num_servers
    holders = holders_of(home, replicas)
    return sum(layer_time(loads[layer], holders[layer], num_servers, policy, speeds, group_cost, sharing)
               for layer in range(len(loads)))


def plan_replicas(loads: list[list[float]], home: list[list[int]], slots: list[int], *, policy: str = "whole",
                  speeds: list[float] | None = None, previous: set[Replica] | None = None, min_gain: float = 0.02,
                  candidates_per_layer: int = 4, targets_per_candidate: int = 4,
                  standby: set[Replica] = frozenset(), group_cost: float = 0.0,
                  sharing: Sharing | None = None) -> Plan:
    """Choose replicas that make the forecast makespan smallest within each server's slots.

    Greedy: repeatedly add the single replica with the largest makespan reduction (ties:
    the largest relief of that layer's slowest server, which crosses plateaus where
    several servers are equally slow), trying for each layer its `candidates_per_layer`
    most loaded experts on that layer's slowest server, copied to one of the
    `targets_per_candidate` least loaded servers with a free slot. Stops when no replica
    helps.
    Hysteresis: if `previous` (trimmed to the slots) forecasts within min_gain (a share
    of the no-replica makespan) of the new plan, it is kept, so weights do not churn.
    `standby` replicas (standby_replicas) are in every plan, kept or new, and take their
    slots first; the rest go to hot experts.
    `sharing` (sharing_of) bounds each layer by its busiest compute domain too: a replica
    pays only while the slowest server, not the shared hardware, bounds its layer.
    """
    num_servers = len(slots)
    speeds = speeds or [1.0] * num_servers
    if len(speeds) != num_servers:
        raise ValueError("one speed per server")
    num_layers = len(loads)
    plan: set[Replica] = set(standby)
    free = _free_after(standby, slots)
    if min(free, default=0) < 0:
        raise ValueError("standby replicas exceed a server's slots")
    baseline = makespan(loads, home, set(), num_servers, policy, speeds, group_cost, sharing)
    holders = holders_of(home, plan)
    times = [layer_time(loads[layer], holders[layer], num_servers, policy, speeds, group_cost, sharing)
             for layer in range(num_layers)]

    def best_for_layer(layer: int) -> tuple[tuple[float, float], Replica | None]:
        """The best replica for this layer and its (makespan gain, slowest server's gain).
        The second part lets the greedy cross plateaus: when several servers tie as the
        slowest, no single replica shortens the layer, but relieving one of them is progress."""
        counts = [max(0, int(round(x))) for x in loads[layer]]
        per_server = server_times(assign_layer(counts, holders[layer], num_servers, policy, speeds, group_cost),
                                  num_servers, speeds, group_cost)
        slowest = max(range(num_servers), key=lambda s: (per_server[s], -s))
        # When shared hardware bounds the layer, relieving one server is no progress.
        plateaus = sharing is None or sharing.busiest(per_server) < per_server[slowest] - 1e-9
        on_slowest = sorted((e for e in range(len(counts)) if slowest in holders[layer][e] and counts[e] > 0),
                            key=lambda e: (-counts[e], e))[:candidates_per_layer]
        # Copies go to the least loaded servers with a free slot: under either policy a
        # busier target relieves less. Trying only a few keeps planning fast at 64 servers.
        targets = sorted((s for s in range(num_servers) if free[s] > 0), key=lambda s: (per_server[s], s))
        best_gain, best = (0.0, 0.0), None
        for e in on_slowest:
            for s in [t for t in targets if t not in holders[layer][e]][:targets_per_candidate]:
                trial = [list(h) for h in holders[layer]]
                trial[e].append(s)
                after = server_times(assign_layer(counts, trial, num_servers, policy, speeds, group_cost),
                                     num_servers, speeds, group_cost)
                gain = (times[layer] - span(after, sharing), per_server[slowest] - after[slowest])
                progress = gain[0] > 1e-9 or (plateaus and gain[0] > -1e-9 and gain[1] > 1e-9)
                if progress and (best is None or gain > best_gain):
                    best_gain, best = gain, (layer, e, s)
        return best_gain, best

    best = {layer: best_for_layer(layer) for layer in range(num_layers)}
    while True:
        layer = max(best, key=lambda k: (best[k][0], -k))
        (gain, _), replica = best[layer]
        if replica is None:
            break
        _, e, s = replica
        if free[s] <= 0 or s in holders[layer][e]:  # a slot another layer took meanwhile
            best[layer] = best_for_layer(layer)
            continue
        plan.add(replica)
        free[s] -= 1
        holders[layer][e].append(s)
        times[layer] -= gain
        best[layer] = best_for_layer(layer)
        for other in best:  # their best may have used the slot just taken
            if other != layer and best[other][1] is not None and free[best[other][1][2]] <= 0:
                best[other] = best_for_layer(other)
    new = Plan(plan, sum(times), baseline)

    if previous:
        kept, used = set(standby), [slots[s] - f for s, f in enumerate(_free_after(standby, slots))]
        for r in sorted(set(previous) - set(standby)):
            layer, e, s = r
            if layer < num_layers and e < len(home[layer]) and s != home[layer][e] and used[s] < slots[s]:
                kept.add(r)
                used[s] += 1
        old_span = makespan(loads, home, kept, num_servers, policy, speeds, group_cost, sharing)
        if old_span <= baseline and old_span - new.makespan < min_gain * baseline:
            return Plan(kept, old_span, baseline, kept_previous=True)
    return new
