"""Atomic file writes, sha256, write-once folders (docs/faults.md 5, 20).

Every file a job produces goes through ``atomic_path``: written to a hidden temp name in the
destination directory, validated by the caller's check, fsynced, then ``os.replace``d into
place. A SIGKILL mid-write leaves the old file or none at the final name; stale temp files
(``.tmp-*``) are removed by ``sweep_temp`` on the next start.

Temp names carry their owner (docs/faults.md 29): ``.tmp-h<tag>-p<pid>-<random>-<name>``, where
``tag`` names the place a pid means something (this machine's boot and PID namespace, and its
host name: a pod in a Kubernetes Job usually runs as pid 1, so a pid alone says nothing on a
volume two pods share). A sweep removes a temp file only if this process wrote it, or its
writer's pid is dead in this same place; a file of another host (or an unowned legacy name) only
once it is older than a generous age. So a sibling shard or a training run writing into the same
directory never loses its in-flight file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jobs.errors import InputError

TEMP_PREFIX = ".tmp-"
# A temp file of an unknown owner (another host, a name from before owners were recorded) is
# removed once it is this old: every writer here touches its file at least every few minutes
# (a download has a total timeout; a Parquet or checkpoint write takes minutes at most).
FOREIGN_TEMP_AGE_S = 3600.0
_OWNED = re.compile(rf"^{re.escape(TEMP_PREFIX)}h([0-9a-f]{{10}})-p(\d+)-[0-9a-f]+-")
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


@functools.cache
def owner_tag() -> str:
    """Where a pid is meaningful: host name, kernel boot and PID namespace, hashed to 10 hex.

    Two pods (each its own pid 1) or a machine after a reboot get different tags, so a sweep
    never judges their files by a pid that is not theirs.
    """
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def temp_name(name: str) -> str:
    """``.tmp-h<owner tag>-p<pid>-<random>-<name>``: unique, and says who is writing it."""
    return f"{TEMP_PREFIX}h{owner_tag()}-p{os.getpid()}-{secrets.token_hex(6)}-{name}"


def temp_path_for(final: Path) -> Path:
    """A unique, owned temp name in the same directory (so the rename is atomic on one
    filesystem)."""
    return final.with_name(temp_name(final.name))


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


def _boot_time() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


def pid_wrote_it(pid: int, mtime: float) -> bool:
    """Is the process ``pid`` (in this PID namespace) alive and old enough to have written a
    file last modified at ``mtime``? A zombie is dead; a pid whose process started after the
    file was last written was reused by another program, so the writer is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except OverflowError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    fields = stat.rpartition(")")[2].split()
    if not fields or fields[0] in ("Z", "X"):
        return False
    boot = _boot_time()
    if boot is not None and len(fields) > 19:
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        if started > mtime + 2.0:  # btime has whole seconds
            return False
    return True


def temp_is_stale(path: Path, *, foreign_age_s: float, now: float | None = None) -> bool:
    """Whether a sweep may remove the temp file ``path`` (see the module docstring)."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False
    m = _OWNED.match(path.name)
    if m is not None and m.group(1) == owner_tag():
        pid = int(m.group(2))
        return pid == os.getpid() or not pid_wrote_it(pid, mtime)
    # another host's file, or a legacy name without an owner: only by age
    return (time.time() if now is None else now) - mtime >= foreign_age_s


def sweep_temp(
    directory: str | Path,
    *,
    foreign_age_s: float = FOREIGN_TEMP_AGE_S,
    recursive: bool = True,
) -> int:
    """Remove temp files a killed writer left: this process's own, a dead pid's on this host,
    and those of an unknown owner older than ``foreign_age_s``. A live writer's file (another
    shard, a training run beside this job) is never touched. Returns how many were removed."""
    directory = Path(directory)
    if not directory.exists():
        return 0
    now = time.time()
    pattern = f"**/{TEMP_PREFIX}*" if recursive else f"{TEMP_PREFIX}*"
    removed = 0
    for p in directory.glob(pattern):
        try:
            if p.is_file() and temp_is_stale(p, foreign_age_s=foreign_age_s, now=now):
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


def atomic_write_parquet(table: Any, final: str | Path) -> None:
    """``table`` (a pyarrow Table) as Parquet at ``final``, atomically: written to a temp name,
    its footer read back and its row count checked, then renamed."""
    import pyarrow.parquet as pq

    final = Path(final)

    def check(p: Path) -> None:
        meta = pq.read_metadata(p)  # a footerless file raises here
        if meta.num_rows != table.num_rows:
            raise InputError(f"{final}: wrote {meta.num_rows} rows, expected {table.num_rows}")

    with atomic_path(final, check=check) as tmp:
        pq.write_table(table, tmp)
