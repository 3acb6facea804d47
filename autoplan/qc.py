"""Quality flags: does a new case, or its prediction, look like the training data?

A network answers for any input, also for inputs unlike anything it was trained on (a
3D MRI given to a chest X-ray model, a blank image, a photo given to a grey model).
``qc_reference(fingerprint, configuration)`` keeps, with the run, the few ranges of the
training data these checks need; ``check_case`` compares a case read for prediction
with them and ``check_prediction`` a predicted label map. Both return human-readable
reasons (an empty list: nothing unusual). ``autoplan predict`` writes them to ``qc.csv``.

Every threshold is generous on purpose: a flag must mean "look at this case", not
"this case is at the edge of the training distribution".
"""

import csv
import io
from dataclasses import dataclass, field

import numpy as np

from autoplan.fingerprint import (
    format_number,
    format_shape,
    full_component_count,
    intensity_percentiles,
)
from autoplan.io import NATURAL_FORMATS
from autoplan.jsonio import JsonDataclass

# A model that resizes every image to its working size (field_of_view "fit", classifiers)
# copes with sizes unlike training up to a point: beyond 10x the smallest or largest training
# image, detail is invented (an upscaled image) or lost (a tiny one). A 2048 px chest X-ray
# (9x) given to a model trained on 224 px copies still works; a 16x upscaled copy is flagged.
RESIZE_LIMIT = 10.0
# A model working in mm sees the physical field of view: an extent beyond 4x the training
# range shows anatomy the patches never held (a whole body given to a hippocampus model).
EXTENT_FACTOR = 4.0
# Spacing beyond 3x the training range means resampling that blurs or invents that much detail.
SPACING_FACTOR = 3.0
# Brightest values (p99.5) 4x above or below every training image: another scale or modality.
INTENSITY_FACTOR = 4.0
# CT is calibrated (Hounsfield units): a median 500 HU beyond the training range is another
# body region, a contrast phase far from training, or an uncalibrated scan.
CT_MEDIAN_MARGIN_HU = 500.0
# A predicted structure a third of the smallest or 3x the largest seen in training is
# implausible: usually a failed prediction, not unusual anatomy.
LABEL_FRACTION_FACTOR = 3.0
# Fragmented predictions (more pieces than 2x the training maximum + 2) mean the network
# is unsure; the slack of 2 allows a stray voxel or two on a one-piece structure.
COMPONENTS_FACTOR = 2
COMPONENTS_SLACK = 2
# A colour model given a grey picture saved as RGB (an exported radiograph): its channel
# medians agree to within 1 % of its range, while 99 % of training photos differ by more than
# 4x that (dermoscopy: skin is red, not grey). Only checked when training was that colourful.
COLOUR_SPREAD_FLOOR = 0.01
COLOUR_SPREAD_FACTOR = 4.0
# Classifiers stretch every image to the input size: an aspect ratio 1.5x beyond the
# training range distorts shapes more than training ever did.
ASPECT_RATIO_FACTOR = 1.5


@dataclass
class QcReference(JsonDataclass):
    """What the checks compare with: ranges over the training cases (stored in plan.json)."""

    task_type: str
    dim: int
    n_channels: int
    channel_kinds: list                    # per channel: 'ct' | 'mr' | 'xray' | 'grey' | 'rgb'
    source_formats: list                   # distinct training image formats
    n_cases: int
    shape_min: list                        # per axis, array axis order
    shape_max: list
    spacing_min: list                      # mm (1.0 where files store none)
    spacing_max: list
    extent_min: list                       # shape x spacing, mm
    extent_max: list
    configuration: str = ""                # the configuration the reference was made for
    intensity: list = field(default_factory=list)  # per channel {"p00_5"|"p50"|"p99_5": [min, max]}
    labels: dict = field(default_factory=dict)     # label id str -> {"name", "fraction_min",
    #   "fraction_max" (over cases where present), "case_fraction", "components_max"}
    aspect_ratio_min: float | None = None  # width / height (classification)
    aspect_ratio_max: float | None = None
    colour_spread_p01: float | None = None  # 3 channels: 1st percentile over cases of colour_spread()


# ============================================================================ reference


