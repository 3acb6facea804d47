"""Prediction holds a few slices of probabilities, not the volume times the classes (issue 26, part 3).

The reference is the whole-volume path prediction used before: the sliding window over the
whole working grid, ``revert_to_original`` of all K probabilities, then the argmax. The
slab-by-slab path must give the same probabilities (to float rounding) and labels, and must not
allocate K-class probabilities of the original grid when only labels are asked for.
"""

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from autoplan import preprocessing
from autoplan.inference import segmentation, sliding_window
from autoplan.inference.models import Ensemble
from autoplan.inference.predictor import Predictor
from autoplan.inference.segmentation import probabilities_to_labels
from autoplan.inference.sliding_window import sliding_window_predict, sliding_window_slabs
from autoplan.io.images import ImageData
from autoplan.planning import Configuration
from autoplan.runs import RunSpec, TrainOptions

torch.set_num_threads(1)


class BandNet(torch.nn.Module):
    """Logits that are different linear functions of a smoothed intensity: labels are intensity
    bands, so boundaries follow the image's structures as a trained network's would."""

    def __init__(self, n_classes: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.smooth = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
        torch.nn.init.constant_(self.smooth.weight, 1.0 / 27)
        self.centres = torch.nn.Parameter(torch.linspace(-1.0, 2.0, n_classes)
                                          + 0.2 * torch.rand(n_classes, generator=generator))

    def forward(self, x):
        """Class k wins where the smoothed (z-scored) intensity is nearest its centre."""
        return -4.0 * (self.smooth(x) - self.centres.view(1, -1, 1, 1, 1)) ** 2


def blobs(shape, seed=0, zero_border=0) -> np.ndarray:
    """Smooth blobs plus noise; ``zero_border`` voxels of zeros around it (a crop box)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    image = np.zeros(shape, dtype=np.float32)
    for _ in range(6):
        centre, radius = rng.uniform(-0.6, 0.6, 3), rng.uniform(0.2, 0.5)
        image += rng.uniform(1, 3) * np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / radius ** 2)
    image += rng.normal(0, 0.1, shape).astype(np.float32)
    if zero_border:
        image[:zero_border], image[-zero_border:], image[:, :zero_border], image[:, :, -zero_border:] = 0, 0, 0, 0
    return image[None]


def spec_of(spacing, patch, n_classes=4, name="3d_fullres") -> RunSpec:
    configuration = Configuration(
        name=name, dim=3, patch_size=list(patch), batch_size=1, spacing=list(spacing), network={},
        normalization=[{"scheme": "zscore"}], estimated_memory_gb=0.0, epochs=1, iterations_per_epoch=1,
        n_outputs=n_classes)
    labels = {"background": 0, **{f"organ{k}": k for k in range(1, n_classes)}}
    return RunSpec(dataset="T", task_type="segmentation", fold=0, configuration=configuration,
                   options=TrainOptions(), labels=labels, channel_names={"0": "CT"}, file_ending=".nii.gz")


def whole_volume_probabilities(networks, spec, image, tta):
    """The path before slab streaming: whole working grid, every network, then revert all K at once."""
    data, _, properties = preprocessing.preprocess_case(image, None, spec.configuration, "case")
    axes = segmentation.default_mirror_axes(spec, tta)
    total = None
    for network in networks:
        p = sliding_window_predict(network, torch.from_numpy(data), spec.configuration.patch_size,
                                   spec.configuration.n_outputs, mirror_axes=axes)
        total = p if total is None else total + p
    return preprocessing.revert_to_original((total / len(networks)).numpy(), properties, spec.configuration)


def assert_same_labels(labels, reference_probabilities, spec):
    """Equal labels, except where the reference's two best classes tie to float rounding."""
    expected = probabilities_to_labels(reference_probabilities, spec)
    top2 = np.sort(reference_probabilities, axis=0)[-2:]
    differ = labels != expected
    assert not (differ & (top2[1] - top2[0] > 1e-5)).any(), f"{differ.sum()} labels differ"
    assert len(np.unique(expected)) >= 3          # the comparison means something: several labels


GRIDS = {  # original spacing, plan spacing, shape, patch, tta
    "anisotropic CT, coarse z, in-plane halved": ((3.0, 0.8, 0.8), (3.0, 1.6, 1.6), (14, 40, 44), (8, 16, 16), False),
    "isotropic, upsampled 1.5x with a crop box": ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5), (30, 34, 27), (16, 16, 16), True),
    "same grid (no resampling)": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (21, 18, 33), (8, 16, 16), False),
    "finer working grid (downsampled back)": ((2.0, 1.3, 1.3), (1.0, 1.0, 1.0), (11, 20, 23), (16, 16, 16), False),
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_slab_path_gives_the_whole_volume_path_probabilities_and_labels(name):
    spacing, target, shape, patch, tta = GRIDS[name]
    spec = spec_of(target, patch)
    networks = [BandNet(4, seed=0), BandNet(4, seed=1)]              # two folds of one run
    image = ImageData(array=blobs(shape, zero_border=3 if "crop" in name else 0), spacing=spacing,
                      source_format="array")
    reference = whole_volume_probabilities(networks, spec, image, tta)
    predictor = Predictor(Ensemble(spec, networks, [Path("fold_0"), Path("fold_1")]), "cpu", tta, postprocessing={})
    labels, probabilities = predictor.segment(image)
    np.testing.assert_allclose(probabilities, reference, atol=2e-6)
    assert_same_labels(labels, reference, spec)
    predictor.keep_probabilities = False
    labels_only, nothing = predictor.segment(image)
    assert nothing is None and np.array_equal(labels_only, labels)


