"""One worker thread that runs GPU jobs one at a time, fed by a bounded queue.

The model is not thread-safe and a GPU runs one sampling loop best, so every generation goes
through this single thread. ``submit`` never blocks: when ``capacity`` jobs already wait it
raises ``QueueFull`` (the server answers 503). A job whose caller gave up (timeout, client
gone) is cancelled; if it has not started yet the worker skips it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class QueueFull(RuntimeError):
    """The bounded queue of pending jobs is full."""


class Worker:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._jobs: queue.Queue[tuple[Future, Callable[[], Any]] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="pipeline-worker", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._jobs.qsize()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        try:
            self._jobs.put_nowait((future, fn))
        except queue.Full:
            raise QueueFull(f"{self.capacity} requests are already waiting") from None
        return future

    def _run(self) -> None:
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
