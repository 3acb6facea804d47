"""Loss conventions: hand-computed Dice, focal vs CE, bce, deep supervision, training."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoplan.errors import InputError
from autoplan.losses import (SoftDiceLoss, build_classification_loss, build_segmentation_loss,
                             deep_supervision_weights, focal_loss)
from autoplan.nets import UNet, deep_supervision_scales, downsample_target

torch.set_num_threads(1)


def constant_foreground_logits(p_foreground, batch=1, size=(2, 2)):
    """Two-class logits whose softmax gives ``p_foreground`` for label 1 everywhere."""
    logits = torch.zeros(batch, 2, *size)
    logits[:, 1] = math.log(p_foreground / (1 - p_foreground))
    return logits


# ---------------------------------------------------------------- segmentation

def test_soft_dice_hand_computed_per_image_and_batch():
    logits = constant_foreground_logits(0.75, batch=2)
    target = torch.zeros(2, 1, 2, 2, dtype=torch.long)
    target[0, 0, 0, :] = 1  # image 0: 2 of 4 pixels foreground, image 1 empty
    # Image 0: I = 2 * 0.75, P = 4 * 0.75, G = 2 -> Dice = 3 / 5 = 0.6.
    # Image 1: I = 0, P = 3, G = 0 -> Dice = smooth / (3 + smooth) ~ 0.
    per_image = SoftDiceLoss(batch_dice=False)(logits, target)
    assert per_image.item() == pytest.approx(1 - (0.6 + 1e-5 / 3) / 2, abs=1e-5)
    # Batch Dice sums first: I = 1.5, P = 6, G = 2 -> Dice = 3 / 8.
    batch = SoftDiceLoss(batch_dice=True)(logits, target)
    assert batch.item() == pytest.approx(1 - 3 / 8, abs=1e-5)


def test_dice_of_perfect_and_wrong_predictions():
    target = torch.randint(0, 3, (2, 1, 6, 6, 6))
    perfect = 50 * F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    loss = build_segmentation_loss("dice", 3)
    assert loss(perfect, target).item() == pytest.approx(0, abs=1e-4)
    wrong = 50 * F.one_hot((target[:, 0] + 1) % 3, 3).movedim(-1, 1).float()
    assert loss(wrong, target).item() == pytest.approx(1, abs=1e-4)
    # dice_ce of a perfect prediction is ~0 too, and >= 0 always.
    assert build_segmentation_loss("dice_ce", 3)(perfect, target).item() == pytest.approx(0, abs=1e-4)


def test_dice_ce_is_the_sum_of_its_parts():
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8))
    total = build_segmentation_loss("dice_ce", 3, batch_dice=True)(logits, target)
    expected = F.cross_entropy(logits, target[:, 0]) + SoftDiceLoss(batch_dice=True)(logits, target)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    ce = build_segmentation_loss("ce", 3)(logits, target)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, target[:, 0]).item(), rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits = torch.randn(4, 3, 5, 5)
    target = torch.randint(0, 3, (4, 5, 5))
    assert focal_loss(logits, target, gamma=0).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6)
    # gamma = 2 down-weights confident pixels, so it is below CE.
    assert focal_loss(logits, target, gamma=2).item() < F.cross_entropy(logits, target).item()


def test_bce_is_two_class_cross_entropy_and_needs_one_foreground_label():
    logits = torch.randn(3, 2, 8, 8)
    target = torch.randint(0, 2, (3, 1, 8, 8))
    bce = build_segmentation_loss("bce", 2)(logits, target)
    by_hand = F.binary_cross_entropy(torch.sigmoid(logits[:, 1] - logits[:, 0]), target[:, 0].float())
    assert bce.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # sigmoid(z1 - z0) is softmax's foreground probability, so bce equals 2-class CE.
    assert bce.item() == pytest.approx(F.cross_entropy(logits, target[:, 0]).item(), rel=1e-5)
    with pytest.raises(InputError, match="one foreground label"):
        build_segmentation_loss("bce", 3)
    with pytest.raises(InputError, match="unknown segmentation loss"):
        build_segmentation_loss("lovasz", 2)


def test_deep_supervision_weights_and_wrapper():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])

    outputs = [torch.randn(2, 2, 16, 16, requires_grad=True),
               torch.randn(2, 2, 8, 8, requires_grad=True),
               torch.randn(2, 2, 4, 4, requires_grad=True)]
    target = torch.randint(0, 2, (2, 1, 16, 16))
    targets = downsample_target(target, [[1, 1], [0.5, 0.5], [0.25, 0.25]])
    loss = build_segmentation_loss("dice_ce", 2)
    single = build_segmentation_loss("dice_ce", 2)
    total = loss(outputs, targets)
    expected = 2 / 3 * single(outputs[0], targets[0]) + 1 / 3 * single(outputs[1], targets[1])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert outputs[0].grad.abs().sum() > 0 and outputs[1].grad.abs().sum() > 0
    assert outputs[2].grad is None  # weight 0: the lowest output is not used
    # Explicit weights, and a plain tensor pair (validation in eval mode).
    explicit = build_segmentation_loss("ce", 2, deep_supervision_weights=[0, 0, 1])
    assert explicit(outputs, targets).item() == pytest.approx(
        F.cross_entropy(outputs[2], targets[2][:, 0]).item(), rel=1e-6)
    assert loss(outputs[0], target).item() == pytest.approx(single(outputs[0], target).item())


@pytest.mark.parametrize("name", ["ce", "bce", "dice", "dice_ce", "focal", "ce_focal"])
def test_every_segmentation_loss_has_finite_nonzero_gradients(name):
    logits = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 2, (2, 1, 4, 4, 4))
    loss = build_segmentation_loss(name, 2)(logits, target)
    assert loss.item() >= 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_a_few_sgd_steps_on_a_toy_problem_reduce_the_loss():
    torch.manual_seed(0)
    images = torch.randn(8, 1, 32, 32) * 0.3
    target = torch.zeros(8, 1, 32, 32, dtype=torch.long)
    for i in range(8):  # a bright square of label 1 at a different place in every image
        y, x = 4 + 2 * i, 20 - 2 * i
        images[i, 0, y:y + 8, x:x + 8] += 1.0
        target[i, 0, y:y + 8, x:x + 8] = 1
    strides = [[1, 1], [2, 2], [2, 2]]
    net = UNet(2, 1, 2, [8, 16, 32], strides, [[3, 3]] * 3)
    targets = downsample_target(target, deep_supervision_scales(strides))
    loss_fn = build_segmentation_loss("dice_ce", 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = loss_fn(net(images), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        prediction = net.eval()(images).argmax(1, keepdim=True)
    dice = 2 * ((prediction == 1) & (target == 1)).sum() / ((prediction == 1).sum() + (target == 1).sum())
    assert dice > 0.7


# ---------------------------------------------------------------- classification

def test_classification_focal_gamma_zero_equals_ce_with_and_without_weights():
    logits = torch.randn(16, 4)
    target = torch.randint(0, 4, (16,))
    weights = [0.5, 2.0, 1.0, 3.0]
    for class_weights in (None, weights):
        focal = build_classification_loss("focal", class_weights=class_weights, focal_gamma=0)
        ce = build_classification_loss("ce", class_weights=class_weights)
        expected = F.cross_entropy(logits, target,
                                   weight=None if class_weights is None else torch.tensor(weights))
        assert focal(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
        assert ce(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_classification_ce_options_and_ce_focal():
    logits = torch.randn(16, 3, requires_grad=True)
    target = torch.randint(0, 3, (16,))
    smoothed = build_classification_loss("ce", label_smoothing=0.1)(logits, target)
    assert smoothed.item() == pytest.approx(
        F.cross_entropy(logits, target, label_smoothing=0.1).item(), rel=1e-6)
    both = build_classification_loss("ce_focal")(logits, target)
    expected = F.cross_entropy(logits, target) + focal_loss(logits, target, gamma=2)
    assert both.item() == pytest.approx(expected.item(), rel=1e-6)
    both.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_logit_adjusted_loss_learns_the_balanced_posterior():
    """Adding log prior to the logits in the loss: the minimiser's own logits are the log
    posterior minus the log prior, so a constant-logit model on a 80/20 label stream ends
    with equal logits (the balanced posterior), where plain CE learns the prior."""
    target = torch.tensor([0] * 80 + [1] * 20)
    prior = torch.tensor([0.8, 0.2])
    for adjustment, expected in ((None, prior.log() - prior.log().mean()), (prior.log(), torch.zeros(2))):
        logits = torch.zeros(2, requires_grad=True)
        loss_fn = build_classification_loss("ce", logit_adjustment=adjustment)
        optimiser = torch.optim.SGD([logits], lr=2.0)
        for _ in range(300):
            optimiser.zero_grad()
            loss_fn(logits.expand(100, 2), target).backward()
            optimiser.step()
        centred = logits.detach() - logits.detach().mean()
        assert torch.allclose(centred, expected, atol=1e-3)


def test_classification_bce_and_bad_names():
    logits = torch.randn(10, 2)
    target = torch.randint(0, 2, (10,))
    bce = build_classification_loss("bce", n_classes=2)(logits, target)
    assert bce.item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
    with pytest.raises(InputError, match="two classes"):
        build_classification_loss("bce", n_classes=7)
    with pytest.raises(InputError, match="unknown classification loss"):
        build_classification_loss("dice")
