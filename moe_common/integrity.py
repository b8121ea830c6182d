"""Expert weight digests: a cheap check that a server runs the checkpoint's experts.

The model identity (config.json and the router weights) can be computed by anyone
with the public checkpoint, so it does not stop a server that loaded other expert
weights. A digest does: SHA-256 over an expert's wi then wo bytes, in the dtype the
server holds them (C order). The server computes it from the weights it actually
loaded (GetExpertDigests); the gateway computes it once per expert and dtype from its
own checkpoint, reading one expert at a time (never the whole model at once), and
refuses a server whose digests differ.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import torch

from moe_common.checkpoint import Checkpoint, SparseLayer

ExpertKey = tuple[int, int]  # (sparse layer, expert)


def expert_digest(wi: torch.Tensor, wo: torch.Tensor) -> bytes:
    """SHA-256 over wi then wo as raw bytes (the tensors' own dtype, C order, read on the CPU)."""
    h = hashlib.sha256()
    for w in (wi, wo):
        h.update(w.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class CheckpointDigests:
    """Digests of the checkpoint's experts, computed on first use and cached per dtype.
    Thread-safe."""

    def __init__(self, path: Path, layers: list[SparseLayer]):
        self.checkpoint = Checkpoint(path)
        self.layers = layers
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, ExpertKey], bytes] = {}

    def digest(self, key: ExpertKey, dtype: str) -> bytes:
        with self._lock:
            got = self._cache.get((dtype, key))
        if got is None:
            # The server casts the checkpoint tensors to its dtype the same way (ExpertStore._to_device).
            wi, wo = self.checkpoint.expert_weights(self.layers[key[0]], key[1])
            got = expert_digest(wi.to(getattr(torch, dtype)), wo.to(getattr(torch, dtype)))
            with self._lock:
                self._cache[(dtype, key)] = got
        return got
