"""The ``layerwise`` command line: train, eval, validate, recipes and plugins.

A :class:`~layerwise.errors.LayerwiseError` (a user's mistake) prints as one red line and
exits with code 2; only bugs show a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
import typer.main
from rich.markup import escape
from rich.table import Table

from layerwise import __version__
from layerwise.errors import LayerwiseError, TrainingInterrupted, printable
from layerwise.progress import stderr, stdout

app = typer.Typer(
    help="Layer-wise (local) learning on PyTorch: train networks whose blocks learn by HSIC or by backprop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
recipes_app = typer.Typer(help="List and copy the shipped recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML file, or the name of a shipped recipe.",
                                          show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides as KEY=VALUE, e.g. train.epochs=3 data.batch_size=128 "
                        "model.subnetworks.sn1.blocks.hsic1.objective.beta=200.", show_default=False),
]
DataRootOpt = Annotated[
    Path | None,
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
    recipe: Annotated[str | None, typer.Argument(
        help="Recipe YAML file, or the name of a shipped recipe. With --resume: the run folder "
             "(default: runs/latest).", show_default=False, metavar="RECIPE | RUN_DIR")] = None,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue a run folder from its last complete epoch (optimizers, random state and "
                         "data order included): 'layerwise train --resume [RUN_DIR] [--nproc N]'.")] = False,
    runs_dir: RunsOpt = Path("runs"),
    data_root: DataRootOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
    nproc: Annotated[int | None, typer.Option(
        "--nproc", help="Train data-parallel in N processes (runs torchrun --standalone --nproc_per_node N; "
                        "see docs/distributed.md).", show_default=False)] = None,
    stages: Annotated[int | None, typer.Option(
        "--stages", help="Spread the blocks over N processes, one stage of blocks each, pipelined; the weights "
                         "are those of one process (default: the recipe's train.stages, or its train.cuts; see "
                         "docs/distributed.md).",
        show_default=False)] = None,
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard", help="Write TensorBoard event files (per-epoch scalars, every block's local metrics, the "
                              "recipe's hyper-parameters) to RUN/tb/: the override train.tensorboard=true, so a "
                              "resume keeps logging (needs layerwise\\[tensorboard]).")] = False,
) -> None:
    """Train the network a recipe declares, writing a run folder with checkpoints and metrics.

    Ctrl-C stops at the next batch boundary and prints the command that resumes the run.
    """
    from layerwise.distributed import check_batch_divides, launch, launched_world_size
    from layerwise.factory import load_recipe
    from layerwise.runs import resolve_run
    from layerwise.shipped import resolve_recipe_path
    from layerwise.train_run import check_resumable, resume_run, run_folder_to_resume, train_recipe

    if resume and overrides:
        raise LayerwiseError(f"--resume takes no overrides (found {' '.join(overrides)}): a resumed run "
                             f"continues the recipe it started with; start a new run to change it")
    if resume and tensorboard:
        raise LayerwiseError("--resume takes no --tensorboard: a resumed run logs to TensorBoard when it was "
                             "started with --tensorboard (train.tensorboard: true in its recipe.yaml)")
    if tensorboard:
        overrides = [*(overrides or []), "train.tensorboard=true"]
    for option, value, what in (("--nproc", nproc, "processes"), ("--stages", stages, "stages")):
        if value is not None and value < 1:
            raise LayerwiseError(f"{option}: expected a number of {what} >= 1, found {value}")
        if value is not None and launched_world_size() > 1:
            raise LayerwiseError(f"{option} inside torchrun would start processes within each process; "
                                 "give it to the first command only")
    if launched_world_size() == 1:
        if resume:  # the run resolved once here, so that every worker continues the same one
            run = run_folder_to_resume(resolve_run(recipe, runs_dir))
            target, parsed = [str(run), "--resume"], load_recipe(run / "recipe.yaml")
        elif recipe is None:
            raise LayerwiseError("train: give a recipe file or shipped recipe name (see 'layerwise recipes ls'), "
                                 "or --resume [RUN_DIR] to continue a run")
        else:
            target = [recipe, *(overrides or [])]
            parsed = load_recipe(resolve_recipe_path(recipe), overrides or [])
        from layerwise.pipeline import recipe_stages

        stages = stages if stages is not None else recipe_stages(parsed)
        if (nproc or 1) * stages > 1:
            # Checked here, once, so a mistake is one line instead of one failure per worker.
            check_batch_divides(parsed.data.batch_size, nproc or 1)
            if stages > 1:
                from layerwise.pipeline import check_pipeline_recipe, check_stages

                check_pipeline_recipe(parsed, stages)
                check_stages(parsed, stages)
            if parsed.train.tensorboard:
                from layerwise.tensorboard_log import require_tensorboard

                require_tensorboard()
            if resume:
                check_resumable(run, parsed)
            options = ["--runs-dir", str(runs_dir)] + (["--data-root", str(data_root)] if data_root else [])
            code = launch((nproc or 1) * stages,
                          ["train", *target, *options, *(["--no-progress"] if no_progress else [])], stages)
            raise typer.Exit(code)
    if resume:
        resume_run(resolve_run(recipe, runs_dir), data_root, show_progress=not no_progress)
        return
    if recipe is None:
        raise LayerwiseError("train: give a recipe file or shipped recipe name (see 'layerwise recipes ls'), "
                             "or --resume [RUN_DIR] to continue a run")
    parsed = load_recipe(resolve_recipe_path(recipe), overrides or [])
    train_recipe(parsed, runs_dir, data_root, show_progress=not no_progress)


@app.command("eval")
def eval_command(
    run: Annotated[Path | None, typer.Argument(help="Run folder or .safetensors checkpoint (default: runs/latest).",
                                                   show_default=False)] = None,
    noise: Annotated[str, typer.Option("--noise", help="Gaussian noise std(s) in [0, 1], added in the space "
                                                      "--noise-space names; comma-separated for a sweep, e.g. "
                                                      "0,0.05,0.5,0.8.")] = "0",
    noise_seed: Annotated[int, typer.Option("--noise-seed", help="Seed of the per-sample noise.")] = 0,
    noise_space: Annotated[str, typer.Option(
        "--noise-space", help="pixel: noise in [0, 1] pixel space before normalisation, then clipped (the paper's "
                              "protocol); normalized: after normalisation, not clipped (the authors' notebook). "
                              "pixel by default whatever space the run trained in, so that reports of different "
                              "runs compare; normalized reports go to RUN/eval/noise-normalized-*.json, apart from "
                              "the pixel ones (compare and plot show each space apart).")] = "pixel",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Evaluation batch size.")] = 1000,
    runs_dir: RunsOpt = Path("runs"),
    data_root: DataRootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Test accuracy of a trained model, clean and under Gaussian input noise."""
    from layerwise.checkpoint import find_weights
    from layerwise.noise_eval import check_report_folder, evaluate_noise, parse_noise_levels, write_report
    from layerwise.runs import resolve_run
    from layerwise.trainer import resolve_device

    levels = parse_noise_levels(noise)
    if noise_space not in ("pixel", "normalized"):
        raise LayerwiseError(f"--noise-space: expected pixel or normalized, found {noise_space!r}")
    if batch_size < 1:
        raise LayerwiseError(f"--batch-size: expected a value > 0, found {batch_size}")
    where = resolve_device(device, "--device")
    target = find_weights(resolve_run(run, runs_dir))  # a recipe given by mistake is named as one first
    eval_dir = target.parent / "eval"
    check_report_folder(eval_dir)  # before any work: a read-only run folder fails now, not after the sweep
    report = evaluate_noise(target, levels, data_root, where, noise_seed, batch_size,
                            show_progress=not (as_json or no_progress), noise_space=noise_space)
    path = write_report(report, eval_dir)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    trained_space = f" ({report['train_noise_space']})" if report["train_noise"] else ""
    table = Table(title=f"{report['recipe']} ({report['dataset']}, epoch {report['epoch']}, "
                        f"trained with noise {report['train_noise']:g}{trained_space})")
    table.add_column(f"test noise std ({report['noise_space']})", justify="right")
    table.add_column("test accuracy", justify="right")
    for row in report["results"]:
        table.add_row(f"{row['noise']:g}", f"{row['acc']:.2%}")
    stdout.print(table)
    stdout.print(f"Report: {path}")


