"""Preprocessing: crop to the nonzero region, normalise, resample to the plan's spacing.

One case goes through :func:`preprocess_case` (training and inference share it);
:func:`revert_to_original` maps predicted probabilities back onto the original
grid. :func:`preprocess_dataset` writes the cache the loaders read::

    PRE/NAME/CFG/CASE.b2nd      float32 (C, [Z,] Y, X)  blosc2, lossless, chunked by the patch
    PRE/NAME/CFG/CASE_seg.b2nd  uint8   (1, [Z,] Y, X)  blosc2 (int16 for label ids over 255)
    PRE/NAME/CFG/CASE.json      CaseProperties (written last; holds the cache stamp)

read back a region at a time by ``cache.open_case_arrays``.

Classification datasets are resized once into ``PRE/NAME/classifier/images.npy``
(uint8, N x H x W x C) plus ``index.json``.

Order of operations follows nnU-Net v2: crop, then normalise (so the nonzero mask
still fits the image exactly), then resample.

Modules: ``case`` (one case there and back), ``normalization``, ``resampling``, ``cache``
(the segmentation cache and its stamp), ``classification`` (resized images, channel
conversion), ``dataset`` (the entry). A case's files are read by ``autoplan.io.cases``.
"""

from autoplan.io import read_case_images, read_case_labels  # noqa: F401
from autoplan.preprocessing.case import (  # noqa: F401
    CaseProperties,
    crop_to_nonzero,
    fit_scale,
    preprocess_case,
    revert_to_original,
    sample_class_locations,
    working_spacing,
)
from autoplan.preprocessing.classification import convert_channels, load_classification_image  # noqa: F401
from autoplan.preprocessing.dataset import preprocess_dataset  # noqa: F401
from autoplan.preprocessing.normalization import (  # noqa: F401
    normalize_classification_batch,
    normalize_unit_batch,
)
from autoplan.preprocessing.resampling import resample  # noqa: F401
