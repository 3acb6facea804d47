"""Prediction on new images and evaluation on labelled datasets, with trained run folders.

Entry functions:
- ``predict_folder(model_dir, input_dir, output_dir, ...)``: masks (segmentation) or
  ``predictions.csv`` (classification) for every image in a folder.
- ``evaluate_dataset(model_dir, dataset, output_dir, ...)``: the same prediction on an
  imported, labelled dataset, then ``metrics.json`` and ``report.html``.

Building blocks the trainer shares (so validation and prediction are the same code):
``sliding_window_predict`` (nnU-Net's Gaussian-weighted tiling with mirroring TTA),
``predict_case_probabilities`` (preprocess, predict, back to the original grid),
``decide_postprocessing`` / ``apply_postprocessing`` (keep the largest component where
that helps on validation), ``classify_batch`` (flip TTA), ``classify_pixels`` (decisions of
preprocessed images) and ``gradcam_samples``.
"""

import contextlib
import io
import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from autoplan import preprocessing
from autoplan.errors import InputError
from autoplan.fingerprint import NATURAL_FORMATS
from autoplan.jsonio import atomic_write_bytes, atomic_write_text, write_json
from autoplan.nets import autocast
from autoplan.qc import QC_COLUMNS, check_case, check_prediction, qc_cells, qc_csv, run_reference
from autoplan.paths import fold_folders
from autoplan.runs import RunSpec, load_trained

# Natural-image inputs whose own format cannot hold a label map exactly get PNG masks.
_LOSSY_ENDINGS = {".jpg": ".png", ".jpeg": ".png"}
# nnU-Net's channel files: CASE_0000.ext, CASE_0001.ext, ...
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
CLASSIFICATION_BATCH = 16


# ============================================================================ sliding window


@lru_cache(maxsize=8)
def _gaussian_numpy(patch_size: tuple, sigma_scale: float) -> np.ndarray:
    axes = []
    for n in patch_size:
        centre, sigma = (n - 1) / 2.0, max(n * sigma_scale, 1e-6)
        coords = np.arange(n, dtype=np.float64)
        axes.append(np.exp(-0.5 * ((coords - centre) / sigma) ** 2))
    weights = axes[0]
    for axis in axes[1:]:
        weights = np.multiply.outer(weights, axis)
    weights = weights / weights.max()
    # Zero weights would divide by zero where only a tile border covers a voxel.
    weights = np.maximum(weights, weights[weights > 0].min())
    return weights.astype(np.float32)


