"""docs/faults.md 27, 28, 32 on a real PostgreSQL: timeouts and keepalives on every connection,
locks that notice their connection died, the database lost mid-job is exit 75, and no
password reaches a log line, a summary or an error in any connection-string form."""

from __future__ import annotations

import json
import threading
import time

import pytest
from export_fixtures import make_config, world
from psycopg import sql
from train_fixtures import insert_run

from jobs import db, dbt_runner, export, runs
from jobs.errors import TransientError

ADVISORY_BACKENDS = (
    "select distinct pid from pg_locks where locktype = 'advisory' and granted"
    " and database = (select oid from pg_database where datname = current_database())"
)


def _run_row(cfg, run_id: int) -> tuple:
    with db.connect(cfg) as conn:
        return conn.execute(
            sql.SQL("select status, params_json, updated_at from {} where id = %s").format(
                runs.table(cfg, "model_training_runs")
            ),
            (run_id,),
        ).fetchone()


def _advisory_waiters(cfg) -> int:
    with db.connect(cfg) as conn:
        return conn.execute(
            "select count(*) from pg_locks where locktype = 'advisory' and not granted"
        ).fetchone()[0]


def test_duckdb_attach_carries_the_timeouts(make_cfg):
    cfg = make_cfg(database__statement_timeout_s=2.5, database__lock_timeout_s=4)
    con = export.duckdb_connect(cfg)
    try:
        got = con.execute(
            "select * from postgres_query('pg', 'select current_setting(''statement_timeout'')"
            " as s, current_setting(''lock_timeout'') as l')"
        ).fetchall()
    finally:
        con.close()
    assert got == [("2500ms", "4s")]


def test_waiting_for_a_job_lock_is_not_cut_short_by_lock_timeout(make_cfg):
    """lock_timeout is for table and row locks: waiting for another dbt run (minutes) is
    bounded by statement_timeout instead."""
    cfg = make_cfg(database__lock_timeout_s=0.1)
    got: list[object] = []
    with db.job_lock(cfg, "dbt", cfg.database.dbt_schema) as held:
        assert held

        def waiter() -> None:
            try:
                with db.job_lock(cfg, "dbt", cfg.database.dbt_schema, wait=True) as second:
                    got.append(second)
            except Exception as exc:  # reported below
                got.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        while _advisory_waiters(cfg) == 0 and t.is_alive():
            time.sleep(0.01)
        time.sleep(1.0)  # ten lock_timeouts
    t.join()
    assert got == [True]


def test_a_job_whose_lock_connection_died_stops_before_its_final_commit(cfg):
    """The lock's backend is killed (a server restart, a network cut, an admin): the lock is
    gone and a twin can take it, so the final commit must not happen: exit 75, row unchanged."""
    run_id = insert_run(cfg, "lock_v2_2026_01_01", "d" * 64, status="exported")
    before = _run_row(cfg, run_id)
    with db.job_lock(cfg, "cache", run_id) as held:
        assert held
        db.check_locks()  # alive and granted: passes
        with db.connect(cfg, autocommit=True) as admin:
            (pid,) = [r[0] for r in admin.execute(ADVISORY_BACKENDS)]
            assert admin.execute("select pg_terminate_backend(%s)", (pid,)).fetchone()[0]
            while admin.execute(ADVISORY_BACKENDS).fetchall():
                time.sleep(0.01)  # until the server has released it
        with db.job_lock(cfg, "cache", run_id) as twin:
            assert twin  # what a second copy of the job now gets
        lost = r"lost the advisory lock .*/cache/"
        with pytest.raises(TransientError, match=lost) as info, db.connect(cfg) as conn:
            runs.set_status(conn, cfg, run_id, "cached", step="cache", summary={"n": 1})
        assert info.value.exit_code == 75
        assert "its connection died" in str(info.value)
        with pytest.raises(TransientError, match=lost), db.connect(cfg) as conn:
            runs.mark_failed(conn, cfg, run_id, "cache: something")
    assert _run_row(cfg, run_id) == before
    db.check_locks()  # released: nothing held, nothing to check


def test_a_lock_is_checked_in_pg_locks_not_by_a_live_connection_alone(cfg):
    """A connection that answers but no longer holds the key (a reconnect, a pooler handing
    out another session) is a lost lock too."""
    with db.job_lock(cfg, "train", 7) as held:
        assert held
        (lock,) = db.held_locks()
        assert lock.pid == lock.conn.info.backend_pid
        lock.conn.execute("select pg_advisory_unlock_all()")
        assert lock.conn.execute("select 1").fetchone() == (1,)
        with pytest.raises(TransientError, match="no longer shows it granted") as info:
            db.check_locks()
        assert "ml_schema=airatings/train/7" in str(info.value)


@pytest.fixture(scope="module")
def built(pg_server, tmp_path_factory):
    """A seeded world with its marts built, for the DuckDB read tests."""
    with world(pg_server, tmp_path_factory.mktemp("lostworld"), snapshots=40) as (cfg, _):
        dbt_runner.build(cfg)
        yield cfg


def _lock_marts(holder, cfg) -> None:
    holder.execute(
        sql.SQL("lock table {}.fct_dataset_splits in access exclusive mode").format(
            sql.Identifier(cfg.database.dbt_schema)
        )
    )


