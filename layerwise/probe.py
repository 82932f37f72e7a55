"""Linear probes: how much of the label each block's frozen features hold, and where each block
sits in the information plane.

For every block of a trained run, in evaluation order (the head included), :func:`probe_report`

1. computes the block's output on the first ``train_limit`` training samples and on the whole
   test split, with the network in eval mode and no gradient (``Network.run(x).outputs``),
   flattened to one feature vector per sample;
2. trains a linear classifier on the frozen training features and reports its test accuracy;
3. measures nHSIC(Z, X) and nHSIC(Z, Y) of the block's test features Z against the network's
   input X (as the network sees it) and the one-hot labels Y.

The classifier is multinomial logistic regression: an ``nn.Linear`` from the standardised
features to the classes, trained by Adam on the cross-entropy for a few epochs, from zero
weights, in a seeded order. Why this and not closed-form ridge least squares: it is the usual
linear probe (Alain and Bengio, 2016) and the head's own loss, so a block's probe accuracy
compares with the network's; its cost grows linearly with the feature width, where ridge needs
a ``d x d`` solve (``d`` = 8192 for the first block of ``cifar10_conv_hybrid``); and the problem is
convex, so zero weights and a fixed order make it deterministic without any random
initialisation. Standardising each feature with the training mean and std lets one learning rate
suit every block.

nHSIC is a *batch* statistic, not a property of the data set: with the ``cca`` normalisation,
``tr(Rz Rx)`` on a batch of ``m`` samples grows with ``m`` (its ridge is ``eps m``), and even
``cka`` is a biased estimate whose value depends on ``m``. The probe therefore computes it on
consecutive test batches of ``hsic_batch`` samples, by default the run's ``data.batch_size``, the
``m`` of the values training logged in metrics.jsonl, and averages over the batches (an
incomplete last batch is left out, since its ``m`` differs). It uses the objective's estimator,
the kernel functions of :mod:`layerwise.objectives.kernels` (Gaussian kernels of width
``sigma sqrt(d)``, centred, ``cca`` or ``cka``), always exact: at these batch sizes the exact
statistic is cheap, and it has no random-feature error. Settings, per block:

- an ``nhsic`` block: its own ``sigma``, ``normalization``, ``eps`` and ``groups``, so its values
  match the ``hsic_zx`` and ``hsic_zy`` it logged in training (on the training set);
- any other block (``none``, a plugin's objective): those of the run's first ``nhsic`` block,
  ungrouped (its groups would not fit another width), or, when the run has none, the ``nhsic``
  defaults (``sigma`` 5, ``cca``, ``eps`` 1e-5).

Each row says which (``hsic_kernel``, ``hsic_sigma``, ``hsic_normalization``, ``hsic_from``).

Inputs carry the run's ``data.train_noise``, seeded as in the run's own test evaluation, so the
probes see the data the network was evaluated on.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from layerwise.atomic import write_text_atomic
from layerwise.checkpoint import model_from_checkpoint
from layerwise.data import BatchStream, load_split
from layerwise.errors import LayerwiseError
from layerwise.factory import dataset_spec
from layerwise.graph import Network
from layerwise.objectives.base import KernelCache
from layerwise.objectives.nhsic import NHSICConfig, exact_terms, kernel_input
from layerwise.progress import progress_bar
from layerwise.trainer import evaluate

DEFAULT_TRAIN_LIMIT = 10_000
EXTRACT_BATCH = 1000  # samples per forward pass while features are computed; changes no result
REPORT_PREFIX = "probe"


@dataclass(frozen=True)
class HSICSettings:
    """How nHSIC is measured for one block (an ``nhsic`` config: kernel, sigma, normalisation,
    eps), and where the settings come from."""

    config: NHSICConfig
    source: str  # "own objective", "first nhsic block 'NAME'" or "nhsic defaults"

    @property
    def label(self) -> str:
        """'sigma 10, cca' (Gaussian) or 'cosine, cka': what the table's caption says."""
        cfg = self.config
        kernel = f"sigma {cfg.sigma:g}" if cfg.kernel == "gaussian" else cfg.kernel
        return f"{kernel}, {cfg.normalization}"


