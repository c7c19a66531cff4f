"""The CLI surface: every lifecycle job listed, exit codes, --json, no writes on bad config."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import AIRATINGS

JOBS = [
    "db",
    "migrate",
    "demo",
    "dbt",
    "export",
    "cache",
    "train",
    "evaluate",
    "export-onnx",
    "register",
    "release",
    "score",
    "review",
    "models",
]


def airatings(
    *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AIRATINGS, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_help_lists_every_job():
    r = airatings("--help")
    assert r.returncode == 0
    for job in JOBS:
        assert f"\n  {job} " in r.stdout or f"\n  {job}\n" in r.stdout, job


@pytest.mark.parametrize("job", ["export-onnx", "register", "release", "score", "review"])
def test_unbuilt_jobs_say_so_and_exit_2(job):
    r = airatings(job, "--json")
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"] == f"'{job}' is not built yet in this version"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  epoch: 3\n", "train.epoch: unknown key"),
        ("train:\n  epochs: x\n", "train.epochs"),
        ("x: !!python/object/apply:os.system ['touch {marker}']\n", "python/object/apply"),
    ],
)
def test_bad_config_exits_2_naming_the_key_and_writes_nothing(tmp_path, text, needle):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text.format(marker=marker))
    env = {
        **os.environ,
        "AIR_DATA_DIR": str(tmp_path / "data"),
        "AIR_ARTIFACTS_DIR": str(tmp_path / "art"),
    }
    env.pop("DATABASE_URL", None)
    r = airatings("migrate", "--config", str(cfg), "--json", env=env)
    assert r.returncode == 2
    assert needle in json.loads(r.stdout)["error"]
    assert needle in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "data").exists()  # no embedded server was even started
    assert not (tmp_path / "art").exists()


def test_missing_config_file_exits_2(tmp_path):
    r = airatings("migrate", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "config file not found" in r.stderr


def test_unreachable_database_is_transient(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"postgresql://x@/db?host={tmp_path}&connect_timeout=2"}
    r = airatings("models", "--json", env=env)
    assert r.returncode == 75
    assert "cannot connect to PostgreSQL" in json.loads(r.stdout)["error"]


def test_logs_are_json_lines_with_job_context_and_one_summary(database_url):
    env = {**os.environ, "DATABASE_URL": database_url}
    r = airatings("migrate", "--json", env=env)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert events, r.stderr
    assert all(e["job"] == "migrate" for e in events)
    assert [e["event"] for e in events].count("job_finished") == 1
    assert events[-1]["event"] == "job_finished"
    summary = json.loads(r.stdout)
    assert summary["status"] == "done" and "0001_training_runs.sql" in summary["applied"]
