"""Per-case work in parallel through joblib, with a tqdm progress bar.

Going through joblib (not multiprocessing directly) lets a user with a cluster
hand the work to Dask or Ray with ``joblib.parallel_config(backend=...)``.
"""

import functools
import os
import sys

from joblib import Parallel, delayed
from tqdm.auto import tqdm

from autoplan.errors import InputError


def default_n_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def progress_enabled() -> bool:
    """Progress bars on a terminal, or wherever AUTOPLAN_PROGRESS=1 asks for them."""
    return sys.stderr.isatty() or os.environ.get("AUTOPLAN_PROGRESS") == "1"


def parallel_map(function, items, n_jobs=None, desc="", quiet=False):
    """[function(item) for item in items], in parallel, in order, with a progress bar.

    Bad input is reported as it would be one item at a time: the InputError of the first
    failing item in order, not of whichever worker failed first (joblib raises that one).
    """
    items = list(items)
    n_jobs = default_n_jobs() if n_jobs is None else max(1, int(n_jobs))
    disable = quiet or not progress_enabled()
    if n_jobs == 1 or len(items) <= 1:
        return [function(item) for item in tqdm(items, desc=desc, disable=disable)]
    runner = Parallel(n_jobs=n_jobs, return_as="generator", batch_size="auto")
    guarded = functools.partial(_input_error_as_value, function)
    results = list(tqdm(runner(delayed(guarded)(item) for item in items), total=len(items),
                        desc=desc, disable=disable))
    for result in results:
        if isinstance(result, _Failed):
            raise result.error
    return results


class _Failed:
    """An item's InputError, returned by the worker so that every item runs to the end."""

    def __init__(self, error: InputError):
        self.error = error


def _input_error_as_value(function, item):
    try:
        return function(item)
    except InputError as error:
        return _Failed(error)
