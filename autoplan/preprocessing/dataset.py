"""Entry: ``preprocess_dataset`` writes the cache the loaders read, for one configuration of a
plan, by the dataset's task (``cache`` for segmentation, ``classification`` for images)."""

from pathlib import Path

from autoplan.errors import InputError
from autoplan.paths import preprocessed_folder
from autoplan.preprocessing.cache import preprocess_segmentation
from autoplan.preprocessing.classification import preprocess_classification

# Each task's cache writer: (dataset, configuration, out_dir, n_jobs) -> out_dir.
CACHE_WRITERS = {"segmentation": preprocess_segmentation, "classification": preprocess_classification}


def preprocess_dataset(dataset, plan, configuration_name, preprocessed_root, n_jobs=None,
                       previous_stage=None) -> Path:
    """Write the preprocessed cache for one configuration; returns its folder.

    Cases whose files exist with a matching stamp are skipped, so an interrupted
    run resumes where it stopped. A cascade configuration needs ``previous_stage``:
    {case id: its previous stage's out-of-fold label map file} (``inference.cascade``).
    """
    if configuration_name not in plan.configurations:
        raise InputError(None, f"configuration {configuration_name!r} is not in the plan "
                               f"(available: {', '.join(plan.configurations)})")
    configuration = plan.configurations[configuration_name]
    out_dir = preprocessed_folder(preprocessed_root, dataset.name, configuration_name)
    if configuration.previous_stage:
        return preprocess_segmentation(dataset, configuration, out_dir, n_jobs, previous_stage=previous_stage)
    return CACHE_WRITERS[dataset.task_type](dataset, configuration, out_dir, n_jobs)