@app.command()
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    stages: Annotated[int | None, typer.Option(
        "--stages", help="Also cut the network into N pipeline stages: print each stage's blocks and estimated "
                         "share of the work, and which cuts a global gradient crosses.", show_default=False)] = None,
) -> None:
    """Check a recipe (keys, types, names, graph and shapes) without training."""
    from layerwise.factory import build_on_meta, load_recipe
    from layerwise.shipped import resolve_recipe_path

    path = resolve_recipe_path(recipe)
    parsed = load_recipe(path, overrides or [])
    graph = build_on_meta(parsed)  # no memory, whatever the widths
    params = sum(p.numel() for p in graph.parameters())
    local = [b.name for b in graph.local_blocks()]
    stdout.print(f"[green]ok[/]: {path}: {len(graph.order)} blocks, {params:,} parameters, "
                 f"local blocks: {', '.join(local) or 'none'}")
    if stages is not None:
        from layerwise.pipeline import check_stages

        for line in check_stages(parsed, stages):
            stdout.print(escape(line), highlight=False)


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
    name: Annotated[str, typer.Argument(help="A shipped recipe's name (see 'layerwise recipes ls').",
                                        show_default=False)],
    dest: Annotated[Path, typer.Argument(help="Destination file or folder.", show_default=False)],
) -> None:
    """Copy a shipped recipe out to edit it."""
    from layerwise.shipped import copy_recipe

    target = copy_recipe(name, dest)
    stdout.print(f"Copied to {target}; train it with: layerwise train {target}")


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON on stdout.")] = False,
) -> None:
    """List plugins with their versions and what they register, and any that failed to load or are disabled."""
    from layerwise.plugins import describe_plugins

    rows = describe_plugins(plugin_commands())
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(header_style="bold")
    for column in ("plugin", "distribution", "version", "provides"):
        table.add_column(column)
    for row in rows:
        provides = escape(provided_lines(row))
        if row["status"] == "failed":
            provides = f"{provides}\n[red]failed: {escape(row['error'])}[/]".lstrip()
        elif row["status"] == "disabled":
            provides = "[yellow]disabled by LAYERWISE_DISABLE_PLUGINS[/]"
        table.add_row(escape(row["name"]), escape(row["distribution"]), escape(row["version"]), provides)
    stdout.print(table)


