"""Several runs at once on one device: a launch-bound GPU step leaves most of the GPU idle, and small matrices scale
poorly over CPU threads, so many small runs finish sooner side by side. Each worker is a fresh process (``spawn``: a
CUDA context cannot be forked) running the same stage of the plan, whose runs the results folder's claims share out
(:meth:`~peft_utils.store.RunStore.claim`); this process is one of them, so its progress stays where the user looks.
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
    """Run ``job`` (picklable) in ``workers - 1`` spawned processes while the body runs here, on a CPU each with its
    share of the threads; a worker that failed is a RuntimeError, and a body that fails stops the workers."""
    own_threads = torch.get_num_threads()
    threads = max(1, own_threads // workers) if device_type == "cpu" and workers > 1 else None
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
        if threads:
            torch.set_num_threads(own_threads)
        for process in processes:
            process.join()
    failed = [f"{process.name} exited with status {process.exitcode}" for process in processes if process.exitcode]
    if failed:
        raise RuntimeError("; ".join(failed) + " (its error is in its own output)")
