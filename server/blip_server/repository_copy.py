"""Put a model repository in place so that a reader never sees half of one, and do nothing when it is already there.

`blip-export` builds a repository beside its destination and moves it into place with `replace_directory`. The
Kubernetes init container copies the repository that a model image carries into its pod's volume with `install`:

    python3 repository_copy.py /opt/model/repository /models/repository

Both are idempotent: a destination that already holds the same export (same manifest) is kept as it is, so an init
container run again after a pod sandbox restart, or an export service run twice, succeeds at once. Another export
is replaced in one step where the kernel can exchange two directories (Linux `renameat2(RENAME_EXCHANGE)`), else
by two renames. Standard library only: the model image runs it with nothing else installed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path

MANIFEST = "blip_export.json"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class RepositoryCopyError(Exception):
    """The destination cannot take the repository (it holds something else, or cannot be written)."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the C library or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def replace_directory(new: Path, target: Path) -> None:
    """Move the directory `new` to `target` (same file system), replacing what is there; `new` is gone after."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):  # `new` now holds the old repository
        shutil.rmtree(new)
        return
    aside = target.parent / f".{target.name}.old"
    shutil.rmtree(aside, ignore_errors=True)
    target.rename(aside)
    new.rename(target)
    shutil.rmtree(aside)


def manifest(directory: Path) -> bytes | None:
    """The export's manifest as written, or None where `directory` holds no export."""
    try:
        return (directory / MANIFEST).read_bytes()
    except OSError:
        return None


def check_replaceable(target: Path) -> None:
    """Refuse to replace a directory that holds files but no export: it is somebody else's."""
    if target.is_dir() and any(target.iterdir()) and manifest(target) is None:
        raise RepositoryCopyError(f"{target} exists, holds files and no {MANIFEST}: it is not a model repository "
                                  "this project wrote, so it is left alone; give an empty or new directory")


def install(source: Path, target: Path) -> bool:
    """Copy the repository `source` to `target`; returns False when `target` already held the same export."""
    wanted = manifest(source)
    if wanted is None:
        raise RepositoryCopyError(f"{source} holds no {MANIFEST}: not an exported model repository")
    if manifest(target) == wanted:
        return False
    check_replaceable(target)
    partial = target.parent / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(source, partial, symlinks=True)
        replace_directory(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: repository_copy.py SOURCE TARGET", file=sys.stderr)
        return 2
    source, target = Path(args[0]), Path(args[1])
    try:
        copied = install(source, target)
    except (RepositoryCopyError, OSError) as exc:
        print(f"repository_copy: error: {exc}", file=sys.stderr)
        return 1
    print(f"{target}: {'installed from' if copied else 'already holds the export of'} {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
