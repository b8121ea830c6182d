"""Expert FFN kernels: run one sparse layer's expert groups, rows already grouped by expert.

Plain torch, no gRPC, no validation: ExpertStore.run checks the call and hands these
kernels rows that are contiguous per group, in the order of the groups.

Glossary (as in the store): a *group* is (expert, num_tokens), the rows of one expert
in one call; the *held* experts of a layer are those this server holds (home and
replicas); a *slot* is an expert's index in its layer's stacked weights.

Two kernels (``--expert-kernel``):

- ``exact`` (default): each group through ``wo(act(wi(x)))`` with ``F.linear``, the ops
  and shapes of HF's SwitchTransformersDenseActDense on the same rows, so the output is
  bit-identical to HF on the same kind of device. What HF adds per expert (a torch.where
  over the routing mask, a gather, an index_add) is not here: the rows arrive grouped.
- ``grouped``: the layer's held experts stacked once into [E_held, d_ff, d_model] and
  [E_held, d_model, d_ff], and one ``F.grouped_mm`` per projection per call, with
  int32 cumulative offsets over every slot (zero rows for held experts absent from the
  call), so no weights are copied per call. On CPU it runs in the store's dtype (fp32 by
  default; torch 2.13's CPU grouped_mm is a C++ loop of one mm per slot). On CUDA
  grouped_mm takes bf16 only (SM80+), so the stack is kept in bf16, inputs are cast to
  it and the output back (it accumulates in fp32, its output is bf16). Opt-in and not
  bit-exact: the CUDA path rounds to bf16, and on CPU nothing promises the summation
  order of ``F.linear`` (in torch 2.13 it agreed bit for bit; tests allow 1e-5).
  The stack is a second copy of the layer's weights (in bf16 on CUDA).
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

KERNELS = ("exact", "grouped")

Weights = tuple[torch.Tensor, torch.Tensor]  # (wi [d_ff, d_model], wo [d_model, d_ff])


def run_exact(x: torch.Tensor, weights: list[Weights], counts: list[int],
              act: Callable[[torch.Tensor], torch.Tensor], pool: Executor | None = None,
              streams: list | None = None) -> torch.Tensor:
    """x [sum counts, d_model], rows of group i are the counts[i] rows after those of groups
    before it, run by weights[i]. Returns [sum counts, d_model].

    pool: run the groups concurrently on it (ExpertServerConfig.group_executor "threads").
    streams: CUDA streams; group i's kernels go to streams[i % len] (group_executor
    "streams"), so the GPU may run small groups side by side. Same ops either way.
    """
    bounds = []
    start = 0
    for n in counts:
        bounds.append((start, start + n))
        start += n

    def one(i: int) -> torch.Tensor:
        a, z = bounds[i]
        wi, wo = weights[i]
        # SwitchTransformersDenseActDense.forward in eval mode (dropout is the identity).
        return F.linear(act(F.linear(x[a:z], wi)), wo)

    if streams is not None and len(bounds) > 1:
        outs = _on_streams(one, len(bounds), streams, x.device)
    elif pool is not None and len(bounds) > 1:
        outs = list(pool.map(one, range(len(bounds))))
    else:
        outs = [one(i) for i in range(len(bounds))]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _on_streams(one: Callable[[int], torch.Tensor], n: int, streams: list, device: torch.device) -> list[torch.Tensor]:
    """one(i) for i < n, each issued on streams[i % len(streams)]; the caller's stream then
    waits for all of them. Every stream first waits for the caller's, where x was made."""
    caller = torch.cuda.current_stream(device)
    for s in streams:
        s.wait_stream(caller)
    outs = []
    for i in range(n):
        with torch.cuda.stream(streams[i % len(streams)]):
            out = one(i)
        # Made on a side stream, read on the caller's (the concatenation): the allocator
        # must not hand its memory to the side stream again before the caller is done.
        out.record_stream(caller)
        outs.append(out)
    for s in streams:
        caller.wait_stream(s)
    return outs


