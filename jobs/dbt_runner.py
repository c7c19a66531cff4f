"""dbt through its Python API (``dbt.cli.main.dbtRunner``), driven by the run config.

The profile (``dbt/profiles.yml``) reads ``AIR_DBT_*`` environment variables that this module
sets from the config's database (``DATABASE_URL`` or the embedded server, a Unix socket), and
every invocation gets the config's dataset values as ``--vars`` (``Config.dbt_vars()``), so one
YAML drives both SQL and Python. ``target/`` and ``logs/`` go under ``<data_dir>/dbt`` so that
configs with different data dirs (tests) never share dbt's state.

``airatings dbt <args>`` -> :func:`cli`; the export calls :func:`build`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs import paths
from jobs.errors import ConfigError, InputError, JobError, TransientError
from jobs.logs import get_logger

if TYPE_CHECKING:
    from jobs.config import Config

log = get_logger()

PROJECT_DIR = Path(__file__).resolve().parents[1] / "dbt"
# What the export needs: the split mart and everything upstream of it, with their tests.
TRAINING_SELECTION = "+fct_dataset_splits"
# every model of the project (what a release and the demo build: docs and tests see them all)
PROJECT_SELECTION = "airatings"

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]{0,15}$")
# Options this module owns: the config decides them, not the command line.
_OWNED_FLAGS = ("--vars", "--profiles-dir", "--project-dir", "--target", "--profile")
# dbt keeps process-global state (flags, adapters, event logger): one invocation at a time.
_INVOKE_LOCK = threading.Lock()


def project_dir() -> Path:
    """The dbt project: ``dbt/`` in the checkout, or ``AIR_DBT_PROJECT_DIR`` (an installed
    wheel does not carry it: a container sets the variable to where it copied ``dbt/``)."""
    path = Path(os.environ.get("AIR_DBT_PROJECT_DIR", PROJECT_DIR)).resolve()
    if not (path / "dbt_project.yml").is_file():
        raise InputError(
            f"no dbt project at {path} (dbt_project.yml missing): run from a checkout or set "
            f"AIR_DBT_PROJECT_DIR to the project's dbt/ folder"
        )
    return path


def target_path(cfg: Config) -> Path:
    return paths.of(cfg).dbt_target


def log_path(cfg: Config) -> Path:
    return paths.of(cfg).dbt_logs


def checked_vars(cfg: Config) -> dict[str, Any]:
    """``cfg.dbt_vars()``, re-checked here because these values are rendered into SQL.

    The config model already validates them; this refuses a config built around validation
    (``model_construct``/``model_copy``) with a ConfigError naming the key.
    """
    v = cfg.dbt_vars()
    where = {"app_schema": "database.app_schema", "ml_schema": "database.ml_schema"}
    for key, origin in where.items():
        if not isinstance(v[key], str) or not _IDENT.match(v[key]):
            raise ConfigError(
                f"{origin}: {v[key]!r} is not a plain SQL identifier ([a-z_][a-z0-9_]*)"
            )
    if not _IDENT.match(str(cfg.database.dbt_schema)):
        raise ConfigError(
            f"database.dbt_schema: {cfg.database.dbt_schema!r} is not a plain SQL identifier"
        )
    for s in v["allowed_url_schemes"]:
        if not isinstance(s, str) or not _SCHEME.match(s):
            raise ConfigError(f"dataset.allowed_url_schemes: {s!r} is not a URL scheme")
    if v["group_key"] not in ("webcam_day", "webcam", "snapshot"):
        raise ConfigError(
            f"dataset.group_key: {v['group_key']!r} is not webcam_day, webcam or snapshot"
        )
    for key, origin in (
        ("min_rating_count", "dataset.min_rating_count"),
        ("split_seed", "dataset.split_seed"),
        ("review_min_slice_size", "evaluate.min_slice_size"),
    ):
        if not isinstance(v[key], int) or isinstance(v[key], bool):
            raise ConfigError(f"{origin}: {v[key]!r} is not an integer")
    for key in ("good_threshold", "split_train", "split_val", "split_test"):
        if not isinstance(v[key], int | float) or isinstance(v[key], bool):
            raise ConfigError(f"dataset: {key} {v[key]!r} is not a number")
    return v


def profile_env(cfg: Config) -> dict[str, str]:
    """The ``AIR_DBT_*`` variables profiles.yml reads, from the config's database, and
    ``PGOPTIONS`` (libpq's own variable: dbt-postgres has no ``options`` key) carrying the
    statement and lock timeouts and server-side keepalives every job connection has."""
    from jobs import db

    parts = db.conninfo_parts(db.database_url(cfg))
    options = " ".join(filter(None, [db.session_options(cfg.database), parts["options"]]))
    return {
        "AIR_DBT_HOST": str(parts["host"]),
        "AIR_DBT_PORT": str(parts["port"]),
        "AIR_DBT_USER": str(parts["user"]),
        "AIR_DBT_PASSWORD": str(parts["password"]),
        "AIR_DBT_DBNAME": str(parts["dbname"]),
        "AIR_DBT_SSLMODE": str(parts["sslmode"]),
        "AIR_DBT_SCHEMA": cfg.database.dbt_schema,
        "AIR_DBT_THREADS": str(min(4, os.cpu_count() or 1)),
        "AIR_DBT_CONNECT_TIMEOUT": str(cfg.database.connect_timeout_s),
        # dbt-postgres sets keepalives_idle only (0: its default, none); interval and count
        # stay the OS defaults on dbt's side, the server side comes with PGOPTIONS.
        "AIR_DBT_KEEPALIVES_IDLE": str(cfg.database.keepalives_idle_s),
        "PGOPTIONS": options,
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _command_words(args: list[str]) -> list[str]:
    words = []
    for a in args:
        if a.startswith("-"):
            break
        words.append(a)
    return words


def invoke(cfg: Config, args: list[str], *, quiet: bool = False) -> Any:
    """Run one dbt command with the config's profile, vars and paths; returns dbtRunnerResult.

    dbt's console output goes to stderr (stdout stays free for ``--json`` summaries); its full
    debug log is under ``<data_dir>/dbt/logs``.
    """
    for a in args:
        if a.split("=", 1)[0] in _OWNED_FLAGS:
            raise InputError(
                f"'{a.split('=', 1)[0]}' is set from the config; change the config instead"
            )
    dbt_vars = checked_vars(cfg)
    words = _command_words(args)
    extra = [
        "--project-dir", str(project_dir()),
        "--profiles-dir", str(project_dir()),
    ]  # fmt: skip
    if words[:2] != ["docs", "serve"]:
        extra += ["--vars", json.dumps(dbt_vars, sort_keys=True)]
    if words and words[0] not in ("clean", "debug", "init", "deps"):
        extra += ["--target-path", str(target_path(cfg))]
    log_dir = log_path(cfg)
    log_dir.mkdir(parents=True, exist_ok=True)
    pre = ["--log-path", str(log_dir), "--no-use-colors"]
    if quiet:
        pre.append("--quiet")
    from dbt.cli.main import dbtRunner

    env = profile_env(cfg)
    with _INVOKE_LOCK, _environ(env), contextlib.redirect_stdout(sys.stderr):
        return dbtRunner().invoke([*pre, *args, *extra])


def _failures(res: Any) -> list[dict[str, str]]:
    out = []
    results = getattr(getattr(res, "result", None), "results", None) or []
    for r in results:
        status = str(getattr(r.status, "value", r.status))
        if status in ("error", "fail", "runtime error"):
            node = r.node
            out.append(
                {
                    "name": node.name,
                    "type": str(getattr(node.resource_type, "value", node.resource_type)),
                    "status": status,
                    "message": (r.message or "")[:500],
                }
            )
    return out


def _counts(res: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in getattr(getattr(res, "result", None), "results", None) or []:
        status = str(getattr(r.status, "value", r.status))
        counts[status] = counts.get(status, 0) + 1
    return counts


def _interrupt_in(exc: BaseException | None) -> BaseException | None:
    """A SIGTERM (``Terminated``), Ctrl-C or other job error somewhere in ``exc``'s chain.

    dbtRunner.invoke catches BaseException and hands it back as ``result.exception``: without
    this, a SIGTERM during ``dbt build`` would be reported as a dbt failure (exit 2, never
    retried) instead of exit 75.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, JobError | KeyboardInterrupt | SystemExit):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _raise_for(res: Any, what: str, logs: Path) -> None:
    """dbt's result as our exceptions. The database lost (refused, closed mid-build, shut
    down, a statement or lock timeout: ``db.connection_lost``) is TransientError (exit 75),
    whether dbt stopped on it (``FailedToConnectError``, ``DbtDatabaseError``) or a node
    failed on it: a re-run will say whether anything else was wrong (docs/faults.md 28)."""
    from jobs import db

    failures = _failures(res)
    if (interrupt := _interrupt_in(res.exception)) is not None:
        raise interrupt
    if res.exception is not None:
        text = db.redact(str(res.exception))
        if db.connection_lost(text) or _connection_error(res.exception):
            raise TransientError(f"{what}: dbt lost PostgreSQL: {_one_line(text)}")
        raise InputError(f"{what}: dbt stopped: {text}")
    if failures:
        lost = [f for f in failures if db.connection_lost(f["message"])]
        if lost:
            raise TransientError(
                f"{what}: dbt lost PostgreSQL ({len(lost)} of {len(failures)} failed nodes): "
                f"{_one_line(db.redact(lost[0]['message']))}"
            )
        names = ", ".join(f"{f['name']} ({f['status']})" for f in failures)
        raise InputError(
            f"{what} failed; fix the data or the models and run again. Failed: {names}. "
            f"Details: {logs / 'dbt.log'}"
        )
    if not res.success:
        raise InputError(f"{what}: dbt did not succeed (see {logs / 'dbt.log'})")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _connection_error(exc: BaseException | None) -> bool:
    """dbt's adapter could not connect, or psycopg2 (under dbt) lost the connection,
    somewhere in ``exc``'s chain."""
    import psycopg2
    from dbt.adapters.exceptions import FailedToConnectError

    lost = (FailedToConnectError, psycopg2.OperationalError, psycopg2.InterfaceError)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, lost):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# dbt commands that create or replace relations: they run under the dbt lock, so that an
