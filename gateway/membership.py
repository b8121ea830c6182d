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
    (failover: its experts are loaded from the checkpoint on the others), together
    with every other member that is unreachable too (to_evict), since experts placed
    on a dead member could never load.

Changes wait until the gateway has connected to its first servers (a join that
arrives during start-up is applied after it, not overwritten by it). While a change
runs, the gateway keeps calling a leaving server's health service, so a server that
drains ("no calls for a while: nobody uses me") does not exit while its experts
are still being loaded elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.connections import call_result
from gateway.dispatch import ExpertClients
from gateway.metrics import METRICS
from gateway.views import ServerView
from moe_common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, MoEError, NotFound, Unavailable
from moe_common.integrity import CheckpointDigests
from moe_protos.moe.expert.v1 import expert_pb2
from moe_common.placement import moved_experts, rebalance_home
from moe_common.serving import wait_for_serving

log = logging.getLogger(__name__)
CHANGES_KEPT = 32  # GetStatus reports this many recent changes
JOIN_RETRY_S = 10.0  # a discovered address that failed to join is tried again after this long
ANNOUNCE_TIMEOUT_S = 5.0  # deadline of telling an unchanged member the new member list
START_DIGEST_SAMPLE = 8  # home experts per server whose digests are checked when the gateway starts


@dataclass
class Change:
    """What one membership change did (MembershipChange on the wire)."""

    servers: list[str]
    experts_moved: int
    load_s: float
    drain_s: float
    total_s: float


