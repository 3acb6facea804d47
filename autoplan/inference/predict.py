"""``autoplan predict``: masks (segmentation) or ``predictions.csv`` (classification) for every
image of a folder, with the quality flags of ``autoplan.qc``.

``predict_folder`` is the entry function. ``PredictionSession`` and the per-case streams
(``segment_case``, ``classify_cases``) are shared with ``autoplan evaluate``.
"""

import contextlib
import csv
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from autoplan import preprocessing
from autoplan.errors import InputError
from autoplan.inference.inputs import InputCase, group_input_cases, mask_path, read_case, say_what_is_skipped
from autoplan.inference.models import Ensemble
from autoplan.inference.predictor import Predictor
from autoplan.io import list_image_files, write_image
from autoplan.jsonio import atomic_write_bytes, atomic_write_text
from autoplan.parallel import progress_enabled
from autoplan.qc import QC_COLUMNS, check_case, check_prediction, qc_cells, qc_csv, run_reference

CLASSIFICATION_BATCH = 16


@dataclass
class PredictionSession:
    """One predict or evaluate command: the model (the Python API's ``Predictor``, so files and
    arrays are predicted by the same code), what to write, what went wrong so far."""

    predictor: Predictor
    save_probabilities: bool = False
    reasons: dict | None = None     # {case name: [quality reason]}; None: no quality reference
    failures: list = field(default_factory=list)   # one line per case that failed

    def __post_init__(self):
        # Probabilities in the input's grid (K float32 per voxel) only when they are written.
        self.predictor.keep_probabilities = self.save_probabilities

    @property
    def ensemble(self) -> Ensemble:
        return self.predictor.ensemble

    @property
    def tta(self) -> bool:
        return self.predictor.tta

    @property
    def device(self):
        return self.predictor.device

    def fail(self, case: InputCase, error: Exception) -> None:
        """Note a case that failed and go on: one bad file must not stop the others."""
        text = str(error) if isinstance(error, InputError) else f"{case.files[0]}: {type(error).__name__}: {error}"
        self.failures.append(text)
        tqdm.write(f"failed: {text}", file=sys.stderr)


