"""Check the planner's analytic memory model against the real networks.

    .venv/bin/python benchmarks/memory_model.py [--budgets 4,8,16,24] [--device auto|cpu|cuda]

Plans three dataset shapes (hippocampus-like 3D MRI, JSRT-like 2D X-ray, a large
anisotropic CT, and the HAM10000-like classifier) for each GPU budget, builds every planned
network with ``autoplan.nets`` and prints one table:

* on CUDA: one mixed-precision training step (forward, deep-supervision Dice+CE loss,
  backward, SGD-momentum step) at the planned batch, and the estimate (without the CUDA
  context, which the caching allocator does not see) next to
  ``torch.cuda.max_memory_allocated``; the target is agreement within +-20%;
* on CPU: the network runs on PyTorch's ``meta`` device (shapes only, no compute, no
  memory) with forward hooks on every Conv/Norm/Activation/ConvTranspose module, and the
  counted output elements and parameters are compared with the model's own counts (which
  are what the memory estimate multiplies by bytes and batch size).
"""

import argparse
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from autoplan.fingerprint import ChannelInfo, Fingerprint, IntensityStats, LabelStats
from autoplan.planning import (
    CUDA_CONTEXT_GB,
    configuration_layers,
    estimate_training_memory_gb,
    memory_breakdown,
    plan_dataset,
)


def _fingerprint(name, task, shapes, spacings, channels, labels=None, classes=None):
    shapes = [list(s) for s in shapes]
    median = np.median(np.array(shapes), 0).tolist()
    spacing = np.median(np.array(spacings), 0).tolist()
    stats = IntensityStats(100.0, 100.0, 30.0, -100.0, 400.0, 0.0, 300.0)
    fp = Fingerprint(dataset=name, task_type=task, dim=len(median), axis_order=["z", "y", "x"][-len(median):],
                     n_cases=len(shapes), channels=channels, case_ids=[str(i) for i in range(len(shapes))],
                     shapes=shapes, spacings=spacings, median_shape=median, median_spacing=spacing,
                     shape_percentiles={}, spacing_percentiles={}, anisotropy=max(spacing) / min(spacing),
                     total_voxels=int(sum(np.prod(s) for s in shapes)), disk_bytes=0, source_hash="")
    if task == "segmentation":
        fp.cropped_shapes, fp.median_relative_size_after_cropping = shapes, 1.0
        fp.intensity = [stats] * len(channels)
        fp.labels = {str(k): LabelStats(v, 0.01, 1.0, 1, 100, 100) for k, v in labels.items()}
    else:
        fp.class_counts = classes
        fp.channel_mean, fp.channel_std = [0.5] * len(channels), [0.2] * len(channels)
        fp.aspect_ratios = {"median": median[1] / median[0]}
    return fp


def datasets():
    mr = [ChannelInfo("T1", "mr", "")]
    return [
        _fingerprint("Hippocampus", "segmentation", [[36, 50, 35]] * 220, [[1.0] * 3] * 220, mr,
                     {1: "anterior", 2: "posterior"}),
        _fingerprint("XRay", "segmentation", [[224, 224]] * 200, [[1.0] * 2] * 200,
                     [ChannelInfo("xray", "xray", "")], {1: "r", 2: "l", 3: "heart"}),
        _fingerprint("CT", "segmentation", [[200, 512, 512]] * 60, [[2.5, 0.8, 0.8]] * 60,
                     [ChannelInfo("CT", "ct", "")], {1: "organ"}),
        _fingerprint("Derm", "classification", [[150, 200]] * 8526, [[1.0, 1.0]] * 8526,
                     [ChannelInfo(c, "rgb", "") for c in "RGB"],
                     classes={"nv": 5725, "mel": 938, "bkl": 923, "bcc": 446, "akiec": 282, "vasc": 116,
                              "df": 96}),
    ]


def build(configuration):
    if configuration.name == "classifier":
        from autoplan.nets.resnet import build_resnet

        net = configuration.network
        return build_resnet(net["arch"], configuration.n_input_channels, configuration.n_outputs, net["width"])
    from autoplan.nets.unet import build_unet

    return build_unet(configuration, deep_supervision=True)