def gaussian_importance_map(patch_size, sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Tile weights: a Gaussian (sigma = patch/8 per axis) peaking at 1 in the tile centre.

    As nnU-Net's ``compute_gaussian``, but evaluated analytically around the true centre
    ``(n - 1) / 2`` so the map is exactly symmetric for even sizes too. Predictions near
    tile borders (less context) count less where tiles overlap.
    """
    return torch.from_numpy(_gaussian_numpy(tuple(int(p) for p in patch_size), float(sigma_scale)))


def sliding_window_starts(image_size, patch_size, step: float = 0.5) -> list:
    """Tile start positions per axis: as few tiles as give an overlap of at least 1 - step.

    nnU-Net's ``compute_steps_for_sliding_window``: the steps are spread evenly so the
    first tile starts at 0 and the last one ends at the image border.
    """
    starts = []
    for size, tile in zip(image_size, patch_size):
        if size < tile:
            raise ValueError(f"image size {size} is smaller than the tile {tile}; pad first")
        target_step = max(tile * step, 1)
        n_steps = int(np.ceil((size - tile) / target_step)) + 1
        actual = (size - tile) / (n_steps - 1) if n_steps > 1 else 0
        starts.append([int(round(actual * i)) for i in range(n_steps)])
    return starts


def _pad_to_window(data: torch.Tensor, window) -> tuple:
    """Zero-pad spatial axes (centred) to at least the window; the slices that undo it."""
    pad_widths, crop = [], [slice(None)]
    for size, tile in zip(data.shape[1:], window):
        missing = max(tile - size, 0)
        before = missing // 2
        pad_widths.append((before, missing - before))
        crop.append(slice(before, before + size))
    if not any(sum(p) for p in pad_widths):
        return data, tuple(crop)
    flat = [w for pair in reversed(pad_widths) for w in pair]  # F.pad wants the last axis first
    return torch.nn.functional.pad(data, flat, mode="constant", value=0.0), tuple(crop)


def _mirror_combinations(mirror_axes) -> list:
    """Every subset of the mirror axes, the empty one (no flip) first."""
    if not mirror_axes:
        return [()]
    axes = tuple(int(a) for a in mirror_axes)
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


# Mirrored copies of a tile go through the network as one batch up to this many voxels:
# one call with batch 4 is cheaper on a CPU than four calls with batch 1 (fewer, larger
# kernels), while large 3D tiles stay one call per flip so memory stays bounded by the patch.
FLIP_BATCH_VOXELS = 2 ** 19


def _forward_logits(network, batch: torch.Tensor, flips: list) -> torch.Tensor:
    """Mean logits over the mirrored versions of ``batch`` (each flipped back)."""
    per_call = max(1, FLIP_BATCH_VOXELS // max(1, batch[0, 0].numel() * len(batch)))
    total = None
    for first in range(0, len(flips), per_call):
        combos = flips[first:first + per_call]
        dims = [[a + 2 for a in combo] for combo in combos]
        out = network(torch.cat([torch.flip(batch, d) if d else batch for d in dims]))
        if isinstance(out, (list, tuple)):  # deep supervision left on: full resolution first
            out = out[0]
        for d, part in zip(dims, out.float().split(len(batch))):
            part = torch.flip(part, d) if d else part
            total = part if total is None else total + part
    return total / len(flips)


def _autocast(device: torch.device):
    """Prediction autocasts like training on CUDA (fp16) and stays fp32 on CPU."""
    return autocast(device.type, "fp16" if device.type == "cuda" else "fp32")


def sliding_window_predict(network, data, patch_size, n_classes: int, step: float = 0.5,
                           mirror_axes=None, device="cpu", batch_size: int = 1) -> torch.Tensor:
    """Softmax probabilities ``(K, *spatial)`` for preprocessed ``data`` ``(C, *spatial)``.

    The image is zero-padded to at least the patch, tiled with ``step`` of the patch,
    each tile's logits weighted by a Gaussian and accumulated; with ``mirror_axes``
    (axes of the patch, e.g. ``(0, 1, 2)``) every combination of flips is averaged.
    A patch with fewer axes than ``data`` (a 2D network on a volume) is run slice by
    slice along the leading axes. Accumulation stays on ``device`` unless it does not
    fit there (then on the CPU).
    """
    device = torch.device(device)
    data = torch.as_tensor(data, dtype=torch.float32)
    patch = [int(p) for p in patch_size]
    n_slice_axes = data.ndim - 1 - len(patch)
    if n_slice_axes < 0:
        raise ValueError(f"data of shape {tuple(data.shape)} has fewer spatial axes than the patch {patch}")
    window = [1] * n_slice_axes + patch
    padded, crop = _pad_to_window(data, window)
    spatial = tuple(padded.shape[1:])
    starts = sliding_window_starts(spatial, window, step)
    tiles = list(itertools.product(*starts))
    flips = _mirror_combinations(mirror_axes)
    gaussian = gaussian_importance_map(patch).to(device)
    gaussian_window = gaussian.reshape(window)

    accumulate_on = device
    try:
        logits_sum = torch.zeros((n_classes, *spatial), dtype=torch.float32, device=device)
        weight_sum = torch.zeros(spatial, dtype=torch.float32, device=device)
    except torch.OutOfMemoryError:
        accumulate_on = torch.device("cpu")
        logits_sum = torch.zeros((n_classes, *spatial), dtype=torch.float32)
        weight_sum = torch.zeros(spatial, dtype=torch.float32)
    gaussian_acc = gaussian_window.to(accumulate_on)

    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode(), _autocast(device):
            for first in range(0, len(tiles), max(1, int(batch_size))):
                chunk = tiles[first:first + max(1, int(batch_size))]
                slicers = [tuple(slice(s, s + w) for s, w in zip(start, window)) for start in chunk]
                batch = torch.stack([padded[(slice(None),) + sl] for sl in slicers])
                batch = batch.reshape(len(chunk), data.shape[0], *patch).to(device, non_blocking=True)
                logits = _forward_logits(network, batch, flips)
                if logits.shape[1] != n_classes:
                    raise ValueError(f"network gives {logits.shape[1]} outputs, expected {n_classes}")
                logits = (logits * gaussian).to(accumulate_on)
                for tile_logits, sl in zip(logits, slicers):
                    logits_sum[(slice(None),) + sl] += tile_logits.reshape(n_classes, *window)
                    weight_sum[sl] += gaussian_acc
    finally:
        network.train(was_training)
    logits_sum /= weight_sum
    probabilities = torch.softmax(logits_sum[crop], dim=0)
    return probabilities.float().cpu()


# ============================================================================ one case


def default_mirror_axes(spec: RunSpec, tta: bool):
    """The axes training mirrored (the plan's ``mirror_axes``; None there means all), or none without TTA."""
    if not tta:
        return None
    axes = getattr(spec.configuration, "mirror_axes", None)
    return tuple(range(len(spec.configuration.patch_size))) if axes is None else tuple(axes)


def predict_case_probabilities(networks: list, spec: RunSpec, image, tta: bool = True, device="cpu",
                               case_id: str = "case"):
    """(probabilities ``(K, *original spatial shape)``, CaseProperties) for one segmentation case.

    Exactly the training preprocessing, the sliding window with every network (the folds
    of an ensemble), probabilities averaged, then resampled back into the original grid.
    """
    configuration = spec.configuration
    data, _, properties = preprocessing.preprocess_case(image, None, configuration, case_id)
    mirror_axes = default_mirror_axes(spec, tta)
    total = None
    for network in networks:
        probabilities = sliding_window_predict(network, torch.from_numpy(np.asarray(data, dtype=np.float32)),
                                               configuration.patch_size, configuration.n_outputs,
                                               mirror_axes=mirror_axes, device=device)
        total = probabilities if total is None else total + probabilities
    mean = (total / len(networks)).numpy()
    return np.asarray(preprocessing.revert_to_original(mean, properties, configuration), dtype=np.float32), properties


def probabilities_to_labels(probabilities: np.ndarray, spec: RunSpec) -> np.ndarray:
    """Label map with the dataset's label ids (output channel k is the k-th smallest id)."""
    label_values = np.asarray(sorted(int(v) for v in spec.labels.values()) or range(len(probabilities)))
    index = np.asarray(probabilities).argmax(axis=0)
    labels = label_values[index] if len(label_values) == len(probabilities) else index
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)


# ============================================================================ post-processing


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (full connectivity, as nnU-Net) of a boolean mask."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == sizes.argmax()


def apply_postprocessing(label_map: np.ndarray, postprocessing: dict | None) -> np.ndarray:
    """Keep only the largest component of every label flagged ``{label id str: true}``.

    Removed voxels become background. Labels not flagged are left as they are.
    """
    flagged = [int(label) for label, keep in (postprocessing or {}).items() if keep]
    if not flagged:
        return label_map
    result = np.array(label_map, copy=True)
    for label in flagged:
        mask = result == label
        if mask.any():
            result[mask & ~largest_component(mask)] = 0
    return result


def _dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return float("nan")  # both empty: undefined, left out of the mean (nnU-Net)
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


def decide_postprocessing(predictions, references, label_ids, spacing_per_case=None) -> dict:
    """``{label id str: bool}``: keep-largest-component where it raises the label's mean Dice.

    As nnU-Net: judged per label on the validation cases, applied only on a strict
    improvement. Removing components of one label only turns voxels into background, so
    labels are judged independently. Dice needs no spacing; ``spacing_per_case`` is
    accepted so callers can pass what they have.
    """
    decision = {}
    for label in label_ids:
        before, after = [], []
        for prediction, reference in zip(predictions, references):
            predicted, wanted = np.asarray(prediction) == label, np.asarray(reference) == label
            before.append(_dice(predicted, wanted))
            after.append(_dice(largest_component(predicted) if predicted.any() else predicted, wanted))
        keep = bool(np.isfinite(before).any() and np.nanmean(after) > np.nanmean(before))
        decision[str(int(label))] = keep
    return decision


# ============================================================================ models and inputs


@dataclass
class Ensemble:
    """The folds of a run loaded for prediction: one spec, one network per fold."""

    spec: RunSpec
    networks: list
    fold_dirs: list


def load_ensemble(model_dir, device="cpu") -> Ensemble:
    """Every fold of ``model_dir`` (a fold_K folder or its parent), checked to agree."""
    folds = fold_folders(model_dir)
    specs, networks = [], []
    for fold in folds:
        spec, network = load_trained(fold, device=device)
        specs.append(spec)
        networks.append(network)
    first = specs[0]
    for fold, spec in zip(folds[1:], specs[1:]):
        same = (spec.task_type == first.task_type and spec.configuration.name == first.configuration.name
                and spec.configuration.patch_size == first.configuration.patch_size
                and spec.labels == first.labels and spec.classes == first.classes)
        if not same:
            raise InputError(fold, f"cannot be ensembled with {folds[0]}: different task, "
                                   "configuration, patch size, labels or classes")
    return Ensemble(spec=first, networks=networks, fold_dirs=folds)


@dataclass
class InputCase:
    name: str                       # case id: the file stem (channel suffix removed)
    files: list = field(default_factory=list)   # one per channel file, or one DICOM folder

    @property
    def images(self) -> list:
        """The name ``datasets.Case`` uses, so preprocessing's readers take an InputCase."""
        return self.files


def group_input_cases(paths) -> list:
    """Cases from image files and DICOM folders; ``CASE_0000``, ``CASE_0001``... form one case.

    Files with a 4-digit suffix are grouped only when the suffixes of one stem run
    0000, 0001, ... without a gap: a lone ``scan_2019.png`` stays the case ``scan_2019``.
    """
    from autoplan.io import strip_ending

    candidates, cases = {}, []
    for path in paths:
        match = _CHANNEL_SUFFIX.match(strip_ending(path.name)) if path.is_file() else None
        if match:
            candidates.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            cases.append(InputCase(strip_ending(path.name), [path]))
    for case, channels in candidates.items():
        if sorted(channels) == list(range(len(channels))):
            cases.append(InputCase(case, [channels[c] for c in sorted(channels)]))
        else:
            cases += [InputCase(strip_ending(p.name), [p]) for p in channels.values()]
    return sorted(cases, key=lambda c: c.name)


def read_case(files, n_channels: int | None = None):
    """One ImageData from a case's channel files (channels stacked; geometry of the first).

    With ``n_channels``, a single natural image (PNG/JPEG/...) of the other count is
    converted, as classification's preprocessing does: colour to grey (luminance, as PIL
    "L") or grey repeated to 3 channels; ``meta["original_channels"]`` keeps the count
    read, so the quality check can flag it. Any other channel mismatch is an InputError.
    """
    image = preprocessing.read_case_images(InputCase("", list(files)))
    if n_channels is None or image.n_channels == n_channels:
        return image
    convertible = {image.n_channels, n_channels} == {1, 3} and len(files) == 1
    if convertible and image.source_format in NATURAL_FORMATS:
        return _convert_natural_channels(image, n_channels)
    raise InputError(files[0], f"has {image.n_channels} channel(s); the model was trained on "
                               f"{n_channels} (give one file per channel as CASE_0000, CASE_0001...)")


def _convert_natural_channels(image, n_channels: int):
    """The image converted in place (``preprocessing.convert_channels``), the count read kept."""
    image.meta["original_channels"] = image.n_channels
    image.array = np.ascontiguousarray(preprocessing.convert_channels(image.array, n_channels))
    return image


def mask_path(case: InputCase, output_dir: Path) -> Path:
    """Where a case's mask goes: the input's stem and format (JPEG → PNG, DICOM → NIfTI)."""
    from autoplan.io import file_ending

    source = case.files[0]
    ending = file_ending(source)
    if source.is_dir():
        ending = ".nii.gz"
    return Path(output_dir) / f"{case.name}{_LOSSY_ENDINGS.get(ending, ending)}"


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


@contextlib.contextmanager
def _torch_threads(n_jobs):
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


def _progress(items, desc):
    from autoplan.parallel import progress_enabled

    return tqdm(items, desc=desc, disable=not progress_enabled())


def _failure_text(case: InputCase, error: Exception) -> str:
    if isinstance(error, InputError):
        return str(error)
    return f"{case.files[0]}: {type(error).__name__}: {error}"


# ============================================================================ classification


def _flip_variants(batch: torch.Tensor, tta: bool) -> list:
    if not tta:
        return [batch]
    return [batch, torch.flip(batch, [3]), torch.flip(batch, [2]), torch.flip(batch, [2, 3])]


def classify_batch(network, batch, tta: bool = True, device="cpu") -> np.ndarray:
    """Softmax probabilities ``(B, K)`` of a normalised batch ``(B, C, H, W)``.

    With ``tta`` the identity, horizontal, vertical and both flips are averaged.
    """
    device = torch.device(device)
    batch = torch.as_tensor(batch, dtype=torch.float32).to(device)
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode(), _autocast(device):
            variants = _flip_variants(batch, tta)
            logits = network(torch.cat(variants)).float()
            probabilities = torch.softmax(logits, dim=1).reshape(len(variants), len(batch), -1).mean(0)
    finally:
        network.train(was_training)
    return probabilities.cpu().numpy()


def decision_probabilities(probabilities, imbalance: dict | None) -> np.ndarray:
    """The probabilities predictions are taken from: ``(N, K)`` model probabilities times
    ``class_weights ** -posterior_correction``, renormalised (the plan's imbalance handling;
    unchanged when it has no correction). See ``planning.POSTERIOR_CORRECTION``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    imbalance = imbalance or {}
    correction = float(imbalance.get("posterior_correction", 0.0))
    if not correction or imbalance.get("strategy") != "weighted_loss":
        return probabilities
    adjusted = probabilities * np.asarray(imbalance["class_weights"], dtype=np.float64) ** -correction
    return adjusted / adjusted.sum(axis=1, keepdims=True)


def classify_pixels(networks: list, pixels, configuration, tta: bool, device) -> np.ndarray:
    """Decision probabilities ``(N, K)`` of preprocessed pixels ``(N, H, W, C)``, averaged over
    the networks: the one place predictions and final validation turn images into decisions."""
    normalized = preprocessing.normalize_classification_batch(np.asarray(pixels), configuration)
    batch = torch.from_numpy(np.asarray(normalized))
    probabilities = np.mean([classify_batch(network, batch, tta, device) for network in networks], axis=0)
    return decision_probabilities(probabilities, configuration.imbalance)


def _predictions_csv(rows: list, classes: list, reasons: dict | None = None) -> str:
    """case, prediction, one probability per class; with ``reasons`` ({case: [reason]}) also
    the quality flags' ``flagged`` and ``reasons`` columns."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "prediction", *classes, *(QC_COLUMNS if reasons is not None else ())])
    for case, probabilities in rows:
        flags = qc_cells(reasons[case]) if reasons is not None else []
        writer.writerow([case, classes[int(np.argmax(probabilities))],
                         *(f"{p:.6f}" for p in probabilities), *flags])
    return buffer.getvalue()


def _classify_cases(ensemble: Ensemble, cases: list, tta: bool, device, failures: list, desc: str,
                    reasons: dict | None = None):
    """Yield (case, probabilities) in order, reading CLASSIFICATION_BATCH images at a time.

    With ``reasons`` (a dict), every case read is checked against the run's quality
    reference and its reasons stored under the case's name.
    """
    configuration = ensemble.spec.configuration
    n_channels = configuration.n_input_channels
    reference = run_reference(ensemble.spec) if reasons is not None else None
    bar = _progress(cases, desc)
    for first in range(0, len(cases), CLASSIFICATION_BATCH):
        chunk, pixels = [], []
        for case in cases[first:first + CLASSIFICATION_BATCH]:
            try:
                # 1 <-> 3 channels are converted by load_classification_image (any format)
                image = read_case(case.files, None if n_channels in (1, 3) else n_channels)
                # resized here, per case: a volume among the photos fails alone, not its batch
                case_pixels = preprocessing.load_classification_image(image, configuration)
                if reference is not None:
                    reasons[case.name] = check_case(image, reference, configuration)
                chunk.append(case)
                pixels.append(case_pixels)
            except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
                failures.append(_failure_text(case, error))
                tqdm.write(f"failed: {failures[-1]}", file=sys.stderr)
        if pixels:
            yield from zip(chunk, classify_pixels(ensemble.networks, np.stack(pixels), configuration, tta, device))
        bar.update(len(cases[first:first + CLASSIFICATION_BATCH]))
    bar.close()


# ============================================================================ predict_folder


def _save_probabilities(path: Path, probabilities: np.ndarray, spec: RunSpec) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities.astype(np.float32),
                        label_ids=np.asarray(sorted(int(v) for v in spec.labels.values())))
    atomic_write_bytes(path, buffer.getvalue())


