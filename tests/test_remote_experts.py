"""The gateway's RemoteExperts (gateway/dispatch.py) around its layer call: grouping HF's
routing mask by expert, and combining the experts' rows, bit-identical to HF's
SwitchTransformersExperts on the same routed tokens.

The layer call itself runs the real ExpertStore in this process (no server): what is
under test is what RemoteExperts does before and after it, in each of its three ways of
combining (one expert; several, concatenated; several, per expert as HF loops).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from expert_server.experts import ExpertStore
from gateway import dispatch
from gateway.dispatch import RemoteExperts, group_tokens
from test_expert_kernels import hf_experts, route


def hf_groups(onehot: torch.Tensor) -> list[tuple[int, list[int]]]:
    """The groups HF's SwitchTransformersExperts.forward forms: a torch.where per hit expert."""
    mask = onehot[:, None, :].permute(2, 1, 0)  # [E, 1, N], as HF permutes selected_experts
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    return [(int(e), torch.where(mask[e].squeeze(0))[1].tolist()) for e in hit]


@settings(max_examples=60, deadline=None)
@given(num_experts=st.integers(1, 9), choices=st.lists(st.integers(-1, 8), max_size=40))
@example(num_experts=4, choices=[])  # no tokens
@example(num_experts=4, choices=[-1, -1])  # every token dropped
@example(num_experts=3, choices=[2, 0, 2, -1, 0])
def test_group_tokens_forms_hf_groups(num_experts, choices):
    """choices: each token's expert, -1 for dropped over capacity."""
    onehot = torch.zeros(len(choices), num_experts, dtype=torch.int64)
    for token, expert in enumerate(choices):
        if 0 <= expert < num_experts:
            onehot[token, expert] = 1
    default = dispatch._PYTHON_GROUPING
    try:
        for limit in (0, len(choices)):  # the tensor ops, then Python lists
            dispatch._PYTHON_GROUPING = limit
            token_lists, kept, counts = group_tokens(onehot)
            assert [(e, t.tolist()) for e, t in token_lists] == hf_groups(onehot), limit
            assert kept.tolist() == [i for _, t in token_lists for i in t.tolist()]
            assert list(counts) == onehot.sum(0).tolist()
    finally:
        dispatch._PYTHON_GROUPING = default


class StoreClients:
    """Runs a layer call on an ExpertStore in this process: the layer call of ExpertClients
    without servers, so that only RemoteExperts' own work differs from HF's."""

    def __init__(self, store: ExpertStore):
        self.store = store

    def run_layer(self, layer, hidden, token_lists):
        out = self.store.run(layer, [(e, len(t)) for e, t in token_lists], hidden[torch.cat([t for _, t in token_lists])])
        return dict(zip([e for e, _ in token_lists], out.split([len(t) for _, t in token_lists])))

    def add_dispatch_time(self, ns):
        pass


@pytest.mark.parametrize("num_tokens,concat_elements", [
    (1, dispatch._CONCAT_ELEMENTS),  # one expert
    (16, dispatch._CONCAT_ELEMENTS),  # grouped with Python lists
    (64, dispatch._CONCAT_ELEMENTS),  # several, concatenated
    (64, 0),  # several, per expert
])
def test_remote_experts_combine_bit_identical_to_hf(tiny, reference, monkeypatch, num_tokens, concat_elements):
    monkeypatch.setattr(dispatch, "_CONCAT_ELEMENTS", concat_elements)
    store = ExpertStore(tiny)
    layer = 2
    store.assign([(layer, e) for e in range(store.num_experts)])
    g = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, store.d_model, generator=g)
    selected, probs = route(num_tokens, store.num_experts, g)
    selected[0, 0] = torch.nn.functional.one_hot(torch.tensor(3), store.num_experts)  # at least one kept token
    with torch.no_grad():
        expected = hf_experts(reference[0], layer)(hidden, selected, probs)
        got = RemoteExperts(layer, StoreClients(store))(hidden, selected, probs)
    assert torch.equal(got, expected)
    # Same bits, not only equal values: a dropped token's zero keeps its sign as HF's does.
    assert got.view(torch.int32).tolist() == expected.view(torch.int32).tolist()
