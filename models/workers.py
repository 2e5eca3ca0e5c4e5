"""DataLoaders whose worker processes are safe whatever the parent process has already run.

A forked child inherits the parent's memory but only the forking thread. Libraries with thread
pools of their own (libvips, OpenMP inside torch, OpenVINO) can hold a lock at the moment of the
fork that no thread in the child will ever release; the child's next call into them waits
forever. That is how `imgsim train` hung: the image check had run libvips in the parent, and the
forked workers then blocked in it on the first large image. So workers are never forked from the
parent: a fork server, started once per process from a clean interpreter that has only imported
the decode path (and run none of it), forks each worker instead. Where a platform has no fork
server (Windows), workers are spawned. As with any start method but fork, a script that starts
workers must guard its entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.forkserver
from multiprocessing.context import BaseContext
from typing import Any

from torch.utils.data import DataLoader, Dataset

# What the fork server imports before forking: the modules every worker unpickles its dataset
# with (torch, torchvision's transforms, Pillow, pyvips), so that a worker starts in a fork's
# time rather than an interpreter's. Importing them starts no thread pool; using them would, and
# the server never does. A worker also runs the parent's main module again, as with every start
# method but fork, and Python 3.11's fork server does not preload it: a main module names what
# it imports (preload_in_workers), as the CLI does, or each worker imports that again
# (benchmarks/worker_start.md, "main's imports not preloaded").
_PRELOAD = ["models.data"]


def preload_in_workers(*modules: str) -> None:
    """Have the fork server import these modules too; call before the first loader is made."""
    _PRELOAD.extend(module for module in modules if module not in _PRELOAD)


@functools.cache
def worker_context() -> BaseContext:
    """The start method of every worker process: forkserver, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        # Started now, when the first loader is made: the server imports _PRELOAD while this
        # process goes on (loading the model, say) rather than when the first batch is wanted.
        multiprocessing.forkserver.ensure_running()
        return context
    return multiprocessing.get_context("spawn")


def loader(dataset: Dataset, workers: int, **options: Any) -> DataLoader:
    """A DataLoader over dataset with `workers` decoding processes (0: in this process), started
    by worker_context(), logging as this process does."""
    if workers > 0:
        options.setdefault("multiprocessing_context", worker_context())
        options["worker_init_fn"] = functools.partial(
            _log_as_parent, _logging_levels(), _log_format(), options.get("worker_init_fn")
        )
    return DataLoader(dataset, num_workers=workers, **options)


def _logging_levels() -> dict[str, int]:
    """This process's logging levels that a fresh interpreter would not have: the root's and
    those set on named loggers (libvips' messages through 'pyvips' among them)."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _log_format() -> str | None:
    """The format of the root logger's first handler, if it has one (the CLI's)."""
    handlers = logging.getLogger().handlers
    formatter = handlers[0].formatter if handlers else None
    return formatter._fmt if formatter is not None else None


def _log_as_parent(levels: dict[str, int], format: str | None, then: Any, worker_id: int) -> None:
    """In a worker: the parent's levels and format on stderr, so that what a library logs in a
    worker (a libvips warning) shows, and what the parent hides does not."""
    logging.basicConfig(level=levels[""], format=format)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    if then is not None:
        then(worker_id)
