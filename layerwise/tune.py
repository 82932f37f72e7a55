"""Hyper-parameter search with Optuna: ``layerwise tune RECIPE --param KEY=SPACE ...``.

Every trial trains the recipe with the sampled values as overrides, in a normal run folder
(once per seed with ``--seeds``), and is judged on validation accuracy: the recipe must hold out
``data.validation`` samples, and the test set is never used to choose. Optuna samples (TPE, or
its GridSampler for a grid) and prunes on the per-epoch validation accuracy (median pruner).

With ``storage`` (an Optuna RDB URL such as ``sqlite:///tune.db``) the study lives in a database:
running the same command again continues it, and several processes, on one machine or many,
share its trials. Nothing here schedules work; Optuna's storage is the only coordination:

* ``trials`` is the study's total: a process starts a trial only while the finished trials
  (complete, pruned, or failed on a non-finite loss) plus those running elsewhere are fewer.
* A trial whose process died (a kill, a crash, a lost machine) is failed and queued again with
  the same values; the retry continues the killed run folders from their last complete epoch.
  On this host a dead owner is seen at once (the trial records its host and pid); elsewhere
  Optuna's heartbeat fails it once it has been silent for :data:`GRACE_PERIOD` seconds.
* Samplers are reseeded from (``sampler_seed``, trial number) before each trial, so a resumed
  search or a second process does not repeat the first trials' values, and one uninterrupted
  process always draws the same sequence.

Optuna is an optional extra (``pip install 'layerwise[tune]'``), imported only here.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
import shlex
import socket
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerwise.errors import LayerwiseError, NonFiniteError, TrainingInterrupted, printable
from layerwise.progress import stderr
from layerwise.tune_space import (
    METRICS,
    Space,
    check_metric,
    parse_params,
    parse_seeds,
    short_labels,
    shown,
    yaml_scalar,
)

DEFAULT_TRIALS = 20
HEARTBEAT_INTERVAL = 60
"""Seconds between the heartbeats that a trial in a database storage records (Optuna's own)."""
GRACE_PERIOD = 180
"""Seconds without a heartbeat after which any process fails another host's trial and queues it again."""

SEARCH_ATTR = "layerwise_search"
"""The study's user attribute holding the search's definition, checked when a study is continued."""

def optuna_module():
    """Optuna, or the one-line error that says which extra to install."""
    try:
        import optuna
    except ImportError:
        raise LayerwiseError("layerwise tune needs Optuna: pip install 'layerwise[tune]'") from None
    return optuna


# --------------------------------------------------------------------------- search spaces


# --------------------------------------------------------------------------- processes that own trials


def process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def process_started(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process."""
    fields = process_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def owner() -> dict[str, Any]:
    """This process, as a trial records it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_started(os.getpid())}


def owner_is_gone(info: Any) -> bool:
    """True when ``info`` names a process of this host that no longer runs (a pid since reused included)."""
    if not isinstance(info, dict) or info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False  # another machine's: Optuna's heartbeat judges those
    from layerwise.runs import process_exists

    pid = info["pid"]
    if not process_exists(pid):
        return True
    fields = process_stat(pid)
    if fields is None:
        return False
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return True
    return info.get("started") is not None and len(fields) > 19 and int(fields[19]) != info["started"]


# --------------------------------------------------------------------------- the search


@dataclass
class TuneResult:
    """What :func:`run_search` returns: the Optuna study, one row per trial, and the best row."""

    study: Any
    trials: list[dict]
    best: dict | None
    target: int
    metric: str
    source: str
    overrides: list[str]
    labels: dict[str, str] = field(default_factory=dict)
    storage: str | None = None
    runs_dir: Path | None = None

    def to_json(self) -> dict:
        """The result as plain data (``layerwise tune --json``)."""
        return {"study": self.study.study_name, "storage": self.storage, "metric": self.metric,
                "trials_target": self.target, "finished": sum(row["finished"] for row in self.trials),
                "best": self.best["number"] if self.best else None,
                "best_command": train_command(self.source, self.overrides, self.best) if self.best else None,
                "trials": self.trials}


class Search:
    """One process's share of a study: its definition, and the objective that trains each trial."""

    def __init__(self, optuna, source: str | Path, overrides: Sequence[str], base, spaces: list[Space],
                 seeds: list[int] | None, metric: str, pruning: bool, runs_dir: Path,
                 data_root: str | Path | None, quiet: bool):
        self.optuna, self.source, self.overrides, self.base = optuna, source, list(overrides), base
        self.spaces, self.seeds, self.metric, self.pruning = spaces, seeds, metric, pruning
        self.runs_dir, self.data_root, self.quiet = runs_dir, data_root, quiet
        self.labels = short_labels([space.key for space in spaces])
        self.current: Any = None  # the trial being trained, once it has started

    def say(self, text: str, style: str | None = None) -> None:
        """A progress line on stderr (values and paths are printed as they are, never as markup)."""
        if not self.quiet:
            stderr.print(printable(text), style=style, markup=False, highlight=False)

    # ---- the trial's recipes

    def run_name(self, number: int, seed: int | None) -> str:
        """``<recipe>-t<N>`` (``-s<seed>`` with several seeds), within the 100 characters a name may have."""
        suffix = f"-t{number}" + (f"-s{seed}" if seed is not None else "")
        return self.base.name[: 100 - len(suffix)] + suffix

    def param_overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The overrides that give a recipe these values."""
        return [f"{space.key}={yaml_scalar(params[space.key])}" for space in self.spaces if space.key in params]

    def trial_recipe(self, params: Mapping[str, Any], number: int, seed: int | None):
        """The recipe one run of a trial trains."""
        from layerwise.factory import load_recipe

        extra = [f"name={self.run_name(number, seed)}"] + ([f"seed={seed}"] if seed is not None else [])
        return load_recipe(self.source, [*self.overrides, *self.param_overrides(params), *extra])

    def describe(self, params: Mapping[str, Any]) -> str:
        return ", ".join(f"{self.labels[s.key]}={shown(params[s.key])}" for s in self.spaces if s.key in params)

    # ---- the objective

    def objective(self, trial) -> float:
        """Train the trial's configuration (once per seed) and return its mean validation accuracy."""
        from layerwise.runs import METRICS_FILE, read_metrics
        from layerwise.train_run import train_recipe

        self.current = trial
        trial.set_user_attr("owner", owner())
        params = {space.key: space.suggest(trial) for space in self.spaces}
        seeds = self.seeds if self.seeds is not None else [None]
        trial.set_user_attr("seeds", [self.base.seed if seed is None else seed for seed in seeds])
        previous = list(trial.user_attrs.get("resume_runs") or [])
        runs: list[str] = []
        epochs: list[int] = []  # the epochs the first seed has reported to the pruner
        retry = trial.user_attrs.get("retry_of")
        again = f" (retrying trial {retry})" if retry is not None else ""
        self.say(f"trial {trial.number}{again}: {self.describe(params)}")
        values = []
        try:
            for index, seed in enumerate(seeds):
                report = self.reporter(trial, index, runs, epochs)
                run = self.resume(previous[index], report) if index < len(previous) and previous[index] else None
                if run is None:
                    del runs[index:]  # a folder that could not be continued: this seed's run is a new one
                    report = self.reporter(trial, index, runs, epochs)
                    run = train_recipe(self.trial_recipe(params, trial.number, seed), self.runs_dir, self.data_root,
                                       show_progress=False, quiet=True, callbacks=[report])
                values.append(self.value(read_metrics(Path(run) / METRICS_FILE), run))
        except self.optuna.TrialPruned:
            self.say(f"trial {trial.number}: pruned after epoch {epochs[-1]}, {', '.join(runs)}")
            raise
        except NonFiniteError as exc:
            # This configuration diverges: a result of the search, recorded, and the search goes on.
            trial.set_user_attr("error", str(exc))
            trial.set_user_attr("counted", True)
            self.say(f"trial {trial.number}: failed: {exc}", style="red")
            return math.nan  # Optuna records the trial as failed
        except LayerwiseError as exc:
            trial.set_user_attr("error", str(exc))
            raise
        value = statistics.fmean(values)
        trial.set_user_attr("values", values)
        spread = f" (mean of {len(values)} seeds)" if len(values) > 1 else ""
        self.say(f"trial {trial.number}: {METRICS[self.metric]} {value:.2%}{spread}, {', '.join(runs)}")
        return value

    def reporter(self, trial, index: int, runs: list[str], epochs: list[int]):
        """The epoch callback of a trial's ``index``-th seed: it records the run folder, and the first
        seed's reports its validation accuracy to the pruner, stopping the trial when it says so."""
        best = [-math.inf]

        def report(run: Path, record: dict) -> None:
            if len(runs) == index:
                runs.append(str(run))
                trial.set_user_attr("runs", runs)
            if index:
                return
            score = self.epoch_score(record, run)
            best[0] = max(best[0], score)
            if not self.pruning or record["epoch"] in epochs:
                return  # each epoch is reported once, even where a run had to start again
            epochs.append(record["epoch"])
            trial.report(best[0] if self.metric == "best_val_acc" else score, record["epoch"])
            if trial.should_prune():
                raise self.optuna.TrialPruned(f"pruned after epoch {record['epoch']}")

        return report

    def epoch_score(self, record: dict, run: Path) -> float:
        if "val_acc" not in record:
            raise LayerwiseError(f"{run}: epoch {record.get('epoch')} has no val_acc (data.validation is 0)")
        return float(record["val_acc"])

    def value(self, records: list[dict], run: Path) -> float:
        """The metric of one finished run."""
        if not records:
            raise LayerwiseError(f"{run}: no epoch was recorded")
        scores = [self.epoch_score(record, run) for record in records]
        return max(scores) if self.metric == "best_val_acc" else scores[-1]

    def resume(self, run_text: str, report) -> Path | None:
        """Continue a killed trial's run folder from its last complete epoch (its epochs so far are
        reported again first); None when it cannot be continued, so that the caller trains afresh."""
        from layerwise.factory import load_recipe
        from layerwise.runs import METRICS_FILE, read_metrics
        from layerwise.train_run import resume_run

        run = Path(run_text)
        try:
            records = read_metrics(run / METRICS_FILE)
            epochs = load_recipe(run / "recipe.yaml").train.epochs
        except LayerwiseError as exc:
            self.say(f"  cannot continue {run} ({exc}); training this run afresh")
            return None
        for record in records:
            report(run, record)
        if records and records[-1]["epoch"] >= epochs:
            return run
        self.say(f"  continuing {run} after epoch {records[-1]['epoch'] if records else 0}")
        try:
            return resume_run(run, self.data_root, show_progress=False, quiet=True, callbacks=[report])
        except NonFiniteError:
            raise
        except LayerwiseError as exc:
            self.say(f"  cannot continue {run} ({exc}); training this run afresh")
            return None


def trial_seed(seed: int, number: int) -> int:
    """A sampler seed for one trial, from the search's seed and the trial's number."""
    import numpy

    return int(numpy.random.SeedSequence([seed, number]).generate_state(1)[0])


def make_sampler(optuna, spaces: list[Space], seed: int):
    """GridSampler for a grid (its order, shuffled by ``seed``, is shared by every process); otherwise
    TPE, reseeded before every trial from (``seed``, trial number)."""
    if spaces[0].kind == "grid":
        return optuna.samplers.GridSampler({space.key: list(space.values) for space in spaces}, seed=seed)

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        """TPE with a seed of its own for each trial: deterministic in one process, and no two
        processes (or a resumed search and the search it continues) draw the same sequence."""

        def __init__(self) -> None:
            self.sampler = optuna.samplers.TPESampler(seed=trial_seed(seed, 0))

        def before_trial(self, study, trial) -> None:
            self.sampler = optuna.samplers.TPESampler(seed=trial_seed(seed, trial.number))
            self.sampler.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.sampler.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.sampler.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.sampler.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self.sampler.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            pass  # the seed comes from the trial number

    return TrialSeededTPE()


def retry_trial(study, trial) -> None:
    """Queue a trial whose process died again, with the same values; the retry continues its run folders.

    A storage callback too: Optuna calls it for trials its heartbeat fails."""
    optuna = optuna_module()
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"retry_of": trial.number, "resume_runs": list(trial.user_attrs.get("runs") or [])},
        system_attrs={k: v for k, v in trial.system_attrs.items() if k in ("grid_id", "search_space")},
    ))


