"""Replica management in the gateway: decide a plan per batch and move weights.

Modes (--replication):
  off         static home placement, no replicas.
  reactive    plan before each batch from the previous batch's actual loads.
  window      plan every `window` batches from the mean loads of the last `window`
              batches, as history-based balancers (DeepSeek's EPLB in vLLM/SGLang) do.
  predictive  plan each batch from the predictor's forecast of its encoder loads, made
              while the PREVIOUS batch runs: the batcher hands over the token ids of
              the requests queued next (`upcoming`), and their forecast, plan and
              SetReplicas happen before that batch starts, so its replicas are loading
              or ready when it needs them. Decoder layers use the mean loads of the
              last `window` batches (decoder steps are forecast one step at a time).
              A batch nobody was queued for (the queue was empty) is planned from
              that window mean too.
The plan comes from plan_replicas (pure, gateway/replication.py). Nothing here runs
on the request path but bookkeeping: forecasts, plans and SetReplicas calls run on a
PlanWorker thread (gateway/plan_worker.py), dispatch uses a replica only once its
server confirmed it loaded, and replicas the new plan drops stop being used at once.
Each server's new replicas go out layer by layer (replication.prefetch_stages: one
SetReplicas per layer with new replicas, sent when the previous one is answered), so
the first layers' replicas are ready, and used, before the deeper layers' are loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import grpc
import numpy as np
import torch

from gateway.dispatch import ExpertClients
from gateway.plan_worker import PlanWorker
from gateway.views import ServerView
from gateway.replication import Sharing, plan_replicas, prefetch_stages, standby_needed, standby_replicas
from moe_common.traces import Pass, TraceInfo
from moe_protos.moe.expert.v1 import expert_pb2

log = logging.getLogger(__name__)
MODES = ("off", "reactive", "window", "predictive")


def planning_loads(mode: str, history: list[np.ndarray], forecast: dict[int, np.ndarray] | None, batch: int,
                   window: int, shape: tuple[int, int]) -> np.ndarray | None:
    """The loads [L, E] to plan batch number `batch` (1-based) from, or None to keep the
    current replicas. history: actual loads [L, E] of the previous batches, oldest first;
    forecast: layer -> expected load [E] of this batch (predictive only). Pure: the
    gateway and the simulator (moe_bench/simulator.py) both plan with it.

    reactive plans from the last batch, window from the mean of the last `window` batches
    (every `window` batches), predictive from the forecast for the layers it covers (the
    encoder's) and, for the others, from the mean of the last `window` batches: a decoder
    layer sees only batch x new tokens per batch, so one batch is a noisy estimate."""
    if mode == "off" or (not history and not (mode == "predictive" and forecast)):
        return None
    if mode == "window" and (batch - 1) % window != 0:
        return None
    if not history:
        loads = np.zeros(shape)  # predictive, first batch: the forecast is all there is
    elif mode in ("window", "predictive"):
        loads = np.mean(history[-window:], axis=0)
    else:
        loads = history[-1].copy()
    if mode == "predictive" and forecast:
        for layer, load in forecast.items():
            loads[layer] = load
    return loads


class ReplicaManager:
    def __init__(self, clients: ExpertClients, info: TraceInfo, mode: str, window: int = 8, min_gain: float = 0.02,
                 planner=plan_replicas, redundancy: int = 1,
                 forecaster: Callable[[torch.Tensor], dict[int, np.ndarray] | None] | None = None,
                 sharing: Callable[[list[str]], Sharing | None] | None = None):
        if mode not in MODES:
            raise ValueError(f"replication mode must be one of {MODES}")
        self.clients = clients
        self.info = info
        self.mode = mode
        self.window = window
        self.min_gain = min_gain
        self.planner = planner  # plan_replicas; tests inject a wrapper to force interleavings
        self.redundancy = redundancy  # standby replicas: every logical expert on this many servers
        # input_ids [B, S] -> layer -> expected load [E], or None (PassObserver.forecast_batch);
        # called on the worker thread only, so its deadline never delays a batch.
        self.forecaster = forecaster
        # addresses -> how those servers share hardware (Engine.sharing); None: they do not.
        self.sharing = sharing
        self.worker = PlanWorker()
        self._lock = threading.Lock()  # batches, history and _ahead: the batcher and request threads
        self._ahead: torch.Tensor | None = None  # input_ids [B, S] of queued prompts planned ahead
        self.lookahead_plans = 0  # batches planned from their forecast while the previous batch ran
        self.request_path_ns = 0  # time batches spent in batch_started (bookkeeping only)
        self._standby: tuple[ServerView, set] | None = None  # standby replicas of the last view asked for
        self.batches = 0
        self.plans = 0
        self.kept_plans = 0
        self.bytes_moved = 0
        self.failures = 0  # SetReplicas calls that failed and replicas refused (under clients.replica_lock)
        self.planning_ms: deque = deque(maxlen=1000)
        self.last_plan = None
        self._history: deque = deque(maxlen=max(1, window))  # per batch: loads [L, E]
        self._current = np.zeros((info.num_layers, info.num_experts))

    # ---- inputs ----

    def observe(self, p: Pass, loads: np.ndarray) -> None:
        """Actual loads [Lp, E] of a pass of the current batch."""
        for j, layer in enumerate(self.info.layers_of(p.kind)):
            self._current[layer] += loads[j]

    def batch_started(self, input_ids: torch.Tensor) -> bool:
        """A batch starts its encoder pass over input_ids [B, S] (the batcher's thread, on
        the request path): close the previous batch's loads and hand this batch's plan to
        the worker, unless `upcoming` already planned these very prompts while the
        previous batch ran. Never waits: not for a forecast, nor for planning. Returns
        whether these prompts were planned ahead."""
        t0 = time.perf_counter_ns()
        with self._lock:
            if self.batches > 0:
                self._history.append(self._current)
            self._current = np.zeros_like(self._current)
            self.batches += 1
            batch = self.batches
            ahead = self._ahead
            planned_ahead = ahead is not None and ahead.shape == input_ids.shape and torch.equal(ahead, input_ids.cpu())
            if planned_ahead:
                self._ahead = None
                self.lookahead_plans += 1
            history = list(self._history)
        if not planned_ahead:
            self.worker.submit(lambda: self._plan_for(batch, history, None))
        self.request_path_ns += time.perf_counter_ns() - t0
        return planned_ahead

    def upcoming(self, input_ids: torch.Tensor) -> None:
        """The requests queued to run next are known: input_ids [B, S] of that batch (on
        the CPU, right-padded as its encoder pass will see them). Predictive mode
        forecasts their loads and plans on the worker while the current batch runs; the
        batch whose input_ids match then skips its own plan. Returns at once."""
        if self.mode != "predictive" or self.forecaster is None:
            return
        with self._lock:
            if self._ahead is not None and self._ahead.shape == input_ids.shape and torch.equal(self._ahead, input_ids):
                return  # these prompts are planned already
            self._ahead = input_ids
            batch = self.batches + 1  # for the log: the batch after the last one started
            history = list(self._history)
        self.worker.submit(lambda: self._plan_for(batch, history, input_ids))

    def _plan_for(self, batch: int, history: list[np.ndarray], input_ids: torch.Tensor | None) -> None:
        """Plan batch number `batch` (on the worker thread) and send the prefetches.
        Replicas only speed serving up: a failure here is logged, never a batch's."""
        try:
            forecast = self.forecaster(input_ids) if input_ids is not None else None
            loads = planning_loads(self.mode, history, forecast, batch, self.window, self._current.shape)
            if loads is None:
                self.send_standby()  # a restarted server lost its standbys: send them again
                return
            # In flight on one view, so that a membership change waits for the plan to be
            # sent before it closes the channels of servers that left.
            with self.clients.using_view() as view:
                self._plan(view, loads, batch)
        except Exception:  # noqa: BLE001 - the batch runs on home placement and ready replicas anyway
            with self.clients.replica_lock:
                self.failures += 1
            log.exception("replica planning failed for batch %d; serving without a new plan", batch)

    def close(self) -> None:
        self.worker.close()

    def _plan(self, view: ServerView, loads: np.ndarray, batch: int) -> None:
        t0 = time.perf_counter()
        sharing = self.sharing(view.addresses) if self.sharing is not None else None
        plan = self.planner(loads.tolist(), view.home, view.slots, policy=self.clients.policy,
                            previous=view.planned, min_gain=self.min_gain, standby=self.standby(view),
                            group_cost=self.clients.group_cost, sharing=sharing)
        self.planning_ms.append((time.perf_counter() - t0) * 1e3)
        self.plans += 1
        self.kept_plans += plan.kept_previous
        self.last_plan = plan
        added, dropped = len(plan.replicas - view.planned), len(view.planned - plan.replicas)
        log.info("batch %d (%s): %d replicas (+%d -%d%s), forecast makespan %.0f vs %.0f without, planned in %.1f ms; "
                 "so far balancedness %.3f, tokens per server %s, prefetch hits %d/%d",
                 batch, self.mode, len(plan.replicas), added, dropped, ", previous kept" if plan.kept_previous else "",
                 plan.makespan, plan.baseline_makespan, self.planning_ms[-1],
                 self.clients.balancedness(), self.clients.tokens_per_server(view),
                 self.clients.stats.planned_ready, self.clients.stats.planned_checks)
        if not plan.kept_previous or plan.replicas != view.planned or len(view.synced) < len(view.addresses):
            self._apply(view, plan.replicas)

    # ---- standby replicas (--redundancy) ----

    def standby(self, view: ServerView) -> set[tuple[int, int, int]]:
        """The standby replicas of a view (gateway.replication.standby_replicas)."""
        if self.redundancy <= 1:
            return set()
        if self._standby is None or self._standby[0] is not view:
            standby = standby_replicas(view.home, self.redundancy, view.slots)
            needed = standby_needed(view.home, self.redundancy, len(view.addresses))
            if len(standby) < needed:
                log.warning("redundancy %d needs %d standby replicas; the slots %s hold %d", self.redundancy, needed,
                            view.slots, len(standby))
            self._standby = (view, standby)
        return self._standby[1]

    def send_standby(self) -> None:
        """Send the current view's standby replicas to servers that lack them (start-up, a
        membership change, a restarted server). Replica failures are logged, never raised."""
        if self.redundancy <= 1:
            return
        try:
            with self.clients.using_view() as view:
                standby = self.standby(view)
                if not standby <= view.planned or len(view.synced) < len(view.addresses):
                    self._apply(view, view.planned | standby)
        except Exception:  # noqa: BLE001 - standbys are insurance, not the request path
            with self.clients.replica_lock:
                self.failures += 1
            log.exception("sending standby replicas failed; retrying before the next batch")

    # ---- moving weights ----

    def _apply(self, view: ServerView, replicas: set[tuple[int, int, int]]) -> None:
        clients = self.clients
        changed = []
        with clients.replica_lock:
            for s in range(len(view.addresses)):
                want = {(layer, e) for layer, e, srv in replicas if srv == s}
                had = {(layer, e) for layer, e, srv in view.planned if srv == s}
                # Replicas the plan drops stop being used now, before the server evicts them.
                view.ready[s] &= want
                # A server new to this view may still hold replicas of an earlier one: tell it.
                if want != had or s not in view.synced:
                    # Layer by layer (prefetch_stages), so the first layers' replicas are ready
                    # first; in one call to a server whose holdings are unknown, so no stage
                    # evicts a replica it already holds.
                    stages = prefetch_stages(want, had) if s in view.synced else [want]
                    view.replica_sequence[s] += 1
                    view.synced.add(s)
                    changed.append((s, stages, view.replica_sequence[s]))
            view.planned = set(replicas)
        for s, stages, sequence in changed:
            self._send_stage(view, s, sequence, stages)

    def _send_stage(self, view: ServerView, server: int, sequence: int, stages: list[set[tuple[int, int]]]) -> None:
        """Send a server the first of its remaining replica sets; its reply sends the next."""
        ordered = sorted(stages[0])
        request = expert_pb2.SetReplicasRequest(
            replicas=[expert_pb2.ExpertRef(layer=layer, expert=e) for layer, e in ordered],
            model_id=self.clients.model_id,
            # Where to stream a replica from if that server cannot read the checkpoint.
            home_addresses=[view.addresses[view.home[layer][e]] for layer, e in ordered])
        call = view.stubs[server].SetReplicas.future(request, timeout=self.clients.timeout_s * 10)
        call.add_done_callback(lambda f: self._on_loaded(view, server, sequence, f, stages[1:]))

    def _on_loaded(self, view: ServerView, server: int, sequence: int, future,
                   rest: list[set[tuple[int, int]]] = ()) -> None:
        """A SetReplicas reply (on a gRPC callback thread); `rest` are the stages still to
        send. A server whose call failed, or that refused replicas, is sent its replica set
        again before the next batch: the planner usually keeps the same plan, which would
        otherwise never become ready."""
        clients = self.clients
        try:
            reply = future.result()
        except grpc.RpcError as err:
            with clients.replica_lock:
                self.failures += 1
                if sequence == view.replica_sequence[server]:
                    view.synced.discard(server)
            log.warning("SetReplicas on %s failed (%s: %s); sending it again before the next batch",
                        view.addresses[server], err.code().name, err.details())
            return
        ready = {(r.layer, r.expert) for r in reply.ready}
        with clients.replica_lock:
            self.bytes_moved += reply.bytes_loaded
            self.failures += len(reply.failed)
            if sequence != view.replica_sequence[server]:
                return  # a newer SetReplicas was sent to this server: its reply decides
            current = {(layer, e) for layer, e, s in view.planned if s == server}
            view.ready[server] = ready & current
            if reply.failed:
                view.synced.discard(server)
        for f in reply.failed:
            log.warning("expert server %s refused replica %d:%d: %s", view.addresses[server],
                        f.expert.layer, f.expert.expert, f.reason)
        if rest and not reply.failed:
            self._send_stage(view, server, sequence, rest)

    def status(self) -> dict:
        st = self.clients.stats
        return dict(
            mode=self.mode, policy=self.clients.policy, batches=self.batches, plans=self.plans,
            kept_plans=self.kept_plans, replicas_planned=len(self.clients.view.planned),
            replicas_ready=sum(len(r) for r in self.clients.view.ready),
            prefetch_hit_rate=st.planned_ready / st.planned_checks if st.planned_checks else 0.0,
            balancedness=self.clients.balancedness(),
            replica_tokens=st.replica_tokens, bytes_moved=self.bytes_moved, failures=self.failures,
            planning_ms_p50=float(np.median(self.planning_ms)) if self.planning_ms else 0.0,
            forecast_makespan=self.last_plan.makespan if self.last_plan else 0.0,
            forecast_baseline_makespan=self.last_plan.baseline_makespan if self.last_plan else 0.0,
            request_path_ms=self.request_path_ns / 1e6, lookahead_plans=self.lookahead_plans,
            prefetch_hit_rate_by_layer=st.hit_rate_by_layer(self.info.num_layers),
        )

