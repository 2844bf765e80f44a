"""Where the commands write: output paths checked before the work, I/O failures as one-line messages, and the
lock that keeps two processes out of one run directory.

Every command that writes (``train``/``sweep --out``, ``evaluate --output``, ``report --out``,
``densities --plot``) checks its output with :func:`check_output_dir` or :func:`check_output_file` before it
starts: a read-only file system, a path through a regular file or a missing permission is then reported in
one line at once, instead of a traceback after hours of training (or after the evaluation, whose result was
lost). The check creates nothing unless asked (``create=True``): it probes the nearest existing folder of the
path with a temporary file, so a command refused later for another reason leaves no empty folder behind.
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["OutputPathError", "DiskFullError", "check_output_dir", "check_output_file", "disk_full_cause",
           "RunLock", "RunLockedError", "LOCK_FILE"]

#: errno values that mean "the device cannot take more data": full, or the user's quota is used up.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class OutputPathError(ValueError):
    """An output path the command cannot write; the command-line tools print it as a one-line error (status 2)."""


class DiskFullError(OSError):
    """No space left on the device while saving ``path``; files saved before are intact (saves are atomic)."""

    def __init__(self, message: str, path):
        super().__init__(errno.ENOSPC, message, str(path))

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror


def disk_full_cause(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError behind ``exc`` (itself, or in its chain), else None.

    torch.save does not pass the OSError of a failed write on: its zip writer raises a RuntimeError
    ("unexpected pos ...") while the OSError is being handled, so the OSError is the RuntimeError's context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno in _NO_SPACE:
        return "no space left on device"
    return exc.strerror or type(exc).__name__


def _first_existing(path: Path) -> Path:
    """The path itself if it exists, else its nearest existing ancestor (a relative path ends at '.')."""
    p = path
    while not os.path.lexists(p):
        parent = p.parent
        if parent == p:
            break
        p = parent
    return p


def _probe(folder: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the only test that sees read-only mounts, ACLs and
    full inode tables alike (os.access answers for the permission bits only, and always yes to root)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".sparsestart-write-test.", dir=folder)
    except OSError as exc:
        raise OutputPathError(f"{what}: cannot write into {folder} ({_reason(exc)})") from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass


def check_output_dir(path, option: str = "--out", *, create: bool = False) -> Path:
    """Check that the folder ``path`` can be created (with its parents) and written into; :class:`OutputPathError`
    naming ``option``, the path and the reason otherwise. ``create=True`` also creates it."""
    path = Path(path).expanduser()
    return _check_dir(path, f"{option} {path}", create)


def _check_dir(path: Path, what: str, create: bool) -> Path:
    base = _first_existing(path)
    if base == path:
        if not path.is_dir():
            raise OutputPathError(f"{what}: {path} exists and is not a directory; give a directory (new or existing)")
    elif not base.is_dir():
        raise OutputPathError(f"{what}: {base} is a file, not a directory, so no directory can be created under it")
    _probe(base, what)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"{what}: cannot create the directory ({_reason(exc)})") from None
    return path


def check_output_file(path, option: str, *, create_parent: bool = False) -> Path:
    """Check that the file ``path`` can be written (its folder created as needed, an existing file replaced);
    :class:`OutputPathError` naming ``option``, the path and the reason otherwise. ``create_parent=True`` also
    creates its folder (for writers that do not, such as matplotlib's savefig)."""
    path = Path(path).expanduser()
    what = f"{option} {path}"
    if path.is_dir():
        raise OutputPathError(f"{what}: is a directory; give a file name")
    if os.path.lexists(path) and not path.is_file():
        raise OutputPathError(f"{what}: exists and is not a regular file")
    _check_dir(path.parent, what, create_parent)
    return path


# ---------------------------------------------------------------------------------------------- run lock
LOCK_FILE = ".sparsestart.lock"


class RunLockedError(RuntimeError):
    """Another process holds the lock of the run directory."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``DIR/.sparsestart.lock`` while a process writes the run directory ``DIR``.

    flock, not a pid file: the kernel drops the lock when the holder exits, however it dies (kill -9 included),
    so a stale lock never blocks a resume. The holder writes its pid into the file so that a refused process
    can name it, and removes the file when it releases the lock (a finished run directory holds only the run's
    files). A process that locked a file which was removed meanwhile sees that the path no longer leads to its
    file and tries again, so two processes never both believe they hold the lock. Where flock is not supported
    (some network file systems) the run goes on unlocked.
    """

    def __init__(self, directory):
        self.path = Path(directory) / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, what: str) -> None:
        """Take the lock (a no-op when held); :class:`RunLockedError` naming ``what`` and the holder's pid if another
        process has it."""
        if self._fd is not None:
            return
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)  # ENOLCK, EOPNOTSUPP: no locking on this file system
                    return
                try:
                    holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                except OSError:
                    holder = "unknown"
                os.close(fd)
                raise RunLockedError(f"{what}: another process (pid {holder}) is writing this run directory right "
                                     f"now (it holds {self.path}); wait for it to finish or stop it, then try "
                                     f"again") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file while releasing it: lock the current one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError:
            pass  # a full disk: the lock holds all the same, only the pid is not shown to others
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.unlink(self.path)  # while still locked: see the class docstring
        except OSError:
            pass
        os.close(fd)  # closing the only descriptor of the open file drops the flock

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass
