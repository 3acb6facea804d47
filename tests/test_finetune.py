"""Fine-tuning: --init-from loads the source run's weights (output layer fresh when the labels
differ), refuses another topology, and --plan-from plans a dataset with the source's network."""

import json
from dataclasses import replace

import pytest
import torch

from autoplan.errors import InputError
from autoplan.finetune import init_from, plan_from_source
from autoplan.inference.package import export_model
from autoplan.planning import plan_dataset
from autoplan.runs import RunSpec, TrainOptions
from autoplan.tasks import ClassificationTask, SegmentationTask
from test_inference import make_classification_run, make_segmentation_run
from test_planning import jsrt_fingerprint


def _source_weights(fold):
    return torch.load(fold / "checkpoint_best.pt", weights_only=True)["model"]


def _target(source_fold, **changes) -> RunSpec:
    """The spec of a new run on another dataset, with the source's configuration (as --plan-from gives)."""
    spec = RunSpec.load(source_fold / "plan.json")
    options = TrainOptions(init_from=str(source_fold.parent))
    return replace(spec, dataset="TaskOther", options=options, **changes)


def test_init_from_the_same_labels_starts_from_every_source_weight(tmp_path):
    source = make_segmentation_run(tmp_path, 2)
    torch.manual_seed(123)        # the fresh network differs from the source before loading
    network = SegmentationTask(_target(source), tmp_path, {}, None).build_network()
    expected = _source_weights(source)
    assert all(torch.equal(network.state_dict()[k], expected[k]) for k in expected)


def test_init_from_other_labels_keeps_the_body_and_retrains_the_heads(tmp_path):
    source = make_segmentation_run(tmp_path, 2)
    spec = _target(source, labels={"background": 0, "lung": 1})
    spec = replace(spec, configuration=replace(spec.configuration, n_outputs=2))
    network = SegmentationTask(spec, tmp_path, {}, None).build_network()
    expected, state = _source_weights(source), network.state_dict()
    body = [k for k in state if not k.startswith("heads.")]
    assert body and all(torch.equal(state[k], expected[k]) for k in body)
    assert state["heads.0.weight"].shape[0] == 2 != expected["heads.0.weight"].shape[0]


def test_init_from_a_model_package_and_a_classifier(tmp_path):
    source = make_classification_run(tmp_path)
    export_model(source, tmp_path / "derm.zip")
    spec = replace(_target(source), options=TrainOptions(init_from=str(tmp_path / "derm.zip")))
    task = ClassificationTask.__new__(ClassificationTask)       # no preprocessed images needed here
    task.spec, task.configuration, task.classes = spec, spec.configuration, spec.classes
    network = task.build_network()
    expected = _source_weights(source)
    assert all(torch.equal(network.state_dict()[k], expected[k]) for k in expected)


def test_another_topology_is_refused_with_the_first_layer_that_does_not_fit(tmp_path):
    source = make_segmentation_run(tmp_path, 2)
    spec = _target(source)
    network = dict(spec.configuration.network, features_per_stage=[8, 16])
    spec = replace(spec, configuration=replace(spec.configuration, network=network))
    from autoplan.runs import build_network

    with pytest.raises(InputError, match=r"cannot initialise this 2d network from it: .* has shape .*--plan-from"):
        init_from(build_network(spec, deep_supervision=True), spec, source.parent)


def test_plan_from_keeps_the_source_configuration_with_this_datasets_outputs(tmp_path):
    source = make_segmentation_run(tmp_path, 2)
    own = plan_dataset("TaskXRay", jsrt_fingerprint(), device="cpu", time_budget_minutes=5, probe=False)
    planned = plan_from_source(own, source.parent)
    kept, original = planned.configurations["2d"], RunSpec.load(source / "plan.json").configuration
    assert planned.default_configuration == "2d"
    assert (kept.network, kept.patch_size, kept.normalization) == (original.network, original.patch_size,
                                                                   original.normalization)
    assert kept.n_outputs == own.configurations["2d"].n_outputs == 4
    assert "--plan-from" in kept.reasons["source"]
    json.dumps(planned.to_dict())       # still a plain plan
    volume_source = make_segmentation_run(tmp_path, 3)
    with pytest.raises(InputError, match="3D segmentation run"):
        plan_from_source(own, volume_source.parent)