# export reading the marts it has just built and tested never sees another run's tables.
_WRITING_COMMANDS = ("build", "run", "seed", "snapshot", "run-operation", "clone", "retry")


@contextlib.contextmanager
def relations_lock(cfg: Config) -> Iterator[None]:
    """Hold (waiting for it) the advisory lock that every dbt run writing relations takes.
    Its key is the dbt schema (``db.lock_parts``): configs sharing a dbt schema share it,
    whatever their ML schema."""
    from jobs import db

    with db.job_lock(cfg, "dbt", cfg.database.dbt_schema, wait=True):
        yield


def build(
    cfg: Config, select: str = TRAINING_SELECTION, *, quiet: bool = True, lock: bool = True
) -> dict[str, Any]:
    """``dbt build --select <select>``: models, tests, unit tests. Raises InputError naming
    every failed node when anything fails (a failing test never reaches a manifest).

    ``lock=False``: the caller already holds :func:`relations_lock` (the export keeps it from
    this build until it has read the marts)."""
    with relations_lock(cfg) if lock else contextlib.nullcontext():
        res = invoke(cfg, ["build", "--select", select], quiet=quiet)
    _raise_for(res, f"dbt build --select {select}", log_path(cfg))
    counts = _counts(res)
    log.info("dbt_built", select=select, **counts)
    return {"select": select, "results": counts}


def run_models(cfg: Config, select: str = TRAINING_SELECTION) -> dict[str, Any]:
    """``dbt run --select <select>``: (re)build models without tests."""
    with relations_lock(cfg):
        res = invoke(cfg, ["run", "--select", select], quiet=True)
    _raise_for(res, f"dbt run --select {select}", log_path(cfg))
    return {"select": select, "results": _counts(res)}


def cli(cfg: Config, args: list[str]) -> dict[str, Any]:
    """``airatings dbt <args>``: any dbt command with the config's profile and vars."""
    if not args:
        raise InputError(
            "give a dbt command, e.g. 'airatings dbt build' or 'airatings dbt docs generate'"
        )
    words = _command_words(args)
    writes = bool(words) and words[0] in _WRITING_COMMANDS
    with relations_lock(cfg) if writes else contextlib.nullcontext():
        res = invoke(cfg, list(args))
    what = "dbt " + " ".join(words)
    _raise_for(res, what, log_path(cfg))
    summary: dict[str, Any] = {"command": what, "results": _counts(res)}
    if words[:2] == ["docs", "generate"]:
        summary["docs"] = str(target_path(cfg) / "index.html")
    return summary
