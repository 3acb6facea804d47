"""The artifacts later stages read: a :class:`Plan` of configurations (planning) and the
:class:`BestChoice` of ``autoplan find-best`` (``RESULTS/NAME/best.json``).

Kept apart from the code that makes them (``autoplan.planning``, ``autoplan.selection``) so
that training, inference and the run folder (``autoplan.runs``) can read them without
importing that code.
"""

from dataclasses import dataclass, field
from pathlib import Path

from autoplan.jsonio import JsonDataclass


@dataclass
class Configuration:
    name: str                          # '2d' | '3d_fullres' | '3d_lowres' | '3d_cascade_fullres' | 'classifier'
    dim: int                           # 2 | 3
    patch_size: list                   # array axis order; classifier: input size [H, W]
    batch_size: int
    spacing: list                      # target spacing, array axis order (classifier: [])
    network: dict                      # U-Net: n_stages, features_per_stage, strides, kernel_sizes,
                                       #   conv_per_stage; classifier: arch, widths, blocks_per_stage
    normalization: list                # per channel: {"scheme": "zscore"|"zscore_nonzero"|"ct"|"rgb",
                                       #   "mean":, "std":, "clip": [lo, hi]} (fields as needed)
    estimated_memory_gb: float
    epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int = 0
    expected_seconds_per_iteration: float | None = None
    loss: str = "dice_ce"
    optimizer: str = "sgd"
    lr: float = 0.01
    batch_dice: bool = False
    augment: str = "default"
    imbalance: dict = field(default_factory=dict)   # classifier: {"strategy":, "class_weights":, "reason":}
    n_input_channels: int = 1
    n_outputs: int = 2                 # segmentation: labels incl. background; classifier: classes
    reasons: dict = field(default_factory=dict)     # field name -> why it was chosen
    mirror_axes: list | None = None    # axes augmentation and TTA may mirror (None: every axis)
    max_rotation_degrees: float | None = None       # cap on augmentation rotation (None: the preset's)
    # added by the planner (defaults keep older plans loadable)
    median_image_size: list = field(default_factory=list)   # median shape at the target spacing
    samples_seen_epochs: float | None = None        # epochs × its × batch × patch / training voxels
    precision: str = ""                # autocast in training: 'fp16' | 'bf16' | 'fp32' ('': fp16 on CUDA,
                                       #   fp32 on CPU, as plans made before the field)
    field_of_view: dict = field(default_factory=dict)   # {"mode": "fit", "working_size": [H, W]} for images
    # The cascade (nnU-Net's 3d_cascade_fullres): the configuration whose predicted labels are
    # appended to the image as one-hot channels, one per foreground label id 1 .. n_outputs - 1
    # (so n_input_channels = image channels + n_outputs - 1, normalisation "none" for those).
    previous_stage: str = ""           # '' | '3d_lowres'
    previous_stage_run: str = ""       # set by training: the run RESULTS/NAME/PREVIOUS_STAGE/RUN whose
                                       #   out-of-fold predictions trained this one, and that prediction runs first

    @property
    def is_classifier(self) -> bool:
        """The classifier configuration (a ResNet on whole images), not a U-Net's."""
        return self.name == "classifier"

    @property
    def n_previous_stage_channels(self) -> int:
        """One-hot channels of the previous stage's labels (foreground only), 0 without one."""
        return self.n_outputs - 1 if self.previous_stage else 0

    @property
    def n_image_channels(self) -> int:
        """Channels of the images themselves: what a case file or an array given to predict has."""
        return self.n_input_channels - self.n_previous_stage_channels


# Imbalance strategies whose training leans a classifier's posterior towards rare classes by the
# factors in ``imbalance["class_weights"]``: a weighted loss, or a logit-adjusted loss (which adds
# -log of those factors to the logits). Decision rules take a share of that lean back.
LEANING_STRATEGIES = ("weighted_loss", "logit_adjusted")


def leaning_factors(imbalance: dict | None) -> list | None:
    """The per-class factors training leaned the posterior by, or None (no such strategy)."""
    imbalance = imbalance or {}
    return imbalance.get("class_weights") if imbalance.get("strategy") in LEANING_STRATEGIES else None


@dataclass
class Plan(JsonDataclass):
    dataset: str
    task_type: str
    device: str                        # 'cpu' | 'cuda': what the plan was made for
    gpu_memory_gb: float | None
    time_budget_minutes: float | None
    configurations: dict[str, Configuration]
    default_configuration: str
    notes: list = field(default_factory=list)       # planner-level observations (added field)


BEST_FILE = "best.json"


@dataclass
class Member:
    """One trained run a choice uses: ``RESULTS/NAME/CONFIGURATION/RUN`` (its folds ensembled)."""

    configuration: str
    run: str

    @property
    def label(self) -> str:
        return f"{self.configuration}/{self.run}"

    def folder(self, dataset_results) -> Path:
        return Path(dataset_results) / self.configuration / self.run


@dataclass
class CandidateScore:
    """One configuration, or one pair's ensemble, scored on the out-of-fold predictions."""

    members: list[Member]
    score: float                      # mean foreground Dice, or balanced accuracy
    per_label: dict                   # {label or class name: mean Dice or recall}
    postprocessing: dict = field(default_factory=dict)    # {label id str: keep largest component}
    score_postprocessed: float | None = None              # the score with that post-processing

    @property
    def label(self) -> str:
        return " + ".join(member.label for member in self.members)


@dataclass
class BestChoice(JsonDataclass):
    """best.json: every candidate's scores (best first), what was chosen and why; what
    ``predict --model RESULTS/NAME`` and ``export-model RESULTS/NAME`` follow."""

    dataset: str
    task_type: str
    metric: str                       # 'mean_foreground_dice' | 'balanced_accuracy'
    folds: list[int]
    n_cases: int
    tta: bool
    candidates: list[CandidateScore]
    chosen: CandidateScore
    excluded: dict = field(default_factory=dict)          # {member label: why it was not compared}
    reason: str = ""
