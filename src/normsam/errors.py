"""Ordinary faults as one line: what the ``normsam`` command line prints instead of a traceback.

:func:`fault_message` turns the errors a user can cause or meet without a bug in normsam into one line that
names the file and the fix, with an exit status:

* ``ValueError`` / ``FileNotFoundError`` (bad input: a typo, a missing file, a run folder in use, a malformed
  YAML file; their messages already say how to fix them): exit status 2;
* ``OSError`` of the environment (a full disk, no permission, a read-only file system, a path that is a file):
  the file it was about, the reason, and a hint; exit status 2. Every run-folder write is atomic, so after a
  full disk the run goes on from where it was; the message says how for the run folder the file was in, in
  its state (:func:`normsam.train.next_step.next_step`: ``--resume`` only where a checkpoint exists);
* :class:`normsam.train.divergence.RunDiverged` (the loss became non-finite): exit status 3.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os

__all__ = ["fault_message", "EXIT_BAD_INPUT", "EXIT_DIVERGED"]

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3

_HINTS = {
    errno.ENOSPC: "free disk space (or choose another out=)",
    errno.EDQUOT: "free space within your disk quota (or choose another out=)",
    errno.EACCES: "make it writable (or choose another out=)",
    errno.EPERM: "make it writable (or choose another out=)",
    errno.EROFS: "the file system is read-only; choose another out=",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; pass a file",
    errno.EEXIST: "it exists already; choose another path",
}

_RESUME_NOTE = ("; a run with a checkpoint (one finished epoch) resumes exactly with `normsam train --resume "
                "RUN_DIR`, one without starts again with the same command")


def _full_disk_note(filename: str | None) -> str:
    """How the run whose file could not be written goes on, for the state its folder is in."""
    from normsam.train.next_step import find_run_folder, next_step

    run_dir = find_run_folder(filename)
    return _RESUME_NOTE if run_dir is None else f"; {next_step(run_dir)}"


def fault_message(err: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit status) for an ordinary fault, or None for a bug (keep the traceback)."""
    from normsam.train.divergence import RunDiverged

    if isinstance(err, RunDiverged):
        return str(err), EXIT_DIVERGED
    if isinstance(err, (ValueError, FileNotFoundError)):
        return str(err), EXIT_BAD_INPUT
    if isinstance(err, OSError) and err.errno in _HINTS:
        where = f" ({err.filename})" if err.filename else ""
        reason = err.strerror or os.strerror(err.errno)
        note = _full_disk_note(err.filename) if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return f"{reason}{where}: {_HINTS[err.errno]}{note}.", EXIT_BAD_INPUT
    return None
