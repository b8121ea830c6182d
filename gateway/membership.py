"""Expert servers joining and leaving a running gateway.

A membership change runs in three steps, so that no request waits for weights and
none fails because of the change:

  1. load   every server of the new membership loads the home experts it gains and
            keeps those it loses (it holds old and new home sets); requests keep
            running on the old placement meanwhile.
  2. swap   the new ServerView (gateway/dispatch.py) becomes current: the next layer
            call uses the new placement.
  3. drain  once no layer call runs on the old view, servers drop the experts they
            lost, and a server that left is told to hold nothing (it may then exit).

Home placement moves as few logical experts as possible (moe_common.placement.
rebalance_home). Replicas start over with the new view: the replica manager's next
plan sends every server its replica set. Changes run one at a time.

Where changes come from:
  - MembershipService.AddExpertServer / RemoveExpertServer (operators, moe-serve,
    an expert server started with --register-with);
  - discovery: a DNS name re-resolved every interval (a Kubernetes headless Service,
    a compose service): new addresses join;
  - the health watch: a member that answers NOT_SERVING (it is shutting down) leaves
    gracefully; one unreachable for evict_after_s is removed without draining
    (failover: its experts are loaded from the checkpoint on the others).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.dispatch import ExpertClients, ServerView
from moe_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, MoEError, NotFound, Unavailable
from moe_common.placement import moved_experts, rebalance_home
from moe_common.serving import wait_for_serving

log = logging.getLogger(__name__)


@dataclass
class Change:
    """What one membership change did (MembershipChange on the wire)."""

    servers: list[str]
    experts_moved: int
    load_s: float
    drain_s: float
    total_s: float


def resolve(target: str) -> list[str]:
    """host:port -> sorted "ip:port" of every IPv4 address the name resolves to now.
    A headless Service or a compose service name resolves to one address per member."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"discovery target must be host:port, not {target!r}")
    try:
        infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        return []  # no member yet (e.g. no pod is ready): not an error
    return sorted({f"{info[4][0]}:{info[4][1]}" for info in infos})


