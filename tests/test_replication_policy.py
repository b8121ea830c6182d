"""Replica planner and dispatch policies: exact expected outputs and properties."""

import random

import pytest

from gateway.replication import (Sharing, assign_layer, balancedness, choose_stand_ins, makespan, plan_replicas,
                                 prefetch_stages, server_loads, server_times, sharing_of, standby_needed,
                                 standby_replicas)
from moe_common.hardware import compute_domain, compute_share, usable_cpus
from moe_common.placement import home_placement


def test_whole_policy_sends_each_expert_to_one_holder():
    # e0 (10) may go to 0 or 1; e1 (4) and e3 (6) are fixed; e2 has no tokens.
    chunks = assign_layer([10, 4, 0, 6], [[0, 1], [1], [0], [1]], 2, "whole")
    assert chunks == [[(0, 10)], [(1, 4)], [], [(1, 6)]]


def test_split_policy_water_fills_in_contiguous_chunks():
    # fixed: server 1 has 4; e0 (10) levels both at 7; e3 (6) then levels both at 10.
    chunks = assign_layer([10, 4, 0, 6], [[0, 1], [1], [0], [1, 0]], 2, "split")
    assert chunks == [[(0, 7), (1, 3)], [(1, 4)], [], [(1, 3), (0, 3)]]
    assert server_loads(chunks, 2) == [10, 10]


def test_split_respects_speeds():
    # Server 1 is twice as fast: it takes two thirds of the hot expert.
    assert assign_layer([9], [[0, 1]], 2, "split", speeds=[1.0, 2.0]) == [[(0, 3), (1, 6)]]


def test_balancedness_is_vllms_definition():
    # sum of means (6 + 5) over sum of maxima (10 + 5)
    assert balancedness([[10, 2], [5, 5]]) == pytest.approx(11 / 15)
    assert balancedness([[0, 0]]) == 1.0


def test_plan_copies_the_hot_expert_to_the_idle_server():
    home = [[0, 1, 0, 1]]
    split = plan_replicas([[10, 1, 1, 1]], home, [2, 2], policy="split")
    assert split.replicas == {(0, 0, 1)} and split.makespan == 7 and split.baseline_makespan == 11
    # "whole" cannot split one hot expert; it moves the other load instead.
    whole = plan_replicas([[6, 1, 6, 1]], home, [2, 2], policy="whole")
    assert whole.replicas == {(0, 0, 1), (0, 1, 0)} and whole.makespan == 7 and whole.baseline_makespan == 12


def test_no_slots_no_replicas():
    plan = plan_replicas([[10, 1, 1, 1]], [[0, 1, 0, 1]], [0, 0])
    assert plan.replicas == set() and plan.makespan == plan.baseline_makespan == 11


def test_hysteresis_keeps_a_previous_plan_that_is_almost_as_good():
    home = [[0, 1, 0, 1]]
    loads = [[10, 1, 1, 1]]
    best = plan_replicas(loads, home, [2, 2], policy="split")
    # A previous plan as good as the best is kept as is.
    again = plan_replicas(loads, home, [2, 2], policy="split", previous=best.replicas)
    assert again.kept_previous and again.replicas == best.replicas
    # A useless previous plan is replaced.
    fresh = plan_replicas(loads, home, [2, 2], policy="split", previous={(0, 1, 0)})
    assert not fresh.kept_previous and fresh.replicas == best.replicas


def test_hysteresis_never_keeps_a_plan_worse_than_none():
    # Found by fuzzing: this previous plan forecasts 57 against 56 without replicas.
    previous = {(0, 2, 2), (0, 3, 1), (0, 3, 2), (0, 4, 2), (0, 6, 1), (0, 7, 0)}
    plan = plan_replicas([[10, 10, 18, 12, 46, 46, 20, 12]], [[0, 1, 2, 3, 0, 1, 2, 3]], [2, 2, 2, 1],
                         policy="split", previous=previous)
    assert not plan.kept_previous and plan.makespan <= plan.baseline_makespan


