"""Independent jobs of an experiment (its method runs, the joint run) side by side in worker processes.

On a CPU a tiny model's matrices are too small for two threads to halve a step's time: two runs at one
thread each train about 1.35x faster in total than one run on both threads (2-core machine, `make demo`).
With `workers` = N > 1 each job runs in a worker process (forked from a fork server that has imported the code,
never run it) with 1/N of this process's threads, its output going to the log file named for it; the parent
prints one line when a job starts and one when it ends. With N = 1 every job runs here, in order, printing as it
goes: exactly the single-process experiment.

The thread count is part of a run's arithmetic (it changes the order of float reductions), so the same seed
and the same `workers` give the same run; another `workers` may differ in the last bits.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mllm_cl.errors import UserError


class JobError(UserError, RuntimeError):
    """A job failed in its worker; the message names the job, its error and its log file."""


@dataclass
class Job:
    name: str
    fn: Callable[..., Any]  # a module-level function: it is sent to the worker by reference
    args: tuple[Any, ...]
    log: Path  # where a worker writes the job's output
    then: list[Job] = field(default_factory=list)  # jobs that need this one's output: queued when it ends


def run_jobs(jobs: list[Job], workers: int, done: Callable[[Job, Any, float], None]) -> None:
    """Run every job, `workers` at a time, and each job's `then` jobs once it has ended; `done(job, result,
    seconds)` is called here as each one ends."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1 or len(jobs) + sum(len(job.then) for job in jobs) <= 1:
        queue = list(jobs)
        while queue:
            job = queue.pop(0)
            start = time.time()
            result = job.fn(*job.args)
            done(job, result, time.time() - start)
            queue += job.then
        return
    threads = max(1, torch.get_num_threads() // workers)  # this process's threads: the cores it may use
    with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
        print(f"{len(jobs)} jobs, {workers} at a time ({threads} thread(s) each); each one's output goes to its "
              f"log: {', '.join(str(job.log) for job in jobs)}", flush=True)
        running: dict[Future, Job] = {}

        def submit(job: Job) -> None:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            running[pool.submit(_in_worker, job.fn, job.args, job.log, threads)] = job

        for job in jobs:
            submit(job)
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = running.pop(future)
                    result, seconds, error = future.result()
                    if error is not None:
                        raise JobError(f"{job.name} failed: {error} (its output: {job.log})")
                    print(f"finished {job.name} in {seconds:.0f}s", flush=True)
                    done(job, result, seconds)
                    for follower in job.then:
                        print(f"starting {follower.name} (its output: {follower.log})", flush=True)
                        submit(follower)
        except BaseException:
            for future in running:
                future.cancel()
            raise


# What every job imports: the fork server imports it once, and each worker is a fork of that server (about 3 s of
# imports saved per worker on a 2-core CPU). torch._dynamo is what creating a torch optimizer imports (1.4 s).
PRELOAD = ["mllm_cl.experiment", "torch._dynamo"]


def _context() -> multiprocessing.context.BaseContext:
    """Workers forked from a fork server that has imported PRELOAD and never run a torch op (so no thread pool is
    forked); where there is no fork server (Windows), fresh spawned interpreters."""
    try:
        context = multiprocessing.get_context("forkserver")
    except ValueError:
        return multiprocessing.get_context("spawn")
    context.set_forkserver_preload(PRELOAD)  # takes effect when the server starts, at the first pool
    return context


def _in_worker(fn: Callable[..., Any], args: tuple[Any, ...], log: Path,
               threads: int) -> tuple[Any, float, str | None]:
    """Run fn(*args) with `threads` torch threads and its output appended to `log`: (result, seconds, error)."""
    torch.set_num_threads(threads)
    start = time.time()
    with open(log, "a", buffering=1) as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return fn(*args), time.time() - start, None
        except UserError as e:  # a clear message already: say it, as the single-process run would
            print(f"error: {e}")
            return None, time.time() - start, str(e)
        except Exception as e:  # noqa: BLE001 - anything else: its traceback goes to the log, its line to the user
            traceback.print_exc()
            return None, time.time() - start, f"{type(e).__name__}: {e}"
