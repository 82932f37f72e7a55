"""``layerwise compare``: one table of run folders, seeds of one recipe grouped into mean ± std.

A run is read from its folder alone, without loading any weights: ``recipe.yaml`` (what it
trains, how many epochs it plans, its parameter count on the meta device), ``metrics.jsonl``
(accuracies per epoch, training time) and ``eval/noise-latest.json`` (the latest ``layerwise
eval`` report, if any; ``eval/noise-normalized-latest.json`` for noise added after normalisation,
shown in columns of its own). Runs whose recipes are equal but for ``seed`` and ``name`` form one row.
"""

from __future__ import annotations

import glob
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerwise.errors import LayerwiseError, RecipeError
from layerwise.runs import (
    METRICS_FILE,
    NOISE_SPACES,
    noise_report_path,
    noise_space_option,
    read_metrics,
    read_noise_report,
    report_prefix,
)

RECIPE_FILE = "recipe.yaml"
GLOB_CHARS = "*?["
# Layers without parameters: skipped in "what trains each block" when the recipe cannot be built.
PARAMETERLESS_LAYERS = {"maxpool", "avgpool", "flatten", "dropout"}
# Buffers of batch-norm, not parameters (counting from model.safetensors when the recipe cannot be built).
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
# Sort keys (as in --json) -> descending? Accuracies sort best first; time, size and names smallest first.
SORT_KEYS = {"name": False, "test_acc": True, "best_test_acc": True, "val_acc": True, "best_val_acc": True,
             "train_seconds": False, "params": False, "epochs": True}
ACCURACY_KEYS = ("test_acc", "best_test_acc", "val_acc", "best_val_acc")
DIFFERS_SHOWN = 3

Warn = Callable[[str], None]


