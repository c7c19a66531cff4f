"""Migrations and the embedded server on a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psycopg
import pytest
from conftest import AIRATINGS

from jobs import db
from jobs.errors import InputError


def applied(cfg) -> list[str]:
    with db.connect(cfg) as conn:
        return [
            r[0]
            for r in conn.execute("select name from airatings.schema_migrations order by version")
        ]


def test_migrate_twice_is_idempotent(make_cfg):
    cfg = make_cfg()
    first = db.migrate(cfg)
    assert "0001_training_runs.sql" in first["applied"]
    second = db.migrate(cfg)
    assert second["applied"] == []
    assert applied(cfg) == [n for _, n, _ in db.migration_files()]


def test_two_migrates_at_once_end_in_one_state(make_cfg):
    cfg = make_cfg()
    results, errors = [], []

    def go():
        try:
            results.append(db.migrate(cfg))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    applied_counts = sorted(len(r["applied"]) for r in results)
    assert applied_counts[0] == 0 and applied_counts[1] == len(db.migration_files())
    assert applied(cfg) == [n for _, n, _ in db.migration_files()]


def test_failing_migration_rolls_back_and_rerun_works_after_fix(make_cfg):
    cfg = make_cfg()
    good = db.migration_files()
    broken = (9999, "9999_broken.sql", "create table half_done (id int); select 1/0;")
    with pytest.raises(InputError, match="9999_broken.sql failed and was rolled back"):
        db.migrate(cfg, files=[*good, broken])
    with db.connect(cfg) as conn:
        assert conn.execute("select to_regclass('airatings.half_done')").fetchone()[0] is None
        versions = [r[0] for r in conn.execute("select version from airatings.schema_migrations")]
    assert 9999 not in versions
    assert len(versions) == len(good)  # the good ones before it stay applied
    fixed = (9999, "9999_broken.sql", "create table half_done (id int);")
    assert db.migrate(cfg, files=[*good, fixed])["applied"] == ["9999_broken.sql"]


def test_changed_applied_migration_is_refused(make_cfg):
    cfg = make_cfg()
    files = db.migration_files()
    db.migrate(cfg)
    n, name, text = files[0]
    with pytest.raises(InputError, match="changed after it was applied"):
        db.migrate(cfg, files=[(n, name, text + "\n-- edited\n"), *files[1:]])


def test_badly_named_migration_is_refused(tmp_path, monkeypatch):
    from importlib import resources

    root = tmp_path / "jobs" / "migrations"
    root.mkdir(parents=True)
    (root / "1_bad.sql").write_text("select 1;")
    monkeypatch.setattr(resources, "files", lambda pkg: tmp_path / "jobs")
    with pytest.raises(InputError, match="is not named NNNN_<what>.sql"):
        db.migration_files()


def test_embedded_start_twice_and_stale_pid(tmp_path):
    pgdata = tmp_path / "pg"
    url = db.start_embedded(pgdata)
    try:
        assert db.start_embedded(pgdata) == url  # already running: same server
        with psycopg.connect(url) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        status = db.embedded_status(pgdata)
        assert status["running"] and status["pid"] > 0
        # Kill the postmaster hard: postmaster.pid stays behind (stale).
        os.kill(status["pid"], signal.SIGKILL)
        for _ in range(100):
            if not db.embedded_status(pgdata)["running"]:
                break
            time.sleep(0.1)
        # wait for children to exit so the shared memory is released
        time.sleep(1.0)
        assert (pgdata / "postmaster.pid").exists()
        assert db.embedded_status(pgdata)["stale_pid_file"]
        url2 = db.start_embedded(pgdata)
        with psycopg.connect(url2) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        db.stop_embedded(pgdata)
    assert not db.embedded_status(pgdata)["running"]


def test_cli_db_lifecycle(tmp_path):
    env = {**os.environ, "AIR_DATA_DIR": str(tmp_path / "data")}
    env.pop("DATABASE_URL", None)
    run = lambda *a: subprocess.run(  # noqa: E731
        [AIRATINGS, *a], capture_output=True, text=True, env=env, timeout=120
    )
    try:
        r = run("db", "start", "--json")
        assert r.returncode == 0, r.stderr
        assert '"status": "started"' in r.stdout
        r = run("db", "start", "--json")
        assert '"status": "already_running"' in r.stdout
        r = run("migrate", "--json")
        assert r.returncode == 0, r.stderr
        r = run("db", "status", "--json")
        assert '"migrations_pending": []' in r.stdout
    finally:
        r = run("db", "stop", "--json")
    assert '"status": "stopped"' in r.stdout


def test_advisory_job_lock_excludes_a_second_holder(cfg):
    with db.job_lock(cfg, "export", 1) as first:
        assert first is True
        with db.job_lock(cfg, "export", 1) as second:
            assert second is False
        with db.job_lock(cfg, "export", 2) as other_run:
            assert other_run is True
    with db.job_lock(cfg, "export", 1) as again:
        assert again is True


def test_lock_keys_include_the_schema_the_job_works_on(make_cfg):
    """Two projects (ML schemas) in one database never block each other; dbt's lock guards
    the dbt schema, whoever's ML schema the config names."""
    a = make_cfg()
    b = make_cfg(database__ml_schema="other_ml")
    with db.job_lock(a, "export", 1) as first, db.job_lock(b, "export", 1) as other_schema:
        assert first is True and other_schema is True
        with db.job_lock(make_cfg(), "export", 1) as same_schema:
            assert same_schema is False
    with db.job_lock(a, "dbt", a.database.dbt_schema) as first:
        with db.job_lock(b, "dbt", b.database.dbt_schema) as same_dbt_schema:
            assert first is True and same_dbt_schema is False
        c = make_cfg(database__ml_schema="other_ml", database__dbt_schema="other_dbt")
        with db.job_lock(c, "dbt", c.database.dbt_schema) as own_dbt_schema:
            assert own_dbt_schema is True