def test_database_lost_during_the_duckdb_read_is_transient(built):
    """DuckDB's session is terminated while it reads the marts (held up by a lock so that the
    kill lands mid-read, not between reads, where postgres_scanner reconnects): exit 75."""
    cfg = built
    assert export.read_snapshot(cfg)[0].num_rows > 0  # the read works

    def kill_the_waiting_reader() -> None:
        with db.connect(cfg, autocommit=True) as admin:
            while not admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where datname = current_database() and wait_event_type = 'Lock'"
            ).fetchall():
                time.sleep(0.01)

    with db.connect(cfg) as holder:
        _lock_marts(holder, cfg)
        killer = threading.Thread(target=kill_the_waiting_reader)
        killer.start()
        try:
            with pytest.raises(TransientError, match="through DuckDB: the database failed") as info:
                export.read_snapshot(cfg)
        finally:
            killer.join()
    assert info.value.exit_code == 75
    assert export.read_snapshot(cfg)[0].num_rows > 0  # and a re-run reads again


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"database__lock_timeout_s": 0.2}, "database.lock_timeout_s"),
        (
            {"database__lock_timeout_s": 0, "database__statement_timeout_s": 0.2},
            "database.statement_timeout_s",
        ),
    ],
)
def test_duckdb_read_stuck_on_a_lock_is_cancelled_and_transient(built, tmp_path, overrides, named):
    """Nothing waits forever: the read blocked behind an exclusive lock (a migration, a
    VACUUM FULL) is cancelled by the configured timeout and exits 75 naming the key."""
    cfg = make_config(built.database.url, tmp_path, **overrides)
    with db.connect(cfg) as holder:
        _lock_marts(holder, cfg)
        with pytest.raises(TransientError, match=named) as info:
            export.read_snapshot(cfg)
    assert info.value.exit_code == 75


def _dead_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dsn_forms(port: int) -> list[tuple[str, str]]:
    """(DATABASE_URL, the password) in every connection-string form libpq takes."""
    return [
        (f"postgresql://u:Url-S3cret@127.0.0.1:{port}/db", "Url-S3cret"),
        (f"postgresql://u:Pct%40S3cret@127.0.0.1:{port}/db", "Pct%40S3cret"),
        (f"postgresql://u@127.0.0.1:{port}/db?password=Query-S3cret", "Query-S3cret"),
        (f"host=127.0.0.1 port={port} user=u password=Kv-S3cret dbname=db", "Kv-S3cret"),
        (f"host=127.0.0.1 port={port} user=u password='Quoted S3cret' dbname=db", "S3cret"),
    ]


@pytest.mark.parametrize("form", range(5))
def test_no_password_in_output_for_any_dsn_form(tmp_path, form):
    """docs/faults.md 32 through the real CLI: the export fails fast against a dead server, the
    summary of `db start` echoes the (redacted) URL; the password is in neither stream."""
    import os
    import subprocess

    from conftest import AIRATINGS

    dsn, secret = _dsn_forms(_dead_port())[form]
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "AIR_DATA_DIR": str(tmp_path / "data"),
        "AIR_ARTIFACTS_DIR": str(tmp_path / "art"),
        "AIR_LOG_LEVEL": "DEBUG",
    }
    for args, code in ((["export", "--json"], 75), (["db", "start", "--json"], 0)):
        r = subprocess.run([AIRATINGS, *args], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == code, r.stderr
        assert secret not in r.stdout and secret not in r.stderr, args
        assert "S3cret" not in r.stdout + r.stderr, args
        assert "Traceback" not in r.stderr
    assert "***" in r.stdout  # db start: the URL is shown, redacted


@pytest.mark.parametrize("form", range(5))
def test_duckdb_errors_quote_the_dsn_redacted(make_cfg, form):
    """DuckDB's postgres_scanner quotes the whole conninfo in its errors."""
    dsn, secret = _dsn_forms(_dead_port())[form]
    cfg = make_cfg()
    cfg = cfg.model_copy(update={"database": cfg.database.model_copy(update={"url": dsn})})
    with pytest.raises(TransientError, match="DuckDB could not attach") as info:
        export.duckdb_connect(cfg)
    assert "S3cret" not in str(info.value)
    assert "Connection refused" in str(info.value)


def test_log_events_are_scrubbed_of_passwords(capsys):
    """The structlog processor: every string value, nested data and the rendered traceback."""
    from jobs import logs

    logs.configure(json_logs=True)
    log = logs.get_logger()
    logs.register_secret("Registered-S3cret")
    try:
        raise RuntimeError("connect to postgresql://u:Tb-S3cret@h/db failed")
    except RuntimeError:
        log.exception(
            "something_failed",
            url="postgresql://u:Url-S3cret@h/db",
            nested={"dsn": ["host=h password='Kv S3cret'"], "q": "h/db?password=Q-S3cret"},
            note="the password is Registered-S3cret",
            err=ValueError("host=h password=Exc-S3cret"),
        )
    err = capsys.readouterr().err
    event = json.loads(err.strip().splitlines()[-1])
    assert "S3cret" not in err
    assert event["url"] == "postgresql://u:***@h/db"
    assert event["nested"]["dsn"] == ["host=h password=***"]
    assert "RuntimeError: connect to postgresql://u:***@h/db failed" in event["exception"]
