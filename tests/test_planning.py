"""Planner: nnU-Net's rules on fingerprints shaped like the real datasets, memory and time fits."""

import json
from dataclasses import replace

import numpy as np
import pytest

from autoplan.errors import InputError
from autoplan.fingerprint import ChannelInfo, Fingerprint, IntensityStats, LabelStats
from autoplan.jsonio import dumps
from autoplan.planning.schedule import (RESERVE_BASE_SECONDS, RESERVE_CASE_FLOOR_SECONDS, TRAIN_FRACTION,
                                        VAL_ITERATION_COST, final_validation_seconds)
from autoplan.planning.probe import PROBE_RATIO_RANGE
from autoplan.planning.classification import TARGET_EPOCHS_CLASSIFICATION
from autoplan.planning.schedule import CPU_LOADER_OVERHEAD
from autoplan.planning import (
    Configuration,
    Plan,
    classifier_input_sizes,
    configuration_layers,
    estimate_seconds_per_iteration,
    estimate_training_memory_gb,
    format_plan_table,
    imbalance_handling,
    plan_dataset,
    target_spacing,
    unet_topology,
)


def _stats(mean=100.0, std=20.0, lo=10.0, hi=300.0):
    return IntensityStats(mean=mean, median=mean, std=std, min=lo - 5, max=hi + 5,
                          percentile_00_5=lo, percentile_99_5=hi)


def _label(name, fraction=0.01):
    return LabelStats(name=name, voxel_fraction=fraction, case_fraction=1.0, components_per_case_median=1,
                      component_size_median_voxels=500, component_size_median_mm=500)


def _segmentation_fingerprint(name, shapes, spacings, channels, labels, intensity, relative_size=1.0):
    shapes = [list(map(int, s)) for s in shapes]
    spacings = [list(map(float, s)) for s in spacings]
    median_shape = np.median(np.array(shapes), 0).tolist()
    median_spacing = np.median(np.array(spacings), 0).tolist()
    return Fingerprint(
        dataset=name, task_type="segmentation", dim=len(shapes[0]),
        axis_order=["z", "y", "x"][-len(shapes[0]):], n_cases=len(shapes), channels=channels,
        case_ids=[f"case_{i:03d}" for i in range(len(shapes))], shapes=shapes, spacings=spacings,
        median_shape=median_shape, median_spacing=median_spacing,
        shape_percentiles={"p5": median_shape, "p95": median_shape},
        spacing_percentiles={"p5": median_spacing, "p95": median_spacing},
        anisotropy=max(median_spacing) / min(median_spacing),
        total_voxels=int(sum(np.prod(s) for s in shapes)), disk_bytes=1, source_hash="x",
        cropped_shapes=shapes, median_cropped_shape=median_shape,
        median_relative_size_after_cropping=relative_size, intensity=intensity,
        per_case_intensity_max=[1.0] * len(shapes), intensity_scales_differ=False,
        labels={str(k): _label(v) for k, v in labels.items()}, foreground_fraction=0.05)


def hippocampus_fingerprint():
    """MSD Task04-like: 220 T1 crops around 36x50x35 voxels at 1 mm."""
    offsets = [(-2, -3, -2), (0, 0, 0), (2, 3, 2), (-1, 1, 0), (1, -1, 0)]
    shapes = [[36 + offsets[i % 5][0], 50 + offsets[i % 5][1], 35 + offsets[i % 5][2]] for i in range(220)]
    fp = _segmentation_fingerprint("TaskHippocampus", shapes, [[1.0, 1.0, 1.0]] * 220,
                                   [ChannelInfo("T1", "mr", "MRI values")], {1: "anterior", 2: "posterior"},
                                   [_stats(300.0, 120.0, 20.0, 900.0)])
    fp.intensity_scales_differ = True
    return fp


def jsrt_fingerprint():
    """JSRT-like: 200 grey chest X-rays of 224x224, 3 labels + background."""
    return _segmentation_fingerprint("TaskXRay", [[224, 224]] * 200, [[1.0, 1.0]] * 200,
                                     [ChannelInfo("xray", "xray", "8-bit grey PNG")],
                                     {1: "right lung", 2: "left lung", 3: "heart"},
                                     [_stats(120.0, 50.0, 5.0, 250.0)])


def ct_fingerprint():
    """Large anisotropic CT: 60 scans of ~200x512x512 at 2.5 x 0.8 x 0.8 mm (a few at 1.25 mm)."""
    shapes = [[190 + (i % 5) * 5, 512, 512] for i in range(60)]
    spacings = [[1.25 if i % 10 == 0 else 2.5, 0.8, 0.8] for i in range(60)]
    return _segmentation_fingerprint("TaskCT", shapes, spacings,
                                     [ChannelInfo("CT", "ct", "values span -1024..3071 HU")], {1: "organ"},
                                     [_stats(60.0, 40.0, -80.0, 250.0)])