@dataclass
class RunSummary:
    """What ``compare`` knows of one run folder."""

    path: Path
    recipe_name: str
    seed: int | None
    config: dict  # the recipe without seed and name, objectives with their defaults: equal configs group
    trains: dict[str, str]  # block with parameters -> its objective ('frozen' when frozen)
    params: int | None
    planned_epochs: int | None
    history: list[dict]
    noise: dict[str, dict[float, float]] = field(default_factory=dict)  # space -> noise std -> accuracy
    noise_epoch: dict[str, int | None] = field(default_factory=dict)  # space -> the epoch its report evaluates

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def epochs(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    @property
    def complete(self) -> bool:
        """Every planned epoch is in metrics.jsonl (False while training, or after a stop)."""
        if not self.history:
            return False
        return self.planned_epochs is None or self.epochs >= self.planned_epochs

    def values(self) -> dict[str, float | None]:
        """Its numbers by sort/JSON key: final and best accuracies, total training time, size."""
        tests = [r["test_acc"] for r in self.history if r.get("test_acc") is not None]
        vals = [r["val_acc"] for r in self.history if r.get("val_acc") is not None]
        last = self.history[-1] if self.history else {}
        seconds = [r["train_seconds"] for r in self.history if r.get("train_seconds") is not None]
        return {"test_acc": last.get("test_acc"), "best_test_acc": max(tests, default=None),
                "val_acc": last.get("val_acc"), "best_val_acc": max(vals, default=None),
                "train_seconds": sum(seconds) if seconds else None,
                "params": self.params, "epochs": self.epochs}


@dataclass
class Row:
    """One line of the table: a run, or the complete runs of one recipe with different seeds."""

    runs: list[RunSummary]
    differs: dict[str, Any] = field(default_factory=dict)  # recipe values that not every row shares

    @property
    def first(self) -> RunSummary:
        return self.runs[0]

    @property
    def grouped(self) -> bool:
        return len(self.runs) > 1

    @property
    def label(self) -> str:
        names = list(dict.fromkeys(run.recipe_name for run in self.runs))
        return ", ".join(names)

    def stats(self, key: str) -> Stat | None:
        """Mean, std and count of one value over the row's runs (None when no run has it); a noise
        result's key is :func:`noise_key`'s."""
        noise = parse_noise_key(key)
        if noise is not None:
            space, level = noise
            values = [acc for run in self.runs if (acc := run.noise.get(space, {}).get(level)) is not None]
        else:
            values = [v for run in self.runs if (v := run.values()[key]) is not None]
        return Stat.of(values)

    def noise_levels(self, space: str = "pixel") -> list[float]:
        return sorted({level for run in self.runs for level in run.noise.get(space, {})})


def noise_key(space: str, level: float) -> str:
    """The sort and stats key of the accuracy at noise ``level`` in ``space``: ``noise:0.5`` in
    pixel space, ``noise-normalized:0.5`` in normalized space (the report files' prefixes)."""
    return f"{report_prefix(space)}:{level!r}"


def parse_noise_key(key: str) -> tuple[str, float] | None:
    """``(space, level)`` of a :func:`noise_key` (None for any other key); a level that is not a
    number is an error."""
    prefix, colon, text = key.partition(":")
    spaces = {report_prefix(space): space for space in NOISE_SPACES}
    if not colon or prefix not in spaces:
        return None
    try:
        return spaces[prefix], float(text)
    except ValueError:
        raise LayerwiseError(f"--sort {key}: expected {prefix}:LEVEL with a number, e.g. {prefix}:0.5") from None


@dataclass
class Stat:
    """A value over the runs of a row: the sample standard deviation needs two runs or more."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


# --------------------------------------------------------------------------- finding run folders


def expand(patterns: list[str], warn: Warn) -> list[Path]:
    """Run folders named or matched by ``patterns``, each once (``runs/latest`` and the folder it
    points at are one run), in the order given, matches of a pattern sorted by name; folders that
    are not runs are skipped with a warning; no run at all is an error."""
    found: dict[Path, Path] = {}
    unmatched = []
    for pattern in patterns:
        if any(c in pattern for c in GLOB_CHARS):
            # Links last: 'runs/*' lists 'latest' too, and the run it points at keeps its place by name.
            matches = sorted((Path(p) for p in glob.glob(pattern, recursive=True)), key=lambda p: (p.is_symlink(), p))
            if not matches:
                unmatched.append(pattern)
        else:
            matches = [Path(pattern)]
            if not matches[0].exists():
                raise LayerwiseError(f"{pattern}: no such run folder")
        for path in matches:
            if not (path / RECIPE_FILE).is_file():
                runs_inside = path.is_dir() and any(path.glob(f"*/{RECIPE_FILE}"))
                hint = f"; did you mean '{path / '*'}'?" if runs_inside else ""
                warn(f"{path}: not a run folder (no {RECIPE_FILE}); skipped{hint}")
                continue
            found.setdefault(path.resolve(), path)
    if not found:
        raise LayerwiseError(f"no run folder in {' '.join(patterns)}; pass run folders or patterns such as "
                             f"'runs/*' (a run folder holds {RECIPE_FILE} and {METRICS_FILE})")
    for pattern in unmatched:
        warn(f"{pattern}: matches nothing")
    return list(found)


# --------------------------------------------------------------------------- reading one run


def canonical(value: Any) -> Any:
    """Plain recipe data in a form where equal settings compare equal (5 and 5.0 alike)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def objective_label(name: str) -> str:
    return "none" if name == "backprop" else name


def read_run(path: Path, warn: Warn) -> RunSummary:
    """Summarise one run folder; a damaged file is an error naming it."""
    from layerwise.recipe import read_yaml

    recipe_path = path / RECIPE_FILE
    data = read_yaml(recipe_path)
    if not isinstance(data, dict):
        raise LayerwiseError(f"{recipe_path}: not a recipe (expected a mapping, found {type(data).__name__})")
    try:
        config, trains, params, planned = from_recipe(recipe_path)
    except RecipeError as exc:  # e.g. a plugin's objective, and the plugin is no longer installed
        warn(f"{recipe_path}: not valid here ({exc.problems[0] if exc.problems else exc}); "
             f"shown as written, parameters counted from model.safetensors")
        config, trains, planned = from_raw(data)
        params = None
    if params is None:
        params = params_from_weights(path)
    history = read_metrics(path / METRICS_FILE)  # every line checked: a crafted one is named
    seed = data.get("seed")
    run = RunSummary(path, str(data.get("name", path.name)), seed if isinstance(seed, int) else None,
                     config, trains, params, planned, history)
    for space in NOISE_SPACES:
        read_noise(run, space)
        epoch = run.noise_epoch.get(space)
        if epoch is not None and epoch != run.epochs:
            warn(f"{noise_report_path(path, space)}: evaluates epoch {epoch}, and the run has {run.epochs}; "
                 f"run 'layerwise eval {path}{noise_space_option(space)}' again to update it")
    return run


def from_recipe(recipe_path: Path) -> tuple[dict, dict[str, str], int | None, int]:
    """Config, trained blocks, parameter count and planned epochs of a recipe that validates."""
    from layerwise.factory import build_on_meta, load_recipe
    from layerwise.schema import to_plain

    recipe = load_recipe(recipe_path)
    config = recipe.to_dict()
    blocks = {cfg.name: cfg for cfg in recipe.model.blocks()}
    for sub in config["model"]["subnetworks"]:
        for block in sub["blocks"]:  # objectives with every default, so that omitted and explicit defaults agree
            cfg = blocks[block["name"]]
            options = to_plain(cfg.objective_config)
            options = options if isinstance(options, dict) else cfg.objective_options
            block["objective"] = {"name": objective_label(cfg.objective_name), **options}
    try:
        graph = build_on_meta(recipe)
    except LayerwiseError:
        graph = None
    if graph is None:
        trains = {name: "frozen" if cfg.freeze else objective_label(cfg.objective_name)
                  for name, cfg in blocks.items() if cfg.layer not in PARAMETERLESS_LAYERS}
        params = None
    else:
        trains = {name: "frozen" if block.freeze else objective_label(block.spec.name)
                  for name, block in blocks_in_order(graph, blocks) if any(True for _ in block.parameters())}
        params = sum(p.numel() for p in graph.parameters())
    return strip(config), trains, params, recipe.train.epochs


def blocks_in_order(graph, configs: dict) -> list:
    """The graph's blocks in the recipe's order."""
    return [(name, graph.blocks[name]) for name in configs if name in graph.blocks]


def from_raw(data: dict) -> tuple[dict, dict[str, str], int | None]:
    """Config, trained blocks and planned epochs of a recipe read as written (it does not validate here)."""
    trains = {}
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    subnetworks = model.get("subnetworks")
    for sub in subnetworks if isinstance(subnetworks, list) else []:
        blocks = sub.get("blocks") if isinstance(sub, dict) else None
        for block in blocks if isinstance(blocks, list) else []:
            if isinstance(block, dict) and block.get("layer") not in PARAMETERLESS_LAYERS:
                objective = block.get("objective", "none")
                name = str(objective.get("name", "?")) if isinstance(objective, dict) else str(objective)
                trains[str(block.get("name"))] = "frozen" if block.get("freeze") else objective_label(name)
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    epochs = train.get("epochs", 10)
    return strip(data), trains, epochs if isinstance(epochs, int) else None


OUTPUT_ONLY = ("tensorboard",)
"""``train`` keys that change what a run writes, not what it trains: runs differing only there group."""


def strip(config: dict) -> dict:
    """The recipe without what may differ between runs of one experiment: its seed, its name, and
    keys that only change what is logged (:data:`OUTPUT_ONLY`)."""
    kept = {k: v for k, v in config.items() if k not in ("seed", "name")}
    if isinstance(kept.get("train"), dict):
        kept["train"] = {k: v for k, v in kept["train"].items() if k not in OUTPUT_ONLY}
    return canonical(kept)


def params_from_weights(path: Path) -> int | None:
    """Parameters in ``model.safetensors``, from its header alone (None without the file)."""
    from safetensors import SafetensorError, safe_open

    weights = path / "model.safetensors"
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys()
                       if not key.endswith(BUFFER_SUFFIXES))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LayerwiseError(f"{weights}: not a readable safetensors checkpoint: {exc}") from None