def _predict_segmentation_cases(ensemble: Ensemble, cases: list, output_dir: Path, tta, device,
                                save_probabilities, failures: list, reasons: dict | None = None) -> list:
    """Masks of ``cases`` (the paths written); with ``reasons`` (a dict), each case and its
    prediction are checked against the run's quality reference, reasons stored by case name."""
    from autoplan.io import write_image

    spec = ensemble.spec
    reference = run_reference(spec) if reasons is not None else None
    written = []
    targets = {}
    for case in cases:
        targets.setdefault(mask_path(case, output_dir), []).append(case)
    for case in _progress(cases, "predict"):
        target = mask_path(case, output_dir)
        try:
            if len(targets[target]) > 1:
                others = ", ".join(str(c.files[0].name) for c in targets[target])
                raise InputError(case.files[0], f"several inputs ({others}) would write {target.name}")
            image = read_case(case.files, spec.configuration.n_input_channels)
            case_reasons = check_case(image, reference, spec.configuration) if reference is not None else []
            probabilities, _ = predict_case_probabilities(ensemble.networks, spec, image, tta, device, case.name)
            label_map = apply_postprocessing(probabilities_to_labels(probabilities, spec), spec.postprocessing)
            written.append(write_image(label_map, target, reference=image))
            if reference is not None:
                reasons[case.name] = case_reasons + check_prediction(label_map, reference)
            if save_probabilities:
                _save_probabilities(output_dir / f"{case.name}_probabilities.npz", probabilities, spec)
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the others
            failures.append(_failure_text(case, error))
            tqdm.write(f"failed: {failures[-1]}", file=sys.stderr)
    return written