@dataclass(frozen=True)
class StackedLayer:
    """One layer's held experts, stacked for the grouped kernel.

    experts: held experts of the layer, ascending; slot i holds experts[i].
    wi: [E_held, d_ff, d_model]; wo: [E_held, d_model, d_ff].
    sources: the wi tensor each slot was copied from (an expert's wi and wo are loaded
    together), so a store can keep this stack when a weight change left the layer alone.
    """

    experts: tuple[int, ...]
    slot: dict[int, int]
    wi: torch.Tensor
    wo: torch.Tensor
    sources: tuple[torch.Tensor, ...]

    def built_from(self, layer_weights: dict[int, Weights]) -> bool:
        """Whether this stack holds exactly `layer_weights` ({expert: (wi, wo)}), same tensors."""
        return (len(layer_weights) == len(self.experts)
                and all(layer_weights.get(e, (None,))[0] is w for e, w in zip(self.experts, self.sources)))


def grouped_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype grouped_mm runs in: the store's own, except on CUDA, where it takes bf16 only."""
    return torch.bfloat16 if device.type == "cuda" else dtype


def stack_layer(layer_weights: dict[int, Weights]) -> StackedLayer:
    """{expert: (wi [d_ff, d_model], wo [d_model, d_ff])} of one layer -> its StackedLayer,
    on the weights' device, in grouped_dtype of it."""
    experts = tuple(sorted(layer_weights))
    first = layer_weights[experts[0]][0]
    dtype = grouped_dtype(first.device, first.dtype)
    # Cast per expert, then stack: on CUDA no fp32 copy of the whole layer is made on the way.
    wi = torch.stack([layer_weights[e][0].to(dtype) for e in experts])  # [E_held, d_ff, d_model]
    wo = torch.stack([layer_weights[e][1].to(dtype) for e in experts])  # [E_held, d_model, d_ff]
    return StackedLayer(experts, {e: i for i, e in enumerate(experts)}, wi, wo,
                        tuple(layer_weights[e][0] for e in experts))


def group_offsets(groups: list[tuple[int, int]], slot: dict[int, int], num_slots: int) -> tuple[list[int], bool]:
    """groups [(expert, num_tokens)] in row order -> (offsets, in_order).

    offsets [num_slots]: offsets[s] is the end row of slot s once rows are in slot order
    (grouped_mm's cumulative `offs`; a slot absent from the call adds no rows). in_order:
    whether the rows already are in slot order (groups' slots never decrease), so that
    no permutation is needed. Several groups of one expert add up.
    """
    counts = [0] * num_slots
    in_order = True
    last = -1
    for expert, n in groups:
        s = slot[expert]
        in_order = in_order and s >= last
        last = s
        counts[s] += n
    offsets = []
    total = 0
    for n in counts:
        total += n
        offsets.append(total)
    return offsets, in_order


def run_grouped(x: torch.Tensor, stacked: StackedLayer, groups: list[tuple[int, int]],
                act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [sum num_tokens, d_model] grouped as `groups` (experts of `stacked`, any order).
    Returns [sum num_tokens, d_model] in x's dtype."""
    offsets, in_order = group_offsets(groups, stacked.slot, len(stacked.experts))
    offs = torch.tensor(offsets, dtype=torch.int32, device=x.device)
    perm = None
    if not in_order:
        # Rows to slot order: a stable sort of each row's slot ([N]) keeps rows of a group together.
        slots = torch.tensor([stacked.slot[e] for e, _ in groups])
        sizes = torch.tensor([n for _, n in groups])
        perm = torch.argsort(torch.repeat_interleave(slots, sizes), stable=True).to(x.device)  # [N]
        x = x[perm]
    # Weights as [E_held, d_in, d_out] views: grouped_mm computes x_g @ w_g per slot.
    # On CUDA the stack is bf16: x is cast to it, and the output back to x's dtype
    # (grouped_mm's output dtype must equal its input's; it accumulates in fp32 inside).
    h = F.grouped_mm(x.to(stacked.wi.dtype), stacked.wi.transpose(-2, -1), offs=offs)  # [N, d_ff]
    out = F.grouped_mm(act(h), stacked.wo.transpose(-2, -1), offs=offs).to(x.dtype)  # [N, d_model]
    if perm is not None:
        out = torch.empty_like(out).index_copy_(0, perm, out)  # back to the call's row order
    return out
