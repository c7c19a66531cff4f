"""`airatings db ...`: the embedded server and what the database in use holds (over jobs.db)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql

from jobs import db, paths
from jobs.runs import table

if TYPE_CHECKING:
    from jobs.config import Config


def start(cfg: Config) -> dict[str, Any]:
    if cfg.database.url:
        return {"status": "external", "url": db.redact(cfg.database.url)}
    pgdata = paths.of(cfg).pgdata
    before = db.embedded_status(pgdata)
    url = db.start_embedded(pgdata)
    return {
        "status": "already_running" if before["running"] else "started",
        "url": url,
        "data_dir": str(pgdata),
        "stale_pid_file_recovered": bool(before.get("stale_pid_file")),
    }


def stop(cfg: Config) -> dict[str, Any]:
    if cfg.database.url:
        return {"status": "external", "detail": "DATABASE_URL is set: nothing embedded to stop"}
    stopped = db.stop_embedded(paths.of(cfg).pgdata)
    return {
        "status": "stopped" if stopped else "not_running",
        "data_dir": str(paths.of(cfg).pgdata),
    }


def status(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.database.url:
        out["mode"] = "external"
        out["url"] = db.redact(cfg.database.url)
    else:
        out["mode"] = "embedded"
        out.update(db.embedded_status(paths.of(cfg).pgdata))
        if not out["running"]:
            out["status"] = "not_running"
            return out
    with db.connect(cfg) as conn:
        out["server_version"] = conn.execute("show server_version").fetchone()[0]
        qualified = sql.Identifier(cfg.database.ml_schema, "schema_migrations").as_string(conn)
        exists = conn.execute("select to_regclass(%s) is not null", (qualified,)).fetchone()[0]
        applied = []
        if exists:
            applied = [
                r[0]
                for r in conn.execute(
                    sql.SQL("select name from {} order by version").format(
                        table(cfg, "schema_migrations")
                    )
                )
            ]
        out["migrations_applied"] = applied
        out["migrations_pending"] = [n for _, n, _ in db.migration_files() if n not in applied]
    out["status"] = "running"
    return out