def _say_what_is_skipped(input_dir: Path, images: list) -> None:
    """One line naming the entries of the input folder that are not predicted (a silent skip
    of a mistyped ending or a nested study looked like a lost case)."""
    kept = {Path(p).name for p in images}
    skipped = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(input_dir).iterdir()
                     if not p.name.startswith(".") and p.name not in kept)
    if skipped:
        listing = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        print(f"note: {input_dir}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that "
              f"{'is' if len(skipped) == 1 else 'are'} not an image or DICOM series folder: {listing}",
              file=sys.stderr)


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
    from autoplan.io import list_image_files

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_folder(input_dir, output_dir)
    images = list_image_files(input_dir)
    _say_what_is_skipped(input_dir, images)
    cases = group_input_cases(images)
    if not cases:
        raise InputError(input_dir, "holds no images (PNG/JPEG/TIFF/BMP, NIfTI/NRRD/MHA, or DICOM "
                                    "series folders)")
    failures: list = []
    with _torch_threads(n_jobs):
        ensemble = load_ensemble(model_dir, device)
        reasons = _quality_reasons(ensemble)
        started = time.perf_counter()
        output_dir.mkdir(parents=True, exist_ok=True)
        if ensemble.spec.task_type == "classification":
            classes = list(ensemble.spec.classes)
            rows = [(case.name, p) for case, p in
                    _classify_cases(ensemble, cases, tta, device, failures, "classify", reasons)]
            csv_path = output_dir / "predictions.csv"
            atomic_write_text(csv_path, _predictions_csv(rows, classes, reasons))
            written, qc_path = [csv_path], csv_path
            n_done = len(rows)
        else:
            written = _predict_segmentation_cases(ensemble, cases, output_dir, tta, device,
                                                  save_probabilities, failures, reasons)
            n_done = len(written)
            qc_path = output_dir / "qc.csv"
            if reasons is not None:
                atomic_write_text(qc_path, qc_csv(reasons))
    seconds = time.perf_counter() - started
    summary = {"task_type": ensemble.spec.task_type, "model": [str(f) for f in ensemble.fold_dirs],
               "n_cases": len(cases), "n_predicted": n_done, "written": [str(p) for p in written],
               "failed": failures, "tta": tta, "seconds": round(seconds, 3),
               "cases_per_second": round(n_done / seconds, 4) if seconds > 0 else None,
               "n_flagged": sum(1 for r in reasons.values() if r) if reasons is not None else None,
               "qc": str(qc_path) if reasons is not None else None}
    if failures:
        listing = "; ".join(failures)
        raise InputError(input_dir, f"{len(failures)} of {len(cases)} case(s) failed (the others "
                                    f"were written to {output_dir}): {listing}")
    return summary


