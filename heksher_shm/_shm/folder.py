"""Where segments live: the private per-user folder, chosen and checked."""

from __future__ import annotations

import errno
import os
import pathlib
import stat
import tempfile

from heksher_shm._shm import files
from heksher_shm._shm.identity import pid_namespace
from heksher_shm.exceptions import SegmentError

__all__ = ["ENV_SHM_DIR", "default_shm_dirs", "resolve_shm_dir", "shm_dir_path"]

ENV_SHM_DIR = "HEKSHER_SHM_DIR"
"""Environment variable naming the directory for segments and helper files."""


_DEV_SHM = "/dev/shm"

_ENV_RUNTIME_DIR = "XDG_RUNTIME_DIR"
"""The user's private runtime folder (``/run/user/<uid>``, made by the login manager): where nobody
else can create our folder's name first, unlike the world-writable ``/dev/shm``."""


_DIR_PREFIX = "heksher_shm-"


def shm_dir_path(shm_dir: str | os.PathLike[str] | None = None) -> tuple[pathlib.Path, bool]:
    """Where the segment directory is, and whether it was given explicitly; checks and creates nothing.

    ``shm_dir`` if given, else the ``HEKSHER_SHM_DIR`` environment variable
    (either exactly as given), else ``$XDG_RUNTIME_DIR/heksher_shm-<euid>-<pidns>``
    when that variable names a private folder of this user's, else
    ``/dev/shm/heksher_shm-<euid>-<pidns>`` when ``/dev/shm`` is a directory,
    else ``<tempdir>/heksher_shm-<euid>-<pidns>`` (see :func:`default_shm_dirs`).
    ``<pidns>`` is the PID namespace (:func:`~heksher_shm._shm.identity.pid_namespace`):
    containers that share ``/dev/shm`` but not their PIDs get a folder
    each by default, as they cannot tell each other's processes apart. It is
    left out (``heksher_shm-<euid>``) where the namespace cannot be read.
    """
    if shm_dir is None:
        shm_dir = os.environ.get(ENV_SHM_DIR) or None
    if shm_dir is not None:
        return pathlib.Path(os.path.abspath(os.fspath(shm_dir))), True
    return default_shm_dirs()[0], False


def default_shm_dirs() -> list[pathlib.Path]:
    """The default folders, most preferred first: in ``$XDG_RUNTIME_DIR`` when it is set and private to
    this user (no other user can create our folder there first), then under ``/dev/shm`` (or the temp
    dir). The ``heksher-shm`` commands look in each; a client uses the first."""
    namespace = pid_namespace()
    suffix = f"-{namespace}" if namespace else ""
    name = f"{_DIR_PREFIX}{os.geteuid()}{suffix}"
    shared = pathlib.Path(_DEV_SHM if os.path.isdir(_DEV_SHM) else tempfile.gettempdir()) / name
    runtime = _private_runtime_dir()
    return [shared] if runtime is None else [runtime / name, shared]


def _private_runtime_dir() -> pathlib.Path | None:
    """``$XDG_RUNTIME_DIR`` if it is an absolute path to a real folder of this user's that only this
    user may enter (as the login manager makes it), else None."""
    value = os.environ.get(_ENV_RUNTIME_DIR)
    if not value or not os.path.isabs(value):
        return None
    try:
        st = os.lstat(value)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        return None
    return pathlib.Path(value)


def resolve_shm_dir(shm_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The private directory for segments and helper files, created 0700 if missing.

    Choice: ``shm_dir`` if given, else the ``HEKSHER_SHM_DIR`` environment
    variable, else ``/dev/shm/heksher_shm-<euid>-<pidns>`` when ``/dev/shm``
    is a directory, else ``<tempdir>/heksher_shm-<euid>-<pidns>`` (see
    :func:`shm_dir_path`). Raises
    :class:`SegmentError` (naming the path and the reason) when it is a
    symlink, not a directory, or owned by another user. A default directory of
    ours with group/other bits is tightened to 0700; an explicit one is refused
    if group or others may write to it.
    """
    path, explicit = shm_dir_path(shm_dir)
    if explicit:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SegmentError(f"segment directory {path}: cannot create its parent: {exc.strerror}") from exc
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass  # created by us earlier or by a concurrent process; checked below either way
    except OSError as exc:
        raise SegmentError(f"segment directory {path}: cannot create it: {exc.strerror}") from exc
    try:
        # O_NOFOLLOW + O_DIRECTORY: the checks and the chmod apply to the directory itself,
        # never to what a symlink planted under this name points to.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            reason = "is a symbolic link; refusing to follow it"
        elif exc.errno == errno.ENOTDIR:
            reason = "is not a directory"
        else:
            reason = f"cannot open it: {exc.strerror}"
        raise SegmentError(f"segment directory {path}: {reason}") from exc
    try:
        problem, tighten = files.directory_problem(os.fstat(fd), ours=not explicit)
        if problem is not None and not created:
            raise SegmentError(f"segment directory {path}: {problem}")
        if created or tighten:
            # Ours and meant to be private: the umask may have widened or narrowed it.
            os.fchmod(fd, 0o700)
    except OSError as exc:
        raise SegmentError(f"segment directory {path}: cannot check or set its mode: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return path