def hsic_settings(graph: Network) -> dict[str, HSICSettings]:
    """The nHSIC settings of every block (see the module's docstring)."""
    nhsic = [name for name in graph.order if isinstance(graph.blocks[name].spec.config, NHSICConfig)]
    if nhsic:
        first = graph.blocks[nhsic[0]].spec.config
        fallback = HSICSettings(replace(first, groups=0), f"first nhsic block '{nhsic[0]}'")
    else:
        fallback = HSICSettings(NHSICConfig(), "nhsic defaults")
    settings = {}
    for name in graph.order:
        config = graph.blocks[name].spec.config
        if isinstance(config, NHSICConfig):
            settings[name] = HSICSettings(config, "own objective")
        else:
            settings[name] = fallback
    return settings


@torch.no_grad()
def nhsic_terms(z: torch.Tensor, x: torch.Tensor, onehot: torch.Tensor, settings: HSICSettings,
                kernels: KernelCache | None = None) -> tuple[float, float]:
    """``(nHSIC(Z, X), nHSIC(Z, Y))`` on one batch, computed as the ``nhsic`` objective's exact
    estimator computes them (in at least float32). ``kernels`` memoises the input and label terms,
    which every block of the batch shares, as training does."""
    kernels = kernels if kernels is not None else KernelCache()
    dtype = torch.promote_types(z.dtype, torch.float32)
    z, x, onehot = kernel_input(z, settings.config, dtype), x.flatten(1).to(dtype), onehot.to(dtype)
    stats = torch.stack(exact_terms(z, x, onehot, settings.config, kernels))
    zx, zy = stats.tolist()
    return zx, zy


