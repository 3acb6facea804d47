"""Back to the input grid, four ways, for ``scaling.py --stages revert``: from the same working-grid
probabilities (a softmax of each label's signed distance to its boundary in the working grid,
the true labels resampled there, plus smooth noise: boundaries about a voxel wide that wander
as a trained network's do), each way in its own process, timed,
its peak memory measured and its labels compared with the whole-array path and with the truth.

- full: all K probabilities resampled whole (``revert_to_original``), then the argmax (the path
  before issue 26);
- chunked: ``OriginalGrid`` slab by slab, argmax on the fly (prediction's path now);
- argmax_nearest: the argmax in the working grid, the label map resampled nearest-neighbour;
- argmax_smooth: the argmax in the working grid, each label's one-hot resampled linearly and the
  argmax taken again (``resample_labels``, as training resamples masks).
"""

import json
import sys
import textwrap
from pathlib import Path

import numpy as np

from benchmarks.scaling_sides import run_snippet
from benchmarks.synthetic_ct import CT_LABELS


REVERT = textwrap.dedent('''
    import json, sys, time
    import numpy as np
    config = json.loads(sys.argv[1])
    import torch
    torch.set_num_threads(config["threads"])
    from scipy import ndimage
    from autoplan.io import read_image
    from autoplan.planning import Configuration
    from autoplan.preprocessing import preprocess_case
    from autoplan.preprocessing.case import CaseProperties, OriginalGrid, revert_to_original
    from autoplan.preprocessing.resampling import coarse_axis, resample_labels
    work, method = config["work"], config["method"]
    configuration = Configuration(**config["configuration"])
    if method == "prepare":
        # Working-grid probabilities as a trained network gives them: a softmax of each label's
        # signed distance to its boundary (1 per voxel; the classes tie on the true boundary, a
        # blur would shrink small organs) plus smooth noise, so boundaries wander and some
        # voxels are uncertain between several classes.
        image, truth = read_image(config["file"]), read_image(config["label"])
        _, seg, properties = preprocess_case(image, truth.array, configuration, "case")
        def signed_distance(mask):
            if not mask.any():
                return np.full(mask.shape, -1e3, dtype=np.float32)
            return (ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)).astype(np.float32)
        rng = np.random.default_rng(0)
        def uncertainty(shape):   # smooth noise (sigma 3 voxels, std 1): where a network hesitates
            field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 3.0)
            return field / max(float(field.std()), 1e-6)
        probabilities = np.stack([signed_distance(seg[0] == k) + uncertainty(seg[0].shape)
                                  for k in range(configuration.n_outputs)])
        probabilities -= probabilities.max(axis=0, keepdims=True)
        np.exp(probabilities, out=probabilities)
        probabilities /= probabilities.sum(axis=0, keepdims=True)
        np.save(work + "/working.npy", probabilities)
        properties.save(work + "/properties.json")
        print("SECONDS 0")
        sys.exit(0)
    probabilities = np.load(work + "/working.npy")
    properties = CaseProperties.load(work + "/properties.json")
    started = time.perf_counter()
    spacing, target = properties.original_spacing, properties.spacing_after_resampling
    if method == "full":          # the path before: all K probabilities reverted whole, then argmax
        labels = revert_to_original(probabilities, properties, configuration).argmax(axis=0).astype(np.uint8)
    elif method == "chunked":     # this path: slab by slab, argmax on the fly
        slabs = ((first, probabilities[:, first:first + 16]) for first in range(0, probabilities.shape[1], 16))
        grid = OriginalGrid(slabs, properties, configuration, len(probabilities))
        labels = np.empty(properties.original_shape, dtype=np.uint8)
        rows = max(1, 2 ** 23 // (len(probabilities) * int(np.prod(properties.original_shape[1:]))))
        for first in range(0, len(labels), rows):
            labels[first:first + rows] = grid.rows(rows).argmax(axis=0)
    else:                         # argmax in the working grid, then the label map resampled
        working = probabilities.argmax(axis=0).astype(np.int16)
        shape = properties.shape_after_crop
        if method == "argmax_nearest":
            cropped = ndimage.zoom(working, [n / o for n, o in zip(shape, working.shape)], order=0,
                                   mode="nearest", grid_mode=True)
        else:                     # "argmax_smooth": each label's one-hot linearly, then argmax
            cropped = resample_labels(working, shape, coarse=coarse_axis(spacing, target))
        labels = np.zeros(properties.original_shape, dtype=np.uint8)
        labels[tuple(slice(lo, hi) for lo, hi in properties.crop_bbox)] = cropped
    seconds = time.perf_counter() - started
    np.save(work + f"/labels_{method}.npy", labels)
    print("SECONDS " + json.dumps(seconds))
''')

REVERT_METHODS = ("full", "chunked", "argmax_nearest", "argmax_smooth")


def dice_per_label(a: np.ndarray, b: np.ndarray, labels) -> list:
    out = []
    for label in labels:
        x, y = a == label, b == label
        total = int(x.sum()) + int(y.sum())
        out.append(2.0 * int((x & y).sum()) / total if total else 1.0)
    return out


def compare_reverts(args, work: Path, dataset: dict, configuration: dict, env: dict) -> dict:
    """Seconds, peak MB and Dice (against the whole-array path and against the truth) of the four ways."""
    from autoplan.io import read_image

    folder = work / "revert" / dataset["name"]
    folder.mkdir(parents=True, exist_ok=True)
    base = {"work": str(folder), "configuration": configuration, "threads": args.threads,
            "file": str(dataset["files"][0]), "label": str(dataset["labels"][0])}
    prepared = run_snippet(sys.executable, REVERT, {**base, "method": "prepare"}, env)
    if "error" in prepared:
        return {"error": prepared["error"]}
    results = {name: run_snippet(sys.executable, REVERT, {**base, "method": name}, env) for name in REVERT_METHODS}
    truth = read_image(dataset["labels"][0]).array[0]
    reference = np.load(folder / "labels_full.npy")
    foreground = [v for v in CT_LABELS.values() if v]
    for name, result in results.items():
        if "error" not in result:
            labels = np.load(folder / f"labels_{name}.npy")
            result["dice_vs_full"] = float(np.mean(dice_per_label(labels, reference, foreground)))
            result["dice_vs_truth"] = float(np.mean(dice_per_label(labels, truth, foreground)))
            result["voxels_differing"] = int((labels != reference).sum())
    return results


