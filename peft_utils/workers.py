"""Several runs at once on one device: worker processes beside this one, splitting one plan through the results
folder.

A launch-bound GPU step leaves most of the GPU idle, and small matrices scale poorly over CPU threads, so a plan
of many small runs (rate tuning, the rank x alpha map, extra seeds) can finish sooner with N runs side by side
than one at a time. Each worker is a fresh process (``spawn``: a CUDA context cannot be forked) running the same
plan; the results folder's claims give every run to exactly one of them (:meth:`~peft_utils.store.RunStore.claim`).
This process is one of the N, so its progress stays where the user looks (a notebook shows only its own output).
On a CPU the threads are shared out, so N workers use the cores that one process would have used.
"""
from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator

import torch


def worker_label() -> str:
    """``"worker 2, "`` in a worker process, ``""`` in the one that started them: which printed a line."""
    name = multiprocessing.current_process().name
    return f"{name}, " if name.startswith("worker ") else ""


def _work(job: Callable[[], object], threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    job()


@contextlib.contextmanager
def workers_beside(job: Callable[[], object], workers: int, device_type: str) -> Iterator[None]:
    """Run ``job`` (picklable: a module-level function or a ``functools.partial`` of one) in ``workers - 1``
    spawned processes while the body runs here, then wait for them; a worker that failed is a RuntimeError
    (its traceback is in its own output), and a body that fails stops the workers. With one worker, nothing is
    started."""
    if workers <= 1:
        yield
        return
    own_threads = torch.get_num_threads()
    threads = max(1, own_threads // workers) if device_type == "cpu" else None
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_work, args=(job, threads), name=f"worker {i}") for i in range(1, workers)]
    for process in processes:
        process.start()
    try:
        if threads:
            torch.set_num_threads(threads)
        yield
    except BaseException:  # this process failed or was interrupted: the plan stops here, so do the workers
        for process in processes:
            process.terminate()
        raise
    finally:
        torch.set_num_threads(own_threads)
        for process in processes:
            process.join()
    failed = [f"{process.name} exited with status {process.exitcode}" for process in processes if process.exitcode]
    if failed:
        raise RuntimeError("; ".join(failed) + " (its error is in its own output)")
