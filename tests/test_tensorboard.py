"""`layerwise train --tensorboard` / `train.tensorboard: true`: event files under RUN/tb/, read back."""

from __future__ import annotations

import json

import pytest
import yaml

from layerwise import data as data_module
from layerwise.errors import LayerwiseError
from layerwise.factory import parse_recipe
from layerwise.tensorboard_log import (
    TB_FOLDER,
    TensorBoardLogger,
    flatten,
    hyperparameters,
    require_tensorboard,
    scalars,
    tensorboard_callbacks,
)
from tests.helpers import assert_one_line_error, block_imports, tiny_recipe

RECORD = {"epoch": 3, "train_acc": 0.5, "global_loss": 1.25, "blocks": {"hsic1": {"loss": -40.5, "hsic_zx": 3.5,
          "hsic_zy": 0.4375}}, "test_acc": 0.625, "test_loss": 1.0, "train_seconds": 2.5, "val_acc": 0.75}


def event_accumulator(folder):
    """The run's event files, loaded (every scalar kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def logged_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag with its (step, value) points."""
    accumulator = event_accumulator(folder)
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def logged_hparams(folder) -> dict:
    """The hyper-parameters the HPARAMS tab would show for the run."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = event_accumulator(folder).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in values.items()}


def expected_scalars(record: dict) -> dict[str, float]:
    tags = {"train_acc": "accuracy/train", "test_acc": "accuracy/test", "val_acc": "accuracy/val",
            "global_loss": "loss/train", "test_loss": "loss/test", "train_seconds": "time/train_seconds"}
    values = {tag: record[key] for key, tag in tags.items() if key in record}
    for block, metrics in record["blocks"].items():
        values.update({f"blocks/{block}/{metric}": value for metric, value in metrics.items()})
    return values


def test_record_fields_become_tags_and_block_metrics_are_nested():
    assert scalars(RECORD) == expected_scalars(RECORD)
    assert scalars({"epoch": 1, "skipped_batches": 2, "new_metric": 0.5, "flag": True, "note": "x"}) == {
        "train/skipped_batches": 2.0, "new_metric": 0.5}
    # a learning-rate schedule logs each epoch's rates
    assert scalars({"epoch": 3, "lr": {"local": 5e-4, "global": 1e-3}}) == {"lr/local": 5e-4, "lr/global": 1e-3}


def test_the_recipe_flattens_to_override_paths_with_scalar_values():
    recipe = parse_recipe(tiny_recipe(train_limit=64), "tiny")
    flat = flatten(recipe.to_dict())
    assert flat["model.subnetworks.sn1.blocks.hsic1.objective.beta"] == 100
    assert flat["model.subnetworks.sn2.blocks.head.objective"] == "none"
    assert flatten({"inputs": ["a", "b"], "items": [[1], {"k": 2}]}) == {"inputs": "a, b", "items.0": "1",
                                                                         "items.1.k": 2}
    params = hyperparameters(recipe)
    assert params["data.train_limit"] == 64 and params["train.tensorboard"] == "false"
    assert "model.subnetworks.sn1.blocks.hsic1.inputs" not in params  # None: left out
    assert all(isinstance(value, (int, float, str)) for value in params.values())


def test_the_logger_writes_scalars_hyperparameters_and_the_recipe(tmp_path):
    recipe = parse_recipe(tiny_recipe(validation=100), "tiny")
    logger = TensorBoardLogger(recipe)
    second = {**RECORD, "epoch": 4, "test_acc": 0.875}
    logger(tmp_path, RECORD)
    logger(tmp_path, second)
    logger.close()
    logged = logged_scalars(tmp_path / TB_FOLDER)
    for tag, value in expected_scalars(RECORD).items():
        assert logged[tag][0] == (3, pytest.approx(value)), tag
    assert logged["accuracy/test"] == [(3, 0.625), (4, 0.875)]
    params = logged_hparams(tmp_path / TB_FOLDER)
    assert params["model.subnetworks.sn1.blocks.hsic1.objective.beta"] == 100
    assert params["data.validation"] == 100 and params["name"] == "tiny"
    assert "recipe/text_summary" in event_accumulator(tmp_path / TB_FOLDER).Tags()["tensors"]


def test_no_logger_unless_the_recipe_asks():
    with tensorboard_callbacks(parse_recipe(tiny_recipe(), "tiny")) as loggers:
        assert loggers == []
    data = tiny_recipe()
    data["train"]["tensorboard"] = True
    with tensorboard_callbacks(parse_recipe(data, "tiny")) as loggers:
        assert [type(logger) for logger in loggers] == [TensorBoardLogger]


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Imports of TensorBoard fail, as where the extra is not installed."""
    block_imports(monkeypatch, "tensorboard", "torch.utils.tensorboard")


