"""Small helpers shared across phi3fast: atomic file and directory writes, fsync."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from phi3fast.errors import Phi3FastError


def fsync(path: Path) -> None:
    """Flush a file's (or a directory entry's) data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """write(tmp) fills a temporary file next to `path`, which then replaces `path` in one rename (mode 0644)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_new_dir(out: Path) -> None:
    """`out` must not exist, or be an empty directory (an output directory is never merged into)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Phi3FastError(f"{out}: already exists and is not an empty directory")


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it becomes `out` in one rename, on failure it is
    removed. `out` must be absent or empty (check_new_dir)."""
    check_new_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
