"""The graph executor: ordering, merging, width inference, and every built-in layer and activation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layerwise.errors import LayerwiseError, RecipeError
from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.layers import ACTIVATION_MODULES, BUILTIN_LAYERS
from layerwise.plugins import registries
from layerwise.recipe import ACTIVATIONS
from layerwise.topology import INPUT, block_inputs, topological_order

NUM_CLASSES = 10


def recipe_dict(blocks, subnetwork_size=2):
    subnetworks = [
        {"name": f"sn{i}", "blocks": blocks[i : i + subnetwork_size]} for i in range(0, len(blocks), subnetwork_size)
    ]
    return {"name": "graph-test", "data": {"dataset": "mnist"}, "model": {"subnetworks": subnetworks}}


def recipe(blocks):
    return parse_recipe(recipe_dict(blocks), "test.yaml")


def graph(blocks, input_shape=(1, 4, 4), seed=0):
    torch.manual_seed(seed)
    return network_from_recipe(recipe(blocks), input_shape, NUM_CLASSES)


def head(**extra):
    return {"name": "head", "layer": "linear", "out": NUM_CLASSES, **extra}


def inputs_of(batch, shape, seed=1):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def modules_of(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


# ---------------------------------------------------------------- ordering


def test_topological_order_keeps_declaration_order_for_a_chain():
    deps = {"a": [INPUT], "b": ["a"], "c": ["b"]}
    assert topological_order(deps) == ["a", "b", "c"]


def test_topological_order_sorts_forward_references():
    deps = {"late": ["mid"], "first": [INPUT], "mid": ["first"], "also": [INPUT]}
    order = topological_order(deps)
    assert sorted(order) == sorted(deps)
    for name, sources in deps.items():
        for src in sources:
            if src != INPUT:
                assert order.index(src) < order.index(name)
    # Ties keep declaration order.
    assert order.index("first") < order.index("also")


def test_block_inputs_default_to_the_previous_block():
    rec = recipe(
        [
            {"name": "a", "layer": "linear", "out": 8},
            {"name": "b", "layer": "linear", "out": 8, "inputs": ["input", "a"]},
            head(),
        ]
    )
    inputs = block_inputs((b.name, b.inputs) for b in rec.model.blocks())
    assert inputs == {"a": [INPUT], "b": [INPUT, "a"], "head": ["b"]}


def test_skip_ahead_and_merge_by_concatenation():
    blocks = [
        {"name": "a", "layer": "linear", "out": 8, "act": "relu"},
        # declared before 'b', which it reads: the executor must sort
        {"name": "c", "layer": "linear", "out": 6, "inputs": ["a", "b", "input"]},
        {"name": "b", "layer": "linear", "out": 5, "inputs": ["input"]},
        head(inputs=["c"]),
    ]
    g = graph(blocks, input_shape=(16,))
    assert g.order == ["a", "b", "c", "head"]
    assert g.head == "head"
    assert g.blocks["c"].objective.info.in_shape == (8 + 5 + 16,)
    assert g.shapes == {"input": (16,), "a": (8,), "b": (5,), "c": (6,), "head": (NUM_CLASSES,)}
    x = inputs_of(3, (16,))
    out = g.run(x)
    torch.testing.assert_close(out.inputs["c"], torch.cat([out.outputs["a"], out.outputs["b"], x], dim=1))
    torch.testing.assert_close(out.inputs["b"], x)
    torch.testing.assert_close(out.inputs["head"], out.outputs["c"])
    torch.testing.assert_close(out.logits, out.outputs["head"])
    assert out.logits.shape == (3, NUM_CLASSES)


def test_merging_images_concatenates_channels():
    blocks = [
        {"name": "conv", "layer": "conv2d", "out": 3, "kernel_size": 3, "padding": 1},
        {"name": "both", "layer": "conv2d", "out": 2, "kernel_size": 1, "inputs": ["conv", "input"]},
        head(),
    ]
    g = graph(blocks)
    assert g.blocks["both"].objective.info.in_shape == (4, 4, 4)
    assert modules_of(g.blocks["both"], nn.Conv2d)[0].in_channels == 4


def test_merging_incompatible_shapes_is_an_error():
    blocks = [
        {"name": "flat", "layer": "linear", "out": 8},
        {"name": "bad", "layer": "linear", "out": 4, "inputs": ["flat", "input"]},
        head(),
    ]
    with pytest.raises(LayerwiseError, match="cannot be concatenated"):
        graph(blocks)


def test_cycle_raises_naming_the_blocks():
    deps = {"alpha": [INPUT], "beta": ["gamma"], "gamma": ["beta"]}
    with pytest.raises(LayerwiseError) as info:
        topological_order(deps)
    message = str(info.value)
    assert "cycle" in message
    assert "beta, gamma" in message
    assert "alpha" not in message


def test_cycle_in_a_recipe_is_reported():
    blocks = [
        {"name": "alpha", "layer": "linear", "out": 8, "inputs": ["gamma"]},
        {"name": "beta", "layer": "linear", "out": 8},
        {"name": "gamma", "layer": "linear", "out": 8},
        head(inputs=["gamma"]),
    ]
    with pytest.raises(RecipeError) as info:
        recipe(blocks)
    message = str(info.value)
    assert "test.yaml" in message and "cycle" in message
    for name in ("alpha", "beta", "gamma"):
        assert name in message


def test_self_loop_is_a_cycle():
    blocks = [{"name": "loop", "layer": "linear", "out": 8, "inputs": ["loop"]}, head()]
    with pytest.raises(RecipeError, match="cycle"):
        recipe(blocks)


def test_unknown_input_name_gets_did_you_mean():
    blocks = [
        {"name": "hidden", "layer": "linear", "out": 8},
        {"name": "next", "layer": "linear", "out": 8, "inputs": ["hiden"]},
        head(),
    ]
    with pytest.raises(RecipeError) as info:
        recipe(blocks)
    message = str(info.value)
    assert "model.subnetworks[0].blocks[1].inputs" in message
    assert "unknown block 'hiden'" in message
    assert "did you mean 'hidden'" in message


def test_duplicate_block_names_are_reported():
    blocks = [
        {"name": "dup", "layer": "linear", "out": 8},
        {"name": "dup", "layer": "linear", "out": 8},
        head(),
    ]
    with pytest.raises(RecipeError) as info:
        recipe(blocks)
    assert "'dup'" in str(info.value) and "twice" in str(info.value)


def test_block_field_errors_are_all_reported_at_once():
    blocks = [
        {"name": "a", "layer": "linear", "out": 8, "act": "rleu"},
        {"name": "b", "layer": "lineer", "out": 0},
        head(),
    ]
    with pytest.raises(RecipeError) as info:
        recipe(blocks)
    problems = info.value.problems
    assert len(problems) == 3
    text = "\n".join(problems)
    assert "blocks[0].act" in text and "did you mean 'relu'" in text
    assert "blocks[1].layer" in text and "did you mean 'linear'" in text
    assert "blocks[1].out" in text


def test_graph_errors_are_all_reported_at_once():
    blocks = [
        {"name": "dup", "layer": "linear", "out": 8},
        {"name": "dup", "layer": "linear", "out": 8, "inputs": ["nowhere"]},
        head(),
    ]
    with pytest.raises(RecipeError) as info:
        recipe(blocks)
    problems = info.value.problems
    assert len(problems) == 2
    text = "\n".join(problems)
    assert "twice" in text and "unknown block 'nowhere'" in text


# ---------------------------------------------------------------- width inference


def test_linear_on_an_image_flattens():
    g = graph([{"name": "fc", "layer": "linear", "out": 8, "act": "relu"}, head()])
    (linear,) = modules_of(g.blocks["fc"], nn.Linear)
    assert linear.in_features == 16 and linear.out_features == 8
    assert modules_of(g.blocks["fc"], nn.Flatten)
    assert g.shapes["fc"] == (8,)
    assert modules_of(g.blocks["head"], nn.Linear)[0].in_features == 8
    x = inputs_of(3, (1, 4, 4))
    expected = torch.relu(x.reshape(3, 16) @ linear.weight.T + linear.bias)
    torch.testing.assert_close(g.run(x).outputs["fc"], expected)


def conv_out(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def test_conv_pool_flatten_linear_shapes():
    blocks = [
        {"name": "conv1", "layer": "conv2d", "out": 4, "kernel_size": 3, "padding": 1, "act": "relu", "norm": True},
        {"name": "pool1", "layer": "maxpool", "kernel_size": 2},
        {"name": "conv2", "layer": "conv2d", "out": 5, "kernel_size": 3, "stride": 2, "padding": 1},
        {"name": "pool2", "layer": "avgpool", "kernel_size": 2, "stride": 1},
        {"name": "flat", "layer": "flatten"},
        {"name": "fc", "layer": "linear", "out": 7, "act": "tanh", "norm": True},
        head(),
    ]
    g = graph(blocks, input_shape=(1, 8, 8))
    s1 = conv_out(8, 3, 1, 1)  # 8
    p1 = conv_out(s1, 2, 2, 0)  # 4
    s2 = conv_out(p1, 3, 2, 1)  # 2
    p2 = conv_out(s2, 2, 1, 0)  # 1
    assert g.shapes["conv1"] == (4, s1, s1)
    assert g.shapes["pool1"] == (4, p1, p1)
    assert g.shapes["conv2"] == (5, s2, s2)
    assert g.shapes["pool2"] == (5, p2, p2)
    assert g.shapes["flat"] == (5 * p2 * p2,)
    assert g.shapes["fc"] == (7,)
    (conv1,) = modules_of(g.blocks["conv1"], nn.Conv2d)
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (1, 4, (3, 3))
    assert modules_of(g.blocks["conv1"], nn.BatchNorm2d)[0].num_features == 4
    assert modules_of(g.blocks["conv2"], nn.Conv2d)[0].in_channels == 4
    assert modules_of(g.blocks["conv2"], nn.Conv2d)[0].stride == (2, 2)
    assert modules_of(g.blocks["fc"], nn.Linear)[0].in_features == 5 * p2 * p2
    assert modules_of(g.blocks["fc"], nn.BatchNorm1d)[0].num_features == 7
    out = g.run(inputs_of(4, (1, 8, 8)))
    for name, shape in g.shapes.items():
        if name != INPUT:
            assert out.outputs[name].shape == (4, *shape)


def test_conv_after_a_flat_input_needs_an_image():
    with pytest.raises(LayerwiseError) as info:
        graph([{"name": "conv", "layer": "conv2d", "out": 4}, head()], input_shape=(16,))
    message = str(info.value)
    assert "needs an image" in message
    assert "'conv'" in message and "model.subnetworks[0].blocks[0]" in message
    assert "(16,)" in message


def test_conv_after_a_linear_block_needs_an_image():
    blocks = [
        {"name": "fc", "layer": "linear", "out": 8},
        {"name": "pool", "layer": "maxpool"},
        head(),
    ]
    with pytest.raises(LayerwiseError, match="needs an image"):
        graph(blocks)


def test_head_with_wrong_width_says_to_set_out():
    with pytest.raises(LayerwiseError) as info:
        graph([{"name": "fc", "layer": "linear", "out": 8}, {"name": "last", "layer": "linear", "out": 7}])
    message = str(info.value)
    assert "'last'" in message and "(7,)" in message
    assert f"set its out to {NUM_CLASSES}" in message


def test_head_must_be_flat():
    with pytest.raises(LayerwiseError, match=f"set its out to {NUM_CLASSES}"):
        graph([{"name": "conv", "layer": "conv2d", "out": NUM_CLASSES, "kernel_size": 4}])


def test_layer_with_weights_needs_out():
    with pytest.raises(LayerwiseError, match="needs 'out'"):
        graph([{"name": "fc", "layer": "linear"}, head()])


def test_kernel_larger_than_the_input_is_an_error():
    with pytest.raises(LayerwiseError, match=r"cannot take an input of shape \(1, 4, 4\)"):
        graph([{"name": "conv", "layer": "conv2d", "out": 2, "kernel_size": 5}, head()])


# ---------------------------------------------------------------- activations


REFERENCE_ACTIVATIONS = {
    "relu": lambda v: torch.where(v > 0, v, torch.zeros_like(v)),
    "tanh": lambda v: (torch.exp(v) - torch.exp(-v)) / (torch.exp(v) + torch.exp(-v)),
    "elu": lambda v: torch.where(v > 0, v, torch.exp(v) - 1),
    "sigmoid": lambda v: 1 / (1 + torch.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
}


def test_every_activation_has_a_module_and_a_reference():
    assert set(ACTIVATION_MODULES) == set(ACTIVATIONS) == set(REFERENCE_ACTIVATIONS)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_builds_and_runs(act):
    g = graph([{"name": "fc", "layer": "linear", "out": 6, "act": act}, head()], input_shape=(5,))
    x = inputs_of(4, (5,))
    (linear,) = modules_of(g.blocks["fc"], nn.Linear)
    pre = x @ linear.weight.T + linear.bias
    out = g.run(x)
    torch.testing.assert_close(out.outputs["fc"], REFERENCE_ACTIVATIONS[act](pre), rtol=1e-5, atol=1e-6)
    out.logits.sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_unknown_activation_gets_did_you_mean():
    with pytest.raises(RecipeError) as info:
        recipe([{"name": "fc", "layer": "linear", "out": 6, "act": "rleu"}, head()])
    assert "did you mean 'relu'" in str(info.value)
    assert "model.subnetworks[0].blocks[0].act" in str(info.value)


# ---------------------------------------------------------------- built-in layers

# Output shape on a (1, 4, 4) input with out=4 and kernel_size=2.
EXPECTED_SHAPES = {
    "linear": (4,),
    "conv2d": (4, 3, 3),
    "maxpool": (1, 2, 2),
    "avgpool": (1, 2, 2),
    "flatten": (16,),
    "batchnorm": (1, 4, 4),
    "dropout": (1, 4, 4),
}


def test_every_builtin_layer_is_registered_and_covered():
    assert set(BUILTIN_LAYERS) == set(EXPECTED_SHAPES)
    assert set(BUILTIN_LAYERS) <= set(registries().layers.names())


@pytest.mark.parametrize("layer", sorted(BUILTIN_LAYERS))
def test_every_builtin_layer_builds_and_runs(layer):
    g = graph([{"name": "blk", "layer": layer, "out": 4, "kernel_size": 2}, head()])
    assert g.shapes["blk"] == EXPECTED_SHAPES[layer]
    x = inputs_of(6, (1, 4, 4))
    g.train()
    out = g.run(x)
    assert out.outputs["blk"].shape == (6, *EXPECTED_SHAPES[layer])
    assert out.logits.shape == (6, NUM_CLASSES) and torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    assert all(p.grad is not None for p in g.blocks["head"].parameters())
    g.eval()
    with torch.no_grad():
        evaluated = g.run(x)
    assert evaluated.logits.shape == (6, NUM_CLASSES)


def test_pooling_flatten_and_dropout_values():
    x = inputs_of(3, (1, 4, 4))
    windows = x.reshape(3, 1, 2, 2, 2, 2)  # (batch, c, row block, row, col block, col)
    cases = {
        "maxpool": windows.amax(dim=(3, 5)),
        "avgpool": windows.mean(dim=(3, 5)),
        "flatten": x.reshape(3, 16),
    }
    for layer, expected in cases.items():
        g = graph([{"name": "blk", "layer": layer, "kernel_size": 2}, head()])
        torch.testing.assert_close(g.run(x).outputs["blk"], expected)
    g = graph([{"name": "blk", "layer": "dropout", "p": 0.5}, head()])
    g.eval()
    torch.testing.assert_close(g.run(x).outputs["blk"], x)
    g.train()
    dropped = g.run(torch.ones(64, 1, 4, 4)).outputs["blk"]
    assert set(dropped.unique().tolist()) == {0.0, 2.0}


def test_batchnorm_layer_normalises_per_channel_in_training():
    g = graph([{"name": "bn", "layer": "batchnorm"}, head()], input_shape=(2, 3, 3))
    assert modules_of(g.blocks["bn"], nn.BatchNorm2d)[0].num_features == 2
    x = inputs_of(8, (2, 3, 3)) * 3 + 1
    g.train()
    y = g.run(x).outputs["bn"]
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    flat = graph([{"name": "bn", "layer": "batchnorm"}, head()], input_shape=(5,))
    assert modules_of(flat.blocks["bn"], nn.BatchNorm1d)[0].num_features == 5


def test_norm_option_adds_batch_norm_after_the_layer():
    g = graph([{"name": "fc", "layer": "linear", "out": 6, "norm": True, "act": "relu"}, head()])
    kinds = [type(m) for m in g.blocks["fc"].body.children()]
    assert kinds[-2:] == [nn.BatchNorm1d, nn.ReLU]
    assert modules_of(g.blocks["fc"], nn.BatchNorm1d)[0].num_features == 6


def test_objectives_are_attached_per_block():
    blocks = [
        {"name": "h", "layer": "linear", "out": 8, "act": "relu", "objective": {"name": "nhsic", "sigma": 2}},
        {"name": "bp", "layer": "linear", "out": 8, "objective": "backprop"},
        head(),
    ]
    g = graph(blocks)
    assert g.blocks["h"].local and g.blocks["h"].objective.name == "nhsic"
    assert g.blocks["h"].objective.config.sigma == 2.0
    assert not g.blocks["bp"].local and not g.blocks["head"].local
    info = g.blocks["h"].objective.info
    assert (info.block_name, info.in_shape, info.out_shape, info.input_shape, info.num_classes) == (
        "h",
        (1, 4, 4),
        (8,),
        (1, 4, 4),
        NUM_CLASSES,
    )
    assert [b.name for b in g.local_blocks()] == ["h"]
    assert {id(p) for p in g.global_parameters()} == {
        id(p) for name in ("bp", "head") for p in g.blocks[name].parameters()
    }
