"""Segmentation plans: target spacing, normalisation, field of view, the 2d / 3d_fullres /
3d_lowres / 3d_cascade_fullres configurations and what labels that name a side forbid."""

import re
from dataclasses import replace

import numpy as np

from autoplan.artifacts import Configuration
from autoplan.errors import InputError
from autoplan.fingerprint import ANISOTROPY_THRESHOLD
from autoplan.planning.cost import planned_memory_gb
from autoplan.planning.schedule import PlanningContext
from autoplan.planning.unet import REFERENCE_GPU_GB, UNetRequest, fit_unet_to_memory, plan_unet_configuration

LOWRES_THRESHOLD = 0.25             # 3d_lowres when the fullres patch covers < 25% of the median image
LOWRES_SPACING_STEP = 1.03          # nnU-Net's spacing increase per lowres attempt


def target_spacing(fingerprint) -> list:
    """Median spacing; an axis > 3x coarser than the others (in spacing and with > 3x fewer
    voxels) takes its 10th percentile instead, never finer than the other axes (nnU-Net)."""
    spacings = np.array(fingerprint.spacings, dtype=np.float64)
    shapes = np.array(_shapes_after_crop(fingerprint), dtype=np.float64)
    target = np.percentile(spacings, 50, axis=0)
    if len(target) < 2:
        return target.tolist()
    median_size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    coarse_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[a] for a in others)
    few_voxels = median_size[worst] * ANISOTROPY_THRESHOLD < min(median_size[a] for a in others)
    if coarse_spacing and few_voxels:
        tenth = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(tenth, max(target[a] for a in others) + 1e-5)
    return [round(float(s), 6) for s in target]


def _shapes_after_crop(fingerprint) -> list:
    shapes = fingerprint.cropped_shapes or fingerprint.shapes
    return [list(s) for s in shapes]


def median_shape_at(fingerprint, spacing) -> list:
    """Median over cases of the shape after cropping, resampled to ``spacing``."""
    shapes = np.array(_shapes_after_crop(fingerprint), dtype=np.float64)
    spacings = np.array(fingerprint.spacings, dtype=np.float64)
    resampled = np.round(shapes * spacings / np.array(spacing, dtype=np.float64))
    return [float(v) for v in np.median(resampled, axis=0)]


def spacing_reason(fingerprint, spacing) -> str:
    median = [round(float(s), 6) for s in np.percentile(np.array(fingerprint.spacings, dtype=float), 50, axis=0)]
    if list(median) == list(spacing):
        return f"{spacing}: the median spacing of the dataset"
    return (f"{spacing}: median {median}, but the coarsest axis is > {ANISOTROPY_THRESHOLD:g}x coarser "
            f"than the others, so it takes the 10th percentile of its spacings (less interpolation)")


def segmentation_normalization(fingerprint) -> tuple[list, str]:
    schemes, reasons = [], []
    use_mask = (fingerprint.median_relative_size_after_cropping is not None
                and fingerprint.median_relative_size_after_cropping < 0.75)
    for c, channel in enumerate(fingerprint.channels):
        stats = fingerprint.intensity[c] if fingerprint.intensity and c < len(fingerprint.intensity) else None
        if channel.kind == "ct" and stats is not None:
            schemes.append({"scheme": "ct", "clip": [float(stats.percentile_00_5), float(stats.percentile_99_5)],
                            "mean": float(stats.mean), "std": float(stats.std)})
            reasons.append(f"{channel.name}: CT (HU are comparable across scans): clip to the foreground "
                           f"0.5/99.5 percentiles, then z-score with the foreground mean/std")
        elif channel.kind == "rgb":
            mean, std = _rgb_stats(fingerprint, c, stats)
            schemes.append({"scheme": "rgb", "mean": mean, "std": std})
            reasons.append(f"{channel.name}: 8-bit colour: scale to 0..1, then the dataset's channel mean/std")
        elif use_mask:
            schemes.append({"scheme": "zscore_nonzero"})
            reasons.append(f"{channel.name}: per-image z-score inside the nonzero mask (cropping shrank "
                           f"images to {fingerprint.median_relative_size_after_cropping:.2f} of their size, "
                           f"so the zero background is not tissue)")
        else:
            schemes.append({"scheme": "zscore"})
            scales = " (intensity scales differ between cases)" if fingerprint.intensity_scales_differ else ""
            reasons.append(f"{channel.name}: per-image z-score ({channel.kind} intensities have no fixed "
                           f"unit){scales}")
    return schemes, "; ".join(reasons)


