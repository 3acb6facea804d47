"""Throughput probe: a few real training steps of a candidate, cached in
RESULTS/NAME/throughput.json, and the speed model that scales the analytic estimate by them.
The only part of the planner that runs torch (imported inside the measurement)."""

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from autoplan.artifacts import Configuration
from autoplan.jsonio import read_json, write_json
from autoplan.planning.cost import available_cores, base_width, estimate_seconds_per_iteration
from autoplan.planning.topology import MIN_BATCH

PROBE_WARMUP = 2
PROBE_TIMED = 3
# A probe on a machine busy with something else can be 10x off; measured/analytic ratios
# outside this range are clamped (and noted) rather than trusted.
PROBE_RATIO_RANGE = (0.25, 4.0)
# Part of every cache key: bump it when what one probe iteration does changes (version 2: fused
# Adam/AdamW steps), so older measurements are re-taken rather than trusted.
PROBE_VERSION = 3


def planned_precision(device: str) -> str:
    from autoplan.nets import default_precision      # nets pulls in torch: import late

    return default_precision(device)


class ThroughputCache:
    """Measured seconds per iteration by candidate; re-planning reuses them (determinism)."""

    def __init__(self, path: Path | None, device: str):
        self.path = path
        self.device = device
        self.threads = available_cores()
        self.entries = {}
        if path is not None and path.is_file():
            try:
                self.entries = dict(read_json(path).get("entries", {}))
            except (ValueError, OSError, AttributeError):
                self.entries = {}      # a damaged cache is re-measured, not trusted
        self.measured_now = 0
        self.fresh = set()             # keys measured by this planner run

    def _implausible(self, configuration: Configuration, key: str) -> bool:
        ratio = float(self.entries[key]) / estimate_seconds_per_iteration(configuration, self.device)
        return not PROBE_RATIO_RANGE[0] <= ratio <= PROBE_RATIO_RANGE[1]

    def key(self, configuration: Configuration) -> str:
        from autoplan.nets import memory_format

        return json.dumps({"probe": PROBE_VERSION, "device": self.device, "threads": self.threads,
                           "layout": str(memory_format(configuration.dim)),
                           "precision": planned_precision(self.device),
                           "name": configuration.name, "network": configuration.network,
                           "patch_size": configuration.patch_size,
                           "batch_size": configuration.batch_size,
                           "in": configuration.n_input_channels,
                           "out": configuration.n_outputs}, sort_keys=True)

    def seconds(self, configuration: Configuration) -> float:
        key = self.key(configuration)
        if key not in self.entries or (key not in self.fresh and self._implausible(configuration, key)):
            # new, or cached from a busy machine (a figure the planner clamps): measure again,
            # once per plan, rather than let one noisy probe shape every later plan
            self.entries[key] = measure_seconds_per_iteration(configuration, self.device)
            self.fresh.add(key)
            self.measured_now += 1
            if self.path is not None:
                write_json(self.path, {"note": "seconds per training iteration measured by the "
                                               "planner's probe (forward, backward and the "
                                               "configuration's optimiser step on random data); "
                                               "delete to re-measure",
                                       "entries": self.entries})
        return float(self.entries[key])


def measure_seconds_per_iteration(configuration: Configuration, device: str = "cpu") -> float:
    """Median seconds of PROBE_TIMED training steps after PROBE_WARMUP, on a random batch.

    The step is training's own (:class:`autoplan.recipe.TrainStep`: the configuration's loss
    with deep supervision, gradient scaling and clipping, its optimiser) on the network laid
    out as training lays it out, in the precision the plan will record for ``device``.
    """
    import torch

    from autoplan.nets import build_network, memory_format
    from autoplan.recipe import TrainStep, build_loss, build_optimizer, synthetic_batch, task_type_of

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(available_cores())
    try:
        layout = memory_format(configuration.dim)
        net = build_network(configuration, deep_supervision=True).to(device, memory_format=layout).train()
        optimizer = build_optimizer(configuration.optimizer, net.parameters(), 1e-4, task_type_of(configuration))
        step = TrainStep(net, build_loss(configuration).to(device), optimizer, device, planned_precision(device))
        data, target = synthetic_batch(configuration, device, torch.Generator().manual_seed(0))
        data = data.contiguous(memory_format=layout)
        times = []
        for i in range(PROBE_WARMUP + PROBE_TIMED):
            start = time.perf_counter()
            step(data, target)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= PROBE_WARMUP:
                times.append(time.perf_counter() - start)
        return float(np.median(times))      # the median resists one step hit by another process
    finally:
        torch.set_num_threads(previous_threads)