def fail_orphans(study) -> list[int]:
    """Fail, and queue again, the running trials whose process on this host is gone; their numbers."""
    optuna = optuna_module()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not owner_is_gone(trial.user_attrs.get("owner")):
            continue
        try:  # as optuna.storages.fail_stale_trials does: only the process that fails it queues the retry
            changed = study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            changed = False
        if changed:
            retry_trial(study, trial)
            failed.append(trial.number)
    return failed


def fail_heartbeat_stale(study) -> None:
    """Let Optuna fail the trials of other hosts whose heartbeat stopped (database storages only)."""
    optuna = optuna_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental in Optuna
        optuna.storages.fail_stale_trials(study)


def is_finished(trial) -> bool:
    """Counted towards the target: complete, pruned, or failed by its own training (a non-finite loss)."""
    name = trial.state.name
    return name in ("COMPLETE", "PRUNED") or (name == "FAIL" and bool(trial.user_attrs.get("counted")))


def masked(url: str | None) -> str | None:
    """A storage URL with any password hidden, for messages and tables."""
    return None if url is None else re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def open_storage(optuna, url: str | None):
    """None (in memory) or an RDB storage with heartbeats, whose stale trials are queued again."""
    if url is None:
        return None
    kwargs: dict[str, Any] = {"heartbeat_interval": HEARTBEAT_INTERVAL, "grace_period": GRACE_PERIOD}
    accepted = inspect.signature(optuna.storages.RDBStorage).parameters
    for name in ("heartbeat_stale_trial_callback", "failed_trial_callback"):  # Optuna >= 4.9, then older
        if name in accepted:
            kwargs[name] = retry_trial
            break
    if url.startswith("sqlite:"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # several processes wait for the lock
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeats are experimental in Optuna
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:  # a bad URL, a missing driver, an unreachable or unwritable database
            # Processes started together race to create the tables: the losers' inserts fail once.
            if type(exc).__name__ in ("IntegrityError", "OperationalError") and attempt < 5:
                time.sleep(0.1 * 2**attempt)
                continue
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LayerwiseError(f"--storage {masked(url)}: Optuna cannot open it ({reason}); give a database URL "
                                 f"such as sqlite:///tune.db or postgresql://user:password@host/db") from None
    raise AssertionError("unreachable")


def search_definition(search: Search, sampler_seed: int) -> dict:
    """What must be the same for processes to share a study, and for a run to continue one."""
    return {"recipe": search.base.to_dict(), "params": {space.key: space.text for space in search.spaces},
            "metric": search.metric, "seeds": search.seeds, "sampler_seed": sampler_seed}


def check_definition(study, definition: dict, storage: str | None) -> None:
    """Refuse to continue a study that searches something else (another recipe, space, metric or seeds)."""
    import json

    from layerwise.resume import first_difference

    if study.direction.name != "MAXIMIZE":
        raise LayerwiseError(f"study '{study.study_name}' in {masked(storage)} minimizes its objective, so it was "
                             f"not made by layerwise tune; give another --study")
    saved = study.user_attrs.get(SEARCH_ATTR)
    if saved is None:
        if study.get_trials(deepcopy=False):
            raise LayerwiseError(f"study '{study.study_name}' in {masked(storage)} has trials but was not made by "
                                 f"layerwise tune; give another --study")
        study.set_user_attr(SEARCH_ATTR, json.loads(json.dumps(definition)))
        return
    current = json.loads(json.dumps(definition))
    for key, what in (("recipe", "another recipe"), ("params", "other --param spaces"), ("metric", "another --metric"),
                      ("seeds", "other --seeds"), ("sampler_seed", "another --sampler-seed")):
        if saved.get(key) != current.get(key):
            if key == "recipe":
                what += f" (they differ at {first_difference(saved[key], current[key])})"
            else:
                what += f" ({describe_setting(saved.get(key))})"
            raise LayerwiseError(f"study '{study.study_name}' in {masked(storage)} is a search with {what}; continue "
                                 f"it with the same recipe, overrides and options, or give another --study")


def describe_setting(value: Any) -> str:
    """A saved setting of a study, as the option that gives it is written."""
    if isinstance(value, dict):
        return " ".join(f"--param {key}={space}" for key, space in value.items())
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return "none" if value is None else str(value)


@contextlib.contextmanager
def quiet_optuna(optuna) -> Iterator[None]:
    """Optuna logs warnings only, and not the failed trials that layerwise reports itself (with tracebacks)."""

    class NoFailedTrials(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not (message.startswith("Trial ") and " failed " in message)

    verbosity = optuna.logging.get_verbosity()
    optimize_logger = logging.getLogger("optuna.study._optimize")
    filter_ = NoFailedTrials()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize_logger.addFilter(filter_)
    try:
        yield
    finally:
        optimize_logger.removeFilter(filter_)
        optuna.logging.set_verbosity(verbosity)


def check_spaces(source: str | Path, overrides: Sequence[str], spaces: list[Space], seeds: list[int] | None) -> None:
    """Apply every space's candidate values to the recipe before anything runs: an unknown key or a
    value the recipe refuses is the recipe's own one-line error, naming the --param."""
    from layerwise.factory import load_recipe

    for space in spaces:
        if space.key == "name":
            raise LayerwiseError("--param name: tune names each trial's run itself (<recipe>-t<N>)")
        if space.key == "seed" and seeds is not None:
            raise LayerwiseError("--param seed with --seeds: give the seeds in one of them")
        for value in space.candidates():
            try:
                load_recipe(source, [*overrides, f"{space.key}={yaml_scalar(value)}"])
            except LayerwiseError as exc:
                raise LayerwiseError(f"--param {space.key}={space.text}: {exc}") from None


def run_search(
    recipe: str | Path,
    params: Sequence[str] | Mapping[str, str],
    overrides: Sequence[str] = (),
    *,
    trials: int | None = None,
    seeds: str | Sequence[int] | None = None,
    metric: str = "val_acc",
    storage: str | None = None,
    study_name: str | None = None,
    sampler_seed: int = 0,
    pruning: bool = True,
    runs_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    quiet: bool = False,
) -> TuneResult:
    """Search the ``params`` spaces (``["optim.local.lr=log:1e-4..1e-2", ...]`` or ``{key: space}``)
    of ``recipe`` (a YAML path or shipped name, plus ``overrides``) until the study has ``trials``
    finished trials (default: the grid's size, else 20), each trial trained once per seed of
    ``seeds`` (default: the recipe's seed) in a run folder under ``runs_dir`` (default
    ``runs/tune-<study>``). See the module's documentation for ``storage``."""
    from layerwise.factory import load_recipe
    from layerwise.recipe import RUN_NAME

    optuna = optuna_module()
    metric = check_metric(metric)
    spaces = parse_params(params)
    seed_list = parse_seeds(seeds)
    overrides = list(overrides)
    base = load_recipe(recipe, overrides)
    if base.data.validation <= 0:
        raise LayerwiseError(f"{recipe}: tune chooses on validation accuracy, but the recipe holds out no "
                             f"validation data; add an override such as data.validation=10000 (the last 10000 "
                             f"training samples), or set data.validation in the recipe")
    check_spaces(recipe, overrides, spaces, seed_list)
    grid_size = math.prod(len(space.values) for space in spaces) if spaces[0].kind == "grid" else None
    if trials is None:
        trials = grid_size or DEFAULT_TRIALS
    if trials < 1:
        raise LayerwiseError(f"--trials: expected a number of trials >= 1, found {trials}")
    if grid_size is not None and trials > grid_size:
        raise LayerwiseError(f"--trials {trials}: the grid has {grid_size} combinations; give at most {grid_size}")
    name = study_name if study_name is not None else base.name
    if not RUN_NAME.fullmatch(name):
        raise LayerwiseError(f"--study {name[:40]!r}: expected 1 to 100 ASCII letters, digits, '_', '-' and '.', "
                             f"not starting with '-' or '.' (it names the runs folder)")
    runs = Path(runs_dir) if runs_dir is not None else Path("runs") / f"tune-{name}"
    search = Search(optuna, recipe, overrides, base, spaces, seed_list, metric, pruning, runs, data_root, quiet)
    pruner = optuna.pruners.MedianPruner() if pruning else optuna.pruners.NopPruner()

    with quiet_optuna(optuna):
        study = optuna.create_study(storage=open_storage(optuna, storage), sampler=make_sampler(optuna, spaces,
                                    sampler_seed), pruner=pruner, study_name=name, direction="maximize",
                                    load_if_exists=True)
        check_definition(study, search_definition(search, sampler_seed), storage)
        optimize(study, search, trials, storage)
    rows = trial_rows(study, search)
    complete = [row for row in rows if row["state"] == "complete"]
    best = max(complete, key=lambda row: (row["value"], -row["number"])) if complete else None
    if best is not None:
        best["best"] = True
    return TuneResult(study, rows, best, trials, metric, str(recipe), overrides, search.labels, masked(storage), runs)


def optimize(study, search: Search, target: int, storage: str | None) -> None:
    """Run trials until the study has ``target`` finished ones, or the rest run in other processes."""

    def count() -> tuple[int, int]:
        """Finished and running trials, once the trials of dead processes are failed and queued again."""
        if storage is not None:
            for number in fail_orphans(study):
                search.say(f"trial {number} was left running by a process that is gone; it is queued again")
            fail_heartbeat_stale(study)
        trials = study.get_trials(deepcopy=False)
        return sum(is_finished(t) for t in trials), sum(t.state.name == "RUNNING" for t in trials)

    done, running = count()
    where = f" in {masked(storage)}" if storage else ""
    search.say(f"{search.base.name}: study '{study.study_name}'{where}, {done} of {target} trials finished; "
               f"run folders in {search.runs_dir}", style="bold")
    while done < target:
        if done + running >= target:
            search.say(f"{running} trial(s) running in other processes will finish the search")
            return
        search.current = None
        try:
            study.optimize(search.objective, n_trials=1)
        except (TrainingInterrupted, KeyboardInterrupt):
            raise TrainingInterrupted(interrupted_message(study, search, storage)) from None
        except (search.optuna.exceptions.UpdateFinishedTrialError, ValueError):
            # Optuna's words when a trial it runs was finished meanwhile: this process was silent for longer
            # than the grace period (suspended, say), so another one failed the trial and queued it again.
            if not taken_over(study, search.current):
                raise
            search.say(f"trial {search.current.number} was failed by another process after {GRACE_PERIOD} s "
                       f"without a heartbeat, and queued again; this process drops its result")
        except LayerwiseError as exc:
            if search.current is None:
                raise
            params = search.describe(search.current.params)
            raise LayerwiseError(f"trial {search.current.number} ({params}): {exc}") from None
        done, running = count()


def taken_over(study, trial) -> bool:
    """Whether another process failed ``trial`` (this process's, running) and queued it again."""
    return trial is not None and any(t.user_attrs.get("retry_of") == trial.number
                                     for t in study.get_trials(deepcopy=False))


def interrupted_message(study, search: Search, storage: str | None) -> str:
    """What Ctrl-C left: in a database, the interrupted trial is queued again to continue its runs."""
    if storage is None:
        return (f"the search was stopped; it was held in memory (no --storage), so it cannot continue. The "
                f"finished trials' runs are in {search.runs_dir}")
    trial = search.current
    frozen = next((t for t in study.get_trials(deepcopy=False) if trial is not None and t.number == trial.number),
                  None)
    if frozen is None:
        return "the search was stopped between trials; continue it with the same command"
    if frozen.state.name == "FAIL":  # Optuna failed it; still running, a later run's check queues it
        retry_trial(study, frozen)
    return (f"the search was stopped during trial {frozen.number}, which is queued again (its runs continue from "
            f"their last complete epoch); continue the search with the same command")


def trial_rows(study, search: Search) -> list[dict]:
    """One row per trial of the study: its state, values, seeds, run folders and what became of it."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    retried_as = {t.user_attrs["retry_of"]: t.number for t in trials if t.user_attrs.get("retry_of") is not None}
    for trial in trials:
        state = trial.state.name.lower()
        pruned_at = None
        if state == "pruned":
            pruned_at = trial.last_step
        elif state == "fail":
            state = "failed" if trial.user_attrs.get("error") else "interrupted"
        params = dict(trial.params)
        rows.append({
            "number": trial.number,
            "state": state,
            "finished": is_finished(trial),
            "params": params,
            "overrides": search.param_overrides(params),
            "value": trial.value if trial.state.name in ("COMPLETE", "PRUNED") else None,
            "values": trial.user_attrs.get("values"),
            "seeds": trial.user_attrs.get("seeds"),
            "runs": trial.user_attrs.get("runs") or [],
            "pruned_at": pruned_at,
            "error": trial.user_attrs.get("error"),
            "retry_of": trial.user_attrs.get("retry_of"),
            "retried_as": retried_as.get(trial.number),
            "best": False,
        })
    return rows


def train_command(source: str | Path, overrides: Sequence[str], row: dict) -> str:
    """The ``layerwise train`` command of a trial's configuration."""
    return " ".join(shlex.quote(str(part)) for part in ["layerwise", "train", source, *overrides, *row["overrides"]])


def results_table(result: TuneResult):
    """The trials as a rich table, the best one highlighted."""
    from rich.markup import escape
    from rich.table import Table

    finished = sum(row["finished"] for row in result.trials)
    table = Table(title=f"Study {escape(result.study.study_name)}: {finished} of {result.target} trials finished",
                  header_style="bold")
    table.add_column("trial", justify="right")
    table.add_column("state")
    for label in result.labels.values():
        table.add_column(escape(label), justify="right")
    seeds = next((len(row["seeds"]) for row in result.trials if row["seeds"]), 1)
    table.add_column(("mean " if seeds > 1 else "") + METRICS[result.metric], justify="right")
    table.add_column("run folders" if seeds > 1 else "run folder")
    for row in result.trials:
        state = row["state"]
        if state == "pruned" and row["pruned_at"] is not None:
            state = f"pruned at epoch {row['pruned_at']}"
        elif state == "interrupted" and row["retried_as"] is not None:
            state = f"interrupted, retried as {row['retried_as']}"
        value = "" if row["value"] is None else f"{row['value']:.2%}"
        if row["state"] == "pruned" and value:
            value = f"({value})"  # the first seed's accuracy when it was stopped
        cells = [str(row["number"]) + (" *" if row["best"] else ""), state,
                 *(shown(row["params"][key]) if key in row["params"] else "" for key in result.labels),
                 value, "\n".join(row["runs"])]
        table.add_row(*(escape(cell) for cell in cells), style="bold green" if row["best"] else None)
    return table


def summary_lines(result: TuneResult) -> list[str]:
    """The lines after the table: the best trial, and how to train its configuration."""
    if result.best is None:
        return ["No trial has completed yet."]
    best = result.best
    seeds = best["seeds"] or []
    what = METRICS[result.metric]
    if len(seeds) > 1:
        what = f"mean {what} over seeds {','.join(map(str, seeds))}"
    lines = [f"Best: trial {best['number']} (*), {what} {best['value']:.2%}"]
    if best["runs"]:
        lines[0] += f", {', '.join(best['runs'])}"
    lines.append(f"Train its configuration with: {train_command(result.source, result.overrides, best)}")
    failed = [row for row in result.trials if row["state"] == "failed"]
    lines += [f"trial {row['number']} failed: {row['error']}" for row in failed]
    return lines

