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
