"""Files as rectiflux writes and fingerprints them: atomically (whole or not at all), hashed in chunks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HASH_CHUNK = 8 << 20


class FileExists(FileExistsError):
    """`path` was created by someone else while we were writing it (and `overwrite` was not given)."""


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it becomes `path` whole, else it is removed.

    The file is flushed to disk before the rename and gets the mode a plain open() would give (mkstemp makes it
    private). Without `overwrite` the final step is a hard link, which fails with FileExists if the name was taken
    meanwhile (by another run started after our check), so an existing file is never replaced even in a race.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExists(f"{path} appeared while it was being written; not replaced") from None
        except OSError:  # a filesystem without hard links: check, then rename
            if path.exists():
                raise FileExists(f"{path} appeared while it was being written; not replaced") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()
