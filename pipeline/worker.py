"""One worker thread that runs GPU jobs one at a time, fed by a bounded queue.

The model is not thread-safe and a GPU runs one sampling loop best, so every generation goes
through this single thread. ``submit`` never blocks: when ``capacity`` jobs already wait it
raises ``QueueFull`` (the server answers 503). A job whose caller gave up (timeout, client
gone) is cancelled; if it has not started yet the worker skips it.

A job that raises an ``Exception`` hands it to its caller and the worker goes on. Anything
else (``SystemExit``, ``KeyboardInterrupt``, a ``BaseException`` from a library) stops the
thread: ``alive`` turns False, ``failure`` says why, the job and every waiting one fail with
``WorkerDead``, and so does every later ``submit`` (the server answers 503, /health says so).
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
    """The worker thread has stopped: no job will run any more."""


class Worker:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.failure: str | None = None  # why the thread stopped, when it did
        self._jobs: queue.Queue[tuple[Future, Callable[[], Any]] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="pipeline-worker", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._jobs.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def _dead(self) -> WorkerDead:
        return WorkerDead(f"the generation worker stopped: {self.failure or 'closed'}")

    def submit(self, fn: Callable[[], Any]) -> Future:
        if not self.alive:
            raise self._dead()
        future: Future = Future()
        try:
            self._jobs.put_nowait((future, fn))
        except queue.Full:
            raise QueueFull(f"{self.capacity} requests are already waiting") from None
        if not self.alive:  # it stopped between the check and the put: nobody will run this
            try:
                if future.set_running_or_notify_cancel():
                    future.set_exception(self._dead())
            except RuntimeError:
                pass  # the dying thread's drain got to it first
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
        except BaseException as err:  # the thread ends: say why, fail what waits on it
            self.failure = f"{type(err).__name__}: {err}"
            log.critical("generation worker stopped", exc_info=True)
            dead = self._dead()
            if future is not None and not future.done():
                future.set_exception(dead)
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job[0].set_running_or_notify_cancel():
                    job[0].set_exception(dead)

    def close(self, timeout: float = 5.0) -> None:
        """Finish the running job, drop the waiting ones, stop the thread."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)
        self._thread.join(timeout)
