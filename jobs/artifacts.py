"""Atomic file writes, sha256, write-once folders (RELIABILITY.md 5, 20).

Every file a job produces goes through ``atomic_path``: written to a hidden temp name in the
destination directory, validated by the caller's check, fsynced, then ``os.replace``d into
place. A SIGKILL mid-write leaves the old file or none at the final name; stale temp files
(``.tmp-*``) are removed by ``sweep_temp`` on the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from jobs.errors import InputError

TEMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_path_for(final: Path) -> Path:
    """A unique temp name in the same directory (so the rename is atomic on one filesystem)."""
    return final.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{final.name}")


@contextlib.contextmanager
def atomic_path(
    final: str | Path, *, check: Callable[[Path], None] | None = None, overwrite: bool = True
) -> Iterator[Path]:
    """Yield a temp path to write; on success validate, fsync and rename it to ``final``.

    On any exception (including KeyboardInterrupt/SystemExit) the temp file is removed and
    ``final`` is untouched. ``check`` raises if the written file is not valid.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        if not tmp.exists():
            raise InputError(f"nothing was written for {final}")
        if check is not None:
            check(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, final)
        else:
            # link() fails if final exists, atomically: of two writers racing for a write-once
            # name exactly one wins (an exists() check before replace() would let both in).
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise InputError(f"{final} already exists and is write-once") from None
            except OSError:  # a filesystem without hard links: the best we can do
                if final.exists():
                    raise InputError(f"{final} already exists and is write-once") from None
                os.replace(tmp, final)
            else:
                tmp.unlink()
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: str | Path, data: bytes, **kw) -> Path:
    with atomic_path(final, **kw) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | Path, text: str, **kw) -> Path:
    return atomic_write_bytes(final, text.encode("utf-8"), **kw)


def sweep_temp(directory: str | Path, *, older_than_s: float = 0.0, recursive: bool = True) -> int:
    """Remove leftover temp files (from a killed writer). Returns how many were removed."""
    directory = Path(directory)
    if not directory.exists():
        return 0
    now = time.time()
    pattern = f"**/{TEMP_PREFIX}*" if recursive else f"{TEMP_PREFIX}*"
    removed = 0
    for p in directory.glob(pattern):
        try:
            if p.is_file() and now - p.stat().st_mtime >= older_than_s:
                p.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def write_once(final: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``final`` unless it exists with the same bytes; different bytes refuse."""
    final = Path(final)
    if final.exists():
        if sha256_file(final) == sha256_bytes(data):
            return final
        raise InputError(f"{final} already exists with different content; versions are immutable")
    try:
        return atomic_write_bytes(final, data, overwrite=False)
    except InputError:
        # another writer got there first: fine if it wrote the same bytes
        if final.exists() and sha256_file(final) == sha256_bytes(data):
            return final
        raise InputError(
            f"{final} already exists with different content; versions are immutable"
        ) from None


def verify_sha256(path: str | Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise InputError(
            f"{path}: sha256 {actual} does not match the recorded {expected}; refusing to load"
        )
