"""The expert store: the logical experts this server holds and the FFN that runs them.

Plain torch, no gRPC. An expert is the Switch FFN ``wo(act(wi(x)))`` with no biases.
The store checks each call and runs it with one of the kernels of expert_server/kernels.py:
``exact`` (the ops of HF's SwitchTransformersDenseActDense, so that the distributed
model reproduces the single-process one exactly) or ``grouped`` (one grouped GEMM per
projection over the layer's stacked experts; opt-in, not bit-exact).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from expert_server.kernels import KERNELS, StackedLayer, run_exact, run_grouped, stack_layer
from moe_common.checkpoint import Checkpoint, SparseLayer, sparse_layers
from moe_common.errors import FailedPrecondition, InvalidArgument, NotFound
from moe_common.model_source import ModelSource

log = logging.getLogger(__name__)

ExpertKey = tuple[int, int]  # (sparse layer, expert)


class _Held(dict):
    """The weight dict of one moment, {(layer, expert): (wi, wo)}, with the grouped kernel's
    stacks built from it ({layer: StackedLayer}, each on first use).

    Never changed once published: every change of what is held publishes a new one, so a
    run keeps the weights and stacks it started with, and a stack can never be stale.
    """

    __slots__ = ("stacks", "lock")

    def __init__(self, weights: dict, previous: _Held | None = None):
        super().__init__(weights)
        self.stacks: dict[int, StackedLayer] = {}
        self.lock = threading.Lock()  # one build per layer, not one per concurrent call
        # Keep the stacks of layers the change left alone: restacking a layer copies all its weights.
        # copy(): a run may be adding a stack to `previous` meanwhile (one C call, atomic under the GIL).
        kept = previous.stacks.copy() if previous is not None else {}
        if kept:
            by_layer: dict[int, dict] = {}
            for (layer, expert), w in self.items():
                by_layer.setdefault(layer, {})[expert] = w
            for layer, stacked in kept.items():
                if stacked.built_from(by_layer.get(layer, {})):
                    self.stacks[layer] = stacked


class ExpertStore:
    """Holds expert weights of some logical experts and runs them.

    Two kinds of experts are held: home experts (assign()) and replicas of other
    servers' experts (set_replicas(), within `replica_memory` bytes). Thread-safe:
    RunExperts calls read a snapshot of the weight dict; changes build a new dict and
    swap it in, so running experts are never blocked by loading.

    kernel: "exact" or "grouped" (expert_server/kernels.py). group_executor "threads"
    runs the groups of an exact call concurrently, "streams" (CUDA) issues them on four
    CUDA streams; grouped runs a call as one GEMM per projection and ignores it.
    """

    def __init__(self, source: ModelSource, device: str = "cpu", dtype: str = "float32",
                 group_executor: str = "sequential", replica_memory: int = 0, kernel: str = "exact"):
        if kernel not in KERNELS:
            raise ValueError(f"expert kernel must be one of {KERNELS}, not {kernel!r}")
        from transformers import SwitchTransformersConfig
        from transformers.activations import ACT2FN

        self.source = source
        self.config = SwitchTransformersConfig.from_pretrained(source.path)
        self.layers: list[SparseLayer] = sparse_layers(self.config)
        self.num_experts: int = self.config.num_experts
        self.d_model: int = self.config.d_model
        self.device = torch.device(device)
        self.dtype: torch.dtype = getattr(torch, dtype)
        self.act = ACT2FN[self.config.dense_act_fn]
        self.checkpoint = Checkpoint(source.path)
        self.kernel = kernel
        self._weights: _Held = _Held({})  # replaced whole, through _publish, on every change
        self._home: set[ExpertKey] = set()
        self._replicas: set[ExpertKey] = set()  # loaded and ready
        self.replica_memory = replica_memory
        # One expert's bytes in the compute dtype: wi and wo, d_model x d_ff each.
        self.expert_bytes = 2 * self.config.d_model * self.config.d_ff * torch.empty(0, dtype=self.dtype).element_size()
        self._assign_lock = threading.Lock()
        self._replica_generation = 0
        self._copy_stream = None  # CUDA stream for replica loading, made on first use
        self._pool = ThreadPoolExecutor(max_workers=4) if group_executor == "threads" and kernel == "exact" else None
        self._streams = None
        if group_executor == "streams" and kernel == "exact":
            if self.device.type != "cuda":
                raise ValueError("group executor 'streams' needs a CUDA device")
            self._streams = [torch.cuda.Stream(self.device) for _ in range(4)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # ---- which experts are held ----

    def held(self) -> list[ExpertKey]:
        return sorted(self._weights)

    def home(self) -> list[ExpertKey]:
        return sorted(self._home)

    def replicas(self) -> list[ExpertKey]:
        return sorted(self._replicas)

    @property
    def replica_slots(self) -> int:
        return self.replica_memory // self.expert_bytes

    def weight_bytes(self) -> int:
        return sum(wi.nbytes + wo.nbytes for wi, wo in self._weights.values())

    def check_model(self, model_id: str) -> None:
        if model_id and model_id != self.source.model_id:
            raise FailedPrecondition(
                f"caller runs model {model_id}, this expert server holds model {self.source.model_id} "
                f"({self.source.spec}): start both from the same checkpoint"
            )

    def _check_key(self, layer: int, expert: int) -> None:
        if not 0 <= layer < len(self.layers):
            raise InvalidArgument(f"sparse layer {layer} does not exist (the model has {len(self.layers)})")
        if not 0 <= expert < self.num_experts:
            raise InvalidArgument(f"expert {expert} does not exist (layers have {self.num_experts} experts)")

    def assign(self, experts: list[ExpertKey]) -> tuple[int, int]:
        """Hold exactly `experts` afterwards: load the missing ones, drop the others.

        Returns (loaded, dropped). Loading reads only those experts' tensors.
        """
        for layer, expert in experts:
            self._check_key(layer, expert)
        wanted = set(experts)
        with self._assign_lock:
            current = self._weights
            home_before = self._home
            # A new home expert that was a replica here stops being one.
            self._replicas -= wanted
            keep = wanted | self._replicas
            new = {k: v for k, v in current.items() if k in keep}
            missing = sorted(wanted - set(current))
            for key in missing:
                new[key] = self.load_weights(key)
            self._publish(new)
            self._home = wanted
        dropped = len(home_before - wanted)
        self._prestack()
        log.info("assigned %d experts (%d loaded, %d dropped, %.1f MB)", len(new), len(missing), dropped, self.weight_bytes() / 1e6)
        return len(missing), dropped

    def _publish(self, weights: dict) -> None:
        """Swap in a new weight dict (callers hold _assign_lock); in-flight runs keep theirs."""
        self._weights = _Held(weights, self._weights)

    def load_weights(self, key: ExpertKey) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one expert from the checkpoint onto this store's device (not kept: assign and
        set_replicas keep what they load). Public so benchmarks can time a replica load."""
        wi, wo = self.checkpoint.expert_weights(self.layers[key[0]], key[1])
        return self._to_device(wi, wo)

    def _to_device(self, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.device.type != "cuda":
            # copy=True: safetensors hands out file-backed (mmap) tensors; copy them into
            # memory we own so weights stay resident instead of paging from disk under pressure.
            return tuple(w.to(dtype=self.dtype, copy=True).contiguous() for w in weights)
        # On CUDA, copy on a stream of its own from pinned memory, so loading a replica
        # overlaps the experts running on the default stream; wait only for our copy.
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(self._copy_stream):
            out = tuple(w.to(dtype=self.dtype).contiguous().pin_memory().to(self.device, non_blocking=True)
                        for w in weights)
        self._copy_stream.synchronize()
        return out

    def weights_of(self, key: ExpertKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(wi, wo) of an expert held here (home or replica); NotFound otherwise."""
        weights = self._weights.get(key)
        if weights is None:
            raise NotFound(f"expert {key[1]} of sparse layer {key[0]} is not held by this server")
        return weights

    def set_replicas(self, wanted: list[ExpertKey], sources: dict[ExpertKey, str] | None = None,
                     fetch: Callable[[ExpertKey, str], tuple[torch.Tensor, torch.Tensor]] | None = None,
                     ) -> tuple[list[tuple[ExpertKey, str]], int]:
        """Hold exactly the replicas `wanted` (besides home experts) that are valid and fit.

        Drops unwanted replicas at once, then loads the missing ones one by one from the
        checkpoint, or, when the checkpoint cannot give one, with fetch(key, sources[key])
        from its home server; stops early when a newer call supersedes this one. Returns
        (refused with reasons, bytes loaded). Running experts are never blocked: each
        loaded replica is published by swapping in a new weight dict.
        """
        refused: list[tuple[ExpertKey, str]] = []
        valid: list[ExpertKey] = []
        with self._assign_lock:
            for key in dict.fromkeys(wanted):
                layer, expert = key
                if not (0 <= layer < len(self.layers) and 0 <= expert < self.num_experts):
                    refused.append((key, f"expert {expert} of sparse layer {layer} does not exist"))
                elif key in self._home:
                    refused.append((key, "is a home expert of this server"))
                elif len(valid) >= self.replica_slots:
                    refused.append((key, f"over the replica memory budget ({self.replica_memory} bytes, "
                                         f"{self.replica_slots} replicas)"))
                else:
                    valid.append(key)
            self._replica_generation += 1
            generation = self._replica_generation
            keep = set(valid)
            self._replicas &= keep
            self._publish({k: v for k, v in self._weights.items() if k in self._home or k in self._replicas})
        loaded = 0
        for key in valid:
            if key in self._replicas:
                continue
            try:
                weights = self.load_weights(key)
            except Exception as exc:  # noqa: BLE001 - one unreadable replica must not stop the others
                source = (sources or {}).get(key)
                if not (source and fetch):
                    refused.append((key, f"could not be loaded: {exc}"))
                    continue
                try:
                    weights = self._to_device(*fetch(key, source))
                    self._check_shapes(key, weights)
                except Exception as fetch_exc:  # noqa: BLE001
                    refused.append((key, f"not in the checkpoint ({exc}) nor fetched from {source} ({fetch_exc})"))
                    continue
            with self._assign_lock:
                if generation != self._replica_generation:
                    break  # superseded: the newer call decides what to hold
                self._publish({**self._weights, key: weights})
                self._replicas.add(key)
            loaded += sum(w.nbytes for w in weights)
        self._prestack()
        log.info("replicas: %d ready, %d refused, %.1f MB loaded", len(self._replicas), len(refused), loaded / 1e6)
        return refused, loaded

    def _check_shapes(self, key: ExpertKey, weights) -> None:
        d_ff, d_model = self.config.d_ff, self.d_model
        if tuple(weights[0].shape) != (d_ff, d_model) or tuple(weights[1].shape) != (d_model, d_ff):
            raise InvalidArgument(f"expert {key}: weights of shapes {[list(w.shape) for w in weights]}, "
                                  f"expected [{d_ff}, {d_model}] and [{d_model}, {d_ff}]")

    def replica_bytes(self) -> int:
        return len(self._replicas) * self.expert_bytes

    # ---- running experts ----

    def ffn(self, x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
        """x [n, d_model] -> [n, d_model]; the ops of SwitchTransformersDenseActDense (eval mode)."""
        return run_exact(x, [(wi, wo)], [x.shape[0]], self.act)

    def run(self, layer: int, groups: list[tuple[int, int]], hidden: torch.Tensor) -> torch.Tensor:
        """Run one sparse layer's experts.

        groups: [(expert, num_tokens)] in row order, experts held here, in any order;
        hidden: [sum num_tokens, d_model]. Returns [sum num_tokens, d_model] in the compute
        dtype, on CPU.
        """
        if hidden.dim() != 2 or hidden.shape[1] != self.d_model:
            raise InvalidArgument(f"hidden_states must have shape [tokens, {self.d_model}], got {list(hidden.shape)}")
        if not groups:
            raise InvalidArgument("no expert groups given")
        if not 0 <= layer < len(self.layers):
            raise InvalidArgument(f"sparse layer {layer} does not exist (the model has {len(self.layers)})")
        weights = self._weights  # snapshot
        total = 0
        for expert, n in groups:
            if (layer, expert) not in weights:
                self._check_key(layer, expert)  # a nonexistent expert is bad input, not a missing one
                raise NotFound(f"expert {expert} of sparse layer {layer} is not held by this server")
            if n <= 0:
                raise InvalidArgument(f"expert group for expert {expert} has {n} tokens")
            total += n
        if total != hidden.shape[0]:
            raise InvalidArgument(f"expert groups cover {total} tokens but hidden_states has {hidden.shape[0]} rows")

        x = hidden.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            if self.kernel == "grouped":
                # assign() and set_replicas() stack what they changed; a run that meets a
                # snapshot published halfway through set_replicas stacks the layer itself.
                out = run_grouped(x, self._stacked(weights, layer), groups, self.act)
            else:
                out = run_exact(x, [weights[(layer, e)] for e, _ in groups], [n for _, n in groups],
                                self.act, self._pool, self._streams)
        return out.cpu()

    def _prestack(self) -> None:
        """grouped: stack the layers a change left unstacked now, in AssignExperts or
        SetReplicas, rather than in the next RunExperts of each (a layer's stack copies
        all its weights: hundreds of ms for a layer of switch-base experts)."""
        if self.kernel != "grouped":
            return
        weights = self._weights
        for layer in sorted({layer for layer, _ in weights}):
            self._stacked(weights, layer)

    def _stacked(self, weights: _Held, layer: int) -> StackedLayer:
        """The grouped kernel's stack of `layer` in the snapshot `weights`, built on first use."""
        stacked = weights.stacks.get(layer)
        if stacked is None:
            with weights.lock:
                stacked = weights.stacks.get(layer)
                if stacked is None:
                    stacked = stack_layer({e: w for (l, e), w in weights.items() if l == layer})
                    weights.stacks[layer] = stacked
                    log.debug("stacked %d experts of layer %d", len(stacked.experts), layer)
        return stacked
