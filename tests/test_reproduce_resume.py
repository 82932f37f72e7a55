"""How ``benchmarks/reproduce.py`` resumes a study: which jobs train again, which records the
table shows, and how processes that split a study (--only) merge their records. Training is
replaced by a stub that returns a record, so these run in a moment."""

from __future__ import annotations

import json

import pytest

from tests.test_benchmarks import load


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A fake study ``fake`` of two jobs whose settings the test may change, and the jobs trained."""
    reproduce = load("reproduce")
    settings = {"a": ["optim.local.lr=0.1"], "b": ["optim.local.lr=0.2"]}
    trained: list[tuple[str, list[str]]] = []

    def jobs(seeds, out):
        return [reproduce.Job(f"{name}/seed{seed}", "mnist_hybrid", overrides + [f"seed={seed}"],
                              {"name": name, "seed": seed}) for name, overrides in settings.items() for seed in seeds]

    def run_job(job, extra, runs_dir):
        trained.append((job.key, job.overrides + extra))
        return {**job.labels, "overrides": job.overrides + extra, "test_acc": 0.5, "wall_seconds": 60.0}

    def render(records):
        return [f"row {r['name']}{r['seed']}: {r['overrides'][0]}" for r in records.values()]

    monkeypatch.setitem(reproduce.STUDIES, "fake", jobs)
    monkeypatch.setitem(reproduce.RENDERERS, "fake", render)
    monkeypatch.setattr(reproduce, "run_job", run_job)
    monkeypatch.setattr(reproduce, "cpu_name", lambda: "test cpu")

    def main(*args):
        reproduce.main(["fake", "--seeds", "0", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"),
                        *args])
        return (json.loads((tmp_path / "out" / "fake.json").read_text())["records"],
                (tmp_path / "out" / "fake.md").read_text())

    return reproduce, settings, trained, main


def test_a_finished_job_is_skipped_and_one_whose_settings_changed_trains_again(study):
    reproduce, settings, trained, main = study
    main()
    assert [key for key, _ in trained] == ["a/seed0", "b/seed0"]
    trained.clear()
    main()
    assert trained == [], "nothing changed: nothing trains"
    settings["b"] = ["optim.local.lr=0.3"]
    records, table = main()
    assert trained == [("b/seed0", ["optim.local.lr=0.3", "seed=0", "train.device=cpu"])]
    assert records["b/seed0"]["overrides"][0] == "optim.local.lr=0.3"
    assert "row b0: optim.local.lr=0.3" in table and "lr=0.2" not in table
    trained.clear()
    main("--epochs", "2")  # the command's flags are settings too
    assert [key for key, _ in trained] == ["a/seed0", "b/seed0"]


def test_the_table_shows_current_records_only_and_their_wall_time(study):
    reproduce, settings, trained, main = study
    main()
    settings["b"] = ["optim.local.lr=0.3"]
    del settings["a"]  # a job the study no longer has
    records, table = main("--only", "b")
    assert set(records) == {"a/seed0", "b/seed0"}, "the JSON keeps every record"
    assert "row a0" not in table, "a record no job makes is not shown"
    assert "Wall time of all jobs: 1.0 min" in table, "the shown records' time only"
    assert "Not shown, stale or no longer in the study (the JSON keeps them): a/seed0." in table


def test_a_record_another_process_merged_meanwhile_is_kept(study, tmp_path):
    reproduce, settings, trained, main = study
    stub = reproduce.run_job

    def run_job(job, extra, runs_dir):  # another process (--only b) finishes while this one trains a
        if job.key == "a/seed0":
            path = tmp_path / "out" / "fake.json"
            state = json.loads(path.read_text()) if path.exists() else {"records": {}}
            state["records"]["b/seed0"] = {"name": "b", "seed": 0, "overrides": ["optim.local.lr=0.2", "seed=0",
                                                                                  "train.device=cpu"],
                                           "test_acc": 0.9, "wall_seconds": 1.0}
            (tmp_path / "out").mkdir(exist_ok=True)
            path.write_text(json.dumps({**state, "command": "x", "machine": {}}))
        return stub(job, extra, runs_dir)

    reproduce.run_job = run_job
    records, _ = main("--only", "a")
    assert records["b/seed0"]["test_acc"] == 0.9 and records["a/seed0"]["test_acc"] == 0.5


def test_chosen_waits_for_every_candidate_with_its_current_settings(study, tmp_path):
    reproduce, settings, trained, main = study
    out = tmp_path / "out"
    records, _ = main()
    for key, acc in (("a/seed0", 0.7), ("b/seed0", 0.8)):
        records[key]["val_acc"], records[key]["dataset"], records[key]["method"] = acc, "d", "m"
    (out / "fake.json").write_text(json.dumps({"records": records}))

    def jobs(seeds, out):  # the same jobs, labelled as one (dataset, method)'s candidates
        return [reproduce.Job(f"{name}/seed0", "mnist_hybrid", overrides + ["seed=0"],
                              {"dataset": "d", "method": "m"}) for name, overrides in settings.items()]

    reproduce.STUDIES["fake"] = jobs
    assert reproduce.chosen(out, "fake", "d", "m")["val_acc"] == 0.8
    settings["a"] = ["optim.local.lr=0.5"]  # a candidate changed and has not trained again yet
    assert reproduce.chosen(out, "fake", "d", "m") is None
    assert reproduce.chosen(out, "fake", "d", "other") is None, "no candidate: nothing chosen"


def test_a_tiny_run_never_writes_among_the_measured_results(study, tmp_path, monkeypatch):
    reproduce, settings, trained, main = study
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "measured")
    reproduce.main(["fake", "--tiny", "--seeds", "0", "--runs-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "measured").exists()
    assert json.loads((tmp_path / "runs" / "tiny-results" / "fake.json").read_text())["records"]
    assert trained[0][1][-3:] == ["train.device=cpu", "train.epochs=1", "data.train_limit=1000"]


def write_select(out, name: str, records: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"records": records}))


def test_a_candidate_that_sets_its_epochs_keeps_them_in_selection_and_test_runs(tmp_path):
    """MNIST's HSIC-only network has 20-epoch candidates: neither the select study's 5 epochs nor the
    test runs' 15 may override them; the other candidates keep the study's lengths."""
    reproduce = load("reproduce")
    select = {job.key: job for job in reproduce.phsic_select_jobs([0], tmp_path)}
    longer = select["mnist/hsic/gaussian, 32 groups, augment, 20 epochs"]
    assert [o for o in longer.overrides if o.startswith("train.epochs=")] == ["train.epochs=20"]
    assert "data.augment.crop_padding=2" in longer.overrides
    assert "train.epochs=5" in select["mnist/hsic/gaussian, 32 groups"].overrides
    assert not any(key.startswith("fashion_mnist/hsic/") and "20 epochs" in key for key in select)
    # every MNIST HSIC-only candidate has a record; the 20-epoch one has the best validation accuracy
    records = {job.key: {**job.labels, "overrides": job.overrides + ["train.device=cpu"],
                         "val_acc": 0.99 if job is longer else 0.9}
               for job in select.values() if job.key.startswith("mnist/hsic/")}
    write_select(tmp_path, "phsic-select", records)
    jobs = {job.key: job for job in reproduce.phsic_jobs([0, 1, 2], tmp_path)}
    tests = [job for key, job in jobs.items() if key.startswith("mnist/hsic/")]
    assert [job.key for job in tests] == ["mnist/hsic/seed0", "mnist/hsic/seed1", "mnist/hsic/seed2"]
    for job in tests:
        assert [o for o in job.overrides if o.startswith("train.epochs=")] == ["train.epochs=20"]
    # the backprop twin is also trained as the winner was (augmentation, 20 epochs), in a row of its own
    twin = jobs[f"mnist/{reproduce.PHSIC_TWIN}/seed0"]
    assert twin.recipe == "phsic_mnist_backprop" and not any(o.startswith("model.") for o in twin.overrides)
    assert "train.epochs=20" in twin.overrides and "data.augment.crop_padding=2" in twin.overrides
    assert "train.epochs=15" in jobs["mnist/backprop/seed0"].overrides


def test_the_backprop_twin_takes_the_chosen_schedule_but_no_nhsic_option(tmp_path):
    reproduce = load("reproduce")
    select = [job for job in reproduce.hybrid_select_jobs([0], tmp_path) if job.labels["dataset"] == "fashion_mnist"]
    grouped = next(job for job in select if job.labels["candidate"] == "50 epochs, cosine, 16 groups")
    write_select(tmp_path, "hybrid-select", {
        job.key: {**job.labels, "overrides": job.overrides, "val_acc": 0.9 if job is grouped else 0.8}
        for job in select})
    jobs = {job.key: job for job in reproduce.hybrid_jobs([0], tmp_path)}
    hybrid, twin = jobs["fashion_mnist/hybrid/seed0"], jobs["fashion_mnist/backprop/seed0"]
    assert sum(o.endswith(".objective.groups=16") for o in hybrid.overrides) == 2
    assert "train.epochs=50" in twin.overrides and "optim.schedule.name=cosine" in twin.overrides
    assert not any(o.startswith("model.") for o in twin.overrides)


def test_a_current_record_takes_the_jobs_current_labels_without_training(study, tmp_path):
    reproduce, settings, trained, main = study
    main()
    path = tmp_path / "out" / "fake.json"
    state = json.loads(path.read_text())
    state["records"]["a/seed0"]["name"] = "old wording"
    path.write_text(json.dumps(state))
    trained.clear()
    records, table = main()
    assert trained == [] and records["a/seed0"]["name"] == "a" and "row a0" in table
