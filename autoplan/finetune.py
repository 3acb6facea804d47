"""Fine-tuning: start a run from another run's weights (``train --init-from RUN``), and plan a
dataset with the source run's configuration so that its network fits (``plan --plan-from RUN``).

The source is a run folder (its first fold is used), a fold_K folder or a model package. Every
tensor is taken from the source except the output layer (the U-Net's ``heads``, the ResNet's
``fc``) when the labels or classes differ, which is then trained from its fresh initialisation.
A network of another topology is refused with the first layer that does not fit, because a
silent partial load would train a different network than the user thinks.
"""

from dataclasses import replace
from pathlib import Path

from autoplan.artifacts import Plan
from autoplan.errors import InputError
from autoplan.inference.package import model_folder
from autoplan.paths import fold_folders
from autoplan.runs import RunSpec, best_checkpoint, load_checkpoint

OUTPUT_LAYERS = ("heads.", "fc.")


def source_spec(source) -> tuple:
    """(fold folder, RunSpec) of the source run's first fold."""
    fold = fold_folders(model_folder(source))[0]
    return fold, RunSpec.load(fold / "plan.json")


def _same_outputs(spec: RunSpec, source: RunSpec) -> bool:
    return (spec.labels == source.labels and spec.classes == source.classes
            and spec.configuration.n_outputs == source.configuration.n_outputs)


def init_from(network, spec: RunSpec, source) -> str:
    """Load the source run's weights into ``network`` (the run ``spec`` describes); returns
    what was loaded, in one line. Raises InputError when the topologies differ."""
    fold, source_run = source_spec(source)
    weights = load_checkpoint(best_checkpoint(fold))["model"]
    keep_head = _same_outputs(spec, source_run)
    loaded = {}
    for key, wanted in network.state_dict().items():
        if key.startswith(OUTPUT_LAYERS) and not keep_head:
            continue
        have = weights.get(key)
        if have is None or tuple(have.shape) != tuple(wanted.shape):
            found = "is missing" if have is None else f"has shape {tuple(have.shape)}"
            raise InputError(source, f"cannot initialise this {spec.configuration.name} network from it: {key} "
                                     f"{found}, the network needs {tuple(wanted.shape)} (plan the dataset with "
                                     f"`autoplan plan NAME --plan-from {source}` to train the source's network)")
        loaded[key] = have.to(wanted.dtype)
    network.load_state_dict(loaded, strict=False)
    head = "output layer kept" if keep_head else "output layer re-initialised (the labels or classes differ)"
    return f"initialised from {fold}: {len(loaded)} tensors, {head}"


def plan_from_source(plan: Plan, source) -> Plan:
    """``plan`` with the source run's configuration as its default: patch, network, spacing or
    field of view, normalisation and schedule as the source trained them, outputs for this
    dataset's labels or classes (the channels must match)."""
    _, source_run = source_spec(source)
    configuration = source_run.configuration
    own = plan.configurations.get(configuration.name) or plan.configurations[plan.default_configuration]
    if plan.task_type != source_run.task_type or own.dim != configuration.dim:
        raise InputError(source, f"is a {configuration.dim}D {source_run.task_type} run; {plan.dataset} is a "
                                 f"{own.dim}D {plan.task_type} dataset")
    if own.n_input_channels != configuration.n_input_channels:
        raise InputError(source, f"takes {configuration.n_input_channels} channel(s); {plan.dataset}'s images "
                                 f"have {own.n_input_channels}")
    reasons = dict(configuration.reasons, source=f"kept from {Path(source)} (--plan-from) so its weights fit")
    kept = replace(configuration, n_outputs=own.n_outputs, imbalance=own.imbalance, reasons=reasons)
    notes = plan.notes + [f"{configuration.name}: the configuration of {source} (--plan-from)"]
    return replace(plan, configurations={**plan.configurations, configuration.name: kept},
                   default_configuration=configuration.name, notes=notes)