def _rgb_stats(fingerprint, c, stats) -> tuple[float, float]:
    if fingerprint.channel_mean and fingerprint.channel_std and c < len(fingerprint.channel_mean):
        return float(fingerprint.channel_mean[c]), max(float(fingerprint.channel_std[c]), 1e-6)
    if stats is not None:
        return float(stats.mean) / 255.0, max(float(stats.std) / 255.0, 1e-6)
    return 0.5, 0.25


def _n_segmentation_outputs(dataset, fingerprint) -> int:
    labels = getattr(dataset, "labels", None)
    if labels:
        return max(int(v) if not isinstance(v, (list, tuple)) else int(v[0]) for v in labels.values()) + 1
    if fingerprint.labels:
        return max(int(k) for k in fingerprint.labels) + 1
    return 2


def lowres_spacing_and_shape(spacing, median_shape, fullres_patch, plan_patch) -> tuple | None:
    """nnU-Net's 3d_lowres search: coarsen the spacing in 3% steps (anisotropic axes first)
    until the planned patch covers a quarter of the coarser median image. None when the
    fullres patch already covers a quarter, or the coarser image would not be at least
    2x smaller (then lowres brings nothing)."""
    median = np.array(median_shape, dtype=np.float64)
    if np.prod(fullres_patch, dtype=np.float64) / np.prod(median) >= LOWRES_THRESHOLD:
        return None
    fullres_spacing = np.array(spacing, dtype=np.float64)
    lowres = fullres_spacing.copy()
    lowres_median = median
    for _ in range(500):
        coarsest = lowres.max()
        fine_axes = coarsest / lowres > 2
        if fine_axes.any():
            lowres[fine_axes] *= LOWRES_SPACING_STEP
        else:
            lowres *= LOWRES_SPACING_STEP
        lowres_median = fullres_spacing / lowres * median
        patch = plan_patch(lowres.tolist(), lowres_median.tolist())
        if np.prod(patch, dtype=np.float64) / np.prod(lowres_median) >= LOWRES_THRESHOLD:
            break
    if np.prod(median) / np.prod(lowres_median) < 2:
        return None
    return [round(float(s), 6) for s in lowres], [float(m) for m in lowres_median]


FIELD_OF_VIEW_MODES = ("auto", "fit", "pixels")


def has_no_pixel_size(fingerprint) -> bool:
    """2D images whose every case carries the default spacing 1.0: PNG/JPEG/TIFF/BMP store no
    pixel size, so "1 mm" is a placeholder and new images of another size are not at the same scale."""
    return fingerprint.dim == 2 and all(all(float(s) == 1.0 for s in case) for case in fingerprint.spacings)


def plan_field_of_view(fingerprint, mode: str = "auto") -> tuple[dict, str]:
    """(field_of_view, reason): resample each image whole to the working size, or keep pixels/mm.

    ``auto`` fits the field of view for 2D datasets without a pixel size; ``fit`` forces it on
    a 2D dataset; ``pixels`` keeps today's pixel-as-millimetre behaviour (images that share
    one pixel size, e.g. microscopy at a fixed magnification).
    """
    if mode not in FIELD_OF_VIEW_MODES:
        raise InputError(None, f"unknown field-of-view mode {mode!r} (auto, fit, pixels)")
    if fingerprint.dim != 2 or mode == "pixels" or (mode == "auto" and not has_no_pixel_size(fingerprint)):
        why = ("--field-of-view pixels: images share one pixel size, so they are resampled by it"
               if mode == "pixels" else "images carry a physical spacing: resampled by it (mm)")
        return {}, why
    working = [int(round(m)) for m in fingerprint.median_shape]
    return ({"mode": "fit", "working_size": working},
            f"images store no pixel size: every image (training and new) is resized whole, aspect kept, to fit "
            f"the median image {working} and predictions are resized back, so a 1000-px radiograph is seen at "
            f"the scale the network learnt ({'forced by --field-of-view fit' if mode == 'fit' else 'auto'})")


def field_of_view_spacings(fingerprint, working_size) -> list:
    """Per case the virtual pixel size that fits the image into ``working_size`` (aspect kept)."""
    from autoplan.preprocessing import fit_scale

    return [[fit_scale(shape, working_size)] * len(shape) for shape in fingerprint.shapes]


def _working_grid(fingerprint, field_of_view_mode: str) -> tuple:
    """(fingerprint on the working grid, target spacing, field_of_view, its reason, spacing reason)."""
    field_of_view, fov_reason = plan_field_of_view(fingerprint, field_of_view_mode)
    if not field_of_view:
        spacing = target_spacing(fingerprint)
        return fingerprint, spacing, field_of_view, fov_reason, spacing_reason(fingerprint, spacing)
    # the working grid's unit is one pixel of an image at the working size
    working = field_of_view["working_size"]
    fingerprint = replace(fingerprint, spacings=field_of_view_spacings(fingerprint, working))
    spacing = [1.0] * fingerprint.dim
    return (fingerprint, spacing, field_of_view, fov_reason,
            f"{spacing}: one pixel of an image resized to the working size {working}")


