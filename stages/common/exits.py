"""How a stage's process ends: its exit codes (defined here once) and the stop signals.

``EXIT_CODES`` is the one statement of what each code means: ``cli.EPILOG`` (``--help``) is
generated from it and a test holds the table of docs/resume.md to it. ``Preemption`` turns SIGTERM,
SIGINT and SIGHUP into a flag the trainer checks at each step boundary (save, then exit 75).
"""

from __future__ import annotations

import logging
import signal
import textwrap
import threading
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_CANNOT_RESUME = 3
EXIT_NONFINITE = 4
EXIT_DISK_FULL = 5
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again
EXIT_ABORTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "trained, or already trained and exported (nothing to do)",
    EXIT_ERROR: "an unexpected error (traceback printed); a missing or mismatched upstream "
    "export or data folder; the run folder, or its mirrored run (another live runtime on the "
    "same Drive), in use by another process (its PID named); "
    "another process failing during a save",
    EXIT_CONFIG: "bad config, preset or override (the key is named)",
    EXIT_CANNOT_RESUME: "cannot resume: config keys that break resume changed (named), the "
    "number of processes changed, or no existing checkpoint is usable",
    EXIT_NONFINITE: "stopped after train.max_consecutive_skips non-finite steps in a row, or "
    "the weights became non-finite (never saved nor exported: the last checkpoint stays the "
    "newest); lower optim.lr or fix the data and re-run",
    EXIT_DISK_FULL: "disk full (or quota exceeded) while writing a checkpoint or the export: "
    "the message says how much was needed and is free; the partial folder was removed and the "
    "previous checkpoint is kept; free some space and re-run to resume",
    EXIT_PREEMPTED: "preempted (SIGTERM/SIGINT/SIGHUP): a checkpoint was saved at the step "
    "boundary; re-run the same command to resume",
    EXIT_ABORTED: "a second Ctrl-C: stopped at once, without saving",
}


def describe_exit_codes(width: int = 88) -> str:
    """``exit codes:`` and one wrapped entry per code, for ``--help``."""
    lines = ["exit codes:"]
    for code, meaning in EXIT_CODES.items():
        lines += textwrap.wrap(
            meaning, width, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7
        )
    return "\n".join(lines) + "\n"


class Preemption:
    """SIGTERM, SIGINT and SIGHUP set ``requested``; a second SIGINT aborts at once.

    A signal the process inherited as ignored (``nohup`` ignores SIGHUP, a background job
    of a non-interactive shell SIGINT) stays ignored: the user asked for exactly that.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: aborting without saving")
        if not self.requested:
            self.requested = name
            log.warning("%s: saving a checkpoint after this step, then exiting", name)

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