def ham_fingerprint():
    """HAM10000-like: 8526 RGB images of 150x200, 7 strongly imbalanced classes."""
    counts = {"nv": 5725, "mel": 938, "bkl": 923, "bcc": 446, "akiec": 282, "vasc": 116, "df": 96}
    n = sum(counts.values())
    return Fingerprint(
        dataset="TaskDerm", task_type="classification", dim=2, axis_order=["y", "x"], n_cases=n,
        channels=[ChannelInfo(c, "rgb", "8-bit colour JPEG") for c in "RGB"],
        case_ids=[f"ISIC_{i:07d}" for i in range(n)], shapes=[[150, 200]] * n, spacings=[[1.0, 1.0]] * n,
        median_shape=[150, 200], median_spacing=[1.0, 1.0], shape_percentiles={}, spacing_percentiles={},
        anisotropy=1.0, total_voxels=n * 150 * 200, disk_bytes=1, source_hash="y",
        class_counts=counts, class_frequencies={k: v / n for k, v in counts.items()},
        imbalance_ratio=5725 / 96, aspect_ratios={"median": 200 / 150, "p5": 200 / 150, "p95": 200 / 150},
        channel_mean=[0.76, 0.55, 0.57], channel_std=[0.14, 0.15, 0.17])


# ---------------------------------------------------------------------------------- GPU plans
def test_hippocampus_at_8gb_matches_nnunet():
    plan = plan_dataset("TaskHippocampus", hippocampus_fingerprint(), device="cuda", gpu_memory_gb=8)
    assert plan.default_configuration == "3d_fullres"
    assert set(plan.configurations) == {"2d", "3d_fullres"}      # no lowres: the patch covers everything
    full = plan.configurations["3d_fullres"]
    assert full.patch_size == [40, 56, 40]
    assert full.network["n_stages"] == 4
    assert full.network["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert full.network["features_per_stage"] == [32, 64, 128, 256]
    assert full.network["kernel_sizes"] == [[3, 3, 3]] * 4
    # 5% of 220 x 36x50x35 voxels / 40x56x40 = 7.7 -> 8 (nnU-Net's 9 comes from 260 cases)
    assert full.batch_size == 8
    assert full.spacing == [1.0, 1.0, 1.0]
    assert full.normalization == [{"scheme": "zscore"}]
    assert full.n_outputs == 3 and full.n_input_channels == 1
    assert (full.epochs, full.iterations_per_epoch, full.val_iterations_per_epoch) == (1000, 250, 50)
    assert 0.5 < full.estimated_memory_gb < 8
    assert set(full.reasons) >= {"patch_size", "batch_size", "network", "normalization", "spacing"}


def test_jsrt_at_8gb_covers_the_whole_image():
    plan = plan_dataset("TaskXRay", jsrt_fingerprint(), device="cuda", gpu_memory_gb=8)
    assert list(plan.configurations) == ["2d"] and plan.default_configuration == "2d"
    config = plan.configurations["2d"]
    assert config.patch_size == [224, 224]
    assert config.batch_size == 10                 # 5% of 200 images
    assert config.network["n_stages"] == 6         # 224 -> 7 after five poolings
    assert config.network["features_per_stage"] == [32, 64, 128, 256, 512, 512]
    assert config.n_outputs == 4
    assert config.batch_dice is True


def test_large_ct_gets_anisotropic_topology_lowres_and_ct_normalization():
    fp = ct_fingerprint()
    assert target_spacing(fp) == [2.5, 0.8, 0.8]   # 3.1x coarser, but not 3x fewer voxels: median
    plan = plan_dataset("TaskCT", fp, device="cuda", gpu_memory_gb=8)
    assert set(plan.configurations) == {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    full, low = plan.configurations["3d_fullres"], plan.configurations["3d_lowres"]
    assert full.estimated_memory_gb <= 8 and full.batch_size == 2
    # z (2.5 mm) is > 2x coarser than x/y (0.8 mm): no pooling and 1-kernels on z at first
    assert full.network["strides"][1][0] == 1 and full.network["kernel_sizes"][0][0] == 1
    assert all(p % int(np.prod([s[a] for s in full.network["strides"]])) == 0
               for a, p in enumerate(full.patch_size))
    assert all(lo > hi for lo, hi in zip(low.spacing, full.spacing))
    assert full.batch_dice is True and low.batch_dice is False
    norm = full.normalization[0]
    assert norm["scheme"] == "ct" and norm["clip"] == [-80.0, 250.0] and norm["mean"] == 60.0


def test_anisotropic_axis_takes_the_tenth_percentile():
    shapes = [[20, 256, 256]] * 30
    spacings = [[5.0, 0.7, 0.7]] * 25 + [[3.0, 0.7, 0.7]] * 5
    fp = _segmentation_fingerprint("Aniso", shapes, spacings, [ChannelInfo("T2", "mr", "")], {1: "x"},
                                   [_stats()])
    assert target_spacing(fp) == [3.0, 0.7, 0.7]


def test_nonzero_mask_normalization_when_cropping_shrank_images():
    fp = hippocampus_fingerprint()
    fp.median_relative_size_after_cropping = 0.6
    plan = plan_dataset("TaskHippocampus", fp, device="cuda", gpu_memory_gb=8)
    assert plan.configurations["3d_fullres"].normalization == [{"scheme": "zscore_nonzero"}]


def test_rgb_segmentation_uses_intensity_stats_over_255():
    fp = jsrt_fingerprint()
    fp.channels = [ChannelInfo(c, "rgb", "") for c in "RGB"]
    fp.intensity = [_stats(127.5, 51.0)] * 3
    config = plan_dataset("Derm", fp, device="cuda", gpu_memory_gb=8).configurations["2d"]
    assert config.normalization[0] == {"scheme": "rgb", "mean": 0.5, "std": 0.2}
    assert config.n_input_channels == 3


@pytest.mark.parametrize("make", [hippocampus_fingerprint, jsrt_fingerprint, ct_fingerprint])
def test_more_memory_never_means_fewer_voxels_per_batch(make):
    fp = make()
    previous = {}
    for budget in (4, 8, 16, 24, 40, 80):
        plan = plan_dataset(fp.dataset, fp, device="cuda", gpu_memory_gb=budget)
        for name, config in plan.configurations.items():
            if name == "3d_lowres":
                continue           # its spacing is re-searched per budget
            covered = int(np.prod(config.patch_size)) * config.batch_size
            assert covered >= previous.get(name, 0), (name, budget)
            assert config.estimated_memory_gb <= budget
            previous[name] = covered


def test_topology_rules():
    topo = unet_topology([1.0, 1.0, 1.0], [36, 50, 35])
    assert topo.patch_size == [40, 56, 40] and topo.divisor == [8, 8, 8]
    # a single poolable axis needs 12 voxels, not 8
    assert unet_topology([1.0, 1.0], [10, 64]).strides[-1] == [1, 2]
    thick = unet_topology([5.0, 1.0, 1.0], [16, 128, 128])
    assert thick.kernel_sizes[0] == [1, 3, 3] and thick.strides[1] == [1, 2, 2]


# ---------------------------------------------------------------------------------- classification
def test_ham10000_classifier_plan():
    plan = plan_dataset("TaskDerm", ham_fingerprint(), device="cuda", gpu_memory_gb=8)
    assert list(plan.configurations) == ["classifier"] and plan.default_configuration == "classifier"
    config = plan.configurations["classifier"]
    assert config.patch_size == [128, 160]
    assert config.network["arch"] in ("resnet18", "resnet34", "resnet50") and config.network["width"] == 64
    assert config.n_outputs == 7 and config.n_input_channels == 3
    assert (config.loss, config.optimizer, config.lr, config.augment) == ("ce", "adamw", 1e-3, "default")
    assert config.normalization[0] == {"scheme": "rgb", "mean": 0.76, "std": 0.14}
    imbalance = config.imbalance
    assert imbalance["strategy"] == "weighted_loss" and "reason" in imbalance
    weights = dict(zip(imbalance["classes"], imbalance["class_weights"]))
    assert weights["df"] > weights["mel"] > weights["nv"]
    assert np.mean(imbalance["class_weights"]) == pytest.approx(1.0, abs=1e-3)
    # (1/frequency)^0.25: df/nv = (5725/96)^0.25
    assert weights["df"] / weights["nv"] == pytest.approx((5725 / 96) ** 0.25, rel=1e-3)
    assert imbalance["posterior_correction"] == 0.5 and "take back 0.5" in imbalance["reason"]
    assert config.estimated_memory_gb <= 8


def test_classifier_sizes_keep_aspect_and_never_upsample():
    sizes = classifier_input_sizes([150, 200], 200 / 150)
    assert sizes[0] == [128, 160]
    assert all(h % 32 == 0 and w % 32 == 0 and h <= 150 and w <= 200 for h, w in sizes)
    balanced = imbalance_handling(["a", "b"], {"a": 10, "b": 9})
    assert balanced["strategy"] == "none" and "posterior_correction" not in balanced


def test_logit_adjusted_imbalance_leans_by_the_inverse_prior(monkeypatch):
    from autoplan.planning import classification
    monkeypatch.setattr(classification, "IMBALANCE_STRATEGY", "logit_adjusted")
    plan = imbalance_handling(["a", "b", "c"], {"a": 700, "b": 200, "c": 100})
    leaning = np.asarray(plan["class_weights"])
    assert plan["strategy"] == "logit_adjusted"
    np.testing.assert_allclose(leaning / leaning[0], [1.0, 3.5, 7.0], rtol=1e-3)   # frequency ** -1
    # the default decision keeps the weighted loss's residual lean: frequency ** -0.125
    assert (1 - plan["posterior_correction"]) * classification.LOGIT_ADJUSTMENT_TAU == pytest.approx(0.125)


def test_train_imbalance_option_switches_the_planned_strategy():
    from dataclasses import replace
    from autoplan.runs import TrainOptions
    from autoplan.training import effective_configuration

    config = plan_dataset("TaskDerm", ham_fingerprint(), device="cpu", time_budget_minutes=30,
                          probe=False).configurations["classifier"]
    assert config.imbalance["strategy"] == "weighted_loss"
    switched = effective_configuration(config, TrainOptions(imbalance="logit_adjusted")).imbalance
    assert switched["strategy"] == "logit_adjusted" and switched["class_counts"] == config.imbalance["class_counts"]
    assert effective_configuration(config, TrainOptions()).imbalance == config.imbalance
    older = replace(config, imbalance={k: v for k, v in config.imbalance.items() if k != "class_counts"})
    with pytest.raises(InputError, match="autoplan plan. again"):
        effective_configuration(older, TrainOptions(imbalance="logit_adjusted"))


def test_an_imbalance_option_that_changes_nothing_says_so():
    from dataclasses import replace
    from autoplan.planning.classification import imbalance_handling
    from autoplan.runs import TrainOptions, run_name, unused_imbalance_option

    config = plan_dataset("TaskDerm", ham_fingerprint(), device="cpu", time_budget_minutes=30,
                          probe=False).configurations["classifier"]
    option = TrainOptions(imbalance="logit_adjusted")
    assert unused_imbalance_option(config, option) is None          # HAM10000: 60:1, handled
    assert unused_imbalance_option(config, TrainOptions()) is None
    balanced = replace(config, imbalance=imbalance_handling(["a", "b"], {"a": 30, "b": 20}))
    assert "changes nothing: largest/smallest class = 1.5 <= 3" in unused_imbalance_option(balanced, option)
    segmentation = plan_dataset("TaskXRay", jsrt_fingerprint(), device="cpu", time_budget_minutes=10,
                                probe=False).configurations["2d"]
    assert "classifiers only" in unused_imbalance_option(segmentation, option)
    # the automatic run name carries the option only where it changes the run
    assert run_name(option, config, "instance").endswith("-logit_adjusted")
    assert run_name(option, balanced, "instance") == run_name(TrainOptions(), balanced, "instance")
    assert run_name(option, segmentation, "instance") == run_name(TrainOptions(), segmentation, "instance")


def test_cpu_classifier_with_budget_is_resnet18():
    plan = plan_dataset("TaskDerm", ham_fingerprint(), device="cpu", time_budget_minutes=30, probe=False)
    config = plan.configurations["classifier"]
    assert config.network["arch"] == "resnet18"
    # the largest input that still sees the training images TARGET_EPOCHS_CLASSIFICATION times
    # (HAM10000, 30 CPU minutes: 64x96 at ~60 passes beat 128x160 at ~20, docs/planning.md)
    assert config.samples_seen_epochs >= TARGET_EPOCHS_CLASSIFICATION
    assert config.patch_size in classifier_input_sizes([150, 200], 200 / 150) and min(config.patch_size) >= 64
    total = config.epochs * config.iterations_per_epoch * config.expected_seconds_per_iteration
    assert total <= 30 * 60


# ---------------------------------------------------------------------------------- CPU and time
@pytest.mark.parametrize("make,budget", [(hippocampus_fingerprint, 20), (jsrt_fingerprint, 10)])
def test_cpu_plan_fits_the_time_budget(make, budget):
    fp = make()
    plan = plan_dataset(fp.dataset, fp, device="cpu", time_budget_minutes=budget, probe=False)
    config = plan.configurations[plan.default_configuration]
    total = config.epochs * config.iterations_per_epoch * config.expected_seconds_per_iteration
    validation = config.epochs * config.val_iterations_per_epoch * config.expected_seconds_per_iteration
    # the planner keeps back what the training loop will keep back for the final validation
    n_val = fp.n_cases - int(fp.n_cases * TRAIN_FRACTION)
    reserve = final_validation_seconds(config, n_val, "cpu")
    assert reserve >= RESERVE_BASE_SECONDS + n_val * RESERVE_CASE_FLOOR_SECONDS
    assert total + VAL_ITERATION_COST * validation <= budget * 60 - reserve + 1e-6
    assert config.iterations_per_epoch == 50
    assert config.epochs * config.iterations_per_epoch >= 400          # several hundred steps
    assert config.patch_size == plan_dataset(fp.dataset, fp, device="cuda", gpu_memory_gb=8) \
        .configurations[plan.default_configuration].patch_size        # full resolution, whole patch
    assert config.network["features_per_stage"][0] in (16, 32)
    assert "batch_size" in config.reasons and "epochs" in config.reasons


def test_cpu_hippocampus_picks_a_narrow_net_with_a_real_batch():
    plan = plan_dataset("TaskHippocampus", hippocampus_fingerprint(), device="cpu", time_budget_minutes=20,
                        probe=False)
    config = plan.configurations["3d_fullres"]
    assert config.network["features_per_stage"][0] == 16
    assert 4 <= config.batch_size <= 8
    assert config.epochs * config.iterations_per_epoch >= 1000


def test_cpu_without_budget_is_the_60_minute_plan():
    fp = jsrt_fingerprint()
    default = plan_dataset("TaskXRay", fp, device="cpu", probe=False)
    sixty = plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=60, probe=False)
    assert default.time_budget_minutes is None
    assert default.configurations["2d"].epochs == sixty.configurations["2d"].epochs
    assert any("60 minutes" in note for note in default.notes)


def test_analytic_speed_matches_the_calibration_table():
    def unet(dim, features, patch, batch):
        n = len(features)
        network = {"n_stages": n, "features_per_stage": features, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
                   "kernel_sizes": [[3] * dim] * n, "conv_per_stage": 2}
        return Configuration("3d_fullres" if dim == 3 else "2d", dim, patch, batch, [], network, [], 0, 1, 1)

    assert estimate_seconds_per_iteration(unet(3, [32, 64, 128, 256], [40, 56, 40], 2), n_threads=2) == \
        pytest.approx(0.75, rel=0.1)
    assert estimate_seconds_per_iteration(unet(2, [32, 64, 128, 256, 512], [256, 256], 8), n_threads=2) == \
        pytest.approx(3.6, rel=0.1)
    resnet = Configuration("classifier", 2, [224, 224], 16, [], {"arch": "resnet18", "width": 64}, [], 0, 1, 1,
                           n_input_channels=3, n_outputs=7)
    assert estimate_seconds_per_iteration(resnet, n_threads=2) == pytest.approx(0.64, rel=0.1)


# ---------------------------------------------------------------------------------- artifacts
def test_plan_is_deterministic_and_round_trips(tmp_path):
    fp = hippocampus_fingerprint()
    first = plan_dataset("TaskHippocampus", fp, device="cpu", time_budget_minutes=20, probe=False)
    second = plan_dataset("TaskHippocampus", fp, device="cpu", time_budget_minutes=20, probe=False)
    assert dumps(first) == dumps(second)
    first.save(tmp_path / "plans.json")
    loaded = Plan.load(tmp_path / "plans.json")
    assert loaded == first
    assert isinstance(loaded.configurations["3d_fullres"], Configuration)
    assert dumps(loaded) == (tmp_path / "plans.json").read_text()
    table = format_plan_table(first)
    assert "3d_fullres" in table and "(default)" in table and "patch_size" in table


def test_probe_cache_makes_replanning_deterministic(tmp_path, monkeypatch):
    import autoplan.planning.probe as planning

    calls = []

    def fake_measure(configuration, device="cpu"):
        # stands in for the real timing (slow on 2 shared cores); deterministic per candidate
        calls.append(configuration.batch_size)
        return estimate_seconds_per_iteration(configuration) * (1.3 if configuration.batch_size > 2 else 1.2)

    monkeypatch.setattr(planning, "measure_seconds_per_iteration", fake_measure)
    fp = jsrt_fingerprint()
    first = plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=10, results_dir=tmp_path)
    n_calls = len(calls)
    assert n_calls >= 2
    cache = json.loads((tmp_path / "TaskXRay" / "throughput.json").read_text())
    assert len(cache["entries"]) == n_calls
    second = plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=10, results_dir=tmp_path)
    assert len(calls) == n_calls                   # everything came from the cache
    assert dumps(first) == dumps(second)
    assert "measured" in first.configurations["2d"].reasons["expected_seconds_per_iteration"]


