"""Cut an existing model into locally trained stages, by graph surgery with ``torch.fx``.

``split(resnet18(num_classes=10), at=["layer1", "layer2", "layer3"], objective=lw.objective("nhsic"))``
traces the model, keeping each named submodule whole, and cuts its graph right after each of
them. Every stage becomes a :class:`~layerwise.graph.Block`: all but the last are trained by
``objective``, the last (which ends in the model's classifier) by the global loss. The stages
hold the model's own modules, so no weight is copied.

A stage receives exactly one tensor: a cut that other values cross as well (a skip connection
spanning it, say) is refused with the names of those values, since a block reads one input.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn
from torch.fx.passes.split_module import split_module

from layerwise.errors import LayerwiseError
from layerwise.graph import Block, Network, ObjectiveSpec
from layerwise.registry import did_you_mean


class KeepWhole(fx.Tracer):
    """The default tracer, except that the cut points stay single ``call_module`` nodes."""

    def __init__(self, whole: set[str]):
        super().__init__()
        self.whole = whole

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.whole or super().is_leaf_module(module, qualified_name)


def split(model: nn.Module, at: Sequence[str], objective: ObjectiveSpec | None = None, *,
          input_shape: Sequence[int] | None = None, name: str | None = None) -> Network:
    """A :class:`Network` of ``len(at) + 1`` stages cut from ``model`` after each submodule in ``at``.

    ``objective`` (from ``layerwise.objective``) trains every stage but the last; None leaves
    the whole model to backprop. Later stages read their input detached when the stage before
    them is local, so no global gradient is carried into it. ``input_shape`` builds the network
    now (otherwise on its first batch).
    """
    label = name or f"split({type(model).__name__})"
    if not isinstance(model, nn.Module):
        raise LayerwiseError(f"{label}: expected an nn.Module to split, found {type(model).__name__}")
    if isinstance(at, str) or not at:
        raise LayerwiseError(f"{label}: 'at' must be a non-empty list of submodule names, found {at!r}")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    for point in at:
        if point not in modules or not point:
            raise LayerwiseError(f"{label}: at: no submodule '{point}'{did_you_mean(point, names)}; "
                                 f"top-level ones: {', '.join(n for n, _ in model.named_children())}")
    if len(set(at)) != len(at):
        raise LayerwiseError(f"{label}: at: a submodule is named twice in {list(at)}")
    traced = trace(model, set(at), label)
    stage_of = assign_stages(traced.graph, list(at), label)
    parts = split_module(traced, model, lambda node: stage_of[node], keep_original_order=True)
    stages = [getattr(parts, f"submod_{i}") for i in range(len(at) + 1)]
    check_single_inputs(stages, list(at), label)
    blocks = []
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        block_name = "head" if last else at[i].replace(".", "_")
        blocks.append(Block(block_name, stage, None if last else objective, detach=i > 0 and objective is not None,
                            where=f"stage {i} ('{block_name}')"))
    return Network(blocks, input_shape, name=label)


def trace(model: nn.Module, whole: set[str], label: str) -> fx.GraphModule:
    """The model's graph, or an error saying why ``torch.fx`` cannot follow its forward."""
    try:
        graph = KeepWhole(whole).trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError... on data-dependent code
        reason = " ".join(str(exc).split())[:200]
        raise LayerwiseError(f"{label}: torch.fx cannot trace the model ({type(exc).__name__}: {reason}); "
                             f"split needs a forward without data-dependent control flow") from None
    return fx.GraphModule(model, graph)


def assign_stages(graph: fx.Graph, at: list[str], label: str) -> dict[fx.Node, int]:
    """Stage index of every node: a cut point's node ends its stage."""
    calls = {point: [n for n in graph.nodes if n.op == "call_module" and n.target == point] for point in at}
    for point, nodes in calls.items():
        if len(nodes) != 1:
            raise LayerwiseError(f"{label}: at: '{point}' is called {len(nodes)} times in the forward; a cut point "
                                 f"must run exactly once")
    positions = {node: i for i, node in enumerate(graph.nodes)}
    order = sorted(at, key=lambda point: positions[calls[point][0]])
    if order != at:
        raise LayerwiseError(f"{label}: at: list the cut points in the order the forward runs them: {order}")
    stage_of, stage = {}, 0
    for node in graph.nodes:
        stage_of[node] = stage
        if stage < len(at) and node is calls[at[stage]][0]:
            stage += 1
    return stage_of


def check_single_inputs(stages: list[nn.Module], at: list[str], label: str) -> None:
    """Each stage must take exactly one tensor: the output of the stage before it."""
    for i, stage in enumerate(stages):
        inputs = [n.name for n in stage.graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            where = "the model's input" if i == 0 else f"the cut after '{at[i - 1]}'"
            raise LayerwiseError(f"{label}: stage {i} would need {len(inputs)} inputs ({', '.join(inputs)}) across "
                                 f"{where}; a block reads one tensor, so move the cut where only one value crosses")

