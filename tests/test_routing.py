"""The gradient-routing proof (docs/design.md, section 2).

After ``Trainer.compute_gradients`` every parameter's ``.grad`` must equal
``torch.autograd.grad`` of exactly the one loss that may reach it, computed separately on a
fresh forward pass with the same weights: a local block's own loss for a local block, the
global cross-entropy for a ``none`` block. Each test also checks that the losses kept out
*would* have reached the parameters, so that a leak makes it fail.

Every local objective in the registry is covered, so a plugin's objective is tested too, and
every test runs twice: on a network built from a recipe, and on the same network written with
the Python API (``layerwise.Network`` of ``layerwise.Block`` s), which must route identically.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import layerwise as lw
from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.layers import ACTIVATION_MODULES
from layerwise.objectives.base import LossContext
from layerwise.trainer import Trainer
from tests.helpers import local_objectives

NUM_CLASSES = 10
INPUT_SHAPE = (1, 4, 4)
BATCH = 12

LOCAL_OBJECTIVES = local_objectives()


def test_local_objectives_include_nhsic():
    assert "nhsic" in LOCAL_OBJECTIVES


# ---------------------------------------------------------------- helpers


def block(name, objective="none", out=8, act="relu", **extra):
    spec = {"name": name, "layer": "linear", "out": out, "objective": objective, **extra}
    if act:
        spec["act"] = act
    return spec


def head(**extra):
    return block("head", out=NUM_CLASSES, act=None, **extra)


def local(name, objective, **extra):
    return block(name, objective={"name": objective}, **extra)


NETWORK_KIND = {"kind": "recipe"}


@pytest.fixture(autouse=True, params=["recipe", "python"])
def network_kind(request, monkeypatch):
    """Every test on both kinds of network: from a recipe, and written in Python."""
    monkeypatch.setitem(NETWORK_KIND, "kind", request.param)


def python_block(spec):
    """A recipe block spec written with the public API: a module function and an objective."""

    def make(shape):
        parts = [nn.Flatten(), nn.Linear(math.prod(shape), spec["out"])]
        if spec.get("norm"):
            parts.append(nn.BatchNorm1d(spec["out"]))
        if spec.get("act"):
            parts.append(ACTIVATION_MODULES[spec["act"]]())
        return nn.Sequential(*parts)

    name = spec["objective"] if isinstance(spec["objective"], str) else spec["objective"]["name"]
    objective = None if name == "none" else lw.objective(name)
    return lw.Block(spec["name"], make, objective, inputs=spec.get("inputs"), detach=spec.get("detach", False),
                    freeze=spec.get("freeze", False))


def build(blocks, seed=0):
    """Network (in float64, for exact comparisons) and Trainer from a list of block specs."""
    if NETWORK_KIND["kind"] == "python":
        torch.manual_seed(seed)
        network = lw.Network([python_block(spec) for spec in blocks], INPUT_SHAPE).double()
        optim = {"name": "adam", "lr": 1e-2}
        return network, lw.Trainer(network, local_optim=optim, global_optim=optim)
    subnetworks = [{"name": f"sn{i}", "blocks": blocks[i : i + 2]} for i in range(0, len(blocks), 2)]
    recipe = parse_recipe(
        {
            "name": "routing",
            "data": {"dataset": "mnist"},
            "model": {"subnetworks": subnetworks},
            "optim": {"local": {"name": "adam", "lr": 1e-2}, "global": {"name": "adam", "lr": 1e-2}},
            "train": {"device": "cpu"},
        },
        "test",
    )
    torch.manual_seed(seed)
    graph = network_from_recipe(recipe, INPUT_SHAPE, NUM_CLASSES).double()
    return graph, Trainer.from_recipe(graph, recipe)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *INPUT_SHAPE, dtype=torch.float64, generator=g)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    return x, y


@pytest.fixture(autouse=True)
def same_streams(monkeypatch):
    """An objective that reads streams (layerwise.streams) may get random negatives: the trainer's
    step and the reference pass draw the same ones."""
    made = lw.Network.make_streams

    def seeded(self, x, y):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            return made(self, x, y)

    monkeypatch.setattr(lw.Network, "make_streams", seeded)


def reference_losses(graph, x, y):
    """A fresh forward pass: each local block's loss, and the global cross-entropy.

    Each stream (layerwise.streams) gets a forward pass of its own with gradients through every
    block, unlike training, where it enters each block detached: a leak would then show."""
    out = graph.run(x)
    flows = {stream: graph.run(tensor).outputs for stream, tensor in graph.make_streams(x, y).items()}
    losses = {}
    for name in graph.order:
        blk = graph.blocks[name]
        if blk.local:
            ctx = LossContext(x=x, y=y, num_classes=NUM_CLASSES, block_input=out.inputs[name], block=blk,
                              streams={stream: outputs[name] for stream, outputs in flows.items()})
            losses[name], _ = blk.objective.loss(out.outputs[name], ctx)
    return losses, nn.functional.cross_entropy(out.logits, y)


def grads_of(loss, params):
    """d loss / d params, with zeros where the loss does not depend on a parameter."""
    found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]


def nonzero(grads) -> bool:
    return any(g.abs().max() > 1e-12 for g in grads)


def params_of(graph, name):
    return [p for p in graph.blocks[name].parameters() if p.requires_grad]


def assert_grads(params, expected, what):
    for index, (p, want) in enumerate(zip(params, expected, strict=True)):
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10, msg=lambda m, index=index: f"{what}[{index}]: {m}")


def check_routing(graph, x, y, untrained=()):
    """Assert each .grad is exactly its allowed loss's gradient; return which blocks another loss would reach.

    Blocks in ``untrained`` are expected to get a zero gradient from their allowed loss.
    """
    losses, ce = reference_losses(graph, x, y)
    reachable_by_other = {}
    for name in graph.order:
        blk = graph.blocks[name]
        params = params_of(graph, name)
        if not params:
            continue
        from_ce = grads_of(ce, params)
        from_local = {other: grads_of(loss, params) for other, loss in losses.items()}
        if blk.local:
            allowed = from_local[name]
            forbidden = [from_ce] + [g for other, g in from_local.items() if other != name]
        else:
            allowed = from_ce
            forbidden = list(from_local.values())
        if name in untrained:
            assert not nonzero(allowed), f"{name}: expected no gradient from its allowed loss"
        else:
            assert nonzero(allowed), f"{name}: its own loss gives no gradient, so the test proves nothing"
        assert_grads(params, allowed, name)
        reachable_by_other[name] = any(nonzero(g) for g in forbidden)
    return reachable_by_other


# ---------------------------------------------------------------- routing rules 1-3


@pytest.mark.parametrize("objective", LOCAL_OBJECTIVES)
def test_hybrid_graph_each_grad_comes_from_its_own_loss_only(objective):
    graph, trainer = build(
        [local("local1", objective), block("bp1"), local("local2", objective), head()]
    )
    x, y = batch()
    trainer.compute_gradients(x, y)
    reachable = check_routing(graph, x, y)
    # The global loss would reach both local blocks, and local2's loss would reach local1 and bp1:
    # matching only the allowed loss proves that the others were kept out.
    assert reachable["local1"] and reachable["bp1"] and reachable["local2"]


@pytest.mark.parametrize("objective", LOCAL_OBJECTIVES)
def test_backprop_block_before_a_local_block_learns_from_the_global_loss(objective):
    graph, trainer = build([block("bp0"), local("local1", objective), head()])
    x, y = batch()
    trainer.compute_gradients(x, y)
    _, ce = reference_losses(graph, x, y)
    params = params_of(graph, "bp0")
    want = grads_of(ce, params)
    assert nonzero(want)
    assert all(p.grad is not None for p in params)
    assert nonzero([p.grad for p in params])
    assert_grads(params, want, "bp0")
    reachable = check_routing(graph, x, y)
    assert reachable["bp0"]  # local1's loss would reach bp0 but was kept out


@pytest.mark.parametrize("objective", LOCAL_OBJECTIVES)
def test_detach_stops_the_global_gradient(objective):
    x, y = batch()
    # Control: without detach, bp0 learns through local1.
    graph, trainer = build([block("bp0"), local("local1", objective), block("bp2"), head()])
    trainer.compute_gradients(x, y)
    assert nonzero([p.grad for p in params_of(graph, "bp0")])

    graph, trainer = build([block("bp0"), local("local1", objective), block("bp2", detach=True), head()])
    trainer.compute_gradients(x, y)
    for p in params_of(graph, "bp0"):
        assert p.grad is None or not p.grad.any()
    for name in ("bp2", "head", "local1"):
        assert nonzero([p.grad for p in params_of(graph, name) if p.grad is not None])
    reachable = check_routing(graph, x, y, untrained=("bp0",))
    assert reachable["bp0"]  # local1's loss still depends on bp0, but must not train it


def test_detach_between_backprop_blocks():
    x, y = batch()
    graph, trainer = build([block("bp0"), block("bp1", detach=True), head()])
    trainer.compute_gradients(x, y)
    for p in params_of(graph, "bp0"):
        assert p.grad is None or not p.grad.any()
    assert nonzero([p.grad for p in params_of(graph, "bp1")])
    # The forward value is unchanged by detach: only the gradient stops.
    undetached, _ = build([block("bp0"), block("bp1"), head()])
    torch.testing.assert_close(graph(x), undetached(x), rtol=0, atol=0)


@pytest.mark.parametrize("objective", LOCAL_OBJECTIVES)
def test_hsic_only_graph_global_loss_trains_only_the_head(objective):
    graph, trainer = build(
        [local("l1", objective), local("l2", objective), local("l3", objective), head(detach=True)]
    )
    head_ids = {id(p) for p in graph.blocks["head"].parameters()}
    assert {id(p) for p in trainer.global_params} == head_ids
    assert set(trainer.local_optimizers) == {"l1", "l2", "l3"}
    x, y = batch()
    trainer.compute_gradients(x, y)
    check_routing(graph, x, y)
    # The cross-entropy does not depend on the local blocks at all.
    _, ce = reference_losses(graph, x, y)
    for name in ("l1", "l2", "l3"):
        assert not nonzero(grads_of(ce, params_of(graph, name)))


# ---------------------------------------------------------------- freeze


def frozen_graph(objective):
    return build(
        [
            block("frz0", norm=True, freeze=True),
            local("local1", objective, norm=True),
            local("frz_local", objective, norm=True, freeze=True),
            block("bp3", norm=True),
            head(),
        ]
    )


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before, module, name):
    after = module.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{name}.{key} changed"


@pytest.mark.parametrize("objective", LOCAL_OBJECTIVES)
def test_frozen_blocks_are_not_updated_at_all(objective):
    graph, trainer = frozen_graph(objective)
    graph.train()
    frozen = ("frz0", "frz_local")
    before = {name: snapshot(graph.blocks[name]) for name in graph.order}
    assert any("running_mean" in k for k in before["frz0"])  # the batch-norm buffers are covered
    for name in frozen:
        assert all(not p.requires_grad for p in graph.blocks[name].parameters())

    # No optimizer holds a frozen parameter.
    frozen_ids = {id(p) for name in frozen for p in graph.blocks[name].parameters()}
    for opt in trainer.optimizers().values():
        for group in opt.param_groups:
            assert not frozen_ids & {id(p) for p in group["params"]}
    assert "frz_local" not in trainer.local_optimizers
    assert set(trainer.optimizers()) == {"local.local1", "global"}

    for seed in range(3):
        trainer.step(*batch(seed))

    for name in frozen:
        assert_same_state(before[name], graph.blocks[name], name)
        assert all(p.grad is None for p in graph.blocks[name].parameters())
    # Control: the unfrozen blocks, batch-norm statistics included, did move.
    for name in ("local1", "bp3", "head"):
        after = graph.blocks[name].state_dict()
        changed = {key for key, value in before[name].items() if not torch.equal(after[key], value)}
        assert changed, f"{name} did not change"
        if name != "head":
            assert any("running_mean" in key for key in changed)


def test_frozen_batch_norm_statistics_do_not_move_without_explicit_train_call():
    graph, trainer = frozen_graph("nhsic")
    before = snapshot(graph.blocks["frz0"])
    trainer.step(*batch())
    assert_same_state(before, graph.blocks["frz0"], "frz0")


def test_frozen_blocks_stay_in_eval_mode_under_train():
    graph, _ = frozen_graph("nhsic")
    graph.eval()
    graph.train()
    assert graph.training
    assert not graph.blocks["frz0"].training and not graph.blocks["frz_local"].training
    assert all(not m.training for m in graph.blocks["frz0"].modules())
    assert graph.blocks["local1"].training and graph.blocks["bp3"].training


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize("objective", LOCAL_OBJECTIVES)
def test_optimizers_persist_across_steps(objective):
    graph, trainer = build([local("local1", objective), block("bp1"), local("local2", objective), head()])
    optimizers = trainer.optimizers()
    assert set(optimizers) == {"local.local1", "local.local2", "global"}
    # One optimizer per local block over exactly that block's parameters, one for the rest.
    for name in ("local1", "local2"):
        held = {id(p) for g in optimizers[f"local.{name}"].param_groups for p in g["params"]}
        assert held == {id(p) for p in graph.blocks[name].parameters()}
    held = {id(p) for g in optimizers["global"].param_groups for p in g["params"]}
    assert held == {id(p) for name in ("bp1", "head") for p in graph.blocks[name].parameters()}

    trainer.step(*batch(1))
    trainer.step(*batch(2))
    after = trainer.optimizers()
    assert set(after) == set(optimizers)
    for key, opt in optimizers.items():
        assert after[key] is opt
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                assert "exp_avg" in state, key
                assert int(state["step"]) == 2, key  # a rebuilt optimizer would say 1


@pytest.mark.parametrize("objective", LOCAL_OBJECTIVES)
def test_one_step_changes_every_unfrozen_block(objective):
    graph, trainer = build([local("local1", objective), block("bp1"), local("local2", objective), head()])
    before = {name: [p.detach().clone() for p in graph.blocks[name].parameters()] for name in graph.order}
    result = trainer.step(*batch())
    for name in graph.order:
        for index, (old, new) in enumerate(zip(before[name], graph.blocks[name].parameters(), strict=True)):
            assert not torch.equal(old, new), f"{name} parameter {index} did not change"
    assert set(result.block_metrics) == {"local1", "local2"}
    assert result.logits.shape == (BATCH, NUM_CLASSES)
    assert torch.isfinite(result.global_loss)


def test_step_starts_from_clean_gradients():
    # Gradients never accumulate across steps: whatever .grad held before, step() leaves exactly
    # this batch's routed gradients (taken at the weights before the update).
    graph, trainer = build([local("local1", "nhsic"), block("bp1"), head()])
    x, y = batch(2)
    losses, ce = reference_losses(graph, x, y)
    expected = {
        name: grads_of(losses[name] if graph.blocks[name].local else ce, params_of(graph, name))
        for name in graph.order
    }
    for p in graph.parameters():
        p.grad = torch.full_like(p, 1e3)
    trainer.step(x, y)
    for name in graph.order:
        assert_grads(params_of(graph, name), expected[name], name)
