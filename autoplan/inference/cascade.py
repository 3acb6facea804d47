"""The cascade (nnU-Net's ``3d_lowres`` -> ``3d_cascade_fullres``): the first stage's predicted
labels, back on the image's own grid, appended to the image as one-hot channels of the
foreground labels; the second stage is then an ordinary full-resolution run on that image.

Entry: :func:`with_previous_stage` (the image a cascade's networks take, from the image and
the cascade's loaded :class:`~autoplan.inference.models.Ensemble`). Prediction, evaluation and
training's final validation all go through it or through :func:`append_previous_stage`.

Training a cascade needs, for every case, a first-stage prediction from a model that did not
train on that case: the first stage's 5-fold out-of-fold predictions, which its final
validation saves (:func:`save_out_of_fold`, ``fold_K/out_of_fold/CASE.npz``, the labels before
post-processing in the case's original grid). An in-sample prediction would be nearly perfect
and would teach the cascade to copy its input; on new cases that input is as wrong as the
out-of-fold one. :func:`choose_previous_run` finds a first-stage run whose folds cover every
case and refuses, naming the folds to train, when none does.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np

from autoplan.errors import InputError
from autoplan.preprocessing.cache import load_label_map, save_label_map

# Configurations that can be a previous stage: their final validation keeps its predictions.
PREVIOUS_STAGES = ("3d_lowres",)
OUT_OF_FOLD_FOLDER = "out_of_fold"


def saves_out_of_fold(configuration) -> bool:
    """Whether a run of ``configuration`` keeps its validation predictions for a cascade."""
    return configuration.name in PREVIOUS_STAGES


def out_of_fold_file(fold_dir, case_id: str) -> Path:
    return Path(fold_dir) / OUT_OF_FOLD_FOLDER / f"{case_id}.npz"


def save_out_of_fold(fold_dir, case_id: str, labels) -> None:
    """Keep one validation case's predicted labels (original grid, before post-processing)."""
    save_label_map(out_of_fold_file(fold_dir, case_id), labels)


def out_of_fold_predictions(run_dir, splits: list) -> tuple:
    """({case id: label map file}, [folds lacking theirs]) of a first-stage run: each case's
    prediction by the fold that held it out."""
    files, missing = {}, []
    for fold, split in enumerate(splits):
        fold_files = {case: out_of_fold_file(Path(run_dir) / f"fold_{fold}", case) for case in split["val"]}
        if all(path.is_file() for path in fold_files.values()):
            files.update(fold_files)
        else:
            missing.append(fold)
    return files, missing


def choose_previous_run(dataset_results, configuration, splits: list, dataset_name: str) -> tuple:
    """(run folder, {case id: out-of-fold label map}) of the first stage a cascade trains on.

    The run whose folds hold every case's out-of-fold prediction; of several, the most recently
    finished (the choice is printed and recorded in the cascade's plan.json). Raises InputError
    naming the missing folds when no run is complete.
    """
    stage_dir = Path(dataset_results) / configuration.previous_stage
    complete, incomplete = [], []
    for run_dir in sorted(p for p in stage_dir.glob("*") if p.is_dir() and not p.name.startswith(".")):
        files, missing = out_of_fold_predictions(run_dir, splits)
        (incomplete if missing else complete).append((run_dir, files, missing))
    if not complete:
        found = "; ".join(f"{run.name} lacks fold(s) {', '.join(map(str, missing))}"
                          for run, _, missing in incomplete) or f"no run in {stage_dir}"
        raise InputError(stage_dir, f"{configuration.name} trains on the out-of-fold predictions of all "
                                    f"{len(splits)} folds of {configuration.previous_stage} ({found}): run "
                                    f"`autoplan train {dataset_name} --config {configuration.previous_stage} "
                                    f"--fold all`, or `autoplan plan-and-train {dataset_name} --config "
                                    f"{configuration.name}` to train both stages")
    run_dir, files, _ = max(complete, key=lambda found: max(p.stat().st_mtime for p in found[1].values()))
    return run_dir, files


def previous_stage_inputs(dataset, configuration, results_root, splits: list) -> tuple:
    """(``configuration`` naming its first-stage run, {case id: out-of-fold label map}): what
    training a cascade on ``dataset`` needs; InputError when some case has no prediction."""
    run_dir, files = choose_previous_run(Path(results_root) / dataset.name, configuration, splits, dataset.name)
    uncovered = sorted(case.id for case in dataset.cases if case.id not in files)
    if uncovered:
        raise InputError(run_dir, f"has no out-of-fold prediction of {len(uncovered)} case(s) ({uncovered[0]}, "
                                  "...): splits.json changed after it was trained; train it again with --overwrite")
    print(f"{configuration.name}: input channels from {configuration.previous_stage}/{run_dir.name}'s "
          f"out-of-fold predictions ({len(splits)} folds)")
    return replace(configuration, previous_stage_run=run_dir.name), files


def append_previous_stage(image, labels, configuration):
    """``image`` (an ImageData) with one channel per foreground label id 1 .. n_outputs - 1
    appended: 1 where ``labels`` (the first stage's prediction on the image's grid) has it."""
    array = np.asarray(image.array)
    if array.shape[0] != configuration.n_image_channels:
        raise InputError(image.path, f"has {array.shape[0]} channel(s); {configuration.name} takes "
                                     f"{configuration.n_image_channels} (plus its first stage's prediction)")
    labels = np.asarray(labels)
    if labels.shape != array.shape[1:]:
        raise InputError(image.path, f"first-stage labels of shape {list(labels.shape)} do not match the image "
                                     f"{list(array.shape[1:])}")
    one_hot = np.stack([labels == label for label in range(1, configuration.n_outputs)]).astype(np.float32)
    return replace(image, array=np.concatenate([array.astype(np.float32, copy=False), one_hot]))


def previous_stage_labels(image, previous, tta: bool = True, device="cpu") -> np.ndarray:
    """The first stage's label map of ``image`` on its own grid: every fold of ``previous`` (a
    loaded Ensemble), without post-processing (what the cascade was trained on). Labels only,
    reverted slab by slab (``segmentation.predict_case``): no K-class copy of the volume."""
    from autoplan.inference.segmentation import predict_case

    return predict_case([(previous.networks, previous.spec)], image, tta, device).labels


def with_previous_stage(image, ensemble, tta: bool = True, device="cpu"):
    """The image ``ensemble``'s networks take: ``image`` itself, or for a cascade the image with
    its first stage's prediction appended (the first stage runs here, all its folds)."""
    previous = getattr(ensemble, "previous", None)
    if previous is None:
        return image
    labels = previous_stage_labels(image, previous, tta, device)
    return append_previous_stage(image, labels, ensemble.spec.configuration)
