"""The fingerprint's types: what a dataset is, as ``RESULTS/NAME/fingerprint.json`` holds it."""

from dataclasses import dataclass, field

from autoplan.jsonio import JsonDataclass


@dataclass
class ChannelInfo:
    name: str
    kind: str            # 'xray' | 'rgb' | 'mr' | 'ct' | 'grey'
    kind_reason: str     # why this kind was guessed ("values span -1024..3071 HU")


@dataclass
class IntensityStats:
    mean: float
    median: float
    std: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass
class LabelStats:
    name: str
    voxel_fraction: float                 # of all voxels in the dataset
    case_fraction: float                  # fraction of cases where the label is present
    components_per_case_median: float
    component_size_median_voxels: float
    component_size_median_mm: float       # mm^3 (3D) or mm^2 (2D); pixels where no spacing is known
    voxel_count: int = 0                  # voxels of this label in the whole dataset
    components_per_case_max: int = 0      # most components seen in one case


@dataclass
class Fingerprint(JsonDataclass):
    dataset: str
    task_type: str                        # 'segmentation' | 'classification'
    dim: int                              # 2 | 3
    axis_order: list                      # ['z', 'y', 'x'] or ['y', 'x']: the order of every shape/spacing here
    n_cases: int
    channels: list[ChannelInfo]
    case_ids: list
    shapes: list                          # per case, spatial, array axis order
    spacings: list                        # per case, array axis order (mm; 1.0 where unknown)
    median_shape: list
    median_spacing: list
    shape_percentiles: dict               # {"p5": [...], "p95": [...]}
    spacing_percentiles: dict
    anisotropy: float                     # largest / smallest median spacing
    total_voxels: int
    disk_bytes: int
    source_hash: str                      # of file names, sizes and mtimes: the cache key
    # segmentation (None for classification)
    cropped_shapes: list | None = None
    median_cropped_shape: list | None = None
    median_relative_size_after_cropping: float | None = None
    intensity: list[IntensityStats] | None = None           # per channel, foreground voxels
    per_case_intensity_max: list | None = None               # per case, channel 0
    intensity_scales_differ: bool | None = None             # per-case normalisation needed
    labels: dict[str, LabelStats] | None = None              # by label id as string
    foreground_fraction: float | None = None
    # classification (None for segmentation)
    class_counts: dict | None = None
    class_frequencies: dict | None = None
    imbalance_ratio: float | None = None                     # largest / smallest class count
    n_groups: int | None = None
    images_per_group: dict | None = None                     # {"median":, "max":, "mean":}
    groups_per_class: dict | None = None
    aspect_ratios: dict | None = None                        # {"median":, "p5":, "p95":} width / height
    channel_mean: list | None = None                         # per channel, 0..1 scale for 8-bit
    channel_std: list | None = None
    duplicates: list = field(default_factory=list)           # [{"hash":, "cases": [...], "classes": [...]}]
    notes: list = field(default_factory=list)                # human-readable observations
    # added after the first interface (all optional)
    background_foreground_ratio: float | None = None         # background voxels per foreground voxel
    groups_with_several_classes: int | None = None           # classification: groups whose images disagree
    # per-case summaries prediction's quality flags compare with (autoplan/qc.py); None before v2
    source_formats: list | None = None                       # distinct image formats ('png', 'nifti', ...)
    per_case_intensity_percentiles: list | None = None       # per case, per channel [p0.5, p50, p99.5], whole image
    per_case_label_fractions: list | None = None             # per case {label id: fraction of voxels}; None: no mask
    per_case_label_components: list | None = None            # per case {label id: components, full connectivity}
