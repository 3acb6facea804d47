"""The fingerprint as text: the terminal summary, and number formats the notes and quality checks share."""

from autoplan.fingerprint.types import Fingerprint

def format_number(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4g}"


def format_shape(values) -> str:
    return " x ".join(format_number(v) for v in values)


def _bytes_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_fingerprint_summary(fp: Fingerprint) -> str:
    """A readable multi-line summary for the terminal."""
    axes = ",".join(fp.axis_order)
    lines = [
        f"Dataset {fp.dataset}: {fp.task_type}, {fp.dim}D, {fp.n_cases} cases, "
        f"{len(fp.channels)} channel(s)",
    ]
    for index, channel in enumerate(fp.channels):
        lines.append(f"  channel {index} {channel.name!r}: {channel.kind} ({channel.kind_reason})")
    lines += [
        f"  shapes and spacings in axis order ({axes})",
        f"  median shape    {format_shape(fp.median_shape)}   "
        f"(p5 {format_shape(fp.shape_percentiles['p5'])}, p95 {format_shape(fp.shape_percentiles['p95'])})",
        f"  median spacing  {format_shape(fp.median_spacing)} mm   anisotropy {fp.anisotropy:.2f}",
        f"  total           {fp.total_voxels:,} voxels, {_bytes_text(fp.disk_bytes)} on disk",
    ]
    lines += _TASK_SUMMARIES[fp.task_type](fp)
    if fp.notes:
        lines.append("Notes:")
        lines += [f"  - {note}" for note in fp.notes]
    return "\n".join(lines)


def _segmentation_summary(fp: Fingerprint) -> list:
    lines = [f"  after cropping to nonzero: median shape {format_shape(fp.median_cropped_shape)}, "
             f"median relative size {fp.median_relative_size_after_cropping:.3f}"]
    for index, stats in enumerate(fp.intensity or []):
        if stats is None:
            lines.append(f"  foreground intensity ch{index}: no foreground voxels")
            continue
        lines.append(f"  foreground intensity ch{index}: mean {format_number(stats.mean)}, std {format_number(stats.std)}, "
                     f"median {format_number(stats.median)}, p0.5 {format_number(stats.percentile_00_5)}, "
                     f"p99.5 {format_number(stats.percentile_99_5)}, range {format_number(stats.min)}..{format_number(stats.max)}")
    if fp.per_case_intensity_max:
        lines.append(f"  per-case maximum (ch0): {format_number(min(fp.per_case_intensity_max))}.."
                     f"{format_number(max(fp.per_case_intensity_max))}"
                     f"{'  -> scales differ: normalise per case' if fp.intensity_scales_differ else ''}")
    unit = "mm^3" if fp.dim == 3 else "mm^2"
    lines.append("  labels:")
    for label_id, stats in (fp.labels or {}).items():
        lines.append(f"    {label_id} {stats.name}: {stats.voxel_fraction:.2%} of voxels, in "
                     f"{stats.case_fraction:.0%} of cases, {stats.components_per_case_median:g} "
                     f"component(s)/case (median), median component {format_number(stats.component_size_median_voxels)} "
                     f"voxels = {format_number(stats.component_size_median_mm)} {unit}")
    if fp.foreground_fraction is not None:
        ratio = fp.background_foreground_ratio
        lines.append(f"  foreground {fp.foreground_fraction:.2%} of voxels"
                     + (f" (background:foreground = {ratio:.1f}:1)" if ratio is not None else ""))
    return lines


def _classification_summary(fp: Fingerprint) -> list:
    lines = ["  classes:"]
    for name, count in fp.class_counts.items():
        groups = f", {fp.groups_per_class[name]} groups" if fp.groups_per_class else ""
        lines.append(f"    {name:<12} {count:>7} ({fp.class_frequencies[name]:.1%}){groups}")
    lines.append(f"  imbalance (largest/smallest class): {fp.imbalance_ratio:.1f}")
    if fp.n_groups is not None:
        lines.append(f"  groups: {fp.n_groups} (images per group: median {fp.images_per_group['median']:g}, "
                     f"max {fp.images_per_group['max']})")
    ar = fp.aspect_ratios
    lines.append(f"  aspect ratio (width/height): median {ar['median']:.3f}, p5 {ar['p5']:.3f}, p95 {ar['p95']:.3f}")
    lines.append("  channel mean " + ", ".join(f"{m:.3f}" for m in fp.channel_mean)
                 + "; std " + ", ".join(f"{s:.3f}" for s in fp.channel_std) + " (0..1 scale)")
    lines.append(f"  identical images: {len(fp.duplicates)} sets")
    for dup in fp.duplicates[:5]:
        lines.append(f"    {', '.join(dup['cases'])}: classes {', '.join(map(str, dup['classes']))}")
    if len(fp.duplicates) > 5:
        lines.append(f"    ... {len(fp.duplicates) - 5} more in fingerprint.json")
    return lines


# The lines each task adds to the summary.
_TASK_SUMMARIES = {"segmentation": _segmentation_summary, "classification": _classification_summary}
