"""Per-case work in parallel through joblib, with a tqdm progress bar.

Going through joblib (not multiprocessing directly) lets a user with a cluster
hand the work to Dask or Ray with ``joblib.parallel_config(backend=...)``.
"""

import os
import sys

from joblib import Parallel, delayed
from tqdm.auto import tqdm


def default_n_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def progress_enabled() -> bool:
    """Progress bars on a terminal, or wherever AUTOPLAN_PROGRESS=1 asks for them."""
    return sys.stderr.isatty() or os.environ.get("AUTOPLAN_PROGRESS") == "1"


def parallel_map(function, items, n_jobs=None, desc="", quiet=False):
    """[function(item) for item in items], in parallel, in order, with a progress bar."""
    items = list(items)
    n_jobs = default_n_jobs() if n_jobs is None else max(1, int(n_jobs))
    disable = quiet or not progress_enabled()
    if n_jobs == 1 or len(items) <= 1:
        return [function(item) for item in tqdm(items, desc=desc, disable=disable)]
    runner = Parallel(n_jobs=n_jobs, return_as="generator", batch_size="auto")
    results = runner(delayed(function)(item) for item in items)
    return list(tqdm(results, total=len(items), desc=desc, disable=disable))
