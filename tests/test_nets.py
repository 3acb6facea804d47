"""U-Net shapes and options, ResNet key layout and pretrained loading, Grad-CAM."""

import numpy as np
import pytest
import torch
from torch import nn

from autoplan.errors import InputError
from autoplan.nets import (UNet, build_resnet, build_unet, deep_supervision_scales,
                           downsample_target, freeze_stages, grad_cam, load_pretrained,
                           unfreeze_all)
from autoplan.planning import Configuration

torch.set_num_threads(1)


def tiny_unet(dim=2, **kwargs):
    if dim == 2:
        return UNet(2, 1, 3, [4, 8, 16], [[1, 1], [2, 2], [2, 2]], [[3, 3]] * 3, **kwargs)
    # Anisotropic as planned for thick-slice volumes: no z pooling/kernels at first.
    return UNet(3, 2, 4, [4, 8, 16], [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                [[1, 3, 3], [3, 3, 3], [3, 3, 3]], **kwargs)


# ---------------------------------------------------------------- U-Net

def test_unet_2d_deep_supervision_shapes_and_eval_output():
    net = tiny_unet(2)
    x = torch.randn(2, 1, 32, 24)
    outputs = net.train()(x)
    assert isinstance(outputs, list)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 24), (2, 3, 16, 12)]
    single = net.eval()(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 3, 32, 24)
    # Eval output is the first deep-supervision output (same path; instance norm and no
    # dropout make train and eval mode compute the same).
    assert torch.allclose(single, outputs[0], atol=1e-6)
    net_no_ds = tiny_unet(2, deep_supervision=False)
    assert isinstance(net_no_ds.train()(x), torch.Tensor)


def test_unet_3d_anisotropic_shapes_and_kernels():
    net = tiny_unet(3)
    x = torch.randn(1, 2, 8, 16, 20)
    outputs = net.train()(x)
    assert [tuple(o.shape) for o in outputs] == [(1, 4, 8, 16, 20), (1, 4, 8, 8, 10)]
    first_conv = net.encoder[0][0][0]
    assert first_conv.kernel_size == (1, 3, 3) and first_conv.padding == (0, 1, 1)
    down = net.encoder[1][0][0]
    assert down.stride == (1, 2, 2)
    assert net.upsample[0].stride == (2, 2, 2) and net.upsample[1].kernel_size == (1, 2, 2)
    assert net.eval()(x).shape == (1, 4, 8, 16, 20)


def test_unet_rejects_input_not_divisible_by_total_stride():
    with pytest.raises(ValueError, match="divisible"):
        tiny_unet(2)(torch.randn(1, 1, 30, 24))


def test_unet_norm_dropout_options_and_he_init():
    instance = tiny_unet(2)
    norms = [m for m in instance.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(m.affine and m.eps == 1e-5 for m in norms)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout2d)) for m in instance.modules())
    assert all(m.negative_slope == 0.01 for m in instance.modules() if isinstance(m, nn.LeakyReLU))

    batch = tiny_unet(3, norm="batch", dropout=0.3)
    assert any(isinstance(m, nn.BatchNorm3d) for m in batch.modules())
    dropouts = [m for m in batch.modules() if isinstance(m, nn.Dropout3d)]
    assert len(dropouts) == 3 + 2 and all(m.p == 0.3 for m in dropouts)
    with pytest.raises(InputError):
        tiny_unet(2, norm="group")

    # Kaiming normal with a=0.01: std = sqrt(2 / (1 + a^2) / fan_in), biases zero.
    wide = UNet(2, 64, 2, [64, 64], [[1, 1], [2, 2]], [[3, 3], [3, 3]])
    conv = wide.encoder[0][0][0]
    expected = np.sqrt(2 / (1 + 0.01 ** 2) / (64 * 9))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.all(conv.bias == 0)


def test_build_unet_from_configuration():
    configuration = Configuration(
        name="3d_fullres", dim=3, patch_size=[8, 16, 16], batch_size=2, spacing=[3.0, 1.0, 1.0],
        network={"n_stages": 3, "features_per_stage": [4, 8, 16],
                 "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                 "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "conv_per_stage": 1},
        normalization=[{"scheme": "zscore"}], estimated_memory_gb=0.1, epochs=1,
        iterations_per_epoch=1, n_input_channels=2, n_outputs=3)
    net = build_unet(configuration, norm="batch", dropout=0.1)
    outputs = net.train()(torch.randn(2, 2, 8, 16, 16))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 8, 16, 16), (2, 3, 8, 8, 8)]
    n_convs = sum(isinstance(m, nn.Conv3d) for m in net.encoder.modules())
    assert n_convs == 3  # conv_per_stage=1


