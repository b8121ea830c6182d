"""Without a C++ compiler for the SRU's kernel (issue 15, item 5): --sru-impl kernel is a
clear error naming the fix; auto (the default) falls back to the pure-PyTorch SRU with one
warning, and eval and serve give the kernel's forecasts.

In process, the failure is simulated where it happens: torch.utils.cpp_extension.load raising
the RuntimeError it raises when the build fails, on a fresh import of sru, with CXX naming a
compiler that does not exist. In subprocesses it is real: CXX names no compiler and
TORCH_EXTENSIONS_DIR is empty, so sru's import tries a build, and the build fails."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.utils.cpp_extension

from gateway.launcher import wait_ready
from moe_common import serving
from moe_common.traces import DECODER, ENCODER, Pass, TraceInfo, TraceWriter
from moe_protos.moe.predictor.v1 import predictor_pb2 as pb
from moe_protos.moe.predictor.v1 import predictor_pb2_grpc
from predictor_service import cli, forecaster, sru_kernel
from predictor_service.sru_kernel import SruKernelUnavailable, sru_class
from predictor_service.sru_torch import TorchSRU
from tests.conftest import channel, stop


@pytest.fixture
def no_compiler(monkeypatch):
    for name in [m for m in sys.modules if m == "sru" or m.startswith("sru.")]:
        monkeypatch.delitem(sys.modules, name)  # restored afterwards, so other tests keep the built kernel

    def load(name, *args, **kwargs):
        raise RuntimeError(f"Error building extension '{name}': /bin/sh: 1: c++: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    monkeypatch.setattr(sru_kernel, "_kernel_error", None)  # auto has not tried (and failed) in this process yet


def test_missing_compiler_names_the_fix(no_compiler):
    with pytest.raises(SruKernelUnavailable) as info:
        sru_class()
    message = str(info.value)
    assert "no C++ compiler: 'no-such-c++-compiler' is not on PATH" in message
    assert "apt-get install g++" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_the_cli_prints_it_instead_of_a_traceback(no_compiler, tmp_path, capsys, monkeypatch):
    cfg = forecaster.ForecasterConfig(vocab_size=16, num_experts=4, num_encoder_layers=1, num_decoder_layers=1,
                                      expert_capacity=4)

    def build_a_forecaster(a):
        forecaster.Forecaster(cfg, "kernel")  # what train, eval and serve --sru-impl kernel do first
        return 0

    monkeypatch.setattr(cli, "cmd_corpus", build_a_forecaster)  # the subcommand runs it through main()
    assert cli.main(["corpus", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-predictor corpus: the SRU forecaster compiles a C++ kernel") and "apt-get install g++" in err


def test_with_a_compiler_the_kernel_loads():
    assert sru_class().__name__ == "SRU"


def test_auto_falls_back_to_the_pytorch_sru_with_one_warning(no_compiler, caplog):
    cfg = forecaster.ForecasterConfig(vocab_size=16, num_experts=4, num_encoder_layers=1, num_decoder_layers=1,
                                      expert_capacity=4)
    with caplog.at_level(logging.INFO):
        models = [forecaster.Forecaster(cfg), forecaster.Forecaster(cfg, "auto")]
    assert all(type(m.encoder_rnn) is TorchSRU and type(m.decoder_rnn) is TorchSRU for m in models)
    said = [r for r in caplog.records if r.name == "predictor_service.sru_kernel"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING  # once, not per model or per SRU
    message = said[0].getMessage()
    assert message.startswith("the SRU's C++ kernel could not be built (no C++ compiler: 'no-such-c++-compiler' "
                              "is not on PATH); using the pure-PyTorch SRU instead")
    assert "apt-get install g++" in message
    with pytest.raises(SruKernelUnavailable):  # kernel asks again, and says why it cannot
        forecaster.Forecaster(cfg, "kernel")


# ---- eval and serve in processes without a compiler ----

INFO = TraceInfo(model_id="synthetic", model_source="test", vocab_size=40, num_experts=8, expert_capacity=5,
                 encoder_layers=[0, 1], decoder_layers=[2], layer_names=["l0", "l1", "l2"])


@pytest.fixture(scope="module")
def checkpoint_and_traces(tmp_path_factory):
    """A forecaster (random weights, saved as training saves one) and traces to evaluate it on."""
    d = tmp_path_factory.mktemp("sru-fallback")
    torch.manual_seed(0)
    cfg = forecaster.ForecasterConfig(INFO.vocab_size, INFO.num_experts, 2, 1, INFO.expert_capacity)
    forecaster.save(d / "f.pt", forecaster.Forecaster(cfg, "kernel"), INFO, {})
    rng = np.random.default_rng(0)
    writer = TraceWriter(d / "traces", INFO)
    for b in range(6):
        for kind, step, shape in [(ENCODER, 0, (3, 20, 2))] + [(DECODER, s, (3, 1, 1)) for s in range(4)]:
            experts = rng.integers(0, INFO.num_experts, shape).astype(np.int16)
            tokens = rng.integers(0, INFO.vocab_size, shape[:2]).astype(np.int32)
            writer.add(Pass(b, kind, step, tokens, np.ones(shape[:2], bool), experts, np.zeros(shape, bool)))
    writer.close()
    return d


def no_compiler_env(tmp_path) -> dict[str, str]:
    """A process in which building the kernel fails for real: no compiler, nothing built before."""
    (tmp_path / "torch-extensions").mkdir(exist_ok=True)
    return {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch-extensions")}


def predictor(args, env=None):
    return subprocess.run([sys.executable, "-m", "predictor_service", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_eval_without_a_compiler_falls_back_and_scores_as_the_kernel(checkpoint_and_traces, tmp_path):
    d = checkpoint_and_traces
    args = ["eval", "--traces", str(d / "traces"), "--checkpoint", str(d / "f.pt"), "--json"]
    with_kernel = predictor([*args, "--sru-impl", "kernel"])
    assert with_kernel.returncode == 0, with_kernel.stderr[-2000:]
    without = predictor(args, no_compiler_env(tmp_path))
    assert without.returncode == 0, without.stderr[-2000:]
    warnings = [line for line in without.stderr.splitlines() if "WARNING" in line or "!!" in line]
    assert len(warnings) == 1 and "using the pure-PyTorch SRU instead" in warnings[0], without.stderr[-2000:]
    assert not list((tmp_path / "torch-extensions").rglob("*.so"))  # nothing was built
    want, got = (json.loads(run.stdout)["methods"]["sru"] for run in (with_kernel, without))
    for stack in ("encoder", "decoder"):
        assert got[stack]["load_l1"] == pytest.approx(want[stack]["load_l1"], abs=1e-6)
        assert got[stack]["hot_recall"] == want[stack]["hot_recall"]
    assert got["top1_agreement"] == want["top1_agreement"]

    forced = predictor([*args, "--sru-impl", "kernel"], no_compiler_env(tmp_path))
    assert forced.returncode == 2
    assert forced.stderr.startswith("moe-predictor eval: the SRU forecaster compiles a C++ kernel once")
    assert "apt-get install g++" in forced.stderr and "Traceback" not in forced.stderr


def test_serve_without_a_compiler_gives_the_kernels_forecasts(checkpoint_and_traces, tmp_path):
    d = checkpoint_and_traces
    model = forecaster.load(d / "f.pt", sru_impl="kernel")[0]
    port = serving.pick_free_port()
    log_path = tmp_path / "predictor.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "predictor_service", "serve", "--checkpoint", str(d / "f.pt"),
                                 "--port", str(port)], stdout=log_file, stderr=subprocess.STDOUT,
                                env={**no_compiler_env(tmp_path), serving.PARENT_PID_ENV: str(os.getpid())})
    try:
        wait_ready(proc, f"127.0.0.1:{port}", 300)
        with channel(f"127.0.0.1:{port}") as ch:
            stub = predictor_pb2_grpc.PredictorServiceStub(ch)
            assert "(the pure-PyTorch SRU)" in stub.GetStatus(pb.GetStatusRequest()).note
            rng = np.random.default_rng(1)
            for kind, wire_kind, shape in ((ENCODER, pb.PASS_KIND_ENCODER, (4, 30)), (DECODER, pb.PASS_KIND_DECODER, (4, 6))):
                tokens = rng.integers(0, INFO.vocab_size, shape)
                reply = stub.Forecast(pb.ForecastRequest(kind=wire_kind, batch_size=shape[0], seq_len=shape[1],
                                                         token_ids=tokens.ravel().tolist()))
                got = np.array([list(f.load) for f in reply.layers])
                want = model.forecast(kind, torch.from_numpy(tokens).long()).numpy()
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * shape[0] * INFO.expert_capacity)
    finally:
        stop(proc)
    log = log_path.read_text()
    assert log.count("using the pure-PyTorch SRU instead") == 1, log[-2000:]