HOOKED = {torch.nn.Conv2d: "conv", torch.nn.Conv3d: "conv", torch.nn.ConvTranspose2d: "convtranspose",
          torch.nn.ConvTranspose3d: "convtranspose", torch.nn.InstanceNorm2d: "norm",
          torch.nn.InstanceNorm3d: "norm", torch.nn.BatchNorm2d: "norm", torch.nn.LeakyReLU: "act",
          torch.nn.ReLU: "act"}


def count_on_meta(configuration) -> tuple[int, int]:
    """(module output elements per sample, parameters) of the real network, without computing."""
    with torch.device("meta"):
        net = build(configuration).train()
        x = torch.zeros(1, configuration.n_input_channels, *configuration.patch_size)
    total = [0]

    def hook(module, inputs, output):
        total[0] += output.numel()

    for module in net.modules():
        if type(module) in HOOKED:
            module.register_forward_hook(hook)
    net(x)
    return total[0], sum(p.numel() for p in net.parameters())


def model_counts(configuration) -> tuple[int, int]:
    layers = configuration_layers(configuration)
    outputs = sum(layer.elements for layer in layers if layer.kind in ("conv", "norm", "act", "convtranspose", "head"))
    return outputs, sum(layer.params for layer in layers)


def measure_cuda_peak_gb(configuration) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    net = build(configuration).cuda().train()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(configuration.batch_size, configuration.n_input_channels, *configuration.patch_size,
                    device="cuda")
    for _ in range(2):          # the second step has the optimiser state allocated
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            outputs = net(x)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            loss = 0.0
            for out in outputs:
                if out.dim() == 2:
                    loss = loss + F.cross_entropy(out.float(), torch.zeros(out.shape[0], dtype=torch.long,
                                                                             device="cuda"))
                    continue
                target = torch.randint(0, out.shape[1], (out.shape[0], *out.shape[2:]), device="cuda")
                probabilities = out.float().softmax(1)
                one_hot = F.one_hot(target, out.shape[1]).movedim(-1, 1).float()
                dice = (2 * (probabilities * one_hot).sum() + 1) / (probabilities.sum() + one_hot.sum() + 1)
                loss = loss + F.cross_entropy(out.float(), target) + 1 - dice
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9
    del net, optimizer, x, outputs, loss
    torch.cuda.empty_cache()
    return peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="4,8,16,24")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    budgets = [float(b) for b in args.budgets.split(",")]
    columns = ["dataset", "config", "GB budget", "patch", "batch", "params", "activations/sample", "estimate GB"]
    columns += ["measured GB", "ratio"] if device == "cuda" else ["real params", "real activations", "equal"]
    print(f"memory model check on {device}; estimates exclude the {CUDA_CONTEXT_GB} GB CUDA context\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    worst = 0.0
    failures = 0
    seen = set()
    for fp in datasets():
        for budget in budgets:
            plan = plan_dataset(fp.dataset, fp, device="cuda", gpu_memory_gb=budget)
            for name, config in plan.configurations.items():
                key = (fp.dataset, name, tuple(config.patch_size), config.batch_size, str(config.network))
                if key in seen:
                    continue
                seen.add(key)
                outputs, params = model_counts(config)
                allocated = sum(v for k, v in memory_breakdown(config, "fp16").items() if k != "parameters") / 1e9
                assert abs(allocated + CUDA_CONTEXT_GB - estimate_training_memory_gb(config)) < 1e-9
                row = [fp.dataset, name, f"{budget:g}", "x".join(map(str, config.patch_size)),
                       str(config.batch_size), f"{params:,}", f"{outputs:,}", f"{allocated:.2f}"]
                if device == "cuda":
                    measured = measure_cuda_peak_gb(config)
                    ratio = allocated / measured
                    worst = max(worst, abs(ratio - 1))
                    failures += abs(ratio - 1) > 0.2
                    row += [f"{measured:.2f}", f"{ratio:.2f}"]
                else:
                    real_outputs, real_params = count_on_meta(replace(config, batch_size=1))
                    ok = real_outputs == outputs and real_params == params
                    failures += not ok
                    row += [f"{real_params:,}", f"{real_outputs:,}", "yes" if ok else "NO"]
                print("| " + " | ".join(row) + " |", flush=True)
    if device == "cuda":
        print(f"largest relative error {worst:.0%} (target 20%); {failures} outside")
    else:
        print(f"{failures} mismatches between the model's counts and the real modules")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
