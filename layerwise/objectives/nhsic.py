"""The normalised HSIC bottleneck as a local objective.

Papers:
- Ma, Lewis, Kleijn, "The HSIC Bottleneck: Deep Learning without Back-Propagation", AAAI 2020.
- Birjais, Wang, Abdulla, "Training Deep Neural Networks with HSIC and Backpropagation"
  (eqs. 3 and 4 give the normalised form used here).

For a block with output ``Z`` on a batch of ``m`` samples, network input ``X`` (flattened)
and one-hot labels ``Y``, the block minimises

    loss = nHSIC(Z, X) - beta * nHSIC(Z, Y)

keeping what predicts the label while forgetting the rest of the input.

One kernel, chosen by ``kernel``, serves Z, X and Y, each scaled by the feature count ``d`` so
that one setting suits every width: ``gaussian`` (the default, ``exp(-||a - b||^2 / (2 sigma^2 d))``),
``cosine`` (``<a, b> / (|a| |b|)``, pHSIC's best CIFAR-10 variant: Pogodin and Latham, NeurIPS
2020) or ``linear`` (``<a, b> / d``); ``sigma`` is used by the Gaussian only. They are centred as
``Kc = H K H``; :mod:`layerwise.objectives.kernels` builds them, with fused backwards. On one-hot
labels every kernel gives ``H Y Y^T H`` up to a scale, so the label term stays exact and cheap.

Two normalisations:
- ``cca`` (the papers'): ``nHSIC(A, B) = tr(Ra Rb)``, ``R = Kc (Kc + eps m I)^-1``, through
  :class:`~layerwise.objectives.kernels.CCAStatistic` and its closed-form gradient. ``R_y``
  comes from a ``C x C`` solve, since one-hot labels have a Gram of rank at most ``C``.
- ``cka``: ``<Kc_a, Kc_b>_F / (||Kc_a||_F ||Kc_b||_F)``, in [0, 1] and with no solve.

Grouped neurons (``groups: G``, pHSIC's "grp" variants): the block's ``d`` outputs are split into
``G`` contiguous groups, and each sample's group ``g`` is summarised by the spread of its neurons,
``((sum_j (z_gj - mean_g z)^2 + group_delta) / (d / G)) ** group_power``, so the kernel of Z sees
``G`` group activities instead of ``d`` neurons. Only Z is grouped; X and Y are not.

The input and label terms (``R_x``, ``R_y`` or the unit-norm centred Grams) do not depend on
the block, so they are computed once per batch and shared through ``ctx.kernels``.

For large batches, ``estimator: rff`` (Gaussian kernel only) replaces each kernel by ``D`` random
Fourier features ``Phi`` with ``Kc ~ Phi Phi^T`` (Rahimi and Recht, 2007). Both normalisations then need only
``D x D`` matrices: CKA is ``||Pa^T Pb||_F^2 / (||Pa^T Pa||_F ||Pb^T Pb||_F)``, and by the
push-through identity ``R = Phi (Phi^T Phi + eps m I)^-1 Phi^T``. The labels need no random
features: their centred kernel is exactly ``U U^T`` with ``C`` columns
(:func:`~layerwise.objectives.kernels.label_factors`), so the label term is exact and cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from layerwise.errors import LayerwiseError
from layerwise.objectives.base import KernelCache, LossContext, Objective
from layerwise.objectives.kernels import (
    CCAStatistic,
    CKAStatistic,
    cca_operator,
    centered_gram,
    label_cca_operator,
    label_factors,
    spd_factor,
    unit_centered_gram,
)
from layerwise.schema import Problems, join


@dataclass
class NHSICConfig:
    """Options of the ``nhsic`` objective."""

    # Kernel of Z, X and the labels (on one-hot labels all three give H Y Y^T H up to a scale):
    # gaussian exp(-||a - b||^2 / (2 sigma^2 d)), cosine <a, b> / (|a| |b|), linear <a, b> / d.
    kernel: Literal["gaussian", "cosine", "linear"] = "gaussian"
    # Kernel width, in units of sqrt(d). 5 is the HSIC-bottleneck code's default and works
    # from 128- to 784-wide features because the width is already divided out.
    # Gaussian kernel only: cosine and linear ignore it.
    sigma: float = 5.0
    # Weight of the label term. Large values (50-500) favour keeping label information;
    # with the cca form nHSIC(Z, Y) is at most the number of classes - 1.
    beta: float = 100.0
    normalization: Literal["cca", "cka"] = "cca"
    # Ridge of the cca form, relative to the batch size (the papers use 1e-5).
    eps: float = 1e-5
    # "exact" builds m x m Gram matrices; "rff" approximates each kernel with random Fourier
    # features, costing O(m D^2) instead of O(m^2 d + m^3), for batches in the thousands.
    # rff approximates the Gaussian kernel, so it needs kernel: gaussian.
    estimator: Literal["exact", "rff"] = "exact"
    # Number D of random Fourier features per kernel (rff only); the error shrinks like 1/sqrt(D).
    features: int = 512
    # Seed of the random frequencies; every block shares it, so the X features agree.
    feature_seed: int = 0
    # Grouped neurons (pHSIC's "grp"; Pogodin and Latham, NeurIPS 2020): 0 is off; G > 0 splits the
    # block's flattened output into G contiguous groups of equal size (at least 2 neurons each) and
    # the kernel of Z sees each group's spread, ((sum of squared deviations + group_delta) / size)
    # ** group_power, per sample. pHSIC's MLPs use G = 32 (or 16), power 0.5 and delta 1.
    groups: int = 0
    group_power: float = 0.5
    # Smoothing of the spread. Must be > 0 when group_power < 1: a group whose neurons are all
    # equal (say, all silent ReLUs) would otherwise have an infinite gradient.
    group_delta: float = 1.0

    def __post_build__(self, path: str, problems: Problems) -> None:
        if self.sigma <= 0:
            problems.add(join(path, "sigma"), f"must be > 0, found {self.sigma}")
        if self.beta < 0:
            problems.add(join(path, "beta"), f"must be >= 0, found {self.beta}")
        if self.eps <= 0:
            problems.add(join(path, "eps"), f"must be > 0, found {self.eps}")
        if self.features <= 0:
            problems.add(join(path, "features"), f"must be > 0, found {self.features}")
        if self.groups < 0:
            problems.add(join(path, "groups"), f"must be 0 (off) or a number of groups >= 1, found {self.groups}")
        if self.group_power <= 0:
            problems.add(join(path, "group_power"), f"must be > 0, found {self.group_power}")
        if self.group_delta < 0 or (self.group_delta == 0 and self.group_power < 1):
            problems.add(join(path, "group_delta"),
                         f"must be > 0 when group_power < 1 (a group of equal neurons would have an infinite "
                         f"gradient) and >= 0 otherwise, found {self.group_delta}")
        if self.estimator == "rff" and self.kernel != "gaussian":
            problems.add(join(path, "estimator"),
                         f"rff (random Fourier features) approximates the gaussian kernel only, found kernel "
                         f"{self.kernel!r}; use estimator: exact with it, or kernel: gaussian")


def fourier_frequencies(width: int, cfg: NHSICConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies ``W`` (width, D) and phases ``b`` (D,) whose features approximate the kernel.

    By Bochner's theorem ``exp(-||a - b||^2 / (2 s^2))`` is the expectation of
    ``2 cos(w.a + u) cos(w.b + u)`` for ``w ~ N(0, I / s^2)``, ``u ~ U[0, 2 pi)``; here
    ``s^2 = sigma^2 d``. Seeded by width, so every block draws the same features for X.
    """
    generator = torch.Generator().manual_seed(cfg.feature_seed * 1_000_003 + width)
    freqs = torch.randn(width, cfg.features, generator=generator) / (cfg.sigma * math.sqrt(width))
    phases = torch.rand(cfg.features, generator=generator) * (2 * math.pi)
    return freqs, phases


