"""Per-case work in parallel, in order, with a tqdm progress bar: joblib here, or a Dask cluster.

Entry function: ``parallel_map(function, items, n_jobs, desc, quiet)``.

On this machine the items go through joblib (a user's ``joblib.parallel_config`` still picks
the backend). ``use_scheduler("tcp://HOST:8786")`` (the CLI's ``--scheduler``) or the
environment variable ``AUTOPLAN_SCHEDULER`` sends every ``parallel_map`` to that Dask
scheduler instead, one task per item (``pip install 'autoplan[cluster]'``). The workers
must import autoplan (the same environment) and see the data at the same paths.
"""

import functools
import importlib.util
import os
import re
import sys
import uuid

from joblib import Parallel, delayed
from tqdm.auto import tqdm

from autoplan.errors import InputError

SCHEDULER_VARIABLE = "AUTOPLAN_SCHEDULER"
CONNECT_TIMEOUT_SECONDS = 10          # to reach the scheduler, and for it to have a worker
CLUSTER_EXTRA = "pip install 'autoplan[cluster]' (dask and distributed)"

_chosen = {"address": None}            # use_scheduler's choice; beats the environment variable
_clients = {}                          # {scheduler address: distributed.Client}, one per process


def default_n_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def progress_enabled() -> bool:
    """Progress bars on a terminal, or wherever AUTOPLAN_PROGRESS=1 asks for them."""
    return sys.stderr.isatty() or os.environ.get("AUTOPLAN_PROGRESS") == "1"


def parallel_map(function, items, n_jobs=None, desc="", quiet=False):
    """[function(item) for item in items], in parallel, in order, with a progress bar.

    Bad input is reported as it would be one item at a time: the InputError of the first
    failing item in order, not of whichever worker failed first (joblib raises that one).
    With a scheduler (``use_scheduler`` or AUTOPLAN_SCHEDULER) every item runs on the
    cluster, on all its worker threads: ``n_jobs`` counts this machine's cores only.
    """
    items = list(items)
    disable = quiet or not progress_enabled()
    guarded = functools.partial(_input_error_as_value, function)
    address = scheduler_address()
    n_jobs = default_n_jobs() if n_jobs is None else max(1, int(n_jobs))
    if address is not None and items:
        results = _run_on_cluster(guarded, items, desc, disable, address)
    elif n_jobs == 1 or len(items) <= 1:
        return [function(item) for item in tqdm(items, desc=desc, disable=disable)]
    else:
        runner = Parallel(n_jobs=n_jobs, return_as="generator", batch_size="auto")
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


# ---------------------------------------------------------------- the Dask cluster


def scheduler_address() -> str | None:
    """The scheduler per-case work goes to: ``use_scheduler``'s, else AUTOPLAN_SCHEDULER's, else None."""
    return _chosen["address"] or os.environ.get(SCHEDULER_VARIABLE, "").strip() or None


def use_scheduler(address: str | None) -> "_SchedulerChoice":
    """Send per-case work to the Dask scheduler at ``address`` (``tcp://HOST:PORT``) from now on.

    Connects at once, so that an unreachable scheduler or a missing dask is an InputError
    before any work starts. ``None`` or "" changes nothing (AUTOPLAN_SCHEDULER still
    applies). Used in a ``with`` block, the choice ends with the block and its client closes.
    """
    return _SchedulerChoice((address or "").strip() or None)


class _SchedulerChoice:
    def __init__(self, address: str | None):
        self.address, self.previous = address, _chosen["address"]
        if address is not None:
            _connected_client(address)
            _chosen["address"] = address

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        _chosen["address"] = self.previous
        if self.address is not None and self.address != self.previous:
            client = _clients.pop(self.address, None)
            if client is not None:
                client.close()


def _run_on_cluster(guarded, items: list, desc: str, disable: bool, address: str) -> list:
    """Each item as one task of the cluster, results in order.

    Not joblib's Dask backend: with a single worker thread on the cluster, joblib runs every
    item in this process instead (it treats one worker as no parallelism).
    """
    from distributed import as_completed

    client = _connected_client(address)
    prefix = re.sub(r"[^A-Za-z0-9_]+", "_", desc).strip("_") or "autoplan"   # the dashboard's task name
    keys = [f"{prefix}-{uuid.uuid4().hex}-{index}" for index in range(len(items))]
    # scattered, large items (evaluation's label maps) go to a worker once, outside the task graph
    futures = client.map(guarded, client.scatter(items, hash=False), key=keys)
    try:
        for future in tqdm(as_completed(futures, loop=client.loop), total=len(futures), desc=desc,
                           disable=disable):
            if future.status == "error":
                future.result()        # a bug's exception (not an InputError), raised here at once
        return client.gather(futures)
    finally:
        client.cancel(futures)         # unfinished ones after an error; finished ones free worker memory


def _connected_client(address: str):
    """This process's client of ``address``, connected (and with a worker) or an InputError."""
    client = _clients.get(address)
    if client is not None and client.status == "running":
        return client
    try:
        from distributed import Client
    except ImportError:
        raise InputError(None, f"Dask scheduler {address}: running on a cluster needs "
                               f"{CLUSTER_EXTRA}") from None
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_SECONDS, set_as_default=False)
    except (OSError, ValueError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(None, f"Dask scheduler {address}: cannot connect ({reason})") from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_SECONDS)
    except TimeoutError:
        client.close()
        raise InputError(None, f"Dask scheduler {address}: no worker joined within "
                               f"{CONNECT_TIMEOUT_SECONDS} s") from None
    _check_workers_import_autoplan(client, address)
    _clients[address] = client
    return client


def _check_workers_import_autoplan(client, address: str) -> None:
    """Workers without autoplan would die unpickling the first task (the scheduler then drops
    them and the work is cancelled): say so before any work is sent."""
    found = client.run(importlib.util.find_spec, "autoplan", on_error="return")
    missing = sorted(worker for worker, spec in found.items() if spec is None or isinstance(spec, Exception))
    if missing:
        client.close()
        raise InputError(None, f"Dask scheduler {address}: {len(missing)} of {len(found)} workers cannot "
                               f"import autoplan (first: {missing[0]}); run them in autoplan's environment")
