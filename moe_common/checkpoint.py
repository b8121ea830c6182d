"""Reading a Switch Transformers checkpoint selectively.

A checkpoint directory holds one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. ``Checkpoint`` maps every tensor name to its file
and reads only the tensors asked for, so the gateway never touches expert weights
and an expert server reads only its own experts.

Sparse layers are numbered 0..L-1 in model order: encoder sparse blocks first, then
decoder ones. ``sparse_layers(config)`` derives them from the config with the same
rule HF uses; the gateway checks it against the modules it builds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moe_common.errors import FailedPrecondition, NotFound


@dataclass(frozen=True)
class SparseLayer:
    """One sparse (mixture-of-experts) block of the model."""

    index: int  # 0..L-1 over encoder then decoder
    stack: str  # "encoder" or "decoder"
    block: int  # block index inside its stack
    ff_sublayer: int  # index of the FF sublayer in the block: 1 in the encoder, 2 in the decoder

    @property
    def name(self) -> str:
        return f"{self.stack}.block.{self.block}"

    def expert_prefix(self, expert: int) -> str:
        return f"{self.name}.layer.{self.ff_sublayer}.mlp.experts.expert_{expert}."


def sparse_layers(config) -> list[SparseLayer]:
    """Sparse blocks of a SwitchTransformersConfig, in model order.

    Mirrors SwitchTransformersStack: block i is sparse when i % step == 1 (or step == 1).
    """
    layers: list[SparseLayer] = []
    for stack, num_blocks, step, ff in (
        ("encoder", config.num_layers, config.encoder_sparse_step, 1),
        ("decoder", config.num_decoder_layers, config.decoder_sparse_step, 2),
    ):
        for block in range(num_blocks):
            if step > 0 and (block % step == 1 or step == 1):
                layers.append(SparseLayer(len(layers), stack, block, ff))
    return layers


def is_expert_key(name: str) -> bool:
    return ".mlp.experts." in name


class Checkpoint:
    """Tensor name -> file index over a checkpoint directory's safetensors."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index_file = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index_file.exists():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            self._file_of = {k: self.directory / v for k, v in weight_map.items()}
        elif single.exists():
            with safe_open(single, framework="pt") as f:
                self._file_of = {k: single for k in f.keys()}
        else:
            raise FailedPrecondition(
                f"{self.directory} has no model.safetensors or model.safetensors.index.json "
                "(only safetensors checkpoints are supported)"
            )

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read only `names` (grouped by file), optionally cast to `dtype`."""
        missing = [n for n in names if n not in self._file_of]
        if missing:
            raise NotFound(f"checkpoint {self.directory} lacks tensors: {missing[:5]}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._file_of[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            with safe_open(path, framework="pt") as f:
                for n in group:
                    t = f.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None else t
        return out

    def expert_weights(self, layer: SparseLayer, expert: int, dtype: torch.dtype | None = None):
        """(wi [d_ff, d_model], wo [d_model, d_ff]) of one logical expert."""
        prefix = layer.expert_prefix(expert)
        got = self.read([prefix + "wi.weight", prefix + "wo.weight"], dtype)
        return got[prefix + "wi.weight"], got[prefix + "wo.weight"]