@pytest.mark.parametrize("group_cost", [0.0, 25.0])
@pytest.mark.parametrize("policy", ["whole", "split", "auto"])
def test_planner_properties_on_random_forecasts(policy, group_cost):
    rng = random.Random(0)
    for _ in range(300):
        layers, experts, servers = rng.randint(1, 4), rng.choice([4, 8, 16]), rng.randint(1, 4)
        home = home_placement(layers, experts, servers)
        # Skewed loads, as routers produce: a few hot experts.
        loads = [[rng.paretovariate(1.2) * 10 for _ in range(experts)] for _ in range(layers)]
        slots = [rng.randint(0, 4) for _ in range(servers)]
        previous = {(rng.randrange(layers), rng.randrange(experts), rng.randrange(servers)) for _ in range(3)}
        plan = plan_replicas(loads, home, slots, policy=policy, previous=previous, group_cost=group_cost)
        per_server = [sum(1 for r in plan.replicas if r[2] == s) for s in range(servers)]
        assert all(n <= cap for n, cap in zip(per_server, slots)), "over budget"
        assert all(s != home[layer][e] for layer, e, s in plan.replicas), "a replica on its home server"
        assert plan.makespan <= plan.baseline_makespan + 1e-9, "worse than no replication"
        assert plan.makespan == pytest.approx(makespan(loads, home, plan.replicas, servers, policy,
                                                       group_cost=group_cost))


@pytest.mark.parametrize("policy", ["whole", "split", "auto"])
def test_dispatch_covers_every_token_once(policy):
    rng = random.Random(1)
    for _ in range(50):
        servers, experts = rng.randint(1, 4), rng.randint(1, 12)
        counts = [rng.choice([0, 1, 3, 17, 64]) for _ in range(experts)]
        holders = [[rng.randrange(servers)] for _ in range(experts)]
        for h in holders:
            h.extend(s for s in range(servers) if s not in h and rng.random() < 0.4)
        chunks = assign_layer(counts, holders, servers, policy)
        for e, runs in enumerate(chunks):
            assert sum(n for _, n in runs) == counts[e]
            assert all(s in holders[e] and n > 0 for s, n in runs)
            if policy == "whole":
                assert len(runs) <= 1


def test_auto_keeps_a_layer_whole_unless_split_is_clearly_faster():
    # 6 experts of 10 tokens on 4 servers, every expert on servers 0 and 1 too: whole
    # leaves one server with 2 experts (20 tokens), split's greedy water-filling 16.
    holders = [[s, *sorted({0, 1} - {s})] for s in (0, 1, 2, 3, 2, 3)]
    counts = [10] * 6
    assert max(server_loads(assign_layer(counts, holders, 4, "whole"), 4)) == 20
    assert server_loads(assign_layer(counts, holders, 4, "split"), 4) == [15, 15, 14, 16]
    assert assign_layer(counts, holders, 4, "auto") == assign_layer(counts, holders, 4, "split")
    # Within 5% of split: whole (bit-identical). 3 experts on 2 servers, 21/20/20 tokens:
    # whole gives 41, split 31; 2 experts of 20 and 21: whole 21, split 21.
    assert assign_layer([21, 20], [[0, 1], [1, 0]], 2, "auto") == [[(0, 21)], [(1, 20)]]
    assert assign_layer([21, 20, 20], [[0, 1], [1, 0], [0, 1]], 2, "auto") == \
        assign_layer([21, 20, 20], [[0, 1], [1, 0], [0, 1]], 2, "split")
    # No expert with a second holder: whatever the policy, one run per expert.
    assert assign_layer([5, 7], [[0], [1]], 2, "auto") == [[(0, 5)], [(1, 7)]]
    with pytest.raises(ValueError):
        assign_layer([1], [[0]], 1, "fastest")


