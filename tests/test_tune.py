"""`layerwise tune`: search spaces, the refusals, the search itself (with a fake trainer, then on
real MNIST), and a search in a database that resumes after a SIGKILL.

The fake trainer stands in for ``train_recipe``: it writes a run folder and metrics.jsonl as
training does and calls the epoch callbacks, with validation accuracies chosen by each test, so
that the search logic (seeds, pruning, failures, retries, shared studies) is tested in seconds
without data.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from layerwise.errors import LayerwiseError, NonFiniteError
from layerwise.tune import owner, owner_is_gone, run_search
from layerwise.tune_space import Space, parse_param, short_labels, yaml_scalar
from tests.helpers import REPO, assert_one_line_error, finish, start_layerwise, tiny_recipe

optuna = pytest.importorskip("optuna")

LR = "optim.local.lr"
SIGMA = "model.subnetworks.sn1.blocks.hsic1.objective.sigma"


def write_recipe(path: Path, epochs: int = 2, **data) -> Path:
    """The tiny hybrid network, holding out validation samples, as a YAML file."""
    recipe = tiny_recipe(**{"train_limit": 512, "validation": 128, **data})
    recipe["train"]["epochs"] = epochs
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml")


# --------------------------------------------------------------------------- search spaces


@pytest.mark.parametrize(("text", "expected"), [
    (f"{LR}=log:1e-4..1e-2", Space(LR, "float", 1e-4, 1e-2, log=True, text="log:1e-4..1e-2")),
    (f"{LR}=float:0.1..0.9", Space(LR, "float", 0.1, 0.9, text="float:0.1..0.9")),
    (f"{LR}=0.1..0.9", Space(LR, "float", 0.1, 0.9, text="0.1..0.9")),
    (f"{LR}=float:1e-4..1e-2:log", Space(LR, "float", 1e-4, 1e-2, log=True, text="float:1e-4..1e-2:log")),
    ("model.subnetworks.sn1.blocks.hsic1.out=int:16..256",
     Space("model.subnetworks.sn1.blocks.hsic1.out", "int", 16, 256, text="int:16..256")),
    ("x.out=int:16..256:log", Space("x.out", "int", 16, 256, log=True, text="int:16..256:log")),
    ("x.act=choice:relu,tanh,gelu", Space("x.act", "choice", values=("relu", "tanh", "gelu"),
                                          text="choice:relu,tanh,gelu")),
    ("x.y=choice: 1, 2.5, 1e-3, true, null", Space("x.y", "choice", values=(1, 2.5, 0.001, True, None),
                                                   text="choice: 1, 2.5, 1e-3, true, null")),
    ("x.beta=grid:1,5,10", Space("x.beta", "grid", values=(1, 5, 10), text="grid:1,5,10")),
])
def test_spaces_parse(text, expected):
    space = parse_param(text)
    assert space == expected
    assert all(type(a) is type(b) for a, b in zip(space.values, expected.values, strict=True))


@pytest.mark.parametrize(("text", "fragment"), [
    ("optim.local.lr", "expected KEY=SPACE"),
    ("=log:1..2", "expected KEY=SPACE"),
    ("optim..lr=1..2", "the key has an empty part"),
    ("optim.local.lr=foo:1..2", "unknown kind 'foo'"),
    ("optim.local.lr=1", "expected a range LOW..HIGH"),
    ("optim.local.lr=log:0..1", "a log scale needs LOW > 0"),
    ("optim.local.lr=2..1", "expected LOW < HIGH"),
    ("optim.local.lr=a..b", "expected a finite number on each side"),
    ("optim.local.lr=0..inf", "expected a finite number on each side"),
    ("x.out=int:1.5..8", "expected an integer on each side"),
    ("x.out=int:1..8:linear", "expected 'int:LOW..HIGH' or 'int:LOW..HIGH:log'"),
    ("x.act=choice:relu,,tanh", "found an empty one"),
    ("x.act=choice:relu,relu", "given twice"),
    ("x.act=choice:[1],2", "expected plain values"),
])
def test_bad_spaces_are_one_line_errors(cli, recipe, text, fragment):
    result = cli("tune", str(recipe), "--param", text)
    message = assert_one_line_error(result, fragment)
    assert "--param" in message


def test_grids_do_not_mix_with_ranges(cli, recipe):
    result = cli("tune", str(recipe), "-p", f"{LR}=grid:0.001,0.01", "-p", f"{SIGMA}=1..10")
    assert_one_line_error(result, "cannot be mixed with ranges or choices", SIGMA)


def test_a_key_given_twice_or_no_param_is_refused(cli, recipe):
    assert_one_line_error(cli("tune", str(recipe), "-p", f"{LR}=1e-4..1e-2", "-p", f"{LR}=log:1e-4..1e-2"),
                          "given twice")
    assert_one_line_error(cli("tune", str(recipe)), "give at least one --param KEY=SPACE")


def test_values_reach_the_recipe_unchanged():
    from layerwise.recipe import apply_override
    from layerwise.schema import Problems

    for value in (1e-05, 0.1, 1e20, 3.0, 7, True, None, "relu", "yes", "1e-3", "a b"):
        data: dict = {}
        apply_override(data, f"k={yaml_scalar(value)}", Problems())
        assert data["k"] == value and type(data["k"]) is type(value), (value, yaml_scalar(value))


def test_columns_are_the_shortest_unambiguous_key_suffixes():
    keys = [LR, "optim.global.lr", SIGMA, "model.subnetworks.sn2.blocks.head.out"]
    assert short_labels(keys) == {LR: "local.lr", "optim.global.lr": "global.lr", SIGMA: "sigma",
                                  "model.subnetworks.sn2.blocks.head.out": "out"}


def test_help_gives_the_space_syntax(cli):
    result = cli("tune", "--help")
    assert result.code == 0
    text = " ".join(result.out.split())
    for fragment in ("log:1e-4..1e-2", "float:0.1..0.9 or 0.1..0.9", "int:16..256:log", "choice:relu,tanh,gelu",
                     "grid:1,5,10", "layerwise[tune]", "sqlite:///tune.db", "--seeds", "best_val_acc"):
        assert fragment in text, fragment


# --------------------------------------------------------------------------- refusals before anything runs


def test_test_accuracy_is_refused_as_the_objective(cli, recipe):
    for metric in ("test_acc", "best_test_acc"):
        result = cli("tune", str(recipe), "-p", f"{LR}=log:1e-4..1e-2", "--metric", metric)
        assert_one_line_error(result, f"--metric {metric}", "never chooses on the test set", "val_acc")
    assert_one_line_error(cli("tune", str(recipe), "-p", f"{LR}=1e-4..1e-2", "--metric", "loss"),
                          "expected val_acc")


def test_missing_optuna_names_the_extra(cli, recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    result = cli("tune", str(recipe), "-p", f"{LR}=log:1e-4..1e-2")
    message = assert_one_line_error(result, "layerwise tune needs Optuna: pip install 'layerwise[tune]'")
    assert len(result.err.strip().splitlines()) == 1, message
    with pytest.raises(LayerwiseError, match=r"layerwise\[tune\]"):
        run_search(recipe, [f"{LR}=log:1e-4..1e-2"])


def test_unknown_key_is_the_recipes_own_error(cli, recipe, tmp_path):
    result = cli("tune", str(recipe), "-p", "optim.local.lrr=log:1e-4..1e-2", "--runs-dir", str(tmp_path / "runs"))
    assert_one_line_error(result, "--param optim.local.lrr=log:1e-4..1e-2", "optim.local.lrr: unknown key",
                          "did you mean 'lr'")
    # Every choice is checked, not only the first.
    result = cli("tune", str(recipe), "-p", "model.subnetworks.sn1.blocks.hsic1.act=choice:relu,tanx")
    assert_one_line_error(result, "unknown activation 'tanx'")
    assert not (tmp_path / "runs").exists()


def test_a_recipe_without_validation_data_is_refused(cli, tmp_path):
    path = write_recipe(tmp_path / "noval.yaml", validation=0)
    assert_one_line_error(cli("tune", str(path), "-p", f"{LR}=log:1e-4..1e-2"),
                          "holds out no validation data", "data.validation=")


def test_other_refusals(cli, recipe):
    assert_one_line_error(cli("tune", str(recipe), "-p", "name=choice:a,b"), "names each trial's run itself")
    assert_one_line_error(cli("tune", str(recipe), "-p", "seed=int:0..9", "--seeds", "0,1"), "--seeds")
    assert_one_line_error(cli("tune", str(recipe), "-p", f"{LR}=1e-4..1e-2", "--seeds", "0,x"), "--seeds 0,x")
    assert_one_line_error(cli("tune", str(recipe), "-p", f"{LR}=grid:0.1,0.2", "--trials", "3"),
                          "the grid has 2 combinations")
    assert_one_line_error(cli("tune", str(recipe), "-p", f"{LR}=1e-4..1e-2", "--study", "a/b"), "--study")
    result = cli("tune", str(recipe), "-p", f"{LR}=1e-4..1e-2", "--storage", "postgresql://me:secret@nowhere/db")
    message = assert_one_line_error(result, "--storage postgresql://me:***@nowhere/db", "Optuna cannot open it")
    assert "secret" not in message


# --------------------------------------------------------------------------- the search, with a fake trainer


def fake_trainer(monkeypatch, score, calls: list | None = None):
    """Replace training by a function of the recipe: ``score(recipe, epoch)`` is the epoch's validation
    accuracy (None: a NaN loss). The test accuracy is the opposite, so choosing on it would pick the worst."""
    from layerwise.recipe import dump_recipe
    from layerwise.runs import MetricsLog

    def train_recipe(recipe, runs_root, data_root=None, show_progress=True, quiet=False, callbacks=()):
        if calls is not None:
            calls.append(recipe)
        run = Path(runs_root) / f"{recipe.name}-fake"
        run.mkdir(parents=True)
        (run / "recipe.yaml").write_text(dump_recipe(recipe))
        log = MetricsLog(run / "metrics.jsonl")
        for epoch in range(1, recipe.train.epochs + 1):
            value = score(recipe, epoch)
            if value is None:
                raise NonFiniteError(f"block 'hsic1': the loss is NaN at epoch {epoch}")
            record = {"epoch": epoch, "train_acc": value, "global_loss": 1.0, "blocks": {}, "val_acc": value,
                      "test_acc": 1 - value, "test_loss": 1.0, "train_seconds": 0.1}
            log.append(record)
            for callback in callbacks:
                callback(run, record)
        return run

    monkeypatch.setattr("layerwise.train_run.train_recipe", train_recipe)


def test_the_search_chooses_on_validation_accuracy(recipe, tmp_path, monkeypatch):
    fake_trainer(monkeypatch, lambda r, epoch: r.optim.local.lr * 5)
    result = run_search(recipe, {LR: "grid:0.001,0.01,0.1"}, runs_dir=tmp_path / "runs", quiet=True)
    assert [row["state"] for row in result.trials] == ["complete"] * 3
    assert result.best["params"] == {LR: 0.1} and result.best["value"] == pytest.approx(0.5)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny-t0-fake", "tiny-t1-fake", "tiny-t2-fake"]
    assert result.to_json()["best_command"] == f"layerwise train {recipe} {LR}=0.1"


def test_seeds_repeat_each_configuration_and_average(recipe, tmp_path, monkeypatch):
    calls: list = []
    fake_trainer(monkeypatch, lambda r, epoch: 0.5 + 0.1 * r.seed, calls)
    result = run_search(recipe, [f"{LR}=log:1e-4..1e-2"], trials=2, seeds="0,2", runs_dir=tmp_path / "runs",
                        quiet=True)
    assert [(r.name, r.seed) for r in calls] == [("tiny-t0-s0", 0), ("tiny-t0-s2", 2), ("tiny-t1-s0", 0),
                                                 ("tiny-t1-s2", 2)]
    for row in result.trials:
        assert row["seeds"] == [0, 2] and row["values"] == pytest.approx([0.5, 0.7])
        assert row["value"] == pytest.approx(0.6) and len(row["runs"]) == 2


def test_a_diverging_trial_fails_counts_and_the_search_goes_on(recipe, tmp_path, monkeypatch):
    fake_trainer(monkeypatch, lambda r, epoch: None if r.optim.local.lr > 0.05 else 0.5)
    result = run_search(recipe, {LR: "grid:0.001,0.1,0.01"}, runs_dir=tmp_path / "runs", quiet=True)
    states = {row["params"][LR]: row["state"] for row in result.trials}
    assert states == {0.001: "complete", 0.01: "complete", 0.1: "failed"}
    failed = next(row for row in result.trials if row["state"] == "failed")
    assert failed["finished"] and "NaN" in failed["error"]


def test_pruning_stops_poor_trials_on_validation_accuracy(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "tiny.yaml", epochs=4)
    fake_trainer(monkeypatch, lambda r, epoch: r.optim.local.lr * 10 + 0.01 * epoch)
    result = run_search(recipe, [f"{LR}=0.001..0.09"], trials=12, runs_dir=tmp_path / "runs", quiet=True)
    pruned = [row for row in result.trials if row["state"] == "pruned"]
    assert pruned, [row["value"] for row in result.trials]
    for row in pruned:
        epochs = len((Path(row["runs"][0]) / "metrics.jsonl").read_text().splitlines())
        assert epochs == row["pruned_at"] < 4
    unpruned = run_search(recipe, [f"{LR}=0.001..0.09"], trials=12, pruning=False, runs_dir=tmp_path / "all",
                          quiet=True)
    assert {row["state"] for row in unpruned.trials} == {"complete"}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_owner_is_gone():
    assert not owner_is_gone(owner())
    assert owner_is_gone({**owner(), "pid": dead_pid()})
    assert not owner_is_gone({**owner(), "pid": dead_pid(), "host": "another-machine"})
    if owner()["started"] is not None:  # a pid reused by another process
        assert owner_is_gone({**owner(), "started": owner()["started"] + 1})
    assert not owner_is_gone(None)


def test_a_shared_study_continues_retries_orphans_and_refuses_other_settings(recipe, tmp_path, monkeypatch):
    fake_trainer(monkeypatch, lambda r, epoch: r.optim.local.lr)
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    space = [f"{LR}=log:1e-4..1e-2"]
    run_search(recipe, space, trials=1, storage=url, runs_dir=tmp_path / "runs", quiet=True)
    # A trial left running by a process of this host that has died.
    study = optuna.load_study(study_name="tiny", storage=url)
    orphan = study.ask()
    orphan.suggest_float(LR, 1e-4, 1e-2, log=True)
    orphan.set_user_attr("owner", {**owner(), "pid": dead_pid()})
    orphan.set_user_attr("runs", [str(tmp_path / "gone")])  # a run folder the retry cannot continue
    # A trial running in a live process (this one): not touched, and counted as under way.
    alive = study.ask()
    alive.suggest_float(LR, 1e-4, 1e-2, log=True)
    alive.set_user_attr("owner", owner())

    result = run_search(recipe, space, trials=3, storage=url, runs_dir=tmp_path / "runs", quiet=True)
    rows = {row["number"]: row for row in result.trials}
    assert rows[orphan.number]["state"] == "interrupted"
    retry = rows[rows[orphan.number]["retried_as"]]
    assert retry["retry_of"] == orphan.number and retry["params"] == orphan.params and retry["state"] == "complete"
    assert retry["runs"] == [str(tmp_path / "runs" / f"tiny-t{retry['number']}-fake")], "trained afresh"
    assert rows[alive.number]["state"] == "running"
    assert sum(row["finished"] for row in result.trials) == 2, "the live trial is left to finish the search"

    with pytest.raises(LayerwiseError, match="other --param spaces"):
        run_search(recipe, [f"{LR}=log:1e-3..1e-2"], trials=3, storage=url, quiet=True)
    with pytest.raises(LayerwiseError, match=r"another recipe \(they differ at train.epochs\)"):
        run_search(recipe, space, ["train.epochs=3"], trials=3, storage=url, quiet=True)
    with pytest.raises(LayerwiseError, match="other --seeds"):
        run_search(recipe, space, trials=3, seeds="0,1", storage=url, quiet=True)


def test_a_trial_taken_over_by_another_process_is_dropped_here(recipe, tmp_path, monkeypatch):
    """A process silent for longer than the heartbeat's grace period (suspended, say) finds its trial
    failed and queued again by another: it drops its result, and the retry runs the configuration."""
    from layerwise.tune import retry_trial

    url = f"sqlite:///{tmp_path / 'tune.db'}"

    def score(recipe, epoch):
        if recipe.name == "tiny-t0" and epoch == 1:  # another process's heartbeat check, meanwhile
            study = optuna.load_study(study_name="tiny", storage=url)
            (trial,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
            retry_trial(study, trial)
        return 0.5

    fake_trainer(monkeypatch, score)
    result = run_search(recipe, [f"{LR}=log:1e-4..1e-2"], trials=2, storage=url, runs_dir=tmp_path / "runs",
                        quiet=True)
    states = [(row["state"], row["retry_of"]) for row in result.trials]
    assert states == [("interrupted", None), ("complete", 0), ("complete", None)]
    assert result.trials[1]["params"] == result.trials[0]["params"]


# --------------------------------------------------------------------------- real MNIST


@pytest.mark.integration
def test_a_three_trial_search(cli, recipe, tmp_path, mnist_available):
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    args = ["tune", str(recipe), "-p", f"{LR}=log:1e-4..1e-2", "-p", f"{SIGMA}=choice:2,5,10", "--trials", "3",
            "--storage", url, "--runs-dir", str(tmp_path / "runs")]
    result = cli(*args)
    assert result.code == 0, result.err
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert [name.split("-")[1] for name in folders] == ["t0", "t1", "t2"]
    for folder in folders:
        records = [json.loads(line) for line in (tmp_path / "runs" / folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2] and all("val_acc" in r for r in records)
    assert "Study tiny: 3 of 3 trials finished" in result.out
    assert "val acc" in result.out and "sigma" in result.out and "Best: trial" in result.out
    assert "test acc" not in result.out
    assert "Train its configuration with: layerwise train" in " ".join(result.out.split())

    again = cli(*args, "--json")  # a finished study: nothing trains, the table comes back as JSON
    assert again.code == 0, again.err
    report = json.loads(again.out)
    assert report["finished"] == 3 and len(report["trials"]) == 3
    assert len([p for p in (tmp_path / "runs").iterdir() if not p.is_symlink()]) == 3
    best = max((row for row in report["trials"]), key=lambda row: row["value"])
    assert report["best"] == best["number"]


@pytest.mark.integration
def test_a_search_resumes_after_sigkill(tmp_path, tmp_path_factory, mnist_available):
    """Killed during trial 2's second epoch, the same command again fails that trial, queues it again
    (continuing its run folder), and ends with exactly 3 finished trials."""
    # Long enough epochs (120 batches, about 0.4 s) that the kill lands in epoch 2.
    recipe = write_recipe(tmp_path / "tiny.yaml", train_limit=2048, batch_size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO),
           "LAYERWISE_DATA": str(tmp_path_factory.getbasetemp() / "data-cache")}
    url = "sqlite:///tune.db"
    args = ["tune", str(recipe), "-p", f"{LR}=log:1e-4..1e-2", "--trials", "3", "--storage", url,
            "--runs-dir", "runs"]
    victim = start_layerwise(*args, env=env, cwd=tmp_path)
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    deadline = time.monotonic() + 90

    def running_until(done) -> None:
        while not done():
            assert victim.poll() is None, victim.communicate()
            assert time.monotonic() < deadline, "the search was too slow"
            time.sleep(0.005)

    running_until(lambda: list((tmp_path / "runs").glob("tiny-t0-*/metrics.jsonl")))
    study = optuna.load_study(study_name="tiny", storage=storage)  # slow to open: opened during trial 1
    # Trial 2 saved its first epoch, and its epoch callback recorded the run folder.
    running_until(lambda: len(trials := study.get_trials(deepcopy=False)) > 1 and "runs" in trials[1].user_attrs)
    victim.send_signal(signal.SIGKILL)  # in epoch 2
    victim.wait()

    study = optuna.load_study(study_name="tiny", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"], "the kill must land in trial 2"

    code, out, err = finish(start_layerwise(*args, env=env, cwd=tmp_path))
    assert code == 0, err
    assert "Traceback" not in err
    assert "trial 1 was left running by a process that is gone; it is queued again" in err
    study = optuna.load_study(study_name="tiny", storage=storage)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    killed = study.trials[1]
    assert killed.state.name == "FAIL"
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == 1]
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    assert retry.user_attrs["runs"] == killed.user_attrs["runs"], "the retry continues the killed run folder"
    run = tmp_path / killed.user_attrs["runs"][0]
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert len([p for p in (tmp_path / "runs").iterdir() if not p.is_symlink()]) == 3
    assert "Study tiny: 3 of 3 trials finished" in out
    assert socket.gethostname() == killed.user_attrs["owner"]["host"]