def test_probe_cache_entries_of_another_probe_version_are_measured_again(tmp_path, monkeypatch):
    import autoplan.planning.probe as planning

    calls = []

    def fake_measure(configuration, device="cpu"):
        calls.append(configuration.batch_size)
        return estimate_seconds_per_iteration(configuration) * 1.3

    monkeypatch.setattr(planning, "measure_seconds_per_iteration", fake_measure)
    fp = jsrt_fingerprint()
    plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=10, results_dir=tmp_path)
    path = tmp_path / "TaskXRay" / "throughput.json"
    cache = json.loads(path.read_text())
    n_calls = len(calls)
    # the same entries as version 1 keyed them (no version field; its optimiser step was slower)
    old = {json.dumps({k: v for k, v in json.loads(key).items() if k != "probe"}, sort_keys=True): value
           for key, value in cache["entries"].items()}
    assert old.keys() != cache["entries"].keys()
    path.write_text(json.dumps({"entries": old}))
    plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=10, results_dir=tmp_path)
    assert len(calls) == 2 * n_calls


def test_failing_probe_falls_back_to_the_analytic_model(tmp_path, monkeypatch):
    import autoplan.planning.probe as planning

    def broken(configuration, device="cpu"):
        raise RuntimeError("no threads today")

    monkeypatch.setattr(planning, "measure_seconds_per_iteration", broken)
    fp = jsrt_fingerprint()
    probed = plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=10, results_dir=tmp_path)
    analytic = plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=10, probe=False)
    assert probed.configurations == analytic.configurations
    assert any("probe failed" in note for note in probed.notes)


