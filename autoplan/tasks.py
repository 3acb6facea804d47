"""The two kinds of task, as small objects the one training loop talks to.

A task knows its data (loaders), its network and loss, how to score validation
batches, and how to run the final full validation that writes metrics.json and
report.html. The loop in ``training.py`` knows nothing else about the task.
"""

from pathlib import Path

import numpy as np
import torch

from autoplan.errors import InputError
from autoplan.jsonio import read_json, write_json
from autoplan.planning.classification import EPOCH_VALIDATION_PER_CLASS
from autoplan.recipe import build_loss
from autoplan.runs import RunSpec, build_network


def _default_workers(task_type: str) -> int:
    import os

    if (os.cpu_count() or 1) > 2:
        return 2
    # On 2 cores a background worker competes with torch's two threads: HAM10000 classifier
    # epochs (50 iterations + the per-epoch check) took 9.5 s with one worker and 8.5 s with
    # the augmentation in-process. Segmentation augmentation is heavier and keeps its worker.
    return 0 if task_type == "classification" else 1


class _Task:
    """What both tasks hold: the run's spec, its fold and where its data is."""

    def __init__(self, spec: RunSpec, preprocessed_dir: Path, split: dict, raw_dataset, n_workers=None):
        self.spec = spec
        self.configuration = spec.configuration
        self.preprocessed_dir = Path(preprocessed_dir)
        self.split = split
        self.dataset = raw_dataset
        self.n_workers = _default_workers(spec.task_type) if n_workers is None else n_workers

    def _initialise(self, network):
        """Fine-tuning: the source run's weights (``--init-from``) in the fresh network."""
        if self.spec.options.init_from:
            from autoplan.finetune import init_from

            print(init_from(network, self.spec, self.spec.options.init_from))
        return network


