"""Reports of a run: one self-contained report.html, a report.md with the same tables, PNG pictures.

Entry functions:
- ``plot_learning_curves(log_csv, png)``: losses and validation metrics per epoch (``figures``).
- ``write_segmentation_report(out_dir, metrics, run_info, samples, log_csv)`` (``segmentation``).
- ``write_classification_report(out_dir, metrics, y_true, probabilities, classes, run_info, gradcam,
  log_csv)`` (``classification``).
- ``compare_runs(run_dirs) -> str`` and ``plot_compare_curves(run_dirs, png)``: ablation tables (``compare``).

Every picture is saved next to report.md and embedded in report.html as a base64 PNG
(``document``), so the HTML file reads offline on its own. The numbers come from
``autoplan.evaluation``.
"""

from autoplan.report.classification import write_classification_report
from autoplan.report.compare import compare_runs, plot_compare_curves
from autoplan.report.figures import plot_learning_curves
from autoplan.report.segmentation import write_segmentation_report

__all__ = ["compare_runs", "plot_compare_curves", "plot_learning_curves", "write_classification_report",
           "write_segmentation_report"]
