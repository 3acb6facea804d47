"""Medical and natural image IO with one in-memory representation.

Every reader returns an :class:`ImageData`: a channel-first array
``(C, [Z,] Y, X)`` plus geometry. Spacing is given in *array axis order*
(``(z, y, x)`` for volumes, ``(y, x)`` for 2D images); origin and direction are
kept in SimpleITK's physical ``(x, y, z)`` convention so a result can be
written back with exactly the input's geometry.
"""

from autoplan.io.images import (  # noqa: F401
    IMAGE_EXTENSIONS,
    NATURAL_EXTENSIONS,
    VOLUME_EXTENSIONS,
    ImageData,
    file_ending,
    is_dicom_folder,
    list_image_files,
    read_image,
    strip_ending,
    write_image,
)