def provided_lines(row: dict) -> str:
    """What a plugin provides, one line per kind: 'objective localce', 'layers linear, conv2d'."""
    lines = []
    for kind in ("objectives", "layers", "datasets", "streams", "commands"):
        names = row[kind]
        if names:
            lines.append(f"{kind if len(names) > 1 else kind[:-1]} {', '.join(names)}")
    return "\n".join(lines)


@app.command("new-plugin")
def new_plugin(
    name: Annotated[str, typer.Argument(help="Short name of the plugin and of its objective, e.g. 'hebbian'.",
                                        show_default=False)],
    dest: Annotated[Path, typer.Option("--dir", help="Folder in which to create layerwise-NAME/.")] = Path("."),
) -> None:
    """Create a ready-to-install plugin package with one objective, a test and a README."""
    from layerwise.scaffold import PluginNames, create_plugin

    root = create_plugin(name, dest)
    module = root / f"{PluginNames.from_name(name).module}.py"
    stdout.print(f"Created {root}. Next:\n  pip install -e {root}\n  pytest {root}\n"
                 f"then make the objective in {module} your own (docs/plugins.md is the guide).")


@app.command()
def compare(
    runs: Annotated[list[str] | None, typer.Argument(
        help="Run folders or glob patterns, e.g. runs/latest 'runs/mnist_*' (quoted patterns are expanded here). "
             "Default: every run under --runs-dir.", show_default=False, metavar="RUN_OR_GLOB")] = None,
    sort: Annotated[str | None, typer.Option(
        "--sort", help="Order rows by test_acc, best_test_acc, val_acc, best_val_acc, noise:LEVEL or "
                       "noise-normalized:LEVEL (best first), or by name, train_seconds, params, epochs.",
        show_default=False, metavar="KEY")] = None,
    no_group: Annotated[bool, typer.Option(
        "--no-group", help="One row per run, instead of one row (mean ± std) per recipe that differs only "
                           "in seed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout.")] = False,
    plot_file: Annotated[Path | None, typer.Option(
        "--plot", help=r"Also write a PNG of test (and validation) accuracy per epoch, one line per run "
                       r"(needs layerwise\[plot]).", show_default=False, metavar="FILE")] = None,
    runs_dir: RunsOpt = Path("runs"),
) -> None:
    """Compare runs in one table; seeds of one recipe form one row, mean ± std.

    Columns: the recipe, what trains each block, epochs, final and best test and validation accuracy,
    noise results from 'layerwise eval' (normalized-space ones in columns of their own), train time and
    parameters. Runs of one recipe that differ only in seed form one row, mean ± std."""
    from layerwise.compare import check_plot_target, compare_runs, plot_rows, print_table, rows_json, table

    def warn(message: str) -> None:
        stderr.print(f"[yellow]warning:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)

    if plot_file is not None:
        check_plot_target(plot_file)
    rows = compare_runs(runs or [str(runs_dir / "*")], warn, group=not no_group, sort=sort)
    written = plot_rows(rows, plot_file) if plot_file is not None else None
    if as_json:
        sys.stdout.write(json.dumps(rows_json(rows), indent=2) + "\n")
    else:
        print_table(stdout, table(rows))
    if written is not None:
        (stderr if as_json else stdout).print(f"Wrote {written}")


@app.command()
def tune(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help="A recipe key and its search space, KEY=SPACE (repeat for each key), e.g. "
                              "optim.local.lr=log:1e-4..1e-2.", show_default=False, metavar="KEY=SPACE")] = None,
    trials: Annotated[int | None, typer.Option(
        "--trials", help="The study's total of finished trials (complete, pruned, or failed on a NaN loss), "
                         "counted over every process sharing it (default: the grid's size, else 20).",
        show_default=False)] = None,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="Train each configuration once per seed, e.g. 0,1,2, and judge it on the mean "
                        "(default: once, with the recipe's seed).", show_default=False)] = None,
    metric: Annotated[str, typer.Option(
        "--metric", help="val_acc (the last epoch's validation accuracy) or best_val_acc (the best epoch's); "
                         "never a test accuracy.")] = "val_acc",
    storage: Annotated[str | None, typer.Option(
        "--storage", help="Optuna RDB storage URL, e.g. sqlite:///tune.db: the same command continues the search "
                          "after a kill, and processes started with it share the trials (on several machines "
                          "with a postgresql:// or mysql:// URL). Default: in memory.", show_default=False)] = None,
    study: Annotated[str | None, typer.Option(
        "--study", help="The study's name in the storage (default: the recipe's name).", show_default=False)] = None,
    sampler_seed: Annotated[int, typer.Option(
        "--sampler-seed", help="Seed of the sampler (TPE, or the grid's order).")] = 0,
    no_pruning: Annotated[bool, typer.Option(
        "--no-pruning", help="Train every trial to its last epoch (default: Optuna's median pruner stops "
                             "trials on the first seed's per-epoch validation accuracy).")] = False,
    runs_dir: Annotated[Path | None, typer.Option(
        "--runs-dir", help="Where the trials' run folders go (default: runs/tune-STUDY).", show_default=False)] = None,
    data_root: DataRootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the trials as JSON on stdout.")] = False,
) -> None:
    r"""Search hyper-parameters with Optuna, on validation accuracy (needs layerwise\[tune]).

    Every trial is a normal run folder.

    SPACE is log:1e-4..1e-2 (a float on a log scale), float:0.1..0.9 or 0.1..0.9 (a float),
    int:16..256 or int:16..256:log (an integer), choice:relu,tanh,gelu (values read as YAML scalars), or
    grid:1,5,10 (every combination of the grid keys, in Optuna's GridSampler; then every --param is a grid).
    Each KEY is checked against the recipe before anything trains. The recipe must hold out validation data
    (data.validation=N, the last N training samples); the test set is never used to choose.

    Trials are named RECIPE-tN; the table at the end marks the best one with *. Several processes given the
    same --storage and --study share one search: Optuna's storage is the only coordination, and a trial
    whose process died is queued again and continues its run folders.
    """
    from layerwise.tune import optuna_module, results_table, run_search, summary_lines

    optuna_module()  # a missing extra is said before anything else
    result = run_search(recipe, param or [], overrides or [], trials=trials, seeds=seeds, metric=metric,
                        storage=storage, study_name=study, sampler_seed=sampler_seed, pruning=not no_pruning,
                        runs_dir=runs_dir, data_root=data_root)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        return
    stdout.print(results_table(result))
    for line in summary_lines(result):
        stdout.print(escape(printable(line)), highlight=False)


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders to draw together.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNG files.")] = Path("plots"),
    probes: Annotated[bool, typer.Option(
        "--probes", help="Also draw probes.png (linear-probe test accuracy per block, from each run's "
                         "eval/probe-latest.json: run 'layerwise probe RUN' first) and infoplane-RUN.png "
                         "(nHSIC(Z,X) against nHSIC(Z,Y) per block over the epochs the run logged).")] = False,
) -> None:
    # Raw docstring with "\[": typer renders help as rich markup, where a bare "[plot]" is a style tag and vanishes.
    r"""Draw accuracy per epoch and against noise, and with --probes the probes (needs layerwise\[plot]).

    Test accuracy per epoch, accuracy against noise from each run's eval/ (noise.png; noise-normalized.png
    for 'eval --noise-space normalized' reports), and with --probes the probe accuracy per block and the
    information plane."""
    from layerwise.plot import plot_probes, plot_runs

    probe_figures = plot_probes(runs, out) if probes else []  # first: a run with no probe report fails early
    for path in plot_runs(runs, out) + probe_figures:
        stdout.print(f"Wrote {path}")


