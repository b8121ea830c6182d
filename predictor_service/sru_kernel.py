"""Loading the SRU, whose import JIT-compiles a C++ kernel (torch.utils.cpp_extension):
a missing compiler becomes an error that says how to fix it. No torch import here, so
the CLI can name the error without loading torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings


class SruKernelUnavailable(RuntimeError):
    """The SRU's C++ kernel could not be built (most often: no C++ compiler)."""


def sru_class():
    """sru.SRU, importing (and on first use compiling) it; SruKernelUnavailable when the build fails."""
    # Importing sru JIT-compiles its CPU kernel (~30-45 s the first time, then cached).
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
        raise SruKernelUnavailable(
            f"the SRU forecaster compiles a C++ kernel once (then cached), and {cause}. Install a compiler "
            "(Debian/Ubuntu: apt-get install g++; or set CXX) and run again. Serving without "
            "--predictor-checkpoint (history forecasts) needs no compiler.") from exc
    return SRU