def _quality_reasons(ensemble: Ensemble) -> dict | None:
    """An empty {case: [reason]} to fill when the run has a quality reference; None (said
    once on stderr) for runs trained before quality flags."""
    if run_reference(ensemble.spec) is not None:
        return {}
    print(f"note: {ensemble.fold_dirs[0]} has no quality reference in plan.json (trained before "
          "quality flags): cases are not compared with the training data", file=sys.stderr)
    return None


# ============================================================================ Grad-CAM samples


def _pick_gradcam_indices(y_true, y_pred, confidence, n_classes: int) -> list:
    """Per true class: the most confident correct image and the most confident wrong one.

    Falls back to a second image of the other kind when one kind is missing (at most 2).
    """
    picks = []
    for k in range(n_classes):
        members = np.flatnonzero(y_true == k)
        correct = sorted(members[y_pred[members] == k], key=lambda i: -confidence[i])
        wrong = sorted(members[y_pred[members] != k], key=lambda i: -confidence[i])
        chosen = correct[:1] + wrong[:1]
        rest = correct[1:] + wrong[1:]
        picks += [int(i) for i in (chosen + rest)[:2]]
    return picks


def gradcam_samples(network, images, y_true, probabilities, classes: list, configuration, cases: list,
                    device="cpu") -> list:
    """Grad-CAM heat maps for up to 2 images per true class (one correct, one wrong where possible).

    ``images`` are uint8 ``(N, H, W, C)`` at the network's input size. Returns
    ``[{"case", "true_class", "predicted_class", "correct", "probability", "image" (H, W, C) uint8,
    "heatmap" (H, W) 0..1}]``, ordered by class.
    """
    from autoplan.nets.gradcam import grad_cam
    from autoplan.preprocessing import normalize_classification_batch

    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    if not len(y_true):
        return []
    y_pred = probabilities.argmax(axis=1)
    picks = _pick_gradcam_indices(y_true, y_pred, probabilities.max(axis=1), len(classes))
    if not picks:
        return []
    pixels = np.stack([np.asarray(images[i]) for i in picks])
    batch = torch.from_numpy(normalize_classification_batch(pixels, configuration)).to(device)
    heatmaps = grad_cam(network, batch, target_classes=torch.as_tensor(y_pred[picks]))
    return [{"case": str(cases[i]), "true_class": classes[y_true[i]], "predicted_class": classes[y_pred[i]],
             "correct": bool(y_true[i] == y_pred[i]), "probability": float(probabilities[i, y_pred[i]]),
             "image": pixels[n], "heatmap": heatmaps[n]}
            for n, i in enumerate(picks)]


