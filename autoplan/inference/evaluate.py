"""``autoplan evaluate``: predict every case of an imported, labelled dataset (or, with
``--split test``, exactly its untouched test split) with a trained run, then ``metrics.json``,
``report.html``/``report.md`` and the pictures; both say which cases were scored.

``evaluate_dataset`` is the entry function; the prediction is ``autoplan predict``'s
(``PredictionSession``), the numbers ``autoplan.evaluation``'s, the report ``autoplan.report``'s.
"""

from pathlib import Path

import numpy as np

from autoplan.errors import InputError
from autoplan.evaluation import (classification_metrics, segmentation_case_metrics, select_sample_cases,
                                 summarize_segmentation)
from autoplan.inference.classification import gradcam_samples, pick_gradcam_indices
from autoplan.inference.inputs import InputCase, mask_ending, read_case
from autoplan.inference.predictor import Predictor
from autoplan.inference.predict import (PredictionSession, classify_cases, predictions_csv, progress, segment_case,
                                        torch_threads)
from autoplan.io import read_case_images, read_case_labels, read_image, write_image
from autoplan.jsonio import atomic_write_text, write_json
from autoplan.preprocessing import load_classification_image
from autoplan.report import write_classification_report, write_segmentation_report
from autoplan.runs import best_checkpoint
from autoplan.test_split import EvaluationCases, evaluation_cases


def _run_info(session: PredictionSession, dataset, split_label: str) -> dict:
    spec, folds = session.ensemble.spec, session.predictor.fold_dirs
    return {"dataset": dataset.name, "split": split_label, "trained_on": spec.dataset,
            "configuration": vars(spec.configuration),
            "options": vars(spec.options), "folds": [str(f) for f in folds],
            "fold": spec.fold if len(folds) == 1 else "ensemble",
            "tta": session.tta, "device": str(session.device), "postprocessing": session.predictor.postprocessing,
            "evaluation": True, "citations": dataset.description.get("citation")}


# ============================================================================ segmentation


def _check_segmentation_dataset(spec, dataset) -> None:
    if {int(v) for v in dataset.labels.values()} - {int(v) for v in spec.labels.values()}:
        raise InputError(dataset.root, f"labels {dataset.labels} are not among the model's {spec.labels}")
    if any(c.label is None for c in dataset.cases):
        raise InputError(dataset.root, "has cases without a mask; evaluation needs labelled cases")


def _segmentation_samples(metrics: dict, dataset, prediction_paths: dict) -> list:
    """Best, median and worst case by mean foreground Dice, read back for the report's overlays."""
    samples = []
    for case_id in select_sample_cases(metrics, 3):
        case = dataset.case(case_id)
        image = read_case_images(case)
        samples.append({"case": case.id, "image": image.array,
                        "reference": read_image(case.label).array[0],
                        "prediction": read_image(prediction_paths[case.id]).array[0],
                        "spacing": list(image.spacing)})
    return samples


def _evaluate_segmentation(session: PredictionSession, dataset, output_dir: Path, split_label: str) -> dict:
    """Masks in ``predictions/`` and per-case metrics with each image's spacing."""
    spec = session.ensemble.spec
    label_ids = sorted(int(v) for v in spec.labels.values())
    foreground = [i for i in label_ids if i != 0]
    per_case, prediction_paths = [], {}
    for case in progress(dataset.cases, f"evaluate {dataset.name}"):
        image = read_case_images(case)
        reference = read_case_labels(case, image, label_ids)
        prediction, _ = segment_case(session, image, case.id)
        target = output_dir / "predictions" / f"{case.id}{mask_ending(dataset.file_ending)}"
        prediction_paths[case.id] = write_image(prediction, target, image)
        per_case.append({"case": case.id, "per_label": segmentation_case_metrics(
            prediction, reference, foreground, image.spacing)})
    metrics = summarize_segmentation(per_case, spec.foreground_labels)
    metrics["split"] = split_label
    write_json(output_dir / "metrics.json", metrics)
    samples = _segmentation_samples(metrics, dataset, prediction_paths)
    write_segmentation_report(output_dir, metrics, _run_info(session, dataset, split_label), samples, log_csv=None)
    return metrics


# ============================================================================ classification


def _check_classification_dataset(spec, dataset) -> None:
    unknown = sorted({c.class_name for c in dataset.cases} - set(spec.classes or []))
    if unknown:
        raise InputError(dataset.root, f"classes {unknown} are not among the model's {spec.classes}")


