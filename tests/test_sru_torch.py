"""The pure-PyTorch SRU equals sru's (issue 15, item 5): the same initial weights from the same
seed, the same state dict key for key, and the same outputs and gradients to float rounding.

Tolerances (fp32, measured on this machine: forward <= 6e-7, gradients <= 8e-6 on values up
to ~40): forward outputs within 1e-5 absolute; gradients within 1e-5 of their largest
magnitude. The reference is sru itself: its C++ kernel without grad (inference), its own
Python loop with grad (sru trains on CPU that way)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from moe_common.traces import DECODER, ENCODER, TraceInfo
from predictor_service import forecaster
from predictor_service.sru_kernel import sru_class, sru_impl_class
from predictor_service.sru_torch import TorchSRU

FORWARD_ATOL = 1e-5
GRAD_RTOL = 1e-5

# (input_size, hidden_size, num_layers, bidirectional): the forecaster's default (32, 32, 1,
# causal), its --bidirectional encoder (k = 4: input 32 != output 64), stacked layers, and
# an input wider than the output.
CONFIGS = [(32, 32, 1, False), (32, 32, 1, True), (16, 24, 2, True), (32, 32, 2, False), (40, 8, 3, False)]


def _pair(input_size, hidden_size, num_layers, bidirectional, seed=0):
    torch.manual_seed(seed)
    kernel = sru_class()(input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional)
    torch.manual_seed(seed)
    ours = TorchSRU(input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional)
    return kernel, ours


@pytest.mark.parametrize("config", CONFIGS, ids=[f"in{c[0]}-h{c[1]}-l{c[2]}-{'bi' if c[3] else 'uni'}" for c in CONFIGS])
def test_same_init_state_dict_and_outputs_as_the_kernel(config):
    kernel, ours = _pair(*config)
    want, got = kernel.state_dict(), ours.state_dict()
    assert list(got) == list(want)
    for key in want:  # same draws in the same order: a seeded model is the same in both
        assert got[key].shape == want[key].shape and torch.equal(got[key], want[key]), key

    gen = torch.Generator().manual_seed(1)
    length, batch = 37, 5
    x = torch.randn(length, batch, config[0], generator=gen) * 2
    c0 = torch.randn(config[2], batch, ours.output_size, generator=gen)
    with torch.no_grad():  # sru's C++ kernel
        for args in ((x,), (x, c0)):
            h_want, c_want = kernel(*args)
            h_got, c_got = ours(*args)
            assert h_got.shape == h_want.shape == (length, batch, ours.output_size)
            assert c_got.shape == c_want.shape == (config[2], batch, ours.output_size)
            assert (h_got - h_want).abs().max().item() <= FORWARD_ATOL
            assert (c_got - c_want).abs().max().item() <= FORWARD_ATOL
            assert h_want.abs().max().item() > 0.5  # not a comparison of near-zeros


@pytest.mark.parametrize("config", CONFIGS[:3], ids=["uni", "bi", "bi-2-layers"])
def test_same_gradients_as_sru(config):
    kernel, ours = _pair(*config)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(23, 4, config[0], generator=gen)
    weights = torch.randn(23, 4, ours.output_size, generator=gen)  # a loss that weighs every output
    grads = []
    for model in (kernel, ours):
        xi = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sru: "Running SRU on CPU with grad_enabled=True"
            h, c = model(xi)
        ((h * weights).sum() + c.square().sum()).backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    for want, got in zip(*grads):
        scale = want.abs().max().item()
        assert scale > 0
        assert (got - want).abs().max().item() <= GRAD_RTOL * max(scale, 1.0)


def test_input_shape_is_checked():
    with pytest.raises(ValueError, match=r"input \[length, batch, 8\]"):
        TorchSRU(8, 8, num_layers=1)(torch.zeros(3, 8))


def test_choosing_the_implementation():
    assert sru_impl_class("torch") is TorchSRU
    assert sru_impl_class("kernel") is sru_class()
    assert sru_impl_class("auto") is sru_class()  # a compiler is here: auto takes the kernel
    with pytest.raises(ValueError, match="'fast' is not one of auto, kernel, torch"):
        sru_impl_class("fast")


# ---- a forecaster checkpoint loads into either, and forecasts the same ----

INFO = TraceInfo(model_id="synthetic", model_source="test", vocab_size=50, num_experts=8, expert_capacity=6,
                 encoder_layers=[0, 1], decoder_layers=[2, 3], layer_names=["l0", "l1", "l2", "l3"])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_a_checkpoint_forecasts_the_same_with_either_sru(tmp_path, bidirectional):
    cfg = forecaster.ForecasterConfig(INFO.vocab_size, INFO.num_experts, 2, 2, INFO.expert_capacity,
                                      embed_dim=16, hidden=24, sru_layers=2, bidirectional=bidirectional)
    torch.manual_seed(3)
    trained_with_kernel = forecaster.Forecaster(cfg, "kernel")
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(forecaster.Forecaster(cfg, "torch").state_dict().values(),
                                                 trained_with_kernel.state_dict().values()))
    path = tmp_path / "f.pt"
    forecaster.save(path, trained_with_kernel, INFO, {})
    models = {impl: forecaster.load(path, expect_model_id="synthetic", sru_impl=impl)[0] for impl in ("kernel", "torch")}
    assert type(models["torch"].encoder_rnn) is TorchSRU and type(models["kernel"].encoder_rnn) is sru_class()
    assert (models["torch"].sru_impl, models["kernel"].sru_impl) == ("torch", "kernel")
    rng = np.random.default_rng(4)
    for kind, shape in ((ENCODER, (6, 40)), (ENCODER, (1, 3)), (DECODER, (6, 9)), (DECODER, (2, 1))):
        tokens = torch.from_numpy(rng.integers(0, INFO.vocab_size, shape)).long()
        want, got = models["kernel"].forecast(kind, tokens), models["torch"].forecast(kind, tokens)
        assert got.shape == want.shape == (2, INFO.num_experts)
        # Loads are expected token counts (up to batch x capacity per expert).
        assert (got - want).abs().max().item() <= FORWARD_ATOL * shape[0] * INFO.expert_capacity
        with torch.no_grad():
            logits_want, logits_got = models["kernel"].logits(kind, tokens), models["torch"].logits(kind, tokens)
        assert (logits_got - logits_want).abs().max().item() <= FORWARD_ATOL

    # And back: a checkpoint saved from the PyTorch SRU loads into the kernel's.
    forecaster.save(path, models["torch"], INFO, {})
    again = forecaster.load(path, sru_impl="kernel")[0]
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), models["torch"].state_dict().values()))


def test_training_with_either_sru_gives_the_same_forecaster():
    """Seeded training, Adam and all, ends at the same weights (measured: 2.4e-7 apart after 3 epochs)."""
    from moe_common.traces import Pass

    info = TraceInfo(model_id="synthetic", model_source="test", vocab_size=16, num_experts=4, expert_capacity=64,
                     encoder_layers=[0, 1], decoder_layers=[2], layer_names=["l0", "l1", "l2"])
    rng = np.random.default_rng(0)
    passes = []
    for b in range(16):  # expert = f(token id) per layer, as in test_predictor's synthetic rule
        tokens = rng.integers(0, 16, (8, 12)).astype(np.int32)
        experts = np.stack([tokens % 4, (tokens // 4) % 4], -1).astype(np.int16)
        passes.append(Pass(b, ENCODER, 0, tokens, np.ones_like(tokens, bool), experts, np.zeros_like(experts, bool)))
        for step in range(4):
            tok = rng.integers(0, 16, (8, 1)).astype(np.int32)
            experts = (tok % 4)[..., None].astype(np.int16)
            passes.append(Pass(b, DECODER, step, tok, np.ones_like(tok, bool), experts, np.zeros_like(experts, bool)))
    runs = {impl: forecaster.train(info, passes, 16, seed=0, epochs=2, patience=5, lr=1e-2, hidden=16, embed_dim=8,
                                   bidirectional=True, progress=False, sru_impl=impl) for impl in ("kernel", "torch")}
    (kernel, kernel_report), (ours, our_report) = runs["kernel"], runs["torch"]
    assert ours.sru_impl == "torch" and kernel.sru_impl == "kernel"
    want, got = kernel.state_dict(), ours.state_dict()
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= FORWARD_ATOL
    for a, b in zip(kernel_report["epochs"], our_report["epochs"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=FORWARD_ATOL)
