"""The ``layerwise`` command line: train, eval, validate, recipes and plugins.

A :class:`~layerwise.errors.LayerwiseError` (a user's mistake) prints as one red line and
exits with code 2; only bugs show a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from layerwise import __version__
from layerwise.errors import LayerwiseError
from layerwise.progress import stderr, stdout

app = typer.Typer(
    help="Layer-wise (local) learning on PyTorch: train networks whose blocks learn by HSIC or by backprop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
recipes_app = typer.Typer(help="List and copy the shipped recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML file, or the name of a shipped recipe.", show_default=False)]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Overrides as KEY=VALUE, e.g. train.epochs=3 data.batch_size=128 "
                        "model.subnetworks.sn1.blocks.hsic1.objective.beta=200.", show_default=False),
]
DataRootOpt = Annotated[
    Optional[Path],
    typer.Option("--data-root", help="Dataset folder (default: $LAYERWISE_DATA, else ~/.cache/layerwise/data; "
                                     "read-only mirrors such as ../shared/data are searched too).", show_default=False),
]
RunsOpt = Annotated[Path, typer.Option("--runs-dir", help="Where run folders go; 'latest' points at the newest.")]


def version_callback(value: bool) -> None:
    if value:
        stdout.print(f"layerwise {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Layer-wise (local) learning on PyTorch."""


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    runs_dir: RunsOpt = Path("runs"),
    data_root: DataRootOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Train the network a recipe declares, writing a run folder with checkpoints and metrics."""
    from layerwise.recipe import load_recipe
    from layerwise.shipped import resolve_recipe_path
    from layerwise.train_run import train_recipe

    parsed = load_recipe(resolve_recipe_path(recipe), overrides or [])
    train_recipe(parsed, runs_dir, data_root, show_progress=not no_progress)


@app.command("eval")
def eval_command(
    run: Annotated[Optional[Path], typer.Argument(help="Run folder or .safetensors checkpoint (default: runs/latest).",
                                                   show_default=False)] = None,
    noise: Annotated[str, typer.Option("--noise", help="Gaussian noise std(s) in [0, 1] pixel space, "
                                                      "comma-separated for a sweep, e.g. 0,0.05,0.5,0.8.")] = "0",
    noise_seed: Annotated[int, typer.Option("--noise-seed", help="Seed of the per-sample noise.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Evaluation batch size.")] = 1000,
    runs_dir: RunsOpt = Path("runs"),
    data_root: DataRootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Test accuracy of a trained model, clean and under Gaussian input noise."""
    from layerwise.noise_eval import evaluate_noise, parse_noise_levels, write_report
    from layerwise.runs import resolve_run
    from layerwise.trainer import resolve_device

    levels = parse_noise_levels(noise)
    if batch_size < 1:
        raise LayerwiseError(f"--batch-size: expected a value > 0, found {batch_size}")
    target = resolve_run(run, runs_dir)
    report = evaluate_noise(target, levels, data_root, resolve_device(device), noise_seed, batch_size,
                            show_progress=not as_json)
    run_folder = target if target.is_dir() else target.parent
    path = write_report(report, run_folder / "eval")
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    table = Table(title=f"{report['recipe']} ({report['dataset']}, epoch {report['epoch']}, "
                        f"trained with noise {report['train_noise']:g})")
    table.add_column("test noise std", justify="right")
    table.add_column("test accuracy", justify="right")
    for row in report["results"]:
        table.add_row(f"{row['noise']:g}", f"{row['acc']:.2%}")
    stdout.print(table)
    stdout.print(f"Report: {path}")


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe (keys, types, names, graph and shapes) without training."""
    from layerwise.graph import Graph
    from layerwise.plugins import registries
    from layerwise.recipe import load_recipe
    from layerwise.shipped import resolve_recipe_path

    path = resolve_recipe_path(recipe)
    parsed = load_recipe(path, overrides or [])
    spec = registries().datasets.get(parsed.data.dataset)
    graph = Graph(parsed, spec.shape, spec.num_classes)
    params = sum(p.numel() for p in graph.parameters())
    local = [b.config.name for b in graph.local_blocks()]
    stdout.print(f"[green]ok[/]: {path}: {len(graph.order)} blocks, {params:,} parameters, "
                 f"local blocks: {', '.join(local) or 'none'}")


@recipes_app.command("ls")
def recipes_ls() -> None:
    """List the shipped recipes."""
    from layerwise.shipped import describe, shipped_recipes

    table = Table(header_style="bold")
    table.add_column("name")
    table.add_column("what it is")
    for name, path in shipped_recipes().items():
        table.add_row(name, describe(path))
    stdout.print(table)


@recipes_app.command("cp")
def recipes_cp(
    name: Annotated[str, typer.Argument(help="A shipped recipe's name (see 'layerwise recipes ls').", show_default=False)],
    dest: Annotated[Path, typer.Argument(help="Destination file or folder.", show_default=False)],
) -> None:
    """Copy a shipped recipe out to edit it."""
    from layerwise.shipped import copy_recipe

    target = copy_recipe(name, dest)
    stdout.print(f"Copied to {target}; train it with: layerwise train {target}")


@app.command()
def plugins() -> None:
    """List plugins with their versions and what they register, and any that failed to load."""
    from layerwise.plugins import FAILED, plugin_version, registries

    regs = registries()
    provided: dict[str, list[str]] = {}
    for kind, registry in (("objective", regs.objectives), ("layer", regs.layers), ("dataset", regs.datasets)):
        for name in registry.names():
            provided.setdefault(registry.owner(name), []).append(f"{kind} {name}")
    table = Table(header_style="bold")
    for column in ("plugin", "distribution", "version", "provides"):
        table.add_column(column)
    for plugin, items in provided.items():
        dist, version = plugin_version(plugin)
        table.add_row(plugin, dist, version, ", ".join(items))
    for plugin, error in FAILED.items():
        table.add_row(plugin, "?", "?", f"[red]failed to load: {error}")
    stdout.print(table)


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders to draw together.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNG files.")] = Path("plots"),
) -> None:
    """Draw test accuracy per epoch, and accuracy against noise from each run's eval/ (needs layerwise[plot])."""
    from layerwise.plot import plot_runs

    for path in plot_runs(runs, out):
        stdout.print(f"Wrote {path}")


def main() -> None:
    """Entry point: run the app, turning user errors into one red line and exit code 2."""
    try:
        app()
    except LayerwiseError as exc:
        stderr.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted[/]")
        sys.exit(130)