def test_implausible_probe_times_are_clamped(tmp_path, monkeypatch):
    import autoplan.planning.probe as planning

    monkeypatch.setattr(planning, "measure_seconds_per_iteration",
                        lambda configuration, device="cpu": 100 * estimate_seconds_per_iteration(configuration))
    plan = plan_dataset("TaskXRay", jsrt_fingerprint(), device="cpu", time_budget_minutes=10, results_dir=tmp_path)
    config = plan.configurations["2d"]
    assert any("clamped" in note for note in plan.notes)
    assert config.expected_seconds_per_iteration == pytest.approx(
        PROBE_RATIO_RANGE[1] * CPU_LOADER_OVERHEAD * estimate_seconds_per_iteration(config), rel=1e-3)


def test_bad_arguments_raise_input_error():
    fp = jsrt_fingerprint()
    with pytest.raises(InputError):
        plan_dataset("TaskXRay", fp, device="tpu")
    with pytest.raises(InputError):
        plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=0)


# ---------------------------------------------------------------------------------- the memory model
def _output_elements(net, kinds: dict, sample) -> dict:
    """Elements of every output a forward pass of ``net`` makes, summed by layer kind."""
    import torch

    counted = dict.fromkeys(kinds.values(), 0)

    def hook(module, inputs, output):
        counted[kinds[type(module)]] += output.numel()

    for module in net.modules():
        if type(module) in kinds:
            module.register_forward_hook(hook)
    with torch.no_grad():
        net(sample)
    return counted


