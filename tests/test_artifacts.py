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
    fresh = tmp_path / f"{artifacts.TEMP_PREFIX}abc-file"
    fresh.write_bytes(b"x")
    assert artifacts.sweep_temp(tmp_path, older_than_s=3600) == 0
    old = time.time() - 7200
    os.utime(fresh, (old, old))
    assert artifacts.sweep_temp(tmp_path, older_than_s=3600) == 1


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
