"""The epoch table: its columns come from the metrics the objectives report."""

from __future__ import annotations

from rich.console import Console

from layerwise.progress import epoch_table, metric_keys


def record(epoch, blocks):
    return {"epoch": epoch, "train_acc": 0.9, "test_acc": 0.95, "global_loss": 0.3, "blocks": blocks}


def test_each_metric_any_objective_reports_gets_a_column():
    history = [
        record(1, {"hsic1": {"loss": -1.0, "hsic_zx": 0.2, "hsic_zy": 0.3}, "ce1": {"loss": 0.5, "acc": 0.8}}),
        record(2, {"sim1": {"loss": 0.04, "sim": 0.04}}),
    ]
    assert metric_keys(history) == ["loss", "hsic_zx", "hsic_zy", "acc", "sim"]
    console = Console(width=200, record=True)
    console.print(epoch_table(history))
    text = console.export_text()
    for title in ("local loss", "nHSIC (Z,X)", "nHSIC (Z,Y)", "local acc", "sim"):
        assert title in text
    assert "80.00%" in text and "0.04" in text  # an accuracy as a percentage, like train and test acc


def test_the_table_fits_an_80_column_pipe_without_cutting_titles():
    history = [record(epoch, {"hsic1": {"loss": -728.1, "hsic_zx": 55.6, "hsic_zy": 7.837},
                              "hsic2": {"loss": -767.9, "hsic_zx": 28.38, "hsic_zy": 7.963}}) for epoch in (1, 10)]
    console = Console(width=80, record=True)
    console.print(epoch_table(history))
    text = console.export_text()
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "-728.1" in text and "7.963" in text


def test_a_network_without_local_blocks_still_has_a_table():
    console = Console(width=200, record=True)
    console.print(epoch_table([record(1, {})]))
    assert "95.00%" in console.export_text()