def test_memory_model_counts_what_the_real_unet_makes():
    """Feature maps and parameters of the analytic model equal those of autoplan.nets.unet."""
    import torch

    from autoplan.nets.unet import build_unet

    plan = plan_dataset("TaskHippocampus", hippocampus_fingerprint(), device="cuda", gpu_memory_gb=8)
    config = replace(plan.configurations["3d_fullres"], patch_size=[16, 24, 16], batch_size=1)
    config.network = dict(config.network, features_per_stage=[4, 8, 16, 32])
    net = build_unet(config, deep_supervision=True).train()
    counted = _output_elements(net, {torch.nn.Conv3d: "conv", torch.nn.InstanceNorm3d: "norm",
                                     torch.nn.LeakyReLU: "act", torch.nn.ConvTranspose3d: "convtranspose"},
                               torch.zeros(1, 1, *config.patch_size))
    layers = configuration_layers(config)
    model = {k: sum(layer.elements for layer in layers if layer.kind == k) for k in counted}
    model["conv"] += sum(layer.elements for layer in layers if layer.kind == "head")
    assert model == counted
    assert sum(layer.params for layer in layers) == sum(p.numel() for p in net.parameters())
    # more memory with a larger batch, fp32 above fp16 activations
    assert estimate_training_memory_gb(replace(config, batch_size=4)) > estimate_training_memory_gb(config)


