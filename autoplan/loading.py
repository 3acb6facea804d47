"""Batches for training: random patches (segmentation) and images (classification).

Both loaders are iterators of dicts of numpy arrays and context managers. With
``n_workers > 0`` batches are produced (sampled and augmented) in background
processes by batchgenerators' ``MultiThreadedAugmenter``, so the training step does
not wait; ``n_workers=0`` produces them in-process, reproducibly for a given seed.
Always ``close()`` the loader (or use ``with``): it stops and joins its workers.

Segmentation patches follow nnU-Net's data loader: the last third of every batch is
centred on a voxel of a randomly chosen label present in the case (from
``CaseProperties.class_locations``), the rest is placed uniformly; the patch is cut
larger than the network's patch (``augmentation.sampling_patch_size``) so rotation
and zoom see real image content, padded with zeros where it leaves the image, and
cropped back to the patch by the spatial transform. A cascade's batches end with the previous
stage's prediction as one-hot channels after the image's (``augmentation.cascade_transforms``).
"""

import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
from batchgenerators.dataloading.data_loader import SlimDataLoaderBase
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

from autoplan.augmentation import (
    DEFAULT_SCALE_PROBABILITY,
    FIELD_OF_VIEW_SCALE_PROBABILITY,
    FIELD_OF_VIEW_SHIFT,
    classification_transforms,
    sampling_patch_size,
    segmentation_transforms,
)
from autoplan.errors import InputError
from autoplan.jsonio import read_json
from autoplan.preprocessing import normalize_unit_batch
from autoplan.preprocessing.cache import open_case_arrays

