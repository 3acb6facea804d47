"""The command line: thin wiring, exit codes, one-line errors, and the demo end to end."""

import csv
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_png_pairs
from PIL import Image

from autoplan.cli import COMMANDS, build_parser, main
from autoplan.pipeline import SWEEPABLE

EXPECTED = {"import", "fingerprint", "plan", "train", "plan-and-train", "predict", "evaluate", "export-model",
            "import-model", "find-best", "calibrate", "split", "compare", "sweep", "demo"}


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "autoplan", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert set(COMMANDS) == EXPECTED
    for command in EXPECTED:
        assert command in result.stdout


def test_corrupt_file_exits_2_with_one_line_and_leaves_nothing(tmp_path, capsys):
    images, masks = write_png_pairs(tmp_path, n=3)
    (images / "c1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code = main(["import", "Broken", "--images", str(images), "--masks", str(masks), "--raw", str(tmp_path / "raw")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "c1.png" in err[0]
    assert not (tmp_path / "raw" / "Broken").exists()
    assert not any((tmp_path / "raw").glob(".Broken*")) if (tmp_path / "raw").exists() else True


def test_missing_dataset_exits_2(tmp_path, capsys):
    code = main(["fingerprint", "Nope", "--raw", str(tmp_path), "--results", str(tmp_path / "r")])
    assert code == 2 and "Nope" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """`autoplan demo` with a short budget: reports, PNG masks of the inputs' sizes, predictions.csv."""
    from autoplan.demo import run_demo

    result = run_demo(tmp_path / "demo", time_budget_minutes=0.4)
    for run in (result["xray_run"], result["derm_run"]):
        assert (run / "report.html").is_file() and (run / "metrics.json").is_file()
    sources = tmp_path / "demo" / "sources" / "xray_new"
    for image in sources.glob("*.png"):
        mask = Image.open(tmp_path / "demo" / "predictions" / "xray" / image.name)
        assert mask.size == Image.open(image).size
        assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
    with open(tmp_path / "demo" / "predictions" / "derm" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and set(rows[0]) == {"case", "prediction", "blob", "ring", "speckle", "flagged", "reasons"}


def _small_png_dataset(tmp_path):
    images, masks = write_png_pairs(tmp_path)
    raw, results = ["--raw", str(tmp_path / "raw")], ["--results", str(tmp_path / "results")]
    assert main(["import", "Small", "--images", str(images), "--masks", str(masks), *raw]) == 0
    assert main(["plan", "Small", "--device", "cpu", *raw, *results]) == 0   # analytic: no budget, no probe
    return [*raw, "--preprocessed", str(tmp_path / "pre"), *results]


def test_bad_fold_or_configuration_exits_2_before_any_work(tmp_path, capsys):
    """--fold -1 / 7 / x and a configuration the plan lacks: one line, exit 2, nothing preprocessed
    and no fold folder left behind (they were tracebacks after preprocessing)."""
    folders = _small_png_dataset(tmp_path)
    capsys.readouterr()
    for bad in (["--fold", "-1"], ["--fold", "7"], ["--fold", "x"], ["--config", "3d_fullres"]):
        assert main(["train", "Small", *bad, "--epochs", "1", *folders]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("--fold" in err[0] or "3d_fullres" in err[0]), err
    assert not (tmp_path / "pre").exists()
    assert not list((tmp_path / "results" / "Small").glob("*/*/fold_*"))


def test_unwritable_or_file_outputs_exit_2_with_one_line(tmp_path, capsys):
    """An output path that is a file, or a raw folder under a file: exit 2 and one line, no traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "a.png")
    assert main(["predict", "--model", str(tmp_path / "nomodel"), "--input", str(images),
                 "--output", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(images / "a.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "a.png")
    assert main(["import", "X", "--images", str(images), "--masks", str(masks), "--raw", str(blocker / "raw")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker) in err[0], err


@pytest.mark.slow
def test_an_earlier_run_of_the_same_name_is_refused_or_replaced_whole(tmp_path, capsys):
    """Re-running train with a used run name mixed two runs in one folder; now it needs
    --resume (continue) or --overwrite (replace the whole folder)."""
    folders = _small_png_dataset(tmp_path)
    train = ["train", "Small", "--epochs", "1", "--iterations-per-epoch", "2", "--workers", "0",
             "--run-name", "r", "--device", "cpu", *folders]
    assert main(train) == 0
    run_dir = tmp_path / "results" / "Small" / "2d" / "r" / "fold_0"
    (run_dir / "stale.txt").write_text("from the first run")
    capsys.readouterr()
    assert main(train) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    assert (run_dir / "stale.txt").is_file()
    assert main([*train, "--overwrite"]) == 0
    assert not (run_dir / "stale.txt").exists() and (run_dir / "metrics.json").is_file()
    out = capsys.readouterr().out
    assert f"report: {run_dir / 'report.html'}" in out


def test_every_option_has_help_every_command_an_example_and_there_is_a_version(capsys):
    from autoplan import __version__

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        assert "example:" in sub.format_help() and f"autoplan {name}" in sub.format_help(), name
    try:
        main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    assert capsys.readouterr().out.strip() == f"autoplan {__version__}"


def _options(command: str) -> dict:
    """{dest: action} of one command's options."""
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    return {action.dest: action for action in commands[command]._actions if action.option_strings}


def test_sweep_flags_are_the_sweepable_train_options_as_lists():
    """One definition (pipeline.SWEEPABLE): every sweepable option is a sweep flag taking text
    (comma-separated) and a train flag of the same name; the other sweep options are train's."""
    sweep, train = _options("sweep"), _options("train")
    for name in SWEEPABLE:
        assert sweep[name].option_strings == train[name].option_strings, name
        assert sweep[name].type is None and sweep[name].default is None
    for name in set(sweep) - set(SWEEPABLE) - {"output", "help"}:
        assert name in train, name
        assert sweep[name].type == train[name].type and sweep[name].default == train[name].default, name
    args = build_parser().parse_args(["sweep", "X", "--loss", "ce,dice", "--batch-size", "2,4", "--seed", "3"])
    assert (args.loss, args.batch_size, args.seed, args.fold) == ("ce,dice", "2,4", 3, "0")


def test_predict_names_what_it_skips_in_one_line(tmp_path, capsys):
    from tests.test_inference import make_segmentation_run

    model = make_segmentation_run(tmp_path, 2)
    inputs = tmp_path / "in"
    (inputs / "nested_study").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20), dtype=np.uint8)).save(inputs / "a.png")
    (inputs / "notes.txt").write_text("x")
    (inputs / "scan.dcm.bak").write_text("x")
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--output", str(tmp_path / "o"),
                 "--no-tta"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(notes) == 1 and "3 entries" in notes[0]
    assert "nested_study/" in notes[0] and "notes.txt" in notes[0] and "scan.dcm.bak" in notes[0]


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_case(tmp_path, capsys, monkeypatch):
    """A read-only output folder: every case was computed, then each failed, blaming the input."""
    import autoplan.inference.predict as inference
    from tests.test_inference import make_segmentation_run

    model = make_segmentation_run(tmp_path, 2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20), dtype=np.uint8)).save(inputs / "a.png")
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(inference.os, "access", lambda path, mode: False)   # as a non-root user would see it
    computed = []
    from autoplan.inference import predictor

    monkeypatch.setattr(predictor, "predict_case", lambda *a, **k: computed.append(a))
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--output",
                 str(tmp_path / "locked" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be written" in err[0] and "locked" in err[0]
    assert computed == []


def test_fingerprint_says_where_it_wrote_and_evaluate_takes_n_jobs(tmp_path, capsys, monkeypatch):
    import autoplan.inference as inference

    folders = _small_png_dataset(tmp_path)
    capsys.readouterr()
    assert main(["fingerprint", "Small", "--raw", folders[1], "--results", folders[-1]]) == 0
    assert f"wrote {tmp_path / 'results' / 'Small' / 'fingerprint.json'}" in capsys.readouterr().out
    seen = {}
    monkeypatch.setattr(inference, "evaluate_dataset", lambda *a, **k: seen.update(k) or {})
    main(["evaluate", "--model", str(tmp_path), "--dataset", "Small", "--raw", folders[1], "--n-jobs", "1"])
    assert seen.get("n_jobs") == 1
