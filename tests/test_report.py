"""Reports and run comparison on small synthetic data and hand-built run folders."""

import base64
import csv
import io
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoplan.errors import InputError
from autoplan.evaluation import (classification_metrics, segmentation_case_metrics, select_sample_cases,
                                 summarize_segmentation)
from autoplan.jsonio import write_json
from autoplan.report import (compare_runs, plot_compare_curves, plot_learning_curves, write_classification_report,
                             write_segmentation_report)
from autoplan.report.classification import GradcamSample
from autoplan.report.figures import read_log
from autoplan.report.segmentation import render_3d_figure


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def embedded_images(html_path: Path) -> list:
    """Every <img> of the report, decoded: all must be inline base64 PNGs that PIL reads."""
    parser = _Images()
    parser.feed(html_path.read_text(encoding="utf-8"))
    assert "link" not in parser.tags and "script" not in parser.tags  # nothing fetched from elsewhere
    images = []
    for source in parser.sources:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix), source[:60]
        image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix):])))
        image.load()
        assert image.format == "PNG" and min(image.size) > 50
        images.append(image)
    return images


def markdown_tables(md_path: Path) -> list:
    """Each Markdown table as a list of rows (lists of cell strings), header first."""
    tables, current = [], []
    for line in md_path.read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def write_log(path: Path, train_losses, val_dice, metric="val_dice"):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "train_loss", "val_loss", metric, f"{metric}_1", "lr", "seconds"])
        for epoch, (loss, dice) in enumerate(zip(train_losses, val_dice), start=1):
            writer.writerow([epoch, loss, loss + 0.1, dice, dice - 0.05, 0.01 / epoch, 30.0])


def ellipsoid(shape, centre, radii):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def synthetic_3d_case(shift: int, seed: int):
    shape = (20, 28, 24)
    reference = np.zeros(shape, np.int16)
    reference[ellipsoid(shape, (10, 12, 12), (5, 6, 4))] = 1
    reference[ellipsoid(shape, (10, 19, 12), (4, 3, 3))] = 2
    prediction = np.roll(reference, shift, axis=2)
    image = np.random.default_rng(seed).normal(0, 0.3, (1,) + shape).astype(np.float32) + (reference > 0)
    return image, reference, prediction


def synthetic_2d_case(shift: int, rgb: bool):
    reference = np.zeros((40, 48), np.uint8)
    reference[ellipsoid(reference.shape, (20, 16), (10, 8))] = 1
    reference[ellipsoid(reference.shape, (20, 34), (8, 6))] = 2
    prediction = np.roll(reference, shift, axis=0)
    channels = 3 if rgb else 1
    image = np.random.default_rng(shift).uniform(0, 255, (channels, 40, 48)).astype(np.float32)
    image[:, reference > 0] *= 0.3
    return image, reference, prediction


def segmentation_metrics_for(cases, spacing):
    per_case = [{"case": name, "per_label": segmentation_case_metrics(pred, ref, [1, 2], spacing)}
                for name, (_, ref, pred) in cases.items()]
    return summarize_segmentation(per_case, {"1": "anterior", "2": "posterior"})


