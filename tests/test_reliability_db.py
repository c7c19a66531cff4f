"""RELIABILITY 27, 28, 32 on a real PostgreSQL: timeouts and keepalives on every connection,
locks that notice their connection died, the database lost mid-job is exit 75, and no
password reaches a log line, a summary or an error in any connection-string form."""

from __future__ import annotations

import threading
import time

from jobs import db, export


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
