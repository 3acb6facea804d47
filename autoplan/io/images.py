"""Read and write natural images, volumes and DICOM series as one ``ImageData``.

Natural images (PNG, JPEG, TIFF, BMP) go through Pillow; volumes (NIfTI, NRRD,
MHA/MHD) and DICOM series through SimpleITK. Every reader returns a
channel-first array with spacing in array axis order; origin and direction stay
in SimpleITK's ``(x, y, z)`` convention so results can be written back with the
input's exact geometry. Anything unreadable raises ``InputError`` naming the file.
"""

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from autoplan.errors import InputError

NATURAL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
IMAGE_EXTENSIONS = NATURAL_EXTENSIONS + VOLUME_EXTENSIONS

_NATURAL_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff",
                    ".tiff": "tiff", ".bmp": "bmp"}
# Formats that store no physical spacing (spacing 1 is used: sizes in mm are sizes in pixels).
NATURAL_FORMATS = tuple(dict.fromkeys(_NATURAL_FORMATS.values()))
_VOLUME_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "mha",
                   ".mhd": "mhd", ".dcm": "dicom"}
_PIL_SAVE_FORMATS = {"png": "PNG", "tiff": "TIFF", "bmp": "BMP"}
# Slice gaps deviating more than this from the median mean a missing or extra slice.
SLICE_SPACING_TOLERANCE = 0.01


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


# ----------------------------------------------------------------------------- names


def file_ending(path) -> str:
    """'.nii.gz' for 'a.nii.gz', '.png' for 'a.PNG' (lower case), '' for a folder."""
    path = Path(path)
    if path.is_dir():
        return ""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def strip_ending(name: str) -> str:
    """'case_01' for 'case_01.nii.gz' or 'case_01.PNG'; names without a known image ending stay.

    Only known endings are stripped so DICOM folder names with dots (UIDs) survive.
    """
    name = Path(str(name)).name
    lower = name.lower()
    for ending in IMAGE_EXTENSIONS + (".dcm",):
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return name


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _holds_dicom_files(path: Path) -> bool:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return any(_is_dicom_file(p) for p in files[:8])


def series_folder(path) -> Path | None:
    """The DICOM series folder that ``path`` is, or wraps.

    A study folder holding nothing but one subfolder (``Study1/13_HCropVolume/*.dcm``, as
    PACS exports are laid out) stands for the series inside it, up to three levels deep;
    the study's name then names the case.
    """
    path = Path(path)
    for _ in range(4):
        if not path.is_dir():
            return None
        if _holds_dicom_files(path):
            return path
        children = [p for p in path.iterdir() if not p.name.startswith(".")]
        if len(children) != 1:
            return None
        path = children[0]
    return None


def is_dicom_folder(path) -> bool:
    """A folder whose files (a few are sampled) are DICOM files, or a study wrapping one series."""
    return series_folder(path) is not None


def list_image_files(folder) -> list:
    """Image files and DICOM series folders directly inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_dicom_folder(entry):
                found.append(entry)
        elif file_ending(entry) in IMAGE_EXTENSIONS:
            found.append(entry)
    return found


# ----------------------------------------------------------------------------- reading


def read_image(path) -> ImageData:
    """Read a natural image, a volume or a DICOM series folder. Raises InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        series = series_folder(path)
        if series is None:
            raise InputError(path, "is a folder but holds no DICOM files (nor one series folder)")
        reader = lambda folder: _read_dicom_series(series)  # noqa: E731 (the series inside the study)
    else:
        if path.stat().st_size == 0:
            raise InputError(path, "empty file (0 bytes)")
        ending = file_ending(path)
        if ending in _NATURAL_FORMATS:
            reader = _read_natural
        elif ending in _VOLUME_FORMATS:
            reader = _read_volume
        else:
            known = ", ".join(IMAGE_EXTENSIONS)
            raise InputError(path, f"unknown image file type {ending or '(no ending)'!r} "
                                   f"(known: {known}, or a DICOM series folder)")
    try:
        image = reader(path)
    except InputError:
        raise
    except Exception as error:  # any reader failure is the file's fault, not ours
        raise InputError(path, f"cannot read: {error}".strip()) from None
    _check_finite(image)
    return image


def _check_finite(image: ImageData) -> None:
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        raise InputError(image.path, "contains NaN or infinite values")


def _read_natural(path: Path) -> ImageData:
    with Image.open(path) as pil:
        pil.load()  # full decode: catches truncated files that verify() lets through
        # what the bytes are, whatever the name says (a JPEG saved as .png is still lossy)
        meta = {"mode": pil.mode, "n_frames": getattr(pil, "n_frames", 1),
                "file_format": (pil.format or "").lower()}
        pixels, meta["bit_depth"] = _natural_pixels(pil)
    array = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    return ImageData(
        array=np.ascontiguousarray(array),
        spacing=(1.0, 1.0),
        source_format=_NATURAL_FORMATS[file_ending(path)],
        path=path,
        meta=meta,
    )


