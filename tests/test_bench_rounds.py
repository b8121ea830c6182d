"""moe_bench.rounds: the measuring order, exact values (issue 15, item 8: the one-server
run inside the ABBA rounds)."""

from moe_bench.rounds import MONOLITHIC, abba_order, configurations, server_segments

M = (0, MONOLITHIC)


def test_configurations():
    assert configurations([2], ["off", "window"], one_server=True) == [M, (2, "off"), (2, "window"), (1, "off")]
    assert configurations([2], ["off"], one_server=False) == [M, (2, "off")]
    # One server is already a count: not run twice.
    assert configurations([1, 2], ["off"], one_server=True) == [M, (1, "off"), (2, "off")]


def test_two_rounds_put_the_single_process_model_first_and_last_and_the_one_server_run_inside():
    steps = abba_order(configurations([2], ["off", "window"], one_server=True), 2)
    assert steps == [(M, 0), ((2, "off"), 0), ((2, "window"), 0), ((1, "off"), 0),
                     ((1, "off"), 1), ((2, "window"), 1), ((2, "off"), 1), (M, 1)]
    assert server_segments(steps) == [(0, [(MONOLITHIC, 0)]), (2, [("off", 0), ("window", 0)]),
                                      (1, [("off", 0), ("off", 1)]), (2, [("window", 1), ("off", 1)]),
                                      (0, [(MONOLITHIC, 1)])]


def test_three_rounds_and_two_server_counts():
    configs = configurations([2, 4], ["off"], one_server=True)
    assert abba_order(configs, 3) == [(M, 0), ((2, "off"), 0), ((4, "off"), 0), ((1, "off"), 0),
                                      ((1, "off"), 1), ((4, "off"), 1), ((2, "off"), 1), (M, 1),
                                      (M, 2), ((2, "off"), 2), ((4, "off"), 2), ((1, "off"), 2)]
    assert [n for n, _ in server_segments(abba_order(configs, 3))] == [0, 2, 4, 1, 4, 2, 0, 2, 4, 1]
    assert abba_order(configs, 1) == [(c, 0) for c in configs]
