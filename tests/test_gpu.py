"""The CUDA path: skipped without a GPU (``pytest -m gpu`` selects these alone).

- nHSIC (both normalisations, both estimators) gives on the GPU what it gives on the CPU;
- training steps stay on the device and never synchronise with the host (the non-finite watch
  reads the device once every ``GPU_CHECK_EVERY`` batches, and no step in between may sync);
- ``train.precision: bf16`` trains;
- ``layerwise train ... train.device=cuda`` runs end to end on MNIST.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from layerwise.factory import network_from_recipe, parse_recipe
from layerwise.graph import Network
from layerwise.nonfinite import GPU_CHECK_EVERY
from layerwise.objectives.base import BlockInfo, LossContext
from layerwise.objectives.nhsic import NHSIC, NHSICConfig
from layerwise.trainer import Trainer
from tests.helpers import tiny_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("options", [{"normalization": "cca"}, {"normalization": "cka"},
                                     {"estimator": "rff", "features": 64}], ids=["cca", "cka", "rff"])
def test_nhsic_on_the_gpu_matches_the_cpu(options):
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(32, 20, generator=g, dtype=torch.float64), torch.randn(32, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=g)
    results = []
    for device in (torch.device("cpu"), CUDA):
        objective = NHSIC(NHSICConfig(sigma=2.0, **options), BlockInfo("b", (20,), (12,), (20,), 5)).to(device)
        features = z.to(device).requires_grad_(True)
        loss, _ = objective.loss(features, LossContext(x=x.to(device), y=y.to(device), num_classes=5))
        loss.backward()
        assert loss.device.type == device.type
        results.append((loss.detach().cpu(), features.grad.cpu()))
    (cpu_loss, cpu_grad), (gpu_loss, gpu_grad) = results
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-6, atol=1e-9)


def gpu_trainer(precision: str = "fp32") -> tuple[Network, Trainer]:
    raw = tiny_recipe()
    raw["train"].update(device="cuda", precision=precision)
    recipe = parse_recipe(raw, "tiny")
    torch.manual_seed(0)
    graph = network_from_recipe(recipe, (1, 28, 28), 10).to(CUDA)
    return graph, Trainer.from_recipe(graph, recipe)


def test_training_steps_stay_on_the_device_without_host_syncs():
    graph, trainer = gpu_trainer()
    x, y = torch.rand(64, 1, 28, 28, device=CUDA), torch.randint(0, 10, (64,), device=CUDA)
    trainer.step(x, y)  # the first step (lazy initialisation) and a watch check out of the way
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(GPU_CHECK_EVERY - 2):
            result = trainer.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.device.type == "cuda" for p in graph.parameters())
    assert result.logits.device.type == "cuda" and result.global_loss.device.type == "cuda"
    assert torch.isfinite(result.global_loss)


def test_bf16_precision_trains_on_the_gpu():
    graph, trainer = gpu_trainer("bf16")
    x, y = torch.rand(64, 1, 28, 28, device=CUDA), torch.randint(0, 10, (64,), device=CUDA)
    before = [p.detach().clone() for p in graph.parameters()]
    result = trainer.step(x, y)
    assert result.logits.dtype == torch.bfloat16
    assert torch.isfinite(result.block_metrics["hsic1"]["loss"])
    assert all(not torch.equal(b, p) for b, p in zip(before, graph.parameters(), strict=True))


@pytest.mark.integration
def test_train_on_cuda_end_to_end(cli, tmp_path, mnist_available):
    recipe = tiny_recipe(train_limit=1024)
    recipe["train"]["device"] = "cuda"
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = cli("train", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress")
    assert result.code == 0, result.err
    assert "on cuda" in " ".join(result.err.split())
    evaluated = cli("eval", str(tmp_path / "runs" / "latest"), "--device", "cuda", "--json")
    assert evaluated.code == 0, evaluated.err
