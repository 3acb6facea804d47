"""The classification report: which cases were scored, headline and per-class tables with
95 % bootstrap intervals, confusion matrix, one-vs-rest ROC curves and Grad-CAM heat maps of
sample images (``GradcamSample``)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from autoplan.evaluation import headline_metrics
from autoplan.report.document import (Document, add_curves, add_run_info, bootstrap_note, fmt, interval_text,
                                      scored_cases)
from autoplan.report.figures import new_figure, save_figure


@dataclass
class GradcamSample:
    """One classified image and the Grad-CAM heat map of its predicted class."""

    case: str
    true_class: str
    predicted_class: str
    probability: float        # of the predicted class
    image: np.ndarray         # (H, W, C) uint8 at the network's input size
    heatmap: np.ndarray       # (h, w) in 0..1; resized to the image when drawn

    @property
    def correct(self) -> bool:
        return self.true_class == self.predicted_class


# ============================================================================ pictures


def confusion_figure(confusion, classes: list) -> Figure:
    counts = np.asarray(confusion, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = 2.2 + 0.45 * len(classes)
    figure = new_figure(2 * size + 0.6, size)
    for axes, values, title, text in zip(figure.subplots(1, 2), (counts, normalised),
                                         ("counts", "row-normalised (recall on the diagonal)"),
                                         ("{:.0f}", "{:.2f}")):
        axes.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9))
        for (i, j), value in np.ndenumerate(values):
            axes.text(j, i, text.format(value), ha="center", va="center", fontsize=7,
                      color="white" if value > 0.6 * values.max() else "black")
        axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        axes.set_yticks(range(len(classes)), classes, fontsize=7)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(title, fontsize=9)
    return figure


def roc_figure(y_true, probabilities, classes: list) -> Figure:
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    figure = new_figure(4.6, 4.2)
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], ":", color="grey")
    for k, name in enumerate(classes):
        positive = y_true == k
        if positive.all() or not positive.any():
            continue  # one-vs-rest ROC needs both positives and negatives
        fpr, tpr, _ = roc_curve(positive, probabilities[:, k])
        axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, probabilities[:, k]):.3f})")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("one-vs-rest ROC", fontsize=9)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="lower right")
    return figure


def _image_01(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)  # channel-first given
    image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    if image.min() < 0 or image.max() > 1:
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def gradcam_figure(samples: list, classes: list) -> Figure | None:
    """Rows per true class, correct predictions first; jet heat map over the image."""
    from skimage.transform import resize

    rows = {}
    for sample in samples:
        rows.setdefault(sample.true_class, []).append(sample)
    order = [c for c in classes if c in rows] + [c for c in rows if c not in classes]
    if not order:
        return None
    n_columns = min(6, max(len(rows[c]) for c in order))
    figure = new_figure(2.0 * n_columns, 2.2 * len(order))
    grid = np.atleast_2d(figure.subplots(len(order), n_columns, squeeze=False))
    for row, true_class in enumerate(order):
        ordered = sorted(rows[true_class], key=lambda sample: not sample.correct)
        for column in range(n_columns):
            axes = grid[row, column]
            axes.set_axis_off()
            if column >= len(ordered):
                continue
            sample = ordered[column]
            image = _image_01(sample.image)
            heatmap = np.asarray(sample.heatmap, dtype=np.float32)
            if heatmap.shape != image.shape[:2]:
                heatmap = resize(heatmap, image.shape[:2], order=1)
            axes.imshow(image, cmap="gray" if image.ndim == 2 else None)
            axes.imshow(np.clip(heatmap, 0, 1), cmap="jet", alpha=0.4, vmin=0, vmax=1)
            axes.set_title(f"{sample.case}\ntrue {true_class} / pred {sample.predicted_class}", fontsize=7,
                           color="green" if sample.correct else "red")
    return figure


# ============================================================================ the report


def _classification_tables(document: Document, metrics: dict, classes: list, run_info: dict):
    headline = headline_metrics(metrics)
    ci95 = metrics.get("ci95") or {}
    document.heading("Headline metrics")
    document.paragraph(f"Cases scored: {scored_cases(metrics, run_info)}.")
    rows = [[fmt(headline[name]) for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")]
            + [fmt(metrics.get("n_cases"))]]
    if ci95:
        rows.append([interval_text(ci95.get(name)) for name in ("accuracy", "balanced_accuracy", "macro_f1")]
                    + ["", "95 % CI"])
    document.table(["accuracy", "balanced accuracy", "macro F1", "macro AUC", "cases"], rows)
    document.heading("Per class")
    recall_ci = ci95.get("recall") or {}
    rows = [[name] + [fmt(metrics["per_class"][name].get(k)) for k in ("precision", "recall", "f1", "support", "auc")]
            + [interval_text(recall_ci.get(name)) if ci95 else "n/a"] for name in classes]
    for average in ("macro_avg", "weighted_avg"):
        values = metrics.get(average, {})
        rows.append([average.replace("_avg", " average")] +
                    [fmt(values.get(k)) for k in ("precision", "recall", "f1")] + ["", "", ""])
    document.table(["class", "precision", "recall", "F1", "support", "AUC (one-vs-rest)", "recall 95 % CI"], rows,
                   mean_rows=2)
    if ci95:
        document.paragraph(bootstrap_note(ci95), note=True)
    document.paragraph(metrics.get("conventions") or "AUC is one-vs-rest; n/a where a class has no positives.",
                       note=True)


def write_classification_report(out_dir, metrics: dict, y_true, probabilities, classes: list, run_info: dict,
                                gradcam: list | None = None, log_csv=None,
                                title: str = "Classification report") -> Path:
    """report.html (self-contained), report.md, confusion_matrix.png, roc.png and gradcam.png in ``out_dir``.

    ``gradcam``: the ``GradcamSample`` s to draw (``inference.gradcam_samples``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(classes)
    document = Document(title)
    add_run_info(document, run_info)
    _classification_tables(document, metrics, classes, run_info)
    add_curves(document, out_dir, log_csv)
    document.heading("Confusion matrix")
    png = save_figure(confusion_figure(metrics["confusion_matrix"], classes), out_dir / "confusion_matrix.png")
    document.image(png, "confusion_matrix.png", "Confusion matrix: counts and row-normalised (rows: true class).")
    document.heading("ROC curves")
    png = save_figure(roc_figure(y_true, probabilities, classes), out_dir / "roc.png")
    document.image(png, "roc.png", "One-vs-rest ROC curve and AUC per class.")
    figure = gradcam_figure(gradcam or [], classes)
    if figure is not None:
        document.heading("Grad-CAM")
        png = save_figure(figure, out_dir / "gradcam.png")
        document.image(png, "gradcam.png", "Grad-CAM heat maps of the predicted class; one row per true class, "
                                           "titles green when correct, red when wrong.")
    return document.write(out_dir)

