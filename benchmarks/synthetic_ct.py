"""Synthetic CT-like volumes with labels, for tests (small sizes) and benchmarks (clinical sizes).

``ct_volume(shape, seed)`` gives one int16 HU volume and a uint8 label map of the same shape:
air (-1000 HU) around an elliptic body outline whose width changes along z, fat and soft
tissue inside it, a spine (bone, unlabelled), lungs in the upper third, and three organs of
distinct intensity whose centre, size and orientation vary with the seed (label 1 liver-like,
2 kidneys (two blobs), 3 spleen-like), plus Gaussian noise. ``write_ct_dataset`` writes an
autoplan/nnU-Net raw folder (``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``,
``dataset.json``) of such cases, reusing files already there.

    from benchmarks.synthetic_ct import write_ct_dataset
    write_ct_dataset(root, n_cases=6, shape=(120, 320, 320), spacing=(2.5, 0.8, 0.8))
"""

import json
from pathlib import Path

import numpy as np

CT_LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
AIR, FAT, SOFT_TISSUE, LUNG, BONE = -1000, -100, 40, -850, 700
ORGAN_HU = {1: 60, 2: 150, 3: 45}        # liver, kidney (contrast-enhanced cortex), spleen
NOISE_HU = 15.0


def _grid(shape):
    """Coordinates in -1..1 along each axis (z, y, x), broadcastable."""
    return [np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if i == a else 1 for i in range(3)])
            for a, n in enumerate(shape)]


def _ellipsoid(coords, centre, radii, angle):
    """Boolean ellipsoid, rotated by ``angle`` (radians) in the y-x plane."""
    z, y, x = (c - float(m) for c, m in zip(coords, centre))
    cos, sin = np.cos(angle), np.sin(angle)
    yr, xr = cos * y - sin * x, sin * y + cos * x
    return (z / radii[0]) ** 2 + (yr / radii[1]) ** 2 + (xr / radii[2]) ** 2 <= 1.0


def ct_volume(shape=(120, 320, 320), seed=0):
    """(int16 HU image, uint8 labels), both of ``shape`` (z, y, x). Long because it draws the
    body, its tissues and three organs one after the other, each a couple of lines."""
    rng = np.random.default_rng(seed)
    z, y, x = _grid(shape)
    # Body: an ellipse in-plane whose half-axes swell and shrink along z (chest to pelvis).
    width = 0.85 + 0.08 * np.sin(np.pi * z + rng.uniform(0, np.pi)) + rng.uniform(-0.05, 0.05)
    depth = 0.65 + 0.05 * np.cos(np.pi * z) + rng.uniform(-0.04, 0.04)
    body_y = y - rng.uniform(-0.05, 0.05)
    body = (body_y / depth) ** 2 + (x / width) ** 2 <= 1.0
    inner = (body_y / (depth - 0.06)) ** 2 + (x / (width - 0.06)) ** 2 <= 1.0
    image = np.full(shape, AIR, dtype=np.float32)
    image[body] = FAT
    image[inner] = SOFT_TISSUE
    lungs = (z < -0.35) & (_ellipsoid((z * 0, y, np.abs(x)), (0, -0.05, 0.35), (1, 0.35, 0.25), 0.0))
    image[lungs & inner] = LUNG
    spine = ((y - 0.38) / 0.12) ** 2 + (x / 0.09) ** 2 <= 1.0
    image[np.broadcast_to(spine, shape) & inner] = BONE

    labels = np.zeros(shape, dtype=np.uint8)
    jitter = lambda s: rng.uniform(-s, s)  # noqa: E731
    organs = [
        (1, [(0.1 + jitter(0.1), -0.05 + jitter(0.05), -0.35 + jitter(0.05))],
         (0.45 + jitter(0.08), 0.28 + jitter(0.04), 0.25 + jitter(0.04))),
        (2, [(0.35 + jitter(0.08), 0.2 + jitter(0.04), side * (0.3 + jitter(0.03))) for side in (-1, 1)],
         (0.2 + jitter(0.04), 0.08 + jitter(0.015), 0.06 + jitter(0.01))),
        (3, [(0.0 + jitter(0.1), 0.05 + jitter(0.05), 0.4 + jitter(0.05))],
         (0.25 + jitter(0.05), 0.12 + jitter(0.03), 0.09 + jitter(0.02))),
    ]
    for label, centres, radii in organs:
        for centre in centres:
            organ = _ellipsoid((z, y, x), centre, radii, rng.uniform(-0.5, 0.5)) & inner
            labels[organ] = label
            image[organ] = ORGAN_HU[label] + rng.normal(0, 5)
    image += rng.normal(0, NOISE_HU, size=shape).astype(np.float32) * body
    return np.rint(image).astype(np.int16), labels


def write_ct_dataset(root, n_cases=6, shape=(120, 320, 320), spacing=(2.5, 0.8, 0.8), seed=0,
                     name="SyntheticCT") -> Path:
    """A raw dataset folder of ``n_cases`` CT-like cases (spacing in z, y, x mm); returns ``root``."""
    import SimpleITK as sitk

    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    for i in range(n_cases):
        case_id = f"ct_{i:03d}"
        image_path = root / "imagesTr" / f"{case_id}_0000.nii.gz"
        label_path = root / "labelsTr" / f"{case_id}.nii.gz"
        if image_path.is_file() and label_path.is_file():
            continue
        image, labels = ct_volume(shape, seed + i)
        for array, path in ((image, image_path), (labels, label_path)):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing(tuple(float(s) for s in reversed(spacing)))
            sitk.WriteImage(itk, str(path.with_name(".tmp_" + path.name)), useCompression=True)
            path.with_name(".tmp_" + path.name).replace(path)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": CT_LABELS, "numTraining": n_cases,
        "file_ending": ".nii.gz", "task_type": "segmentation", "name": name}, indent=1))
    return root