def qc_reference(fingerprint, configuration) -> QcReference:
    """The reference of a run of ``configuration`` trained on the fingerprinted dataset.

    Fields the fingerprint lacks (older fingerprints) stay empty: their checks are skipped.
    """
    shapes = np.asarray(fingerprint.shapes, dtype=float)
    spacings = np.asarray(fingerprint.spacings, dtype=float)
    extents = shapes * spacings
    aspect = fingerprint.aspect_ratios or {}
    return QcReference(
        task_type=fingerprint.task_type, dim=int(fingerprint.dim), n_channels=len(fingerprint.channels),
        channel_kinds=[c.kind for c in fingerprint.channels],
        source_formats=list(fingerprint.source_formats or []), n_cases=int(fingerprint.n_cases),
        shape_min=shapes.min(0).tolist(), shape_max=shapes.max(0).tolist(),
        spacing_min=spacings.min(0).tolist(), spacing_max=spacings.max(0).tolist(),
        extent_min=extents.min(0).tolist(), extent_max=extents.max(0).tolist(),
        configuration=configuration.name,
        intensity=_intensity_ranges(fingerprint.per_case_intensity_percentiles),
        labels=_label_ranges(fingerprint),
        aspect_ratio_min=aspect.get("min"), aspect_ratio_max=aspect.get("max"),
        colour_spread_p01=_colour_spread_p01(fingerprint.per_case_intensity_percentiles),
    )


def colour_spread(percentiles) -> float:
    """How far apart the channel medians of one image are, relative to its range (0: grey)."""
    values = np.asarray(percentiles, dtype=float)  # (channels, [p0.5, p50, p99.5])
    value_range = max(float(values[:, 2].max() - values[:, 0].min()), 1e-6)
    return float(values[:, 1].max() - values[:, 1].min()) / value_range


def _colour_spread_p01(per_case) -> float | None:
    if not per_case or np.asarray(per_case).shape[1] != 3:
        return None
    return float(np.percentile([colour_spread(case) for case in per_case], 1))


def _intensity_ranges(per_case) -> list:
    if not per_case:
        return []
    values = np.asarray(per_case, dtype=float)  # (cases, channels, 3)
    return [{name: [float(values[:, c, k].min()), float(values[:, c, k].max())]
             for k, name in enumerate(("p00_5", "p50", "p99_5"))}
            for c in range(values.shape[1])]


def _label_ranges(fingerprint) -> dict:
    """Per foreground label: its fraction range where present, how often present, most pieces."""
    fractions = [f for f in (fingerprint.per_case_label_fractions or []) if f is not None]
    components = [c for c in (fingerprint.per_case_label_components or []) if c is not None]
    ranges = {}
    for label_id, stats in (fingerprint.labels or {}).items():
        present = [f[label_id] for f in fractions if f.get(label_id, 0) > 0]
        counts = [c[label_id] for c in components if label_id in c]
        ranges[label_id] = {
            "name": stats.name,
            "fraction_min": min(present) if present else None,
            "fraction_max": max(present) if present else None,
            "case_fraction": stats.case_fraction,
            # older fingerprints: face-connected counts, which are never fewer
            "components_max": max(counts) if counts else stats.components_per_case_max,
        }
    return ranges


def run_reference(spec) -> QcReference | None:
    """The reference stored in a run's plan.json; None for runs trained before quality flags."""
    stored = getattr(spec, "qc_reference", None)
    return QcReference.from_dict(stored) if stored else None


# ============================================================================ a case


def check_case(image, reference: QcReference, configuration) -> list:
    """Why the case ``image`` (an ``ImageData`` as read for prediction) looks unlike the
    training images; an empty list when nothing does."""
    content = _content_reasons(image.array)
    reasons = _dimension_reasons(image, reference) + _channel_reasons(image, reference, configuration) + content
    if image.dim == reference.dim and image.array.size:  # axes compare only when dimensionality agrees
        reasons += _size_reasons(image, reference, configuration)
    if not content:  # a constant image's percentiles say nothing more
        reasons += _intensity_reasons(image, reference) + _colour_reasons(image, reference)
    return reasons


def _dimension_reasons(image, reference) -> list:
    if image.dim == reference.dim:
        return []
    formats = f" ({', '.join(reference.source_formats)})" if reference.source_formats else ""
    if image.dim == 3:
        return [f"3D volume ({format_shape(image.spatial_shape)}); the model was trained on 2D images{formats}: "
                "predicted slice by slice"]
    return [f"{image.dim}D image; the model was trained on {reference.dim}D volumes{formats}"]


