"""The stages chained (autoplan.pipeline) on a tiny synthetic dataset: what the commands and the demo call."""

from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import write_png_pairs

from autoplan import pipeline
from autoplan.datasets import import_dataset
from autoplan.errors import InputError
from autoplan.paths import fingerprint_file, plans_file
from autoplan.runs import TrainOptions

# the smallest training that still writes a whole run folder (metrics, report, curves)
TINY = dict(epochs=1, iterations_per_epoch=2, n_workers=0, device="cpu")


@pytest.fixture
def small(tmp_path, folders):
    """Six 32x32 grey PNGs with one square label each, imported as RAW/Small."""
    images, masks = write_png_pairs(tmp_path)
    import_dataset("Small", images, folders.raw, masks_dir=masks, label_map="255=square", quiet=True)
    return pipeline.open_dataset("Small", folders)


def test_open_dataset_reads_an_imported_dataset_and_names_the_import_command_otherwise(small, folders):
    assert small.name == "Small" and len(small.cases) == 6 and small.root == folders.raw / "Small"
    with pytest.raises(InputError, match="autoplan import Nope") as missing:
        pipeline.open_dataset("Nope", folders)
    assert missing.value.path == folders.raw / "Nope"


def test_plan_fingerprints_first_writes_plans_json_and_load_plan_reads_it_back(small, folders):
    with pytest.raises(InputError, match="autoplan plan Small"):
        pipeline.load_plan(small, folders)
    planned = pipeline.plan(small, folders, device="cpu")        # no budget: analytic, no speed probe
    assert fingerprint_file(folders.results, "Small").is_file()
    assert plans_file(folders.results, "Small").is_file()
    assert planned.dataset == "Small" and planned.device == "cpu" and planned.time_budget_minutes is None
    assert planned.default_configuration in planned.configurations
    assert pipeline.load_plan(small, folders) == planned


def test_the_fingerprint_is_cached_unless_forced(small, folders):
    first = pipeline.fingerprint(small, folders)
    path = fingerprint_file(folders.results, "Small")
    written = path.stat().st_ino
    assert pipeline.fingerprint(small, folders) == first and path.stat().st_ino == written
    assert pipeline.fingerprint(small, folders, force=True) == first
    assert path.stat().st_ino != written         # written again (atomically: a new file)


def test_sweep_grid_expands_every_combination_with_typed_values():
    grid = pipeline.sweep_grid({"loss": "ce,dice", "dropout": "0,0.2", "batch_size": "4", "norm": None})
    assert grid == [{"loss": "ce", "dropout": 0.0, "batch_size": 4}, {"loss": "ce", "dropout": 0.2, "batch_size": 4},
                    {"loss": "dice", "dropout": 0.0, "batch_size": 4}, {"loss": "dice", "dropout": 0.2, "batch_size": 4}]
    assert type(grid[0]["batch_size"]) is int and type(grid[0]["dropout"]) is float
    assert pipeline.sweep_grid({"lr": "0.01,", "loss": None}) == [{"lr": 0.01}]     # a trailing comma is no value
    assert pipeline.sweep_grid({}) == [{}]                                            # nothing swept: one run
    with pytest.raises(ValueError):
        pipeline.sweep_grid({"base_features": "sixteen"})


def test_every_sweepable_option_is_a_train_option_of_that_type():
    train_fields = {f.name: f for f in fields(TrainOptions)}
    for name, kind in pipeline.SWEEPABLE.items():
        assert name in train_fields, name
        assert kind.__name__ in str(train_fields[name].type), (name, train_fields[name].type)


def test_the_summary_lines_the_commands_print(small, tmp_path):
    assert pipeline.describe_import(small) == f"imported Small: 6 cases, labels 0=background, 1=square -> {small.root}"
    assert pipeline.describe_headline({"dice_square": 0.91234, "n": 3, "hd95": None}) == "dice_square 0.9123"
    assert pipeline.describe_prediction({"n_cases": 2}, tmp_path) == f"predicted 2 cases -> {tmp_path}"
    flagged = {"n_cases": 3, "qc": tmp_path / "qc.csv", "n_flagged": 1, "n_predicted": 3}
    assert pipeline.describe_prediction(flagged, tmp_path).endswith(f"; 1 of 3 cases flagged, see {tmp_path / 'qc.csv'}")
    run = SimpleNamespace(run_dir=str(tmp_path / "fold_0"), epochs_completed=4, stopped_by="time_budget",
                          headline={"dice_square": 0.5})
    assert pipeline.describe_runs([run]).splitlines() == [
        f"{tmp_path / 'fold_0'}: 4 epochs (time_budget), dice_square 0.5000",
        f"  report: {tmp_path / 'fold_0' / 'report.html'} (also report.md, metrics.json)"]


@pytest.mark.slow
def test_plan_and_train_then_sweep_and_compare(small, folders, tmp_path):
    """plan_and_train plans (when asked) and trains one run; sweep reuses the plan, trains one run
    a combination and writes compare.md (also what compare writes) and curves.png."""
    runs = pipeline.plan_and_train(small, folders, TrainOptions(**TINY, run_name="first"), device="cpu")
    assert len(runs) == 1 and (Path(runs[0].run_dir) / "metrics.json").is_file()
    plans = plans_file(folders.results, "Small").read_text()
    grid = pipeline.sweep_grid({"loss": "ce,dice"})
    table, output = pipeline.sweep(small, folders, TrainOptions(**TINY), grid)
    assert output == folders.results / "Small" / "sweep"
    assert (output / "compare.md").read_text() == table and (output / "curves.png").is_file()
    assert plans_file(folders.results, "Small").read_text() == plans          # the plan was not made again
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(grid) and "ce" in rows[2] and "dice" in rows[3]
    run_dirs = sorted((folders.results / "Small").glob("*/*/fold_0"))
    assert len(run_dirs) == 3
    assert pipeline.compare(run_dirs, tmp_path / "out" / "compare.md") == \
        (tmp_path / "out" / "compare.md").read_text()