def test_memory_model_counts_what_the_real_resnet_makes():
    """The ResNet half of the cost model: feature maps, parameters and FLOP-bearing layers of
    ``resnet_layers`` equal those of autoplan.nets.resnet (basic and bottleneck blocks)."""
    import torch

    from autoplan.nets.resnet import build_resnet

    for arch in ("resnet18", "resnet50"):
        config = Configuration("classifier", 2, [64, 96], 1, [], {"arch": arch, "width": 16}, [], 0, 1, 1,
                               n_input_channels=3, n_outputs=7)
        net = build_resnet(arch, in_channels=3, n_classes=7, width=16).train()
        counted = _output_elements(net, {torch.nn.Conv2d: "conv", torch.nn.BatchNorm2d: "norm",
                                         torch.nn.Linear: "linear", torch.nn.MaxPool2d: "pool"},
                                   torch.zeros(1, 3, 64, 96))
        layers = configuration_layers(config)
        model = {k: sum(layer.elements for layer in layers if layer.kind == k) for k in counted}
        assert model == counted, arch
        assert sum(layer.params for layer in layers) == sum(p.numel() for p in net.parameters()), arch
    wider = replace(config, network={"arch": "resnet50", "width": 32})
    assert estimate_training_memory_gb(wider) > estimate_training_memory_gb(config)


