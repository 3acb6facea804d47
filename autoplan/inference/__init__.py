"""Prediction on new images and evaluation on labelled datasets, with trained run folders.

The commands:
- ``predict_folder(model_dir, input_dir, output_dir, ...)`` (``predict``): masks (segmentation)
  or ``predictions.csv`` (classification) for every image in a folder.
- ``evaluate_dataset(model_dir, dataset, output_dir, ...)`` (``evaluate``): the same prediction
  on an imported, labelled dataset, then ``metrics.json`` and ``report.html``.

The prediction core, which training's final validation uses too (so validation and
prediction are the same code):
- ``sliding_window``: nnU-Net's Gaussian-weighted tiling with mirroring TTA;
- ``segmentation``: one case preprocessed, predicted and put back into its original grid
  (``predict_case_probabilities``), labels, and the keep-largest-component post-processing
  (``decide_postprocessing`` / ``apply_postprocessing``);
- ``classification``: flip TTA (``classify_batch``), decisions of preprocessed images
  (``classify_pixels``) and the reports' Grad-CAM samples (``gradcam_samples``);
- ``models``: the folds of a run loaded as one ensemble.
``inputs`` reads the cases of an input folder and names their masks.
"""

from autoplan.inference.evaluate import evaluate_dataset
from autoplan.inference.predict import predict_folder

__all__ = ["evaluate_dataset", "predict_folder"]
