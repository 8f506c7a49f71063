"""Claiming an output root: checked writable, then held by one run at a time.

    with claimed_output(args.output, wait=args.wait_for_lock):   # JobError: not writable, or in use
        ...the job...

The lock is `OUT/.pulsepipe.lock`, a small JSON file naming its holder (host, pid, start time, command)
that the refusal quotes. It is created only if absent: on local disks with O_EXCL, on GCS with gcsfs's
`mode="create"` upload (ifGenerationMatch=0, so two creators cannot both win), on memory:// with its
exclusive open; other stores get fsspec's check-then-write, which two runs starting in the same instant
can both pass. The holder refreshes a heartbeat in it every HEARTBEAT_S while it runs.

A lock left by a run that died is cleared by the next run: on the same host when its pid no longer runs
(or runs another program: the start time in /proc differs); from another host, where no pid can be
checked, when its heartbeat is older than STALE_S. A driver paused for longer than that (suspended
laptop) can lose its lock to another host; it cannot lose it to one on its own host.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid

import fsspec

from pipelines.errors import JobError
from transforms.shards import is_local

LOCK_NAME = ".pulsepipe.lock"  # a leading dot keeps dataset readers off it
HEARTBEAT_S = 30.0
STALE_S = 600.0  # twenty heartbeats missed: the holder on another host is taken as dead
WAIT_POLL_S = 5.0


def add_lock_argument(p) -> None:
    p.add_argument("--wait-for-lock", action="store_true",
                   help="if another run holds the output, wait for it to finish (default: refuse at once)")


@contextlib.contextmanager
def claimed_output(output_uri: str, wait: bool = False, log=print):
    """The output root checked writable (`check_output`) and locked for the block (`OutputLock`)."""
    check_output(output_uri)
    with OutputLock(output_uri, wait=wait, log=log):
        yield


def check_output(output_uri: str) -> None:
    """JobError unless output_uri is a folder this process can write, made if missing: tried by writing
    and removing a probe file, as permissions alone do not say (read-only mounts, object-store roles)."""
    fs, root = fsspec.core.url_to_fs(output_uri)
    if fs.isfile(root):
        raise JobError(f"{output_uri}: is a file; the output must be a folder")
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as e:
        raise JobError(f"{output_uri}: cannot create the output folder: {_why(e)}") from None
    probe = f"{root.rstrip('/')}/.pulsepipe-probe-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except OSError as e:
        raise JobError(f"{output_uri}: cannot write to the output folder: {_why(e)}") from None


class OutputLock:
    """One run per output root (see the module's docstring): a context manager; JobError when another
    live run holds it and wait is False."""

    def __init__(self, output_uri: str, wait: bool = False, log=print, poll_s: float | None = None):
        self.output_uri, self.wait, self.log = output_uri, wait, log
        self.poll_s = WAIT_POLL_S if poll_s is None else poll_s
        self.fs, root = fsspec.core.url_to_fs(output_uri)
        self.path = f"{root.rstrip('/')}/{LOCK_NAME}"
        self.uri = f"{output_uri.rstrip('/')}/{LOCK_NAME}"  # as the user wrote the output, for messages
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "command": shlex.join(sys.argv)[:300], "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._beat = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        self._beat = threading.Thread(target=self._heartbeat, name="output-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        self.release()

    def acquire(self) -> None:
        """Create the lock, clearing a dead holder's; refuse (JobError) or wait while a live one holds it."""
        said = False
        while True:
            try:
                _create(self.fs, self.path, self._text())
                return
            except FileExistsError:
                pass
            except OSError as e:
                raise JobError(f"{self.output_uri}: cannot create the lock {self.uri}: {_why(e)}") from None
            seen = _read(self.fs, self.path)
            if seen is None:  # released meanwhile: try again
                continue
            text, other = seen
            if _is_stale(other):
                self.log(f"clearing the lock of a run that is gone ({describe(other)})")
                _remove_if_unchanged(self.fs, self.path, text)
                continue
            if not self.wait:
                raise JobError(f"{self.output_uri}: in use by another run ({describe(other)}); wait for it with "
                               f"--wait-for-lock, or remove {self.uri} if that run is known to be gone")
            if not said:
                self.log(f"waiting for the output, held by {describe(other)}")
                said = True
            time.sleep(self.poll_s)

    def release(self) -> None:
        seen = _read(self.fs, self.path)
        if seen is not None and seen[1].get("token") == self.holder["token"]:  # never another run's lock
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)

    def _text(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": time.time()}, sort_keys=True).encode()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            seen = _read(self.fs, self.path)
            if seen is None or seen[1].get("token") != self.holder["token"]:
                self.log(f"warning: the lock {self.uri} is no longer this run's")
                return
            with contextlib.suppress(OSError):  # a missed beat is harmless; STALE_S allows many
                _replace(self.fs, self.path, self._text())


def describe(holder: dict) -> str:
    """The holder as the refusal names it: pid, host, start time and command."""
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


def _is_stale(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _runs(holder["pid"], holder.get("pid_start"))
    return time.time() - float(holder.get("heartbeat") or 0) > STALE_S


def _runs(pid: int, start: str | None) -> bool:
    """Whether pid runs on this host and is the process that took the lock (not a later one given its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _create(fs, path: str, data: bytes) -> None:
    """Write path only if absent; FileExistsError if it exists (see the module's docstring for which
    stores make this atomic)."""
    if is_local(fs):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        fs.pipe_file(path, data, mode="create")


def _replace(fs, path: str, data: bytes) -> None:
    """Overwrite path whole: readers see the old content or the new, never a part."""
    if is_local(fs):
        tmp = f"{path}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # an object is replaced whole


def _read(fs, path: str) -> tuple[bytes, dict] | None:
    """The lock's bytes and holder, or None if there is no lock. A lock being written (still empty) or
    damaged reads as a holder known only by the file's age."""
    try:
        with fs.open(path, "rb") as f:
            text = f.read()
        info = fs.info(path)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        if isinstance(holder, dict):
            return text, holder
    except ValueError:
        pass
    return text, {"heartbeat": _mtime(info), "command": f"unreadable lock file, {len(text)} bytes"}


def _mtime(info: dict) -> float:
    """The file's modification time, epoch seconds, from what the store's info gives (a number, a
    datetime or ISO text); now where it gives none, so a lock of unknown age is never taken as stale."""
    t = next((info[k] for k in ("mtime", "updated", "LastModified", "created") if info.get(k) is not None), None)
    if hasattr(t, "timestamp"):
        return t.timestamp()
    try:
        return float(t)
    except (TypeError, ValueError):
        with contextlib.suppress(TypeError, ValueError):
            return datetime.datetime.fromisoformat(str(t).replace("Z", "+00:00")).timestamp()
    return time.time()


def _remove_if_unchanged(fs, path: str, seen: bytes) -> None:
    """Remove the stale lock read as `seen`, but not one that another run put there meanwhile."""
    if not is_local(fs):  # no conditional delete that fsspec offers: check, then remove
        current = _read(fs, path)
        if current is not None and current[0] == seen:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
        return
    aside = f"{path}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)  # atomic: of two runs clearing it, one gets the file
    except FileNotFoundError:
        return
    with open(aside, "rb") as f:
        taken = f.read()
    if taken != seen:  # a live lock, made after we read the stale one: put it back unless replaced
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.remove(aside)


def _why(e: OSError) -> str:
    return e.strerror or " ".join(str(e).split()) or type(e).__name__
