"""Cluster simulator: replay recorded routing through the real planner and dispatch code
with measured costs, to project tokens/s and balancedness for more expert servers than
one machine can run.

What it replays: a routing trace the gateway recorded while the benchmark ran
(moe_common/traces.py), batch by batch and pass by pass. Per batch it plans replicas
exactly as the gateway does (gateway.replicas.planning_loads, then
gateway.replication.plan_replicas). Predictive mode forecasts each batch's encoder
loads with the trained forecaster, as the predictor service does, when the previous
batch starts (the batch was queued behind it: `lookahead`), so its replicas load
while the previous batch runs; without lookahead (one client: nothing is queued) it
plans from the mean loads of the last `window` batches, as the gateway does. Per sparse-layer
call it dispatches with gateway.replication.assign_layer, using only replicas that
are loaded by then (a replica takes `replica_load_s` to load after its plan, one after
another per server, as SetReplicas does).

Cost model (Costs), per layer call:
    server time   T_s = call_s (if it has work) + sum over its expert groups of
                  (group_s + tokens * token_s)
    compute       max(max_s T_s, sum_s T_s / parallel)   (parallel: how many servers
                  compute at once: one per device, or cores / threads on a shared CPU)
    layer time    layer_overhead_s + rpc_overhead_s * (servers with work) + compute
and the whole run takes non_expert_s (gateway attention, norms, routers, LM head,
request handling; measured) plus the layer times. The clock that decides whether a
replica has loaded counts both: each batch's share of non_expert_s is spread over its
layer calls.

Calibration (calibrate): group_s and token_s come from expert_server microbenchmarks
(moe_bench.efficiency) or a file of GPU measurements, scaled so that the simulated
expert compute of mode off at the calibration server count equals the compute the
servers reported there; non_expert_s and the per-call overhead come from that same
run, and the per-RPC part of the overhead from the one-server run. Everything else
(other modes, other server counts) is predicted, and moe-bench prints it beside what
it measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gateway.replicas import planning_loads
from gateway.replication import Sharing, assign_layer, plan_replicas
from moe_common.placement import home_placement
from moe_common.traces import DECODER, ENCODER, Pass, TraceInfo


@dataclass
class Costs:
    group_s: float  # fixed cost of one expert group in a RunExperts call
    token_s: float  # per routed token
    layer_overhead_s: float  # per layer call beyond the slowest server's compute: gather/scatter, ...
    non_expert_s: float  # the rest of the run: everything outside expert layer calls
    replica_load_s: float  # loading one replica
    source: str = ""  # where the expert costs come from (e.g. "cpu, 1 thread", "cuda H200")
    rpc_overhead_s: float = 0.0  # per RPC of a layer call (one per server with work): codec, transport
    # Fixed cost of one server's call on its own device, once per call with work: the
    # grouped kernel's launches, paid in parallel across servers (unlike rpc_overhead_s,
    # which the gateway pays one server after another).
    call_s: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def batches_of(passes: list[Pass]) -> list[list[Pass]]:
    """Passes grouped by batch, in recorded order."""
    out: dict[int, list[Pass]] = {}
    for p in passes:
        out.setdefault(p.batch_id, []).append(p)
    return list(out.values())


def simulate(info: TraceInfo, batches: list[list[Pass]], num_servers: int, mode: str, costs: Costs, *,
             slots: int, policy: str = "whole", window: int = 8, parallel: int | None = None,
             forecaster=None, measured_from: int = 0, min_gain: float = 0.02, lookahead: bool = True,
             group_cost: float = 0.0, plan_sharing: bool = True) -> dict:
    """Replay `batches` on `num_servers` servers in replication `mode`.

    slots: replica slots per server; parallel: servers computing at once (None = all);
    forecaster: predictor_service.forecaster.Forecaster for predictive mode (None: the
    forecast is missing and predictive plans from history, as the gateway would);
    lookahead: each batch was queued while the previous one ran (closed-loop clients
    > 1), so predictive forecasts and plans it then; group_cost: what the gateway's
    --replica-group-cost tells its planner and dispatch (0: as the gateway's default);
    plan_sharing: the planner knows servers share `parallel` (gateway --replica-sharing auto);
    measured_from: batches before it only warm up the planner (as the benchmark's warm-up
    requests do). Returns seconds, balancedness, expert-layer seconds, replica figures.
    """
    num_layers, num_experts = info.num_layers, info.num_experts
    home = home_placement(num_layers, num_experts, num_servers)
    parallel = parallel or num_servers
    # The planner is told what the gateway learns from GetInfo: servers that share cores
    # (gateway.replication.Sharing), so it plans for the same compute bound as above.
    shared = plan_sharing and parallel < num_servers
    sharing = Sharing([0] * num_servers, [1 / parallel] * num_servers) if shared else None
    history: list[np.ndarray] = []
    planned: set[tuple[int, int, int]] = set()
    ready_at: dict[tuple[int, int, int], float] = {}  # replica -> simulated time it is loaded
    clock = 0.0
    layer_s = mean_sum = max_sum = compute_mean_s = 0.0
    layer_s_by_kind = [0.0, 0.0]
    layer_calls = loads_moved = rpcs = 0
    hits = checks = 0
    layer_hits, layer_checks = [0] * num_layers, [0] * num_layers

    def forecast_of(batch: list[Pass]) -> dict[int, np.ndarray] | None:
        encoder = next((p for p in batch if p.kind == ENCODER), None)
        if encoder is None or forecaster is None:
            return None
        import torch

        loads = forecaster.forecast(ENCODER, torch.from_numpy(encoder.tokens).long()).numpy()
        return dict(zip(info.encoder_layers, loads))

    def apply(loads: np.ndarray | None, count: bool) -> None:
        """Plan from `loads` now (at `clock`); new replicas load one after another per server."""
        nonlocal planned, ready_at, loads_moved
        if loads is None:
            return
        plan = plan_replicas(loads.tolist(), home, [slots] * num_servers, policy=policy, previous=planned,
                             min_gain=min_gain, group_cost=group_cost, sharing=sharing)
        if plan.replicas != planned:
            for server in range(num_servers):
                new = sorted(r for r in plan.replicas - planned if r[2] == server)  # layer order, as SetReplicas
                for k, replica in enumerate(new, start=1):
                    ready_at[replica] = clock + k * costs.replica_load_s
                loads_moved += len(new) if count else 0
            ready_at = {r: t for r, t in ready_at.items() if r in plan.replicas}
            planned = set(plan.replicas)

    ahead = mode == "predictive" and lookahead and forecaster is not None
    shape = (num_layers, num_experts)
    # Replicas load while the gateway computes too (attention, norms, LM head between the
    # layer calls), so the clock that decides when a replica is ready advances by the
    # non-expert time as well: each batch's share of it, spread over its layer calls.
    non_expert_per_batch = costs.non_expert_s / max(1, len(batches) - measured_from)
    for b, batch in enumerate(batches):
        calls_in_batch = sum(len(info.layers_of(p.kind)) for p in batch)
        gateway_step = non_expert_per_batch / max(1, calls_in_batch)
        measured = b >= measured_from
        if not (ahead and b > 0):  # a batch planned ahead was planned when the previous one started
            apply(planning_loads(mode, history, None, b + 1, window, shape), measured)
        if ahead and b + 1 < len(batches):  # the next batch waits in the queue: forecast and plan it now
            apply(planning_loads(mode, history, forecast_of(batches[b + 1]), b + 2, window, shape), measured)
        actual = np.zeros((num_layers, num_experts))
        for p in batch:
            pass_loads = p.loads(num_experts)
            for j, layer in enumerate(info.layers_of(p.kind)):
                clock += gateway_step
                counts = pass_loads[j].astype(int).tolist()
                actual[layer] += pass_loads[j]
                holders = [[home[layer][e]] for e in range(num_experts)]
                for (pl, e, s), t in ready_at.items():
                    if pl == layer:
                        checks += measured
                        layer_checks[layer] += measured
                        if t <= clock:
                            holders[e].append(s)
                            hits += measured
                            layer_hits[layer] += measured
                chunks = assign_layer(counts, holders, num_servers, policy, group_cost=group_cost)
                server_s = [0.0] * num_servers
                server_tokens = [0] * num_servers
                for parts in chunks:
                    for s, n in parts:
                        if n:
                            server_s[s] += costs.group_s + n * costs.token_s
                            server_tokens[s] += n
                server_s = [t + costs.call_s if t else 0.0 for t in server_s]
                compute = max(max(server_s), sum(server_s) / parallel)
                busy = sum(1 for t in server_tokens if t)
                clock += costs.layer_overhead_s + costs.rpc_overhead_s * busy + compute
                if measured and sum(counts):
                    layer_s += compute
                    layer_s_by_kind[p.kind] += compute
                    compute_mean_s += sum(server_s) / num_servers
                    layer_calls += 1
                    rpcs += busy
                    mean_sum += sum(server_tokens) / num_servers
                    max_sum += max(server_tokens)
        history.append(actual)
    seconds = costs.non_expert_s + layer_calls * costs.layer_overhead_s + rpcs * costs.rpc_overhead_s + layer_s
    return dict(seconds=seconds, expert_layer_s=layer_s, layer_calls=layer_calls, rpcs=rpcs,
                encoder_layer_s=layer_s_by_kind[ENCODER], decoder_layer_s=layer_s_by_kind[DECODER],
                compute_mean_s=compute_mean_s,
                balancedness=mean_sum / max_sum if max_sum else 1.0,
                replicas_loaded=loads_moved, prefetch_hit_rate=hits / checks if checks else 0.0,
                prefetch_hit_rate_by_layer=[h / c if c else 0.0 for h, c in zip(layer_hits, layer_checks)])


def calibrate(cal: dict, group_s: float, token_s: float, replica_load_s: float, source: str,
              one: dict | None = None, simulated_compute_mean_s: float | None = None) -> Costs:
    """Costs from measured runs of mode off, each a dict of its figures over the measured
    span (wall_s, rpc_wall_s, compute_max_s, compute_mean_s, layer_calls, rpcs):
    `cal` at the calibration server count, `one` (optional) with one server.

    group_s and token_s (microbenchmark) are scaled by cal's measured mean compute over
    simulated_compute_mean_s (the simulator's for cal, run with the unscaled costs). The
    time a layer call spends beyond the slowest server's compute is split into a part per
    call and a part per RPC by the two runs (one RPC per call with one server); with
    only `cal` it is all per call.
    """
    scale = cal["compute_mean_s"] / simulated_compute_mean_s if simulated_compute_mean_s else 1.0
    calls = max(1, cal["layer_calls"])
    per_call = max(0.0, cal["rpc_wall_s"] - cal["compute_max_s"]) / calls
    per_rpc = 0.0
    rpcs_per_call = cal["rpcs"] / calls
    if one is not None and rpcs_per_call > 1:
        one_per_call = max(0.0, one["rpc_wall_s"] - one["compute_max_s"]) / max(1, one["layer_calls"])
        per_rpc = max(0.0, (per_call - one_per_call) / (rpcs_per_call - 1))
    return Costs(group_s=group_s * scale, token_s=token_s * scale,
                 layer_overhead_s=max(0.0, per_call - per_rpc * rpcs_per_call),
                 non_expert_s=max(0.0, cal["wall_s"] - cal["rpc_wall_s"]),
                 replica_load_s=replica_load_s, source=source, rpc_overhead_s=per_rpc)


def skew(info: TraceInfo, batches: list[list[Pass]], kind: int | None = None) -> float:
    """Busiest expert's tokens over the fair share (tokens / experts), averaged over layer
    calls (of passes of `kind` only, when given)."""
    ratios = []
    for batch in batches:
        for p in batch:
            if kind is not None and p.kind != kind:
                continue
            for row in p.loads(info.num_experts):
                if row.sum():
                    ratios.append(row.max() / (row.sum() / info.num_experts))
    return float(np.mean(ratios)) if ratios else 1.0
