"""One training run per workdir: a lock file naming the holder's host and pid.

`WORKDIR/train.lock` holds `{"host", "pid", "started"}` and is `flock`ed by its holder for the whole run, so a
second run on the same workdir refuses with one line naming the holder instead of silently replacing the first
run's checkpoints and metrics. The file is removed on a clean exit.

Stale locks: a lock file whose flock is free was left by a run that died without cleaning up (SIGKILL, OOM). It is
taken over when it names this host and its pid is dead (or is our own pid). A lock naming another host is never
taken over: its process cannot be checked from here, so the message says to delete the file if that run is gone.

Multi-process jobs: only process 0 takes the lock (the loop shares the outcome with the other processes), because
they all write into one shared workdir.

NFS: Linux carries `flock` over NFS as POSIX locks, so holders on different hosts exclude each other where the
mount supports locking; where it does not (`nolock`), the host check above still refuses a live lock of another
host, and only two runs starting within the same few milliseconds on different hosts could both proceed.
Object-store workdirs (`gs://...`) have no file locks and are not locked (a warning says so).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket

from ring_jax.errors import RingJaxError

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class WorkdirLockedError(RingJaxError):
    """Another run holds the workdir; the message names its host and pid and the lock file."""


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')!r} pid {holder.get('pid')} (started {holder.get('started', '?')})"


class WorkdirLock:
    """Context manager: holds `workdir/train.lock` while active; raises WorkdirLockedError if another run holds it."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None
        self._created_workdir = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if "://" in self.workdir:  # object stores have no file locks
            log.warning("workdir lock: %s is not a local path; it is not locked", self.workdir)
            return
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir, exist_ok=True)
            self._created_workdir = True
        try:
            self._fd = self._lock_file()
        except BaseException:
            self._remove_created_workdir()
            raise

    def _lock_file(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._try_flock(fd)
                if locked and not self._is_current_file(fd):
                    continue  # the previous holder removed the file between our open and our flock: start over
                holder = self._read(fd)
                if not locked or (holder and not self._is_stale(holder)):
                    raise WorkdirLockedError(self._refusal(holder, flock_held=not locked))
                if holder:
                    log.warning(
                        "workdir lock: taking over the stale lock of %s (that process is gone)", _describe(holder)
                    )
                self._write_record(fd)
                return fd
            except BaseException:
                os.close(fd)
                raise

    def _try_flock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):  # a filesystem without locks: the host/pid check only
                log.warning(
                    "workdir lock: %s does not support file locks (%s); relying on the recorded pid",
                    self.workdir,
                    e.strerror,
                )
                return True
            raise
        return True

    def _is_current_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(fd: int) -> dict:
        """The holder record, or {} for an empty or unreadable file (a holder killed while writing it)."""
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
        try:
            holder = json.loads(data)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return False
        return pid == os.getpid() or not _pid_is_alive(pid)

    def _refusal(self, holder: dict, *, flock_held: bool) -> str:
        prefix = f"workdir {self.workdir} is in use by another training run: "
        if not holder:
            return prefix + f"{self.path} is locked"
        if flock_held:
            return prefix + _describe(holder)
        if holder.get("host") != socket.gethostname():
            why = "on another host, so that process cannot be checked from here"
        else:
            why = "its lock is free but that pid is alive"
        return prefix + f"{_describe(holder)} ({why}; if that run is gone, delete {self.path})"

    @staticmethod
    def _write_record(fd: int) -> None:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):  # unlinked while still flocked: a racing opener retries
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        self._remove_created_workdir()

    def _remove_created_workdir(self) -> None:
        if self._created_workdir:
            with contextlib.suppress(OSError):  # only if nothing else was written there
                os.rmdir(self.workdir)
            self._created_workdir = False