def test_migrate_lock_is_per_schema(make_cfg):
    """A migrate of one schema does not wait for another schema's (it used to share one key)."""
    a = make_cfg()
    b = make_cfg(database__ml_schema="other_ml", database__statement_timeout_s=5)
    with db.job_lock(a, "migrate") as held:  # what migrate(a) takes
        assert held
        with db.job_lock(make_cfg(), "migrate") as twin:
            assert twin is False
        assert "0001_training_runs.sql" in db.migrate(b)["applied"]
    with db.connect(b) as conn:
        assert conn.execute("select to_regclass('other_ml.model_training_runs')").fetchone()[0]


def test_migration_cut_off_by_the_server_is_transient_and_not_recorded(make_cfg):
    """The server dropping the connection mid-migration is not the migration's fault: exit 75
    (retried), nothing recorded, and a re-run applies it."""
    from jobs.errors import TransientError

    cfg = make_cfg()
    good = db.migration_files()
    db.migrate(cfg)
    killed = (
        9998,
        "9998_cut_off.sql",
        "create table cut_off (id int); select pg_terminate_backend(pg_backend_pid());",
    )
    with pytest.raises(TransientError, match="9998_cut_off.sql was interrupted") as info:
        db.migrate(cfg, files=[*good, killed])
    assert info.value.exit_code == 75
    with db.connect(cfg) as conn:
        assert conn.execute("select to_regclass('airatings.cut_off')").fetchone()[0] is None
        versions = [r[0] for r in conn.execute("select version from airatings.schema_migrations")]
    assert 9998 not in versions
    fixed = (9998, "9998_cut_off.sql", "create table cut_off (id int);")
    assert db.migrate(cfg, files=[*good, fixed])["applied"] == ["9998_cut_off.sql"]


def test_dbt_profile_keeps_the_urls_sslmode(cfg):
    from jobs import dbt_runner

    url = "postgresql://u:pw@db.example.com:6543/app?sslmode=verify-full"
    remote = cfg.model_copy(update={"database": cfg.database.model_copy(update={"url": url})})
    env = dbt_runner.profile_env(remote)
    assert env["AIR_DBT_SSLMODE"] == "verify-full"
    assert (env["AIR_DBT_HOST"], env["AIR_DBT_PORT"], env["AIR_DBT_DBNAME"]) == (
        "db.example.com", "6543", "app",
    )  # fmt: skip
    assert dbt_runner.profile_env(cfg)["AIR_DBT_SSLMODE"] in {"prefer", os.environ.get("PGSSLMODE")}


