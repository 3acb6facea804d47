"""Medical and natural image IO with one in-memory representation, and the files of a case.

Every reader returns an :class:`ImageData`: a channel-first array
``(C, [Z,] Y, X)`` plus geometry. Spacing is given in *array axis order*
(``(z, y, x)`` for volumes, ``(y, x)`` for 2D images); origin and direction are
kept in SimpleITK's physical ``(x, y, z)`` convention so a result can be
written back with exactly the input's geometry. ``autoplan.io.cases`` reads the
channels and the mask of one case (nnU-Net's ``CASE_0000`` files) for every stage.
"""

from autoplan.io.cases import (  # noqa: F401
    CHANNEL_FILE,
    FIRST_CHANNEL_SUFFIX,
    channel_file_name,
    geometry_difference,
    mask_values,
    read_case_images,
    read_case_labels,
    read_channel_files,
    read_mask,
)
from autoplan.io.images import (  # noqa: F401
    IMAGE_EXTENSIONS,
    NATURAL_EXTENSIONS,
    NATURAL_FORMATS,
    VOLUME_EXTENSIONS,
    ImageData,
    file_ending,
    is_dicom_folder,
    list_image_files,
    read_image,
    strip_ending,
    write_image,
)