def test_a_missing_extra_is_one_line_before_any_folder_or_data(no_tensorboard, cli, tmp_path, monkeypatch):
    with pytest.raises(LayerwiseError, match=r"pip install 'layerwise\[tensorboard\]'"):
        require_tensorboard()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    runs = tmp_path / "runs"
    # No data anywhere: had the data been looked for first, the error would name a missing dataset.
    monkeypatch.setattr(data_module, "MIRROR_DIRS", [])
    for extra in (["--tensorboard"], ["train.tensorboard=true"]):
        result = cli("train", str(recipe), *extra, "--runs-dir", str(runs), "--data-root", str(tmp_path / "none"))
        assert_one_line_error(result, "--tensorboard needs TensorBoard: pip install 'layerwise[tensorboard]'")
        assert len(result.err.strip().splitlines()) == 1
        assert not runs.exists()


def test_resume_refuses_the_flag(cli, tmp_path):
    result = cli("train", "--resume", str(tmp_path), "--tensorboard")
    assert_one_line_error(result, "--resume takes no --tensorboard", "train.tensorboard: true")


@pytest.mark.integration
def test_training_with_the_flag_logs_what_metrics_jsonl_holds(mnist_available, cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    data = tiny_recipe(train_limit=256)
    data["train"]["epochs"] = 2
    recipe.write_text(yaml.safe_dump(data))
    result = cli("train", str(recipe), "--tensorboard", "--runs-dir", str(tmp_path / "runs"), "--no-progress")
    assert result.code == 0, result.err
    run = (tmp_path / "runs" / "latest").resolve()
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["tensorboard"] is True  # a resume keeps it
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    logged = logged_scalars(run / TB_FOLDER)
    expected = {tag: [] for tag in expected_scalars(records[0])}
    for record in records:
        for tag, value in expected_scalars(record).items():
            expected[tag].append((record["epoch"], pytest.approx(value, rel=1e-6)))  # event files hold float32
    assert {"blocks/hsic1/hsic_zx", "blocks/hsic1/hsic_zy", "blocks/hsic1/loss", "accuracy/test"} <= set(expected)
    assert logged == expected
    assert logged_hparams(run / TB_FOLDER)["train.tensorboard"] == "true"


@pytest.mark.integration
def test_a_resumed_run_keeps_logging_to_the_same_folder(mnist_available, tmp_path):
    from layerwise.train_run import resume_run, train_recipe

    data = tiny_recipe(train_limit=128)
    data["train"].update(epochs=2, tensorboard=True)

    def stop_after_the_first_epoch(run, record):
        raise LayerwiseError("stopped by the test")

    with pytest.raises(LayerwiseError, match=r"last complete epoch \(1\) is kept"):
        train_recipe(parse_recipe(data, "tiny"), tmp_path / "runs", show_progress=False, quiet=True,
                     callbacks=[stop_after_the_first_epoch])
    run = (tmp_path / "runs" / "latest").resolve()
    assert [step for step, _ in logged_scalars(run / TB_FOLDER)["accuracy/test"]] == [1]  # logged before the stop
    resume_run(run, show_progress=False, quiet=True)
    assert len(list((run / TB_FOLDER).glob("events.out.tfevents.*"))) == 2  # one per process, one run in TensorBoard
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged_scalars(run / TB_FOLDER)["accuracy/test"] == [
        (r["epoch"], pytest.approx(r["test_acc"], rel=1e-6)) for r in records]
    assert [r["epoch"] for r in records] == [1, 2]
