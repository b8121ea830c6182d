"""moe-predictor: the command of the predictor service (collect, train, eval, serve).

The forecaster is not built yet; the command exists so that deploy scripts and
packaging already name it. It says so and exits with status 2 rather than pretend.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    print(
        "moe-predictor: the predictor service is not implemented yet (see the issue "
        "'Predictor service'); the gateway serves without load forecasts.",
        file=sys.stderr,
    )
    return 2
