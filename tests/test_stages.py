"""Pipeline stages: which cuts are free, what a cut carries, estimated work, and balanced plans."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

import layerwise as lw
from layerwise.errors import LayerwiseError
from layerwise.factory import build_model, load_recipe
from layerwise.stages import (
    StagePlan,
    block_costs,
    boundary_tensors,
    crossing_blocks,
    describe_plan,
    free_cuts,
    plan_stages,
)

BP1_CROSSES = "the cut after 'bp1' is not free: the global gradient to backprop block 'bp1' crosses it"


@pytest.fixture(scope="module")
def hybrid():
    return build_model(load_recipe("mnist_hybrid"))  # hsic1, bp1, hsic2, head


@pytest.fixture(scope="module")
def hsic():
    return build_model(load_recipe("mnist_hsic"))  # hsic1..hsic5, detached head


def local(name, width_in, width_out, **kwargs):
    return lw.Block(name, nn.Linear(width_in, width_out), lw.objective("localce"), **kwargs)


def chain(n=4, width=6):
    """``n`` local blocks in a row: every cut is free."""
    return lw.Network([local(f"b{i}", width, width) for i in range(n - 1)] + [local("head", width, 3)],
                      input_shape=(width,))


def costs_of(net, values):
    return dict(zip(net.order, map(float, values), strict=True))


# ----------------------------------------------------------------------------- free cuts


def test_every_cut_of_the_hsic_network_is_free(hsic):
    assert free_cuts(hsic) == [1, 2, 3, 4, 5]
    assert all(crossing_blocks(hsic, k) == [] for k in range(1, 6))


def test_only_the_cut_after_hsic1_is_free_in_the_hybrid_network(hybrid):
    assert hybrid.order == ["hsic1", "bp1", "hsic2", "head"]
    assert free_cuts(hybrid) == [1]
    # After hsic2 too, what crosses is the gradient to bp1 (it flows through the local hsic2).
    assert crossing_blocks(hybrid, 2) == crossing_blocks(hybrid, 3) == ["bp1"]
    assert crossing_blocks(hybrid, 1) == []


def test_a_cut_past_the_head_is_free_when_nothing_after_it_leads_to_the_head():
    # 'side' reads 'late' but is declared before it, so it is evaluated after the head.
    net = lw.Network([
        lw.Block("a", nn.Linear(4, 6)),
        local("side", 6, 6, inputs=["late"]),
        local("late", 6, 6, inputs=["a"]),
        lw.Block("head", nn.Linear(6, 3), inputs=["a"]),
    ], input_shape=(4,))
    assert net.order == ["a", "late", "head", "side"]
    assert free_cuts(net) == [3]
    assert crossing_blocks(net, 1) == crossing_blocks(net, 2) == ["a"]


def test_a_frozen_path_is_named_when_no_trained_backprop_block_crosses():
    net = lw.Network([
        local("l1", 4, 6),
        lw.Block("frozen", nn.Linear(6, 6), freeze=True),
        lw.Block("bp", nn.Linear(6, 6)),
        lw.Block("head", nn.Linear(6, 3)),
    ], input_shape=(4,))
    assert free_cuts(net) == [1, 2]  # the frozen block gets no gradient, so nothing crosses after it
    assert crossing_blocks(net, 3) == ["bp"]


def test_a_cut_position_out_of_range_is_refused(hybrid):
    for k in (0, 4):
        with pytest.raises(LayerwiseError, match=f"cut position {k} is out of range.*positions 1 to 3"):
            crossing_blocks(hybrid, k)


# ----------------------------------------------------------------------------- boundaries


def test_boundary_tensors_follow_a_skip_connection():
    net = lw.Network([
        local("a", 4, 6),
        local("b", 6, 6),
        local("c", 12, 6, inputs=["a", "b"]),
        local("d", 4, 5, inputs=["input"]),  # reads the network input: no stage sends it
        local("head", 11, 3, inputs=["c", "d"]),
    ], input_shape=(4,))
    assert net.order == ["a", "d", "b", "c", "head"]
    assert boundary_tensors(net, 1) == ["a"]
    assert boundary_tensors(net, 2) == ["a", "d"]
    assert boundary_tensors(net, 3) == ["a", "d", "b"]
    assert boundary_tensors(net, 4) == ["d", "c"]
    plan = plan_stages(net, 2, costs_of(net, [1] * 5), cuts=["b"])
    assert plan.cuts == [3] and plan.boundaries == [["a", "d", "b"]]


# ----------------------------------------------------------------------------- planning


@pytest.mark.parametrize(("values", "n", "stages", "costs"), [
    ([1, 1, 1, 1], 2, [["b0", "b1"], ["b2", "head"]], [2, 2]),
    ([3, 1, 1, 1], 2, [["b0"], ["b1", "b2", "head"]], [3, 3]),
    ([1, 1, 1, 1], 3, [["b0"], ["b1"], ["b2", "head"]], [1, 1, 2]),  # ties: the earliest cuts
    ([1, 1, 1, 1], 1, [["b0", "b1", "b2", "head"]], [4]),
    ([5, 1, 1, 1], 4, [["b0"], ["b1"], ["b2"], ["head"]], [5, 1, 1, 1]),
])
def test_plans_balance_the_largest_stage(values, n, stages, costs):
    net = chain()
    plan = plan_stages(net, n, costs_of(net, values))
    assert isinstance(plan, StagePlan)
    assert plan.stages == stages and plan.costs == costs
    assert plan.cuts == list(itertools.accumulate(len(s) for s in stages))[:-1]
    assert sum(plan.shares) == pytest.approx(1.0)
    assert plan.shares[0] == pytest.approx(costs[0] / sum(costs))


def test_plans_match_a_brute_force_search():
    rng = random.Random(0)
    net = chain(7)
    for _ in range(20):
        values = [rng.randint(1, 9) for _ in net.order]
        n = rng.randint(1, 7)
        plan = plan_stages(net, n, costs_of(net, values))

        def largest(cuts, values=values):
            bounds = [0, *cuts, len(values)]
            return max(sum(values[a:b]) for a, b in itertools.pairwise(bounds))

        best = min(itertools.combinations(range(1, 7), n - 1), key=largest)  # earliest among equals
        assert plan.cuts == list(best), (values, n)
        assert max(plan.costs) == largest(best)


def test_plans_use_only_free_cuts(hybrid):
    plan = plan_stages(hybrid, 2, costs_of(hybrid, [1, 1, 1, 1]))
    assert plan.stages == [["hsic1"], ["bp1", "hsic2", "head"]]
    assert plan.boundaries == [["hsic1"]]


def test_too_many_stages_are_refused_with_the_reason(hybrid):
    costs = costs_of(hybrid, [1, 1, 1, 1])
    with pytest.raises(LayerwiseError) as info:
        plan_stages(hybrid, 3, costs)
    message = str(info.value)
    assert "\n" not in message
    assert "only 1 of its 3 cuts is free, so at most 2 stages are possible" in message
    assert message.endswith(BP1_CROSSES)
    with pytest.raises(LayerwiseError, match="cannot cut 4 blocks into 5 stages"):
        plan_stages(hybrid, 5, costs)
    with pytest.raises(LayerwiseError, match="at least 1, found 0"):
        plan_stages(hybrid, 0, costs)


def test_named_cuts_are_taken_or_refused(hybrid, hsic):
    costs = costs_of(hybrid, [1, 1, 1, 1])
    assert plan_stages(hybrid, 2, costs, cuts=["hsic1"]).cuts == [1]
    with pytest.raises(LayerwiseError, match=BP1_CROSSES):
        plan_stages(hybrid, 2, costs, cuts=["bp1"])
    with pytest.raises(LayerwiseError, match="the cut after 'hsic2' is not free: the global gradient to backprop "
                                             "block 'bp1' crosses it"):
        plan_stages(hybrid, 2, costs, cuts=["hsic2"])
    with pytest.raises(LayerwiseError, match=r"cannot cut after 'hsci1': no such block \(did you mean 'hsic1'\?\)"):
        plan_stages(hybrid, 2, costs, cuts=["hsci1"])
    with pytest.raises(LayerwiseError, match="cannot cut after 'head': it is the last block"):
        plan_stages(hybrid, 2, costs, cuts=["head"])
    with pytest.raises(LayerwiseError, match=r"2 stages need 1 cuts, found 2"):
        plan_stages(hybrid, 2, costs, cuts=["hsic1", "bp1"])
    hsic_costs = costs_of(hsic, [1] * 6)
    with pytest.raises(LayerwiseError, match="cuts must follow the evaluation order .*'hsic2' does not come after "
                                             "'hsic3'"):
        plan_stages(hsic, 3, hsic_costs, cuts=["hsic3", "hsic2"])
    plan = plan_stages(hsic, 3, hsic_costs, cuts=["hsic4", "hsic5"])  # named cuts win over balance
    assert plan.stages == [["hsic1", "hsic2", "hsic3", "hsic4"], ["hsic5"], ["head"]]


def test_describe_plan_names_stages_shares_and_cuts(hybrid, hsic):
    costs = costs_of(hybrid, [3, 1, 2, 2])
    lines = describe_plan(hybrid, plan_stages(hybrid, 2, costs), costs)
    assert lines == [
        "stage 0: hsic1 (estimated 38% of the work)",
        "stage 1: bp1, hsic2, head (estimated 62% of the work)",
        "free cuts: after hsic1; not free: after bp1 (global gradient to 'bp1'), "
        "after hsic2 (global gradient to 'bp1')",
    ]
    lines = describe_plan(hsic, plan_stages(hsic, 1, costs_of(hsic, [1] * 6)))
    assert lines[-1] == "free cuts: after hsic1, after hsic2, after hsic3, after hsic4, after hsic5; not free: none"


# ----------------------------------------------------------------------------- estimated work


def test_costs_count_each_blocks_forward_and_backward_as_the_trainer_routes_them():
    batch = 32
    net = lw.Network([
        lw.Block("a", nn.Linear(8, 16)),
        lw.Block("flat", nn.Flatten()),  # nothing to count: floored at 1
        lw.Block("head", nn.Linear(16, 10)),
    ], input_shape=(8,))
    costs = block_costs(net, batch)
    matmul = 2 * batch  # FLOPs per multiply-add of one sample
    # 'a': forward and the weight gradient (nothing upstream needs its input's gradient);
    # 'head': forward, weight gradient and the gradient to its input, which goes on to 'a'.
    assert costs == {"a": 2 * matmul * 8 * 16, "flat": 1.0, "head": 3 * matmul * 16 * 10}


def test_costs_are_positive_and_grow_with_width():
    def network(width):
        return lw.Network([local("a", 8, width), local("b", width, 8), local("head", 8, 3)], input_shape=(8,))

    narrow, wide = block_costs(network(8), 64), block_costs(network(64), 64)
    assert all(cost > 1 for cost in narrow.values())
    assert wide["a"] > narrow["a"] and wide["b"] > narrow["b"]
    assert wide["head"] == narrow["head"]


def test_costs_of_shipped_networks_leave_the_model_and_the_random_stream_alone(hybrid):
    before = {k: v.clone() for k, v in hybrid.state_dict().items()}
    state = torch.get_rng_state()
    costs = block_costs(hybrid, 16)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, before[k]) for k, v in hybrid.state_dict().items())
    assert all(p.grad is None for p in hybrid.parameters())
    assert list(costs) == hybrid.order and all(c > 1 for c in costs.values())
    assert costs["hsic1"] > costs["bp1"] > costs["head"]  # 784x512 against 512x256 against 128x10
    assert block_costs(hybrid, 16) == costs  # deterministic


def test_costs_leave_batch_norm_statistics_alone():
    net = lw.Network([lw.Block("a", nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))), local("head", 6, 3)],
                     input_shape=(4,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    block_costs(net, 16)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_costs_need_a_materialized_network():
    net = lw.Network([lw.Block("head", nn.LazyLinear(3))])
    with pytest.raises(LayerwiseError, match="has not seen an input yet"):
        block_costs(net, 8)
