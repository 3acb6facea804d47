"""autoplan: fingerprint, plan, preprocess, train, predict and report for medical images."""

__version__ = "0.1.0"