def test_a_group_cost_makes_split_split_only_where_it_pays():
    # Expert 0 (30 tokens) on idle servers 0 and 1, server 1 busy with 5 tokens of expert 1.
    counts, holders = [30, 5], [[0, 1], [1]]
    # No group cost: level 17.5 -> 18 and 12 tokens (the remainder to server 0).
    assert assign_layer(counts, holders, 2, "split") == [[(0, 18), (1, 12)], [(1, 5)]]
    # A group costs 20 tokens: server 1 is busy until 5 + 20 and its chunk costs another
    # group, so it starts at 45 while server 0 starts at 20; the level is 47.5, so it takes
    # 2 tokens (48 and 47 against 50 whole)...
    chunks = assign_layer(counts, holders, 2, "split", group_cost=20)
    assert chunks == [[(0, 28), (1, 2)], [(1, 5)]]
    assert server_times(chunks, 2, [1.0, 1.0], 20) == [48, 47]
    # ...but with 10 tokens the level is 30 < 45: whole on server 0.
    assert assign_layer([10, 5], holders, 2, "split", group_cost=20) == [[(0, 10)], [(1, 5)]]
    # The planner counts groups: a replica whose chunk would cost more than it saves is not made.
    home = [[0, 1]]
    assert plan_replicas([[30, 5]], home, [1, 1], policy="split").replicas == {(0, 0, 1)}
    assert makespan([[30, 5]], home, set(), 2, group_cost=100) == 130
    assert plan_replicas([[30, 5]], home, [1, 1], policy="split", group_cost=100).replicas == set()


def test_prefetch_stages_load_the_first_layers_first():
    had = {(0, 1), (2, 5), (3, 0)}
    want = {(0, 1), (0, 2), (1, 7), (2, 5), (3, 3)}
    # New replicas in layers 0, 1 and 3; (3, 0) is dropped at once; (2, 5) is kept throughout.
    assert prefetch_stages(want, had) == [{(0, 1), (0, 2), (2, 5)}, {(0, 1), (0, 2), (1, 7), (2, 5)}, want]
    assert prefetch_stages({(1, 1), (1, 2)}, set()) == [{(1, 1), (1, 2)}]  # one layer: one call
    assert prefetch_stages(set(), had) == [set()]
    assert prefetch_stages({(2, 5)}, had) == [{(2, 5)}]


def test_stand_ins_go_to_the_least_busy_healthy_servers():
    # Server 1 is suspect (not a candidate). Largest orphan first, ties by expert: expert 4
    # (9 tokens) to server 2 (busy 0 -> 9), expert 2 (5) to server 0 (3 -> 8), expert 7 (5)
    # to server 0 (8 < 9 -> 13), expert 6 (1) to server 2 (9 < 13).
    assert choose_stand_ins([(2, 5), (4, 9), (7, 5), (6, 1)], candidates=[0, 2], busy=[3, 50, 0], held=[4, 4, 4]) \
        == {4: 2, 2: 0, 7: 0, 6: 2}
    # Equal tokens: the server holding fewer experts, then the lower index.
    assert choose_stand_ins([(1, 2)], [0, 1, 2], busy=[0, 0, 0], held=[5, 3, 3]) == {1: 1}
    assert choose_stand_ins([(1, 2)], [], busy=[0], held=[0]) == {}


def test_standby_replicas_follow_the_ring_within_slots():
    home = [[0, 1, 2, 0], [1, 2, 0, 1]]
    assert standby_needed(home, 2, 3) == 8
    assert standby_replicas(home, 2, [10, 10, 10]) == {
        (0, 0, 1), (0, 1, 2), (0, 2, 0), (0, 3, 1), (1, 0, 2), (1, 1, 0), (1, 2, 1), (1, 3, 2)}
    # K=3 on 3 servers: every expert everywhere.
    assert len(standby_replicas(home, 3, [10, 10, 10])) == standby_needed(home, 3, 3) == 16
    # Server 1 has one slot: the next expert that would go there skips on to the next server.
    assert standby_replicas(home, 2, [10, 1, 10]) == {
        (0, 0, 1), (0, 1, 2), (0, 2, 0), (0, 3, 2), (1, 0, 2), (1, 1, 0), (1, 2, 2), (1, 3, 2)}
    assert standby_replicas(home, 1, [10, 10, 10]) == set()


def test_plans_always_hold_the_standbys():
    home = home_placement(2, 8, 2)
    standby = standby_replicas(home, 2, [8, 8])
    loads = [[40, 1, 1, 1, 1, 1, 1, 1], [1] * 8]
    plan = plan_replicas(loads, home, [8, 8], standby=standby)
    assert plan.replicas == standby  # the slots are all standbys; the hot expert already has its copy
    assert plan.makespan < plan.baseline_makespan
    kept = plan_replicas(loads, home, [9, 9], standby=standby, previous={(0, 0, 1)} | standby)
    assert standby <= kept.replicas
    with pytest.raises(ValueError):
        plan_replicas(loads, home, [3, 3], standby=standby)