LOWRES_MODES = ("auto", "always")
FORCED_LOWRES_FACTOR = 2.0          # lowres="always" where nnU-Net's rule plans none: half the resolution


def plan_segmentation(dataset, fingerprint, context: PlanningContext, base_features: int,
                      field_of_view_mode: str = "auto", lowres_mode: str = "auto") -> tuple[dict, str, list]:
    """(configurations in order 2d, 3d_lowres, 3d_fullres, 3d_cascade_fullres; the default one; planner notes)."""
    fingerprint, spacing, field_of_view, fov_reason, spacing_text = _working_grid(fingerprint, field_of_view_mode)
    median = median_shape_at(fingerprint, spacing)
    sided = _sided_labels(dataset, fingerprint)
    request = UNetRequest(name="3d_fullres", dim=fingerprint.dim, spacing=spacing, median_shape=median,
                          total_voxels=float(np.prod(median, dtype=np.float64)) * fingerprint.n_cases,
                          in_channels=len(fingerprint.channels), n_outputs=_n_segmentation_outputs(dataset, fingerprint),
                          base_features=base_features, mirror_axes=list(range(fingerprint.dim - 1)) if sided else None)
    normalization = segmentation_normalization(fingerprint)
    notes, configurations = [], {}
    if fingerprint.dim == 3:
        fullres = plan_unet_configuration(request, context, *normalization)
        if lowres_mode not in LOWRES_MODES:
            raise InputError(None, f"unknown lowres mode {lowres_mode!r} ({', '.join(LOWRES_MODES)})")
        lowres = _plan_lowres(request, fingerprint.n_cases, context, normalization, notes,
                              force=lowres_mode == "always")
        fullres.batch_dice = lowres is not None
        fullres.reasons["spacing"] = spacing_text
        fullres.reasons["batch_dice"] = ("Dice over the whole batch (a cascade follows)" if lowres is not None
                                         else "per-sample Dice (nnU-Net: batch Dice only with a lowres stage)")
        configurations = {"3d_fullres": fullres}
        if lowres is not None:
            configurations = {"3d_lowres": lowres, "3d_fullres": fullres,
                              "3d_cascade_fullres": plan_cascade(fullres, context.device)}
        request_2d = replace(request, name="2d", dim=2, spacing=spacing[1:], median_shape=median[1:],
                             mirror_axes=[0] if sided else None)
    else:
        request_2d = replace(request, name="2d")
    config_2d = plan_unet_configuration(request_2d, context, *normalization)
    config_2d.batch_dice = True
    config_2d.reasons["spacing"] = (spacing_text if fingerprint.dim == 2 else
                                    f"in-plane axes of the 3D target spacing {spacing}")
    config_2d.reasons["batch_dice"] = "Dice over the whole batch (nnU-Net's 2d default)"
    configurations = {"2d": config_2d, **configurations}
    for configuration in configurations.values():
        _respect_label_sides(configuration, sided)
        configuration.reasons["field_of_view"] = fov_reason
    config_2d.field_of_view = field_of_view
    return configurations, "3d_fullres" if fingerprint.dim == 3 else "2d", notes


SIDE_WORDS = re.compile(r"(^|[^a-z])(left|right)([^a-z]|$)", re.IGNORECASE)
LATERAL_MAX_ROTATION = 15.0


def _sided_labels(dataset, fingerprint) -> list:
    """The label names that name a side (left/right), from the dataset or the fingerprint."""
    if dataset is not None and not isinstance(dataset, str) and getattr(dataset, "labels", None):
        names = [name for name, value in dataset.labels.items() if value != 0]
    else:
        names = [stats.name for stats in (fingerprint.labels or {}).values()]
    return [name for name in names if SIDE_WORDS.search(name)]


def _respect_label_sides(configuration: Configuration, sided: list) -> None:
    """Labels that name a side (left/right lung) must not be mirrored across the body.

    Mirroring the last array axis (x: left-right in radiographs and axial volumes) or
    rotating by up to 180 degrees turns a right lung into a left one, so the targets would
    contradict each other; mirroring stays on the other axes (``UNetRequest.mirror_axes``,
    set before planning so the final-validation reserve counts the right TTA passes) and
    rotation is capped.
    """
    if not sided:
        configuration.reasons["mirror_axes"] = "every axis (no label names a side)"
        return
    configuration.mirror_axes = list(range(configuration.dim - 1))
    configuration.max_rotation_degrees = LATERAL_MAX_ROTATION
    configuration.reasons["mirror_axes"] = (
        f"labels {', '.join(sided)} name a side: no mirroring along x (it would swap them) "
        f"and rotation capped at {LATERAL_MAX_ROTATION:g} degrees, in training and TTA")