@pytest.mark.parametrize("make", [jsrt_fingerprint, ham_fingerprint])
def test_probe_times_the_training_step_itself(make, monkeypatch):
    """The probe runs training's TrainStep (loss with deep supervision, scaler, clip, optimiser),
    so its figure cannot drift from what the loop does."""
    from autoplan.planning.probe import PROBE_TIMED, PROBE_WARMUP, measure_seconds_per_iteration
    from autoplan.recipe import TrainStep

    fp = make()
    config = plan_dataset(fp.dataset, fp, device="cpu", time_budget_minutes=10, probe=False).configurations
    config = next(iter(config.values()))
    config = replace(config, batch_size=2, patch_size=[64, 64] if config.name == "2d" else [64, 96])
    calls = []
    original = TrainStep.__call__

    def counting(self, data, target):
        calls.append((type(self.loss).__name__, type(self.optimizer).__name__))
        return original(self, data, target)

    monkeypatch.setattr(TrainStep, "__call__", counting)
    assert measure_seconds_per_iteration(config, "cpu") > 0
    assert len(calls) == PROBE_WARMUP + PROBE_TIMED
    expected = ("DeepSupervisionLoss", "SGD") if config.name == "2d" else ("ClassificationLoss", "AdamW")
    assert calls[0] == expected


def test_labels_that_name_a_side_are_never_mirrored_across_it():
    from autoplan.augmentation import segmentation_transforms
    from autoplan.datasets import Dataset

    fingerprint = jsrt_fingerprint()
    sided = Dataset(name="TaskXRay", root=None, task_type="segmentation", channel_names={"0": "xray"},
                    labels={"background": 0, "right_lung": 1, "left_lung": 2, "heart": 3}, file_ending=".png")
    plan = plan_dataset(sided, fingerprint, device="cuda", gpu_memory_gb=8, probe=False)
    config = plan.configurations["2d"]
    assert config.mirror_axes == [0] and config.max_rotation_degrees == 15
    assert "right_lung" in config.reasons["mirror_axes"]
    mirrors = [t for t in segmentation_transforms("default", config.patch_size, 2, config.mirror_axes,
                                                  config.max_rotation_degrees).transforms
               if type(t).__name__ == "MirrorTransform"]
    assert [m.axes for m in mirrors] == [(0,)]
    unsided = Dataset(name="TaskX", root=None, task_type="segmentation", channel_names={"0": "xray"},
                      labels={"background": 0, "lungs": 1, "heart": 2}, file_ending=".png")
    assert plan_dataset(unsided, fingerprint, device="cuda", gpu_memory_gb=8, probe=False) \
        .configurations["2d"].mirror_axes is None


def test_classifier_epoch_check_counts_capped_validation_batches():
    from autoplan.planning import epoch_validation_iterations

    # HAM10000-like fold of 1700 images: classes of 20% x count, each capped at 100 images
    counts = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
    n_val = 1700
    share = {c: n_val * k / sum(counts.values()) for c, k in counts.items()}
    images = sum(min(100, v) for v in share.values())
    assert epoch_validation_iterations(counts, n_val, 32) == int(np.ceil(images / 32)) == 16
    assert epoch_validation_iterations({}, 40, 32) == 2


