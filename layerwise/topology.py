"""The wiring of blocks by name: who reads whom, and an order that respects it.

Torch-free, so that recipe validation (which must not import torch) and the graph executor
share one definition of the rules.
"""

from __future__ import annotations

from collections.abc import Iterable

from layerwise.errors import LayerwiseError

INPUT = "input"
"""The name by which blocks read the network's input."""


def block_inputs(blocks: Iterable[tuple[str, list[str] | None]]) -> dict[str, list[str]]:
    """``(name, inputs)`` pairs in declaration order -> the names each block reads; a block that
    names no inputs reads the block declared before it (the first one reads the input)."""
    deps: dict[str, list[str]] = {}
    previous = INPUT
    for name, inputs in blocks:
        deps[name] = list(inputs) if inputs else [previous]
        previous = name
    return deps


def topological_order(deps: dict[str, list[str]]) -> list[str]:
    """Names in an order where every block follows its inputs; ties keep declaration order."""
    order: list[str] = []
    done = {INPUT}
    pending = list(deps)
    while pending:
        ready = [name for name in pending if all(src in done for src in deps[name])]
        if not ready:
            raise LayerwiseError(f"the blocks {', '.join(pending)} form a cycle through their 'inputs'")
        for name in ready:
            order.append(name)
            done.add(name)
        pending = [name for name in pending if name not in done]
    return order