def test_job_connections_carry_timeouts_and_keepalives(make_cfg, database_url):
    """docs/faults.md 27: nothing waits forever. The database section's timeouts reach the server
    (``options``), keepalives reach libpq; 0 turns a timeout off."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    def settings(target) -> tuple[str, str]:
        with db.connect(target) as conn:
            return tuple(conn.execute(
                "select current_setting('statement_timeout'), current_setting('lock_timeout')"
            ).fetchone())  # fmt: skip

    cfg = make_cfg(database__statement_timeout_s=2.5, database__lock_timeout_s=4)
    assert settings(cfg) == ("2500ms", "4s")
    with db.connect(cfg) as conn:
        params = conn.info.get_parameters()
    assert (params["keepalives"], params["keepalives_idle"]) == ("1", "30")
    assert (params["keepalives_interval"], params["keepalives_count"]) == ("10", "3")
    assert settings(make_cfg()) == ("15min", "30s")  # the defaults
    assert settings(make_cfg(database__statement_timeout_s=0, database__lock_timeout_s=0)) == (
        "0", "0",
    )  # fmt: skip
    # a bare URL gets the defaults; what the URL sets itself wins
    assert settings(database_url) == ("15min", "30s")
    own = make_conninfo(**{**conninfo_to_dict(database_url), "options": "-c statement_timeout=7s"})
    assert settings(own) == ("7s", "30s")


def test_database_lost_inside_a_connection_block_is_transient(cfg):
    """docs/faults.md 28: the server closing the connection mid-job is exit 75, not a raw
    psycopg traceback."""
    from jobs.errors import TransientError

    lost = "the database failed mid-job"
    with pytest.raises(TransientError, match=lost) as info, db.connect(cfg) as conn:
        conn.execute("select pg_terminate_backend(pg_backend_pid())")
    assert info.value.exit_code == 75
    assert "terminating connection" in str(info.value) or "closed" in str(info.value)
    assert "\n" not in str(info.value)  # one line


def test_statement_and_lock_timeouts_are_transient_and_named(make_cfg):
    from jobs.errors import TransientError

    quick = make_cfg(database__statement_timeout_s=0.05)
    named = r"database.statement_timeout_s \(0.05 s\)"
    with pytest.raises(TransientError, match=named) as info, db.connect(quick) as conn:
        conn.execute("select pg_sleep(1)")
    assert info.value.exit_code == 75
    cfg = make_cfg(database__lock_timeout_s=0.1)
    db.migrate(cfg)
    with db.connect(cfg) as holder:
        holder.execute("lock table airatings.model_training_runs in access exclusive mode")
        named = r"database.lock_timeout_s \(0.1 s\)"
        with pytest.raises(TransientError, match=named), db.connect(cfg) as conn:
            conn.execute("select count(*) from airatings.model_training_runs")


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("postgresql://u:s3cret-pw@db.example.com:5432/app", "s3cret-pw"),
        ("postgres://u:p%40ss%2Fw0rd@h1:5432,h2:5433/app?sslmode=require", "p%40ss%2Fw0rd"),
        ("postgresql://u@db/app?sslmode=require&password=s3cret-pw", "s3cret-pw"),
        ("postgresql://u@db/app?password=s3cret-pw&sslmode=require", "s3cret-pw"),
        ("host=db user=u password=s3cret-pw dbname=app", "s3cret-pw"),
        ("host=db password='se cr3t' dbname=app", "se cr3t"),
        ("host=db password = 'it\\'s secret' dbname=app", "s secret"),
        ("password=s3cret-pw", "s3cret-pw"),
    ],
)
def test_redact_masks_the_password_in_every_dsn_form(dsn, secret):
    from psycopg.conninfo import conninfo_to_dict

    out = db.redact(dsn)
    assert secret not in out and "***" in out
    assert conninfo_to_dict(dsn).get("password") not in out
    # what is not secret stays readable
    assert "db" in out or "h1" in out or out == "password=***"
    # and the same inside a message, as DuckDB and libpq write them
    msg = db.redact(f'IO Error: Unable to connect to Postgres at "{dsn}": connection refused')
    assert secret not in msg and "connection refused" in msg


def test_redact_leaves_a_dsn_without_password_alone():
    for dsn in ("postgresql://u@db/app?sslmode=require", "host=db user=u dbname=app",
                "postgresql://postgres:@/postgres?host=/tmp/x"):  # fmt: skip
        assert db.redact(dsn) == dsn


def test_an_unparsable_dsn_is_exit_2_without_a_piece_of_it(make_cfg):
    from jobs.errors import InputError

    cfg = make_cfg()
    bad = cfg.model_copy(
        update={"database": cfg.database.model_copy(update={"url": "host=db password=se cr3t"})}
    )
    invalid = "not a valid PostgreSQL connection string"
    with pytest.raises(InputError, match=invalid) as info, db.connect(bad):
        pass
    assert "cr3t" not in str(info.value)
