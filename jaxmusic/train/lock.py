"""One run per workdir: the lock file `WORKDIR/train.lock`.

A run holds the lock while it lives. The file names the holder (host, pid, SLURM job id,
start time) and carries a heartbeat the holder refreshes every `timeout / 4` seconds. A
second run on the same workdir refuses to start (exit 2) with one line naming the holder.
A lock is stale, and the next run takes it over with a log line, when

* its heartbeat is older than `timeout` (`JAXMUSIC_LOCK_TIMEOUT`, default 90 s: a
  requeued SLURM job starts at least two minutes after the old one ended, so the lock of
  a job killed on another node is taken over at once), or
* its holder was a process on this host that no longer exists (`kill -9`, a crash, OOM).

A multi-process run locks once, on process 0; the others follow its verdict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxmusic.errors import UserError

log = logging.getLogger(__name__)
LOCK_FILE = "train.lock"
DEFAULT_TIMEOUT = 90.0


class WorkdirInUse(UserError):
    """Another run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def describe(holder: dict) -> str:
    """`host h, pid p, job j, heartbeat 3 s ago` for messages."""
    job = f", job {holder['job']}" if holder.get("job") else ""
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}, "
            f"heartbeat {time.time() - holder['heartbeat']:.0f} s ago")


class WorkdirLock:
    """The lock of one workdir, held by this process (`acquire`, `release`)."""

    def __init__(self, workdir: str | Path, timeout: float | None = None):
        self.path = Path(workdir) / LOCK_FILE
        self.timeout = float(timeout or os.environ.get("JAXMUSIC_LOCK_TIMEOUT") or DEFAULT_TIMEOUT)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                   "started": time.time(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading the file

    def holder(self) -> dict | None:
        """The lock's content; None without a lock. A file still being written (empty, partial)
        counts as held by an unknown process, with its modification time as heartbeat."""
        try:
            text = self.path.read_text()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            float(holder["heartbeat"])
            return holder
        except (ValueError, KeyError, TypeError):
            return {"heartbeat": mtime}

    def stale(self, holder: dict) -> str | None:
        """Why `holder` no longer holds the workdir, or None while it does."""
        age = time.time() - float(holder["heartbeat"])
        if age > self.timeout:
            return f"its heartbeat is {age:.0f} s old (more than {self.timeout:g} s)"
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return f"process {holder['pid']} is gone"
        return None

    # ------------------------------------------------------------------ holding it

    def acquire(self) -> "WorkdirLock":
        """Take the lock (or a stale one) and start the heartbeat; `WorkdirInUse` if held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a takeover that races another run's looks again
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="jaxmusic-workdir-lock", daemon=True)
                self._thread.start()
                return self
            holder = self.holder()
            if holder is None:
                continue  # released meanwhile
            why = self.stale(holder)
            if why is None:
                raise WorkdirInUse(f"{self.path.parent} is in use by another run ({describe(holder)}; "
                                   f"{self.path}); wait for it to end or stop it")
            if self.holder() == holder:  # not taken over by a third run meanwhile
                self.path.unlink(missing_ok=True)
                log.warning("taking over the lock of %s from a run that ended (%s): %s",
                            self.path.parent, describe(holder), why)
        raise WorkdirInUse(f"{self.path.parent}: could not take the lock {self.path} (other runs keep taking it)")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._content())
        return True

    def _content(self) -> str:
        return json.dumps(dict(self.me, heartbeat=time.time())) + "\n"

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            holder = self.holder()
            if holder is None or holder.get("token") != self.me["token"]:
                log.error("the lock %s was taken over (%s): another run may now write this workdir too",
                          self.path, describe(holder) if holder else "removed")
                return
            tmp = self.path.with_name(f"{LOCK_FILE}.{self.me['token']}")
            try:
                tmp.write_text(self._content())
                os.replace(tmp, self.path)  # atomic: readers see the old or the new heartbeat
            except OSError as e:  # a full disk must not end the run; the next beat tries again
                log.warning("could not refresh the lock %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        holder = self.holder()
        if holder and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def workdir_lock(workdir: str | Path):
    """Hold `workdir`'s lock for the block: process 0 takes it, every process learns the verdict."""
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirInUse as e:
            refused = e
    held = refused is None
    if jax.process_count() > 1:
        held = bool(multihost_utils.broadcast_one_to_all(np.int32(held)))
    if refused:
        raise refused
    if not held:
        raise WorkdirInUse(f"{workdir} is in use by another run (process 0 names it)")
    try:
        yield lock
    finally:
        if lock:
            lock.release()