class SpeedModel:
    """Seconds per iteration of a candidate: analytic, or analytic scaled by a probe.

    The probe measures one candidate per network width (at the smallest batch) and the
    ratio measured/analytic rescales the analytic estimate of the same width at other
    batch sizes; the chosen candidate is then measured itself, and that exact figure
    replaces the scaled estimate wherever the same candidate is considered again (CPU
    time per sample is not constant in the batch size, so a choice can change once
    measured: see ``plan_unet_configuration``).
    """

    def __init__(self, device: str, cache: ThroughputCache | None):
        self.device = device
        self.cache = cache
        self.ratios = {}
        self.exact = {}            # candidate key -> clamped measured seconds
        self.failure = None        # why the probe could not run (then everything is analytic)
        self.clamped = []          # implausible measurements that were clamped

    @property
    def measured(self) -> bool:
        return self.cache is not None

    def _family(self, configuration):
        return json.dumps([configuration.name, configuration.network.get("arch"),
                           base_width(configuration)])

    def seconds(self, configuration: Configuration) -> float:
        analytic = estimate_seconds_per_iteration(configuration, self.device)
        if self.cache is None:
            return analytic
        if self._key(configuration) in self.exact:
            return self.exact[self._key(configuration)]
        family = self._family(configuration)
        if family not in self.ratios:
            # Classifier candidates share one batch size, so the probe measures that batch
            # (CPU time per sample at batch 2 is far from that at 32); U-Net batches vary.
            batch = configuration.batch_size if configuration.is_classifier else MIN_BATCH
            reference = replace(configuration, batch_size=batch)
            measured = self._measure(reference)
            if measured is None:
                return analytic
            self.ratios[family] = self._clamped_ratio(measured, reference)
        return analytic * self.ratios[family]

    def _key(self, configuration):
        return json.dumps([self._family(configuration), configuration.batch_size, configuration.patch_size])

    def final_seconds(self, configuration: Configuration) -> float:
        measured = self._measure(configuration) if self.cache is not None else None
        analytic = estimate_seconds_per_iteration(configuration, self.device)
        if measured is None:
            return analytic
        seconds = analytic * self._clamped_ratio(measured, configuration)
        self.exact[self._key(configuration)] = seconds
        return seconds

    def _clamped_ratio(self, measured: float, configuration: Configuration) -> float:
        analytic = estimate_seconds_per_iteration(configuration, self.device)
        low, high = PROBE_RATIO_RANGE
        ratio = measured / analytic
        if not low <= ratio <= high:
            self.clamped.append(f"probe measured {measured:.3f} s for {configuration.name} "
                                f"(width {base_width(configuration)}, batch {configuration.batch_size}), "
                                f"{ratio:.2f}x the model: clamped to {min(max(ratio, low), high):g}x "
                                f"(a busy machine?)")
        return min(max(ratio, low), high)

    def _measure(self, configuration: Configuration) -> float | None:
        try:
            return self.cache.seconds(configuration)
        except Exception as error:     # a probe must never stop planning: fall back to the model
            self.failure = f"throughput probe failed ({type(error).__name__}: {error}); analytic estimates used"
            self.cache, self.ratios = None, {}
            return None
