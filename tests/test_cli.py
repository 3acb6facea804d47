"""The command line: thin wiring, exit codes, one-line errors, and the demo end to end."""

import csv
import subprocess
import sys

import numpy as np
from PIL import Image

from autoplan.cli import COMMANDS, main

EXPECTED = {"import", "fingerprint", "plan", "train", "plan-and-train", "predict", "evaluate", "compare",
            "sweep", "demo"}


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "autoplan", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert set(COMMANDS) == EXPECTED
    for command in EXPECTED:
        assert command in result.stdout


def test_corrupt_file_exits_2_with_one_line_and_leaves_nothing(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)).save(images / f"c{i}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 8:20] = 255
        Image.fromarray(mask).save(masks / f"c{i}.png")
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
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)).save(images / f"c{i}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 8 + i:20 + i] = 255
        Image.fromarray(mask).save(masks / f"c{i}.png")
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