def read_noise(run: RunSummary, space: str = "pixel") -> None:
    """Accuracy by noise std from the run's latest ``layerwise eval`` report in ``space``, when it has one."""
    report = read_noise_report(run.path, space)
    if report is None:
        return
    run.noise[space] = {float(r["noise"]): float(r["acc"]) for r in report["results"]}
    epoch = report.get("epoch")
    run.noise_epoch[space] = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


# --------------------------------------------------------------------------- rows


def group_runs(runs: list[RunSummary], group: bool = True) -> list[Row]:
    """Rows in order of first appearance. Complete runs with equal configs share a row; a run not
    finished (or still training) stays alone: its numbers are from fewer epochs than the others'."""
    rows: list[Row] = []
    by_config: dict[str, Row] = {}
    for run in runs:
        key = json.dumps(run.config, sort_keys=True, default=str)
        if group and run.complete and key in by_config:
            by_config[key].runs.append(run)
            continue
        row = Row([run])
        rows.append(row)
        if group and run.complete:
            by_config[key] = row
    mark_differences(rows)
    return rows


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Recipe data as ``path: value``, list items by name where they have one (as overrides write them)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        out = {}
        for item in value:
            out.update(flatten({k: v for k, v in item.items() if k != "name"}, f"{prefix}{item['name']}."))
        return out
    return {prefix[:-1]: value}