@contextlib.contextmanager
def torch_threads(n_jobs):
    """Use ``n_jobs`` threads for torch while predicting, then restore.

    None keeps torch's own setting (all physical cores unless ``OMP_NUM_THREADS`` or the
    caller says otherwise): on a busy machine fewer threads can be much faster, since
    torch's threads wait for each other at every operation.
    """
    previous = torch.get_num_threads()
    if n_jobs is not None:
        torch.set_num_threads(max(1, int(n_jobs)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def progress(items, desc):
    return tqdm(items, desc=desc, disable=not progress_enabled())


def check_output_folder(input_dir: Path, output_dir: Path) -> None:
    """Refuse an output folder that is the input folder or inside it (outputs would mix with
    inputs), that is a file, or that cannot be written: before any case is computed."""
    source, target = Path(input_dir).resolve(), Path(output_dir).resolve()
    if target == source or source in target.parents:
        raise InputError(output_dir, f"is inside the input folder {input_dir}; choose an output "
                                     "folder outside it")
    if target.exists() and not target.is_dir():
        raise InputError(output_dir, "is a file; --output must be a folder")
    existing = target
    while not existing.exists():            # the folder is made later; its nearest ancestor must be writable
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(output_dir, f"cannot be written ({existing} is not writable)")


# ============================================================================ per-case streams


def segment_case(session: PredictionSession, image, case_id: str) -> tuple:
    """(label map after the run's post-processing, probabilities) of one case, in its own grid."""
    return session.predictor.segment(image, case_id)


def classify_cases(session: PredictionSession, cases: list, desc: str):
    """Yield (case, probabilities) in order, reading CLASSIFICATION_BATCH images at a time.

    With ``session.reasons``, every case read is checked against the run's quality
    reference and its reasons stored under the case's name.
    """
    configuration = session.ensemble.spec.configuration
    n_channels = configuration.n_input_channels
    reference = run_reference(session.ensemble.spec) if session.reasons is not None else None
    bar = progress(cases, desc)
    for first in range(0, len(cases), CLASSIFICATION_BATCH):
        chunk, pixels = [], []
        for case in cases[first:first + CLASSIFICATION_BATCH]:
            try:
                # 1 <-> 3 channels are converted by load_classification_image (any format)
                image = read_case(case.files, None if n_channels in (1, 3) else n_channels)
                # resized here, per case: a volume among the photos fails alone, not its batch
                case_pixels = preprocessing.load_classification_image(image, configuration)
                if reference is not None:
                    session.reasons[case.name] = check_case(image, reference, configuration)
                chunk.append(case)
                pixels.append(case_pixels)
            except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
                session.fail(case, error)
        if pixels:
            yield from zip(chunk, session.predictor.classify_pixels(np.stack(pixels)))
        bar.update(len(cases[first:first + CLASSIFICATION_BATCH]))
    bar.close()


def predictions_csv(rows: list, classes: list, reasons: dict | None = None) -> str:
    """case, prediction, one probability per class; with ``reasons`` ({case: [reason]}) also
    the quality flags' ``flagged`` and ``reasons`` columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "prediction", *classes, *(QC_COLUMNS if reasons is not None else ())])
    for case, probabilities in rows:
        flags = qc_cells(reasons[case]) if reasons is not None else []
        writer.writerow([case, classes[int(np.argmax(probabilities))],
                         *(f"{p:.6f}" for p in probabilities), *flags])
    return buffer.getvalue()


# ============================================================================ the two tasks


def _save_probabilities(path: Path, probabilities: np.ndarray, label_ids: list) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities.astype(np.float32), label_ids=np.asarray(label_ids))
    atomic_write_bytes(path, buffer.getvalue())


def _mask_targets(cases: list, output_dir: Path) -> dict:
    """{mask path: the cases that would write it}: two inputs must not write one mask."""
    targets = {}
    for case in cases:
        targets.setdefault(mask_path(case, output_dir), []).append(case)
    return targets


def _predict_segmentation(session: PredictionSession, cases: list, output_dir: Path) -> tuple:
    """One mask per case (the paths written, their count, qc.csv)."""
    spec = session.ensemble.spec
    reference = run_reference(spec) if session.reasons is not None else None
    targets, written = _mask_targets(cases, output_dir), []
    for case in progress(cases, "predict"):
        target = mask_path(case, output_dir)
        try:
            if len(targets[target]) > 1:
                others = ", ".join(str(c.files[0].name) for c in targets[target])
                raise InputError(case.files[0], f"several inputs ({others}) would write {target.name}")
            image = read_case(case.files, spec.configuration.n_image_channels)
            case_reasons = check_case(image, reference, spec.configuration) if reference is not None else []
            label_map, probabilities = segment_case(session, image, case.name)
            written.append(write_image(label_map, target, reference=image))
            if reference is not None:
                session.reasons[case.name] = case_reasons + check_prediction(label_map, reference)
            if session.save_probabilities:
                _save_probabilities(output_dir / f"{case.name}_probabilities.npz", probabilities,
                                    sorted(int(v) for v in spec.labels.values()))
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
            session.fail(case, error)
    qc_path = output_dir / "qc.csv"
    if session.reasons is not None:
        atomic_write_text(qc_path, qc_csv(session.reasons))
    return written, len(written), qc_path


def _predict_classification(session: PredictionSession, cases: list, output_dir: Path) -> tuple:
    """predictions.csv, with the quality flags' columns (the path twice, the count of cases)."""
    rows = [(case.name, p) for case, p in classify_cases(session, cases, "classify")]
    csv_path = output_dir / "predictions.csv"
    atomic_write_text(csv_path, predictions_csv(rows, list(session.ensemble.spec.classes), session.reasons))
    return [csv_path], len(rows), csv_path


_PREDICT_BY_TASK = {"segmentation": _predict_segmentation, "classification": _predict_classification}


# ============================================================================ predict_folder


def _quality_reasons(ensemble: Ensemble) -> dict | None:
    """An empty {case: [reason]} to fill when the run has a quality reference; None (said
    once on stderr) for runs trained before quality flags."""
    if run_reference(ensemble.spec) is not None:
        return {}
    print(f"note: {ensemble.fold_dirs[0]} has no quality reference in plan.json (trained before "
          "quality flags): cases are not compared with the training data", file=sys.stderr)
    return None


def _input_cases(input_dir: Path) -> list:
    images = list_image_files(input_dir)
    say_what_is_skipped(input_dir, images)
    cases = group_input_cases(images)
    if not cases:
        raise InputError(input_dir, "holds no images (PNG/JPEG/TIFF/BMP, NIfTI/NRRD/MHA, or DICOM "
                                    "series folders)")
    return cases


def _summary(session: PredictionSession, n_cases: int, written: list, n_done: int, qc_path: Path,
             seconds: float) -> dict:
    reasons = session.reasons
    return {"task_type": session.ensemble.spec.task_type, "model": [str(f) for f in session.predictor.fold_dirs],
            "n_cases": n_cases, "n_predicted": n_done, "written": [str(p) for p in written],
            "failed": session.failures, "tta": session.tta, "seconds": round(seconds, 3),
            "cases_per_second": round(n_done / seconds, 4) if seconds > 0 else None,
            "n_flagged": sum(1 for r in reasons.values() if r) if reasons is not None else None,
            "qc": str(qc_path) if reasons is not None else None}


def predict_folder(model_dir, input_dir, output_dir, tta: bool = True, device="cpu",
                   save_probabilities: bool = False, n_jobs: int | None = None) -> dict:
    """Predict every image file and DICOM series folder directly inside ``input_dir``.

    Segmentation: one mask per case in ``output_dir`` (input stem, input format and
    geometry). Classification: ``output_dir/predictions.csv``. Cases are streamed one at
    a time; a case that fails is reported and skipped, and an ``InputError`` listing the
    failures is raised at the end (after every other output is written).

    Quality flags (autoplan/qc.py): each predicted case and its prediction are compared
    with the run's training data; segmentation writes ``output_dir/qc.csv``, classification
    adds its ``flagged``/``reasons`` columns to predictions.csv. The summary's ``n_flagged``
    and ``qc`` (the file) are None for runs without a quality reference (older runs).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_folder(input_dir, output_dir)
    cases = _input_cases(input_dir)
    with torch_threads(n_jobs):
        predictor = Predictor.load(model_dir, device, tta)
        session = PredictionSession(predictor, save_probabilities, reasons=_quality_reasons(predictor.ensemble))
        started = time.perf_counter()
        output_dir.mkdir(parents=True, exist_ok=True)
        written, n_done, qc_path = _PREDICT_BY_TASK[predictor.task_type](session, cases, output_dir)
    summary = _summary(session, len(cases), written, n_done, qc_path, time.perf_counter() - started)
    if session.failures:
        raise InputError(input_dir, f"{len(session.failures)} of {len(cases)} case(s) failed (the others "
                                    f"were written to {output_dir}): {'; '.join(session.failures)}")
    return summary
