"""One worker thread that runs GPU jobs one at a time, fed by a bounded queue.

The model is not thread-safe and a GPU runs one sampling loop best, so every generation goes
through this single thread. ``submit`` never blocks: when ``capacity`` jobs already wait it
raises ``QueueFull`` (the server answers 503). A job whose caller gave up (timeout, client
gone) is cancelled; if it has not started yet the worker skips it.

A job that raises an ``Exception`` hands it to its caller and the worker goes on. Anything
else (``SystemExit``, ``KeyboardInterrupt``, a ``BaseException`` from a library) ends the
thread it ran on: that job fails with ``WorkerCrashed`` (the server answers 500), the reason
goes to the log at CRITICAL, and a fresh thread is started in the same process to serve the
jobs still queued and every later one; ``restarts`` counts them and ``failure`` keeps the
last reason (``/health`` shows both). Only ``close`` stops the worker for good
(``WorkerDead``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The bounded queue of pending jobs is full."""


class WorkerDead(RuntimeError):
    """The worker was closed: no job will run any more."""


class WorkerCrashed(RuntimeError):
    """The job ended its worker thread with a ``BaseException`` (a new thread took over)."""


class Worker:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.failure: str | None = None  # why the last thread ended, when one did
        self.restarts = 0  # threads started again after a job ended one
        self._closed = False
        self._jobs: queue.Queue[tuple[Future, Callable[[], Any]] | None] = queue.Queue(capacity)
        self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pipeline-worker", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._jobs.qsize()

    @property
    def alive(self) -> bool:
        return not self._closed and self._thread.is_alive()

    def submit(self, fn: Callable[[], Any]) -> Future:
        if self._closed:
            raise WorkerDead("the generation worker is closed (the server is stopping)")
        future: Future = Future()
        try:
            self._jobs.put_nowait((future, fn))
        except queue.Full:
            raise QueueFull(f"{self.capacity} requests are already waiting") from None
        return future

    def _run(self) -> None:
        future: Future | None = None
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                future, fn = job
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while waiting
                try:
                    future.set_result(fn())
                except Exception as err:  # handed to the waiting request
                    future.set_exception(err)
                future = None
        except BaseException as err:  # this thread ends: fail its job, start a fresh one
            self.failure = f"{type(err).__name__}: {err}"
            self.restarts += 1
            log.critical(
                "a job ended the generation worker (%s); starting it again (restart %d)",
                self.failure,
                self.restarts,
                exc_info=True,
            )
            if future is not None and not future.done():
                future.set_exception(
                    WorkerCrashed(f"the generation worker stopped: {self.failure}")
                )
            if not self._closed:
                self._start()  # it serves the jobs still queued

    def close(self, timeout: float = 5.0) -> None:
        """Finish the running job, drop the waiting ones, stop the thread."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)
        self._thread.join(timeout)
