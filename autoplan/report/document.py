"""One report written twice: report.html (pictures embedded as base64 PNGs, so the file
reads offline on its own) and report.md (the same tables, pictures linked), plus the cell
formatting and the sections every report shares (the run's settings, learning curves)."""

import base64
import datetime
import html
import json
import math
import re
from pathlib import Path

import numpy as np

from autoplan.jsonio import atomic_write_text
from autoplan.report.figures import plot_learning_curves
from autoplan.test_split import split_label

_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.85em}
th,td{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}
td:first-child,th:first-child{text-align:left}tr.mean td{font-weight:bold;background:#f6f6f6}
img{max-width:100%;border:1px solid #ddd;margin:0.3em 0}pre{background:#f6f6f6;padding:0.6em;white-space:pre-wrap}
.note{font-size:0.85em;color:#444}"""


# ============================================================================ cells


def is_missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value))


def fmt(value, digits: int = 4) -> str:
    """A table cell: numbers with ``digits`` decimals, n/a for undefined values."""
    if is_missing(value):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return str(value)


def fmt_setting(value) -> str:
    """Options and plan fields as written: 0.2, 0.001, 1e-05, [40, 56, 40]."""
    if isinstance(value, (float, np.floating)) and not is_missing(value):
        return f"{float(value):g}"
    return fmt(value)


def safe_name(text: str) -> str:
    """A case id made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "case"


def flatten(value, prefix: str = "") -> dict:
    """Nested dicts as {"a.b": value}; lists stay whole."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def markdown_table(header: list, rows: list) -> str:
    def cell(value):
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ============================================================================ the document


class Document:
    """The same content written twice: HTML (pictures embedded) and Markdown (pictures linked)."""

    def __init__(self, title: str):
        self.html = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                     f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
        self.markdown = [f"# {title}", ""]
        self.paragraph(f"Written {datetime.datetime.now().isoformat(timespec='seconds')} by autoplan.")

    def heading(self, text: str):
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.markdown += [f"## {text}", ""]

    def paragraph(self, text: str, note: bool = False):
        css = " class='note'" if note else ""
        self.html.append(f"<p{css}>{html.escape(text)}</p>")
        self.markdown += [text, ""]

    def preformatted(self, text: str):
        self.html.append(f"<pre>{html.escape(text)}</pre>")
        self.markdown += ["```", text, "```", ""]

    def table(self, header: list, rows: list, mean_rows: int = 0):
        """``rows`` of already formatted cells; the last ``mean_rows`` rows are emphasised."""
        cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        lines = [f"<table><tr>{cells}</tr>"]
        for index, row in enumerate(rows):
            css = " class='mean'" if index >= len(rows) - mean_rows else ""
            lines.append(f"<tr{css}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
        self.html.append("".join(lines) + "</table>")
        self.markdown += [markdown_table(header, rows), ""]

    def image(self, png: bytes, filename: str, caption: str):
        encoded = base64.b64encode(png).decode("ascii")
        self.html.append(f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}">'
                         f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
        self.markdown += [f"![{caption}]({filename})", ""]

    def write(self, out_dir: Path) -> Path:
        self.html.append("</body></html>")
        atomic_write_text(out_dir / "report.md", "\n".join(self.markdown).rstrip() + "\n")
        atomic_write_text(out_dir / "report.html", "\n".join(self.html) + "\n")
        return out_dir / "report.html"


# ============================================================================ shared sections


def add_run_info(document: Document, run_info: dict):
    """Top-level scalars in one table, each dict (options, plan, ...) in its own, citations as text."""
    run_info = dict(run_info or {})
    citations = run_info.pop("citations", None)
    document.heading("Run")
    scalars = [(k, v) for k, v in run_info.items() if not isinstance(v, dict)]
    if scalars:
        document.table(["item", "value"], [(k, fmt_setting(v)) for k, v in scalars])
    for key, value in run_info.items():
        if isinstance(value, dict) and value:
            flat = {k: v for k, v in flatten(value).items() if not k.startswith("reasons")}
            document.paragraph(f"{key}:")
            document.table(["field", "value"], [(k, fmt_setting(v)) for k, v in flat.items()])
    if citations:
        document.paragraph("Please cite:")
        document.preformatted(citations if isinstance(citations, str) else "\n".join(map(str, citations)))


def add_curves(document: Document, out_dir: Path, log_csv):
    """The learning curves of ``log_csv`` (nothing without one: evaluation has no log)."""
    if log_csv is None or not Path(log_csv).is_file():
        return
    document.heading("Learning curves")
    png = plot_learning_curves(log_csv, out_dir / "curves.png")
    document.image(png.read_bytes(), png.name, "Losses and validation metrics per epoch (log.csv).")


# ============================================================================ which cases, how sure


def scored_cases(metrics: dict, run_info: dict) -> str:
    """Which cases the figures come from: metrics.json's ``split`` (evaluate), else the run's
    validation fold (training's final validation), else nothing known."""
    if metrics.get("split") or (run_info or {}).get("split"):
        return metrics.get("split") or run_info["split"]
    if (run_info or {}).get("fold") is not None and not run_info.get("evaluation"):
        return split_label("validation", fold=run_info["fold"])
    return "not recorded"


def interval_text(values) -> str:
    return f"{values[0]:.3f}–{values[1]:.3f}" if values else "n/a"


def bootstrap_note(ci95: dict) -> str:
    return (f"95 % confidence intervals: percentile bootstrap, {ci95.get('n_resamples')} resamples of "
            f"{ci95.get('resampled')} with replacement (seed {ci95.get('seed')}). A difference between two "
            "runs smaller than these intervals' width may be noise.")
