"""Atomic writes: a failed or killed writer never leaves a partial file at the final name."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from jobs import artifacts
from jobs.errors import InputError


def test_atomic_write_replaces_only_after_check(tmp_path):
    final = tmp_path / "m.parquet"
    final.write_bytes(b"old")

    def bad(p):
        raise InputError("footer unreadable")

    with (
        pytest.raises(InputError, match="footer unreadable"),
        artifacts.atomic_path(final, check=bad) as tmp,
    ):
        tmp.write_bytes(b"new but broken")
    assert final.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [final]  # temp file removed

    with artifacts.atomic_path(final, check=lambda p: None) as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"


def test_exception_mid_write_leaves_no_temp(tmp_path):
    final = tmp_path / "x.bin"
    with pytest.raises(RuntimeError), artifacts.atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_sigkill_mid_write_leaves_old_file_and_sweep_removes_temp(tmp_path):
    final = tmp_path / "big.bin"
    final.write_bytes(b"old")
    code = (
        "import sys, time; from jobs import artifacts\n"
        f"with artifacts.atomic_path({str(final)!r}) as tmp:\n"
        "    f = open(tmp, 'wb'); f.write(b'x' * 100000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert final.read_bytes() == b"old"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(artifacts.TEMP_PREFIX)]
    assert len(leftovers) == 1
    assert artifacts.sweep_temp(tmp_path) == 1
    assert list(tmp_path.iterdir()) == [final]


def test_sweep_respects_age(tmp_path):
    fresh = tmp_path / f"{artifacts.TEMP_PREFIX}abc-file"  # a legacy name: no owner recorded
    fresh.write_bytes(b"x")
    assert artifacts.sweep_temp(tmp_path, foreign_age_s=3600) == 0
    old = time.time() - 7200
    os.utime(fresh, (old, old))
    assert artifacts.sweep_temp(tmp_path, foreign_age_s=3600) == 1


def _owned_by(tmp_path, pid: int, name: str, tag: str | None = None):
    p = tmp_path / f"{artifacts.TEMP_PREFIX}h{tag or artifacts.owner_tag()}-p{pid}-abc123-{name}"
    p.write_bytes(b"in flight")
    return p


def test_temp_names_carry_their_owner(tmp_path):
    p = artifacts.temp_path_for(tmp_path / "manifest.parquet")
    assert p.parent == tmp_path and p.name.endswith("-manifest.parquet")
    assert p.name.startswith(f"{artifacts.TEMP_PREFIX}h{artifacts.owner_tag()}-p{os.getpid()}-")
    assert artifacts.temp_path_for(tmp_path / "m") != artifacts.temp_path_for(tmp_path / "m")


def test_sweep_spares_a_live_siblings_file_and_removes_a_dead_ones(tmp_path):
    """Two shards (or a shard and a training run) share a directory: the sweep at one's start
    must not delete the other's in-flight temp file, only what a dead writer left."""
    sibling = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()  # exited and reaped: its pid is free
    try:
        live_file = _owned_by(tmp_path, sibling.pid, "shard-1.parquet")
        dead_file = _owned_by(tmp_path, dead.pid, "shard-2.parquet")
        mine = _owned_by(tmp_path, os.getpid(), "mine.parquet")
        # Another host's file (its pid means nothing here): only by age, even if old-ish.
        foreign = _owned_by(tmp_path, dead.pid, "other-host.parquet", tag="0123456789")
        legacy = tmp_path / f"{artifacts.TEMP_PREFIX}1a2b3c4d5e6f-young.parquet"
        legacy.write_bytes(b"unowned, young")
        old = time.time() - 600
        for p in (foreign, legacy):
            os.utime(p, (old, old))

        assert artifacts.sweep_temp(tmp_path, foreign_age_s=3600) == 2
        assert live_file.exists() and foreign.exists() and legacy.exists()
        assert not dead_file.exists() and not mine.exists()

        # The foreign and legacy files go once they are older than the generous age.
        ancient = time.time() - 7200
        for p in (foreign, legacy):
            os.utime(p, (ancient, ancient))
        assert artifacts.sweep_temp(tmp_path, foreign_age_s=3600) == 2
        assert [p.name for p in tmp_path.iterdir()] == [live_file.name]
    finally:
        sibling.kill()
        sibling.wait()
    # The sibling is gone now: its file is a dead writer's leftover.
    assert artifacts.sweep_temp(tmp_path) == 1 and list(tmp_path.iterdir()) == []


def test_a_reused_pid_does_not_keep_a_dead_writers_file(tmp_path):
    """The writer died and its pid now belongs to a process started after the file was last
    written (here: a live process, the file dated before it started)."""
    later = subprocess.Popen(["sleep", "60"])
    try:
        f = _owned_by(tmp_path, later.pid, "old.parquet")
        old = time.time() - 600  # written long before that process existed
        os.utime(f, (old, old))
        assert artifacts.pid_wrote_it(later.pid, time.time()) is True
        assert artifacts.sweep_temp(tmp_path) == 1 and not f.exists()
    finally:
        later.kill()
        later.wait()


def test_write_once_and_sha_check(tmp_path):
    p = tmp_path / "model.onnx"
    artifacts.write_once(p, b"abc")
    artifacts.write_once(p, b"abc")  # same bytes: fine
    with pytest.raises(InputError, match="immutable"):
        artifacts.write_once(p, b"abd")
    assert p.read_bytes() == b"abc"
    artifacts.verify_sha256(p, artifacts.sha256_bytes(b"abc"))
    with pytest.raises(InputError, match="refusing to load"):
        artifacts.verify_sha256(p, artifacts.sha256_bytes(b"abd"))


def test_write_once_race_has_exactly_one_winner(tmp_path, monkeypatch):
    """Another writer landing between our exists() check and our rename must win: ours is
    refused, theirs is never overwritten (the check-then-replace race of write-once names)."""
    from pathlib import Path

    real_exists = Path.exists
    theirs = tmp_path / "model.onnx"
    theirs.write_bytes(b"theirs")
    lies = {"left": 10**6}

    def racing_exists(self, *a, **kw):  # the file lands just after every check we make
        if self == theirs and lies["left"] > 0:
            lies["left"] -= 1
            return False
        return real_exists(self, *a, **kw)

    monkeypatch.setattr(Path, "exists", racing_exists)
    with pytest.raises(InputError, match="immutable"):
        artifacts.write_once(theirs, b"mine")
    assert theirs.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # our temp file is gone

    # The same bytes racing in (only the first check misses it): not an error.
    lies["left"] = 1
    theirs.write_bytes(b"same")
    assert artifacts.write_once(theirs, b"same") == theirs
    assert theirs.read_bytes() == b"same"