def test_learning_curves_png(tmp_path):
    write_log(tmp_path / "log.csv", [1.0, 0.7, 0.5], [0.2, 0.5, 0.6])
    log = read_log(tmp_path / "log.csv")
    assert log["val_dice"].tolist() == [0.2, 0.5, 0.6]
    png = plot_learning_curves(tmp_path / "log.csv", tmp_path / "curves.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 400


def test_segmentation_report_3d(tmp_path):
    spacing = (2.0, 1.0, 0.8)
    cases = {f"hippo_{i}": synthetic_3d_case(shift=i, seed=i) for i in range(4)}
    metrics = segmentation_metrics_for(cases, spacing)
    write_json(tmp_path / "metrics.json", metrics)
    write_log(tmp_path / "log.csv", [1.0, 0.8, 0.6, 0.5], [0.3, 0.6, 0.7, 0.72])
    picks = select_sample_cases(metrics)
    assert picks == ["hippo_0", "hippo_2", "hippo_3"]  # best (no shift), median, worst (largest shift)
    samples = [{"case": c, "image": cases[c][0], "reference": cases[c][1], "prediction": cases[c][2],
                "spacing": list(spacing)} for c in picks]
    run_info = {"dataset": "TaskHippocampus", "configuration": {"name": "3d_fullres", "patch_size": [16, 24, 24],
                                                                "reasons": {"patch_size": "long text"}},
                "options": {"loss": "dice_ce", "dropout": 0.0}, "device": "cpu",
                "citations": "Simpson et al. 2019, the Medical Segmentation Decathlon."}
    report = write_segmentation_report(tmp_path, metrics, run_info, samples, log_csv=tmp_path / "log.csv")
    assert report == tmp_path / "report.html"
    images = embedded_images(report)
    assert len(images) == 1 + 2 * len(samples)  # curves, then overlay + 3D rendering per case
    for case in picks:
        assert (tmp_path / f"overlay_{case}.png").is_file()
        assert (tmp_path / f"render3d_{case}.png").is_file()
    text = report.read_text()
    assert "Simpson et al. 2019" in text and "HD95" in text and "3d_fullres" in text
    assert "long text" not in text  # planner reasons are left to plans.json

    tables = markdown_tables(tmp_path / "report.md")
    headline = next(t for t in tables if t[0][0] == "label")
    assert headline[0] == ["label", "Dice", "Jaccard", "Precision", "Recall", "ASD (mm)", "HD95 (mm)",
                           "Dice 95 % CI"]
    assert [row[0] for row in headline[1:]] == ["1 anterior", "2 posterior", "foreground mean"]
    low, high = metrics["ci95"]["dice"]["1"]
    assert headline[1][7] == f"{low:.3f}–{high:.3f}"
    assert float(headline[1][1]) == pytest.approx(metrics["mean"]["1"]["dice"], abs=1e-4)
    assert float(headline[3][6]) == pytest.approx(metrics["foreground_mean"]["hd95_mm"], abs=1e-4)
    per_case = next(t for t in tables if t[0][0] == "case")
    assert [row[0] for row in per_case[1:]] == list(cases)
    assert per_case[1][1] == "1.0000"  # hippo_0 is the reference itself: anterior Dice 1
    markdown = (tmp_path / "report.md").read_text()
    assert "![" in markdown and "(overlay_hippo_0.png)" in markdown and "(curves.png)" in markdown


def test_3d_rendering_is_drawn_to_scale():
    image, reference, prediction = synthetic_3d_case(shift=0, seed=0)
    spacing = (2.0, 1.0, 0.5)
    figure = render_3d_figure({"case": "x", "image": image, "reference": reference, "prediction": prediction,
                               "spacing": spacing}, [1, 2], {"1": "a", "2": "b"})
    z, y, x = np.nonzero(reference)
    # both panels (prediction, reference) span the structures' bounding box plus one voxel
    # each side, in millimetres
    assert len(figure.axes) == 2
    for axes in figure.axes:
        assert axes.get_xlim()[1] == pytest.approx((x.max() - x.min() + 3) * 0.5)
        assert axes.get_ylim()[1] == pytest.approx((y.max() - y.min() + 3) * 1.0)
        assert axes.get_zlim()[1] == pytest.approx((z.max() - z.min() + 3) * 2.0)
    empty = np.zeros_like(prediction)
    assert render_3d_figure({"prediction": empty, "reference": reference, "spacing": spacing},
                            [1, 2], {}) is None


def test_segmentation_report_2d_rgb_and_grey_without_reference(tmp_path):
    cases = {"rgb_case": synthetic_2d_case(2, rgb=True), "grey_case": synthetic_2d_case(0, rgb=False)}
    metrics = summarize_segmentation(
        [{"case": n, "per_label": segmentation_case_metrics(p, r, [1, 2], None)} for n, (_, r, p) in cases.items()],
        {"1": "lung", "2": "heart"}, distance_unit="px")
    samples = [{"case": "rgb_case", "image": cases["rgb_case"][0], "reference": cases["rgb_case"][1],
                "prediction": cases["rgb_case"][2], "spacing": [1.0, 1.0]},
               {"case": "grey_case", "image": cases["grey_case"][0][0], "reference": None,
                "prediction": cases["grey_case"][2], "spacing": None}]
    report = write_segmentation_report(tmp_path, metrics, {"dataset": "TaskXRay"}, samples)
    assert len(embedded_images(report)) == 2  # no log, no 3D rendering for 2D cases
    assert not list(tmp_path.glob("render3d_*")) and not (tmp_path / "curves.png").exists()
    headline = next(t for t in markdown_tables(tmp_path / "report.md") if t[0][0] == "label")
    assert headline[0][-2:] == ["HD95 (px)", "Dice 95 % CI"]
    with pytest.raises(ValueError):
        write_segmentation_report(tmp_path / "bad", metrics, {}, [dict(samples[0], reference=np.zeros((5, 5)))])


def test_classification_report(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["nv", "mel", "bkl"]
    y_true = np.array([0] * 10 + [1] * 6 + [2] * 4)
    probabilities = rng.dirichlet(np.ones(3), size=len(y_true))
    probabilities[np.arange(len(y_true)), y_true] += 0.6
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    cases = [f"ISIC_{i:03d}" for i in range(len(y_true))]
    metrics = classification_metrics(y_true, probabilities, classes, cases)
    write_log(tmp_path / "log.csv", [1.2, 0.9], [0.4, 0.6], metric="val_balanced_accuracy")
    predicted = probabilities.argmax(1)
    gradcam = [GradcamSample(case=cases[i], true_class=classes[y_true[i]], predicted_class=classes[predicted[i]],
                             probability=float(probabilities[i, predicted[i]]),
                             image=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), heatmap=rng.random((8, 8)))
               for i in [0, 1, 10, 16]]
    report = write_classification_report(tmp_path, metrics, y_true, probabilities, classes,
                                         {"dataset": "TaskDerm", "options": {"loss": "ce"}}, gradcam,
                                         log_csv=tmp_path / "log.csv")
    assert len(embedded_images(report)) == 4  # curves, confusion matrix, ROC, Grad-CAM
    for name in ("confusion_matrix.png", "roc.png", "gradcam.png", "curves.png"):
        assert (tmp_path / name).is_file()
    tables = markdown_tables(tmp_path / "report.md")
    headline = next(t for t in tables if t[0][0] == "accuracy")
    assert float(headline[1][0]) == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert float(headline[1][3]) == pytest.approx(metrics["macro_auc"], abs=1e-4)
    per_class = next(t for t in tables if t[0][0] == "class")
    assert [row[0] for row in per_class[1:]] == classes + ["macro average", "weighted average"]
    assert per_class[1][4] == "10"


def make_run(fold_dir: Path, loss: str, dropout: float, dice: tuple, train_losses: list):
    """A run fold folder as training writes it: plan.json, log.csv, metrics.json."""
    plan = {"dataset": "TaskHippocampus", "task_type": "segmentation", "fold": int(fold_dir.name[-1]),
            "configuration": {"name": "3d_fullres", "patch_size": [40, 56, 40], "batch_size": 2, "loss": loss,
                              "network": {"features_per_stage": [32, 64, 128]}, "reasons": {"x": "y"}},
            "options": {"configuration": None, "fold": fold_dir.name[-1], "loss": loss, "dropout": dropout,
                        "norm": None, "lr": None, "optimizer": None, "base_features": None, "epochs": 3,
                        "run_name": fold_dir.parent.name, "device": "auto", "seed": 0},
            "norm": "instance", "dropout": dropout}
    write_json(fold_dir / "plan.json", plan)
    write_log(fold_dir / "log.csv", train_losses, [0.5, 0.7, 0.65])
    per_label = {"1": {"dice": dice[0], "hd95_mm": 2.0}, "2": {"dice": dice[1], "hd95_mm": 4.0}}
    write_json(fold_dir / "metrics.json", {
        "task_type": "segmentation", "labels": {"1": "anterior", "2": "posterior"}, "per_case": [],
        "mean": per_label, "foreground_mean": {"dice": sum(dice) / 2, "hd95_mm": 3.0}})


def test_compare_runs_ablation_table(tmp_path):
    a = tmp_path / "dice_ce" / "fold_0"
    make_run(a, "dice_ce", 0.0, (0.8, 0.7), [1.0, 0.8, 0.6])
    b = tmp_path / "ce_drop"
    make_run(b / "fold_0", "ce", 0.2, (0.9, 0.8), [1.0, 0.7, 0.5])
    make_run(b / "fold_1", "ce", 0.2, (0.7, 0.6), [1.0, 0.7, 0.3])
    c = tmp_path / "ce" / "fold_0"
    make_run(c, "ce", 0.0, (0.6, 0.5), [1.0, 0.9, math.nan])
    table = compare_runs([a, b, c])
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 3  # header, separator, one row per run
    header = [h.strip() for h in rows[0].strip("|").split("|")]
    # only loss and dropout differ: fold, run_name, norm, lr, configuration, ... do not appear
    assert header[:4] == ["run", "folds", "loss", "dropout"]
    assert not {"norm", "lr", "optimizer", "fold", "run_name", "configuration", "epochs"} & set(header)
    body = {r.split("|")[1].strip(): dict(zip(header, [c.strip() for c in r.strip("|").split("|")]))
            for r in rows[2:]}
    assert set(body) == {"dice_ce/fold_0", "ce_drop", "ce/fold_0"}
    mean_run = body["ce_drop"]
    assert mean_run["folds"] == "2 (mean)" and mean_run["loss"] == "ce" and mean_run["dropout"] == "0.2"
    assert float(mean_run["Dice (fg mean)"]) == pytest.approx(0.75)   # folds 0.85 and 0.65
    assert float(mean_run["Dice anterior"]) == pytest.approx(0.8)
    assert float(mean_run["final train loss"]) == pytest.approx(0.4)  # folds 0.5 and 0.3
    assert float(mean_run["best val_dice"]) == pytest.approx(0.7)
    assert float(body["ce/fold_0"]["final train loss"]) == pytest.approx(0.9)  # last logged value
    assert float(body["dice_ce/fold_0"]["HD95 mm (fg mean)"]) == pytest.approx(3.0)

    png = plot_compare_curves([a, b, c], tmp_path / "compare.png")
    with Image.open(png) as image:
        assert image.format == "PNG"


def test_compare_runs_classification_and_plan_defaults(tmp_path):
    # Two runs that differ only in a value the plan chose (lr None -> configuration lr).
    for name, lr in (("run_a", 0.01), ("run_b", 0.001)):
        fold = tmp_path / name / "fold_0"
        write_json(fold / "plan.json", {"dataset": "TaskDerm", "configuration": {"name": "classifier", "lr": lr},
                                        "options": {"lr": None, "loss": "ce"}})
        metrics = classification_metrics([0, 1, 1], [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], ["nv", "mel"])
        write_json(fold / "metrics.json", metrics)
    table = compare_runs([tmp_path / "run_a", tmp_path / "run_b"])
    header = [h.strip() for h in table.splitlines()[0].strip("|").split("|")]
    assert header == ["run", "folds", "lr", "accuracy", "balanced acc.", "macro F1", "macro AUC"]
    assert "| run_b | fold_0 | 0.001 | 0.6667 | 0.7500 |" in table


def test_compare_runs_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(InputError):
        compare_runs([tmp_path])
    with pytest.raises(InputError):
        compare_runs([tmp_path / "missing"])
