"""The normalised HSIC bottleneck as a local objective.

Papers:
- Ma, Lewis, Kleijn, "The HSIC Bottleneck: Deep Learning without Back-Propagation", AAAI 2020.
- Birjais, Wang, Abdulla, "Training Deep Neural Networks with HSIC and Backpropagation"
  (eqs. 3 and 4 give the normalised form used here).

For a block with output ``Z`` on a batch of ``m`` samples, network input ``X`` (flattened)
and one-hot labels ``Y``, the block minimises

    loss = nHSIC(Z, X) - beta * nHSIC(Z, Y)

keeping what predicts the label while forgetting the rest of the input.

Kernels are Gaussian with the width scaled by the feature count ``d``:
``k(a, b) = exp(-||a - b||^2 / (2 sigma^2 d))``, so one ``sigma`` suits layers of any width.
Centering ``Kc = H K H`` (with ``H = I - 11^T/m``) is done by subtracting row, column and
grand means; ``H`` is never built.

Two normalisations:
- ``cca`` (the papers'): ``nHSIC(A, B) = tr(Ra Rb)``, ``R = Kc (Kc + eps m I)^-1``.
  Writing ``M = Kc + lam I`` with ``lam = eps m``, ``R = I - lam M^-1`` and so
  ``d tr(Ra Rb) / d Kc_a = lam M^-1 Rb M^-1``. :class:`CCAStatistic` uses that closed form:
  one Cholesky-based inverse of ``M`` serves the forward and the backward, instead of autograd
  differentiating through the factorisation.
- ``cka``: ``<Kc_a, Kc_b>_F / (||Kc_a||_F ||Kc_b||_F)``, in [0, 1] and with no solve.

The input and label terms (``R_x``, ``R_y`` or the unit-norm centred Grams) do not depend on
the block, so they are computed once per batch and shared through ``ctx.kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from layerwise.objectives.base import LossContext, Objective
from layerwise.schema import Problems, join


@dataclass
class NHSICConfig:
    """Options of the ``nhsic`` objective."""

    # Kernel width, in units of sqrt(d). 5 is the HSIC-bottleneck code's default and works
    # from 128- to 784-wide features because the width is already divided out.
    sigma: float = 5.0
    # Weight of the label term. Large values (50-500) favour keeping label information;
    # with the cca form nHSIC(Z, Y) is at most the number of classes - 1.
    beta: float = 100.0
    normalization: Literal["cca", "cka"] = "cca"
    # Ridge of the cca form, relative to the batch size (the papers use 1e-5).
    eps: float = 1e-5

    def __post_build__(self, path: str, problems: Problems) -> None:
        if self.sigma <= 0:
            problems.add(join(path, "sigma"), f"must be > 0, found {self.sigma}")
        if self.beta < 0:
            problems.add(join(path, "beta"), f"must be >= 0, found {self.beta}")
        if self.eps <= 0:
            problems.add(join(path, "eps"), f"must be > 0, found {self.eps}")


def gaussian_gram(features: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian Gram matrix of the rows of ``features`` (m, d), width scaled by ``d``.

    Distances come from one matmul, ``|a|^2 + |b|^2 - 2 a b^T``, not an (m, m, d) broadcast.
    """
    flat = features.flatten(1)
    sq_norms = (flat * flat).sum(dim=1)
    dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (flat @ flat.T)).clamp_min_(0.0)
    return torch.exp(dist * (-1.0 / (2.0 * sigma * sigma * flat.shape[1])))


def center(gram: torch.Tensor) -> torch.Tensor:
    """``H K H`` without building ``H``: subtract row and column means, add back the grand mean."""
    return gram - gram.mean(dim=0, keepdim=True) - gram.mean(dim=1, keepdim=True) + gram.mean()


def ridge_inverse(centered: torch.Tensor, eps: float) -> tuple[torch.Tensor, float]:
    """``M^-1 = (Kc + eps m I)^-1`` from a Cholesky factor, and the ridge ``eps m``.

    Why an inverse although solves are the usual advice: ``M`` is symmetric positive definite
    with condition number at most ``1 + max eig(Kc) / ridge``, so inverting through its Cholesky
    factor loses nothing over solving with it; and on the CPU ``cholesky_inverse`` costs a
    third of a ``cholesky_solve`` with ``m`` right-hand sides, while the backward needs
    ``M^-1 G M^-1``, two plain matmuls once ``M^-1`` exists.
    """
    ridge = eps * centered.shape[0]
    eye = torch.eye(centered.shape[0], dtype=centered.dtype, device=centered.device)
    factor, info = torch.linalg.cholesky_ex(centered + ridge * eye)
    if int(info) != 0:  # only reached with NaN/Inf features; a PSD Kc plus a ridge is positive definite
        raise FloatingPointError("nHSIC: the regularised kernel is not positive definite (non-finite features?)")
    return torch.cholesky_inverse(factor), ridge