def _channel_reasons(image, reference, configuration) -> list:
    """The channel count read (before any conversion) against the training images'."""
    read = int(image.meta.get("original_channels", image.n_channels))
    trained = reference.n_channels
    if read == trained:
        return []
    model = int(configuration.n_input_channels)
    if read == 3 and trained == 1:
        done = ": converted to grey (luminance)" if model == 1 else ""
        return [f"colour image (3 channels); the model was trained on grey images{done}"]
    if read == 1 and trained == 3:
        done = ": repeated to 3 channels" if model == 3 else ""
        return [f"grey image (1 channel); the model was trained on colour images{done}"]
    return [f"{read} channels; the training images had {trained}"]


def _content_reasons(array) -> list:
    if array.size == 0:
        return ["empty image (no pixels)"]
    if array.dtype.kind == "f" and np.isnan(array).any():
        return ["contains NaN values"]
    low, high = array.min(), array.max()
    if low == high:
        return [f"constant image (every value {format_number(low)})"]
    return []


def _size_reasons(image, reference, configuration) -> list:
    if _resized_to_fit(reference, configuration):
        return _resize_reasons(image, reference) + _aspect_reasons(image, reference)
    unit = "pixels" if image.source_format in NATURAL_FORMATS else "mm"  # PNG/JPEG store no spacing
    shape = np.asarray(image.spatial_shape, dtype=float)
    spacing = np.asarray(image.spacing, dtype=float)
    return (_range_reasons("extent", shape * spacing, reference.extent_min, reference.extent_max,
                           EXTENT_FACTOR, unit)
            + _range_reasons("spacing", spacing, reference.spacing_min, reference.spacing_max,
                             SPACING_FACTOR, "mm"))


def _resized_to_fit(reference, configuration) -> bool:
    """Whether the model resizes each image to its working size (rather than working in mm)."""
    field_of_view = getattr(configuration, "field_of_view", None) or {}
    return reference.task_type == "classification" or field_of_view.get("mode") == "fit"


def _resize_reasons(image, reference) -> list:
    shape = np.asarray(image.spatial_shape, dtype=float)
    larger = shape / np.asarray(reference.shape_max, dtype=float)
    smaller = np.asarray(reference.shape_min, dtype=float) / shape
    reasons = []
    if larger.max() > RESIZE_LIMIT:
        reasons.append(f"{format_shape(shape)} pixels, {larger.max():.1f}x the largest training image "
                       f"({format_shape(reference.shape_max)}): resized more than {RESIZE_LIMIT:g}x beyond training")
    if smaller.max() > RESIZE_LIMIT:
        reasons.append(f"{format_shape(shape)} pixels, 1/{smaller.max():.1f} of the smallest training image "
                       f"({format_shape(reference.shape_min)}): resized more than {RESIZE_LIMIT:g}x beyond training")
    return reasons


def _aspect_reasons(image, reference) -> list:
    if reference.aspect_ratio_min is None or image.dim != 2:
        return []
    height, width = image.spatial_shape
    ratio = width / height
    low = reference.aspect_ratio_min / ASPECT_RATIO_FACTOR
    high = reference.aspect_ratio_max * ASPECT_RATIO_FACTOR
    if low <= ratio <= high:
        return []
    return [f"aspect ratio (width/height) {ratio:.2f}; training images {reference.aspect_ratio_min:.2f}.."
            f"{reference.aspect_ratio_max:.2f}: stretched to the input size more than training ever was"]


def _range_reasons(what, values, minimum, maximum, factor, unit) -> list:
    """One reason when any axis of ``values`` lies outside [minimum / factor, maximum x factor]."""
    minimum, maximum = np.asarray(minimum, dtype=float), np.asarray(maximum, dtype=float)
    if len(values) != len(minimum):
        return []
    outside = (values < minimum / factor) | (values > maximum * factor)
    if not outside.any():
        return []
    return [f"{what} {format_shape(values)} {unit}; training {format_shape(minimum)} to {format_shape(maximum)} "
            f"(flagged beyond {factor:g}x)"]