# ============================================================================ evaluate_dataset


def _run_info(ensemble: Ensemble, dataset, tta: bool, device) -> dict:
    spec = ensemble.spec
    return {"dataset": dataset.name, "trained_on": spec.dataset,
            "configuration": spec.configuration.to_dict() if hasattr(spec.configuration, "to_dict")
            else spec.configuration.__dict__,
            "options": spec.options.__dict__, "folds": [str(f) for f in ensemble.fold_dirs],
            "fold": spec.fold if len(ensemble.fold_dirs) == 1 else "ensemble",
            "tta": tta, "device": str(device), "postprocessing": spec.postprocessing,
            "evaluation": True, "citations": dataset.description.get("citation")}


def _check_dataset_fits(spec: RunSpec, dataset) -> None:
    if dataset.task_type != spec.task_type:
        raise InputError(dataset.root, f"is a {dataset.task_type} dataset; the model does {spec.task_type}")
    if not dataset.cases:
        raise InputError(dataset.root, "holds no cases")
    if spec.task_type == "segmentation":
        if {int(v) for v in dataset.labels.values()} - {int(v) for v in spec.labels.values()}:
            raise InputError(dataset.root, f"labels {dataset.labels} are not among the model's {spec.labels}")
        if any(c.label is None for c in dataset.cases):
            raise InputError(dataset.root, "has cases without a mask; evaluation needs labelled cases")
    else:
        unknown = sorted({c.class_name for c in dataset.cases} - set(spec.classes or []))
        if unknown:
            raise InputError(dataset.root, f"classes {unknown} are not among the model's {spec.classes}")


