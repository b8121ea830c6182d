"""A missing C++ compiler for the SRU's kernel is a clear error naming the fix (issue 15, item 5).

The failure is simulated where it happens: torch.utils.cpp_extension.load raising the
RuntimeError it raises when the build fails, on a fresh import of sru, with CXX naming a
compiler that does not exist."""

from __future__ import annotations

import sys

import pytest
import torch.utils.cpp_extension

from predictor_service import cli
from predictor_service.sru_kernel import SruKernelUnavailable, sru_class


@pytest.fixture
def no_compiler(monkeypatch):
    for name in [m for m in sys.modules if m == "sru" or m.startswith("sru.")]:
        monkeypatch.delitem(sys.modules, name)  # restored afterwards, so other tests keep the built kernel

    def load(name, *args, **kwargs):
        raise RuntimeError(f"Error building extension '{name}': /bin/sh: 1: c++: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")


def test_missing_compiler_names_the_fix(no_compiler):
    with pytest.raises(SruKernelUnavailable) as info:
        sru_class()
    message = str(info.value)
    assert "no C++ compiler: 'no-such-c++-compiler' is not on PATH" in message
    assert "apt-get install g++" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_the_cli_prints_it_instead_of_a_traceback(no_compiler, tmp_path, capsys, monkeypatch):
    from predictor_service import forecaster

    cfg = forecaster.ForecasterConfig(vocab_size=16, num_experts=4, num_encoder_layers=1, num_decoder_layers=1,
                                      expert_capacity=4)

    def build_a_forecaster(a):
        forecaster.Forecaster(cfg)  # what train, eval --checkpoint and serve --checkpoint do first
        return 0

    monkeypatch.setattr(cli, "cmd_corpus", build_a_forecaster)  # the subcommand runs it through main()
    assert cli.main(["corpus", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-predictor corpus: the SRU forecaster compiles a C++ kernel") and "apt-get install g++" in err


def test_with_a_compiler_the_kernel_loads():
    assert sru_class().__name__ == "SRU"