def test_a_pair_of_configurations_is_averaged_in_the_original_grid():
    """find-best's pair (two runs of different working grids): each member reverted, then averaged."""
    image = ImageData(array=blobs((16, 40, 36), seed=3), spacing=(3.0, 0.8, 0.8), source_format="array")
    first, second = spec_of((3.0, 1.6, 1.6), (8, 16, 16)), spec_of((3.0, 0.8, 0.8), (4, 24, 24), name="3d_lowres")
    nets = [BandNet(4, seed=2)], [BandNet(4, seed=5)]
    reference = (whole_volume_probabilities(nets[0], first, image, False)
                 + whole_volume_probabilities(nets[1], second, image, False)) / 2
    predictor = Predictor([Ensemble(first, nets[0], [Path("a")]), Ensemble(second, nets[1], [Path("b")])],
                          "cpu", tta=False, postprocessing={})
    labels, probabilities = predictor.segment(image)
    np.testing.assert_allclose(probabilities, reference, atol=2e-6)
    assert_same_labels(labels, reference, first)


def test_labels_alone_never_hold_the_original_grid_times_the_classes(monkeypatch):
    """tracemalloc sees numpy's allocations: K float32 probabilities of the whole original grid
    (the path before this test: resampled copy, result, mean) would exceed half their size."""
    monkeypatch.setattr(segmentation, "REVERT_CHUNK_VALUES", 2 ** 18)     # a few slices of this volume
    n_classes, shape = 8, (40, 96, 96)
    spec = spec_of((2.0, 1.6, 1.6), (16, 32, 32), n_classes)
    image = ImageData(array=blobs(shape, seed=1), spacing=(2.0, 0.8, 0.8), source_format="array")
    predictor = Predictor(Ensemble(spec, [BandNet(n_classes)], [Path("fold_0")]), "cpu", tta=False,
                          postprocessing={"1": True})
    full_grid_bytes = n_classes * int(np.prod(shape)) * 4            # 11.8 MB
    tracemalloc.start()
    try:
        preprocessing.preprocess_case(image, None, spec.configuration, "case")
        preprocess_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        predictor.keep_probabilities = False
        labels, probabilities = predictor.segment(image)
        labels_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        predictor.keep_probabilities = True
        predictor.segment(image)
        probabilities_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels_peak < preprocess_peak + full_grid_bytes / 2, (labels_peak, preprocess_peak, full_grid_bytes)
    assert probabilities is None and labels.shape == shape
    assert probabilities_peak > full_grid_bytes          # the measurement sees a full-grid array when one is made


def test_sliding_window_sums_only_a_tile_deep_slab(monkeypatch):
    """The sums span the patch along the first axis, not the volume; the slabs tile the volume
    and equal the whole-volume result."""
    shapes = []
    real = sliding_window._zeroed_sums
    monkeypatch.setattr(sliding_window, "_zeroed_sums",
                        lambda n, k, spatial, device: shapes.append(spatial) or real(n, k, spatial, device))
    net, data = BandNet(3), torch.randn(1, 45, 20, 24)
    slabs = list(sliding_window_slabs([net], data, (8, 16, 16), 3, mirror_axes=(0, 1, 2)))
    assert shapes == [(8, 20, 24)]
    rows = [first for first, _ in slabs]
    assert rows[0] == 0 and all(s.shape[1] <= 8 for _, s in slabs)
    assert sum(s.shape[1] for _, s in slabs) == 45 and rows == sorted(rows)
    whole = torch.cat([s for _, s in slabs], dim=1)
    np.testing.assert_allclose(whole, sliding_window_predict(net, data, (8, 16, 16), 3, mirror_axes=(0, 1, 2)),
                               atol=1e-6)


def test_preprocessing_a_volume_holds_one_float32_copy_of_it(monkeypatch):
    """Cropping the stored dtype, normalising in place and cubic resampling one axis at a time:
    the peak above the int16 input is its float32 copy, the grids after the first two axes
    (halved, then quartered), the output (an eighth) and a block of lines. scipy's 3D zoom of the whole volume would add a padded
    float32 and a padded float64 copy (above 4x in all), numpy's clip and std a copy each."""
    from autoplan.preprocessing import normalization, resampling

    monkeypatch.setattr(resampling, "ZOOM_CHUNK_VALUES", 2 ** 10)      # chunks small beside this volume
    monkeypatch.setattr(normalization, "STATISTICS_CHUNK_VALUES", 2 ** 12)
    shape = (96, 64, 64)
    image = ImageData(array=(blobs(shape, seed=4) * 300).astype(np.int16), spacing=(1.0, 0.8, 0.8),
                      source_format="array")
    float_bytes = 4 * int(np.prod(shape))
    for scheme in ({"scheme": "zscore"}, {"scheme": "ct", "clip": [-100.0, 500.0], "mean": 50.0, "std": 80.0}):
        spec = spec_of((2.0, 1.6, 1.6), (16, 32, 32))
        spec.configuration.normalization = [scheme]
        tracemalloc.start()
        try:
            data, _, _ = preprocessing.preprocess_case(image, None, spec.configuration, "case")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert data.shape == (1, 48, 32, 32)
        assert peak < 2.2 * float_bytes, (scheme["scheme"], peak / float_bytes)     # 1 + 1/2 + 1/4 + 1/8 + a block
