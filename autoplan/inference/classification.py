"""Classification of preprocessed images (flip TTA, the plan's imbalance correction) and the
Grad-CAM samples of the reports; training's final validation and prediction share them."""

import numpy as np
import torch

from autoplan import preprocessing
from autoplan.artifacts import leaning_factors
from autoplan.inference.models import predicting
from autoplan.nets.gradcam import grad_cam


def _flip_variants(batch: torch.Tensor, tta: bool) -> list:
    if not tta:
        return [batch]
    return [batch, torch.flip(batch, [3]), torch.flip(batch, [2]), torch.flip(batch, [2, 3])]


def classify_batch(network, batch, tta: bool = True, device="cpu") -> np.ndarray:
    """Softmax probabilities ``(B, K)`` of a normalised batch ``(B, C, H, W)``.

    With ``tta`` the identity, horizontal, vertical and both flips are averaged.
    """
    device = torch.device(device)
    batch = torch.as_tensor(batch, dtype=torch.float32).to(device)
    with predicting(network, device):
        variants = _flip_variants(batch, tta)
        logits = network(torch.cat(variants)).float()
        probabilities = torch.softmax(logits, dim=1).reshape(len(variants), len(batch), -1).mean(0)
    return probabilities.cpu().numpy()


def decision_probabilities(probabilities, imbalance: dict | None) -> np.ndarray:
    """The probabilities predictions are taken from: ``(N, K)`` model probabilities times
    ``class_weights ** -posterior_correction`` (only for a weighted or logit-adjusted loss) times
    ``exp(class_log_offsets)``, renormalised: the plan's decision rule (the planner's default
    correction, ``planning.POSTERIOR_CORRECTION``, or what ``autoplan calibrate`` chose on
    out-of-fold predictions). Unchanged when the plan has neither."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    imbalance = imbalance or {}
    factors = np.ones(probabilities.shape[-1])
    correction = float(imbalance.get("posterior_correction", 0.0))
    leaning = leaning_factors(imbalance)
    if correction and leaning is not None:
        factors *= np.asarray(leaning, dtype=np.float64) ** -correction
    if imbalance.get("class_log_offsets"):
        factors *= np.exp(np.asarray(imbalance["class_log_offsets"], dtype=np.float64))
    if np.all(factors == 1.0):
        return probabilities
    adjusted = probabilities * factors
    return adjusted / adjusted.sum(axis=1, keepdims=True)


def model_probabilities(networks: list, pixels, configuration, tta: bool, device) -> np.ndarray:
    """The networks' mean softmax ``(N, K)`` of preprocessed pixels ``(N, H, W, C)``, before
    any decision rule (what ``autoplan calibrate`` fits the rule on)."""
    normalized = preprocessing.normalize_classification_batch(np.asarray(pixels), configuration)
    batch = torch.from_numpy(np.asarray(normalized))
    return np.mean([classify_batch(network, batch, tta, device) for network in networks], axis=0)


def classify_pixels(networks: list, pixels, configuration, tta: bool, device) -> np.ndarray:
    """Decision probabilities ``(N, K)`` of preprocessed pixels ``(N, H, W, C)``, averaged over
    the networks: the one place predictions and final validation turn images into decisions."""
    return decision_probabilities(model_probabilities(networks, pixels, configuration, tta, device),
                                  configuration.imbalance)


# ============================================================================ Grad-CAM samples


def pick_gradcam_indices(y_true, y_pred, confidence, n_classes: int) -> list:
    """Per true class: the most confident correct image and the most confident wrong one.

    Falls back to a second image of the other kind when one kind is missing (at most 2).
    """
    picks = []
    for k in range(n_classes):
        members = np.flatnonzero(y_true == k)
        correct = sorted(members[y_pred[members] == k], key=lambda i: -confidence[i])
        wrong = sorted(members[y_pred[members] != k], key=lambda i: -confidence[i])
        chosen = correct[:1] + wrong[:1]
        rest = correct[1:] + wrong[1:]
        picks += [int(i) for i in (chosen + rest)[:2]]
    return picks


def gradcam_samples(network, images, y_true, probabilities, classes: list, configuration, cases: list,
                    device="cpu") -> list:
    """Grad-CAM heat maps for up to 2 images per true class (one correct, one wrong where possible).

    ``images[i]`` is image i, uint8 ``(H, W, C)`` at the network's input size (only the
    picked ones are read). Returns ``report.classification.GradcamSample`` s, ordered by class.
    """
    from autoplan.report.classification import GradcamSample  # here: prediction alone needs no matplotlib

    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    if not len(y_true):
        return []
    y_pred = probabilities.argmax(axis=1)
    picks = pick_gradcam_indices(y_true, y_pred, probabilities.max(axis=1), len(classes))
    if not picks:
        return []
    pixels = np.stack([np.asarray(images[i]) for i in picks])
    batch = torch.from_numpy(preprocessing.normalize_classification_batch(pixels, configuration)).to(device)
    heatmaps = grad_cam(network, batch, target_classes=torch.as_tensor(y_pred[picks]))
    return [GradcamSample(case=str(cases[i]), true_class=classes[y_true[i]], predicted_class=classes[y_pred[i]],
                          probability=float(probabilities[i, y_pred[i]]), image=pixels[n], heatmap=heatmaps[n])
            for n, i in enumerate(picks)]
