"""Learning-rate schedules (``optim.schedule``): the multipliers, their validation, the trainer's
lrs from epoch to epoch, and a resume that stays bit-identical with a schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import layerwise.train_run
from layerwise.checkpoint import WEIGHTS_FILE
from layerwise.errors import CheckpointError, RecipeError
from layerwise.factory import build_model, parse_recipe
from layerwise.resume import STATE_FILE, load_state, restore_state, save_state
from layerwise.runs import read_metrics
from layerwise.schedule import ScheduleConfig, lr_factor
from layerwise.trainer import Trainer
from tests.helpers import assert_same_tensors, resign, tiny_recipe

# --------------------------------------------------------------------------- the multipliers


def factors(epochs: int | None, count: int, lr: float = 1e-3, **schedule) -> list[float]:
    """The multiplier of each of the first ``count`` epochs (the epoch after 0, 1, ... done)."""
    config = ScheduleConfig(**schedule)
    return [lr_factor(config, done, epochs, lr) for done in range(count)]


def test_constant_is_one_and_warm_up_rises_linearly_to_it():
    assert factors(None, 4) == [1.0, 1.0, 1.0, 1.0]
    assert factors(None, 6, warmup_epochs=3) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_step_decays_by_gamma_every_step_size_epochs_after_the_warm_up():
    assert factors(None, 6, name="step", step_size=2, gamma=0.5) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert factors(None, 7, name="step", step_size=2, gamma=0.5, warmup_epochs=1) == [
        0.5, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert factors(None, 3, name="step", step_size=1, gamma=1.0) == [1.0, 1.0, 1.0]


def test_cosine_falls_from_the_lr_to_zero_over_the_epochs_after_the_warm_up():
    # 4 cosine epochs at progress 0, 1/4, 1/2, 3/4; min_lr 0 is reached after the last one and kept.
    values = factors(5, 8, name="cosine", warmup_epochs=1)
    assert values[:2] == [0.5, 1.0]
    assert values[3] == 0.5 and values[5:] == [0.0, 0.0, 0.0]
    assert values[2] == 1.0 - (1.0 - math.cos(math.pi / 4)) / 2.0 == pytest.approx(0.8535533905932737)
    assert values[4] == pytest.approx(0.1464466094067262)


def test_cosine_ends_at_min_lr_relative_to_each_lr():
    # The factor is relative to the optimizer's own lr, so both end at min_lr itself.
    for lr in (1e-3, 4e-3):
        values = factors(2, 4, lr=lr, name="cosine", min_lr=1e-4)
        assert values[0] == 1.0
        assert values[1] * lr == pytest.approx((1e-4 + lr) / 2, rel=1e-12)
        assert values[2] * lr == values[3] * lr == pytest.approx(1e-4, rel=1e-12)


def test_cosine_inside_its_warm_up_only_warms_up():
    assert factors(2, 3, name="cosine", warmup_epochs=3) == [0.25, 0.5, 0.75]


# --------------------------------------------------------------------------- recipes


def recipe_data(epochs: int = 3, train_limit: int | None = None, **schedule) -> dict:
    data = tiny_recipe() if train_limit is None else tiny_recipe(train_limit=train_limit)
    data["train"]["epochs"] = epochs
    if schedule:
        data["optim"] = {"schedule": schedule}
    return data


def problems_of(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, "r.yaml")
    return info.value.problems


def test_the_default_is_constant_without_warm_up():
    recipe = parse_recipe(tiny_recipe(), "tiny")
    assert recipe.optim.schedule == ScheduleConfig() and recipe.optim.schedule.is_constant
    assert recipe.to_dict()["optim"]["schedule"] == {"name": "constant", "warmup_epochs": 0, "step_size": 10,
                                                     "gamma": 0.1, "min_lr": 0.0}


def test_a_schedule_is_read_from_yaml_and_overrides():
    data = yaml.safe_load("optim: {schedule: {name: step, step_size: 3, gamma: 0.5}}")
    recipe = parse_recipe({**tiny_recipe(), **data}, "r.yaml", ["optim.schedule.warmup_epochs=2"])
    assert recipe.optim.schedule == ScheduleConfig(name="step", warmup_epochs=2, step_size=3, gamma=0.5)


def test_every_bad_value_is_named_with_its_key_path():
    assert problems_of(recipe_data(name="linear", warmup_epochs=-1, step_size=0, gamma=0, min_lr=-1e-3, warmup=2)) == [
        "optim.schedule.warmup: unknown key (did you mean 'warmup_epochs'?); allowed: name, warmup_epochs, "
        "step_size, gamma, min_lr",
        "optim.schedule.name: expected one of 'constant', 'step', 'cosine', found 'linear' (str)",
        "optim.schedule.warmup_epochs: expected a value >= 0, found -1",
        "optim.schedule.step_size: expected a value > 0, found 0",
        "optim.schedule.gamma: expected a value in (0, 1], found 0.0",
        "optim.schedule.min_lr: expected a value >= 0, found -0.001",
    ]
    assert problems_of(recipe_data(name="step", gamma=1.5)) == [
        "optim.schedule.gamma: expected a value in (0, 1], found 1.5"]
    assert problems_of(recipe_data(warmup_epochs=1.5)) == [
        "optim.schedule.warmup_epochs: expected an integer, found 1.5 (float)"]


def test_min_lr_above_a_learning_rate_is_refused_for_cosine():
    data = recipe_data(name="cosine", min_lr=2e-3)
    data["optim"]["local"] = {"lr": 1e-2}
    assert problems_of(data) == ["optim.schedule.min_lr: expected a value at most the learning rates it decays, "
                                 "found 0.002, above optim.global.lr = 0.001"]
    data["optim"]["local"] = {"lr": 1e-3}
    assert "above optim.local.lr = 0.001 and optim.global.lr = 0.001" in problems_of(data)[0]
    data["optim"]["schedule"]["min_lr"] = 1e-3  # equal: allowed (the lr then stays)
    parse_recipe(data, "r.yaml")


# --------------------------------------------------------------------------- the trainer


def batches(epoch: int, count: int = 2, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same random batches for an epoch number, every time."""
    g = torch.Generator().manual_seed(epoch)
    return [(torch.rand(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(count)]


def recipe_trainer(data: dict):
    recipe = parse_recipe(data, "tiny")
    graph = build_model(recipe)
    return recipe, graph, Trainer.from_recipe(graph, recipe)


def test_the_trainer_steps_each_optimizer_once_per_epoch_and_logs_the_lr():
    data = recipe_data(epochs=4, name="step", step_size=1, gamma=0.5, warmup_epochs=1)
    data["optim"]["local"] = {"lr": 4e-3}
    _, _, trainer = recipe_trainer(data)
    assert list(trainer.schedulers()) == list(trainer.optimizers()) == ["local.hsic1", "global"]
    logged = [trainer.train_epoch(batches(epoch), epoch=epoch)["lr"] for epoch in range(1, 5)]
    assert logged == [{"local": 4e-3 * f, "global": 1e-3 * f} for f in (0.5, 1.0, 0.5, 0.25)]
    assert trainer.learning_rates() == {"local": 4e-3 * 0.125, "global": 1e-3 * 0.125}


def test_a_constant_schedule_makes_no_scheduler_and_logs_nothing_new():
    _, _, trainer = recipe_trainer(recipe_data())
    assert trainer.schedulers() == {}
    assert "lr" not in trainer.train_epoch(batches(1), epoch=1)
    assert all("initial_lr" not in group for opt in trainer.optimizers().values() for group in opt.param_groups)


def test_the_python_trainer_takes_a_schedule_and_the_epochs():
    graph = build_model(parse_recipe(tiny_recipe(), "tiny"))
    trainer = Trainer(graph, {"lr": 1e-2}, {"lr": 1e-3}, schedule={"name": "cosine", "min_lr": 1e-4}, epochs=2)
    trainer.train_epoch(batches(1))
    assert trainer.learning_rates()["global"] == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)
    with pytest.raises(RecipeError) as info:
        Trainer(graph, {"lr": 1e-3}, schedule={"name": "cosine", "gamma": 0, "min_lr": 1e-2}, epochs=0)
    assert info.value.problems == ["schedule.gamma: expected a value in (0, 1], found 0.0",
                                   "epochs: expected a number of epochs >= 1, found 0"]
    with pytest.raises(RecipeError, match="epochs: the cosine schedule needs the number of epochs it spans"):
        Trainer(graph, schedule={"name": "cosine"})
    with pytest.raises(RecipeError, match=r"schedule\.min_lr: .* above local_optim\.lr = 0\.001 and global_optim"):
        Trainer(graph, schedule={"name": "cosine", "min_lr": 1e-2}, epochs=3)


# --------------------------------------------------------------------------- resume


def record_of(epoch: int, summary: dict) -> dict:
    return {"epoch": epoch, **summary, "test_acc": 0.0, "test_loss": 0.0, "train_seconds": 0.1}


def test_a_resumed_trainer_trains_each_epoch_at_the_same_lr_bit_for_bit(tmp_path):
    data = recipe_data(epochs=3, name="cosine", warmup_epochs=1, min_lr=1e-5)
    _, straight, trainer = recipe_trainer(data)
    straight_lrs = [trainer.train_epoch(batches(epoch), epoch=epoch)["lr"] for epoch in (1, 2, 3)]

    recipe, first, trainer = recipe_trainer(data)
    summary = trainer.train_epoch(batches(1), epoch=1)
    save_state(tmp_path / STATE_FILE, first, trainer.optimizers(), recipe, 1, record_of(1, summary))
    _, resumed, trainer = recipe_trainer(data)  # a fresh process: schedulers at epoch 1's lrs
    restore_state(load_state(tmp_path / STATE_FILE), resumed, trainer.optimizers(), 0, trainer.schedulers())
    resumed_lrs = [summary["lr"]] + [trainer.train_epoch(batches(epoch), epoch=epoch)["lr"] for epoch in (2, 3)]

    assert resumed_lrs == straight_lrs and straight_lrs[0]["global"] == 5e-4
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert all(scheduler.last_epoch == 3 for scheduler in trainer.schedulers().values())


def test_a_state_whose_lrs_are_not_the_schedules_is_refused_before_anything_changes(tmp_path):
    data = recipe_data(epochs=3, name="step", step_size=1, gamma=0.5)
    recipe, graph, trainer = recipe_trainer(data)
    summary = trainer.train_epoch(batches(1), epoch=1)
    path = tmp_path / STATE_FILE
    save_state(path, graph, trainer.optimizers(), recipe, 1, record_of(1, summary))
    optimizers = load_state(path).optimizers
    assert optimizers[1]["param_groups"][0]["lr"] == 5e-4
    optimizers[1]["param_groups"][0]["lr"] = 1e-3
    resign(path, metadata={"optimizers": json.dumps(optimizers)})

    _, fresh, trainer = recipe_trainer(data)
    before = {name: t.clone() for name, t in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"optimizer 'global' param_groups\[0\]\.lr: expected 0\.0005, the "
                                              r"schedule's lr after epoch 1, found 0\.001"):
        restore_state(load_state(path), fresh, trainer.optimizers(), 0, trainer.schedulers())
    assert all(torch.equal(before[name], t) for name, t in fresh.state_dict().items())
    assert trainer.learning_rates() == {"local": 1e-3, "global": 1e-3}


@pytest.mark.integration
def test_a_run_resumed_after_epoch_1_ends_bit_identical_to_an_uninterrupted_one(cli, mnist_available, tmp_path,
                                                                                monkeypatch):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data(epochs=3, train_limit=512, name="cosine", warmup_epochs=1)))
    straight = cli("train", str(recipe), "--runs-dir", str(tmp_path / "straight"), "--no-progress")
    assert straight.code == 0, straight.err

    real = layerwise.train_run.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        if args[3] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(layerwise.train_run, "save_checkpoint", save_then_stop)
        stopped = cli("train", str(recipe), "--runs-dir", str(tmp_path / "resumed"), "--no-progress")
    assert stopped.code == 130, stopped.err
    (run,) = [p for p in (tmp_path / "resumed").iterdir() if p.is_dir() and not p.is_symlink()]
    assert load_state(run / STATE_FILE).epoch == 1
    resumed = cli("train", "--resume", str(run), "--no-progress")
    assert resumed.code == 0, resumed.err

    (reference,) = [p for p in (tmp_path / "straight").iterdir() if p.is_dir() and not p.is_symlink()]
    assert_same_tensors(run / WEIGHTS_FILE, reference / WEIGHTS_FILE)
    assert_same_tensors(run / STATE_FILE, reference / STATE_FILE)
    lrs = [record["lr"] for record in read_metrics(run / "metrics.jsonl")]
    assert lrs == [record["lr"] for record in read_metrics(reference / "metrics.jsonl")]
    assert lrs == [{"local": 5e-4, "global": 5e-4}, {"local": 1e-3, "global": 1e-3},
                   {"local": 5e-4, "global": 5e-4}]