def _segmentation_samples(metrics: dict, dataset, prediction_paths: dict) -> list:
    """Best, median and worst case by mean foreground Dice, read back for the report's overlays."""
    from autoplan.io import read_image
    from autoplan.preprocessing import read_case_images
    from autoplan.report import select_sample_cases

    samples = []
    for case_id in select_sample_cases(metrics, 3):
        case = dataset.case(case_id)
        image = read_case_images(case)
        samples.append({"case": case.id, "image": image.array,
                        "reference": read_image(case.label).array[0],
                        "prediction": read_image(prediction_paths[case.id]).array[0],
                        "spacing": list(image.spacing)})
    return samples


def _evaluate_segmentation(ensemble: Ensemble, dataset, output_dir: Path, tta, device) -> dict:
    from autoplan.evaluation import segmentation_case_metrics, summarize_segmentation
    from autoplan.io import write_image
    from autoplan.preprocessing import read_case_images, read_case_labels
    from autoplan.report import write_segmentation_report

    spec = ensemble.spec
    label_ids = sorted(int(v) for v in spec.labels.values())
    foreground = [i for i in label_ids if i != 0]
    predictions_dir = output_dir / "predictions"
    per_case, prediction_paths = [], {}
    for case in _progress(dataset.cases, f"evaluate {dataset.name}"):
        image = read_case_images(case)
        reference = read_case_labels(case, image, label_ids)
        probabilities, _ = predict_case_probabilities(ensemble.networks, spec, image, tta, device, case.id)
        prediction = apply_postprocessing(probabilities_to_labels(probabilities, spec), spec.postprocessing)
        ending = dataset.file_ending if dataset.file_ending not in _LOSSY_ENDINGS else ".png"
        prediction_paths[case.id] = write_image(prediction, predictions_dir / f"{case.id}{ending}", image)
        per_case.append({"case": case.id, "per_label": segmentation_case_metrics(
            prediction, reference, foreground, image.spacing)})
    metrics = summarize_segmentation(per_case, spec.foreground_labels)
    write_json(output_dir / "metrics.json", metrics)
    samples = _segmentation_samples(metrics, dataset, prediction_paths)
    write_segmentation_report(output_dir, metrics, _run_info(ensemble, dataset, tta, device), samples,
                              log_csv=None)
    return metrics