def _plan_lowres(fullres: UNetRequest, n_cases: int, context: PlanningContext, normalization: tuple,
                 notes: list, force: bool = False) -> Configuration | None:
    """nnU-Net's 3d_lowres stage when the fullres patch covers too little of the image (else None,
    with a note saying why). ``force`` (``plan_dataset(lowres="always")``) plans one at
    FORCED_LOWRES_FACTOR times the spacing where the rule plans none: a CPU plan's patch covers
    far less of the image than the 8 GB GPU patch the rule measures, and benchmarks/cascade.py
    measures the cascade on volumes a CPU trains in minutes."""
    budget_gb = context.budget_gb if context.device == "cuda" else REFERENCE_GPU_GB
    reference_patch = fit_unet_to_memory(fullres, budget_gb).configuration.patch_size
    coverage = float(np.prod(reference_patch, dtype=np.float64) / np.prod(fullres.median_shape))

    def lowres_request(lowres_spacing, lowres_median) -> UNetRequest:
        return fullres.at("3d_lowres", lowres_spacing, lowres_median, float(np.prod(lowres_median)) * n_cases)

    found = lowres_spacing_and_shape(fullres.spacing, fullres.median_shape, reference_patch,
                                     lambda *grid: fit_unet_to_memory(lowres_request(*grid), budget_gb)
                                     .configuration.patch_size)
    forced = found is None and force
    if forced:
        found = ([round(s * FORCED_LOWRES_FACTOR, 6) for s in fullres.spacing],
                 [m / FORCED_LOWRES_FACTOR for m in fullres.median_shape])
    if found is None:
        notes.append(f"no 3d_lowres: the 3d_fullres patch covers {coverage:.0%} of the median image "
                     f"(a lowres stage is planned below {LOWRES_THRESHOLD:.0%}, and only when it makes the "
                     f"image at least 2x smaller)")
        return None
    lowres_spacing, lowres_median = found
    config = plan_unet_configuration(lowres_request(lowres_spacing, lowres_median), context, *normalization)
    config.batch_dice = False
    config.reasons["spacing"] = (f"{lowres_spacing}: coarsened in {LOWRES_SPACING_STEP - 1:.0%} steps until "
                                 f"the patch covers >= {LOWRES_THRESHOLD:.0%} of the image (fullres covers "
                                 f"{coverage:.0%})")
    config.reasons["batch_dice"] = "per-sample Dice (nnU-Net's lowres default)"
    if forced:
        config.reasons["spacing"] = (f"{lowres_spacing}: {FORCED_LOWRES_FACTOR:g}x the fullres spacing, forced "
                                     f"(lowres='always'; the fullres patch covers {coverage:.0%} of the image)")
    notes.append((f"3d_lowres forced at {FORCED_LOWRES_FACTOR:g}x the spacing (lowres='always'): nnU-Net's rule "
                  f"plans none, the 3d_fullres patch covers {coverage:.0%} of the median image" if forced else
                  f"3d_lowres planned: the 3d_fullres patch covers only {coverage:.0%} of the median image")
                 + "; 3d_cascade_fullres refines its prediction at full resolution")
    return config


CASCADE_NAME = "3d_cascade_fullres"


def plan_cascade(fullres: Configuration, device: str) -> Configuration:
    """nnU-Net's 3d_cascade_fullres: the 3d_fullres network, grid and schedule, with the 3d_lowres
    prediction appended as one-hot channels of the foreground labels.

    Foreground only, as nnU-Net: the background channel would be one minus their sum, an input
    channel (and first-layer memory) that carries nothing. The channels are not normalised
    (0/1 already). The schedule is 3d_fullres's: one more input channel per label changes only
    the first convolution, a few percent of an iteration.
    """
    n_labels = fullres.n_outputs - 1
    cascade = replace(fullres, name=CASCADE_NAME, previous_stage="3d_lowres",
                      n_input_channels=fullres.n_input_channels + n_labels,
                      normalization=list(fullres.normalization) + [{"scheme": "none"}] * n_labels,
                      reasons=dict(fullres.reasons))
    cascade.estimated_memory_gb = round(planned_memory_gb(cascade, device), 3)
    cascade.reasons["previous_stage"] = (
        f"3d_lowres's predicted labels as {n_labels} extra one-hot input channel(s) (foreground labels; "
        f"normalisation none), upsampled to this grid; trained on 3d_lowres's 5-fold out-of-fold predictions "
        f"so the input is as wrong as it will be on new cases")
    cascade.reasons["batch_dice"] = "Dice over the whole batch (3d_fullres's choice when a lowres stage exists)"
    return cascade
