"""Atomic file writes and JSON round-tripping of the pipeline's dataclasses.

Every artifact (fingerprint.json, plans.json, plan.json, metrics.json, ...) is
written to a temporary name in the same folder and renamed, so a crash never
leaves a truncated file that a later run would trust.
"""

import dataclasses
import errno
import json
import math
import os
import shutil
import tempfile
import types
import typing
from pathlib import Path

import numpy as np


def _umask_mode() -> int:
    """The permissions an ordinary open() would give (mkstemp's files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_with(path, write, suffix: str = ".tmp") -> None:
    """``write(temporary path)``, then rename to ``path``: a failure leaves the previous file
    and no temporary. A failed write (a full disk) names no file, so the error is raised
    again naming ``path``: the CLI's one line must say which file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write_with(path, write)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path, array: np.ndarray) -> None:
    """np.save through a temporary file (np.save appends .npy to names without it)."""
    atomic_write_with(path, lambda tmp: np.save(tmp, array), suffix=".npy")


def atomic_torch_save(path, state: dict) -> None:
    """torch.save through a temporary file. Not through memory and atomic_write_bytes: its
    fsync and copy cost 0.15-0.4 s per 134 MB checkpoint, which is written every epoch."""
    import torch

    def write(tmp):
        try:
            torch.save(state, tmp)
        except RuntimeError as error:     # what torch.save raises on a full disk, with no errno
            free_mb = shutil.disk_usage(Path(tmp).parent).free / 1e6
            raise OSError(errno.EIO, f"could not write a checkpoint, {free_mb:.0f} MB free ({error})") from error

    atomic_write_with(path, write)


def to_jsonable(value):
    """Plain JSON types from numpy scalars/arrays, paths, tuples and dataclasses.

    NaN and infinities become None: JSON has no NaN, and None reads as "undefined".
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def dumps(value) -> str:
    return json.dumps(to_jsonable(value), indent=2, sort_keys=False) + "\n"


def write_json(path, value) -> None:
    atomic_write_text(path, dumps(value))


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _from_jsonable(tp, value):
    """Rebuild a value of type ``tp`` from its JSON form (nested dataclasses included)."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            return _from_jsonable(arg, value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        item_type = args[0] if args else typing.Any
        items = [_from_jsonable(item_type, v) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        args = typing.get_args(tp)
        value_type = args[1] if len(args) == 2 else typing.Any
        return {k: _from_jsonable(value_type, v) for k, v in value.items()}
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def from_dict(cls, data: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in data:
            kwargs[field.name] = _from_jsonable(hints[field.name], data[field.name])
    return cls(**kwargs)


class JsonDataclass:
    """Mixin: ``save(path)`` writes readable JSON atomically, ``load(path)`` reads it back."""

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict):
        return from_dict(cls, data)

    def save(self, path) -> None:
        write_json(path, self)

    @classmethod
    def load(cls, path):
        return cls.from_dict(read_json(path))