def centered_features(values: torch.Tensor, freqs: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Column-centred random Fourier features ``Phi`` (m, D), so that ``Kc ~ Phi Phi^T``."""
    phi = torch.cos(values @ freqs + phases) * math.sqrt(2.0 / freqs.shape[1])
    return phi - phi.mean(dim=0, keepdim=True)


def feature_cca_factor(phi: torch.Tensor, eps: float) -> torch.Tensor:
    """Cholesky factor of ``Phi^T Phi + eps m I`` (D x D): ``R = Phi S^-1 Phi^T`` by push-through."""
    ridge = eps * phi.shape[0]
    gram = phi.T @ phi
    return spd_factor(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def feature_cca(phi_a: torch.Tensor, factor_a: torch.Tensor, phi_b: torch.Tensor,
                factor_b: torch.Tensor) -> torch.Tensor:
    """``tr(Ra Rb) = tr(Sa^-1 Ca Sb^-1 Ca^T)`` with ``Ca = Phi_a^T Phi_b``: only D x D work."""
    cross = phi_a.T @ phi_b
    left = torch.cholesky_solve(cross, factor_a)
    right = torch.cholesky_solve(cross.T.contiguous(), factor_b)
    return (left * right.T).sum()


def feature_cka(phi_a: torch.Tensor, phi_b: torch.Tensor) -> torch.Tensor:
    """CKA from features: ``||Pa^T Pb||_F^2 / (||Pa^T Pa||_F ||Pb^T Pb||_F)``."""
    tiny = torch.finfo(phi_a.dtype).tiny
    cross = (phi_a.T @ phi_b).square().sum()
    return cross / ((phi_a.T @ phi_a).norm() * (phi_b.T @ phi_b).norm()).clamp_min(tiny)


def check_groups(width: int, groups: int) -> None:
    """A clear error unless ``groups`` divide a block of ``width`` outputs into groups of at least
    2 neurons (one neuron has no spread: its activity would always be delta)."""
    if width % groups or width // groups < 2:
        raise LayerwiseError(f"groups: {groups} must divide the block's {width} outputs into groups of at least "
                             f"2 neurons; try a divisor of {width} no larger than {width // 2}")


def grouped_activity(z: torch.Tensor, groups: int, power: float, delta: float) -> torch.Tensor:
    """``(m, groups)``: each sample's spread within each contiguous group of ``z``'s columns,
    ``((sum (z - group mean)^2 + delta) / size) ** power``; differentiable."""
    split = z.reshape(z.shape[0], groups, -1)
    deviations = split - split.mean(dim=-1, keepdim=True)
    return ((deviations.square().sum(dim=-1) + delta) / split.shape[-1]).pow(power)


def kernel_input(z: torch.Tensor, cfg: NHSICConfig, dtype: torch.dtype) -> torch.Tensor:
    """What the kernel of Z sees: the block's output flattened, in ``dtype``, grouped when ``cfg.groups``."""
    z = z.flatten(1).to(dtype)
    return grouped_activity(z, cfg.groups, cfg.group_power, cfg.group_delta) if cfg.groups else z


def exact_terms(z: torch.Tensor, x: torch.Tensor, onehot: torch.Tensor, cfg: NHSICConfig,
                kernels: KernelCache) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nHSIC(Z, X), nHSIC(Z, Y))`` from exact ``m x m`` Grams, for flat ``z``, ``x`` and one-hot
    labels of one dtype. The X and Y terms go through ``kernels``, keyed by everything they
    depend on: the kernel (so blocks with different kernels never share them), sigma (Gaussian
    only: blocks that differ only in an ignored sigma share them), eps (cca) and the dtype."""
    sigma = cfg.sigma if cfg.kernel == "gaussian" else None
    if cfg.normalization == "cca":
        key = ("nhsic-cca", cfg.kernel, sigma, cfg.eps, z.dtype)
        r_x = kernels.get(key + ("x",), lambda: cca_operator(centered_gram(x, sigma, cfg.kernel), cfg.eps))
        r_y = kernels.get(key + ("y",), lambda: label_cca_operator(onehot, sigma, cfg.eps, cfg.kernel))
        stats = CCAStatistic.apply(centered_gram(z, sigma, cfg.kernel), r_x, r_y, cfg.eps)
    else:
        key = ("nhsic-cka", cfg.kernel, sigma, z.dtype)
        u_x = kernels.get(key + ("x",), lambda: unit_centered_gram(x, sigma, cfg.kernel))
        u_y = kernels.get(key + ("y",), lambda: unit_centered_gram(onehot, sigma, cfg.kernel))
        stats = CKAStatistic.apply(centered_gram(z, sigma, cfg.kernel), u_x, u_y)
    hsic_zx, hsic_zy = stats
    return hsic_zx, hsic_zy


class NHSIC(Objective):
    """``nhsic``: the normalised HSIC bottleneck, ``nHSIC(Z, X) - beta * nHSIC(Z, Y)``."""

    name = "nhsic"
    Config = NHSICConfig

    def __init__(self, config: NHSICConfig, info):
        super().__init__(config, info)
        width = math.prod(info.out_shape)
        if config.groups:
            check_groups(width, config.groups)
        if config.estimator == "rff":
            # Buffers, so the frequencies follow the model to its device once; not saved in
            # checkpoints (persistent=False) since the seed regenerates them exactly.
            # (The labels need none: their kernel is exactly U U^T with C columns, label_factors.)
            widths = {"z": config.groups or width, "x": math.prod(info.input_shape)}
            for name, width in widths.items():
                freqs, phases = fourier_frequencies(width, config)
                self.register_buffer(f"freqs_{name}", freqs, persistent=False)
                self.register_buffer(f"phases_{name}", phases, persistent=False)

    def rff_terms(self, z: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ctx: LossContext):
        """``(nHSIC(Z, X), nHSIC(Z, Y))`` from random Fourier features."""
        cfg: NHSICConfig = self.config
        key = ("nhsic-rff", cfg.sigma, cfg.features, cfg.feature_seed, z.dtype)
        phi_x = ctx.kernels.get(key + ("x",), lambda: centered_features(x, self.freqs_x.to(x.dtype),
                                                                        self.phases_x.to(x.dtype)))
        phi_y = ctx.kernels.get(key + ("y",), lambda: label_factors(y, cfg.sigma))
        phi_z = centered_features(z, self.freqs_z.to(z.dtype), self.phases_z.to(z.dtype))
        if cfg.normalization == "cka":
            return feature_cka(phi_z, phi_x), feature_cka(phi_z, phi_y)
        factor_x = ctx.kernels.get(key + (cfg.eps, "x-factor"), lambda: feature_cca_factor(phi_x, cfg.eps))
        factor_y = ctx.kernels.get(key + (cfg.eps, "y-factor"), lambda: feature_cca_factor(phi_y, cfg.eps))
        factor_z = feature_cca_factor(phi_z, cfg.eps)
        return feature_cca(phi_z, factor_z, phi_x, factor_x), feature_cca(phi_z, factor_z, phi_y, factor_y)

    def nonfinite_hint(self) -> str:
        """Tiny sigmas overflow the kernel's exponent; otherwise the block's own updates are suspect."""
        width = self.config.groups or math.prod(self.info.out_shape)  # what the kernel of Z sees
        if self.config.kernel == "gaussian" and self.config.sigma < 1:
            return (f"sigma {self.config.sigma:g} too small for the kernel widths (d = {width} for this block, "
                    f"{self.info.num_classes} for the labels): the exponent 1/(2 sigma^2 d) overflows and the "
                    f"kernel becomes NaN; typical sigma is about 5")
        return "a learning rate too high for this block (lower optim.local.lr)"

    def loss(self, z: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Kernels in at least float32, with autocast off: a bf16 distance matmul cancels
        # catastrophically in |a|^2 + |b|^2 - 2ab, and exp and the solve are too coarse.
        with torch.autocast(z.device.type, enabled=False):
            return self.float_loss(z, ctx)

    def float_loss(self, z: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`loss` in at least float32."""
        cfg: NHSICConfig = self.config
        dtype = torch.promote_types(z.dtype, torch.float32)
        z = kernel_input(z, cfg, dtype)
        x = ctx.x.flatten(1).to(dtype)
        y = ctx.y_onehot().to(dtype)
        if cfg.estimator == "rff":
            hsic_zx, hsic_zy = self.rff_terms(z, x, y, ctx)
        else:
            hsic_zx, hsic_zy = exact_terms(z, x, y, cfg, ctx.kernels)
        loss = hsic_zx - cfg.beta * hsic_zy
        metrics = {"loss": loss.detach(), "hsic_zx": hsic_zx.detach(), "hsic_zy": hsic_zy.detach()}
        return loss, metrics
