"""Where raw datasets, the preprocessed cache and results live (flag > env > default)."""

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Folders:
    raw: Path
    preprocessed: Path
    results: Path

    def dataset_raw(self, name: str) -> Path:
        return self.raw / name

    def dataset_preprocessed(self, name: str) -> Path:
        return self.preprocessed / name

    def dataset_results(self, name: str) -> Path:
        return self.results / name


def resolve_folders(raw=None, preprocessed=None, results=None) -> Folders:
    def pick(flag, env, default):
        return Path(flag or os.environ.get(env) or default).expanduser()

    return Folders(
        raw=pick(raw, "AUTOPLAN_RAW", "./datasets_raw"),
        preprocessed=pick(preprocessed, "AUTOPLAN_PREPROCESSED", "./preprocessed"),
        results=pick(results, "AUTOPLAN_RESULTS", "./results"),
    )
