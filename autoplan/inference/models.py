"""Trained networks for prediction: the folds of a run loaded as one ensemble, and the mode
every prediction runs a network in."""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from autoplan.artifacts import BEST_FILE, BestChoice
from autoplan.errors import InputError
from autoplan.inference.package import model_folder
from autoplan.nets import autocast
from autoplan.paths import fold_folders
from autoplan.runs import RunSpec, load_trained


@dataclass
class Ensemble:
    """The folds of a run loaded for prediction: one spec, one network per fold."""

    spec: RunSpec
    networks: list
    fold_dirs: list
    previous: "Ensemble | None" = None      # a cascade's first stage (every fold of its run)


def _can_ensemble(spec: RunSpec, first: RunSpec) -> bool:
    return (spec.task_type == first.task_type and spec.configuration.name == first.configuration.name
            and spec.configuration.patch_size == first.configuration.patch_size
            and spec.labels == first.labels and spec.classes == first.classes
            and spec.configuration.previous_stage_run == first.configuration.previous_stage_run)


def previous_stage_folder(fold_dir, configuration) -> Path:
    """RESULTS/NAME/PREVIOUS_STAGE/RUN of a cascade's fold folder RESULTS/NAME/CFG/RUN/fold_K."""
    if not configuration.previous_stage_run:
        raise InputError(fold_dir, f"{configuration.name} names no trained {configuration.previous_stage} run "
                                   "(plan.json written before the cascade was trained?)")
    return Path(fold_dir).resolve().parents[2] / configuration.previous_stage / configuration.previous_stage_run


def _previous_stage(spec: RunSpec, fold_dir, device) -> "Ensemble | None":
    """A cascade's first stage, RESULTS/NAME/PREVIOUS_STAGE/RUN next to the cascade's run, all
    its folds; None for other runs. A model package holds one run, so a cascade's first stage
    is not in it: refused with one line."""
    if not spec.configuration.previous_stage:
        return None
    folder = previous_stage_folder(fold_dir, spec.configuration)
    if not folder.is_dir():
        raise InputError(fold_dir, f"is a cascade whose first stage {spec.configuration.previous_stage}/"
                                   f"{spec.configuration.previous_stage_run} is not at {folder} (keep the "
                                   "results folder's layout; model packages of a cascade are not supported)")
    return load_ensemble(folder, device)


def load_ensemble(model_dir, device="cpu") -> Ensemble:
    """Every fold of ``model_dir`` (a fold_K folder, its parent, or a model package .zip),
    checked to agree."""
    folds = fold_folders(model_folder(model_dir))
    specs, networks = [], []
    for fold in folds:
        spec, network = load_trained(fold, device=device)
        specs.append(spec)
        networks.append(network)
    for fold, spec in zip(folds[1:], specs[1:]):
        if not _can_ensemble(spec, specs[0]):
            raise InputError(fold, f"cannot be ensembled with {folds[0]}: different task, "
                                   "configuration, patch size, labels or classes")
    return Ensemble(spec=specs[0], networks=networks, fold_dirs=folds,
                    previous=_previous_stage(specs[0], folds[0], device))


def ensemble_identity(spec: RunSpec) -> tuple:
    """What runs ensembled across configurations must share (classifiers: one input size too,
    since predict resizes each image once); find-best pairs only runs that share it."""
    size = list(spec.configuration.patch_size) if spec.task_type == "classification" else None
    return spec.task_type, spec.labels, spec.classes, size


def load_choice(path, device="cpu"):
    """(ensembles, post-processing) of the find-best choice that ``path`` holds (a dataset's
    results folder, or a package of one, with best.json), or None when it holds none."""
    folder = model_folder(path)
    if not (folder / BEST_FILE).is_file():
        return None
    choice = BestChoice.load(folder / BEST_FILE)
    ensembles = []
    for member in choice.chosen.members:
        if not member.folder(folder).is_dir():
            raise InputError(folder / BEST_FILE, f"chooses {member.label}, which is not in {folder} "
                                                 "(run find-best again after moving or deleting runs)")
        ensembles.append(load_ensemble(member.folder(folder), device))
    if len(ensembles) > 1 and any(ensemble.previous is not None for ensemble in ensembles):
        # a cascade's networks take another image than its partner's (find-best pairs none)
        raise InputError(folder / BEST_FILE, "pairs a cascade with another run, which prediction does not support")
    for member, ensemble in zip(choice.chosen.members[1:], ensembles[1:]):
        first = ensembles[0].spec
        if ensemble_identity(ensemble.spec) != ensemble_identity(first):
            raise InputError(member.folder(folder), f"cannot be ensembled with {choice.chosen.members[0].label}: "
                                                    "different task, labels, classes or classifier input size")
    return ensembles, dict(choice.chosen.postprocessing)


@contextlib.contextmanager
def predicting(network, device: torch.device):
    """Eval mode without autograd, autocast as in training on CUDA (fp16) and fp32 on the CPU;
    the network's training mode is restored afterwards (validation runs mid-training)."""
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode(), autocast(device.type, "fp16" if device.type == "cuda" else "fp32"):
            yield
    finally:
        network.train(was_training)
