"""A lease: a small JSON file that says who holds a folder, kept alive by a heartbeat.

For where kernel locks do not reach: a Drive folder that two Colab runtimes both mount (a
lock is local to one machine) and a runs folder whose file system refuses locks (NFS without
its lock daemon, some FUSE mounts). The file names its holder (host, PID, a random token)
and when it was last renewed.

- Taking it: when it is absent or *stale* (not renewed for the holder's ``timeout_s``, or its
  holder was a process of this very machine that no longer exists, e.g. after a ``kill -9``),
  write ours (a temporary name, then a rename), wait ``settle_s`` and read it back: of two
  takers at once the one whose record stayed wins, the other is refused. A live lease is
  refused at once with ``LeaseHeld``, naming the holder and saying what to do.
- Holding it: ``renew`` (a heartbeat thread, and the checkpoint mirror before each copy)
  rewrites the time; a renewal that finds another holder's record sets ``lost`` (the other
  side judged this one dead) and never writes over it.
- ``release`` deletes it, if it is still ours.

Staleness compares the wall clocks of two machines (keep them in sync, as Colab's are), and
a shared file system that propagates writes late (Drive) widens the window of a race.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live process holds the lease."""


def _machine() -> str:
    """This machine: its host name and boot id (a PID only means something on its machine)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class Lease:
    """The lease file ``path``; ``what`` and ``hint`` make the refusal's message."""

    def __init__(
        self,
        path: Path,
        timeout_s: float,
        what: str,
        hint: str,
        settle_s: float = 0.2,
    ):
        if timeout_s <= 0:
            raise ValueError(f"a lease timeout must be positive, got {timeout_s}")
        self.path = Path(path)
        self.timeout_s, self.settle_s = float(timeout_s), float(settle_s)
        self.what, self.hint = what, hint
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # --------------------------------------------------------------------- the file

    def _record(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "host": socket.gethostname(),
            "machine": _machine(),
            "pid": os.getpid(),
            "renewed": time.time(),
            "timeout_s": self.timeout_s,
        }

    def _read(self) -> dict[str, Any] | None:
        """The record; None when there is none. An unreadable one (half-synced, garbage) is
        judged by the file's age alone."""
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("renewed"), int | float):
                return data
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        try:
            renewed = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"token": "", "host": "unknown", "pid": "unknown", "renewed": renewed}

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{self.token[:12]}.tmp")  # one per writer
        with open(tmp, "w") as f:
            json.dump(self._record(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _ours(self, record: dict[str, Any] | None) -> bool:
        return record is not None and record.get("token") == self.token

    def _stale(self, record: dict[str, Any]) -> str | None:
        """Why ``record`` no longer holds the lease; None while it does."""
        pid = record.get("pid")
        if record.get("machine") == _machine() and isinstance(pid, int) and not _pid_alive(pid):
            return f"its holder, PID {pid} on this machine, is gone"
        age = time.time() - float(record["renewed"])
        timeout = float(record.get("timeout_s") or self.timeout_s)
        if age > timeout:
            return f"it was last renewed {age:.0f} s ago (its timeout is {timeout:.0f} s)"
        return None

    # -------------------------------------------------------------------- take, renew

    def acquire(self) -> Lease:
        """Take the lease, or raise ``LeaseHeld`` when another live process holds it."""
        record = self._read()
        if record is not None and not self._ours(record):
            why = self._stale(record)
            if why is None:
                raise self._held(record)
            log.warning("taking over the stale lease %s: %s", self.path, why)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        if self.settle_s:
            time.sleep(self.settle_s)  # a taker at the same moment writes within this window
        record = self._read()
        if not self._ours(record):
            raise self._held(record or {"host": "unknown", "pid": "unknown"})
        self.lost = False
        return self

    def _held(self, record: dict[str, Any]) -> LeaseHeld:
        timeout = float(record.get("timeout_s") or self.timeout_s)
        renewed = record.get("renewed")
        when = (
            f"renewed {time.time() - float(renewed):.0f} s ago, stale {timeout:.0f} s after "
            "its last renewal"
            if renewed is not None
            else "just taken"
        )
        return LeaseHeld(
            f"{self.what} is in use by another process (PID {record.get('pid')} on "
            f"{record.get('host')}; its lease {self.path} was {when}): {self.hint}"
        )

    def renew(self) -> bool:
        """Rewrite the time; False (and ``lost`` set) when another holder took it over."""
        if self.lost:
            return False
        record = self._read()
        if not self._ours(record):
            self.lost = True
            log.error(
                "lost the lease %s to %s (PID %s): this process judged dead by another",
                self.path,
                (record or {}).get("host", "nobody"),
                (record or {}).get("pid", "-"),
            )
            return False
        self._write()
        return True

    def start_heartbeat(self, every_s: float | None = None) -> None:
        """Renew every ``every_s`` (a quarter of the timeout) on a daemon thread: a renewal
        stuck in a stalled file system stalls only that thread."""
        every = every_s if every_s is not None else self.timeout_s / 4

        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    if not self.renew():
                        return
                except OSError as err:
                    log.warning("could not renew the lease %s: %s", self.path, err)

        self._heartbeat = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._heartbeat.start()

    def release(self, timeout_s: float = 10.0) -> None:
        """Stop the heartbeat and delete the lease if it is still ours. The file work runs on
        a daemon thread waited on at most ``timeout_s``: a stalled mount cannot hold the
        exit (the lease then goes stale on its own)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(1.0)
            self._heartbeat = None

        def drop() -> None:
            try:
                if not self.lost and self._ours(self._read()):
                    self.path.unlink()
            except OSError as err:
                log.warning("could not release the lease %s: %s", self.path, err)

        dropping = threading.Thread(target=drop, name="lease-release", daemon=True)
        dropping.start()
        dropping.join(timeout_s)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
