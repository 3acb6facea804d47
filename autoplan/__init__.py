"""autoplan: fingerprint, plan, preprocess, train, predict and report for medical images.

``from autoplan import Predictor`` is the Python API for trained models
(``autoplan.inference.predictor``); it is imported on first use, so ``import autoplan``
stays light.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Predictor":
        from autoplan.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'autoplan' has no attribute {name!r}")
