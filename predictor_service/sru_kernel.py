"""Choosing the SRU implementation. sru.SRU's import JIT-compiles a C++ kernel
(torch.utils.cpp_extension), which needs a C++ compiler; predictor_service.sru_torch is the
same recurrence in plain PyTorch (same state dict, same outputs to float rounding), slower.

  kernel  sru.SRU; a missing compiler is an error that says how to fix it
  torch   the PyTorch SRU; nothing is compiled
  auto    the kernel when it builds, else the PyTorch SRU with one warning saying so

No torch import here, so the CLI can name the error without loading torch."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import warnings

log = logging.getLogger(__name__)

SRU_IMPLS = ("auto", "kernel", "torch")
# Why auto fell back, once it has: later models built in this process use the PyTorch SRU
# without trying (and failing) to build the kernel again, or warning again.
_kernel_error: SruKernelUnavailable | None = None


class SruKernelUnavailable(RuntimeError):
    """The SRU's C++ kernel could not be built (most often: no C++ compiler).
    `cause`: why, in a few words (or the build's error)."""

    cause: str = ""


def sru_class():
    """sru.SRU, importing (and on first use compiling) it; SruKernelUnavailable when the build fails."""
    # Importing sru JIT-compiles its CPU kernel (~30-45 s the first time, then cached).
    # torch.utils.cpp_extension logs a "compiler not compatible" banner per build attempt when
    # the compiler is missing; the error or warning below says that plainly, once.
    builder_log = logging.getLogger("torch.utils.cpp_extension")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CUDA kernels unavailable" on CPU-only machines: harmless
            from sru import SRU
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        # torch.utils.cpp_extension reports a missing compiler as "Error building extension
        # 'sru_cpu'" with the compiler's "not found" buried in its output: say what to do.
        compiler = os.environ.get("CXX", "c++")
        found = shutil.which(compiler)
        cause = (f"no C++ compiler: {compiler!r} is not on PATH" if found is None
                 else f"building it with {found} failed: {exc}")
        error = SruKernelUnavailable(
            f"the SRU forecaster compiles a C++ kernel once (then cached), and {cause}. Install a compiler "
            "(Debian/Ubuntu: apt-get install g++; or set CXX) and run again. Serving without "
            "--predictor-checkpoint (history forecasts) needs no compiler; --sru-impl torch (or auto) uses "
            "the slower pure-PyTorch SRU instead.")
        error.cause = cause
        raise error from exc
    finally:
        builder_log.setLevel(level)
    return SRU


def sru_impl_class(impl: str = "auto"):
    """The SRU class to build for `impl` (one of SRU_IMPLS); its constructor takes
    (input_size, hidden_size, num_layers=, bidirectional=) and its state dict is sru's."""
    if impl not in SRU_IMPLS:
        raise ValueError(f"SRU implementation {impl!r} is not one of {', '.join(SRU_IMPLS)}")
    global _kernel_error
    if impl == "kernel" or (impl == "auto" and _kernel_error is None):
        try:
            return sru_class()
        except SruKernelUnavailable as exc:
            if impl == "kernel":
                raise
            _kernel_error = exc
            log.warning("the SRU's C++ kernel could not be built (%s); using the pure-PyTorch SRU instead: the same "
                        "forecasts, up to ~2x slower on long sequences (a Python loop over positions). For the "
                        "kernel, install a C++ compiler (Debian/Ubuntu: apt-get install g++; or set CXX); "
                        "--sru-impl torch skips this attempt",
                        exc.cause)
    from predictor_service.sru_torch import TorchSRU

    return TorchSRU