@app.command()
def probe(
    run: Annotated[Path | None, typer.Argument(help="Run folder or its model.safetensors (default: runs/latest).",
                                               show_default=False)] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of each linear classifier's training.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size of the classifiers' training.")] = 256,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of the classifiers.")] = 1e-2,
    train_limit: Annotated[int, typer.Option(
        "--train-limit", help="Train the classifiers on the first N training samples (0: all).")] = 10_000,
    hsic_batch: Annotated[int | None, typer.Option(
        "--hsic-batch", help="Test samples per nHSIC batch (default: the run's data.batch_size, as in its "
                             "training log).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the classifiers' batch order.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "auto",
    runs_dir: RunsOpt = Path("runs"),
    data_root: DataRootOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Linear probe of every block, with nHSIC(Z,X) and nHSIC(Z,Y) on the test set.

    For every block, a linear classifier trained on its frozen features and its test accuracy, and
    nHSIC(Z,X) and nHSIC(Z,Y) on the test set. The report goes to RUN/eval/probe-latest.json.
    """
    from layerwise.checkpoint import find_weights
    from layerwise.noise_eval import check_report_folder
    from layerwise.probe import check_options, probe_report, report_table, write_report
    from layerwise.runs import resolve_run
    from layerwise.trainer import resolve_device

    check_options(epochs, batch_size, lr, train_limit, hsic_batch)
    where = resolve_device(device, "--device")
    target = find_weights(resolve_run(run, runs_dir))
    eval_dir = target.parent / "eval"
    check_report_folder(eval_dir)  # before any work: a read-only run folder fails now
    report = probe_report(target, epochs=epochs, batch_size=batch_size, lr=lr, train_limit=train_limit,
                          hsic_batch=hsic_batch, seed=seed, device=where, data_root=data_root,
                          show_progress=not (as_json or no_progress))
    path = write_report(report, eval_dir)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    stdout.print(report_table(report))
    stdout.print(f"Report: {path}")


BUILTIN_COMMANDS = frozenset(
    [info.name or typer.main.get_command_name(info.callback.__name__) for info in app.registered_commands]
    + [info.name for info in app.registered_groups]
)
"""The names of the built-in commands, taken before any plugin adds its own."""


@functools.cache
def plugin_commands() -> dict[str, list[str]]:
    """Add every plugin's commands to the app, once per process; plugin name -> the commands it added."""
    from layerwise.plugin_commands import add_plugin_commands

    return add_plugin_commands(app)


def wants_plugin_commands(args: list[str]) -> bool:
    """False when ``args`` run a built-in command: those never import plugins they do not need."""
    words = [arg for arg in args if not arg.startswith("-")]
    return not words or words[0] not in BUILTIN_COMMANDS


def main() -> None:
    """Entry point: run the app, turning user errors into one red line and exit code 2."""
    try:
        if wants_plugin_commands(sys.argv[1:]):
            plugin_commands()  # loaded here, not at import: a plugin's import cost is paid only when needed
        app()
    except LayerwiseError as exc:
        stderr.print(f"[red]error:[/] {escape(printable(str(exc)))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except TrainingInterrupted as exc:  # Ctrl-C in training: what was saved and how to resume
        stderr.print(f"[yellow]interrupted:[/] {escape(printable(str(exc)))}", highlight=False, soft_wrap=True)
        sys.exit(130)
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted[/]")
        sys.exit(130)
