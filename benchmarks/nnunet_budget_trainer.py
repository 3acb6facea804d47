"""nnU-Net v2's trainer given a wall-clock budget, for ``versus_nnunet.py`` (runs in nnU-Net's env).

    /tmp/nnunet_env/bin/python benchmarks/nnunet_budget_trainer.py DATASET_ID CONFIGURATION FOLD \
        BUDGET_MINUTES RESERVE_SECONDS

nnU-Net has no time budget: its schedule is 1000 epochs of 250 iterations, and its own
short variants (``nnUNetTrainer_5epochs`` ...) fix epochs, not time. To compare at equal
wall-clock time, this subclass keeps everything of ``nnUNetTrainer`` (network, loss,
augmentation, SGD, poly learning rate, validation) except the schedule:

* epochs of 50 iterations (5 validation iterations), so that a short budget holds several;
* after the first epoch, the number of epochs is fitted to the time left, and the poly
  schedule's length with it (nnU-Net decays the learning rate over ``num_epochs``), so the
  learning rate reaches zero when the budget ends, as a planned nnU-Net run's does;
* training stops when another epoch would not leave ``RESERVE_SECONDS`` before the budget
  ends, or inside an epoch once that time is reached (nnU-Net's first epochs on a CPU can
  outlast a short budget); then nnU-Net's own final validation (sliding window + mirroring,
  summary.json) runs.

The budget counts from this process's start (initialisation, data unpacking and worker
start-up included), as autoplan's ``--time-budget`` counts from its own start. Prints one
``RESULT {json}`` line. The final checkpoint's trainer name is set to ``nnUNetTrainer`` so
``nnUNetv2_predict -tr nnUNetTrainerBudget`` can rebuild the network (nnU-Net looks the
class up among its own trainers).
"""

import json
import math
import os
import sys
import time

STARTED = time.monotonic()

import torch  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import join, load_json  # noqa: E402
from nnunetv2.paths import nnUNet_preprocessed  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name  # noqa: E402

ITERATIONS_PER_EPOCH = 50
VAL_ITERATIONS_PER_EPOCH = 5


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
    budget_seconds = 300.0
    reserve_seconds = 60.0

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = VAL_ITERATIONS_PER_EPOCH
        self.num_epochs = 1000          # replaced after the first epoch
        self.iterations_done = 0

    def _fit_schedule(self, epoch_seconds: float) -> None:
        left = self.budget_seconds - self.reserve_seconds - (time.monotonic() - STARTED)
        epochs = self.current_epoch + 1 + max(0, math.floor(left / epoch_seconds))
        self.num_epochs = epochs
        self.lr_scheduler.max_steps = epochs

    def _budget_spent(self) -> bool:
        return time.monotonic() - STARTED + self.reserve_seconds > self.budget_seconds

    def _another_epoch_fits(self, epoch_seconds: float) -> bool:
        elapsed = time.monotonic() - STARTED
        return elapsed + epoch_seconds + self.reserve_seconds <= self.budget_seconds

    def run_training(self):
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            epoch_started = time.monotonic()
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for _ in range(self.num_iterations_per_epoch):
                outputs.append(self.train_step(next(self.dataloader_train)))
                if self._budget_spent():        # a long first epoch: stop inside it
                    break
            self.iterations_done += len(outputs)
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val)
            epoch_seconds = time.monotonic() - epoch_started
            if self.current_epoch == 0:
                self._fit_schedule(epoch_seconds)
            stop = self._budget_spent() or not self._another_epoch_fits(epoch_seconds)
            self.on_epoch_end()             # increments current_epoch
            if stop:
                break
        self.on_train_end()


def main():
    dataset_id, configuration, fold, budget_minutes, reserve = sys.argv[1:6]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    name = maybe_convert_to_dataset_name(int(dataset_id))
    plans = load_json(join(nnUNet_preprocessed, name, "nnUNetPlans.json"))
    dataset_json = load_json(join(nnUNet_preprocessed, name, "dataset.json"))
    plans["continue_training"] = False      # what nnU-Net's run_training sets before building a trainer
    nnUNetTrainerBudget.budget_seconds = float(budget_minutes) * 60
    nnUNetTrainerBudget.reserve_seconds = float(reserve)
    trainer = nnUNetTrainerBudget(plans, configuration, int(fold), dataset_json, torch.device("cpu"))
    trainer.run_training()
    trained_seconds = time.monotonic() - STARTED
    trainer.perform_actual_validation(False)
    checkpoint_path = join(trainer.output_folder, "checkpoint_final.pth")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer"
    torch.save(checkpoint, checkpoint_path)
    summary = load_json(join(trainer.output_folder, "validation", "summary.json"))
    print("RESULT " + json.dumps({
        "epochs": trainer.current_epoch, "iterations": trainer.iterations_done,
        "batch_size": trainer.configuration_manager.batch_size,
        "train_seconds": trained_seconds, "total_seconds": time.monotonic() - STARTED,
        "dice": {label: values["Dice"] for label, values in summary["mean"].items()},
        "output_folder": trainer.output_folder}), flush=True)


if __name__ == "__main__":
    main()
