"""The CLI surface: every lifecycle job listed, exit codes, --json, no writes on bad config."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from importlib import import_module
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
    "provenance",
    "weights",
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


# Every command and the job function it must hand to run_job (checked without running it).
COMMANDS = {
    ("db", "start"): "jobs.dbcli.start",
    ("db", "stop"): "jobs.dbcli.stop",
    ("db", "status"): "jobs.dbcli.status",
    ("migrate",): "jobs.db.migrate",
    ("demo", "seed"): "jobs.demo.seed.seed",
    ("demo", "run"): "jobs.release.demo",
    ("dbt", "build"): "jobs.dbt_runner.cli",
    ("export",): "jobs.export.run",
    ("cache",): "jobs.cache.run",
    ("train",): "jobs.train.run",
    ("evaluate",): "jobs.evaluate.run",
    ("release",): "jobs.release.run",
    ("weights", "pull"): "jobs.weights.pull",
    ("provenance", "v"): "jobs.provenance.run",
    ("models", "list"): "jobs.registry.list_models",
    ("models", "show", "v"): "jobs.registry.show",
    ("models", "promote", "v"): "jobs.registry.promote",
    ("models", "rollback"): "jobs.registry.rollback",
    ("export-onnx",): "jobs.onnx_export.run",
    ("register",): "jobs.register.run",
    ("score",): "jobs.score.run",
    ("review", "report"): "jobs.review.report_job",
    ("review", "import", "f.csv"): "jobs.review.import_job",
    ("review", "history"): "jobs.review.history_job",
}


@pytest.mark.parametrize("words", list(COMMANDS), ids=" ".join)
def test_every_command_hands_its_job_function_to_run_job(words, monkeypatch):
    """The CLI imports the function it runs: a renamed or moved job function, or a renamed
    parameter (``run`` -> ``run_ref``), fails here, in the tests, not when a person runs the
    command."""
    from typer.testing import CliRunner

    from jobs import cli

    seen = {}

    def record(job, func, config, as_json, **kwargs):
        seen["func"] = func
        seen["kwargs"] = kwargs

    monkeypatch.setattr(cli, "run_job", record)
    result = CliRunner().invoke(cli.app, list(words))
    assert result.exit_code == 0, result.output
    func = seen["func"]
    assert f"{func.__module__}.{func.__qualname__}" == COMMANDS[words]
    # run_job calls func(cfg, **kwargs): every keyword the command passes must be a parameter
    inspect.signature(func).bind(object(), **seen["kwargs"])


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
    r = airatings("models", "list", "--json", env=env)
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


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_export_against_a_dead_server_exits_75_without_a_traceback(tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql://u@127.0.0.1:{free_port()}/db",
        "AIR_DATA_DIR": str(tmp_path / "data"),
        "AIR_ARTIFACTS_DIR": str(tmp_path / "art"),
    }
    r = airatings("export", "--json", env=env)
    assert r.returncode == 75, r.stderr
    assert "Traceback" not in r.stderr
    assert "cannot connect to PostgreSQL" in json.loads(r.stdout)["error"]


@pytest.mark.parametrize(
    "raise_it",
    [
        "raise psycopg.OperationalError('consuming input failed: server closed the connection"
        " unexpectedly (user=u password=hunter2-x)')",
        "raise psycopg.InterfaceError('the connection is lost')",
        "raise duckdb.IOException('IO Error: Unable to connect to Postgres at"
        ' "host=h password=hunter2-x": connection refused\')',
        "raise duckdb.Error('Failed to prepare COPY: server closed the connection unexpectedly')",
    ],
)
def test_a_database_error_that_escapes_a_job_is_exit_75_in_one_line(
    tmp_path, monkeypatch, capsys, raise_it
):
    """run_job's last line of defence: a psycopg or DuckDB connection error no job mapped is
    75 with one redacted line, not a traceback (exit 1)."""
    import sys

    import typer

    from jobs.cli import run_job

    (tmp_path / "lost_job.py").write_text(
        f"import duckdb\nimport psycopg\n\n\ndef run(cfg):\n    {raise_it}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lost_job", raising=False)
    with pytest.raises(typer.Exit) as info:
        run_job("lost", import_module("lost_job").run, Path("configs/v2_baseline.yaml"), True)
    assert info.value.exit_code == 75
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "hunter2-x" not in out + err
    assert json.loads(out)["error"].startswith("database unavailable: ")


def test_a_bug_still_shows_its_traceback_without_the_password(tmp_path, monkeypatch, capsys):
    import sys

    import typer

    from jobs.cli import run_job

    (tmp_path / "buggy_job.py").write_text(
        "def run(cfg):\n    raise KeyError('postgresql://u:hunter2-x@db/app')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "buggy_job", raising=False)
    with pytest.raises(typer.Exit) as info:
        run_job("buggy", import_module("buggy_job").run, Path("configs/v2_baseline.yaml"), True)
    assert info.value.exit_code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'postgresql://u:***@db/app'" in err
    assert "hunter2-x" not in err


def test_people_get_an_aligned_table_not_a_json_blob():
    from jobs.cli import human_summary

    text = human_summary(
        "release",
        {
            "status": "released",
            "model_version": "v_1",
            "headline": {"mae": 0.3591234, "spearman": 0.93},
            "steps": {"export": {"status": "exported", "seconds": 3.21}, "train": "trained"},
        },
    )
    lines = text.splitlines()
    assert lines[0] == "release: released"
    assert "  headline.mae       0.3591" in lines and "  model_version      v_1" in lines
    assert any(line.split() == ["export", "exported", "3.2"] for line in lines)
    assert any(line.split() == ["train", "trained", "-"] for line in lines)
    assert "{" not in text


def _has_jemalloc() -> bool:
    import pyarrow as pa

    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        return False
    return True


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _has_jemalloc(),
    reason="jemalloc: in pyarrow's Linux wheels",
)
@pytest.mark.parametrize("preset,backend", [(None, "jemalloc"), ("system", "system")])
def test_the_jobs_run_arrow_on_jemalloc_unless_told_otherwise(preset, backend):
    """The CLI picks Arrow's C++ allocator before pyarrow first allocates (mimalloc, the
    default, kept freed pages: the cache job's peak memory grew with the rows); a value the
    user set wins."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if preset:
        env["ARROW_DEFAULT_MEMORY_POOL"] = preset
    code = "import jobs.cli, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == backend


@pytest.mark.parametrize("preset,backend", [(None, "jemalloc"), ("system", "system")])
def test_the_cache_job_keeps_the_users_arrow_pool(preset, backend, monkeypatch):
    import pyarrow as pa

    from jobs import cache

    if backend == "jemalloc" and not _has_jemalloc():
        pytest.skip("pyarrow without jemalloc")
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    if preset:
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", preset)
        monkeypatch.setattr(pa, "default_memory_pool", pa.system_memory_pool)
    before = pa.default_memory_pool().backend_name
    with cache._arrow_pool():
        assert pa.default_memory_pool().backend_name == backend
    assert pa.default_memory_pool().backend_name == before
