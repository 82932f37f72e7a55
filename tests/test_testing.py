"""``layerwise.testing.check_objective`` passes good objectives and says what is wrong with bad ones."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from layerwise import hookimpl, plugins
from layerwise.objectives.base import Objective
from layerwise.testing import check_objective, use_plugin


class Good(Objective):
    name = "good"

    def loss(self, z, ctx):
        features = z.flatten(1)
        k = min(features.shape[1], ctx.num_classes)
        loss = (features[:, :k] - ctx.y_onehot()[:, :k]).pow(2).mean()
        return loss, {"loss": loss.detach()}


class UnusedHelper(Good):
    name = "unused_helper"

    def __init__(self, config, info):
        super().__init__(config, info)
        self.spare = nn.Linear(2, 2)  # never used by loss()


class AttachedMetric(Good):
    name = "attached_metric"

    def loss(self, z, ctx):
        loss, _ = super().loss(z, ctx)
        return loss, {"loss": loss}


class IgnoresOutput(Objective):
    name = "ignores_output"

    def __init__(self, config, info):
        super().__init__(config, info)
        self.weight = nn.Parameter(torch.ones(3))

    def loss(self, z, ctx):
        loss = self.weight.pow(2).sum()
        return loss, {"loss": loss.detach()}


class NotLocal(Good):
    name = "not_local"
    local = False


@pytest.fixture(scope="module")
def registered():
    classes = [Good, UnusedHelper, AttachedMetric, IgnoresOutput, NotLocal]

    def register(registry):
        for cls in classes:
            registry.register(cls.name, cls)

    plugins.reset()
    with use_plugin(types.SimpleNamespace(layerwise_register_objectives=hookimpl(register)), name="zoo"):
        yield
    plugins.reset()


def test_a_good_objective_passes_on_linear_and_conv_blocks(registered):
    assert set(check_objective("good", plugin="zoo")) == {"loss"}
    check_objective("good", layer="conv2d")


@pytest.mark.parametrize(
    "name, message",
    [
        ("unused_helper", r"parameter 'objective.spare.weight' of block local1 did not change"),
        ("attached_metric", r"metric 'loss' must be a detached 0-d tensor"),
        ("ignores_output", r"the local loss does not depend on the block's output z"),
        ("not_local", r"has local = False"),
        ("gooood", r"unknown objective 'gooood' \(did you mean 'good'\?\)"),
    ],
)
def test_a_broken_objective_fails_with_the_reason(registered, name, message):
    with pytest.raises(AssertionError, match=message):
        check_objective(name)


def test_the_wrong_plugin_is_named(registered):
    with pytest.raises(AssertionError, match="registered by 'zoo', not by 'elsewhere'"):
        check_objective("good", plugin="elsewhere")
