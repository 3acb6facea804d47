"""Fingerprint: what a dataset is (shapes, spacings, intensities, labels, classes).

Entry function: ``fingerprint_dataset(dataset, results_dir, force, n_jobs)`` writes
``RESULTS/NAME/fingerprint.json`` and returns the :class:`Fingerprint`. It is cached:
the file is reused while the dataset's files (names, sizes, mtimes) and dataset.json
are unchanged.

Segmentation follows nnU-Net v2's fingerprint extractor so the numbers agree with it:
shapes after cropping to the bounding box of the nonzero voxels of all channels, the
median relative size after cropping, and foreground intensity statistics from a
per-case sample in which every case carries the same weight (nnU-Net draws
``1e8 // n_cases`` foreground voxels per case, with replacement, seed 1234).
Classification reads each image once and keeps only small per-image summaries
(size, channel sums, a pixel hash) for class balance, groups and duplicates.

Modules: ``types`` (the dataclasses), ``extractor`` (the entry and its cache), ``segmentation``
and ``classification`` (one analyser per task), ``geometry``, ``intensity`` and ``channels``
(what both analysers share), ``summary`` (the terminal text and number formats).
"""

from autoplan.fingerprint.extractor import (  # noqa: F401
    ANALYSERS,
    FINGERPRINT_VERSION,
    dataset_source_hash,
    fingerprint_dataset,
)
from autoplan.fingerprint.geometry import ANISOTROPY_THRESHOLD  # noqa: F401
from autoplan.fingerprint.intensity import intensity_percentiles  # noqa: F401
from autoplan.fingerprint.segmentation import full_component_count  # noqa: F401
from autoplan.fingerprint.summary import format_fingerprint_summary, format_number, format_shape  # noqa: F401
from autoplan.fingerprint.types import ChannelInfo, Fingerprint, IntensityStats, LabelStats  # noqa: F401
