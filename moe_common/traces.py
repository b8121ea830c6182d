"""Routing traces: what the router of every sparse layer chose, per forward pass.

A trace directory streams: a ``manifest.json`` written once, then shards appended as
``shard-000000.npz``, ``shard-000001.npz`` ... each written to a temporary name and
renamed, so a reader never sees half a shard and a crashed writer loses at most the
shard it was filling.

manifest.json:
  format "moe-routing-trace", version 1, model_id (hash of config.json and router weights), model_source,
  vocab_size, num_experts, expert_capacity, encoder_layers / decoder_layers (global sparse-layer
  indices of each stack), layer_names.

A shard holds P forward passes (an encoder pass, or one decoder step) as flat arrays:
  meta     [P, 5] int64   batch_id, kind (0 encoder, 1 decoder), step, B, S
  offsets  [P + 1] int64  pass p owns token rows offsets[p]:offsets[p+1] (= B * S rows, row-major)
  tokens   [T] int32      input token ids of the pass (for a decoder step: the new tokens)
  mask     [T] bool       attention mask (False = padding; padding is routed too)
  experts  [T, Lmax] int16 chosen (top-1) expert per sparse layer of the pass's stack, -1 past it
  dropped  [T, Lmax] bool  True where the token was over its expert's capacity (it got no expert)
Lmax = the larger number of sparse layers of the encoder and the decoder.

``RoutingRecorder`` fills traces from hooks on an HF Switch model (the gateway's, or
the single-process one that ``moe-predictor collect`` runs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

FORMAT = "moe-routing-trace"
VERSION = 1
ENCODER, DECODER = 0, 1
KIND_NAMES = {ENCODER: "encoder", DECODER: "decoder"}


@dataclass
class TraceInfo:
    """The manifest: which model, which layers."""

    model_id: str
    model_source: str
    vocab_size: int
    num_experts: int
    expert_capacity: int
    encoder_layers: list[int]
    decoder_layers: list[int]
    layer_names: list[str]

    def layers_of(self, kind: int) -> list[int]:
        return self.encoder_layers if kind == ENCODER else self.decoder_layers

    @property
    def num_layers(self) -> int:
        return len(self.encoder_layers) + len(self.decoder_layers)

    def to_json(self) -> dict:
        return dict(format=FORMAT, version=VERSION, **self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> "TraceInfo":
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} manifest: {data.get('format')} v{data.get('version')}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    @classmethod
    def from_config(cls, config, source) -> "TraceInfo":
        """From a SwitchTransformersConfig and the ModelSource it came from."""
        from moe_common.checkpoint import sparse_layers

        layers = sparse_layers(config)
        return cls(
            model_id=source.model_id,
            model_source=source.spec,
            vocab_size=config.vocab_size,
            num_experts=config.num_experts,
            expert_capacity=config.expert_capacity,
            encoder_layers=[layer.index for layer in layers if layer.stack == "encoder"],
            decoder_layers=[layer.index for layer in layers if layer.stack == "decoder"],
            layer_names=[layer.name for layer in layers],
        )


@dataclass
class Pass:
    """One forward pass of one stack over a batch."""

    batch_id: int
    kind: int  # ENCODER or DECODER
    step: int  # 0 for the encoder; decoder step index
    tokens: np.ndarray  # [B, S] int32
    mask: np.ndarray  # [B, S] bool
    experts: np.ndarray  # [B, S, Lp] int16, Lp = sparse layers of this stack
    dropped: np.ndarray  # [B, S, Lp] bool

    def loads(self, num_experts: int) -> np.ndarray:
        """[Lp, E] tokens each expert computed (dropped tokens excluded)."""
        lp = self.experts.shape[-1]
        flat = self.experts.reshape(-1, lp)
        kept = ~self.dropped.reshape(-1, lp)
        return np.stack([np.bincount(flat[kept[:, j], j], minlength=num_experts) for j in range(lp)])


def load_manifest(directory: Path) -> TraceInfo:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a trace directory (no manifest.json)")
    return TraceInfo.from_json(json.loads(path.read_text()))


class TraceWriter:
    """Appends passes to a trace directory, one shard per `passes_per_shard` passes."""

    def __init__(self, directory: Path, info: TraceInfo, passes_per_shard: int = 256):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / "manifest.json"
        if manifest.exists():
            existing = load_manifest(self.directory)
            if existing.model_id != info.model_id:
                raise ValueError(f"{directory} holds traces of model {existing.model_id}, not {info.model_id}")
        else:
            manifest.write_text(json.dumps(info.to_json(), indent=1))
        self.info = info
        self.lmax = max(len(info.encoder_layers), len(info.decoder_layers))
        self.passes_per_shard = passes_per_shard
        self._buffer: list[Pass] = []
        shards = sorted(self.directory.glob("shard-*.npz"))
        self._next_shard = int(shards[-1].stem.split("-")[1]) + 1 if shards else 0
        # Appending to earlier runs: batch ids continue after theirs, so batches stay apart.
        self.batch_offset = 0
        for shard in shards:
            with np.load(shard) as z:
                if len(z["meta"]):
                    self.batch_offset = max(self.batch_offset, int(z["meta"][:, 0].max()) + 1)
        self.passes_written = 0

    def add(self, p: Pass) -> None:
        self._buffer.append(p)
        if len(self._buffer) >= self.passes_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        passes, self._buffer = self._buffer, []
        meta = np.array([[p.batch_id + self.batch_offset, p.kind, p.step, *p.tokens.shape] for p in passes], dtype=np.int64)
        sizes = [p.tokens.size for p in passes]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        experts = np.full((offsets[-1], self.lmax), -1, dtype=np.int16)
        dropped = np.zeros((offsets[-1], self.lmax), dtype=bool)
        for p, a, z in zip(passes, offsets[:-1], offsets[1:]):
            lp = p.experts.shape[-1]
            experts[a:z, :lp] = p.experts.reshape(-1, lp)
            dropped[a:z, :lp] = p.dropped.reshape(-1, lp)
        final = self.directory / f"shard-{self._next_shard:06d}.npz"
        tmp = self.directory / f".shard-{self._next_shard:06d}.tmp-{os.getpid()}.npz"
        np.savez(tmp, meta=meta, offsets=offsets,
                 tokens=np.concatenate([p.tokens.reshape(-1) for p in passes]).astype(np.int32),
                 mask=np.concatenate([p.mask.reshape(-1) for p in passes]).astype(bool),
                 experts=experts, dropped=dropped)
        tmp.rename(final)
        self._next_shard += 1
        self.passes_written += len(passes)

    def close(self) -> None:
        self.flush()


def read_passes(directory: Path) -> Iterator[Pass]:
    """Every pass of a trace directory, in the order written."""
    info = load_manifest(directory)
    for shard in sorted(Path(directory).glob("shard-*.npz")):
        with np.load(shard) as z:
            meta, offsets = z["meta"], z["offsets"]
            tokens, mask, experts, dropped = z["tokens"], z["mask"], z["experts"], z["dropped"]
        for (batch_id, kind, step, b, s), a, e in zip(meta, offsets[:-1], offsets[1:]):
            lp = len(info.layers_of(int(kind)))
            yield Pass(int(batch_id), int(kind), int(step), tokens[a:e].reshape(b, s), mask[a:e].reshape(b, s),
                       experts[a:e, :lp].reshape(b, s, lp), dropped[a:e, :lp].reshape(b, s, lp))


class RoutingRecorder:
    """Hooks on an HF Switch model that turn every forward pass into a `Pass`.

    on_start(kind, batch_id, step, input_ids [B, S]) runs before a stack's pass, once the
    batch is formed; on_pass(Pass) after it. Either may be None.
    """

    def __init__(self, model, info: TraceInfo, on_pass: Callable[[Pass], None] | None = None,
                 on_start: Callable[[int, int, int, torch.Tensor], None] | None = None):
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

        self.info = info
        self.on_pass = on_pass
        self.on_start = on_start
        self.batch_id = -1
        self.step = 0
        self._current: dict | None = None
        self._handles = []
        for kind, stack in ((ENCODER, model.encoder), (DECODER, model.decoder)):
            self._handles.append(stack.register_forward_pre_hook(self._make_start(kind), with_kwargs=True))
            self._handles.append(stack.register_forward_hook(self._make_end(kind)))
            routers = [m for m in stack.modules() if isinstance(m, SwitchTransformersTop1Router)]
            for position, router in enumerate(routers):
                self._handles.append(router.register_forward_hook(self._make_router(position)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _make_start(self, kind):
        def hook(module, args, kwargs):
            input_ids = kwargs.get("input_ids")
            if input_ids is None and args:
                input_ids = args[0]
            if input_ids is None:
                return  # embeddings passed directly: nothing to record by token id
            mask = kwargs.get("attention_mask") if kind == ENCODER else None
            if kind == ENCODER:
                self.batch_id += 1
                self.step = 0
            lp = len(self.info.layers_of(kind))
            self._current = dict(kind=kind, tokens=input_ids, mask=mask, experts=[None] * lp, dropped=[None] * lp)
            if self.on_start is not None:
                self.on_start(kind, self.batch_id, self.step, input_ids)
        return hook

    def _make_router(self, position):
        def hook(module, args, output):
            if self._current is None:
                return
            expert_index, _, router_logits = output  # [B, S, E] one-hot (zero when dropped), _, [B, S, E]
            kept = expert_index.sum(-1) > 0
            chosen = torch.where(kept, expert_index.argmax(-1), router_logits.argmax(-1))
            self._current["experts"][position] = chosen
            self._current["dropped"][position] = ~kept
        return hook

    def _make_end(self, kind):
        def hook(module, args, output):
            cur, self._current = self._current, None
            if cur is None or cur["kind"] != kind:
                return
            tokens = cur["tokens"].detach().cpu()
            mask = cur["mask"].detach().cpu().bool() if cur["mask"] is not None else torch.ones_like(tokens, dtype=torch.bool)
            p = Pass(
                batch_id=self.batch_id, kind=kind, step=self.step if kind == DECODER else 0,
                tokens=tokens.numpy().astype(np.int32), mask=mask.numpy(),
                experts=torch.stack(cur["experts"], -1).cpu().numpy().astype(np.int16),
                dropped=torch.stack(cur["dropped"], -1).cpu().numpy(),
            )
            if kind == DECODER:
                self.step += 1
            if self.on_pass is not None:
                self.on_pass(p)
        return hook