def _intensity_reasons(image, reference) -> list:
    values = _comparable_channels(image.array, reference.n_channels)
    if values is None or not reference.intensity:
        return []
    reasons = []
    for channel, (percentiles, training) in enumerate(zip(intensity_percentiles(values), reference.intensity)):
        name = f"channel {channel} ({reference.channel_kinds[channel]})"
        reasons += _brightness_reasons(name, percentiles[2], *training["p99_5"])
        if reference.channel_kinds[channel] == "ct":
            reasons += _ct_median_reasons(name, percentiles[1], *training["p50"])
    return reasons


def _colour_reasons(image, reference) -> list:
    training = reference.colour_spread_p01
    if training is None or image.n_channels != 3 or training < COLOUR_SPREAD_FACTOR * COLOUR_SPREAD_FLOOR:
        return []
    spread = colour_spread(intensity_percentiles(image.array))
    if spread >= COLOUR_SPREAD_FLOOR:
        return []
    return [f"grey picture in colour channels (channel medians {spread:.1%} of the range apart; 99% of "
            f"training images over {training:.1%}): the model was trained on colour photos"]


def _comparable_channels(array, n_channels: int):
    """The image's channels as the model gets them (grey from colour, colour from grey), or None."""
    from autoplan.preprocessing import convert_channels

    converted = convert_channels(array, n_channels)
    return converted if converted.shape[0] == n_channels else None


def _brightness_reasons(name, p99_5, training_low, training_high) -> list:
    if training_high > 0 and p99_5 > INTENSITY_FACTOR * training_high:
        return [f"{name}: brightest values (p99.5 {format_number(p99_5)}) more than {INTENSITY_FACTOR:g}x "
                f"the training images' (at most {format_number(training_high)})"]
    if training_low > 0 and p99_5 < training_low / INTENSITY_FACTOR:
        return [f"{name}: brightest values (p99.5 {format_number(p99_5)}) under 1/{INTENSITY_FACTOR:g} of "
                f"the training images' (at least {format_number(training_low)})"]
    return []


def _ct_median_reasons(name, median, training_low, training_high) -> list:
    if training_low - CT_MEDIAN_MARGIN_HU <= median <= training_high + CT_MEDIAN_MARGIN_HU:
        return []
    return [f"{name}: median {format_number(median)} HU; training medians {format_number(training_low)}.."
            f"{format_number(training_high)} HU (flagged beyond {CT_MEDIAN_MARGIN_HU:g} HU outside)"]


# ============================================================================ a prediction


def check_prediction(label_map, reference: QcReference) -> list:
    """Why a predicted label map (dataset label ids) looks unlike the training labels."""
    label_map = np.asarray(label_map)
    reasons = []
    for label_id, stats in reference.labels.items():
        mask = label_map == int(label_id)
        name = f"{stats['name']} (label {label_id})"
        if not mask.any():
            if stats["case_fraction"] >= 1.0:
                reasons.append(f"no {name} predicted; every training case has it")
            continue
        reasons += _fraction_reasons(name, float(mask.mean()), stats)
        reasons += _component_reasons(name, mask, stats["components_max"])
    return reasons


def _fraction_reasons(name, fraction, stats) -> list:
    low, high = stats.get("fraction_min"), stats.get("fraction_max")
    if low is None or high is None:
        return []
    if fraction < low / LABEL_FRACTION_FACTOR or fraction > high * LABEL_FRACTION_FACTOR:
        return [f"{name} covers {fraction:.3%} of the image; training cases {low:.3%}..{high:.3%} "
                f"(flagged beyond {LABEL_FRACTION_FACTOR:g}x)"]
    return []


def _component_reasons(name, mask, training_max) -> list:
    limit = COMPONENTS_FACTOR * int(training_max) + COMPONENTS_SLACK
    pieces = full_component_count(mask)
    if pieces <= limit:
        return []
    return [f"{name} in {pieces} pieces; training cases had at most {training_max} "
            f"(flagged above {limit})"]


# ============================================================================ qc.csv


QC_COLUMNS = ("flagged", "reasons")


def qc_csv(reasons_by_case: dict) -> str:
    """``case,flagged,reasons`` with one row per case (flagged: true/false; reasons joined by "; ")."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", *QC_COLUMNS])
    for case, reasons in reasons_by_case.items():
        writer.writerow([case, *qc_cells(reasons)])
    return buffer.getvalue()


def qc_cells(reasons: list) -> list:
    """The ``flagged`` and ``reasons`` cells of one case."""
    return ["true" if reasons else "false", "; ".join(reasons)]