def to_evict(unreachable_since: dict[str, float], now: float, evict_after_s: float, confirm_s: float) -> list[str]:
    """The members to evict together now, given when each unreachable member was first
    found unreachable: none until one has been unreachable for evict_after_s; then it,
    and every other member unreachable for at least confirm_s too (one missed check is
    not enough). Pure. Sorted by address."""
    if not any(now - since >= evict_after_s for since in unreachable_since.values()):
        return []
    return sorted(a for a, since in unreachable_since.items() if now - since >= min(confirm_s, evict_after_s))


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
        self.changes: deque[Change] = deque(maxlen=CHANGES_KEPT)  # the most recent ones
        self.changes_total = 0
        self._lock = threading.Lock()  # one change at a time
        self._connected = threading.Event()  # the engine has its first view (start())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable_since: dict[str, float] = {}  # member -> when it first missed a health check
        self._join_failed_at: dict[str, float] = {}  # discovered addresses that could not join, when
        self._last_warning: dict[str, str] = {}  # address -> last "not removing" reason logged
        # Expert digests of the gateway's own checkpoint: a joining server must hold these weights.
        self.digests = CheckpointDigests(engine.source.path, engine.layers)

    # ---- changes ----

    @contextlib.contextmanager
    def _changing(self):
        """One change at a time, and none before the engine connected to its first servers."""
        if not self._connected.wait(self.config.startup_timeout_s):
            raise Unavailable("the gateway is still starting (connecting to its first expert servers); retry later")
        with self._lock:
            yield

    def add(self, address: str) -> Change:
        """Add a SERVING expert server of this model and move its share of experts to it."""
        address = address.strip()
        if not address or ":" not in address:
            raise InvalidArgument(f"expert server address must be host:port, not {address!r}")
        with self._changing():
            view = self.clients.view
            if address in view.addresses:
                raise AlreadyExists(f"expert server {address} is already a member")
            try:
                wait_for_serving(address, self.config.join_timeout_s, tls=self.config.tls)
            except TimeoutError as exc:
                raise Unavailable(f"expert server {address} is not SERVING: {exc}") from None
            slots = self.engine.check_server(address)
            keep = list(range(len(view.addresses)))
            self._unreachable_since.pop(address, None)
            return self._change(view, keep, [address], [*view.slots, slots], leaving=[])

    def remove(self, address: str, graceful: bool = True) -> Change:
        """Remove a member. Graceful: it keeps serving until its experts are loaded elsewhere
        and no call uses it. Not graceful (it died): its experts move without its help."""
        return self.remove_many([address], graceful)

    def remove_many(self, addresses: list[str], graceful: bool = True) -> Change:
        """Remove several members in one change (their experts go to the others only)."""
        with self._changing():
            view = self.clients.view
            missing = [a for a in addresses if a not in view.addresses]
            if missing:
                raise NotFound(f"expert server {', '.join(missing)} is not a member (members: {', '.join(view.addresses)})")
            keep = [s for s, a in enumerate(view.addresses) if a not in addresses]
            if not keep:
                which = "the last member" if len(addresses) == 1 else "every member"
                raise FailedPrecondition(f"expert server {', '.join(addresses)} is {which}; add another before removing it")
            return self._change(view, keep, [], [view.slots[s] for s in keep], leaving=list(addresses), graceful=graceful)

    def _change(self, old: ServerView, keep: list[int], joining: list[str], slots: list[int],
                leaving: list[str], graceful: bool = True) -> Change:
        t0 = time.monotonic()
        addresses = [old.addresses[s] for s in keep] + joining
        home = rebalance_home(old.home, keep, len(joining))
        before = {a: old.held_by(s) for s, a in enumerate(old.addresses)}  # home experts and stand-ins
        moved = moved_experts(old.home, home, keep)
        timeout = self.config.startup_timeout_s
        log.info("membership: %s; %d experts move", ", ".join([*(f"+{a}" for a in joining), *(f"-{a}" for a in leaving)]),
                 moved)
        # A leaving server drains until nobody calls it: call it while its experts load elsewhere.
        with self._keeping_alive(leaving if graceful else []):
            try:
                new = self.clients.make_view(addresses, home, slots)
                after = {a: set(new.experts_of(s)) for s, a in enumerate(new.addresses)}
                # 1. load: old and new home sets (a server still serves the old placement until the swap).
                # Each call also names the new members: the only addresses a server fetches replicas from.
                gaining = {a: before.get(a, set()) | after[a] for a in addresses if not after[a] <= before.get(a, set())}
                self.clients.assign_many(gaining, timeout, members=addresses)
                for address in joining:  # a rogue server is refused before it serves a token
                    self.check_digests(address, after[address])
            except BaseException:
                self.clients.retain_members()  # close the channels opened for joiners
                raise
            t_load = time.monotonic()
            # 2. swap. 3. drain the old view, then drop what moved away.
            self.clients.swap(new)
            if not self.clients.wait_drained(old, timeout_s=2 * self.clients.timeout_s):
                log.warning("membership: layer calls on the old placement still running after %.0f s; dropping anyway",
                            2 * self.clients.timeout_s)
            t_drain = time.monotonic()
        if self.engine.replicas is not None:
            self.engine.replicas.send_standby()  # --redundancy: the new placement's standbys
        # Best effort: the new placement already serves; a server that fails here only holds
        # experts it no longer needs (and the watch evicts it if it died).
        try:
            self.clients.assign_many({a: after[a] for a in addresses if before.get(a, set()) - after[a]}, timeout)
        except MoEError as exc:
            log.warning("membership: dropping moved experts failed: %s", exc)
        # Servers that neither gained nor lost learn the new members too (their expert set is
        # unchanged, so the call is instant); best effort with a short deadline, so a member
        # that hangs cannot hold up the change: it keeps the old list and fetches less.
        quiet = {a: after[a] for a in addresses if a not in gaining and not before.get(a, set()) - after[a]}
        for address, exc in self.clients.assign_each(quiet, ANNOUNCE_TIMEOUT_S)[1].items():
            log.info("membership: %s did not take the new member list: %s", address, exc)
        for address in leaving:
            if graceful:
                try:  # hold nothing: a server waiting to shut down may exit now
                    self.clients.assign_experts(address, [], timeout_s=30)
                except MoEError as exc:
                    log.info("membership: %s did not take its empty expert set: %s", address, exc)
            self._unreachable_since.pop(address, None)
        self.clients.retain_members()  # close the channels of servers that left
        change = Change(addresses, moved, t_load - t0, t_drain - t_load, time.monotonic() - t0)
        self.changes.append(change)
        self.changes_total += 1
        METRICS.membership_changed("join" if joining else "leave" if graceful else "evict")
        log.info("membership: now %d expert servers (%s); load %.2f s, drain %.2f s, total %.2f s",
                 len(addresses), ", ".join(addresses), change.load_s, change.drain_s, change.total_s)
        return change

    def check_digests(self, address: str, experts) -> None:
        """FAILED_PRECONDITION unless the server at `address` holds exactly the checkpoint's
        weights for `experts` (digests it computes from what it loaded; moe_common/integrity.py)."""
        experts = sorted(experts)
        if not experts:
            return
        with self.clients.connections.stub_for_call(address) as stub:
            reply = call_result(address, stub.GetExpertDigests.future(expert_pb2.GetExpertDigestsRequest(
                experts=[expert_pb2.ExpertRef(layer=layer, expert=e) for layer, e in experts],
                model_id=self.clients.model_id), timeout=self.config.join_timeout_s))
        got = {(d.expert.layer, d.expert.expert): d.sha256 for d in reply.digests}
        if reply.dtype not in ("float32", "float16", "bfloat16"):
            raise FailedPrecondition(f"expert server {address} reports weights in dtype {reply.dtype!r}")
        bad = [k for k in experts if got.get(k) != self.digests.digest(k, reply.dtype)]
        if bad:
            raise FailedPrecondition(
                f"expert server {address} holds expert weights that differ from the gateway's checkpoint "
                f"({len(bad)} of {len(experts)} checked, e.g. expert {bad[0][1]} of sparse layer {bad[0][0]}): "
                "refused")
        log.info("membership: %s holds the checkpoint's weights (%d experts checked)", address, len(experts))

    def check_members_sample(self, per_server: int = START_DIGEST_SAMPLE, seed: int | None = None) -> None:
        """At start: digests of a random sample of each member's home experts (reading and
        hashing every expert of a big checkpoint would delay the start by minutes); a server
        that fails is named in the FAILED_PRECONDITION and the gateway does not start."""
        rng = random.Random(seed)
        view = self.clients.view
        for s, address in enumerate(view.addresses):
            experts = sorted(view.experts_of(s))
            self.check_digests(address, rng.sample(experts, min(per_server, len(experts))))

    @contextlib.contextmanager
    def _keeping_alive(self, addresses: list[str]):
        """Call the health service of `addresses` every membership interval while the block runs."""
        if not addresses:
            yield
            return
        done = threading.Event()

        def ping():
            while not done.wait(self.config.membership_interval_s):
                for address in addresses:
                    self._health(address)

        thread = threading.Thread(target=ping, name="membership-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    # ---- discovery and health watch ----

    def start(self) -> None:
        """The engine has connected: changes may run, and the watch starts."""
        self._connected.set()
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
        self._join_failed_at = {a: t for a, t in self._join_failed_at.items() if now - t < JOIN_RETRY_S}
        if self.config.expert_discovery:
            for address in resolve(self.config.expert_discovery):
                if address in self.clients.view.addresses or address in self._join_failed_at:
                    continue
                try:
                    self.add(address)
                except MoEError as exc:
                    self._join_failed_at[address] = now
                    log.warning("membership: discovered %s could not join: %s", address, exc)
        members = list(self.clients.view.addresses)
        # Only members are tracked: an address that left (by any thread) starts afresh if it re-joins.
        self._unreachable_since = {a: t for a, t in self._unreachable_since.items() if a in members}
        self._last_warning = {a: w for a, w in self._last_warning.items() if a in members}
        leaving = []
        for address in members:
            checked_at = time.monotonic()
            status = self._health(address)
            if status == health_pb2.HealthCheckResponse.SERVING:
                self._unreachable_since.pop(address, None)
                try:
                    self.clients.clear_suspect(address, checked_at)
                except MoEError as exc:
                    log.info("membership: %s answers health checks but not yet calls: %s", address, exc)
            elif status == health_pb2.HealthCheckResponse.NOT_SERVING:
                self._unreachable_since.pop(address, None)
                try:
                    if self.clients.info(address).draining:
                        leaving.append(address)  # else restarting at the same address: it comes back SERVING
                except MoEError:
                    pass  # gone meanwhile: the next round sees it unreachable
            else:
                self._unreachable_since.setdefault(address, now)
        dead = to_evict(self._unreachable_since, now, self.config.evict_after_s, self.config.membership_interval_s)
        if dead:
            longest = max(now - self._unreachable_since[a] for a in dead)
            log.warning("membership: %s unreachable (for up to %.0f s); moving their experts to the others",
                        ", ".join(dead), longest)
            self._try(dead, lambda: self.remove_many(dead, graceful=False))
        for address in leaving:
            log.info("membership: %s is shutting down; removing it", address)
            self._try([address], lambda a=address: self.remove(a, graceful=True))

    def _try(self, addresses: list[str], change) -> None:
        """Run a change of the watch; a failure is logged (once per reason) and retried next round."""
        try:
            change()
        except MoEError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            for address in addresses:
                if self._last_warning.get(address) != reason:
                    self._last_warning[address] = reason
                    log.warning("membership: not removing %s now (retrying every round): %s", address, reason)

    def _health(self, address: str):
        """SERVING, NOT_SERVING, or None when it does not answer."""
        try:
            with self.config.tls.channel(address) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
        except grpc.RpcError:
            return None
