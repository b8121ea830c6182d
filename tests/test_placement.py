import pytest

from moe_common.placement import experts_of_server, home_placement


def test_round_robin_rotating_by_layer():
    assert home_placement(3, 5, 2) == [
        [0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1],
        [0, 1, 0, 1, 0],
    ]


def test_single_server_holds_everything():
    assert home_placement(2, 4, 1) == [[0, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("layers, experts, servers", [(6, 8, 3), (12, 128, 4), (2, 3, 5)])
def test_each_layer_is_even(layers, experts, servers):
    for row in home_placement(layers, experts, servers):
        counts = [row.count(s) for s in range(servers)]
        assert max(counts) - min(counts) <= 1
        assert sum(counts) == experts


def test_extra_experts_rotate_across_servers():
    # 5 experts on 2 servers: the 3rd expert of a layer alternates between servers.
    home = home_placement(2, 5, 2)
    assert [row.count(0) for row in home] == [3, 2]


def test_experts_of_server():
    home = home_placement(2, 3, 2)
    assert experts_of_server(home, 0) == [(0, 0), (0, 2), (1, 1)]
    assert experts_of_server(home, 1) == [(0, 1), (1, 0), (1, 2)]


def test_needs_a_server():
    with pytest.raises(ValueError):
        home_placement(1, 1, 0)
