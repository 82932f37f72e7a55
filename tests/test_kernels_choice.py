"""nHSIC's kernel choice (``kernel: gaussian | cosine | linear``) and grouped neurons (``groups``)
against a textbook implementation.

As in tests/test_nhsic.py, the references build everything the slow, obvious way in float64: the
kernel entry by entry (or by an (m, m, d) broadcast where autograd must go through it), an explicit
centering matrix ``H = I - 11^T/m``, ``R = Kc (Kc + eps m I)^-1`` by an explicit inverse, and CKA
from its definition. The shipped pHSIC recipes are checked, then grouped neurons at the end.
"""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.errors import LayerwiseError, RecipeError
from layerwise.factory import load_recipe, network_from_recipe, parse_recipe
from layerwise.objectives.base import BlockInfo, LossContext
from layerwise.objectives.kernels import (
    COSINE_EPS,
    KERNELS,
    CCAStatistic,
    CenteredDotGram,
    CKAStatistic,
    cca_operator,
    centered_gaussian_gram,
    centered_gram,
    dot_features,
    label_cca_operator,
    label_factors,
    unit_centered_gram,
)
from layerwise.objectives.nhsic import NHSIC, NHSICConfig, grouped_activity
from layerwise.schema import Problems, build
from layerwise.shipped import shipped_recipes
from tests.helpers import tiny_recipe

F64 = torch.float64
DOT_KERNELS = ("cosine", "linear")


# ---------------------------------------------------------------- textbook reference


