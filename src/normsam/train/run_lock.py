"""One writer per run folder: an exclusive lock held for the life of the process that writes it.

Two ``normsam train ... out=X`` started together, or ``normsam train --resume X`` while X still trains, would
otherwise both write X: its config from one, its metrics and checkpoint from the other. So every writer of a
folder (the runner, ``normsam sharpness``, a sweep or a study on its parent folder) first takes
:class:`RunLock` on it: ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the file ``normsam.lock`` inside the folder.
A second writer fails at once with :class:`RunLockedError`, naming the holder (pid, host, start time and
command, written into the lock file by the holder).

The operating system releases a ``flock`` when its holder exits in any way (an exception, Ctrl-C, SIGTERM,
``kill -9``, a crash), so a dead holder never blocks a resume: a lock file left by a killed holder is taken
over by the next writer, which overwrites the stale record. A holder that releases the lock (the normal
end, an exception, Ctrl-C) deletes the file first, so a finished folder holds no ``normsam.lock`` naming a
command that no longer runs. Deleting it under the lock is safe: a writer that opened the file just before
it was deleted and then obtains the lock on that deleted file sees that the path no longer leads to the file
it locked, and starts over with the file now at the path. (On network file systems without ``flock``
support the lock degrades to the local machine's processes; the holder's host name in the message shows it.)

Locks are per open file, not per process: a second :class:`RunLock` on the same folder in the same process
is refused too. A writer that already holds the folder's lock and calls another writer (the runner's
``sharpness_at_end``) passes its own work on without locking again.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from normsam.files import check_writable

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; the lock then records the holder only
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "holder_info"]

LOCK_FILE = "normsam.lock"


class RunLockedError(ValueError):
    """The folder is being written by another process (or another writer in this one)."""


def holder_info(folder: str | Path) -> dict[str, Any] | None:
    """The holder record in ``folder``'s lock file (pid, host, started, command), or None."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None


def _command() -> str | None:
    """This process's command line, ``normsam ...`` for the CLI (``python -m normsam`` too)."""
    if not sys.argv or not sys.argv[0]:
        return None
    first = "normsam" if Path(sys.argv[0]).name in ("normsam", "__main__.py") else sys.argv[0]
    return " ".join([first, *sys.argv[1:]])


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    text = f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text


def _same_file(handle: Any, path: Path) -> bool:
    """Whether ``path`` still leads to the open file ``handle`` (not deleted, not replaced)."""
    try:
        opened, current = os.fstat(handle.fileno()), os.stat(path)
    except OSError:
        return False
    return (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)


class RunLock:
    """An exclusive lock on a folder (created if needed); use as a context manager or acquire()/release().
    Keep the object while you write: dropping it (garbage collection) releases the lock.

    Args:
        folder: the run folder (or a sweep's or study's parent folder).
        what: the kind of writer, for messages ("run", "sweep", "study").
    """

    def __init__(self, folder: str | Path, *, what: str = "run"):
        self.folder = Path(folder)
        self.what = what
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> RunLock:
        if self._file is not None:
            return self
        check_writable(self.folder, what=f"{self.what} folder")
        path = self.folder / LOCK_FILE
        while True:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the life of the lock
            if fcntl is None:
                break
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise RunLockedError(self._in_use_message(holder_info(self.folder))) from None
            if _same_file(handle, path):
                break
            handle.close()  # its holder deleted it on release after we opened it: lock the file at the path now
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": _command(),
            "what": self.what,
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info))
        handle.flush()
        self._file = handle
        return self

    def _in_use_message(self, info: dict[str, Any] | None) -> str:
        what = (info or {}).get("what")
        again = {
            "sweep": "a stopped sweep resumes when you run the same `normsam sweep` command again",
            "study": "a stopped study resumes when you run the same `normsam study` command again",
            "compare": "a stopped compare resumes when you run the same `normsam compare` command again",
            "sharpness": "the measurement leaves the run as it was",
        }.get(what)
        if again is None:  # a training run: what works afterwards depends on how far it got
            from normsam.train.next_step import run_state

            again = ("a run stopped after its first epoch resumes with `normsam train --resume "
                     f"{self.folder}`" if run_state(self.folder) != "finished" else "the run there has finished")
        return (f"{self.folder} is in use by {_describe(info)}: wait for it to finish or stop it, then run again "
                f"({again}); or choose another out=.")

    def release(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            try:  # still under the lock: see the module docstring for why deleting it here is safe
                if _same_file(handle, self.folder / LOCK_FILE):
                    (self.folder / LOCK_FILE).unlink()
            except OSError:
                pass  # the folder went away, or is read-only now: the OS releases the lock all the same
            handle.close()  # closing the file releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a Trainer dropped without run(): let the folder go with it
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the modules it needs may be gone; the OS releases it
            pass
