"""See autoplan.io. (Interface fixed here; implementation being written.)"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NATURAL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
IMAGE_EXTENSIONS = NATURAL_EXTENSIONS + VOLUME_EXTENSIONS


@dataclass
class ImageData:
    array: np.ndarray                 # (C, [Z,] Y, X), native dtype of the file
    spacing: tuple                    # array axis order, one per spatial axis; 1.0 where unknown
    origin: tuple = ()                # SimpleITK (x, y, z) order; () for natural images
    direction: tuple = ()             # SimpleITK flat direction matrix; () for natural images
    source_format: str = ""           # 'png', 'jpeg', 'tiff', 'bmp', 'nifti', 'nrrd', 'mha', 'dicom'
    path: Path | None = None
    meta: dict = field(default_factory=dict)  # e.g. {'mode': 'L', 'bit_depth': 8}

    @property
    def n_channels(self) -> int:
        return self.array.shape[0]

    @property
    def spatial_shape(self) -> tuple:
        return tuple(self.array.shape[1:])

    @property
    def dim(self) -> int:
        return self.array.ndim - 1


def file_ending(path) -> str:
    """'.nii.gz' for 'a.nii.gz', '.png' for 'a.PNG' (lower case), '' for a folder."""
    raise NotImplementedError


def strip_ending(name: str) -> str:
    raise NotImplementedError


def is_dicom_folder(path) -> bool:
    raise NotImplementedError


def list_image_files(folder) -> list:
    """Image files and DICOM series folders directly inside ``folder``, sorted."""
    raise NotImplementedError


def read_image(path) -> ImageData:
    """Read a natural image, a volume or a DICOM series folder. Raises InputError."""
    raise NotImplementedError


def write_image(array: np.ndarray, path, reference: ImageData | None = None) -> None:
    """Write a spatial array ([Z,] Y, X) or (C, [Z,] Y, X) with ``reference``'s geometry, atomically.

    Format from ``path``'s ending; a DICOM reference is written as NIfTI.
    """
    raise NotImplementedError
