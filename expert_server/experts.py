"""The expert store: the logical experts this server holds and the FFN that runs them.

Plain torch, no gRPC. An expert is the Switch FFN ``wo(act(wi(x)))`` with no biases,
computed with the same ops as HF's SwitchTransformersDenseActDense so that the
distributed model reproduces the single-process one exactly.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F

from moe_common.checkpoint import Checkpoint, SparseLayer, sparse_layers
from moe_common.errors import FailedPrecondition, InvalidArgument, NotFound
from moe_common.model_source import ModelSource

log = logging.getLogger(__name__)

ExpertKey = tuple[int, int]  # (sparse layer, expert)


class ExpertStore:
    """Holds expert weights of some logical experts and runs them.

    Two kinds of experts are held: home experts (assign()) and replicas of other
    servers' experts (set_replicas(), within `replica_memory` bytes). Thread-safe:
    RunExperts calls read a snapshot of the weight dict; changes build a new dict and
    swap it in, so running experts are never blocked by loading.
    """

    def __init__(self, source: ModelSource, device: str = "cpu", dtype: str = "float32",
                 group_executor: str = "sequential", replica_memory: int = 0):
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
        self._weights: dict[ExpertKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self._home: set[ExpertKey] = set()
        self._replicas: set[ExpertKey] = set()  # loaded and ready
        self.replica_memory = replica_memory
        # One expert's bytes in the compute dtype: wi and wo, d_model x d_ff each.
        self.expert_bytes = 2 * self.config.d_model * self.config.d_ff * torch.empty(0, dtype=self.dtype).element_size()
        self._assign_lock = threading.Lock()
        self._replica_generation = 0
        self._copy_stream = None  # CUDA stream for replica loading, made on first use
        self._pool = ThreadPoolExecutor(max_workers=4) if group_executor == "threads" else None

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
            self._weights = new  # atomic swap: in-flight runs keep their snapshot
            self._home = wanted
        dropped = len(home_before - wanted)
        log.info("assigned %d experts (%d loaded, %d dropped, %.1f MB)", len(new), len(missing), dropped, self.weight_bytes() / 1e6)
        return len(missing), dropped

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
            self._weights = {k: v for k, v in self._weights.items() if k in self._home or k in self._replicas}
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
                self._weights = {**self._weights, key: weights}
                self._replicas.add(key)
            loaded += sum(w.nbytes for w in weights)
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
        return F.linear(self.act(F.linear(x, wi)), wo)

    def run(self, layer: int, groups: list[tuple[int, int]], hidden: torch.Tensor) -> torch.Tensor:
        """Run one sparse layer's experts.

        groups: [(expert, num_tokens)] in row order; hidden: [sum num_tokens, d_model].
        Returns [sum num_tokens, d_model] in the compute dtype, on CPU.
        """
        if hidden.dim() != 2 or hidden.shape[1] != self.d_model:
            raise InvalidArgument(f"hidden_states must have shape [tokens, {self.d_model}], got {list(hidden.shape)}")
        if not groups:
            raise InvalidArgument("no expert groups given")
        total = 0
        weights = self._weights  # snapshot
        for expert, n in groups:
            self._check_key(layer, expert)
            if n == 0:
                raise InvalidArgument(f"expert group for expert {expert} has 0 tokens")
            if (layer, expert) not in weights:
                raise NotFound(f"expert {expert} of sparse layer {layer} is not held by this server")
            total += n
        if total != hidden.shape[0]:
            raise InvalidArgument(f"expert groups cover {total} tokens but hidden_states has {hidden.shape[0]} rows")

        x = hidden.to(device=self.device, dtype=self.dtype)
        bounds = []
        start = 0
        for expert, n in groups:
            bounds.append((expert, start, start + n))
            start += n

        def one(b):
            expert, a, z = b
            wi, wo = weights[(layer, expert)]
            return self.ffn(x[a:z], wi, wo)

        with torch.inference_mode():
            if self._pool is not None and len(bounds) > 1:
                outs = list(self._pool.map(one, bounds))
            else:
                outs = [one(b) for b in bounds]
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.cpu()