def _natural_pixels(pil: Image.Image):
    """(array (Y, X) or (Y, X, 3), bit depth) with alpha dropped and palettes expanded."""
    mode = pil.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(pil).astype(np.uint16), 16
    if mode == "I":
        values = np.asarray(pil)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return values.astype(np.uint16), 16
        return values.astype(np.int32), 32
    if mode == "F":
        return np.asarray(pil).astype(np.float32), 32
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(pil.convert("L")), 8
    if mode in ("P", "PA"):
        # A palette of greys is a grey image; any colour makes it RGB.
        palette = np.asarray(pil.convert("RGB"))
        if np.array_equal(palette[..., 0], palette[..., 1]) and np.array_equal(
            palette[..., 0], palette[..., 2]
        ):
            return np.ascontiguousarray(palette[..., 0]), 8
        return palette, 8
    return np.asarray(pil.convert("RGB")), 8


def _read_volume(path: Path) -> ImageData:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image = reader.Execute()
    source_format = _VOLUME_FORMATS[file_ending(path)]
    if source_format == "nifti" and "float" in image.GetPixelIDTypeAsString():
        _check_nifti_finite(path)
    return _from_sitk(image, path, source_format)


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader turns NaN into 0 without a word; nibabel shows the stored values."""
    import nibabel

    stored = np.asanyarray(nibabel.load(str(path)).dataobj)
    if np.issubdtype(stored.dtype, np.floating) and not np.isfinite(stored).all():
        raise InputError(path, "contains NaN or infinite values")


def _from_sitk(image: sitk.Image, path: Path, source_format: str, meta=None) -> ImageData:
    meta = dict(meta or {})
    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)    # vector pixels are channels
        spatial_dim = dim
    elif dim == 4:
        spatial_dim = 3                      # 4D NIfTI: the 4th axis holds the channels
    else:
        array = array[None]
        spatial_dim = dim
    spacing = tuple(float(s) for s in image.GetSpacing())[:spatial_dim]
    origin = tuple(float(o) for o in image.GetOrigin())[:spatial_dim]
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)
    direction = tuple(direction[:spatial_dim, :spatial_dim].ravel().tolist())
    spacing = tuple(reversed(spacing))
    if spatial_dim == 3 and array.shape[1] == 1 and source_format != "dicom":
        # A single-slice volume is a 2D image; remember the third axis to write it back.
        meta.update(squeezed_z={"spacing": spacing[0], "origin": origin, "direction": direction})
        array = array[:, 0]
        spacing = spacing[1:]
        origin = origin[:2]
        direction = tuple(np.asarray(direction).reshape(3, 3)[:2, :2].ravel().tolist())
    meta.setdefault("pixel_type", image.GetPixelIDTypeAsString())
    return ImageData(
        array=np.ascontiguousarray(array),
        spacing=spacing,
        origin=origin,
        direction=direction,
        source_format=source_format,
        path=path,
        meta=meta,
    )


def _read_dicom_series(folder: Path) -> ImageData:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(folder, "no readable DICOM series in this folder")
    if len(series_ids) > 1:
        raise InputError(folder, f"holds {len(series_ids)} DICOM series; put each series "
                                 "in its own folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    _check_slice_positions(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = reader.Execute()
    meta = {"series_uid": series_ids[0], "n_files": len(files)}
    return _from_sitk(image, folder, "dicom", meta)


def _check_slice_positions(folder: Path, files) -> None:
    """Refuse series with a missing, duplicated or unevenly spaced slice.

    ITK derives the slice spacing from the first two slices only, so a gap further
    on would silently distort the volume.
    """
    if len(files) < 3:
        return
    positions, normal = [], None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey("0020|0032"):
            return  # no positions stored: nothing to check against
        positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        if normal is None and reader.HasMetaDataKey("0020|0037"):
            cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
            normal = np.cross(cosines[:3], cosines[3:6])
    positions = np.asarray(positions)
    if normal is None:
        normal = positions[-1] - positions[0]
    along = positions @ (np.asarray(normal) / (np.linalg.norm(normal) or 1.0))
    gaps = np.abs(np.diff(along))
    median = float(np.median(gaps))
    if median <= 1e-6:
        raise InputError(folder, "DICOM slices share the same position (duplicated slices)")
    for index, gap in enumerate(gaps):
        if abs(gap - median) > SLICE_SPACING_TOLERANCE * median:
            raise InputError(
                folder,
                f"uneven slice spacing: {gap:.4g} mm between {Path(files[index]).name} and "
                f"{Path(files[index + 1]).name}, median {median:.4g} mm (missing or extra slice?)",
            )


# ----------------------------------------------------------------------------- writing


def write_image(array: np.ndarray, path, reference: ImageData | None = None) -> Path:
    """Write a spatial array ([Z,] Y, X) or (C, [Z,] Y, X) with ``reference``'s geometry, atomically.

    Format from ``path``'s ending; a DICOM reference is written as NIfTI (``.nii.gz`` is
    appended when ``path`` has no volume ending). Returns the path written.
    """
    path = Path(path)
    array = np.asarray(array)
    ending = file_ending(path) if not path.is_dir() else ""
    if reference is not None and reference.source_format == "dicom" and ending not in VOLUME_EXTENSIONS:
        path = path.with_name(strip_ending(path.name) + ".nii.gz")
        ending = ".nii.gz"
    if ending in _NATURAL_FORMATS:
        channels = _channels_last_2d(array, reference)
        writer = lambda target: _write_natural(channels, target, _NATURAL_FORMATS[ending])  # noqa: E731
    elif ending in VOLUME_EXTENSIONS:
        image = _to_sitk(array, reference)
        writer = lambda target: sitk.WriteImage(image, str(target), True)  # noqa: E731
    else:
        raise ValueError(f"{path}: cannot write images with ending {ending!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if ending == ".mhd":
        writer(path)  # the header names its data file: a temporary name would stick
        return path
    temporary = path.with_name(f".tmp_{uuid.uuid4().hex[:8]}_{path.name}")
    try:
        writer(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _split_channels(array: np.ndarray, reference: ImageData | None, spatial_dim_guess: int):
    """(C, spatial...) from a spatial or channel-first array."""
    spatial_dim = reference.dim if reference is not None else spatial_dim_guess
    if array.ndim == spatial_dim:
        return array[None]
    if array.ndim == spatial_dim + 1:
        return array
    raise ValueError(f"array of shape {array.shape} does not fit a {spatial_dim}D reference")


def _channels_last_2d(array: np.ndarray, reference: ImageData | None) -> np.ndarray:
    guess = 2 if array.ndim == 2 or (array.ndim == 3 and array.shape[0] in (1, 3, 4)) else 3
    channels = _split_channels(array, reference, min(guess, 2))
    if channels.ndim != 3:
        raise ValueError(f"natural image formats hold 2D images, got shape {array.shape}")
    if channels.shape[0] not in (1, 3):
        raise ValueError(f"natural image formats hold 1 or 3 channels, got {channels.shape[0]}")
    return channels[0] if channels.shape[0] == 1 else np.moveaxis(channels, 0, -1)


def _natural_dtype(array: np.ndarray) -> np.ndarray:
    """uint8 when the values fit, else uint16; floats must hold whole numbers."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise ValueError("natural image formats hold whole numbers; got fractional values")
    if array.size and array.min() < 0:
        raise ValueError("natural image formats hold non-negative values")
    top = array.max() if array.size else 0
    if top <= 255:
        return array.astype(np.uint8)
    if top <= 65535:
        return array.astype(np.uint16)
    raise ValueError(f"values up to {top} do not fit 16 bits")


