"""Kernel matrices and the statistics behind the nHSIC objective, with fused backwards.

Three kernels (:data:`KERNELS`), each scaled so that one setting suits layers of any width ``d``:

- ``gaussian``: ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2 d))``;
- ``cosine``: ``k(a, b) = <a, b> / (|a| |b|)``, each norm clamped below at :data:`COSINE_EPS`
  (a zero row then has kernel 0 with every row, instead of NaN);
- ``linear``: ``k(a, b) = <a, b> / d``.

Centering ``Kc = H K H`` (with ``H = I - 11^T/m``) subtracts row, column and grand means;
``H`` is never built. For the two dot-product kernels ``K = F F^T`` with ``F`` the normalised
(cosine) or scaled (linear) rows, so ``Kc = (H F)(H F)^T``: the columns of ``F`` are centred
and one matmul gives the centred Gram (:class:`CenteredDotGram`).

Why custom autograd functions: at batch 256 the kernel work of a block is as large as the
block's own layer, so every pass over an ``m x m`` matrix and every matmul shows in the time per
batch (docs/performance.md has the profiles). Autograd through the plain expressions
differentiates ``F @ F.T`` as two matmuls, one per operand, and keeps each elementwise
intermediate alive; :class:`CenteredGaussianGram` needs one matmul and one saved ``m x m``
matrix. :class:`CCAStatistic` replaces differentiation through a Cholesky factorisation by a
closed form, and :class:`CKAStatistic` the half-dozen elementwise passes of autograd through a
norm and a division by three. :class:`CenteredDotGram` differentiates ``Fc Fc^T`` with one
matmul instead of autograd's two.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

KERNELS = ("gaussian", "cosine", "linear")
# Floor of the row norms of the cosine kernel: rows shorter than this (in practice only all-zero
# rows, e.g. a sample whose ReLU units are all off) are divided by it, not by their own norm.
COSINE_EPS = 1e-12


def _exponent_scale(width: int, sigma: float) -> float:
    """``1 / (2 sigma^2 d)``: squared distances times this are the kernel's negative exponent."""
    return 1.0 / (2.0 * sigma * sigma * width)


def gaussian_gram(features: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian Gram matrix of the rows of ``features`` (m, ...), flattened to (m, d).

    Distances come from one matmul, ``|a|^2 + |b|^2 - 2 a b^T``, not an (m, m, d) broadcast;
    rounding can make them negative, where the clamp puts them back to zero, and the diagonal is
    exactly zero. Built in place, so not differentiable: :func:`centered_gaussian_gram` is.
    """
    flat = features.flatten(1)
    if flat.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("gaussian_gram is not differentiable; use centered_gaussian_gram")
    sq_norms = (flat * flat).sum(dim=1)
    dist = torch.addmm(sq_norms[:, None] + sq_norms[None, :], flat, flat.T, alpha=-2.0)
    dist.clamp_min_(0.0).diagonal().zero_()
    # The scale multiplies afterwards, not through addmm's alpha: alpha must fit in the dtype,
    # and a tiny sigma's scale need not (the non-finite watch then reports the NaN kernel).
    return dist.mul_(-_exponent_scale(flat.shape[1], sigma)).exp_()


def center(gram: torch.Tensor) -> torch.Tensor:
    """``H K H`` without building ``H``: subtract row and column means, add back the grand mean."""
    row_means = gram.mean(dim=1, keepdim=True)
    col_means = gram.mean(dim=0, keepdim=True)
    return (gram - row_means).sub_(col_means).add_(row_means.mean())


def frobenius(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<A, B>_F``: a dot product of flat views, no ``m x m`` temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


class CenteredGaussianGram(torch.autograd.Function):
    """``Kc = H K H`` of :func:`gaussian_gram`, with a backward of one matmul.

    With ``G`` the incoming gradient, ``S = (H G H) * K * (-1 / (2 sigma^2 d))`` is the gradient
    with respect to the squared distances, and ``d/dF = 2 (diag((S + S^T) 1) F - (S + S^T) F)``.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, sigma: float) -> torch.Tensor:
        flat = features.flatten(1)
        gram = gaussian_gram(flat, sigma)
        ctx.save_for_backward(flat, gram)
        ctx.scale = -_exponent_scale(flat.shape[1], sigma)
        ctx.shape = features.shape
        return center(gram)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_centered: torch.Tensor):
        flat, gram = ctx.saved_tensors
        dist_grad = center(grad_centered).mul_(gram)  # H is its own adjoint; then through exp
        dist_grad += dist_grad.T.clone()  # both (i, j) and (j, i) depend on rows i and j
        row_sums = dist_grad.sum(dim=1, keepdim=True)
        grad = torch.addmm(row_sums * flat, dist_grad, flat, alpha=-1.0).mul_(2.0 * ctx.scale)
        return grad.view(ctx.shape), None