def _evaluate_classification(ensemble: Ensemble, dataset, output_dir: Path, tta, device) -> dict:
    from autoplan.evaluation import classification_metrics
    from autoplan.preprocessing import load_classification_image
    from autoplan.report import write_classification_report

    spec = ensemble.spec
    classes = list(spec.classes)
    cases = [InputCase(c.id, list(c.images)) for c in dataset.cases]
    failures: list = []
    rows = list(_classify_cases(ensemble, cases, tta, device, failures, f"evaluate {dataset.name}"))
    if failures:
        raise InputError(dataset.root, f"{len(failures)} case(s) could not be read: {'; '.join(failures)}")
    case_ids = [case.name for case, _ in rows]
    probabilities = np.stack([p for _, p in rows])
    y_true = np.asarray([classes.index(dataset.case(c).class_name) for c in case_ids])
    metrics = classification_metrics(y_true, probabilities, classes, case_ids)
    write_json(output_dir / "metrics.json", metrics)
    atomic_write_text(output_dir / "predictions.csv", _predictions_csv(
        [(c, p) for c, p in zip(case_ids, probabilities)], classes))
    # Grad-CAM needs the pixels of only the few picked images: read those again.
    picks = _pick_gradcam_indices(y_true, probabilities.argmax(1), probabilities.max(1), len(classes))
    pixels = {i: load_classification_image(read_case(dataset.case(case_ids[i]).images), spec.configuration)
              for i in picks}
    lookup = _LazyImages(pixels)
    gradcam = gradcam_samples(ensemble.networks[0], lookup, y_true, probabilities, classes,
                              spec.configuration, case_ids, device=device)
    write_classification_report(output_dir, metrics, y_true, probabilities, classes,
                                _run_info(ensemble, dataset, tta, device), gradcam, log_csv=None)
    return metrics


class _LazyImages:
    """images[i] for the few indices Grad-CAM picks, without holding every image."""

    def __init__(self, pixels: dict):
        self.pixels = pixels

    def __getitem__(self, index):
        return self.pixels[int(index)]


def evaluate_dataset(model_dir, dataset, output_dir=None, tta: bool = True, device="cpu",
                     n_jobs: int | None = None) -> dict:
    """Predict every case of a labelled dataset; write metrics.json, report.html/.md and pictures.

    ``output_dir`` defaults to ``<model_dir>/<dataset name>/``. Segmentation compares with
    ``labelsTr`` (per-case metrics with each image's spacing; the predicted masks are kept
    in ``predictions/``); classification with the cases' classes (``predictions.csv`` too).
    Returns the metrics dict.
    """
    output_dir = Path(output_dir) if output_dir is not None else Path(model_dir) / dataset.name
    with _torch_threads(n_jobs):
        ensemble = load_ensemble(model_dir, device)
        _check_dataset_fits(ensemble.spec, dataset)
        output_dir.mkdir(parents=True, exist_ok=True)
        if ensemble.spec.task_type == "classification":
            return _evaluate_classification(ensemble, dataset, output_dir, tta, device)
        return _evaluate_segmentation(ensemble, dataset, output_dir, tta, device)