def test_training_layout_is_channels_last_for_2d_only():
    import torch

    from autoplan.nets import memory_format

    assert memory_format(2) == torch.channels_last
    assert memory_format(3) == torch.contiguous_format


def test_plans_record_the_precision_training_will_use(monkeypatch):
    import autoplan.nets as nets

    gpu = plan_dataset("TaskDerm", ham_fingerprint(), device="cuda", gpu_memory_gb=8)
    assert gpu.configurations["classifier"].precision == "fp16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(nets, "cpu_has_native_bf16", lambda native=native: native)
        config = plan_dataset("TaskXRay", jsrt_fingerprint(), device="cpu", time_budget_minutes=10,
                              probe=False).configurations["2d"]
        assert config.precision == expected and config.reasons["precision"].startswith(expected)


def test_precision_falls_back_to_what_the_device_runs(monkeypatch):
    import autoplan.nets as nets

    assert nets.resolve_precision("", "cuda") == "fp16"       # plans older than the field
    assert nets.resolve_precision("", "cpu") == "fp32"
    assert nets.resolve_precision("fp16", "cpu") == "fp32"
    assert nets.resolve_precision("bf16", "cuda") == "bf16"
    monkeypatch.setattr(nets, "cpu_has_native_bf16", lambda: False)
    assert nets.resolve_precision("bf16", "cpu") == "fp32"
    monkeypatch.setattr(nets, "cpu_has_native_bf16", lambda: True)
    assert nets.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError):
        nets.resolve_precision("int8", "cpu")


def test_images_without_a_pixel_size_get_a_field_of_view_normalisation():
    """PNG-like 2D data (every spacing the default 1.0) is resized whole to the median image;
    --field-of-view pixels keeps pixels as millimetres; volumes always keep their mm."""
    fp = jsrt_fingerprint()
    config = plan_dataset("TaskXRay", fp, device="cuda", gpu_memory_gb=8).configurations["2d"]
    assert config.field_of_view == {"mode": "fit", "working_size": [224, 224]}
    assert config.spacing == [1.0, 1.0]
    assert "no pixel size" in config.reasons["field_of_view"]
    pixels = plan_dataset("TaskXRay", fp, device="cuda", gpu_memory_gb=8, field_of_view="pixels")
    assert pixels.configurations["2d"].field_of_view == {}
    assert pixels.configurations["2d"].patch_size == config.patch_size
    volumes = plan_dataset("TaskHippocampus", hippocampus_fingerprint(), device="cuda", gpu_memory_gb=8)
    assert all(c.field_of_view == {} for c in volumes.configurations.values())
    with pytest.raises(InputError):
        plan_dataset("TaskXRay", fp, device="cuda", gpu_memory_gb=8, field_of_view="zoom")


def test_field_of_view_working_grid_follows_the_median_image():
    """Images of several sizes: each is fitted into the median size, so the planned image is that size."""
    shapes = [[300, 400]] * 5 + [[600, 800]] * 5 + [[150, 200]] * 3
    fp = _segmentation_fingerprint("TaskPhotos", shapes, [[1.0, 1.0]] * len(shapes),
                                   [ChannelInfo("grey", "grey", "8-bit")], {1: "lesion"}, [_stats()])
    config = plan_dataset("TaskPhotos", fp, device="cuda", gpu_memory_gb=8).configurations["2d"]
    assert config.field_of_view["working_size"] == [300, 400]
    assert config.median_image_size == [300, 400]


def test_cached_probe_figures_that_were_clamped_are_measured_again(tmp_path, monkeypatch):
    """A probe on a busy machine ('clamped to 4x') was cached and reused by every later plan."""
    import autoplan.planning.probe as planning

    calls, slowdown = [], {"factor": 9.0}

    def fake_measure(configuration, device="cpu"):
        calls.append(configuration.batch_size)
        return estimate_seconds_per_iteration(configuration) * slowdown["factor"]

    monkeypatch.setattr(planning, "measure_seconds_per_iteration", fake_measure)
    fp = jsrt_fingerprint()
    busy = plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=10, results_dir=tmp_path)
    assert any("clamped" in note for note in busy.notes)
    n_busy = len(calls)
    slowdown["factor"] = 1.2                      # the machine is quiet again
    quiet = plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=10, results_dir=tmp_path)
    assert len(calls) > n_busy                    # the clamped entries were measured again
    assert not any("clamped" in note for note in quiet.notes)
    n_quiet = len(calls)
    plan_dataset("TaskXRay", fp, device="cpu", time_budget_minutes=10, results_dir=tmp_path)
    assert len(calls) == n_quiet                  # plausible figures are reused (determinism)
