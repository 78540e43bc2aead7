"""The run folder's lock and the leases (issue 27): one process per run folder, held by that
process alone; a lease file where locks do not reach (a shared Drive, NFS without lockd).

No torch here: the holders are small subprocesses that import only ``stages.common``."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common import run as run_mod
from stages.common.lease import Lease, LeaseHeld, _machine
from stages.common.run import RunFolderBusy, RunLock

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

# A trainer reduced to what matters here: it takes the lock, then forks a child that lives
# on (a DataLoader worker, num_workers > 0), and prints the child's PID.
HOLD_AND_FORK = """
import os, sys, time
from stages.common.run import RunLock
RunLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:
    time.sleep(600)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_lock_dies_with_its_holder_not_with_its_forked_children(tmp_path):
    """Issue 27, item 3: a flock is shared with forked children, so after a SIGKILL of the
    trainer its live workers kept the run folder locked and a relaunch was refused naming
    the dead trainer's PID."""
    run_dir = tmp_path / "tiny" / "toy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_FORK, str(run_dir)],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(RunFolderBusy, match=rf"\(PID {holder.pid}\)"):
            RunLock(run_dir).acquire()  # the live holder, named
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert alive(child)  # its forked child lives on ...
        lock = RunLock(run_dir).acquire()  # ... and holds nothing: the relaunch gets in
        lock.release()
    finally:
        holder.kill()
        holder.wait()
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_second_lock_in_the_same_process_is_refused_and_the_first_stays_held(tmp_path):
    run_dir = tmp_path / "tiny" / "toy"
    first = RunLock(run_dir).acquire()
    try:
        with pytest.raises(RunFolderBusy, match="this process"):
            RunLock(run_dir).acquire()
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from stages.common.run import RunLock; RunLock(sys.argv[1]).acquire()",
                str(run_dir),
            ],
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0 and f"PID {os.getpid()}" in probe.stderr
    finally:
        first.release()
    RunLock(run_dir).acquire().release()  # free again once released


def a_dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    return int(done.stdout)


def test_where_locks_fail_the_run_folder_is_held_by_a_lease_file(tmp_path, monkeypatch, caplog):
    """Issue 27, item 2: flock failing with ENOLCK (NFS without its lock daemon) or ENOTSUP
    (some FUSE mounts) raised an uncaught OSError: no stage could start on such a folder."""

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_mod.fcntl, "lockf", no_locks)
    run_dir = tmp_path / "tiny" / "toy"
    lease_file = tmp_path / "tiny" / ".toy.lease"
    with caplog.at_level(logging.WARNING, logger="stages.common.run"):
        first = RunLock(run_dir).acquire()
    assert "refuses locks" in caplog.text and str(lease_file) in caplog.text
    try:
        assert json.loads(lease_file.read_text())["pid"] == os.getpid()
        with pytest.raises(RunFolderBusy, match=rf"in use by another process \(PID {os.getpid()} "):
            RunLock(run_dir).acquire()  # a live holder refuses a second one
    finally:
        first.release()
    assert not lease_file.exists()  # released at exit
    # A lease left by a process of this machine that is gone (kill -9) is taken over at once.
    record = {"token": "x", "host": "here", "machine": _machine(), "pid": a_dead_pid()}
    lease_file.write_text(json.dumps(record | {"renewed": time.time(), "timeout_s": 600}))
    with caplog.at_level(logging.WARNING):
        RunLock(run_dir).acquire().release()
    assert "is gone" in caplog.text


def test_a_live_lease_of_another_machine_refuses_and_a_stale_one_is_taken_over(tmp_path, caplog):
    """Issue 27, item 1: another Colab runtime's lease (another machine: its PID means
    nothing here) refuses while it is renewed, and is taken over once stale."""
    path = tmp_path / "lease.json"
    theirs = {"token": "t", "host": "colab-b", "machine": "colab-b/boot", "pid": 4242}
    path.write_text(json.dumps(theirs | {"renewed": time.time() - 5, "timeout_s": 60}))
    lease = Lease(path, 60, what="the mirrored run X", hint="stop the other runtime")
    with pytest.raises(LeaseHeld, match=r"PID 4242 on colab-b.*renewed \d+ s ago.*stop the other"):
        lease.acquire()
    path.write_text(json.dumps(theirs | {"renewed": time.time() - 61, "timeout_s": 60}))
    with caplog.at_level(logging.WARNING):
        lease.acquire()
    assert "taking over the stale lease" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    # The heartbeat renews it; once another holder has written over it, it is lost, and
    # never written back.
    before = json.loads(path.read_text())["renewed"]
    lease.start_heartbeat(every_s=0.02)
    deadline = time.monotonic() + 5
    while json.loads(path.read_text())["renewed"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert json.loads(path.read_text())["renewed"] > before
    path.write_text(json.dumps(theirs | {"renewed": time.time(), "timeout_s": 60}))
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lease.lost and not lease.renew()
    lease.release()
    assert json.loads(path.read_text())["host"] == "colab-b"  # theirs, left alone
