"""Per-row decoder caches of the continuous scheduler (gateway/scheduler.py), kept in
preallocated buffers and handed to HF's decoder as one padded batch at every step.

Glossary: a *row* is one prompt being decoded; it lives in a *slot* (its index in the
batch dimension of every buffer). Slots 0..rows-1 are live; a row that leaves is
replaced by the last live row (compaction), so the live rows stay a prefix and a step
slices ``[:rows]`` without copying.

Layout, per decoder layer l:
- self-attention keys/values ``self_k[l]``, ``self_v[l]``: [R, H, T, d_kv]. Column
  ``end`` is where every row writes its key of the current step: rows are *left-padded*
  so that their latest token sits in the same column. Row b's tokens occupy columns
  ``start[b] .. end``; the columns left of ``start[b]`` are masked.
- cross-attention keys/values ``cross_k[l]``, ``cross_v[l]``: [R, H, S, d_kv], the
  projections of the row's encoder output, computed once at admission, right-padded to
  the longest live prompt and masked beyond ``src_len[b]``.

Why left-padding is exact for T5's relative position bias. HF computes the decoder's
self-attention bias from positions only (``SwitchTransformersAttention.compute_bias``):
the query of a step sits at ``past_seen_tokens`` and key j at j, so the bias of key j is
``bucket(j - past_seen_tokens)``, a function of the *distance* key - query alone. A step
hands HF the window ``[lo, end]`` (lo = the smallest live start), so the query sits at
``end - lo`` and row b's k-th own token (column ``start[b] + k``) at distance
``start[b] + k - end``; row b has generated ``end - start[b]`` tokens before this step,
so this is ``k - t_b`` with t_b = its own past length: exactly the distance the row alone
has in HF's own cache. The padded columns get any bias, but they are masked with the
dtype's minimum, so their softmax weight is exactly 0. Cross-attention has no position
bias (T5 gives a bias only to the first self-attention layer; HF passes zeros to
cross-attention), so right-padding the encoder side is exact in the same way.
tests/test_continuous_batching.py checks both against HF's own decoding, row by row.

What is not bit-identical: softmax and the attention matmul reduce over the padded
length, so sums run over more (zero) terms in a different order; logits agree with the
row alone to float rounding (about 1e-6), the batching tolerance the static path has too.

Cost bounds: a step writes one column per layer (no re-concatenation: HF's DynamicCache
would ``torch.cat`` the whole cache every step) and slices views; a leaving row costs one
row copy per layer; when ``end`` reaches the buffer's width the window is shifted left
to column 0 (amortized: only when the oldest live row left room), and buffers double
only when the live window itself does not fit.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache


class _WindowLayer(DynamicLayer):
    """One decoder layer's self-attention cache as HF sees it during a step: the live
    rows' window ``[lo, end)`` of the buffers, to which ``update`` adds column ``end``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, lo: int, end: int):
        super().__init__()
        self._k, self._v = keys, values  # [R, H, T, d_kv] buffers
        self._rows, self._lo, self._end = rows, lo, end
        self.keys, self.values = keys[:rows, :, lo:end], values[:rows, :, lo:end]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states [B, H, 1, d_kv]: this step's key of every live row, written in place.
        self._k[: self._rows, :, self._end: self._end + 1] = key_states
        self._v[: self._rows, :, self._end: self._end + 1] = value_states
        self.keys = self._k[: self._rows, :, self._lo: self._end + 1]  # [B, H, T, d_kv] view
        self.values = self._v[: self._rows, :, self._lo: self._end + 1]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # Where the step's query sits in the window: its relative position bias depends on it.
        return self.keys.shape[-2]