class SegmentationTask(_Task):
    metric = "dice"             # the headline validation metric (pseudo-Dice on patches)

    def __init__(self, spec: RunSpec, preprocessed_dir: Path, split: dict, raw_dataset, n_workers=None):
        super().__init__(spec, preprocessed_dir, split, raw_dataset, n_workers)
        self.label_ids = [int(k) for k in spec.foreground_labels]

    # -- model and loss ---------------------------------------------------------------
    def build_network(self):
        return self._initialise(build_network(self.spec, deep_supervision=True))

    def build_loss(self):
        from autoplan.nets.unet import deep_supervision_scales

        self.scales = deep_supervision_scales(self.configuration.network["strides"])
        # in eval mode the network gives only the full-resolution output: score that alone
        self._validation_loss = build_loss(self.configuration, self.spec.options.loss, deep_supervision=False)
        return build_loss(self.configuration, self.spec.options.loss)

    def validation_loss(self, output, targets):
        return self._validation_loss(output, targets[0])

    # -- data ---------------------------------------------------------------------------
    def train_loader(self, seed):
        from autoplan.loading import SegmentationLoader

        return SegmentationLoader(self.preprocessed_dir, self.split["train"], self.configuration,
                                  augment=self.configuration.augment,
                                  batch_size=self.configuration.batch_size,
                                  n_workers=self.n_workers, seed=seed)

    def val_loader(self, seed):
        from autoplan.loading import SegmentationLoader

        return SegmentationLoader(self.preprocessed_dir, self.split["val"], self.configuration,
                                  augment="none", batch_size=self.configuration.batch_size,
                                  n_workers=0, seed=seed + 1)

    def to_device(self, batch, device):
        from autoplan.nets.unet import downsample_target

        data = torch.as_tensor(np.asarray(batch["data"]), dtype=torch.float32).to(device, non_blocking=True)
        target = torch.as_tensor(np.asarray(batch["target"]).astype(np.int64)).to(device, non_blocking=True)
        return data, downsample_target(target, self.scales)

    # -- validation scores ----------------------------------------------------------------
    def new_tally(self):
        n = len(self.label_ids)
        return {"tp": np.zeros(n), "fp": np.zeros(n), "fn": np.zeros(n)}

    def tally(self, tally, outputs, targets):
        """nnU-Net's pseudo-Dice: TP/FP/FN summed over all validation patches."""
        logits = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
        target = targets[0] if isinstance(targets, (list, tuple)) else targets
        prediction = logits.argmax(1)
        target = target[:, 0]
        for i, label in enumerate(self.label_ids):
            p, t = prediction == label, target == label
            tally["tp"][i] += (p & t).sum().item()
            tally["fp"][i] += (p & ~t).sum().item()
            tally["fn"][i] += (~p & t).sum().item()

    def scores(self, tally) -> dict:
        denominator = 2 * tally["tp"] + tally["fp"] + tally["fn"]
        dice = np.where(denominator > 0, 2 * tally["tp"] / np.maximum(denominator, 1), np.nan)
        scores = {"val_dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0}
        for label, value in zip(self.label_ids, dice):
            scores[f"val_dice_{label}"] = float(value)
        return scores

    # -- final validation -------------------------------------------------------------------
    def final_validation(self, network, run_dir: Path, device, run_info: dict) -> dict:
        """Full images of the validation fold, in original geometry, then metrics and report."""
        from autoplan.evaluation import segmentation_case_metrics, select_sample_cases, summarize_segmentation
        from autoplan.inference.segmentation import apply_postprocessing, decide_postprocessing
        from autoplan.report import write_segmentation_report

        cases = self._predict_validation_fold(network, device, Path(run_dir))
        self._keep_out_of_fold(cases, Path(run_dir))
        self.spec.postprocessing = decide_postprocessing([c["prediction"] for c in cases],
                                                         [c["reference"] for c in cases], self.label_ids)
        self.spec.save(Path(run_dir) / "plan.json")
        for case in cases:
            case["prediction"] = apply_postprocessing(case["prediction"], self.spec.postprocessing)
        per_case = [{"case": c["case"], "per_label": segmentation_case_metrics(
            c["prediction"], c["reference"], self.label_ids, c["spacing"])} for c in cases]
        metrics = summarize_segmentation(per_case, self.spec.foreground_labels)
        write_json(Path(run_dir) / "metrics.json", metrics)
        by_id = {c["case"]: c for c in cases}
        samples = [by_id[case_id] for case_id in select_sample_cases(metrics)]
        write_segmentation_report(Path(run_dir), metrics, run_info, samples, log_csv=Path(run_dir) / "log.csv")
        return metrics

    def _keep_out_of_fold(self, cases: list, run_dir: Path) -> None:
        """A cascade's first stage keeps its validation predictions (before post-processing, as
        the cascade will see them): the out-of-fold input the cascade trains on."""
        from autoplan.inference.cascade import save_out_of_fold, saves_out_of_fold

        if saves_out_of_fold(self.configuration):
            for case in cases:
                save_out_of_fold(run_dir, case["case"], case["prediction"])

    def _network_input(self, image, case_id: str, run_dir: Path):
        """The image the network takes: a cascade's gets its first stage's out-of-fold prediction
        of the case (by the first stage's fold of the same number, which held the case out)."""
        if not self.configuration.previous_stage:
            return image
        from autoplan.inference.cascade import append_previous_stage, out_of_fold_file
        from autoplan.inference.models import previous_stage_folder
        from autoplan.preprocessing.cache import load_label_map

        path = out_of_fold_file(previous_stage_folder(run_dir, self.configuration) / f"fold_{self.spec.fold}", case_id)
        if not path.is_file():
            raise InputError(path, "missing: the first stage's out-of-fold prediction of a validation case")
        return append_previous_stage(image, load_label_map(path), self.configuration)

    def _predict_validation_fold(self, network, device, run_dir: Path) -> list:
        """Per validation case {case, image, reference, prediction (before post-processing), spacing}."""
        from autoplan.inference.segmentation import predict_case
        from autoplan.io import read_case_images, read_case_labels

        network.eval()
        label_ids = sorted(int(v) for v in self.spec.labels.values())
        cases = []
        for case_id in self.split["val"]:
            case = self.dataset.case(case_id)
            image = read_case_images(case)
            network_input = self._network_input(image, case_id, run_dir)
            # labels only: a clinical-size validation case never holds K probabilities per voxel
            labels = predict_case([([network], self.spec)], network_input, tta=True, device=device).labels
            cases.append({"case": case_id, "image": image.array, "spacing": list(image.spacing),
                          "prediction": labels.astype(np.int16),
                          "reference": read_case_labels(case, image, label_ids).astype(np.int16)})
        return cases


class ClassificationTask(_Task):
    metric = "balanced_accuracy"

    def __init__(self, spec: RunSpec, preprocessed_dir: Path, split: dict, raw_dataset, n_workers=None):
        super().__init__(spec, preprocessed_dir, split, raw_dataset, n_workers)
        index = read_json(self.preprocessed_dir / "index.json")
        self.cases = index["cases"]
        self.labels = np.asarray(index["labels"], dtype=np.int64)
        self.groups = index.get("groups")      # lesion/patient per image: the intervals resample whole groups
        self.images = np.load(self.preprocessed_dir / "images.npy", mmap_mode="r")
        position = {case: i for i, case in enumerate(self.cases)}
        self.train_indices = np.array([position[c] for c in split["train"]])
        self.val_indices = np.array([position[c] for c in split["val"]])
        self.classes = spec.classes

    def build_network(self):
        network = build_network(self.spec)
        if self.spec.options.pretrained:
            from autoplan.nets.resnet import load_pretrained

            load_pretrained(network, self.spec.options.pretrained, len(self.classes))
        return self._initialise(network)

    def build_loss(self):
        self._loss = build_loss(self.configuration, self.spec.options.loss,
                                label_smoothing=self.spec.options.label_smoothing)
        return self._loss

    def validation_loss(self, output, target):
        return self._loss(output, target)

    def train_loader(self, seed):
        from autoplan.loading import ClassificationLoader

        return ClassificationLoader(self.images, self.labels, self.train_indices, self.configuration,
                                    augment=self.configuration.augment,
                                    batch_size=self.configuration.batch_size,
                                    n_workers=self.n_workers, seed=seed)

    def val_loader(self, seed):
        """The per-epoch check: a fixed class-capped subset of the fold (final validation uses all)."""
        from autoplan.loading import ClassificationLoader

        return ClassificationLoader(self.images, self.labels, self.epoch_val_indices, self.configuration,
                                    augment="none", batch_size=self.configuration.batch_size,
                                    n_workers=0, seed=seed + 1, infinite=False)

    @property
    def epoch_val_indices(self):
        """At most EPOCH_VALIDATION_PER_CLASS images of each class, the same every epoch.

        Balanced accuracy weighs classes equally, so capping the common classes keeps it
        unbiased while a HAM10000 fold (1,700 images, two thirds 'nv') costs a fifth.
        """
        if not hasattr(self, "_epoch_val_indices"):
            rng = np.random.default_rng(0)
            chosen = []
            for label in np.unique(self.labels[self.val_indices]):
                of_class = self.val_indices[self.labels[self.val_indices] == label]
                chosen += sorted(rng.permutation(of_class)[:EPOCH_VALIDATION_PER_CLASS].tolist())
            self._epoch_val_indices = np.array(sorted(chosen))
        return self._epoch_val_indices

    def to_device(self, batch, device):
        data = torch.as_tensor(np.asarray(batch["data"]), dtype=torch.float32).to(device)
        target = torch.as_tensor(np.asarray(batch["target"]), dtype=torch.int64).to(device)
        return data, target

    def new_tally(self):
        return {"true": [], "predicted": []}

    def tally(self, tally, outputs, targets):
        from autoplan.inference.classification import decision_probabilities

        probabilities = torch.softmax(outputs.detach().float(), dim=1).cpu().numpy()
        tally["true"].extend(targets.cpu().tolist())
        tally["predicted"].extend(decision_probabilities(probabilities, self.configuration.imbalance)
                                  .argmax(1).tolist())

    def scores(self, tally) -> dict:
        from sklearn.metrics import accuracy_score, balanced_accuracy_score

        if not tally["true"]:
            return {"val_balanced_accuracy": 0.0, "val_accuracy": 0.0}
        return {"val_balanced_accuracy": float(balanced_accuracy_score(tally["true"], tally["predicted"])),
                "val_accuracy": float(accuracy_score(tally["true"], tally["predicted"]))}

    def final_validation(self, network, run_dir: Path, device, run_info: dict) -> dict:
        from autoplan.evaluation import classification_metrics
        from autoplan.inference.classification import classify_pixels, gradcam_samples
        from autoplan.report import write_classification_report

        network.eval()
        probabilities = np.concatenate([
            classify_pixels([network], self.images[self.val_indices[start:start + 64]], self.configuration,
                            tta=True, device=device)
            for start in range(0, len(self.val_indices), 64)])
        y_true = self.labels[self.val_indices]
        cases = [self.cases[i] for i in self.val_indices]
        groups = [self.groups[i] for i in self.val_indices] if self.groups else None
        metrics = classification_metrics(y_true, probabilities, self.classes, cases, groups=groups)
        write_json(Path(run_dir) / "metrics.json", metrics)
        gradcam = gradcam_samples(network, np.asarray(self.images[self.val_indices]), y_true,
                                  probabilities, self.classes, self.configuration, cases, device=device)
        write_classification_report(Path(run_dir), metrics, y_true, probabilities, self.classes,
                                    run_info, gradcam, log_csv=Path(run_dir) / "log.csv")
        return metrics


def make_task(spec: RunSpec, preprocessed_dir, split, raw_dataset, n_workers=None):
    task_class = ClassificationTask if spec.task_type == "classification" else SegmentationTask
    return task_class(spec, preprocessed_dir, split, raw_dataset, n_workers)