def ref_entry(a: torch.Tensor, b: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    """One kernel value from its definition, ``d`` the feature width."""
    d = a.numel()
    if kernel == "gaussian":
        return torch.exp(-((a - b) ** 2).sum() / (2.0 * sigma**2 * d))
    if kernel == "cosine":
        return (a * b).sum() / (a.norm() * b.norm())
    return (a * b).sum() / d


def ref_gram_loop(a: torch.Tensor, kernel: str, sigma: float = 1.0) -> torch.Tensor:
    """The Gram matrix one entry at a time."""
    a = a.reshape(a.shape[0], -1)
    m = a.shape[0]
    return torch.stack([torch.stack([ref_entry(a[i], a[j], kernel, sigma) for j in range(m)]) for i in range(m)])


def ref_gram(a: torch.Tensor, kernel: str, sigma: float = 1.0) -> torch.Tensor:
    """The same Gram by broadcasting: differentiable, fine for small m."""
    a = a.reshape(a.shape[0], -1)
    d = a.shape[1]
    if kernel == "gaussian":
        return torch.exp(-((a[:, None, :] - a[None, :, :]) ** 2).sum(-1) / (2.0 * sigma**2 * d))
    dots = (a[:, None, :] * a[None, :, :]).sum(-1)
    if kernel == "cosine":
        norms = (a**2).sum(-1).sqrt()
        return dots / (norms[:, None] * norms[None, :])
    return dots / d


def ref_center(k: torch.Tensor) -> torch.Tensor:
    m = k.shape[0]
    h = torch.eye(m, dtype=F64) - torch.ones(m, m, dtype=F64) / m
    return h @ k @ h


def ref_r(kc: torch.Tensor, eps: float) -> torch.Tensor:
    m = kc.shape[0]
    return kc @ torch.linalg.inv(kc + eps * m * torch.eye(m, dtype=kc.dtype))


def ref_nhsic(a, b, kernel, sigma, normalization, eps):
    ka, kb = ref_center(ref_gram(a, kernel, sigma)), ref_center(ref_gram(b, kernel, sigma))
    if normalization == "cca":
        return torch.trace(ref_r(ka, eps) @ ref_r(kb, eps))
    return (ka * kb).sum() / (torch.linalg.norm(ka) * torch.linalg.norm(kb))


def ref_loss(z, x, y, classes, kernel, sigma, beta, normalization, eps=1e-5):
    """``nHSIC(Z, X) - beta nHSIC(Z, Y)`` with the chosen kernel on Z, X and the one-hot labels."""
    onehot = torch.nn.functional.one_hot(y, classes).to(F64)
    zx = ref_nhsic(z, x, kernel, sigma, normalization, eps)
    zy = ref_nhsic(z, onehot, kernel, sigma, normalization, eps)
    return zx - beta * zy, zx, zy


# ---------------------------------------------------------------- helpers


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(m=10, dx=6, dz=5, classes=4, seed=0):
    g = gen(seed)
    return (torch.randn(m, dx, dtype=F64, generator=g), torch.randint(0, classes, (m,), generator=g),
            torch.randn(m, dz, dtype=F64, generator=g))


def objective(classes: int, dz: int, dx: int, **cfg) -> NHSIC:
    return NHSIC(NHSICConfig(**cfg), BlockInfo("blk", (dx,), (dz,), (dx,), classes))


def loss_of(obj: NHSIC, z, x, y, classes, ctx=None):
    return obj.loss(z, ctx if ctx is not None else LossContext(x=x, y=y, num_classes=classes))


def rel_close(a, b, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=rtol, atol=atol)


def build_config(data):
    problems = Problems()
    cfg = build(NHSICConfig, data, "obj", problems)
    return cfg, problems.items


# ---------------------------------------------------------------- the kernels themselves


@pytest.mark.parametrize("kernel", KERNELS)
def test_centered_gram_matches_the_explicit_loop_and_h_k_h(kernel):
    # Image-shaped features: the kernel sees them flattened, d = 6.
    a = torch.randn(7, 1, 2, 3, dtype=F64, generator=gen(1))
    got = centered_gram(a, 1.3, kernel)
    rel_close(got, ref_center(ref_gram_loop(a, kernel, 1.3)), rtol=1e-10, atol=1e-12)


def test_the_three_kernels_are_what_their_names_say():
    a = torch.randn(2, 5, dtype=F64, generator=gen(2))
    # For m = 2, H K H is (k11 + k22 - 2 k12) / 2 times this matrix.
    centred_pair = torch.tensor([[0.5, -0.5], [-0.5, 0.5]], dtype=F64)
    cos = (a[0] @ a[1]) / (a[0].norm() * a[1].norm())
    rel_close(centered_gram(a, 9.0, "cosine"), (2 - 2 * cos) / 2 * centred_pair, rtol=1e-12, atol=1e-14)
    lin = a @ a.T / 5
    rel_close(centered_gram(a, 9.0, "linear"), (lin[0, 0] + lin[1, 1] - 2 * lin[0, 1]) / 2 * centred_pair,
              rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_setting_fits_every_width(kernel):
    # Repeating every feature doubles d but changes no kernel value: the width is divided out
    # (sigma^2 d for the Gaussian, d for the linear kernel; the cosine needs no scale).
    a = torch.randn(6, 4, dtype=F64, generator=gen(3))
    doubled = torch.cat([a, a], dim=1)
    rel_close(centered_gram(doubled, 2.0, kernel), centered_gram(a, 2.0, kernel), rtol=1e-10, atol=1e-12)


def test_cosine_ignores_row_scales_and_sigma():
    a = torch.randn(6, 4, dtype=F64, generator=gen(4))
    scales = torch.tensor([0.01, 1.0, 3.0, 7.0, 0.5, 100.0], dtype=F64)[:, None]
    rel_close(centered_gram(a * scales, 1.0, "cosine"), centered_gram(a, 1.0, "cosine"), rtol=1e-10, atol=1e-12)
    for kernel in DOT_KERNELS:
        assert torch.equal(centered_gram(a, 0.1, kernel), centered_gram(a, 50.0, kernel))
        assert torch.equal(centered_gram(a, None, kernel), centered_gram(a, 5.0, kernel))


def test_a_zero_row_has_cosine_kernel_zero_and_finite_gradients():
    # Norms are clamped below at COSINE_EPS: a zero row (a sample whose ReLUs are all off) maps to
    # zero instead of NaN, so it has kernel 0 with every row, itself included.
    a = torch.randn(5, 3, dtype=F64, generator=gen(5))
    a[2] = 0.0
    features = dot_features(a, "cosine")
    assert torch.equal(features[2], torch.zeros(3, dtype=F64))
    gram = features @ features.T
    assert torch.equal(gram[2], torch.zeros(5, dtype=F64))
    rel_close(torch.diagonal(gram)[[0, 1, 3, 4]], torch.ones(4, dtype=F64), rtol=1e-12, atol=0)
    assert COSINE_EPS > 0
    x, y, _ = batch(m=5, dx=4, classes=3)
    for normalization in ("cca", "cka"):
        z = a.clone().requires_grad_(True)
        loss, _ = loss_of(objective(3, 3, 4, kernel="cosine", normalization=normalization), z, x, y, 3)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_dot_features_refuses_the_gaussian():
    with pytest.raises(ValueError, match="cosine' or 'linear"):
        dot_features(torch.ones(2, 2), "gaussian")


# ---------------------------------------------------------------- the fused backward


@pytest.mark.parametrize("kernel", DOT_KERNELS)
def test_centered_gram_gradient_matches_autograd_of_textbook_form(kernel):
    # A non-symmetric incoming gradient and image-shaped features, as for the Gaussian.
    z = torch.randn(7, 1, 2, 3, dtype=F64, generator=gen(11))
    upstream = torch.randn(7, 7, dtype=F64, generator=gen(12))
    features = z.clone().requires_grad_(True)
    gram = centered_gram(features, None, kernel)
    assert type(gram.grad_fn).__name__ == "CenteredDotGramBackward", "the fused path, not autograd's two matmuls"
    (fused,) = torch.autograd.grad((gram * upstream).sum(), features)
    reference_in = z.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad((ref_center(ref_gram(reference_in, kernel)) * upstream).sum(), reference_in)
    assert fused.shape == z.shape
    rel_close(fused, reference, rtol=1e-9, atol=1e-12)
    assert reference.abs().max() > 1e-3


@pytest.mark.parametrize("kernel", DOT_KERNELS)
def test_centered_gram_gradcheck(kernel):
    z = torch.randn(6, 3, dtype=F64, generator=gen(13)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: centered_gram(f, None, kernel), (z,), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(CenteredDotGram.apply, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kernel", DOT_KERNELS)
@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_statistics_gradcheck_through_features(kernel, normalization):
    # The whole chain, features -> kernel -> centred Gram -> cca or cka statistic, by finite
    # differences (eps 1e-2 keeps the cca solve well conditioned for them).
    x, y, z = batch(m=6, dx=3, dz=2, classes=3)
    onehot = torch.nn.functional.one_hot(y, 3).to(F64)
    eps = 1e-2
    if normalization == "cca":
        r_x = cca_operator(centered_gram(x, None, kernel), eps)
        r_y = label_cca_operator(onehot, None, eps, kernel)

        def fn(features):
            return CCAStatistic.apply(centered_gram(features, None, kernel), r_x, r_y, eps)
    else:
        u_x, u_y = unit_centered_gram(x, None, kernel), unit_centered_gram(onehot, None, kernel)

        def fn(features):
            return CKAStatistic.apply(centered_gram(features, None, kernel), u_x, u_y)

    assert torch.autograd.gradcheck(fn, (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- the label term


@pytest.mark.parametrize("kernel", KERNELS)
def test_label_factors_reproduce_the_centred_label_gram(kernel):
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 0, 1, 3, 3, 2, 0]), 5).to(F64)
    for sigma in (0.5, 5.0):
        factors = label_factors(onehot, sigma, kernel)
        assert factors.shape == (7, 5)
        rel_close(factors @ factors.T, ref_center(ref_gram_loop(onehot, kernel, sigma)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("labels", [[0, 1, 2, 1, 0, 2, 2, 1], [0, 0, 2, 2, 0, 2, 0, 2]], ids=["all", "absent-class"])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_label_operator_equals_the_explicit_cca_operator(kernel, labels, eps):
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), 3).to(F64)
    expected = ref_r(ref_center(ref_gram(onehot, kernel, 0.8)), eps)
    rel_close(label_cca_operator(onehot, 0.8, eps, kernel), expected, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- the objective


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("normalization", ["cca", "cka"])
@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_objective_loss_matches_textbook(kernel, normalization, beta):
    x, y, z = batch(m=10, dx=6, dz=4, classes=4)
    obj = objective(4, 4, 6, kernel=kernel, sigma=2.0, beta=beta, normalization=normalization)
    loss, metrics = loss_of(obj, z, x, y, 4)
    want, zx, zy = ref_loss(z, x, y, 4, kernel, 2.0, beta, normalization)
    rel_close(metrics["hsic_zx"], zx, rtol=1e-6, atol=1e-8)
    rel_close(metrics["hsic_zy"], zy, rtol=1e-6, atol=1e-8)
    rel_close(loss, want, rtol=1e-6, atol=1e-7)
    assert loss.dtype == F64 and not metrics["loss"].requires_grad


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_objective_gradient_wrt_z_matches_textbook_autograd(kernel, normalization):
    x, y, z = batch(m=8, dx=6, dz=5, classes=3)
    obj = objective(3, 5, 6, kernel=kernel, sigma=1.2, beta=3.0, normalization=normalization)
    z1 = z.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(loss_of(obj, z1, x, y, 3)[0], z1)
    z2 = z.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(ref_loss(z2, x, y, 3, kernel, 1.2, 3.0, normalization)[0], z2)
    rel_close(got, want, rtol=1e-5, atol=1e-8)
    assert want.abs().max() > 1e-6


@pytest.mark.parametrize("kernel", DOT_KERNELS)
def test_objective_flattens_image_shaped_z_and_x(kernel):
    g = gen(5)
    x = torch.randn(7, 1, 2, 3, dtype=F64, generator=g)
    z = torch.randn(7, 2, 2, 2, dtype=F64, generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    loss, _ = loss_of(objective(3, 8, 6, kernel=kernel, beta=2.0), z, x, y, 3)
    want, _, _ = ref_loss(z.reshape(7, -1), x.reshape(7, -1), y, 3, kernel, 5.0, 2.0, "cca")
    rel_close(loss, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", DOT_KERNELS)
def test_cosine_and_linear_ignore_sigma(kernel):
    x, y, z = batch()
    for normalization in ("cca", "cka"):
        first, _ = loss_of(objective(4, 5, 6, kernel=kernel, sigma=0.3, normalization=normalization), z, x, y, 4)
        second, _ = loss_of(objective(4, 5, 6, kernel=kernel, sigma=40.0, normalization=normalization), z, x, y, 4)
        assert torch.equal(first, second)


@pytest.mark.parametrize("kernel", DOT_KERNELS)
def test_cka_of_a_representation_with_itself_is_one(kernel):
    x, y, _ = batch(m=12)
    _, same = loss_of(objective(4, 6, 6, kernel=kernel, normalization="cka"), x, x, y, 4)
    assert math.isclose(float(same["hsic_zx"]), 1.0, rel_tol=1e-9)


@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_default_gaussian_is_bit_identical_to_the_gaussian_code_path(normalization):
    # The kernel option must not move the default by one bit: the objective's value and gradient
    # equal, exactly, those of the Gaussian primitives composed as the objective composed them
    # before `kernel` existed (float32, a training dtype).
    g = gen(41)
    x, z = torch.rand(32, 1, 7, 7, generator=g), torch.randn(32, 24, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    sigma, eps = 5.0, 1e-5
    default = objective(10, 24, 49, normalization=normalization)
    explicit = objective(10, 24, 49, kernel="gaussian", normalization=normalization)
    assert default.config.kernel == "gaussian"

    def ours(obj):
        features = z.clone().requires_grad_(True)
        loss, metrics = loss_of(obj, features, x, y, 10)
        loss.backward()
        return loss.detach(), metrics["hsic_zx"], metrics["hsic_zy"], features.grad

    def before():
        features = z.clone().requires_grad_(True)
        flat_x, onehot = x.flatten(1), torch.nn.functional.one_hot(y, 10).float()
        if normalization == "cca":
            r_x = cca_operator(centered_gaussian_gram(flat_x, sigma), eps)
            r_y = label_cca_operator(onehot, sigma, eps)
            zx, zy = CCAStatistic.apply(centered_gaussian_gram(features, sigma), r_x, r_y, eps)
        else:
            u_x, u_y = unit_centered_gram(flat_x, sigma), unit_centered_gram(onehot, sigma)
            zx, zy = CKAStatistic.apply(centered_gaussian_gram(features, sigma), u_x, u_y)
        loss = zx - 100.0 * zy
        loss.backward()
        return loss.detach(), zx.detach(), zy.detach(), features.grad

    reference = before()
    for obj in (default, explicit):
        for got, want in zip(ours(obj), reference, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("kernel", DOT_KERNELS)
def test_loss_is_computed_in_float32_under_bf16_autocast(kernel):
    g = gen(21)
    x, z = torch.randn(16, 30, generator=g), torch.randn(16, 20, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    obj = objective(4, 20, 30, kernel=kernel)
    plain = loss_of(obj, z, x, y, 4)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_of(obj, z, x, y, 4)[0]
    assert autocast.dtype == torch.float32 and torch.equal(plain, autocast)


# ---------------------------------------------------------------- per-batch kernel cache


@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_blocks_with_different_kernels_never_share_input_or_label_terms(normalization):
    x, y, z = batch(m=8)
    ctx = LossContext(x=x, y=y, num_classes=4)
    sizes = []
    for kernel in KERNELS:
        shared, _ = loss_of(objective(4, 5, 6, kernel=kernel, sigma=2.0, normalization=normalization), z, x, y, 4, ctx)
        sizes.append(len(ctx.kernels))
        fresh, _ = loss_of(objective(4, 5, 6, kernel=kernel, sigma=2.0, normalization=normalization), z, x, y, 4)
        assert torch.equal(shared, fresh), f"{kernel} read another kernel's cached terms"
    assert sizes[0] < sizes[1] < sizes[2], "each kernel adds its own X and Y terms"
    keys = [key for key in ctx.kernels._store if isinstance(key, tuple) and key[-1] == "x"]
    assert sorted(key[1] for key in keys) == sorted(KERNELS)


@pytest.mark.parametrize("kernel", DOT_KERNELS)
def test_blocks_differing_only_in_an_ignored_sigma_share_their_terms(kernel):
    x, y, z = batch(m=8)
    ctx = LossContext(x=x, y=y, num_classes=4)
    loss_of(objective(4, 5, 6, kernel=kernel, sigma=2.0), z, x, y, 4, ctx)
    size = len(ctx.kernels)
    loss_of(objective(4, 5, 6, kernel=kernel, sigma=7.0), z, x, y, 4, ctx)
    assert len(ctx.kernels) == size


# ---------------------------------------------------------------- config validation


def test_kernel_defaults_to_gaussian_and_accepts_the_three_names():
    cfg, problems = build_config({})
    assert problems == [] and cfg.kernel == "gaussian"
    for kernel in KERNELS:
        cfg, problems = build_config({"kernel": kernel, "sigma": 3})
        assert problems == [] and cfg.kernel == kernel  # sigma is allowed, and ignored, with every kernel


def test_unknown_kernel_names_the_key_and_the_choices():
    cfg, problems = build_config({"kernel": "cosin"})
    assert cfg is None and len(problems) == 1
    text = problems[0]
    assert text.startswith("obj.kernel:")
    assert all(f"'{name}'" in text for name in KERNELS)
    assert "did you mean 'cosine'" in text


@pytest.mark.parametrize("kernel", DOT_KERNELS)
def test_rff_is_refused_with_a_dot_product_kernel(kernel):
    cfg, problems = build_config({"kernel": kernel, "estimator": "rff"})
    assert cfg is None and len(problems) == 1
    assert problems[0].startswith("obj.estimator:")
    assert "gaussian" in problems[0] and repr(kernel) in problems[0] and "estimator: exact" in problems[0]
    assert build_config({"kernel": "gaussian", "estimator": "rff"})[1] == []


def test_recipe_errors_give_the_full_key_path():
    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][0]["objective"].update(kernel="cosine", estimator="rff")
    with pytest.raises(RecipeError, match=r"model\.subnetworks\[0\]\.blocks\[0\]\.objective\.estimator: rff"):
        parse_recipe(data, "bad.yaml")
    data["model"]["subnetworks"][0]["blocks"][0]["objective"].update(kernel="liner", estimator="exact")
    with pytest.raises(RecipeError, match=r"objective\.kernel: expected one of .*did you mean 'linear'"):
        parse_recipe(data, "bad.yaml")


def test_nonfinite_hint_blames_sigma_for_the_gaussian_only():
    assert "sigma" in objective(3, 4, 5, sigma=0.5).nonfinite_hint()
    assert "sigma" not in objective(3, 4, 5, kernel="cosine", sigma=0.5).nonfinite_hint()


# ---------------------------------------------------------------- the pHSIC recipes


PHSIC = {"mnist": ("gaussian", "98.4", "98.6"), "fashion_mnist": ("gaussian", "88.8", "90.2"),
         "cifar10": ("cosine", "52.5", "60.0")}


@pytest.mark.parametrize("dataset", sorted(PHSIC))
def test_the_phsic_recipes_are_its_3x1024_network(dataset):
    kernel, best, backprop = PHSIC[dataset]
    kinds = ("hsic", "hybrid", "backprop")
    recipes = {kind: load_recipe(shipped_recipes()[f"phsic_{dataset}_{kind}"]) for kind in kinds}
    for kind, recipe in recipes.items():
        blocks = recipe.model.blocks()
        assert recipe.data.dataset == dataset and recipe.data.batch_size == 256
        assert [b.out for b in blocks] == [1024, 1024, 1024, 10], kind
        header = shipped_recipes()[f"phsic_{dataset}_{kind}"].read_text().split("\nname:")[0]
        assert "Pogodin and Latham" in header and f"backprop {backprop}" in header
        assert f"layerwise train recipes/phsic_{dataset}_{kind}.yaml" in header
        assert "docs/results.md" in header and "validation" in header
        if kind != "backprop":
            assert f"best pHSIC variant {best}" in header
    hsic, hybrid, bp = (recipes[k].model.blocks() for k in ("hsic", "hybrid", "backprop"))
    assert [b.objective_name for b in hsic] == ["nhsic", "nhsic", "nhsic", "none"] and hsic[-1].detach
    assert [b.objective_name for b in hybrid] == ["nhsic", "none", "nhsic", "none"] and not hybrid[-1].detach
    assert [b.objective_name for b in bp] == ["none"] * 4
    for block in hsic[:3] + [hybrid[0], hybrid[2]]:
        assert block.objective_config.kernel == kernel


# ---------------------------------------------------------------- grouped neurons (pHSIC's "grp")
#
# The reference groups each sample's neurons one group at a time with Python loops and takes each
# group's spread from its definition; the textbook nHSIC above is then applied to the result.


def ref_grouped(z: torch.Tensor, groups: int, power: float, delta: float) -> torch.Tensor:
    """Each sample's spread in each contiguous group of columns, one group at a time."""
    size = z.shape[1] // groups
    rows = []
    for sample in z:
        row = []
        for g in range(groups):
            members = sample[g * size:(g + 1) * size]
            squared = sum((value - members.mean()) ** 2 for value in members)
            row.append(((squared + delta) / size) ** power)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_grouped_activity_is_each_groups_spread():
    z = torch.randn(5, 12, dtype=F64, generator=torch.Generator().manual_seed(3))
    for groups, power, delta in ((3, 0.5, 1.0), (4, 0.8, 0.1), (6, 1.0, 0.0)):
        got = grouped_activity(z, groups, power, delta)
        assert got.shape == (5, groups)
        rel_close(got, ref_grouped(z, groups, power, delta), rtol=1e-12, atol=1e-12)


def test_groups_use_contiguous_neurons():
    """Moving a neuron within its group changes nothing; moving it to another group does."""
    z = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(4))
    within = z[:, [1, 0, 3, 2, 4, 5, 6, 7]]
    across = z[:, [4, 1, 2, 3, 0, 5, 6, 7]]
    rel_close(grouped_activity(within, 2, 0.5, 1.0), grouped_activity(z, 2, 0.5, 1.0))
    assert not torch.allclose(grouped_activity(across, 2, 0.5, 1.0), grouped_activity(z, 2, 0.5, 1.0))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("normalization", ["cca", "cka"])
def test_grouped_loss_and_gradient_match_the_textbook(kernel, normalization):
    x, y, z = batch(m=9, dx=6, dz=12, classes=3)
    options = dict(kernel=kernel, sigma=1.5, beta=3.0, normalization=normalization)
    obj = objective(3, 12, 6, groups=4, group_power=0.8, group_delta=0.5, **options)
    z1 = z.clone().requires_grad_(True)
    loss, metrics = loss_of(obj, z1, x, y, 3)
    (got,) = torch.autograd.grad(loss, z1)
    z2 = z.clone().requires_grad_(True)
    want, zx, zy = ref_loss(ref_grouped(z2, 4, 0.8, 0.5), x, y, 3, kernel, 1.5, 3.0, normalization)
    (want_grad,) = torch.autograd.grad(want, z2)
    rel_close(loss, want, rtol=1e-6, atol=1e-7)
    rel_close(metrics["hsic_zx"], zx, rtol=1e-6, atol=1e-8)
    rel_close(metrics["hsic_zy"], zy, rtol=1e-6, atol=1e-8)
    rel_close(got, want_grad, rtol=1e-5, atol=1e-8)
    assert want_grad.abs().max() > 1e-6


def test_grouped_loss_passes_gradcheck():
    x, y, z = batch(m=6, dx=5, dz=8, classes=3, seed=2)
    obj = objective(3, 8, 5, groups=2, sigma=1.0, beta=2.0)
    z = z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda zz: loss_of(obj, zz, x, y, 3)[0], (z,))


def test_groups_zero_is_the_ungrouped_objective_exactly():
    x, y, z = batch(m=8, dx=6, dz=8, classes=3, seed=1)
    plain, off = objective(3, 8, 6), objective(3, 8, 6, groups=0)
    assert torch.equal(loss_of(plain, z, x, y, 3)[0], loss_of(off, z, x, y, 3)[0])
    assert not torch.equal(loss_of(objective(3, 8, 6, groups=2), z, x, y, 3)[0], loss_of(plain, z, x, y, 3)[0])


def test_a_silent_group_has_a_finite_gradient():
    """All-zero groups (dead ReLUs) have spread 0; the default delta keeps the gradient finite."""
    x, y, z = batch(m=8, dx=6, dz=8, classes=3)
    z = z.clone()
    z[:, :4] = 0.0
    z.requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(objective(3, 8, 6, groups=2), z, x, y, 3)[0], z)
    assert torch.isfinite(grad).all()


def test_rff_sees_the_group_activities():
    obj = objective(3, 12, 6, groups=3, estimator="rff", features=16)
    assert obj.freqs_z.shape == (3, 16)
    x, y, z = batch(m=8, dx=6, dz=12, classes=3)
    assert torch.isfinite(loss_of(obj, z, x, y, 3)[0])


@pytest.mark.parametrize("options, key, fragment", [
    ({"groups": -1}, "groups", "found -1"),
    ({"group_power": 0}, "group_power", "must be > 0"),
    ({"group_delta": 0.0}, "group_delta", "infinite gradient"),
    ({"group_delta": -1.0, "group_power": 1.0}, "group_delta", "found -1"),
])
def test_bad_group_options_name_their_key(options, key, fragment):
    cfg, problems = build_config(options)
    assert cfg is None and len(problems) == 1
    assert problems[0].startswith(f"obj.{key}:") and fragment in problems[0]


def test_zero_delta_is_allowed_from_power_one():
    assert build_config({"groups": 2, "group_delta": 0.0, "group_power": 1.0})[1] == []


@pytest.mark.parametrize("groups", [5, 32])
def test_groups_that_do_not_split_the_block_name_the_block(groups):
    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][0]["objective"]["groups"] = groups  # hsic1 has 32 outputs
    expected = (rf"hsic1.*groups: {groups} must divide the block's 32 outputs into groups of at least 2 "
                r"neurons; try a divisor of 32 no larger than 16")
    with pytest.raises(LayerwiseError, match=expected):
        network_from_recipe(parse_recipe(data, "tiny.yaml"), (1, 28, 28), 10)


def test_a_grouped_recipe_builds_and_trains_its_block():
    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][0]["objective"]["groups"] = 8
    network = network_from_recipe(parse_recipe(data, "tiny.yaml"), (1, 28, 28), 10)
    objective_ = network.blocks["hsic1"].objective
    assert objective_.config.groups == 8
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    z = network.blocks["hsic1"].body(x)
    loss, _ = objective_.loss(z, LossContext(x=x, y=y, num_classes=10))
    loss.backward()
    weight = next(network.blocks["hsic1"].body.parameters())
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_unknown_group_key_is_refused():
    data = tiny_recipe()
    data["model"]["subnetworks"][0]["blocks"][0]["objective"]["grups"] = 8
    with pytest.raises(RecipeError, match=r"objective.*grups.*did you mean 'groups'"):
        parse_recipe(data, "tiny.yaml")
