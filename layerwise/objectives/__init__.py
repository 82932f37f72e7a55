"""Objectives: what trains a block. ``none`` leaves it to global backprop; others are local."""

from layerwise.objectives.base import BlockInfo, KernelCache, LossContext, Objective

__all__ = ["BlockInfo", "KernelCache", "LossContext", "Objective"]
