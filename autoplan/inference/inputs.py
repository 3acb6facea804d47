"""What ``autoplan predict`` reads and where it writes: the cases of an input folder (image
files, nnU-Net channel files, DICOM series folders) and the file name of each case's mask."""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoplan import preprocessing
from autoplan.errors import InputError
from autoplan.io import CHANNEL_FILE, NATURAL_FORMATS, file_ending, read_case_images, strip_ending

# Natural-image inputs whose own format cannot hold a label map exactly get PNG masks.
_LOSSY_ENDINGS = {".jpg": ".png", ".jpeg": ".png"}


@dataclass
class InputCase:
    name: str                       # case id: the file stem (channel suffix removed)
    files: list = field(default_factory=list)   # one per channel file, or one DICOM folder

    @property
    def images(self) -> list:
        """The name ``datasets.Case`` uses, so ``autoplan.io``'s case readers take an InputCase."""
        return self.files


def group_input_cases(paths) -> list:
    """Cases from image files and DICOM folders; ``CASE_0000``, ``CASE_0001``... form one case.

    Files with a 4-digit suffix are grouped only when the suffixes of one stem run
    0000, 0001, ... without a gap: a lone ``scan_2019.png`` stays the case ``scan_2019``.
    """
    candidates, cases = {}, []
    for path in paths:
        match = CHANNEL_FILE.match(strip_ending(path.name)) if path.is_file() else None
        if match:
            candidates.setdefault(match["case"], {})[int(match["channel"])] = path
        else:
            cases.append(InputCase(strip_ending(path.name), [path]))
    for case, channels in candidates.items():
        if sorted(channels) == list(range(len(channels))):
            cases.append(InputCase(case, [channels[c] for c in sorted(channels)]))
        else:
            cases += [InputCase(strip_ending(p.name), [p]) for p in channels.values()]
    return sorted(cases, key=lambda c: c.name)


def say_what_is_skipped(input_dir: Path, images: list) -> None:
    """One line naming the entries of the input folder that are not predicted (a silent skip
    of a mistyped ending or a nested study looked like a lost case)."""
    kept = {Path(p).name for p in images}
    skipped = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(input_dir).iterdir()
                     if not p.name.startswith(".") and p.name not in kept)
    if skipped:
        listing = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        print(f"note: {input_dir}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that "
              f"{'is' if len(skipped) == 1 else 'are'} not an image or DICOM series folder: {listing}",
              file=sys.stderr)


def read_case(files, n_channels: int | None = None):
    """One ImageData from a case's channel files (channels stacked; geometry of the first).

    With ``n_channels``, a single natural image (PNG/JPEG/...) of the other count is
    converted, as classification's preprocessing does: colour to grey (luminance, as PIL
    "L") or grey repeated to 3 channels; ``meta["original_channels"]`` keeps the count
    read, so the quality check can flag it. Any other channel mismatch is an InputError.
    """
    image = read_case_images(InputCase("", list(files)))
    if n_channels is None or image.n_channels == n_channels:
        return image
    convertible = {image.n_channels, n_channels} == {1, 3} and len(files) == 1
    if convertible and image.source_format in NATURAL_FORMATS:
        return _convert_natural_channels(image, n_channels)
    raise InputError(files[0], f"has {image.n_channels} channel(s); the model was trained on "
                               f"{n_channels} (give one file per channel as CASE_0000, CASE_0001...)")


def _convert_natural_channels(image, n_channels: int):
    """The image converted in place (``preprocessing.convert_channels``), the count read kept."""
    image.meta["original_channels"] = image.n_channels
    image.array = np.ascontiguousarray(preprocessing.convert_channels(image.array, n_channels))
    return image


def mask_ending(ending: str) -> str:
    """The file ending of a mask for an input of ``ending``: the same, but PNG for JPEG."""
    return _LOSSY_ENDINGS.get(ending, ending)


def mask_path(case: InputCase, output_dir: Path) -> Path:
    """Where a case's mask goes: the input's stem and format (JPEG → PNG, DICOM → NIfTI)."""
    source = case.files[0]
    ending = ".nii.gz" if source.is_dir() else file_ending(source)
    return Path(output_dir) / f"{case.name}{mask_ending(ending)}"