class Membership:
    """Adds and removes expert servers of a running Engine; runs the discovery and health watch."""

    def __init__(self, engine):
        self.engine = engine
        self.config = engine.config  # GatewayConfig: expert_discovery, membership_interval_s, evict_after_s, ...
        self.clients: ExpertClients = engine.clients
        self.changes: list[Change] = []
        self._lock = threading.Lock()  # one change at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable_since: dict[str, float] = {}
        self._join_failed_at: dict[str, float] = {}  # discovered addresses that could not join, when

    # ---- changes ----

    def add(self, address: str) -> Change:
        """Add a SERVING expert server of this model and move its share of experts to it."""
        address = address.strip()
        if not address or ":" not in address:
            raise InvalidArgument(f"expert server address must be host:port, not {address!r}")
        with self._lock:
            view = self.clients.view
            if address in view.addresses:
                raise AlreadyExists(f"expert server {address} is already a member")
            try:
                wait_for_serving(address, self.config.join_timeout_s, tls=self.config.tls)
            except TimeoutError as exc:
                raise Unavailable(f"expert server {address} is not SERVING: {exc}") from None
            slots = self.engine.check_server(address)
            keep = list(range(len(view.addresses)))
            return self._change(view, keep, [address], [*view.slots, slots], leaving=[])

    def remove(self, address: str, graceful: bool = True) -> Change:
        """Remove a member. Graceful: it keeps serving until its experts are loaded elsewhere
        and no call uses it. Not graceful (it died): its experts move without its help."""
        with self._lock:
            view = self.clients.view
            if address not in view.addresses:
                raise NotFound(f"expert server {address} is not a member (members: {', '.join(view.addresses)})")
            if len(view.addresses) == 1:
                raise FailedPrecondition(f"expert server {address} is the last member; add another before removing it")
            gone = view.addresses.index(address)
            keep = [s for s in range(len(view.addresses)) if s != gone]
            return self._change(view, keep, [], [view.slots[s] for s in keep], leaving=[address], graceful=graceful)

    def _change(self, old: ServerView, keep: list[int], joining: list[str], slots: list[int],
                leaving: list[str], graceful: bool = True) -> Change:
        t0 = time.monotonic()
        addresses = [old.addresses[s] for s in keep] + joining
        home = rebalance_home(old.home, keep, len(joining))
        new = self.clients.make_view(addresses, home, slots)
        before = {a: set(old.experts_of(s)) for s, a in enumerate(old.addresses)}
        after = {a: set(new.experts_of(s)) for s, a in enumerate(new.addresses)}
        moved = moved_experts(old.home, home, keep)
        timeout = self.config.startup_timeout_s
        log.info("membership: %s; %d experts move", ", ".join([*(f"+{a}" for a in joining), *(f"-{a}" for a in leaving)]),
                 moved)
        # 1. load: old and new home sets (a server still serves the old placement until the swap).
        self.clients.assign_many({a: before.get(a, set()) | after[a] for a in addresses if not after[a] <= before.get(a, set())},
                         timeout)
        t_load = time.monotonic()
        # 2. swap. 3. drain the old view, then drop what moved away.
        self.clients.swap(new)
        if not self.clients.wait_drained(old, timeout_s=2 * self.clients.timeout_s):
            log.warning("membership: layer calls on the old placement still running after %.0f s; dropping anyway",
                        2 * self.clients.timeout_s)
        t_drain = time.monotonic()
        # Best effort: the new placement already serves; a server that fails here only holds
        # experts it no longer needs (and the watch evicts it if it died).
        try:
            self.clients.assign_many({a: after[a] for a in addresses if before.get(a, set()) - after[a]}, timeout)
        except MoEError as exc:
            log.warning("membership: dropping moved experts failed: %s", exc)
        for address in leaving:
            if graceful:
                try:  # hold nothing: a server waiting to shut down may exit now
                    self.clients.assign_experts(address, [], timeout_s=30)
                except MoEError as exc:
                    log.info("membership: %s did not take its empty expert set: %s", address, exc)
            self.clients.close_channel(address)
            self._unreachable_since.pop(address, None)
        change = Change(addresses, moved, t_load - t0, t_drain - t_load, time.monotonic() - t0)
        self.changes.append(change)
        log.info("membership: now %d expert servers (%s); load %.2f s, drain %.2f s, total %.2f s",
                 len(addresses), ", ".join(addresses), change.load_s, change.drain_s, change.total_s)
        return change

    # ---- discovery and health watch ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="membership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.config.membership_interval_s):
            try:
                self.check_once()
            except Exception:  # noqa: BLE001 - the watch must outlive any one failure
                log.exception("membership watch failed; retrying")

    def check_once(self) -> None:
        """One round of the watch: join discovered servers, remove leaving or dead ones."""
        now = time.monotonic()
        if self.config.expert_discovery:
            for address in resolve(self.config.expert_discovery):
                if address in self.clients.view.addresses or now - self._join_failed_at.get(address, -1e9) < 10:
                    continue
                try:
                    self.add(address)
                except MoEError as exc:
                    self._join_failed_at[address] = now
                    log.warning("membership: discovered %s could not join: %s", address, exc)
        for address in list(self.clients.view.addresses):
            status = self._health(address)
            if status == health_pb2.HealthCheckResponse.SERVING:
                self._unreachable_since.pop(address, None)
                continue
            try:
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    if not self.clients.info(address).draining:
                        continue  # restarting at the same address: it comes back SERVING
                    log.info("membership: %s is shutting down; removing it", address)
                    self.remove(address, graceful=True)
                else:
                    since = self._unreachable_since.setdefault(address, now)
                    if now - since >= self.config.evict_after_s:
                        log.warning("membership: %s unreachable for %.0f s; moving its experts to the others",
                                    address, now - since)
                        self.remove(address, graceful=False)
            except (NotFound, FailedPrecondition, Unavailable) as exc:
                log.debug("membership: not removing %s now: %s", address, exc)

    def _health(self, address: str):
        """SERVING, NOT_SERVING, or None when it does not answer."""
        try:
            with self.config.tls.channel(address) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
        except grpc.RpcError:
            return None