def cca_operator(centered: torch.Tensor, eps: float) -> torch.Tensor:
    """``R = Kc (Kc + eps m I)^-1``, computed as ``I - eps m (Kc + eps m I)^-1``."""
    inverse, ridge = ridge_inverse(centered, eps)
    eye = torch.eye(centered.shape[0], dtype=centered.dtype, device=centered.device)
    return eye - ridge * inverse


class CCAStatistic(torch.autograd.Function):
    """``(tr(Rz Rx), tr(Rz Ry))`` from ``Kc_z``, with the closed-form gradient in the module docstring."""

    @staticmethod
    def forward(ctx, centered_z: torch.Tensor, r_x: torch.Tensor, r_y: torch.Tensor, eps: float) -> torch.Tensor:
        inverse, ridge = ridge_inverse(centered_z, eps)
        # tr(Rz R) = tr(R) - ridge * tr(M^-1 R), and tr(A B) = sum(A * B^T) with every matrix symmetric.
        stats = torch.stack((
            torch.diagonal(r_x).sum() - ridge * (inverse * r_x).sum(),
            torch.diagonal(r_y).sum() - ridge * (inverse * r_y).sum(),
        ))
        ctx.save_for_backward(inverse, r_x, r_y)
        ctx.ridge = ridge
        return stats

    @staticmethod
    def backward(ctx, grad_stats: torch.Tensor):
        inverse, r_x, r_y = ctx.saved_tensors
        weighted = grad_stats[0] * r_x + grad_stats[1] * r_y
        return ctx.ridge * (inverse @ weighted @ inverse), None, None, None


def unit_centered_gram(features: torch.Tensor, sigma: float) -> torch.Tensor:
    """Centred Gaussian Gram divided by its Frobenius norm, the building block of CKA."""
    centered = center(gaussian_gram(features, sigma))
    return centered / centered.norm().clamp_min(torch.finfo(centered.dtype).tiny)


class NHSIC(Objective):
    """``nhsic``: the normalised HSIC bottleneck, ``nHSIC(Z, X) - beta * nHSIC(Z, Y)``."""

    name = "nhsic"
    Config = NHSICConfig

    def loss(self, z: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg: NHSICConfig = self.config
        # Kernels in at least float32: exp and the solve are too coarse in half precision.
        dtype = torch.promote_types(z.dtype, torch.float32)
        z = z.flatten(1).to(dtype)
        x = ctx.x.flatten(1).to(dtype)
        y = ctx.y_onehot().to(dtype)
        if cfg.normalization == "cca":
            key = ("nhsic-cca", cfg.sigma, cfg.eps, dtype)
            r_x = ctx.kernels.get(key + ("x",), lambda: cca_operator(center(gaussian_gram(x, cfg.sigma)), cfg.eps))
            r_y = ctx.kernels.get(key + ("y",), lambda: cca_operator(center(gaussian_gram(y, cfg.sigma)), cfg.eps))
            hsic_zx, hsic_zy = CCAStatistic.apply(center(gaussian_gram(z, cfg.sigma)), r_x, r_y, cfg.eps)
        else:
            key = ("nhsic-cka", cfg.sigma, dtype)
            u_x = ctx.kernels.get(key + ("x",), lambda: unit_centered_gram(x, cfg.sigma))
            u_y = ctx.kernels.get(key + ("y",), lambda: unit_centered_gram(y, cfg.sigma))
            u_z = unit_centered_gram(z, cfg.sigma)
            hsic_zx, hsic_zy = (u_z * u_x).sum(), (u_z * u_y).sum()
        loss = hsic_zx - cfg.beta * hsic_zy
        metrics = {"loss": loss.detach(), "hsic_zx": hsic_zx.detach(), "hsic_zy": hsic_zy.detach()}
        return loss, metrics
