"""duet's on-disk cache: where things derived from a model file or the CPU are kept.

Entries are keyed by what they were derived from (a file's path, size and mtime, plus a
format number or the digest of the code that derived them), and written atomically: several
processes of one server build the same entry at once, and a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType


def cache_dir() -> Path:
    """duet's cache root: $DUET_CACHE_DIR, else ~/.cache/duet."""
    return Path(os.environ.get("DUET_CACHE_DIR") or Path.home() / ".cache" / "duet")


def file_key(path: Path, kind: str, version: object) -> str:
    """A name for what was derived from `path` as `kind` (format `version`)."""
    stat = path.stat()
    key = f"{kind}:{version}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def code_version(*modules: ModuleType) -> str:
    """A digest of the modules' source: an entry derived by code that has since changed gets
    a new key, so no stale one outlives an edit."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()[:16]


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A private path to write `target` through: renamed into place when the block ends,
    removed if it raises, so a reader sees all of an entry or none of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(target: Path, data: bytes) -> None:
    """Write `data` to `target` through `atomic_file`."""
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)