def test_deep_supervision_scales_and_downsampled_targets_match_outputs():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    scales = deep_supervision_scales(strides)
    assert scales == [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]]

    net = UNet(3, 1, 2, [2, 4, 4, 4], strides, [[3, 3, 3]] * 4)
    target = torch.randint(0, 3, (2, 1, 8, 16, 16))
    outputs = net.train()(torch.randn(2, 1, 8, 16, 16))
    targets = downsample_target(target, scales)
    assert [t.shape[2:] for t in targets] == [o.shape[2:] for o in outputs]
    assert targets[0] is target and targets[1].dtype == target.dtype
    # Nearest ("exact", pixel-centre) downsampling keeps one voxel of every block, the
    # one nearest the block centre: label ids stay label ids.
    assert torch.equal(targets[1], target[:, :, :, 1::2, 1::2])
    assert torch.equal(targets[2], target[:, :, 1::2, 2::4, 2::4])


# ---------------------------------------------------------------- ResNet

def _expected_keys(blocks, bottleneck):
    """torchvision's resnet state-dict keys, built from the layout (not from torchvision)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    n_convs = 3 if bottleneck else 2
    for stage, n in enumerate(blocks, start=1):
        for i in range(n):
            prefix = f"layer{stage}.{i}"
            for c in range(1, n_convs + 1):
                keys += [f"{prefix}.conv{c}.weight"] + [f"{prefix}.bn{c}.{b}" for b in bn]
            if i == 0 and (stage > 1 or bottleneck):
                keys += [f"{prefix}.downsample.0.weight"] + [f"{prefix}.downsample.1.{b}" for b in bn]
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("arch, blocks, bottleneck, n_keys, n_params", [
    ("resnet18", [2, 2, 2, 2], False, 122, 11_689_512),
    ("resnet34", [3, 4, 6, 3], False, 218, 21_797_672),
    ("resnet50", [3, 4, 6, 3], True, 320, 25_557_032),
])
def test_resnet_keys_and_parameter_counts_match_torchvision(arch, blocks, bottleneck, n_keys, n_params):
    model = build_resnet(arch, in_channels=3, n_classes=1000)
    keys = list(model.state_dict())
    assert len(keys) == n_keys
    assert set(keys) == set(_expected_keys(blocks, bottleneck))
    for key in ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight",
                "layer2.0.downsample.0.weight", "layer4.1.bn2.num_batches_tracked", "fc.bias"]:
        assert key in keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert model.feature_layer is model.layer4


def test_resnet_options_forward_and_width():
    model = build_resnet("resnet18", in_channels=1, n_classes=5, width=8, dropout=0.5)
    assert model.conv1.weight.shape == (8, 1, 7, 7)
    assert model.layer4[0].conv1.out_channels == 64 and model.fc.in_features == 64
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    with pytest.raises(InputError):
        build_resnet("resnet101")


def test_load_pretrained_keeps_backbone_and_reinitialises_head(tmp_path):
    source = build_resnet("resnet18", in_channels=3, n_classes=1000, width=16)
    with torch.no_grad():
        source.bn1.running_mean.uniform_()
    # A checkpoint dict with the weights under "state_dict", as many repositories ship.
    path = tmp_path / "weights.pth"
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, path)

    model = build_resnet("resnet18", in_channels=3, n_classes=4, width=16)
    fresh_fc = model.fc.weight.detach().clone()
    summary = load_pretrained(model, path, n_classes=4)
    assert summary["loaded"] == 120 and summary["skipped"] == ["fc.bias", "fc.weight"]
    target = model.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(target[key], value), key
    assert model.fc.weight.shape == (4, 128)
    assert not torch.equal(model.fc.weight, fresh_fc)  # re-initialised, not left as built
    assert model.fc.weight.abs().max() <= 1 / np.sqrt(128) + 1e-6

    # Grey model from RGB weights: conv1 summed over the colour channels.
    grey = build_resnet("resnet18", in_channels=1, n_classes=2, width=16)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    load_pretrained(grey, tmp_path / "plain.pt")
    assert torch.allclose(grey.conv1.weight, source.conv1.weight.sum(1, keepdim=True))


def test_load_pretrained_rejects_weights_that_do_not_fit(tmp_path):
    wider = build_resnet("resnet18", width=32).state_dict()
    torch.save(wider, tmp_path / "wide.pt")
    with pytest.raises(InputError, match="shape"):
        load_pretrained(build_resnet("resnet18", width=16), tmp_path / "wide.pt")
    partial = {k: v for k, v in build_resnet("resnet18", width=16).state_dict().items()
               if not k.startswith("layer3.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(InputError, match="missing layer3"):
        load_pretrained(build_resnet("resnet18", width=16), tmp_path / "partial.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(InputError):
        load_pretrained(build_resnet("resnet18", width=16), tmp_path / "junk.pt")
    with pytest.raises(InputError, match="not found"):
        load_pretrained(build_resnet("resnet18", width=16), tmp_path / "absent.pt")


def test_freeze_stages_freezes_parameters_and_bn_statistics():
    model = build_resnet("resnet18", n_classes=2, width=8)
    freeze_stages(model, 2)
    model.train()
    assert not model.conv1.weight.requires_grad and not model.layer2[1].conv2.weight.requires_grad
    assert model.layer3[0].conv1.weight.requires_grad and model.fc.weight.requires_grad
    frozen_mean = model.layer1[0].bn1.running_mean.clone()
    free_mean = model.layer3[0].bn1.running_mean.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(4, 3, 64, 64)).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(model.layer1[0].bn1.running_mean, frozen_mean)
    assert not torch.equal(model.layer3[0].bn1.running_mean, free_mean)
    assert model.conv1.weight.grad is None

    unfreeze_all(model)
    assert all(p.requires_grad for p in model.parameters())
    assert model.layer1[0].bn1.training


# ---------------------------------------------------------------- Grad-CAM

class BrightDarkNet(nn.Module):
    """Class 1 = "something bright", class 0 = "something dark", seen by two channels."""

    def __init__(self):
        super().__init__()
        self.feature_layer = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.ReLU())
        with torch.no_grad():
            self.feature_layer[0].weight.zero_()
            self.feature_layer[0].weight[0, 0, 1, 1] = 1.0   # bright detector
            self.feature_layer[0].weight[1, 0, 1, 1] = -1.0  # dark detector
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))

    def forward(self, x):
        return self.fc(self.feature_layer(x).mean(dim=(2, 3)))


def test_grad_cam_highlights_the_region_that_drives_the_class():
    image = torch.zeros(1, 1, 16, 16)
    image[..., 2:6, 10:14] = 1.0    # bright square, top right
    image[..., 10:14, 2:6] = -1.0   # dark square, bottom left
    model = BrightDarkNet()
    bright = grad_cam(model, image, torch.tensor([1]))[0]
    dark = grad_cam(model, image, torch.tensor([0]))[0]
    assert bright.shape == (16, 16) and bright.min() >= 0 and bright.max() == pytest.approx(1)
    assert bright[3:5, 11:13].mean() > 0.9 and bright[11:13, 3:5].mean() < 0.1
    assert dark[11:13, 3:5].mean() > 0.9 and dark[3:5, 11:13].mean() < 0.1


def test_grad_cam_on_resnet_is_clean():
    torch.manual_seed(0)
    model = build_resnet("resnet18", in_channels=3, n_classes=3, width=8)
    freeze_stages(model, 4)  # gradients must still reach the activation
    model.train()
    images = torch.rand(2, 3, 96, 80)
    maps = grad_cam(model, images)
    assert maps.shape == (2, 96, 80) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and np.all(maps.reshape(2, -1).max(1) > 0)
    assert model.training  # mode restored
    assert not model.layer4._forward_hooks  # hook removed
    assert all(p.grad is None for p in model.parameters())  # no gradient leaks
    # Batch entries are independent: the same map alone or in a batch.
    alone = grad_cam(model, images[1:], target_classes=torch.tensor([2]))
    batched = grad_cam(model, images, target_classes=torch.tensor([0, 2]))
    np.testing.assert_allclose(alone[0], batched[1], atol=1e-5)


def test_grad_cam_of_a_briefly_trained_resnet_points_at_the_object():
    """Class = bright or dark square at a random place: the map should find the square."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    def squares(n):
        images = torch.randn(n, 1, 64, 64, generator=generator) * 0.3
        labels = torch.randint(0, 2, (n,), generator=generator)
        corners = torch.randint(0, 48, (n, 2), generator=generator).tolist()
        for image, label, (r, c) in zip(images, labels, corners):
            image[0, r:r + 16, c:c + 16] += 1.0 if label == 1 else -1.0
        return images, labels, corners

    # Two stages keep an 8x8 feature map on a 64x64 input.
    model = build_resnet("resnet18", in_channels=1, n_classes=2, width=8, blocks_per_stage=[1, 1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        images, labels, _ = squares(16)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels, corners = squares(8)
    maps = grad_cam(model, images, labels)
    for heat, (r, c) in zip(maps, corners):
        inside = np.zeros((64, 64), bool)
        inside[r:r + 16, c:c + 16] = True
        assert heat[inside].mean() > heat[~inside].mean() + 0.3
