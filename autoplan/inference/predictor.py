"""The Python API: a trained model predicting arrays in memory.

    from autoplan import Predictor

    predictor = Predictor.load("results/TaskXRay/2d/RUN", device="cpu")   # a run, a fold or a .zip
    predictor = Predictor.load("results/TaskXRay")                         # what find-best chose
    labels = predictor.predict(image_array, spacing=(1.0, 1.0))           # segmentation
    labels, probabilities = predictor.predict(volume, spacing=(3.0, 0.8, 0.8), return_probabilities=True)
    probabilities = predictor.classify([photo_hwc, other_photo_hwc])       # classification

``autoplan predict`` and ``autoplan evaluate`` predict through the same object, so arrays
given here get exactly what a folder of files gets: preprocessing as in training, the folds'
ensemble, mirroring TTA, resampling back to the input grid and the run's post-processing.
A choice of ``autoplan find-best`` (``RESULTS/NAME/best.json``) may be a pair of runs: their
probabilities are averaged, and its post-processing replaces the runs' own.
"""

import numpy as np
import torch

from autoplan.errors import InputError
from autoplan.inference.cascade import with_previous_stage
from autoplan.inference.classification import classify_pixels
from autoplan.inference.models import Ensemble, load_choice, load_ensemble
from autoplan.inference.segmentation import apply_postprocessing, predict_case
from autoplan.io import ImageData
from autoplan.preprocessing import load_classification_image


def _average(arrays: list) -> np.ndarray:
    """The members' mean; one member's array as it is (no copy of a large volume)."""
    return arrays[0] if len(arrays) == 1 else np.mean(arrays, axis=0).astype(arrays[0].dtype)


class Predictor:
    """The folds of one trained run, or the runs of a find-best choice, ready to predict
    (nnU-Net's ``nnUNetPredictor``)."""

    def __init__(self, ensembles, device="cpu", tta: bool = True, postprocessing: dict | None = None):
        self.ensembles = [ensembles] if isinstance(ensembles, Ensemble) else list(ensembles)
        self.tta = tta
        self.device = torch.device(device) if isinstance(device, str) else device
        self.postprocessing = self.spec.postprocessing if postprocessing is None else postprocessing
        # segment() makes the probabilities in the input's grid only while this is true (a
        # 512 x 512 x 400 CT with 4 classes: 1.7 GB); predict and evaluate set it per command.
        self.keep_probabilities = True
        self.clock = None          # {stage: seconds} to add segment()'s stage times to (benchmarks)

    @classmethod
    def load(cls, path, device="cpu", tta: bool = True) -> "Predictor":
        """A run folder (every fold_K inside it, as an ensemble), one fold_K folder, a dataset's
        results folder holding find-best's best.json (its choice), or a model package written
        by ``autoplan export-model``. Weights load as data (no unpickling)."""
        choice = load_choice(path, device)
        if choice is not None:
            ensembles, postprocessing = choice
            return cls(ensembles, device, tta, postprocessing)
        return cls(load_ensemble(path, device), device, tta)

    @property
    def ensemble(self) -> Ensemble:
        """The first run's folds (the one run, unless a find-best choice is a pair)."""
        return self.ensembles[0]

    @property
    def fold_dirs(self) -> list:
        return [fold for ensemble in self.ensembles for fold in ensemble.fold_dirs]

    @property
    def spec(self):
        return self.ensemble.spec

    @property
    def task_type(self) -> str:
        return self.spec.task_type

    @property
    def labels(self) -> dict:
        """{label name: id} of a segmentation model."""
        return dict(self.spec.labels)

    @property
    def classes(self) -> list:
        """Class names of a classifier, in the order of ``classify``'s columns."""
        return list(self.spec.classes or [])

    # -- segmentation ---------------------------------------------------------------------
    def predict(self, array, spacing=None, return_probabilities: bool = False):
        """Label map of one image given as an array: ``(C, [Z,] Y, X)`` channel-first, or
        ``([Z,] Y, X)`` for a one-channel model; ``spacing`` per spatial axis in the same
        (array) order, in mm (default 1.0, as for images that store none). Returns the label
        map in the input's grid, or ``(labels, probabilities (K, ...))``: the probabilities
        cost K float32 values per voxel of the input, the labels alone a few slices of them."""
        self._require("segmentation")
        keep, self.keep_probabilities = self.keep_probabilities, return_probabilities
        try:
            labels, probabilities = self.segment(self._image(array, spacing))
        finally:
            self.keep_probabilities = keep
        return (labels, probabilities) if return_probabilities else labels

    def segment(self, image: ImageData, case_id: str = "case") -> tuple:
        """(label map after the run's post-processing, probabilities or None) of an ``ImageData``.

        The probabilities ``(K, ...)`` in the input's grid are made only while
        ``keep_probabilities`` is true (the default); otherwise None, and the case is
        reverted to its own grid a few slices at a time (memory bounded by the patch and a
        few slices, not by the volume times the classes).
        """
        self._require("segmentation")
        image = with_previous_stage(image, self.ensemble, self.tta, self.device)   # a cascade: 3d_lowres first
        prediction = predict_case([(ensemble.networks, ensemble.spec) for ensemble in self.ensembles], image,
                                  self.tta, self.device, case_id, with_probabilities=self.keep_probabilities,
                                  clock=self.clock)
        return apply_postprocessing(prediction.labels, self.postprocessing), prediction.probabilities

    @property
    def image_dim(self) -> int:
        """2 or 3: the images the model was trained on (a 2d configuration of volumes takes volumes)."""
        return int((self.spec.qc_reference or {}).get("dim") or self.spec.configuration.dim)

    def _image(self, array, spacing) -> ImageData:
        array = np.asarray(array)
        dim = self.image_dim
        channels = self.spec.configuration.n_image_channels     # a cascade adds its own channels later
        if array.ndim == dim and channels == 1:
            array = array[None]
        if array.ndim != dim + 1 or array.shape[0] != channels:
            raise InputError(None, f"array of shape {array.shape}: this {dim}D model takes "
                                   f"({channels}, {'Z, ' if dim == 3 else ''}Y, X)")
        spacing = tuple(float(s) for s in (spacing if spacing is not None else [1.0] * dim))
        if len(spacing) != dim or not all(s > 0 for s in spacing):
            raise InputError(None, f"spacing {spacing}: give {dim} positive values in array axis order")
        return ImageData(array=array, spacing=spacing, source_format="array")

    # -- classification -------------------------------------------------------------------
    def classify(self, images) -> np.ndarray:
        """Decision probabilities ``(N, K)`` (columns: ``classes``) of images given as arrays
        ``(H, W)`` grey or ``(H, W, C)`` colour, any size (resized as training resized)."""
        self._require("classification")
        pixels = [load_classification_image(self._photo(image), self.spec.configuration) for image in images]
        return self.classify_pixels(np.stack(pixels))

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Decision probabilities of images already at the input size, uint8 ``(N, H, W, C)``."""
        self._require("classification")
        return _average([classify_pixels(ensemble.networks, pixels, ensemble.spec.configuration, self.tta, self.device)
                         for ensemble in self.ensembles])

    @staticmethod
    def _photo(image) -> ImageData:
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise InputError(None, f"image of shape {array.shape}: give (H, W) or (H, W, C)")
        return ImageData(array=np.moveaxis(array, -1, 0), spacing=(1.0, 1.0), source_format="array")

    def _require(self, task_type: str) -> None:
        if self.task_type != task_type:
            raise InputError(self.ensemble.fold_dirs[0], f"is a {self.task_type} model, not a {task_type} one")