def _write_natural(pixels: np.ndarray, target: Path, image_format: str) -> None:
    if image_format == "jpeg":
        raise ValueError(f"{target}: JPEG is lossy; write PNG, TIFF or BMP")
    pixels = np.ascontiguousarray(_natural_dtype(pixels))
    if pixels.dtype == np.uint16 and pixels.ndim == 3:
        # Pillow has no 16-bit RGB; SimpleITK writes it (PNG and TIFF).
        if image_format == "bmp":
            raise ValueError(f"{target}: BMP cannot hold 16-bit colour")
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(target))
        return
    if pixels.dtype == np.uint16:
        if image_format == "bmp":
            raise ValueError(f"{target}: BMP cannot hold 16-bit values")
    pil = Image.fromarray(pixels)  # uint8 -> L/RGB, uint16 -> I;16
    # zlib level 1: twice as fast as the default 6 for files about 15% larger.
    extra = {"compress_level": 1} if image_format == "png" else {}
    pil.save(target, format=_PIL_SAVE_FORMATS[image_format], **extra)


def _to_sitk(array: np.ndarray, reference: ImageData | None) -> sitk.Image:
    channels = _split_channels(array, reference, 3)
    if channels.dtype == bool:
        channels = channels.astype(np.uint8)
    elif channels.dtype == np.float16:
        channels = channels.astype(np.float32)
    squeezed = reference.meta.get("squeezed_z") if reference is not None else None
    if squeezed:
        channels = channels[:, None]          # back to the single-slice volume it was read from
    if channels.shape[0] == 1:
        image = sitk.GetImageFromArray(np.ascontiguousarray(channels[0]))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(channels, 0, -1)),
                                       isVector=True)
    if reference is not None:
        _copy_geometry(image, reference, squeezed)
    return image


def _copy_geometry(image: sitk.Image, reference: ImageData, squeezed) -> None:
    if squeezed:
        spacing = (squeezed["spacing"],) + tuple(reference.spacing)
        origin, direction = squeezed["origin"], squeezed["direction"]
    else:
        spacing, origin, direction = reference.spacing, reference.origin, reference.direction
    image.SetSpacing([float(s) for s in reversed(spacing)])
    if origin:
        image.SetOrigin([float(o) for o in origin])
    if direction:
        image.SetDirection([float(d) for d in direction])
