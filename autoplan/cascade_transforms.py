"""The cascade's augmentation (nnU-Net v2's): the previous stage's prediction, carried through the
spatial transforms as a second ``seg`` channel, becomes one-hot data channels, then perturbed so
the network learns to correct its input rather than copy it.

A random binary morphology (dilation, erosion, opening or closing by a ball of radius 1-8
voxels) for 40 % of the samples, and the removal of one random connected component (smaller
than 15 % of the patch) for 20 %. Used by ``augmentation.segmentation_transforms``.
"""

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform

CASCADE_MORPHOLOGY_PROBABILITY = 0.4
CASCADE_MORPHOLOGY_RADIUS = (1.0, 8.0)
CASCADE_REMOVE_COMPONENT_PROBABILITY = 0.2
CASCADE_REMOVE_COMPONENT_MAX_FRACTION = 0.15


def cascade_transforms(labels, augment: bool = True) -> list:
    """Steps after the spatial and intensity transforms of a cascade (so neither intensity
    augmentation nor cubic interpolation ever touches the 0/1 channels): seg channel 1 becomes
    one-hot data channels of ``labels``, perturbed when ``augment``."""
    steps = [PreviousStageToOneHot(labels)]
    if augment:
        steps += [RandomBinaryMorphology(len(labels)), RemoveRandomComponent(len(labels))]
    return steps


class PreviousStageToOneHot(AbstractTransform):
    """seg (B, 2, ...) = [labels, previous stage's labels] -> seg (B, 1, ...) and data + one
    channel per label of ``labels`` (1 where the previous stage predicted it)."""

    def __init__(self, labels):
        self.labels = [int(label) for label in labels]

    def __call__(self, **data_dict):
        seg = data_dict["seg"]
        previous = np.rint(seg[:, 1])
        one_hot = np.stack([previous == label for label in self.labels], axis=1).astype(np.float32)
        data_dict["data"] = np.concatenate([np.asarray(data_dict["data"], dtype=np.float32), one_hot], axis=1)
        data_dict["seg"] = seg[:, :1]
        return data_dict


def _ball_operation(mask, name, radius):
    """Binary morphology by a ball of ``radius`` voxels through distance transforms: linear in
    the voxels whatever the radius (scipy's structuring-element dilation by a radius-8 ball
    visits 2,000+ neighbours per voxel of a 3D patch)."""
    from scipy import ndimage

    def dilate(m):
        return ndimage.distance_transform_edt(~m) <= radius if (~m).any() else m

    def erode(m):
        # outside the patch counts as inside the mask: a structure cut by the patch edge is not
        # eroded from that edge (skimage's, so nnU-Net's, border rule)
        if m.all():
            return m
        return ndimage.distance_transform_edt(np.pad(m, 1, constant_values=True))[(slice(1, -1),) * m.ndim] > radius

    operations = {"dilate": dilate, "erode": erode, "open": lambda m: dilate(erode(m)),
                  "close": lambda m: erode(dilate(m))}
    return operations[name](mask)


def _perturbed_samples(data, p_per_sample: float):
    """The batch's samples a perturbation hits, each with probability ``p_per_sample`` (drawn
    lazily, one draw per sample in order, so the transforms' other draws interleave as before)."""
    for sample in range(data.shape[0]):
        if np.random.uniform() < p_per_sample:
            yield sample


class RandomBinaryMorphology(AbstractTransform):
    """Per sample (p=0.4) and per previous-stage channel, in random order: one of dilation,
    erosion, opening, closing by a random ball; voxels a channel gains are removed from the
    others, so the channels stay one-hot (a voxel a channel loses becomes background)."""

    def __init__(self, n_channels, p_per_sample=CASCADE_MORPHOLOGY_PROBABILITY, radius=CASCADE_MORPHOLOGY_RADIUS):
        self.n_channels, self.p_per_sample, self.radius = int(n_channels), p_per_sample, radius

    def __call__(self, **data_dict):
        data = data_dict["data"]
        first = data.shape[1] - self.n_channels
        for sample in _perturbed_samples(data, self.p_per_sample):
            for channel in first + np.random.permutation(self.n_channels):
                mask = data[sample, channel] > 0.5
                if not mask.any():
                    continue
                name = ("dilate", "erode", "open", "close")[np.random.randint(4)]
                changed = _ball_operation(mask, name, np.random.uniform(*self.radius))
                added = changed & ~mask
                data[sample, first:][:, added] = 0
                data[sample, channel] = changed
        return data_dict


class RemoveRandomComponent(AbstractTransform):
    """Per sample (p=0.2) and per previous-stage channel: one random connected component smaller
    than 15 % of the patch set to background (a structure the previous stage missed)."""

    def __init__(self, n_channels, p_per_sample=CASCADE_REMOVE_COMPONENT_PROBABILITY,
                 max_fraction=CASCADE_REMOVE_COMPONENT_MAX_FRACTION):
        self.n_channels, self.p_per_sample, self.max_fraction = int(n_channels), p_per_sample, max_fraction

    def __call__(self, **data_dict):
        from scipy import ndimage

        data = data_dict["data"]
        first = data.shape[1] - self.n_channels
        for sample in _perturbed_samples(data, self.p_per_sample):
            for channel in range(first, data.shape[1]):
                components, n = ndimage.label(data[sample, channel] > 0.5)
                sizes = np.bincount(components.ravel())[1:]
                small = np.flatnonzero(sizes < self.max_fraction * components.size) + 1
                if n and len(small):
                    data[sample, channel][components == np.random.choice(small)] = 0
        return data_dict
