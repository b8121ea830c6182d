"""moe_bench.noise: exact values (issue 15, item 8)."""

import pytest

from moe_bench.noise import noisy, spread


def test_spread_exact():
    assert spread([100.0, 100.0]) == 0.0
    assert spread([90.0, 110.0]) == pytest.approx(0.2)
    assert spread([50.0, 100.0, 150.0]) == pytest.approx(1.0)
    assert spread([100.0]) is None and spread([]) is None and spread([0.0, 0.0]) is None


def test_noisy_flags_figures_beyond_the_baselines_spread():
    figures = {"2/off": [100.0, 104.0], "1/off": [259.0, 600.0], "2/window": [100.0]}
    # Baseline rounds 10% apart: only the one-server run (spread 0.79) is beyond it.
    assert noisy(figures, [95.0, 105.0]) == pytest.approx({"1/off": 341.0 / 429.5})
    # A quiet baseline: the floor (5%) applies, 4% passes.
    assert noisy(figures, [100.0, 100.0]) == pytest.approx({"1/off": 341.0 / 429.5})
    assert noisy(figures, [100.0, 100.0], floor=0.01) == pytest.approx({"2/off": 4.0 / 102.0, "1/off": 341.0 / 429.5})


def test_the_report_says_which_figures_are_noisy():
    import json
    from pathlib import Path

    from moe_bench import report

    result = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench.json").read_text())
    result.pop("noise", None)
    quiet = report.markdown(result)
    assert "**Noisy**" not in quiet
    result["noise"] = {"baseline_spread": 0.1, "round_rates": {}, "flagged": {"1/off": 0.79, "2/window": 0.2}}
    text = report.markdown(result)
    assert ("**Noisy**: rounds that differ by more than the single-process model's rounds (10%, this run's noise): "
            "1 expert server, mode off 79%, 2 expert servers, mode window 20%; read those figures as uncertain by that much.") in text
    if result.get("one_server"):
        assert "the single-process model (noisy: its rounds differ by 79%)." in text
