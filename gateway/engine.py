"""The gateway's domain core: the distributed model and batched generation.

``Engine`` owns the gateway's model (HF modules with RemoteExperts in the sparse
layers), the tokenizer and the expert clients. ``generate_batch`` runs HF's own
``generate`` on it, so greedy search, sampling and the KV cache are exactly HF's.
No gRPC types here; servicers translate.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from gateway.config import GatewayConfig
from gateway.dispatch import ExpertClients
from gateway.dispatch_stats import DecodeLayerCalls
from gateway.forecasts import PassObserver
from gateway.membership import resolve
from gateway.replicas import ReplicaManager
from gateway.replication import Sharing, sharing_of, standby_needed
from gateway.model import load_gateway_model, remote_experts
from moe_common import model_source
from moe_common.batching import pad_right
from moe_common.errors import FailedPrecondition, InvalidArgument, NotFound
from moe_common.placement import home_placement
from moe_common.serving import wait_for_serving
from moe_common.traces import TraceInfo, TraceWriter

log = logging.getLogger(__name__)

# on_token(row, token_id, finish_reason or None)
TokenCallback = Callable[[int, int, "str | None"], None]


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters a batch must share (max_new_tokens may differ per row)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps all tokens
    top_p: float = 1.0
    seed: int | None = None

    MIN_TEMPERATURE = 1e-3  # below it softmax overflows to inf/nan in fp32

    def normalized(self) -> "Sampling":
        """Validated; greedy requests drop the sampling fields (they are ignored, and must
        not keep greedy requests from sharing a batch)."""
        if not self.do_sample:
            return Sampling()
        if not (math.isfinite(self.temperature) and self.temperature >= self.MIN_TEMPERATURE):
            raise InvalidArgument(f"temperature must be finite and >= {self.MIN_TEMPERATURE}, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class RowResult:
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"


class _RowLimits(StoppingCriteria):
    """Stops each row at its own max_new_tokens (HF's max_new_tokens is per batch), or
    when stop_row(row) says its client went away."""

    def __init__(self, limits: list[int], stop_row: Callable[[int], bool] | None):
        self.limits = torch.tensor(limits)
        self.stop_row = stop_row

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - 1  # minus the decoder start token
        done = torch.full((input_ids.shape[0],), generated) >= self.limits
        if self.stop_row is not None:
            done |= torch.tensor([self.stop_row(r) for r in range(input_ids.shape[0])])
        return done.to(input_ids.device)


class _RowStreamer(BaseStreamer):
    """Collects generated tokens per row and reports each one as it is produced."""

    def __init__(self, limits: list[int], eos_token_id: int, on_token: TokenCallback | None):
        self.limits = limits
        self.eos = eos_token_id
        self.on_token = on_token
        self.rows = [RowResult([], "length") for _ in limits]
        self.done = [limit == 0 for limit in limits]
        self.started = False

    def put(self, value):
        if not self.started:  # generate() first puts the decoder start tokens [B, 1]
            self.started = True
            return
        for row, token in enumerate(value.tolist()):
            if self.done[row]:
                continue
            result = self.rows[row]
            result.token_ids.append(token)
            reason = None
            if token == self.eos:
                reason = "eos"
            elif len(result.token_ids) >= self.limits[row]:
                reason = "length"
            if reason:
                result.finish_reason = reason
                self.done[row] = True
            if self.on_token is not None:
                self.on_token(row, token, reason)

    def end(self):
        pass


class Engine:
    """The distributed Switch Transformer as the gateway runs it."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.source = model_source.resolve(config.model, config.cache_dir)
        self.device = torch.device(config.device)
        self.model, self.tokenizer, self.layers = load_gateway_model(self.source, getattr(torch, config.dtype),
                                                                     self.device)
        mc = self.model.config
        self.num_experts: int = mc.num_experts
        self.vocab_size: int = mc.vocab_size
        self.pad_token_id: int = mc.pad_token_id
        self.eos_token_id: int = mc.eos_token_id
        # No servers yet: connect() makes the first view, from --expert-servers or discovery.
        self.clients = ExpertClients(
            [], [], self.source.model_id, config.wire_dtype, config.expert_timeout_s, config.replica_policy, config.tls,
            config.transport,
        )
        self.clients.group_cost = config.replica_group_cost
        self.clients.transport.local_lane = config.local_lane
        for module in remote_experts(self.model):
            module.clients = self.clients
        self.decode_calls = DecodeLayerCalls()  # GetStatus expert_path.decode_layer_calls / decode_tokens
        for module in remote_experts(self.model.decoder):
            # Not a forward hook: any hook sends every call of the module through torch's slow path.
            module.on_call = self.decode_calls.add
        self.compute: dict[str, tuple[str, float]] = {}  # address -> (compute domain, share): check_server
        self.forward_ns = 0  # wall time of generate_batch, summed (GetStatus expert_path.forward_ns)
        self.observer: PassObserver | None = None
        self.replicas: ReplicaManager | None = None
        if config.predictor or config.record_traces or config.replication != "off" or config.redundancy > 1:
            info = TraceInfo.from_config(self.model.config, self.source)
            writer = TraceWriter(config.record_traces, info) if config.record_traces else None
            self.observer = PassObserver(self.model, info, config.predictor, config.predictor_timeout_ms, writer,
                                         config.tls)

    def connect(self) -> None:
        """Wait for every expert server, check it runs our model, and assign home experts."""
        servers = self.config.expert_servers or self._discover_first()
        for address in servers:
            wait_for_serving(address, self.config.startup_timeout_s, tls=self.config.tls)
        slots = [self.check_server(address) for address in servers]
        if self.config.replication != "off" and self.config.replica_sharing == "auto" and self.sharing(servers):
            log.info("expert servers share hardware (compute domain, share: %s): the replica planner counts "
                     "each host's or GPU's combined work, not only the slowest server",
                     [self.compute[a] for a in servers])
        home = home_placement(len(self.layers), self.num_experts, len(servers))
        self.clients.swap(self.clients.make_view(servers, home, slots))
        t0 = time.monotonic()
        loaded = self.clients.assign_home_experts(self.config.startup_timeout_s)
        held = sum(len(row) for row in home)
        # Idempotent: a restarted gateway adopts servers that hold their experts already.
        log.info("expert servers hold their home experts (%.1f s: %d loaded, %d adopted); replica slots %s",
                 time.monotonic() - t0, loaded, held - loaded, self.clients.view.slots)
        if self.observer is not None:
            self.observer.warm_up(min(self.config.startup_timeout_s, 60.0))
        if self.config.replication == "off" and self.config.redundancy == 1:
            self.clients.clear_replicas()  # nothing will manage a previous gateway's replicas: free their memory
        # Otherwise the first plan (or the standbys) tells every server its replica set; those
        # it holds already stay loaded. Until a server confirms, none of its replicas is used.
        if self.config.replication != "off" or self.config.redundancy > 1:
            self.replicas = ReplicaManager(self.clients, self.observer.info, self.config.replication,
                                           self.config.replication_window, self.config.replication_min_gain,
                                           redundancy=self.config.redundancy, forecaster=self.observer.forecast_batch,
                                           sharing=self.sharing if self.config.replica_sharing == "auto" else None)
            self.observer.replicas = self.replicas
            if self.config.redundancy > 1:
                view = self.clients.view
                needed = standby_needed(view.home, self.config.redundancy, len(view.addresses))
                if len(self.replicas.standby(view)) < needed:
                    raise FailedPrecondition(
                        f"--redundancy {self.config.redundancy} needs {needed} standby replicas, but the expert servers "
                        f"have replica slots {view.slots}: raise their --replica-memory")
                self.replicas.send_standby()

    def _discover_first(self) -> list[str]:
        """Wait until --expert-discovery resolves to at least one expert server."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not (servers := resolve(self.config.expert_discovery)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.config.expert_discovery} resolved to no expert server "
                                   f"in {self.config.startup_timeout_s:.0f} s")
            time.sleep(self.config.membership_interval_s)
        log.info("discovered expert servers %s from %s", servers, self.config.expert_discovery)
        return servers

    def check_server(self, address: str) -> int:
        """Check that an expert server runs this gateway's model; returns its replica slots."""
        info = self.clients.info(address, timeout_s=30)
        if info.model_id != self.source.model_id:
            raise FailedPrecondition(
                f"expert server {address} serves model {info.model_id} ({info.model_source}); "
                f"the gateway runs {self.source.model_id} ({self.source.spec})"
            )
        # Which servers take turns on the same hardware: the replica planner's Sharing.
        # An older server that does not say is a domain of its own.
        self.compute[address] = ((info.compute_domain, info.compute_share) if info.compute_domain else (address, 1.0))
        return info.replica_slots

    def sharing(self, addresses: list[str]) -> Sharing | None:
        """How the servers at `addresses` share hardware (gateway.replication.sharing_of);
        None when no host is oversubscribed."""
        domains, shares = zip(*(self.compute.get(a, (a, 1.0)) for a in addresses)) if addresses else ((), ())
        return sharing_of(list(domains), list(shares))

    def close(self) -> None:
        if self.replicas is not None:
            self.replicas.close()
        if self.observer is not None:
            self.observer.close()
        self.clients.close()

    # ---- requests ----

    def check_model_name(self, name: str) -> None:
        if name and name != self.config.model_name:
            raise NotFound(f"model {name!r} is not served here; this gateway serves {self.config.model_name!r}")

    def prompt_ids(self, prompts: list[str], token_ids: list[list[int]]) -> list[list[int]]:
        """Validate a request's prompts and return their encoder token ids."""
        if prompts and token_ids:
            raise InvalidArgument("give prompts as text or as token ids, not both")
        if not prompts and not token_ids:
            raise InvalidArgument("the request has no prompts")
        count = len(prompts) or len(token_ids)
        if count > self.config.max_prompts_per_request:
            raise InvalidArgument(f"the request has {count} prompts; the maximum is {self.config.max_prompts_per_request}")
        if prompts:
            ids = [list(x) for x in self.tokenizer(list(prompts))["input_ids"]]
        else:
            ids = [list(x) for x in token_ids]
        limit = self.config.max_input_tokens
        for i, row in enumerate(ids):
            if not row:
                raise InvalidArgument(f"prompt {i} has no tokens")
            if len(row) > limit:
                raise InvalidArgument(f"prompt {i} has {len(row)} tokens; the maximum is {limit}")
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidArgument(f"prompt {i} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def max_new_tokens(self, requested: int | None, field: str = "max_new_tokens") -> int:
        """Validate a requested token budget (`field` names it as the client knows it)."""
        if requested is None:
            return self.config.default_max_new_tokens
        if requested < 0:
            raise InvalidArgument(f"{field} must be >= 0, got {requested}")
        if requested > self.config.max_new_tokens_limit:
            raise InvalidArgument(f"{field} {requested} exceeds this gateway's limit of {self.config.max_new_tokens_limit}")
        return requested

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- the model ----

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad rows as the HF tokenizer does -> (input_ids [B, S], attention_mask [B, S])."""
        return pad_right(rows, self.pad_token_id)

    def upcoming(self, rows: list[list[int]]) -> None:
        """The prompts (token ids) queued to run in the next batch: predictive replication
        forecasts and plans them while the current batch runs. Returns at once."""
        if rows and self.replicas is not None and self.replicas.mode == "predictive":
            self.replicas.upcoming(self.pad(rows)[0])

    @torch.inference_mode()
    def generate_batch(self, rows: list[list[int]], limits: list[int], sampling: Sampling,
                       on_token: TokenCallback | None = None,
                       stop_row: Callable[[int], bool] | None = None) -> list[RowResult]:
        """Generate for a batch of prompts (token ids) with per-row max_new_tokens.

        on_token(row, token, finish_reason) hears every token as it is made; stop_row(row)
        True ends a row early (its client went away). Returns the results per row.
        """
        streamer = _RowStreamer(limits, self.eos_token_id, on_token)
        if max(limits) == 0:
            return streamer.rows
        input_ids, attention_mask = (t.to(self.device) for t in self.pad(rows))
        kwargs = dict(
            max_new_tokens=max(limits),
            stopping_criteria=StoppingCriteriaList([_RowLimits(limits, stop_row)]),
            streamer=streamer,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
        )
        if sampling.do_sample:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            else:
                torch.seed()
        else:
            kwargs.update(do_sample=False)
        t0 = time.perf_counter_ns()
        try:
            self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.forward_ns += time.perf_counter_ns() - t0
        return streamer.rows

    @torch.inference_mode()
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """One teacher-forced forward pass -> logits [B, T, vocab] (on the CPU)."""
        return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                          decoder_input_ids=decoder_input_ids.to(self.device)).logits.cpu()