def test_sharing_bounds_a_layer_by_its_busiest_compute_domain():
    # Servers alone would take 6, 2, 1, 1; sharing half a host each, the host needs (6+2+1+1)/2.
    shared = sharing_of(["h", "h", "h", "h"], [0.5, 0.5, 0.5, 0.5])
    assert shared == Sharing([0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5])
    assert shared.span([6, 2, 1, 1]) == 6 and shared.span([3, 3, 2, 2]) == 5
    two_hosts = sharing_of(["a", "b", "a", "b"], [1.0, 0.5, 1.0, 0.5])
    assert two_hosts == Sharing([0, 1, 0, 1], [1.0, 0.5, 1.0, 0.5])
    assert two_hosts.span([1, 4, 2, 4]) == 4 and two_hosts.span([3, 1, 3, 1]) == 6
    # No domain oversubscribed (shares sum to at most 1): nothing to model.
    assert sharing_of(["a", "a", "b"], [0.5, 0.5, 1.0]) is None
    assert sharing_of([], []) is None


def test_the_planner_moves_no_weights_that_shared_hardware_would_not_use():
    home, slots = [[0, 1, 2, 3]], [2, 2, 2, 2]
    shared = sharing_of(["h"] * 4, [0.5] * 4)  # four one-thread servers on a 2-core host
    # Alone, split levels the hot expert over idle servers: 10 tokens in 3 per server.
    alone = plan_replicas([[6, 2, 1, 1]], home, slots, policy="split")
    assert alone.makespan == 3 and alone.baseline_makespan == 6
    # Sharing the host, a layer takes at least (6+2+1+1)/2 = 5: one replica gets there, more do not help.
    plan = plan_replicas([[6, 2, 1, 1]], home, slots, policy="split", sharing=shared)
    assert plan.replicas == {(0, 0, 2)} and plan.makespan == 5 and plan.baseline_makespan == 6
    # Bound by the host from the start: no replica at all, not even on a plateau.
    assert plan_replicas([[4, 2, 2, 2]], home, slots, policy="split").replicas
    bound = plan_replicas([[4, 2, 2, 2]], home, slots, policy="split", sharing=shared)
    assert bound.replicas == set() and bound.makespan == bound.baseline_makespan == 5
    # The same with whole experts: server 0 holds 3 + 2 of 10 tokens, as long as the host needs.
    assert plan_replicas([[3, 2, 3, 2]], [[0, 0, 1, 2]], slots, policy="whole").makespan == 3
    whole = plan_replicas([[3, 2, 3, 2]], [[0, 0, 1, 2]], slots, policy="whole", sharing=shared)
    assert whole.replicas == set() and whole.makespan == 5


@pytest.mark.parametrize("policy", ["whole", "split", "auto"])
def test_planner_properties_with_shared_hardware(policy):
    rng = random.Random(2)
    for _ in range(200):
        layers, experts, servers = rng.randint(1, 3), rng.choice([4, 8]), rng.randint(2, 4)
        home = home_placement(layers, experts, servers)
        loads = [[rng.paretovariate(1.2) * 10 for _ in range(experts)] for _ in range(layers)]
        slots = [rng.randint(0, 3) for _ in range(servers)]
        sharing = sharing_of([rng.choice("ab") for _ in range(servers)], [rng.choice([0.5, 1.0]) for _ in range(servers)])
        plan = plan_replicas(loads, home, slots, policy=policy, sharing=sharing)
        assert plan.makespan <= plan.baseline_makespan + 1e-9
        assert plan.makespan == pytest.approx(makespan(loads, home, plan.replicas, servers, policy, sharing=sharing))
        # Every replica in the plan was added because it shortened the forecast: dropping
        # all of them never gives a shorter one.
        assert makespan(loads, home, set(), servers, policy, sharing=sharing) >= plan.makespan - 1e-9


def test_compute_share_of_a_server():
    cpus = usable_cpus()
    assert compute_share("cpu", 1) == pytest.approx(1 / cpus)
    assert compute_share("cpu", cpus * 4) == 1.0  # more threads than cores: the whole host, no more
    assert compute_share("cuda:0", 8) == 0.0  # launch-bound groups leave a GPU room for others: no bound
    assert compute_domain("cpu") == compute_domain("cpu") and compute_domain("cpu").endswith("/cpu")
