"""What a run folder holds, and how to rebuild its network: shared by training and inference.

Run folder: ``RESULTS/NAME/CFG/RUN_NAME/fold_K/`` with ``plan.json`` (a :class:`RunSpec`),
``checkpoint_best.pt`` (weights), ``checkpoint_latest.pt`` (the whole training state, while
training runs), ``checkpoint_final.pt`` (the whole state at the end; replaces latest),
``log.csv``, ``curves.png``, ``metrics.json``, ``report.html``.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoplan.errors import InputError
from autoplan.jsonio import JsonDataclass
from autoplan.artifacts import Configuration, leaning_factors


@dataclass
class TrainOptions:
    """Everything the user can set on ``autoplan train``; None means "the plan's choice"."""

    configuration: str | None = None
    fold: str = "0"                      # "0".."4" or "all"
    loss: str | None = None
    dropout: float = 0.0
    label_smoothing: float = 0.0         # classification cross-entropy only
    base_features: int | None = None
    norm: str | None = None              # 'instance' | 'batch'
    augment: str | None = None           # 'default' | 'light' | 'none'
    optimizer: str | None = None         # 'sgd' | 'adam' | 'adamw'
    lr: float | None = None
    batch_size: int | None = None
    imbalance: str | None = None         # classifier: 'weighted_loss' | 'logit_adjusted'; None: the plan's
    pretrained: str | None = None
    init_from: str | None = None         # a run (or fold, or model .zip) whose weights training starts from
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    time_budget_minutes: float | None = None
    run_name: str | None = None
    resume: bool = False
    overwrite: bool = False              # replace an earlier run of the same name (its whole folder)
    device: str = "auto"                 # 'auto' | 'cpu' | 'cuda'
    seed: int = 0
    n_jobs: int | None = None
    n_workers: int | None = None         # data-loading processes
    precision: str | None = None         # 'fp32' | 'bf16' | 'fp16' autocast; None: the plan's


def run_name(options: TrainOptions, configuration: Configuration, norm: str) -> str:
    """A readable name from the options that shape a result, e.g. ``dice_ce-instance-f32-do0-default``."""
    if options.run_name:
        return options.run_name
    if configuration.is_classifier:
        parts = [configuration.loss, configuration.network["arch"], f"w{configuration.network.get('width', 64)}"]
    else:
        parts = [configuration.loss, norm, f"f{configuration.network['features_per_stage'][0]}"]
    parts += [f"do{options.dropout:g}", configuration.augment]
    if options.label_smoothing:
        parts.append(f"ls{options.label_smoothing:g}")
    if options.imbalance and unused_imbalance_option(configuration, options) is None:
        parts.append(options.imbalance)   # only where it changes the run: equal runs, one name
    if options.optimizer:
        parts.append(configuration.optimizer)
    if options.lr is not None:
        parts.append(f"lr{options.lr:g}")
    if options.batch_size:
        parts.append(f"bs{options.batch_size}")
    if options.epochs:
        parts.append(f"ep{options.epochs}")
    if options.pretrained:
        parts.append("pretrained")
    if options.init_from:
        parts.append("init")
    if options.seed:
        parts.append(f"seed{options.seed}")
    if options.precision:
        parts.append(options.precision)
    return "-".join(str(p) for p in parts)


def unused_imbalance_option(configuration: Configuration, options: TrainOptions) -> str | None:
    """The note that ``--imbalance`` changes nothing here (a segmentation configuration, or
    classes too balanced for any handling), so that a user does not compare two equal runs."""
    if not options.imbalance:
        return None
    if not configuration.is_classifier:
        return f"note: --imbalance {options.imbalance} applies to classifiers only; {configuration.name} ignores it"
    if leaning_factors(configuration.imbalance) is None:     # the plan leans by no class (ratio <= 3)
        reason = (configuration.imbalance or {}).get("reason", "the plan handles no imbalance")
        return f"note: --imbalance {options.imbalance} changes nothing: {reason}"
    return None


@dataclass
class RunSpec(JsonDataclass):
    """plan.json of a run folder: the configuration actually trained and how."""

    dataset: str
    task_type: str
    fold: int
    configuration: Configuration
    options: TrainOptions
    labels: dict = field(default_factory=dict)          # {"background": 0, "anterior": 1, ...}
    classes: list | None = None
    channel_names: dict = field(default_factory=dict)
    file_ending: str = ""
    norm: str = "instance"
    dropout: float = 0.0
    postprocessing: dict = field(default_factory=dict)  # {label id str: true} = keep largest component
    qc_reference: dict = field(default_factory=dict)    # autoplan.qc.QcReference: what predict flags
    #   new cases against; empty for runs trained before quality flags (or without a fingerprint)

    @property
    def foreground_labels(self) -> dict:
        return {str(v): k for k, v in sorted(self.labels.items(), key=lambda kv: kv[1]) if v != 0}


def build_network(spec: RunSpec, deep_supervision: bool = False) -> torch.nn.Module:
    """The network of a run, untrained, exactly as it was trained."""
    from autoplan.nets import build_network as build_configured_network

    return build_configured_network(spec.configuration, norm=spec.norm, dropout=spec.dropout,
                                    deep_supervision=deep_supervision)


def _first_file(fold_dir, names) -> Path | None:
    return next((Path(fold_dir) / name for name in names if (Path(fold_dir) / name).is_file()), None)


def best_checkpoint(fold_dir) -> Path:
    path = _first_file(fold_dir, ("checkpoint_best.pt", "checkpoint_final.pt"))
    if path is None:
        raise InputError(fold_dir, "no checkpoint_best.pt or checkpoint_final.pt (training not finished)")
    return path


def resume_checkpoint(fold_dir) -> Path | None:
    """The checkpoint --resume continues from: the latest epoch's while training runs, the
    final one once it has ended (resuming a finished fold redoes only its final validation)."""
    return _first_file(fold_dir, ("checkpoint_latest.pt", "checkpoint_final.pt"))


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs (the NumPy RNG state in checkpoints up to 0.1)."""
    import numpy as np
    from numpy._core.multiarray import _reconstruct

    return [_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def load_checkpoint(path, device="cpu") -> dict:
    """A checkpoint's contents loaded as data: tensors, numbers, strings, lists and dicts.

    Model files from others are data, not code: ``weights_only`` unpickling constructs
    nothing but those (and numpy arrays); a file that would build any other object, which
    a crafted pickle uses to run code, is refused with an InputError, as is a corrupt one.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):   # torch's weights-only unpickler met a class or function
            raise InputError(path, "holds Python objects other than tensors and plain values: refused, since "
                                   "loading it could run code (use checkpoints written by autoplan)") from None
        raise InputError(path, "is not a readable checkpoint (not a torch file, or truncated)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise InputError(path, f"is not a readable checkpoint ({type(error).__name__}: {error})") from None


def load_trained(fold_dir, device="cpu"):
    """(RunSpec, network in eval mode with the best weights) of one fold folder."""
    spec = RunSpec.load(Path(fold_dir) / "plan.json")
    network = build_network(spec, deep_supervision=False)
    state = load_checkpoint(best_checkpoint(fold_dir), device)
    network.load_state_dict(state["model"])
    return spec, network.to(device).eval()