def centered_gaussian_gram(features: torch.Tensor, sigma: float) -> torch.Tensor:
    """``H K H`` of the Gaussian kernel of ``features``, differentiable through :class:`CenteredGaussianGram`."""
    if features.requires_grad:
        return CenteredGaussianGram.apply(features, sigma)
    return center(gaussian_gram(features, sigma))


def dot_features(features: torch.Tensor, kernel: str) -> torch.Tensor:
    """Rows ``F`` (m, d) whose dot products are the ``cosine`` or ``linear`` kernel, ``K = F F^T``.

    ``cosine``: ``a / max(|a|, COSINE_EPS)``; ``linear``: ``a / sqrt(d)``, so ``K = <a, b> / d``.
    Differentiable by plain autograd: these are ``O(m d)`` elementwise passes.
    """
    flat = features.flatten(1)
    if kernel == "cosine":
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)
    if kernel == "linear":
        return flat * (1.0 / math.sqrt(flat.shape[1]))
    raise ValueError(f"dot_features: kernel must be 'cosine' or 'linear', found {kernel!r}")


class CenteredDotGram(torch.autograd.Function):
    """``Kc = Fc Fc^T`` with ``Fc = H F`` (column-centred rows), with a backward of one matmul.

    With ``G`` the incoming gradient, ``d/dFc = (G + G^T) Fc``, and ``d/dF = H (G + G^T) Fc``
    (subtract the column means); autograd would spend a matmul on each operand of ``Fc Fc^T``.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        centred = features - features.mean(dim=0, keepdim=True)
        ctx.save_for_backward(centred)
        return centred @ centred.T

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_centered: torch.Tensor):
        (centred,) = ctx.saved_tensors
        grad = (grad_centered + grad_centered.T) @ centred
        return grad.sub_(grad.mean(dim=0, keepdim=True))


def centered_dot_gram(features: torch.Tensor) -> torch.Tensor:
    """``H F F^T H`` of rows ``F`` (m, d), differentiable through :class:`CenteredDotGram`."""
    if features.requires_grad:
        return CenteredDotGram.apply(features)
    centred = features - features.mean(dim=0, keepdim=True)
    return centred @ centred.T


def centered_gram(features: torch.Tensor, sigma: float | None, kernel: str = "gaussian") -> torch.Tensor:
    """``H K H`` for any of :data:`KERNELS` (``sigma`` is used by the Gaussian only), differentiable."""
    if kernel == "gaussian":
        return centered_gaussian_gram(features, sigma)
    return centered_dot_gram(dot_features(features, kernel))


def spd_factor(matrix: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive definite matrix, all NaN if it is not one.

    A failed factorisation only happens with non-finite features (a PSD Gram plus a ridge is
    positive definite). Poisoning the factor on the device, rather than reading ``info`` on the
    host and raising, keeps a GPU step free of syncs; the NaN reaches the loss, where the trainer's
    non-finite watch names the block and the likely cause.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    failed = info != 0
    # In place unless autograd differentiates through the factor (the rff estimator does).
    return factor.masked_fill(failed, math.nan) if factor.requires_grad else factor.masked_fill_(failed, math.nan)


def ridge_inverse(centered: torch.Tensor, eps: float) -> tuple[torch.Tensor, float]:
    """``M^-1 = (Kc + eps m I)^-1`` from a Cholesky factor, and the ridge ``eps m``.

    Why an inverse although solves are the usual advice: ``M`` is symmetric positive definite
    with condition number at most ``1 + max eig(Kc) / ridge``, so inverting through its Cholesky
    factor loses nothing over solving with it; and on the CPU ``cholesky_inverse`` costs a
    third of a ``cholesky_solve`` with ``m`` right-hand sides, while the backward needs
    ``M^-1 G M^-1``, two plain matmuls once ``M^-1`` exists.
    """
    ridge = eps * centered.shape[0]
    regularised = centered.clone()
    regularised.diagonal().add_(ridge)
    inverse = torch.cholesky_inverse(spd_factor(regularised))
    # LAPACK hands back column-major storage; the matrix is symmetric, so its transpose is the
    # same matrix in row-major order, which flat views (the dot products below) need.
    return (inverse if inverse.is_contiguous() else inverse.mT), ridge


def cca_operator(centered: torch.Tensor, eps: float) -> torch.Tensor:
    """``R = Kc (Kc + eps m I)^-1``, computed as ``I - eps m (Kc + eps m I)^-1``."""
    inverse, ridge = ridge_inverse(centered, eps)
    operator = inverse.mul_(-ridge)
    operator.diagonal().add_(1.0)
    return operator


def label_factors(onehot: torch.Tensor, sigma: float | None, kernel: str = "gaussian") -> torch.Tensor:
    """``U`` (m, C) with ``U U^T`` exactly the centred label Gram, for one-hot labels (m, C).

    Two one-hot rows are equal or at squared distance 2, so the Gaussian label Gram is
    ``K = a 11^T + (1 - a) Y Y^T`` with ``a = exp(-1 / (sigma^2 C))``, and its centred form is
    ``Kc = U U^T`` with ``U = sqrt(1 - a) (Y - mean(Y))``: rank at most ``C``. One-hot rows have
    unit norm, so the cosine Gram is ``Y Y^T`` (``U = Y - mean(Y)``) and the linear one
    ``Y Y^T / C`` (``U = (Y - mean(Y)) / sqrt(C)``): every kernel gives ``H Y Y^T H`` up to a scale.
    """
    if kernel == "cosine":
        return onehot - onehot.mean(dim=0, keepdim=True)
    if kernel == "linear":
        return (onehot - onehot.mean(dim=0, keepdim=True)) * (1.0 / math.sqrt(onehot.shape[1]))
    off_class = math.exp(-1.0 / (sigma * sigma * onehot.shape[1]))
    return (onehot - onehot.mean(dim=0, keepdim=True)) * math.sqrt(1.0 - off_class)


def label_cca_operator(onehot: torch.Tensor, sigma: float | None, eps: float,
                       kernel: str = "gaussian") -> torch.Tensor:
    """``R_y`` for one-hot labels (m, C) in ``O(m^2 C)``, with no ``m x m`` factorisation: by the
    push-through identity ``R = Kc (Kc + lam I)^-1 = U (U^T U + lam I)^-1 U^T`` with ``U`` from
    :func:`label_factors`, a ``C x C`` solve."""
    factors = label_factors(onehot, sigma, kernel)
    inner = factors.T @ factors
    inner.diagonal().add_(eps * onehot.shape[0])
    return factors @ torch.cholesky_solve(factors.T, spd_factor(inner))


class CCAStatistic(torch.autograd.Function):
    """``(tr(Rz Rx), tr(Rz Ry))`` from ``Kc_z``, with the closed-form gradient.

    Writing ``M = Kc_z + lam I`` with ``lam = eps m``, ``Rz = I - lam M^-1``, so
    ``tr(Rz R) = tr(R) - lam tr(M^-1 R)`` and ``d tr(Rz R) / d Kc_z = lam M^-1 R M^-1``: one
    Cholesky-based inverse serves the forward and the backward.
    """

    @staticmethod
    def forward(ctx, centered_z: torch.Tensor, r_x: torch.Tensor, r_y: torch.Tensor, eps: float) -> torch.Tensor:
        inverse, ridge = ridge_inverse(centered_z, eps)
        # tr(A B) = <A, B> for symmetric matrices: a dot product, no m x m temporary.
        stats = torch.stack((
            torch.diagonal(r_x).sum() - ridge * frobenius(inverse, r_x),
            torch.diagonal(r_y).sum() - ridge * frobenius(inverse, r_y),
        ))
        ctx.save_for_backward(inverse, r_x, r_y)
        ctx.ridge = ridge
        return stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_stats: torch.Tensor):
        inverse, r_x, r_y = ctx.saved_tensors
        weights = grad_stats * ctx.ridge
        weighted = torch.addcmul(r_x * weights[0], r_y, weights[1])
        return inverse @ weighted @ inverse, None, None, None


def unit_centered_gram(features: torch.Tensor, sigma: float | None, kernel: str = "gaussian") -> torch.Tensor:
    """Centred Gram (of any of :data:`KERNELS`) divided by its Frobenius norm, the building block of CKA."""
    centered = centered_gram(features, sigma, kernel)
    return centered / centered.norm().clamp_min(torch.finfo(centered.dtype).tiny)


class CKAStatistic(torch.autograd.Function):
    """``(<Kc_z, U_x>, <Kc_z, U_y>) / ||Kc_z||`` for unit-norm ``U_x``, ``U_y``: the two CKAs.

    With ``n = ||Kc_z||`` and ``s`` the statistics, ``d s_i / d Kc_z = (U_i - s_i Kc_z / n) / n``.
    """

    @staticmethod
    def forward(ctx, centered_z: torch.Tensor, unit_x: torch.Tensor, unit_y: torch.Tensor) -> torch.Tensor:
        norm = frobenius(centered_z, centered_z).sqrt().clamp_min(torch.finfo(centered_z.dtype).tiny)
        stats = torch.stack((frobenius(centered_z, unit_x), frobenius(centered_z, unit_y))) / norm
        ctx.save_for_backward(centered_z, unit_x, unit_y, norm, stats)
        return stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_stats: torch.Tensor):
        centered_z, unit_x, unit_y, norm, stats = ctx.saved_tensors
        weighted = torch.addcmul(unit_x * grad_stats[0], unit_y, grad_stats[1])
        grad = torch.addcmul(weighted, centered_z, -(grad_stats * stats).sum() / norm).div_(norm)
        return grad, None, None