def mark_differences(rows: list[Row]) -> None:
    """Give each row the recipe values that not every row shares (e.g. 'hsic1.objective.beta')."""
    flat = [flatten(row.first.config) for row in rows]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = object()
    varying = [k for k in keys if len({json.dumps(f.get(k, missing), default=repr) for f in flat}) > 1]
    for row, values in zip(rows, flat, strict=True):
        row.differs = {key: values.get(key) for key in varying}


def sort_rows(rows: list[Row], key: str) -> list[Row]:
    """Rows by ``key`` (see :data:`SORT_KEYS`, or ``noise:LEVEL``, ``noise-normalized:LEVEL``), rows
    without the value last."""
    if key == "name":
        return sorted(rows, key=lambda row: (row.label, row.first.name))
    noise = parse_noise_key(key)
    if noise is not None:
        space, level = noise
        levels = sorted({lvl for row in rows for lvl in row.noise_levels(space)})
        if level not in levels:
            found = (", ".join(f"{lvl:g}" for lvl in levels)
                     or f"none (run 'layerwise eval RUN --noise ...{noise_space_option(space)}' first)")
            where = f" in {space} space" if space != "pixel" else ""
            raise LayerwiseError(f"--sort {key}: no run has an eval result at noise {level:g}{where}; "
                                 f"levels found: {found}")
        key, descending = noise_key(space, level), True
    elif key in SORT_KEYS:
        descending = SORT_KEYS[key]
    else:
        raise LayerwiseError(f"--sort {key}: unknown key; expected one of {', '.join(SORT_KEYS)}, or noise:LEVEL "
                             f"(noise-normalized:LEVEL for normalized-space reports)")
    with_value = [(row, stat.mean) for row in rows if (stat := row.stats(key)) is not None]
    without = [row for row in rows if row.stats(key) is None]
    with_value.sort(key=lambda pair: pair[1], reverse=descending)  # stable: ties keep the given order
    return [row for row, _ in with_value] + without


# --------------------------------------------------------------------------- output


def level_key(level: float) -> str:
    return f"{level:g}"


def noise_field(space: str) -> str:
    """The JSON field of a space's noise results: ``noise`` (pixel), ``noise_normalized``."""
    return report_prefix(space).replace("-", "_")


