"""The nHSIC objective against a direct textbook implementation (docs/design.md, section 3).

The reference functions below build everything the slow, obvious way: an explicit kernel
loop, an explicit centering matrix ``H`` and an explicit inverse, all in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.objectives.base import BlockInfo, LossContext
from layerwise.objectives.kernels import (
    CCAStatistic,
    CKAStatistic,
    cca_operator,
    center,
    centered_gaussian_gram,
    gaussian_gram,
    label_cca_operator,
    label_factors,
    unit_centered_gram,
)
from layerwise.objectives.nhsic import NHSIC, NHSICConfig
from layerwise.schema import Problems, build

F64 = torch.float64


# ---------------------------------------------------------------- textbook reference


def ref_gram_loop(a: torch.Tensor, sigma: float) -> torch.Tensor:
    """k(a_i, a_j) = exp(-||a_i - a_j||^2 / (2 sigma^2 d)), one entry at a time."""
    a = a.reshape(a.shape[0], -1)
    m, d = a.shape
    rows = []
    for i in range(m):
        row = []
        for j in range(m):
            sq = sum((a[i, k] - a[j, k]) ** 2 for k in range(d))
            row.append(torch.exp(-sq / (2.0 * sigma**2 * d)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_gram(a: torch.Tensor, sigma: float) -> torch.Tensor:
    """The same kernel by an (m, m, d) broadcast: differentiable, fine for small m."""
    a = a.reshape(a.shape[0], -1)
    d = a.shape[1]
    diff = a[:, None, :] - a[None, :, :]
    return torch.exp(-(diff**2).sum(-1) / (2.0 * sigma**2 * d))


def ref_h(m: int) -> torch.Tensor:
    return torch.eye(m, dtype=F64) - torch.ones(m, m, dtype=F64) / m


def ref_center(k: torch.Tensor) -> torch.Tensor:
    h = ref_h(k.shape[0])
    return h @ k @ h


def ref_r(kc: torch.Tensor, eps: float) -> torch.Tensor:
    m = kc.shape[0]
    return kc @ torch.linalg.inv(kc + eps * m * torch.eye(m, dtype=kc.dtype))


def ref_nhsic_cca(a: torch.Tensor, b: torch.Tensor, sigma: float, eps: float) -> torch.Tensor:
    ra = ref_r(ref_center(ref_gram(a, sigma)), eps)
    rb = ref_r(ref_center(ref_gram(b, sigma)), eps)
    return torch.trace(ra @ rb)


def ref_nhsic_cka(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    ka = ref_center(ref_gram(a, sigma))
    kb = ref_center(ref_gram(b, sigma))
    return (ka * kb).sum() / (torch.linalg.norm(ka) * torch.linalg.norm(kb))


def ref_loss(z, x, y, num_classes, sigma, beta, normalization, eps=1e-5):
    yh = torch.nn.functional.one_hot(y, num_classes).to(F64)
    if normalization == "cca":
        zx, zy = ref_nhsic_cca(z, x, sigma, eps), ref_nhsic_cca(z, yh, sigma, eps)
    else:
        zx, zy = ref_nhsic_cka(z, x, sigma), ref_nhsic_cka(z, yh, sigma)
    return zx - beta * zy, zx, zy


# ---------------------------------------------------------------- helpers


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(m=8, dx=6, dz=5, classes=3, seed=0):
    g = gen(seed)
    x = torch.randn(m, dx, dtype=F64, generator=g)
    z = torch.randn(m, dz, dtype=F64, generator=g)
    y = torch.randint(0, classes, (m,), generator=g)
    return x, y, z


def objective(classes: int, dz: int, dx: int, **cfg) -> NHSIC:
    info = BlockInfo("blk", (dx,), (dz,), (dx,), classes)
    return NHSIC(NHSICConfig(**cfg), info)


def rel_close(a, b, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- building blocks


@pytest.mark.parametrize("sigma", [0.7, 5.0])
def test_gaussian_gram_matches_explicit_loop(sigma):
    a = torch.randn(6, 3, dtype=F64, generator=gen(1))
    got = gaussian_gram(a, sigma)
    rel_close(got, ref_gram_loop(a, sigma), rtol=1e-10, atol=1e-12)
    assert torch.allclose(torch.diagonal(got), torch.ones(6, dtype=F64))


def test_gaussian_gram_flattens_images_and_scales_by_width():
    # An image batch (m, 1, 2, 2) is d = 4 features; the width enters the exponent.
    a = torch.randn(5, 1, 2, 2, dtype=F64, generator=gen(2))
    got = gaussian_gram(a, 1.5)
    flat = a.reshape(5, 4)
    rel_close(got, ref_gram_loop(flat, 1.5), rtol=1e-10, atol=1e-12)
    sq = ((flat[0] - flat[1]) ** 2).sum()
    rel_close(got[0, 1], torch.exp(-sq / (2 * 1.5**2 * 4)), rtol=1e-12, atol=0)


def test_center_equals_hkh():
    k = torch.randn(7, 7, dtype=F64, generator=gen(3))  # not even symmetric: H K H still holds
    got = center(k)
    rel_close(got, ref_center(k), rtol=1e-10, atol=1e-12)
    # Rows and columns of a centred matrix sum to zero.
    assert torch.allclose(got.sum(0), torch.zeros(7, dtype=F64), atol=1e-12)
    assert torch.allclose(got.sum(1), torch.zeros(7, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_cca_operator_matches_explicit_inverse(eps):
    a = torch.randn(9, 4, dtype=F64, generator=gen(4))
    kc = ref_center(ref_gram(a, 2.0))
    got = cca_operator(center(gaussian_gram(a, 2.0)), eps)
    rel_close(got, ref_r(kc, eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_cca_statistic_forward_is_trace_of_products(eps):
    x, y, z = batch(m=9)
    yh = torch.nn.functional.one_hot(y, 3).to(F64)
    sigma = 1.3
    rx = ref_r(ref_center(ref_gram(x, sigma)), eps)
    ry = ref_r(ref_center(ref_gram(yh, sigma)), eps)
    kz = center(gaussian_gram(z, sigma))
    stats = CCAStatistic.apply(kz, rx, ry, eps)
    assert stats.shape == (2,)
    rz = ref_r(ref_center(ref_gram(z, sigma)), eps)
    rel_close(stats[0], torch.trace(rz @ rx), rtol=1e-7, atol=1e-8)
    rel_close(stats[1], torch.trace(rz @ ry), rtol=1e-7, atol=1e-8)


# ---------------------------------------------------------------- closed-form gradient


def test_cca_statistic_gradient_matches_autograd_of_textbook_form():
    x, y, z = batch(m=8)
    yh = torch.nn.functional.one_hot(y, 3).to(F64)
    sigma, eps = 1.0, 1e-5
    rx = ref_r(ref_center(ref_gram(x, sigma)), eps)
    ry = ref_r(ref_center(ref_gram(yh, sigma)), eps)
    weights = torch.tensor([0.7, -2.5], dtype=F64)

    kc = ref_center(ref_gram(z, sigma)).detach().requires_grad_(True)
    (grad_closed,) = torch.autograd.grad((CCAStatistic.apply(kc, rx, ry, eps) * weights).sum(), kc)

    kc_ref = kc.detach().clone().requires_grad_(True)
    rz = ref_r(kc_ref, eps)
    target = weights[0] * torch.trace(rz @ rx) + weights[1] * torch.trace(rz @ ry)
    (grad_ref,) = torch.autograd.grad(target, kc_ref)
    # Autograd through the explicit form treats Kc as a general matrix; for symmetric rx, ry its
    # gradient is symmetric, as is the closed form.
    rel_close(grad_closed, grad_ref, rtol=1e-6, atol=1e-9)
    assert grad_closed.abs().max() > 1e-6  # a zero gradient would pass trivially otherwise


def test_cca_statistic_gradcheck_through_features():
    # gradcheck perturbs Z, so the centred Gram stays PSD (a raw perturbation of Kc would not).
    x, y, z = batch(m=6, dx=3, dz=2)
    yh = torch.nn.functional.one_hot(y, 3).to(F64)
    sigma, eps = 1.0, 1e-2
    rx = cca_operator(center(gaussian_gram(x, sigma)), eps)
    ry = cca_operator(center(gaussian_gram(yh, sigma)), eps)

    def fn(features):
        return CCAStatistic.apply(centered_gaussian_gram(features, sigma), rx, ry, eps)

    assert torch.autograd.gradcheck(fn, (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- fused kernels


def test_centered_gram_gradient_matches_autograd_of_textbook_form():
    # An incoming gradient that is not symmetric, and image-shaped features: the fused backward
    # must not rely on either being convenient.
    z = torch.randn(7, 1, 2, 3, dtype=F64, generator=gen(11))
    upstream = torch.randn(7, 7, dtype=F64, generator=gen(12))
    features = z.clone().requires_grad_(True)
    (fused,) = torch.autograd.grad((centered_gaussian_gram(features, 0.9) * upstream).sum(), features)
    reference_in = z.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad((ref_center(ref_gram(reference_in, 0.9)) * upstream).sum(), reference_in)
    assert fused.shape == z.shape
    rel_close(fused, reference, rtol=1e-9, atol=1e-12)
    assert reference.abs().max() > 1e-3


def test_centered_gram_gradcheck():
    z = torch.randn(6, 3, dtype=F64, generator=gen(13)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: centered_gaussian_gram(f, 1.1), (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gaussian_gram_refuses_to_be_differentiated():
    # It builds the kernel in place; silently wrong gradients would be worse than this error.
    with pytest.raises(RuntimeError, match="centered_gaussian_gram"):
        gaussian_gram(torch.randn(4, 2, requires_grad=True), 1.0)


def test_label_factors_reproduce_the_centred_label_gram():
    # Exact, whatever sigma: the rff estimator uses them as the labels' "features".
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 0, 1, 3, 3, 2, 0]), 5).to(F64)
    for sigma in (0.5, 5.0):
        factors = label_factors(onehot, sigma)
        assert factors.shape == (7, 5)
        rel_close(factors @ factors.T, ref_center(ref_gram(onehot, sigma)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("labels", [[0, 1, 2, 1, 0, 2, 2, 1], [0, 0, 2, 2, 0, 2, 0, 2]], ids=["all", "absent-class"])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_label_operator_equals_the_explicit_cca_operator(labels, eps):
    # One-hot labels: the C x C push-through form must equal the m x m inverse, also when a class
    # is missing from the batch (a zero column of U).
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), 3).to(F64)
    for sigma in (0.8, 10.0):
        expected = ref_r(ref_center(ref_gram(onehot, sigma)), eps)
        rel_close(label_cca_operator(onehot, sigma, eps), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_objective_gradient_wrt_z_matches_textbook_autograd(normalization):
    x, y, z = batch(m=8, dx=6, dz=5)
    sigma, beta = 1.2, 3.0
    obj = objective(3, 5, 6, sigma=sigma, beta=beta, normalization=normalization)
    z1 = z.clone().requires_grad_(True)
    loss, _ = obj.loss(z1, LossContext(x=x, y=y, num_classes=3))
    (got,) = torch.autograd.grad(loss, z1)

    z2 = z.clone().requires_grad_(True)
    ref, _, _ = ref_loss(z2, x, y, 3, sigma, beta, normalization)
    (want,) = torch.autograd.grad(ref, z2)
    rel_close(got, want, rtol=1e-5, atol=1e-8)
    assert want.abs().max() > 1e-6


# ---------------------------------------------------------------- the objective's value


@pytest.mark.parametrize("normalization", ["cca", "cka"])
@pytest.mark.parametrize("beta", [0.0, 3.0, 100.0])
def test_objective_loss_matches_textbook(normalization, beta):
    x, y, z = batch(m=10, dx=6, dz=4, classes=4)
    sigma = 2.0
    obj = objective(4, 4, 6, sigma=sigma, beta=beta, normalization=normalization)
    loss, metrics = obj.loss(z, LossContext(x=x, y=y, num_classes=4))
    want, zx, zy = ref_loss(z, x, y, 4, sigma, beta, normalization)
    assert set(metrics) == {"loss", "hsic_zx", "hsic_zy"}
    rel_close(metrics["hsic_zx"], zx, rtol=1e-6, atol=1e-8)
    rel_close(metrics["hsic_zy"], zy, rtol=1e-6, atol=1e-8)
    rel_close(loss, want, rtol=1e-6, atol=1e-7)
    rel_close(metrics["loss"], loss, rtol=0, atol=0)
    assert loss.dim() == 0 and loss.dtype == F64
    for value in metrics.values():
        assert not value.requires_grad


def test_objective_flattens_image_shaped_z_and_x():
    g = gen(5)
    x = torch.randn(7, 1, 2, 3, dtype=F64, generator=g)
    z = torch.randn(7, 2, 2, 2, dtype=F64, generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    obj = objective(3, 8, 6, sigma=1.0, beta=2.0, normalization="cca")
    loss, _ = obj.loss(z, LossContext(x=x, y=y, num_classes=3))
    want, _, _ = ref_loss(z.reshape(7, -1), x.reshape(7, -1), y, 3, 1.0, 2.0, "cca")
    rel_close(loss, want, rtol=1e-6, atol=1e-7)


def test_cka_values_lie_in_unit_interval():
    x, y, z = batch(m=12)
    _, metrics = objective(3, 5, 6, sigma=1.0, normalization="cka").loss(z, LossContext(x=x, y=y, num_classes=3))
    for key in ("hsic_zx", "hsic_zy"):
        assert 0.0 <= float(metrics[key]) <= 1.0
    # CKA of a representation with itself is 1.
    _, same = objective(3, 6, 6, sigma=1.0, normalization="cka").loss(x, LossContext(x=x, y=y, num_classes=3))
    assert math.isclose(float(same["hsic_zx"]), 1.0, rel_tol=1e-9)


def test_cka_near_zero_when_independent_and_high_when_dependent():
    g = gen(6)
    m = 200
    x = torch.randn(m, 16, dtype=F64, generator=g)
    y = torch.randint(0, 10, (m,), generator=g)
    independent = torch.randn(m, 8, dtype=F64, generator=g)
    dependent = torch.tanh(x @ torch.randn(16, 8, dtype=F64, generator=g))
    obj = objective(10, 8, 16, sigma=5.0, beta=1.0, normalization="cka")
    _, ind = obj.loss(independent, LossContext(x=x, y=y, num_classes=10))
    _, dep = obj.loss(dependent, LossContext(x=x, y=y, num_classes=10))
    assert float(ind["hsic_zx"]) < 0.1
    assert float(ind["hsic_zy"]) < 0.1
    assert float(dep["hsic_zx"]) > 0.3
    assert float(dep["hsic_zx"]) > 4 * float(ind["hsic_zx"])


def test_cca_label_term_saturates_for_label_functions_only():
    # tr(Rz Ry) <= rank(Ry) <= C - 1; Z = f(Y) reaches it, an independent Z falls well short.
    g = gen(7)
    m, classes = 100, 4
    x = torch.randn(m, 4, dtype=F64, generator=g)
    y = torch.randint(0, classes, (m,), generator=g)
    of_labels = torch.nn.functional.one_hot(y, classes).to(F64) @ torch.randn(classes, 8, dtype=F64, generator=g)
    independent = torch.randn(m, 8, dtype=F64, generator=g)
    of_input = torch.tanh(x @ torch.randn(4, 8, dtype=F64, generator=g))
    obj = objective(classes, 8, 4, sigma=5.0, beta=1.0, normalization="cca")
    _, lab = obj.loss(of_labels, LossContext(x=x, y=y, num_classes=classes))
    _, ind = obj.loss(independent, LossContext(x=x, y=y, num_classes=classes))
    _, inp = obj.loss(of_input, LossContext(x=x, y=y, num_classes=classes))
    assert float(lab["hsic_zy"]) > 0.95 * (classes - 1)
    assert float(lab["hsic_zy"]) <= classes - 1 + 1e-6
    assert float(ind["hsic_zy"]) < 0.5 * (classes - 1)
    assert float(inp["hsic_zx"]) > 1.5 * float(ind["hsic_zx"])


@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_invariant_to_permuting_the_batch(normalization):
    x, y, z = batch(m=10, classes=3, seed=8)
    perm = torch.randperm(10, generator=gen(9))
    assert not torch.equal(perm, torch.arange(10))
    obj = objective(3, 5, 6, sigma=1.5, beta=4.0, normalization=normalization)
    loss, metrics = obj.loss(z, LossContext(x=x, y=y, num_classes=3))
    loss_p, metrics_p = obj.loss(z[perm], LossContext(x=x[perm], y=y[perm], num_classes=3))
    rel_close(loss_p, loss, rtol=1e-6, atol=1e-8)
    for key in metrics:
        rel_close(metrics_p[key], metrics[key], rtol=1e-6, atol=1e-8)
    # Permuting Z alone breaks the pairing and changes the value: the check above can fail.
    loss_z, _ = obj.loss(z[perm], LossContext(x=x, y=y, num_classes=3))
    assert abs(float(loss_z) - float(loss)) > 1e-6


# ---------------------------------------------------------------- per-batch kernel cache


@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_kernel_cache_shares_input_and_label_terms_across_blocks(normalization):
    x, y, z = batch(m=8, dz=5)
    z2 = torch.randn(8, 3, dtype=F64, generator=gen(10))
    first = objective(3, 5, 6, sigma=2.0, beta=5.0, normalization=normalization)
    second = objective(3, 3, 6, sigma=2.0, beta=5.0, normalization=normalization)
    ctx = LossContext(x=x, y=y, num_classes=3)
    first.loss(z, ctx)
    size = len(ctx.kernels)
    assert size >= 2  # at least the X and Y terms
    shared, _ = second.loss(z2, ctx)
    assert len(ctx.kernels) == size
    # The shared terms give the same value as a fresh computation.
    fresh, _ = second.loss(z2, LossContext(x=x, y=y, num_classes=3))
    rel_close(shared, fresh, rtol=1e-12, atol=1e-12)
    # A block with another sigma needs its own X/Y terms: the cache grows.
    objective(3, 3, 6, sigma=3.0, beta=5.0, normalization=normalization).loss(z2, ctx)
    assert len(ctx.kernels) > size


def test_kernel_cache_is_used_for_the_x_term():
    # A poisoned cache entry shows the objective really reads X/Y terms from ctx.kernels.
    x, y, z = batch(m=8)
    obj = objective(3, 5, 6, sigma=2.0, beta=5.0, normalization="cka")
    ctx = LossContext(x=x, y=y, num_classes=3)
    _, before = obj.loss(z, ctx)
    for key in list(ctx.kernels._store):
        if isinstance(key, tuple) and key[-1] == "x":
            ctx.kernels._store[key] = torch.zeros_like(ctx.kernels._store[key])
    _, after = obj.loss(z, ctx)
    assert float(before["hsic_zx"]) != 0.0
    assert float(after["hsic_zx"]) == 0.0
    rel_close(after["hsic_zy"], before["hsic_zy"], rtol=0, atol=0)


# ---------------------------------------------------------------- config validation


def build_config(data):
    problems = Problems()
    cfg = build(NHSICConfig, data, "obj", problems)
    return cfg, problems.items


def test_config_defaults_and_valid_values():
    cfg, problems = build_config({"sigma": 2, "beta": 50, "normalization": "cka"})
    assert problems == []
    assert cfg == NHSICConfig(sigma=2.0, beta=50.0, normalization="cka")
    assert isinstance(cfg.sigma, float)
    default, problems = build_config({})
    assert problems == [] and default == NHSICConfig()


@pytest.mark.parametrize("sigma", [0, -1.5])
def test_config_rejects_non_positive_sigma(sigma):
    _, problems = build_config({"sigma": sigma})
    assert len(problems) == 1
    assert problems[0].startswith("obj.sigma:") and "> 0" in problems[0] and str(float(sigma)) in problems[0]


def test_config_rejects_negative_beta_but_allows_zero():
    _, problems = build_config({"beta": -1})
    assert len(problems) == 1 and problems[0].startswith("obj.beta:") and ">= 0" in problems[0]
    cfg, problems = build_config({"beta": 0})
    assert problems == [] and cfg.beta == 0.0


def test_config_unknown_key_gets_did_you_mean():
    cfg, problems = build_config({"sigam": 5})
    assert cfg is None
    assert len(problems) == 1
    assert problems[0].startswith("obj.sigam:")
    assert "did you mean 'sigma'" in problems[0]


def test_config_rejects_unknown_normalization():
    cfg, problems = build_config({"normalization": "ckaa"})
    assert cfg is None
    assert len(problems) == 1
    text = problems[0]
    assert text.startswith("obj.normalization:")
    assert "'cca'" in text and "'cka'" in text and "ckaa" in text
    assert "did you mean 'cka'" in text


def test_config_reports_every_problem_at_once():
    _, problems = build_config({"sigma": -1, "beta": -2, "eps": 0})
    assert sorted(p.split(":")[0] for p in problems) == ["obj.beta", "obj.eps", "obj.sigma"]


def test_config_with_range_problems_builds_nothing():
    cfg, problems = build_config({"sigma": -1})
    assert problems
    assert cfg is None


def test_config_rejects_wrong_types():
    cfg, problems = build_config({"sigma": "five", "beta": True})
    assert cfg is None
    assert any(p.startswith("obj.sigma:") and "number" in p for p in problems)
    assert any(p.startswith("obj.beta:") and "number" in p for p in problems)


# --------------------------------------------------------------------------- random Fourier features


@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_rff_estimator_approaches_the_exact_value_as_features_grow(normalization):
    torch.manual_seed(0)
    m = 128
    x = torch.randn(m, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (m,))
    z = torch.tanh(x.flatten(1) @ torch.randn(64, 32, dtype=torch.float64))
    info = BlockInfo("b", (64,), (32,), (1, 8, 8), 10)

    def terms(**options):
        objective = NHSIC(NHSICConfig(sigma=1.0, normalization=normalization, **options), info).double()
        _, metrics = objective.loss(z, LossContext(x=x, y=y, num_classes=10))
        return torch.stack([metrics["hsic_zx"], metrics["hsic_zy"]])

    exact = terms()
    errors = [((terms(estimator="rff", features=d) - exact).abs() / exact.abs()).max().item() for d in (16, 128, 1024)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1, errors


def test_rff_estimator_has_gradients_and_shares_input_features_across_blocks():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    y = torch.randint(0, 10, (64,))
    ctx = LossContext(x=x, y=y, num_classes=10)
    info = BlockInfo("b", (16,), (8,), (16,), 10)
    config = NHSICConfig(estimator="rff", features=64)
    first, second = NHSIC(config, info), NHSIC(config, info)
    z = torch.randn(64, 8, requires_grad=True)
    loss, _ = first.loss(z, ctx)
    cached = len(ctx.kernels)
    second.loss(torch.randn(64, 8), ctx)
    assert len(ctx.kernels) == cached, "the second block reuses the X features and the label factors"
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(first.freqs_x, second.freqs_x)
    assert "freqs_x" not in first.state_dict(), "frequencies are regenerated from the seed, not saved"


def test_rff_features_must_be_positive():
    _, problems = build_config({"estimator": "rff", "features": 0})
    assert any("features" in p for p in problems)


@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_loss_is_computed_in_float32_under_bf16_autocast(normalization):
    # train.precision: bf16 runs the blocks under autocast; the kernels must not follow, since
    # |a|^2 + |b|^2 - 2ab cancels catastrophically in bf16 matmuls.
    g = gen(21)
    x, z = torch.randn(16, 30, generator=g), torch.randn(16, 20, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    obj = objective(4, 20, 30, normalization=normalization)

    def loss():
        return obj.loss(z, LossContext(x=x, y=y, num_classes=4))[0]

    plain = loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss()
    assert autocast.dtype == torch.float32
    assert torch.equal(plain, autocast)


def test_cka_statistic_gradcheck_through_features():
    x, y, z = batch(m=6, dx=3, dz=2)
    yh = torch.nn.functional.one_hot(y, 3).to(F64)
    u_x, u_y = unit_centered_gram(x, 1.0), unit_centered_gram(yh, 1.0)

    def fn(features):
        return CKAStatistic.apply(centered_gaussian_gram(features, 1.0), u_x, u_y)

    assert torch.autograd.gradcheck(fn, (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)
    stats = fn(z)
    rel_close(stats[0], ref_nhsic_cka(z, x, 1.0), rtol=1e-10, atol=1e-12)
    rel_close(stats[1], ref_nhsic_cka(z, yh, 1.0), rtol=1e-10, atol=1e-12)


def test_a_failed_factorisation_gives_nan_not_an_exception():
    # Poisoned on the device (no host sync); the NaN then reaches the loss and the trainer's watch.
    from layerwise.objectives.kernels import spd_factor

    assert torch.isnan(spd_factor(-torch.eye(3))).all()
    assert torch.isfinite(spd_factor(2 * torch.eye(3))).all()
    x, y, z = batch(m=8)
    z[0, 0] = math.nan
    loss, metrics = objective(3, z.shape[1], x.shape[1]).loss(z, LossContext(x=x, y=y, num_classes=3))
    assert torch.isnan(loss) and torch.isnan(metrics["hsic_zx"])


@pytest.mark.parametrize("kernel", ["gaussian", "cosine", "linear"])
@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_float32_gradient_is_close_to_float64_at_batch_256(normalization, kernel):
    # The papers' eps = 1e-5 makes the cca gradient ill-conditioned; the float32 path must still
    # follow float64 closely at a real batch size (measured: 3.1e-4 for cca, docs/performance.md).
    g = gen(31)
    x = torch.rand(256, 784, generator=g, dtype=F64)
    z = torch.relu(x @ (torch.randn(784, 64, generator=g, dtype=F64) * 0.05))
    y = torch.randint(0, 10, (256,), generator=g)
    obj = objective(10, 64, 784, sigma=5.0, normalization=normalization, kernel=kernel)
    grads = []
    for dtype in (F64, torch.float32):
        features = z.to(dtype).clone().requires_grad_(True)
        obj.loss(features, LossContext(x=x.to(dtype), y=y, num_classes=10))[0].backward()
        grads.append(features.grad.to(F64))
    error = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    assert error < 1e-3, error