# Batches each worker keeps ready; two per worker keeps the GPU fed without much memory.
CACHED_PER_WORKER = 2
PR_SET_PDEATHSIG = 1                # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a loader worker: end when the training process ends, even by ``kill -9``.

    batchgenerators' workers would otherwise live on, re-parented to PID 1. Linux sends
    them SIGKILL when their parent dies (prctl's parent-death signal); a parent that died
    before this call is seen by the worker's changed parent id.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)


class _BatchStream:
    """Shared machinery: in-process or background production of transformed batches."""

    def _start(self, source, transform, n_workers, seed):
        self._source = source
        self._transform = transform
        self._background = None
        self._closed = False
        if n_workers > 0:
            source.number_of_threads_in_multithreaded = n_workers
            self._background = MultiThreadedAugmenter(
                source, transform, n_workers, num_cached_per_queue=CACHED_PER_WORKER,
                seeds=[int(seed) * 1000 + i for i in range(n_workers)])
        else:
            # batchgenerators transforms draw from numpy's (and Python's) global RNGs: keep
            # our own states and swap them in around each batch, leaving the caller's alone.
            self._global_state = np.random.RandomState(int(seed) % 2**32).get_state()
            self._python_state = random.Random(int(seed)).getstate()

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        if self._background is not None:
            return next(self._background)
        caller_state, caller_python_state = np.random.get_state(), random.getstate()
        np.random.set_state(self._global_state)
        random.setstate(self._python_state)
        try:
            batch = next(self._source)
            return self._transform(**batch) if self._transform is not None else batch
        finally:
            self._global_state, self._python_state = np.random.get_state(), random.getstate()
            np.random.set_state(caller_state)
            random.setstate(caller_python_state)

    def close(self, timeout=10):
        """Stop and join the worker processes (idempotent); stragglers are terminated."""
        self._closed = True
        background, self._background = getattr(self, "_background", None), None
        if background is not None:
            background._finish(timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        # Garbage collection or interpreter exit: do not wait long for workers.
        try:
            self.close(timeout=2)
        except Exception:
            pass


# ----------------------------------------------------------------------------- segmentation


class _SegmentationCases:
    """Lazily opened preprocessed cases (compressed, read a region at a time) and their
    foreground locations."""

    def __init__(self, preprocessed_dir, case_ids):
        self.dir = Path(preprocessed_dir)
        self.case_ids = list(case_ids)
        self.locations = []
        for case_id in self.case_ids:
            path = self.dir / f"{case_id}.json"
            if not path.is_file():
                raise InputError(path, f"case {case_id!r} is not preprocessed (run preprocessing first)")
            properties = read_json(path)
            self.locations.append({
                int(label): np.asarray(coords, dtype=np.int64)
                for label, coords in properties.get("class_locations", {}).items() if len(coords)
            })
        self._open = {}

    def arrays(self, index):
        """(data (C, ...), seg (1, ...)), sliceable like arrays; opened once per process."""
        if index not in self._open:
            self._open[index] = open_case_arrays(self.dir, self.case_ids[index])
        return self._open[index]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


class _Sampler(SlimDataLoaderBase):
    """What both samplers share: a seed, one generator per worker, in-order passes for
    validation, and workers that end with the training process."""

    def __init__(self, data, batch_size, seed, infinite):
        super().__init__(data, batch_size, None)
        self.seed = int(seed)
        self.infinite = infinite
        self._rng = None
        self._next_batch = 0
        self._parent_pid = os.getpid()

    def set_thread_id(self, thread_id):
        """Called in each worker process: a fresh generator per worker."""
        super().set_thread_id(thread_id)
        self._rng = None
        if self.number_of_threads_in_multithreaded:
            die_with_parent(self._parent_pid)

    def _generator(self):
        if self._rng is None:
            self._rng = np.random.default_rng([self.seed, self.thread_id])
        return self._rng

    def _next_ordered_batch(self, n_items: int) -> tuple:
        """(start, stop) of this worker's next batch in a pass over ``n_items`` in order: batch k
        is made by worker k % n_workers; at the end StopIteration, and the next call starts
        the next pass."""
        n_workers = self.number_of_threads_in_multithreaded or 1
        n_batches = int(np.ceil(n_items / self.batch_size))
        batch = self._next_batch * n_workers + self.thread_id
        if batch >= n_batches:
            self._next_batch = 0
            raise StopIteration
        self._next_batch += 1
        start = batch * self.batch_size
        return start, min(start + self.batch_size, n_items)


class _PatchSampler(_Sampler):
    """Produces {"data", "seg"} batches of patches of ``sample_size`` (batchgenerators keys)."""

    def __init__(self, cases, sample_size, dim, batch_size, oversample_foreground, seed, infinite,
                 max_shift=None):
        super().__init__(cases, batch_size, seed, infinite)
        self.cases = cases
        self.sample_size = [int(s) for s in sample_size]
        self.max_shift = [int(m) for m in (max_shift or [0] * len(self.sample_size))]
        self.dim = dim
        self.oversample_foreground = oversample_foreground

    def set_thread_id(self, thread_id):
        """Seeds Python's generator too in a worker: batchgenerators' noise transform uses it
        and the augmenter does not seed it."""
        super().set_thread_id(thread_id)
        if self.number_of_threads_in_multithreaded:
            random.seed(self.seed * 1000 + thread_id)

    def generate_train_batch(self):
        rng = self._generator()
        n_cases = len(self.cases.case_ids)
        if self.infinite:
            indices = rng.integers(0, n_cases, self.batch_size)
        else:
            start, stop = self._next_ordered_batch(n_cases)
            indices = list(range(start, stop))
        data, seg = [], []
        for slot, index in enumerate(indices):
            force_fg = slot >= round(len(indices) * (1 - self.oversample_foreground))
            if not self.infinite:
                # Validation: the patch depends on the case only (not on worker or pass).
                rng = np.random.default_rng([self.seed, int(index)])
            patch_data, patch_seg = self._patch(int(index), force_fg, rng)
            data.append(patch_data)
            seg.append(patch_seg)
        return {"data": np.stack(data), "seg": np.stack(seg), "case_ids": [self.cases.case_ids[i] for i in indices]}

    def _patch(self, index, force_fg, rng):
        data, seg = self.cases.arrays(index)
        locations = self.cases.locations[index]
        centre = None
        if force_fg and locations:
            label = list(locations)[rng.integers(len(locations))]
            centre = locations[label][rng.integers(len(locations[label]))]
        spatial, slice_axis = list(data.shape[1:]), []
        if self.dim == 2 and data.ndim == 4:
            # A 2D configuration on volumes: one slice, the foreground voxel's if any.
            z = int(centre[0]) if centre is not None else int(rng.integers(data.shape[1]))
            spatial, slice_axis = spatial[1:], [z]
            centre = centre[1:] if centre is not None else None
        corner = _window_lower_corner(spatial, self.sample_size, centre, rng)
        corner = [c + int(rng.integers(-m, m + 1)) if m else c for c, m in zip(corner, self.max_shift)]
        # Only the window is read (and decompressed) from the cached arrays, never the whole case.
        corner, size = slice_axis + corner, [1] * len(slice_axis) + self.sample_size
        patch_data = _crop_padded(data, corner, size, np.float32)
        patch_seg = _crop_padded(seg, corner, size, np.int16)
        if slice_axis:
            patch_data, patch_seg = patch_data[:, 0], patch_seg[:, 0]
        return patch_data, patch_seg


def _window_lower_corner(shape, size, centre, rng):
    """Lower corner of a window of ``size`` (may be negative: padding), nnU-Net style.

    When the image is smaller than the window, it sits anywhere inside it; a foreground
    centre is honoured as far as the bounds allow.
    """
    corner = []
    for n, s, c in zip(shape, size, centre if centre is not None else [None] * len(shape)):
        need = max(0, s - n)
        low = -(need // 2)
        high = n + need // 2 + need % 2 - s
        if c is None:
            corner.append(int(rng.integers(low, high + 1)))
        else:
            corner.append(int(np.clip(int(c) - s // 2, low, high)))
    return corner


def _crop_padded(array, corner, size, dtype):
    """(C, *size) window of ``array`` at ``corner`` as ``dtype``, zero where it leaves the image.

    ``array`` is anything sliceable like an ndarray (a blosc2 NDArray decompresses the window only).
    """
    out = np.zeros((array.shape[0], *size), dtype=dtype)
    source, target = [slice(None)], [slice(None)]
    for lo, s, n in zip(corner, size, array.shape[1:]):
        a, b = max(lo, 0), min(lo + s, n)
        if b <= a:
            return out
        source.append(slice(a, b))
        target.append(slice(a - lo, b - lo))
    out[tuple(target)] = array[tuple(source)]
    return out


class SegmentationLoader(_BatchStream):
    """Iterator of {"data": float32 (B, C, *patch), "target": int16 (B, 1, *patch)}.

    ``infinite=False`` yields one pass over ``case_ids`` in order (one patch per case,
    the same patches on every pass) and stops: for validation.
    """

    def __init__(self, preprocessed_dir, case_ids, configuration, augment="default", batch_size=None,
                 oversample_foreground=1 / 3, n_workers=2, seed=0, infinite=True):
        if not case_ids:
            raise ValueError("SegmentationLoader needs at least one case")
        patch_size = [int(p) for p in configuration.patch_size]
        self.patch_size = patch_size
        self.batch_size = int(batch_size or configuration.batch_size)
        cases = _SegmentationCases(preprocessed_dir, case_ids)
        max_rotation = getattr(configuration, "max_rotation_degrees", None)
        sample_size = sampling_patch_size(augment, patch_size, configuration.dim, max_rotation)
        fits_field_of_view = bool(getattr(configuration, "field_of_view", None)) and augment == "default"
        scale_probability = FIELD_OF_VIEW_SCALE_PROBABILITY if fits_field_of_view else DEFAULT_SCALE_PROBABILITY
        # Whole images resized to a patch-sized working grid always sit in the patch centre
        # (the window cannot move: nnU-Net's rule when the image is no larger than the
        # patch); other sites centre the patient differently, so such plans shift it.
        max_shift = [int(round(FIELD_OF_VIEW_SHIFT * p)) for p in patch_size] if fits_field_of_view else None
        sampler = _PatchSampler(cases, sample_size, configuration.dim, self.batch_size,
                                oversample_foreground, seed, infinite, max_shift)
        # A cascade's cached seg holds the previous stage's labels as a second channel; the
        # transforms turn it into one-hot data channels after augmenting the image.
        previous_labels = list(range(1, configuration.n_outputs)) if getattr(configuration, "previous_stage", "") \
            else None
        transform = _DropKeys(segmentation_transforms(augment, patch_size, configuration.dim,
                                                      getattr(configuration, "mirror_axes", None), max_rotation,
                                                      scale_probability, previous_labels),
                              ("case_ids",))
        self._start(sampler, transform, n_workers, seed)


class _DropKeys:
    """Wraps a transform; removes bookkeeping keys afterwards."""

    def __init__(self, transform, keys):
        self.transform = transform
        self.keys = keys

    def __call__(self, **batch):
        for key in self.keys:
            batch.pop(key, None)
        return self.transform(**batch)


# ----------------------------------------------------------------------------- classification


class _ImageSampler(_Sampler):
    """Produces {"images": uint8 (B, H, W, C), "target": int64 (B,), "seed": int}."""

    def __init__(self, images, labels, indices, batch_size, seed, infinite):
        super().__init__(None, batch_size, seed, infinite)
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)

    def _pixels(self):
        if isinstance(self.images, (str, Path)):
            self.images = np.load(self.images, mmap_mode="r")
        return self.images

    def generate_train_batch(self):
        rng = self._generator()
        if not self.infinite:
            start, stop = self._next_ordered_batch(len(self.indices))
            chosen = self.indices[start:stop]
        else:
            chosen = self.indices[rng.integers(0, len(self.indices), self.batch_size)]
        # Sorted reads are kinder to a memory-mapped file; order within a batch is irrelevant.
        order = np.argsort(chosen, kind="stable") if self.infinite else np.arange(len(chosen))
        chosen = chosen[order]
        return {"images": np.asarray(self._pixels()[chosen]), "target": self.labels[chosen],
                "seed": int(rng.integers(2**31))}

    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(state["images"], np.memmap):
            state["images"] = state["images"].filename
        return state


class _ClassificationBatchTransform:
    def __init__(self, augmenter, configuration):
        self.augmenter = augmenter
        self.configuration = configuration

    def __call__(self, images, target, seed):
        unit = self.augmenter(images, np.random.default_rng(seed))
        return {"data": normalize_unit_batch(unit, self.configuration), "target": target}


class ClassificationLoader(_BatchStream):
    """Iterator of {"data": float32 (B, C, H, W) normalised, "target": int64 (B,)}.

    ``images`` is the preprocessed uint8 (N, H, W, C) array or the path of ``images.npy``
    (memory-mapped). ``infinite=False`` yields ``indices`` once, in order, without augmentation.
    """

    def __init__(self, images, labels, indices, configuration, augment="default", batch_size=None,
                 n_workers=2, seed=0, infinite=True):
        if len(indices) == 0:
            raise ValueError("ClassificationLoader needs at least one index")
        self.batch_size = int(batch_size or configuration.batch_size)
        if isinstance(images, (str, Path)):
            images = Path(images)
        sampler = _ImageSampler(images, labels, indices, self.batch_size, seed, infinite)
        augmenter = classification_transforms(augment if infinite else "none", configuration.patch_size)
        self._start(sampler, _ClassificationBatchTransform(augmenter, configuration), n_workers, seed)