def rows_json(rows: list[Row]) -> list[dict]:
    """The rows as plain data: per row the statistics over its runs, and each run's own values."""
    out = []
    for row in rows:
        first = row.first
        entry: dict[str, Any] = {
            "recipe": row.label, "n": len(row.runs), "complete": all(run.complete for run in row.runs),
            "epochs": first.epochs, "planned_epochs": first.planned_epochs, "trains": first.trains,
            "params": first.params, "seeds": [run.seed for run in row.runs], "differs": row.differs,
        }
        for key in (*ACCURACY_KEYS, "train_seconds"):
            stat = row.stats(key)
            entry[key] = stat.to_json() if stat else None
        for space in NOISE_SPACES:
            entry[noise_field(space)] = {level_key(level): row.stats(noise_key(space, level)).to_json()
                                         for level in row.noise_levels(space)}
        entry["runs"] = []
        for run in row.runs:
            noise = {}
            for space in NOISE_SPACES:
                noise[noise_field(space)] = {level_key(level): acc
                                             for level, acc in sorted(run.noise.get(space, {}).items())}
                noise[f"{noise_field(space)}_epoch"] = run.noise_epoch.get(space)
            entry["runs"].append({"path": str(run.path), "name": run.name, "recipe": run.recipe_name,
                                  "seed": run.seed, "complete": run.complete, **run.values(), **noise})
        out.append(entry)
    return out


def fmt_acc(stat: Stat | None) -> str:
    """An accuracy as a percentage (the % is in the column title), with its std over seeds."""
    if stat is None:
        return "-"
    if stat.std is None:
        return f"{100 * stat.mean:.2f}"
    return f"{100 * stat.mean:.2f} ± {100 * stat.std:.2f}"


def fmt_seconds(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    scale, unit = (1, "s") if stat.mean < 120 else (60, "min") if stat.mean < 7200 else (3600, "h")
    mean = f"{stat.mean / scale:.1f}"
    return f"{mean} {unit}" if stat.std is None else f"{mean} ± {stat.std / scale:.1f} {unit}"


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if not isinstance(value, (dict, list)) else json.dumps(value)


def short_path(key: str) -> str:
    """'model.subnetworks.sn1.blocks.hsic1.objective.beta' -> 'hsic1.objective.beta'."""
    parts = key.split(".")
    if len(parts) > 4 and parts[:2] == ["model", "subnetworks"] and parts[3] == "blocks":
        return ".".join(parts[4:])
    return key


def fmt_differs(differs: dict[str, Any]) -> str:
    items = [f"{short_path(k)}={fmt_value(v)}" for k, v in differs.items()]
    more = f" (+{len(items) - DIFFERS_SHOWN} more)" if len(items) > DIFFERS_SHOWN else ""
    return "\n".join(items[:DIFFERS_SHOWN]) + more


def fmt_trains(trains: dict[str, str]) -> str:
    """'2 nhsic, 2 none': how many blocks with parameters each objective trains."""
    counts: dict[str, int] = {}
    for objective in trains.values():
        counts[objective] = counts.get(objective, 0) + 1
    return ", ".join(f"{n} {objective}" for objective, n in counts.items()) or "-"


def fmt_seeds(seeds: list[int | None]) -> str:
    shown = ["?" if s is None else str(s) for s in seeds]
    return ", ".join(shown) if len(shown) <= 5 else ", ".join(shown[:3]) + f", … ({len(shown)})"


def table(rows: list[Row]):
    """The rich table of the rows; the validation and noise columns appear when some run has them,
    a column per noise std and space (normalized-space ones after the pixel-space ones, so named)."""
    from rich.markup import escape
    from rich.table import Table

    from layerwise.errors import printable

    def safe(text: str) -> str:
        return escape(printable(text))

    has_val = any(row.stats("val_acc") for row in rows)
    levels = [(space, level) for space in NOISE_SPACES
              for level in sorted({level for row in rows for level in row.noise_levels(space)})]
    has_differs = any(row.differs for row in rows)
    runs = sum(len(row.runs) for row in rows)
    grouped = any(row.grouped for row in rows)
    title = f"{runs} run{'s' if runs != 1 else ''}" + (", seeds grouped: mean ± std" if grouped else "")
    result = Table(title=title, header_style="bold")
    text_columns = ["run", "seed", "trains", *(["differs"] if has_differs else [])]
    number_columns = ["epochs", "test %", "best test %", *(["val %", "best val %"] if has_val else []),
                      *(f"noise {level:g} %" if space == "pixel" else f"{space} noise {level:g} %"
                        for space, level in levels), "train time", "params"]
    for column in text_columns:
        result.add_column(column, no_wrap=column == "run", overflow="fold")
    for column in number_columns:
        result.add_column(column, justify="right")
    for row in rows:
        first = row.first
        epochs = str(first.epochs)
        if not first.complete:
            epochs = f"[yellow]{first.epochs}/{first.planned_epochs if first.planned_epochs else '?'}[/]"
        name = f"{row.label} ({len(row.runs)} runs)" if row.grouped else first.name
        cells = [safe(name), fmt_seeds([run.seed for run in row.runs]), safe(fmt_trains(first.trains)),
                 *([safe(fmt_differs(row.differs))] if has_differs else []), epochs,
                 fmt_acc(row.stats("test_acc")), fmt_acc(row.stats("best_test_acc")),
                 *([fmt_acc(row.stats("val_acc")), fmt_acc(row.stats("best_val_acc"))] if has_val else []),
                 *(fmt_acc(row.stats(noise_key(space, level))) for space, level in levels),
                 fmt_seconds(row.stats("train_seconds")),
                 f"{first.params:,}" if first.params is not None else "-"]
        result.add_row(*cells)
    incomplete = [row.first for row in rows if not row.first.complete]
    if incomplete:
        result.caption = (f"[yellow]{len(incomplete)} incomplete[/] (epochs done/planned: still training, or "
                          f"stopped; 'layerwise train --resume RUN' continues one); never grouped with others")
    return result


def print_table(console, rendered) -> None:
    """On a terminal, the table fits the terminal's width. Piped or redirected, rich would squeeze it
    into 80 columns, cutting every cell; it is printed at its natural width instead (400 at most)."""
    if console.is_terminal:
        console.print(rendered)
        return
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update(max_width=400), rendered).maximum
    wide = type(console)(stderr=console.stderr, width=max(console.width, min(natural, 400)))
    wide.print(rendered)


