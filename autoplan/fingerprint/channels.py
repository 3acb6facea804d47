"""What each channel is (CT, MR, X-ray, RGB, grey): from its name when it says, else its intensities."""

import re

from autoplan.fingerprint.summary import format_number
from autoplan.fingerprint.types import ChannelInfo
from autoplan.io import NATURAL_FORMATS

_RGB_NAMES = {"R", "G", "B", "RED", "GREEN", "BLUE"}
_MR_WORDS = ("MR", "MRI", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "T1C", "T1GD", "T1CE", "T2W", "T1W")
_XRAY_WORDS = ("XRAY", "X-RAY", "CXR", "RADIOGRAPH", "DX", "CR")


def channel_kinds(dataset, results) -> list:
    dim = len(results[0]["shape"])
    names = [str(dataset.channel_names.get(str(c), f"channel {c}")) for c in range(results[0]["n_channels"])]
    if results[0]["n_channels"] == 3 and len(dataset.channel_names) < 3:
        names = ["R", "G", "B"]  # one RGB file read as three channels
    elif results[0]["n_channels"] == 1 and names[0].upper() in _RGB_NAMES:
        names = ["grey"]  # declared RGB, stored grey
    kinds = []
    for c, name in enumerate(names):
        low = min(r["channel_min"][c] for r in results)
        high = max(r["channel_max"][c] for r in results)
        kind, reason = _guess_kind(
            name, dim, low, high,
            integer=all(r["integer_valued"][c] for r in results),
            natural=all(r["source_format"] in NATURAL_FORMATS for r in results),
            eight_bit=all(r["bit_depth"] == 8 or r["dtype"] == "uint8" for r in results),
            n_channels=len(names),
        )
        kinds.append(ChannelInfo(name=name, kind=kind, kind_reason=reason))
    return kinds


def _guess_kind(name, dim, low, high, integer, natural, eight_bit, n_channels):
    """(kind, reason): the channel's name when it says, else the intensity range."""
    words = set(re.split(r"[^A-Z0-9-]+", name.upper()))
    span = f"values {format_number(low)}..{format_number(high)}"
    if name.upper() in _RGB_NAMES:
        return "rgb", f"channel name {name!r} (colour image)"
    if "CT" in words:
        return "ct", f"channel name {name!r} ({span})"
    if words & set(_XRAY_WORDS):
        return "xray", f"channel name {name!r} ({span})"
    if words & set(_MR_WORDS):
        return "mr", f"channel name {name!r} ({span})"
    # Air is -1000 HU; MR and photographs never go that far below zero.
    if low < -500 and integer:
        return "ct", (f"guessed from intensities: integer {span}, minimum below -500, "
                      "which look like Hounsfield units")
    if dim == 2 and natural and eight_bit and n_channels == 1:
        return "xray", f"guessed: 8-bit grey 2D images ({span}), taken as radiographs"
    if dim == 2:
        return "grey", f"guessed: 2D grey images ({span})"
    return "mr", f"guessed: volumes with {span}, no values below -500 (not CT), taken as MR"