class RowCaches:
    """Decoder caches of the running rows in preallocated buffers (see the module docstring)."""

    def __init__(self, num_layers: int, num_heads: int, d_kv: int, dtype: torch.dtype, device: torch.device,
                 rows: int = 8, width: int = 64, src_width: int = 64):
        self.num_layers, self.num_heads, self.d_kv = num_layers, num_heads, d_kv
        self.dtype, self.device = dtype, device
        self.rows = 0  # live rows: slots 0..rows-1
        self.end = 0  # the column this step's keys go to
        self.start: list[int] = []  # per live slot: its first column
        self.src_len: list[int] = []  # per live slot: its prompt length
        self.self_k = self.self_v = self.cross_k = self.cross_v = None
        self._allocate(rows, width, src_width)
        self.compactions = 0  # window shifts, and
        self.grows = 0  # buffer reallocations, so far (tests and GetStatus read them)

    # ---- buffers ----

    def _zeros(self, rows: int, width: int) -> list[torch.Tensor]:
        # Zeros, not empty: masked columns are multiplied by weight 0, and 0 * NaN is NaN.
        return [torch.zeros(rows, self.num_heads, width, self.d_kv, dtype=self.dtype, device=self.device)
                for _ in range(self.num_layers)]

    def _allocate(self, rows: int, width: int, src_width: int) -> None:
        old = (self.self_k, self.self_v, self.cross_k, self.cross_v)
        self.self_k, self.self_v = self._zeros(rows, width), self._zeros(rows, width)
        self.cross_k, self.cross_v = self._zeros(rows, src_width), self._zeros(rows, src_width)
        if old[0] is not None:
            n, w, s = self.rows, min(self.end, width), min(old[2][0].shape[2], src_width)
            for new, prev, cols in zip((self.self_k, self.self_v, self.cross_k, self.cross_v), old, (w, w, s, s)):
                for a, b in zip(new, prev):
                    a[:n, :, :cols] = b[:n, :, :cols]

    @property
    def capacity(self) -> tuple[int, int, int]:
        """(row slots, self-attention columns, encoder columns) of the buffers."""
        return self.self_k[0].shape[0], self.self_k[0].shape[2], self.cross_k[0].shape[2]

    # ---- rows ----

    def add(self, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor]) -> int:
        """A new row with its cross-attention keys/values per layer ([H, S, d_kv] each);
        its self-attention cache starts empty at column `end`. Returns its slot."""
        src = cross_k[0].shape[1]
        slots, width, src_width = self.capacity
        if self.rows == slots or src > src_width:
            self._allocate(2 * slots if self.rows == slots else slots, width, max(src_width, _pow2(src)))
            self.grows += 1
        slot = self.rows
        for layer in range(self.num_layers):
            self.cross_k[layer][slot, :, :src] = cross_k[layer]
            self.cross_v[layer][slot, :, :src] = cross_v[layer]
        self.start.append(self.end)
        self.src_len.append(src)
        self.rows += 1
        return slot

    def remove(self, slot: int) -> int | None:
        """Drop the row in `slot`; the last live row moves into it. Returns the slot the
        moved row came from (None when `slot` was the last)."""
        last = self.rows - 1
        moved = None
        if slot != last:
            cols, src = self.end, self.src_len[last]
            for bufs in (self.self_k, self.self_v):
                for buf in bufs:
                    buf[slot, :, :cols] = buf[last, :, :cols]
            for bufs in (self.cross_k, self.cross_v):
                for buf in bufs:
                    buf[slot, :, :src] = buf[last, :, :src]
            self.start[slot], self.src_len[slot] = self.start[last], self.src_len[last]
            moved = last
        self.start.pop()
        self.src_len.pop()
        self.rows -= 1
        if self.rows == 0:
            self.end = 0  # nobody left: the next rows start at column 0
        return moved

    # ---- steps ----

    def _make_room(self) -> None:
        """Ensure column `end` exists: shift the live window to column 0, or grow."""
        slots, width, src_width = self.capacity
        if self.end < width:
            return
        lo = min(self.start)
        if lo > 0 and self.end - lo < width // 2:
            for bufs in (self.self_k, self.self_v):
                for buf in bufs:
                    buf[: self.rows, :, : self.end - lo] = buf[: self.rows, :, lo: self.end].clone()
            self.start = [s - lo for s in self.start]
            self.end -= lo
            self.compactions += 1
        else:
            self._allocate(slots, 2 * width, src_width)
            self.grows += 1

    def step_inputs(self) -> tuple[EncoderDecoderCache, torch.Tensor, torch.Tensor, int]:
        """What HF's decoder needs for one step of every live row:
        (cache, self-attention mask [B, 1, 1, T], encoder mask [B, 1, 1, S], S), masks
        additive (0 or the dtype's minimum) as HF's eager attention adds them."""
        assert self.rows > 0, "a step needs live rows"
        self._make_room()
        lo = min(self.start)
        rows, end = self.rows, self.end
        src = max(self.src_len)
        layers = [_WindowLayer(k, v, rows, lo, end) for k, v in zip(self.self_k, self.self_v)]
        cross = []
        for k, v in zip(self.cross_k, self.cross_v):
            layer = DynamicLayer()
            layer.keys, layer.values, layer.is_initialized = k[:rows, :, :src], v[:rows, :, :src], True
            cross.append(layer)
        cache = EncoderDecoderCache(Cache(layers=layers), Cache(layers=cross))  # cross-attention: is_updated
        neg = torch.finfo(self.dtype).min
        cols = torch.arange(lo, end + 1, device=self.device)  # [T]
        starts = torch.tensor(self.start, device=self.device)  # [B]
        self_mask = torch.where(cols[None, :] >= starts[:, None], 0.0, neg).to(self.dtype)  # [B, T]
        lens = torch.tensor(self.src_len, device=self.device)
        enc_mask = torch.where(torch.arange(src, device=self.device)[None, :] < lens[:, None], 0.0, neg).to(self.dtype)
        return cache, self_mask[:, None, None, :], enc_mask[:, None, None, :], src

    def advance(self) -> None:
        """The step ran: its column now holds every live row's key."""
        self.end += 1


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