def plot_rows(rows: list[Row], path: Path) -> Path:
    """Test (and validation) accuracy per epoch, one line per run, one colour per row."""
    from layerwise.plot import draw_curve_panels

    has_val = any(r.get("val_acc") is not None for row in rows for run in row.runs for r in run.history)
    panels: dict[str, list] = {"test accuracy": []}
    if has_val:
        panels["validation accuracy"] = []
    for colour, row in enumerate(rows):
        label = f"{row.label} ({len(row.runs)} runs)" if row.grouped else row.first.name  # as in the table
        for i, run in enumerate(row.runs):
            for title, key in (("test accuracy", "test_acc"), ("validation accuracy", "val_acc")):
                if title not in panels:
                    continue
                points = [(r["epoch"], r[key]) for r in run.history if r.get(key) is not None]
                if points:
                    xs, ys = zip(*points, strict=True)
                    panels[title].append((label if i == 0 else None, colour, list(xs), list(ys)))
    try:
        return draw_curve_panels(panels, path, title="Accuracy per epoch")
    except OSError as exc:
        raise LayerwiseError(f"--plot {path}: cannot write the figure ({exc.strerror or exc})") from None


def check_plot_target(path: Path) -> None:
    """Fail before reading any run when the figure cannot be made: no matplotlib, or no image suffix."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LayerwiseError("compare --plot needs matplotlib: pip install 'layerwise[plot]'") from None
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LayerwiseError(f"--plot {path}: give a file name ending in .png (or .svg, .pdf)")
    if path.is_dir():
        raise LayerwiseError(f"--plot {path}: is a folder; give a file name ending in .png")


def compare_runs(patterns: list[str], warn: Warn, group: bool = True, sort: str | None = None) -> list[Row]:
    """Read the runs that ``patterns`` name, group and sort them: the rows of ``layerwise compare``."""
    if sort is not None and sort not in SORT_KEYS and parse_noise_key(sort) is None:
        sort_rows([], sort)  # an unknown key fails before any run is read
    runs = [read_run(path, warn) for path in expand(patterns, warn)]
    rows = group_runs(runs, group)
    return sort_rows(rows, sort) if sort else rows