def _gradcam(session: PredictionSession, dataset, case_ids: list, y_true, probabilities) -> list:
    """Grad-CAM samples; only the few images they show are read again."""
    spec = session.ensemble.spec
    picks = pick_gradcam_indices(y_true, probabilities.argmax(1), probabilities.max(1), len(spec.classes))
    pixels = {i: load_classification_image(read_case(dataset.case(case_ids[i]).images), spec.configuration)
              for i in picks}
    return gradcam_samples(session.ensemble.networks[0], pixels, y_true, probabilities, list(spec.classes),
                           spec.configuration, case_ids, device=session.device)


def _evaluate_classification(session: PredictionSession, dataset, output_dir: Path, split_label: str) -> dict:
    """Class probabilities of every case, predictions.csv and Grad-CAM of the first fold's network."""
    classes = list(session.ensemble.spec.classes)
    cases = [InputCase(c.id, list(c.images)) for c in dataset.cases]
    rows = list(classify_cases(session, cases, f"evaluate {dataset.name}"))
    if session.failures:
        raise InputError(dataset.root, f"{len(session.failures)} case(s) could not be read: "
                                       f"{'; '.join(session.failures)}")
    case_ids = [case.name for case, _ in rows]
    probabilities = np.stack([p for _, p in rows])
    y_true = np.asarray([classes.index(dataset.case(c).class_name) for c in case_ids])
    group_of = {case.id: case.group for case in dataset.cases}     # lesions: the bootstrap keeps them whole
    metrics = classification_metrics(y_true, probabilities, classes, case_ids, groups=[group_of[c] for c in case_ids])
    metrics["split"] = split_label
    write_json(output_dir / "metrics.json", metrics)
    atomic_write_text(output_dir / "predictions.csv", predictions_csv(list(zip(case_ids, probabilities)), classes))
    gradcam = _gradcam(session, dataset, case_ids, y_true, probabilities)
    write_classification_report(output_dir, metrics, y_true, probabilities, classes,
                                _run_info(session, dataset, split_label),
                                gradcam, log_csv=None)
    return metrics


# per task: (is the dataset one the model can be scored on, score it)
_EVALUATE_BY_TASK = {"segmentation": (_check_segmentation_dataset, _evaluate_segmentation),
                     "classification": (_check_classification_dataset, _evaluate_classification)}


def _refuse_weights_older_than(fold_dirs: list, spec, scored: EvaluationCases) -> None:
    """A run of this dataset whose weights were saved before its test split was made may have
    trained on today's test cases (``autoplan split --overwrite`` over existing runs)."""
    if scored.test_split is None or spec.dataset != scored.test_split.dataset:
        return
    made = scored.test_split.created_timestamp()
    for fold_dir in fold_dirs:
        if best_checkpoint(fold_dir).stat().st_mtime < made:
            raise InputError(fold_dir, f"was trained before the test split of {spec.dataset} was made "
                                       f"({scored.test_split.created}) and may have seen its cases: train it "
                                       "again before scoring --split test")


def evaluate_dataset(model_dir, dataset, output_dir=None, tta: bool = True, device="cpu",
                     n_jobs: int | None = None, split: str = "all", results_dir=None) -> dict:
    """Predict the cases of a labelled dataset; write metrics.json, report.html/.md and pictures.

    ``split`` "all" scores every case; "test" exactly the untouched test split of
    RESULTS/NAME/test_split.json (``results_dir``), refusing a run of that dataset trained
    before the split was made. metrics.json's ``split`` and the report say which it was.
    ``output_dir`` defaults to ``<model_dir>/<dataset name>/`` (``<dataset name>_test/`` for
    the test split). Segmentation compares with ``labelsTr`` (per-case metrics with each
    image's spacing; the predicted masks are kept in ``predictions/``); classification with
    the cases' classes (``predictions.csv`` too). Returns the metrics dict.
    """
    scored = evaluation_cases(dataset, results_dir, split)
    dataset = scored.dataset
    default_name = dataset.name + ("_test" if scored.test_split else "")
    output_dir = Path(output_dir) if output_dir is not None else Path(model_dir) / default_name
    with torch_threads(n_jobs):
        predictor = Predictor.load(model_dir, device, tta)
        spec = predictor.spec
        if dataset.task_type != spec.task_type:
            raise InputError(dataset.root, f"is a {dataset.task_type} dataset; the model does {spec.task_type}")
        if not dataset.cases:
            raise InputError(dataset.root, "holds no cases")
        check, evaluate = _EVALUATE_BY_TASK[spec.task_type]
        check(spec, dataset)
        _refuse_weights_older_than(predictor.fold_dirs, spec, scored)
        output_dir.mkdir(parents=True, exist_ok=True)
        return evaluate(PredictionSession(predictor), dataset, output_dir, scored.label)
