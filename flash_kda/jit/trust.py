"""Which cache directories may be loaded from, and the private per-user fallback directory.

A cubin is code this process will run, so the loader applies the rule ssh applies to its keys:
every directory from the cache root down to the entry, and the entry's files, must be owned by
the current user or root and must not be writable by group or others. Anything else (a shared
1777 cache, a directory another user created) is not loaded from; ``FLASH_KDA_CACHE_TRUST=any``
opts out for deployments that manage that risk themselves.

The fallback for an unwritable cache is ``$TMPDIR/flash_kda-cache-<uid>``, but only while it is a
real directory owned by this user with no access for group or others (checked on every use); if
someone else made it first, or loosened it, a fresh ``mkdtemp`` directory is used instead.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from ..logs import operator_warning

TRUST_ENV = "FLASH_KDA_CACHE_TRUST"
RULE = ("a cache directory and its entries must be owned by you or root and not writable by group or others "
        f"(set {TRUST_ENV}=any to trust it anyway)")


def trust_everything() -> bool:
    """FLASH_KDA_CACHE_TRUST: ``any`` turns the ownership/permission rule off; unset or ``owner`` keeps it."""
    value = os.environ.get(TRUST_ENV, "").strip().lower()
    if value in ("", "owner"):
        return False
    if value == "any":
        return True
    operator_warning(f"flash_kda: {TRUST_ENV}={value!r} is not 'owner' or 'any'; keeping the default 'owner'",
                     key=(TRUST_ENV, value))
    return False


def _problem_with(st: os.stat_result, path: Path) -> str | None:
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {uid}) or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def untrusted_reason(root: Path, entry_files: tuple[Path, ...] = ()) -> str | None:
    """Why the entries ``entry_files`` under ``root`` must not be loaded, or None when they may.

    Checks ``root`` (following a symlink there: a cache may live behind one), every directory
    between it and the files, and the files themselves (which must not be symlinks)."""
    if not hasattr(os, "getuid"):  # no POSIX ownership to check
        return None
    try:
        problem = _problem_with(os.stat(root), root)
        if problem or not entry_files:
            return problem
        checked = {root}
        for file in entry_files:
            for directory in reversed(file.parents):
                if directory in checked or not directory.is_relative_to(root) or directory == root:
                    continue
                st = os.lstat(directory)
                if stat.S_ISLNK(st.st_mode):
                    return f"{directory} is a symbolic link"
                problem = _problem_with(st, directory)
                if problem:
                    return problem
                checked.add(directory)
            st = os.lstat(file)
            if not stat.S_ISREG(st.st_mode):
                return f"{file} is not a regular file"
            problem = _problem_with(st, file)
            if problem:
                return problem
    except FileNotFoundError:
        return None  # nothing there to load; the caller finds it missing
    except OSError as exc:
        return f"cannot inspect {exc.filename}: {exc.strerror}"
    return None


def private_problem(path: Path) -> str | None:
    """Why ``path`` is not a private directory of this user (None when it is, or does not exist)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & 0o077:
        return f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}, expected 0700)"
    return None


def default_private_dir() -> Path:
    """The predictable fallback location (may not exist, may not be usable: see ``private_problem``)."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"flash_kda-cache-{uid}"


def make_private_dir() -> Path:
    """A directory only this user can use: the predictable one when it is (or can be made) private,
    else a fresh unpredictable ``mkdtemp`` directory, with a warning."""
    path = default_private_dir()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    problem = private_problem(path)
    if problem is None and path.is_dir():
        return path
    fresh = Path(tempfile.mkdtemp(prefix=f"{path.name}-"))
    operator_warning(f"flash_kda: not using the fallback cache directory {path}: {problem}; someone else may "
                     f"control it. Using the fresh private directory {fresh} instead.", key=("private", str(path)))
    return fresh
