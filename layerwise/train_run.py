"""A whole training run: data, model, trainer, run folder, checkpoints and the epoch table."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from layerwise.checkpoint import WEIGHTS_FILE, save_checkpoint
from layerwise.data import BatchStream, load_split
from layerwise.errors import LayerwiseError
from layerwise.graph import Graph
from layerwise.plugins import registries
from layerwise.progress import epoch_table, progress_bar, stderr, stdout
from layerwise.recipe import Recipe
from layerwise.runs import MetricsLog, create_run_dir, write_run_files
from layerwise.trainer import Trainer, evaluate, resolve_device


def train_recipe(
    recipe: Recipe,
    runs_root: str | Path = "runs",
    data_root: str | Path | None = None,
    show_progress: bool = True,
    quiet: bool = False,
) -> Path:
    """Train ``recipe`` to the end, checkpointing every epoch; return the run folder.

    ``quiet`` drops the per-epoch lines and the final table (for scripts running many recipes).
    """
    device = resolve_device(recipe.train.device)
    spec = registries().datasets.get(recipe.data.dataset)
    train_images, train_labels = load_split(spec, "train", data_root)
    test_images, test_labels = load_split(spec, "test", data_root)
    if recipe.data.train_limit is not None:
        train_images = train_images[: recipe.data.train_limit]
        train_labels = train_labels[: recipe.data.train_limit]
    held_out = recipe.data.validation
    if held_out >= len(train_labels):
        raise LayerwiseError(f"data.validation: {held_out} samples leave none of the {len(train_labels)} to train on")
    if held_out:
        val_images, val_labels = train_images[-held_out:], train_labels[-held_out:]
        train_images, train_labels = train_images[:-held_out], train_labels[:-held_out]

    torch.manual_seed(recipe.seed)
    graph = Graph(recipe, spec.shape, spec.num_classes).to(device)
    trainer = Trainer(graph, recipe, spec.num_classes)
    train_stream = BatchStream(
        spec, train_images, train_labels, batch_size=recipe.data.batch_size, shuffle=True,
        seed=recipe.seed, noise=recipe.data.train_noise, noise_seed=recipe.seed, device=device,
    )
    # Test noise is the same as training noise: the paper's "noisy train and test" protocol.
    test_stream = BatchStream(
        spec, test_images, test_labels, batch_size=recipe.data.test_batch_size, shuffle=False,
        seed=0, noise=recipe.data.train_noise, noise_seed=0, device=device,
    )

    val_stream = None
    if held_out:
        val_stream = BatchStream(
            spec, val_images, val_labels, batch_size=recipe.data.test_batch_size, shuffle=False,
            seed=0, noise=recipe.data.train_noise, noise_seed=1, device=device,
        )

    run = create_run_dir(runs_root, recipe)
    write_run_files(run, recipe, device)
    log = MetricsLog(run / "metrics.jsonl")
    history: list[dict] = []
    show_progress = show_progress and not quiet
    say = (lambda *args: None) if quiet else stderr.print
    say(f"[bold]{recipe.name}[/]: {len(train_labels)} training samples on {device}; run folder {run}")
    with progress_bar(show_progress) as bars:
        epochs = bars.add_task("epochs", total=recipe.train.epochs)
        for epoch in range(1, recipe.train.epochs + 1):
            train_stream.set_epoch(epoch)
            batches = bars.add_task(f"epoch {epoch} train", total=len(train_stream))
            started = time.perf_counter()
            summary = trainer.train_epoch(train_stream, on_batch=lambda: bars.advance(batches))
            train_seconds = time.perf_counter() - started
            bars.remove_task(batches)
            testing = bars.add_task(f"epoch {epoch} test", total=len(test_stream))
            test = evaluate(graph, test_stream, on_batch=lambda: bars.advance(testing))
            bars.remove_task(testing)
            record = {"epoch": epoch, **summary, "test_acc": test["acc"], "test_loss": test["loss"],
                      "train_seconds": round(train_seconds, 3)}
            if val_stream is not None:
                record["val_acc"] = evaluate(graph, val_stream)["acc"]
            history.append(record)
            log.append(record)
            save_checkpoint(run / WEIGHTS_FILE, graph, recipe, epoch, record)
            bars.advance(epochs)
            val = f", val acc {record['val_acc']:.2%}" if val_stream is not None else ""
            say(f"epoch {epoch}: train acc {record['train_acc']:.2%}{val}, "
                         f"test acc {record['test_acc']:.2%}, {train_seconds:.1f}s")
    if not quiet:
        stdout.print(epoch_table(history))
        stdout.print(f"Run folder: {run}")
    return run