def batched_nhsic(z: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, num_classes: int, batch: int,
                  settings: HSICSettings, kernels: list[KernelCache] | None = None) -> tuple[float, float]:
    """nHSIC(Z, X) and nHSIC(Z, Y) averaged over consecutive batches of ``batch`` samples (an
    incomplete last batch left out, unless it is the only one); ``kernels``, one cache per batch,
    lets the blocks share each batch's input and label terms."""
    count = max(len(labels) // batch, 1)
    kernels = kernels if kernels is not None else [KernelCache() for _ in range(count)]
    onehot = nn.functional.one_hot(labels, num_classes)
    zx_sum = zy_sum = 0.0
    for b in range(count):
        part = slice(b * batch, (b + 1) * batch)
        zx, zy = nhsic_terms(z[part], x[part], onehot[part], settings, kernels[b])
        zx_sum, zy_sum = zx_sum + zx, zy_sum + zy
    return zx_sum / count, zy_sum / count


@torch.no_grad()
def block_features(graph: Network, name: str, stream: BatchStream, device: torch.device,
                   keep_inputs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block ``name``'s flattened outputs over ``stream``, on ``device`` (and the flattened network
    inputs too, when ``keep_inputs``)."""
    graph.eval()
    outputs, inputs = [], []
    for x, _, _ in stream:
        outputs.append(graph.run(x).outputs[name].flatten(1).float().to(device))
        if keep_inputs:
            inputs.append(x.flatten(1).to(device))
    return torch.cat(outputs), (torch.cat(inputs) if keep_inputs else None)


def fit_probe(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
              num_classes: int, *, epochs: int = 10, batch_size: int = 256, lr: float = 1e-2,
              seed: int = 0) -> dict[str, float]:
    """Train a linear classifier (softmax regression, Adam, zero initial weights, seeded order) on
    standardised ``train_z``; its accuracy on the training features, and accuracy and mean
    cross-entropy on ``test_z``."""
    mean = train_z.mean(dim=0)
    std = train_z.std(dim=0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant feature carries nothing: leave it 0
    train_z, test_z = (train_z - mean) / std, (test_z - mean) / std
    probe = nn.Linear(train_z.shape[1], num_classes).to(train_z.device)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(train_y), generator=generator).to(train_z.device)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(probe(train_z[idx]), train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        train_logits, test_logits = probe(train_z), probe(test_z)
        return {
            "train_acc": (train_logits.argmax(dim=1) == train_y).float().mean().item(),
            "test_acc": (test_logits.argmax(dim=1) == test_y).float().mean().item(),
            "test_loss": nn.functional.cross_entropy(test_logits, test_y).item(),
        }


def check_options(epochs: int, batch_size: int, lr: float, train_limit: int, hsic_batch: int | None) -> None:
    """One-line errors for option values no probe can use."""
    if epochs < 1:
        raise LayerwiseError(f"--epochs: expected a number of epochs >= 1, found {epochs}")
    if batch_size < 1:
        raise LayerwiseError(f"--batch-size: expected a value >= 1, found {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise LayerwiseError(f"--lr: expected a learning rate > 0, found {lr}")
    if train_limit < 0:
        raise LayerwiseError(f"--train-limit: expected a number of samples >= 1, or 0 for all, found {train_limit}")
    if hsic_batch is not None and hsic_batch < 2:
        raise LayerwiseError(f"--hsic-batch: expected at least 2 samples per batch (nHSIC compares samples "
                             f"with one another), found {hsic_batch}")


def probe_report(
    run: str | Path,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-2,
    train_limit: int = DEFAULT_TRAIN_LIMIT,
    hsic_batch: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    data_root: str | Path | None = None,
    show_progress: bool = False,
) -> dict:
    """Probe every block of the run (a run folder or its ``model.safetensors``): a JSON-ready report
    whose ``rows`` hold, per block in evaluation order, the probe's ``train_acc``, ``test_acc`` and
    ``test_loss``, ``hsic_zx`` and ``hsic_zy`` on the test set, and the nHSIC settings used.

    ``train_limit`` first training samples train the probes (0: all of them); ``epochs``,
    ``batch_size``, ``lr`` and ``seed`` set their Adam training; ``hsic_batch`` is the nHSIC batch
    (default: the run's ``data.batch_size``). See the module's docstring for the method.
    """
    check_options(epochs, batch_size, lr, train_limit, hsic_batch)
    device = torch.device(device)
    graph, ckpt = model_from_checkpoint(run, device)
    graph.eval()
    recipe = ckpt.recipe
    spec = dataset_spec(recipe)
    train_images, train_labels = load_split(spec, "train", data_root)
    if train_limit:
        train_images, train_labels = train_images[:train_limit], train_labels[:train_limit]
    test_images, test_labels = load_split(spec, "test", data_root)
    hsic_batch = min(hsic_batch or recipe.data.batch_size, len(test_labels))

    def stream(images: torch.Tensor, labels: torch.Tensor) -> BatchStream:
        # The run's test-time inputs: its training noise, seeded as its own evaluation seeds it.
        return BatchStream(spec, images, labels, batch_size=EXTRACT_BATCH, shuffle=False, seed=0,
                           noise=recipe.data.train_noise, noise_seed=0, noise_space=recipe.data.noise_space,
                           device=device)

    train_stream, test_stream = stream(train_images, train_labels), stream(test_images, test_labels)
    train_y, test_y = train_labels.to(device), test_labels.to(device)
    num_classes = graph.num_classes
    settings = hsic_settings(graph)
    model = evaluate(graph, test_stream)
    batches = max(len(test_labels) // hsic_batch, 1)
    kernels = [KernelCache() for _ in range(batches)]  # each test batch's input and label terms, for every block
    rows = []
    test_x = None
    with progress_bar(show_progress) as bars:
        task = bars.add_task("probing blocks", total=len(graph.order))
        for name in graph.order:
            train_z, _ = block_features(graph, name, train_stream, device)
            test_z, inputs = block_features(graph, name, test_stream, device, keep_inputs=test_x is None)
            test_x = inputs if test_x is None else test_x
            fit = fit_probe(train_z, train_y, test_z, test_y, num_classes, epochs=epochs, batch_size=batch_size,
                            lr=lr, seed=seed)
            zx, zy = batched_nhsic(test_z, test_x, test_y, num_classes, hsic_batch, settings[name], kernels)
            block = graph.blocks[name]
            rows.append({
                "block": name,
                "objective": block.spec.name,
                "features": train_z.shape[1],
                **fit,
                "hsic_zx": zx,
                "hsic_zy": zy,
                "hsic_kernel": settings[name].config.kernel,
                "hsic_sigma": settings[name].config.sigma,
                "hsic_normalization": settings[name].config.normalization,
                "hsic_from": settings[name].source,
            })
            del train_z, test_z
            bars.advance(task)
    return {
        "checkpoint": str(ckpt.path),
        "recipe": recipe.name,
        "dataset": recipe.data.dataset,
        "epoch": ckpt.epoch,
        "noise": recipe.data.train_noise,
        "device": str(device),
        "torch": torch.__version__,
        "model_test_acc": model["acc"],
        "train_samples": len(train_labels),
        "test_samples": len(test_labels),
        "probe": {"classifier": "linear (softmax regression on standardised features)", "optimizer": "adam",
                  "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
        "hsic": {"estimator": "exact", "batch_size": hsic_batch, "batches": batches,
                 "averaged_over": "test batches"},
        "rows": rows,
    }


def probe_run(run: str | Path, **options) -> list[dict]:
    """The rows of :func:`probe_report` (one per block, in evaluation order), same options."""
    return probe_report(run, **options)["rows"]


def write_report(report: dict, eval_dir: Path) -> Path:
    """Save the report as ``eval/probe-<time>.json`` and ``eval/probe-latest.json``; return the first."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    path = eval_dir / f"{REPORT_PREFIX}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(report, indent=2) + "\n"
    write_text_atomic(path, text)
    write_text_atomic(eval_dir / f"{REPORT_PREFIX}-latest.json", text)
    return path


def report_table(report: dict):
    """The report as a rich table (one row per block) with a caption on the nHSIC settings."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{report['recipe']} ({report['dataset']}, epoch {report['epoch']}): linear probes "
                               f"on {report['train_samples']} training samples; the model's test accuracy is "
                               f"{report['model_test_acc']:.2%}"), header_style="bold")
    for column in ("block", "objective", "features", "probe train acc", "probe test acc", "nHSIC (Z,X)", "nHSIC (Z,Y)"):
        table.add_column(column, justify="left" if column in ("block", "objective") else "right")
    for row in report["rows"]:
        table.add_row(escape(row["block"]), escape(row["objective"]), str(row["features"]), f"{row['train_acc']:.2%}",
                      f"{row['test_acc']:.2%}", f"{row['hsic_zx']:.4g}", f"{row['hsic_zy']:.4g}")
    hsic = report["hsic"]
    used = {}
    for row in report["rows"]:
        kernel = row.get("hsic_kernel", "gaussian")  # reports written before kernels were a choice
        measure = f"sigma {row['hsic_sigma']:g}" if kernel == "gaussian" else kernel
        key = (f"{measure}, {row['hsic_normalization']}", row["hsic_from"])
        used.setdefault(key, []).append(row["block"])
    settings = "; ".join(f"{', '.join(blocks)}: {measure} ({source})" for (measure, source), blocks in used.items())
    table.caption = escape(f"nHSIC on the test set, averaged over {hsic['batches']} batches of {hsic['batch_size']} "
                           f"(a batch statistic); {settings}")
    return table
