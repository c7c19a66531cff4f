"""The training-run record shared by every lifecycle job: find a run, move its status, add
provenance, mark it failed. Jobs talk only through Postgres and the artifact store.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg import sql

from jobs import db, logs
from jobs.errors import InputError

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config

# Lifecycle order; 'failed' is terminal for a run.
STATUSES = ("exported", "cached", "trained", "evaluated", "onnx_exported", "registered")


@dataclass(frozen=True)
class Run:
    id: int
    model_version: str
    status: str
    dataset_hash: str | None
    config_hash: str
    params: dict[str, Any]

    def reached(self, status: str) -> bool:
        """True if the run is at or past ``status`` in the lifecycle (never for failed runs)."""
        if self.status == "failed":
            return False
        return STATUSES.index(self.status) >= STATUSES.index(status)


def table(cfg: Config, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(cfg.database.ml_schema), sql.Identifier(name))


def _row_to_run(row: tuple) -> Run:
    rid, version, status, dataset_hash, config_hash, params = row
    return Run(rid, version, status, dataset_hash, config_hash, params or {})


def get_run(conn: psycopg.Connection, cfg: Config, run_ref: str | int = "latest") -> Run:
    """Resolve ``latest`` (newest non-failed run), a numeric id or a model version name."""
    cols = sql.SQL("id, model_version, status, dataset_hash, config_hash, params_json")
    runs = table(cfg, "model_training_runs")
    ref_s = str(run_ref)
    if ref_s == "latest":
        q = sql.SQL("select {} from {} where status <> 'failed' order by id desc limit 1").format(
            cols, runs
        )
        row = conn.execute(q).fetchone()
    elif ref_s.isdigit():
        row = conn.execute(
            sql.SQL("select {} from {} where id = %s").format(cols, runs), (int(ref_s),)
        ).fetchone()
    else:
        row = conn.execute(
            sql.SQL("select {} from {} where model_version = %s").format(cols, runs), (ref_s,)
        ).fetchone()
    if row is None:
        raise InputError(f"no training run matches {ref_s!r}; run 'airatings export' first")
    return _row_to_run(row)


@contextlib.contextmanager
def claim(cfg: Config, job: str, run_ref: str | int) -> Iterator[tuple[Run, dict[str, Any] | None]]:
    """Resolve the run, bind its log context and hold the (job, run) advisory lock.

    Yields ``(run, None)`` while the lock is held, the run re-read under the lock (a twin that
    finished first may have moved it on), or ``(run, summary)`` with a ``skipped`` summary when
    another process holds it: the caller returns that summary (exit 0, docs/faults.md 1).
    """
    with db.connect(cfg, autocommit=True) as conn:
        run = get_run(conn, cfg, run_ref)
    logs.bind(run_id=run.id, model_version=run.model_version)
    with db.job_lock(cfg, job, run.id) as held:
        if not held:
            msg = f"another 'airatings {job}' holds run {run.model_version}; nothing to do"
            logs.get_logger().info(f"{job}_skipped_locked", reason=msg)
            yield run, {"status": "skipped", "model_version": run.model_version, "reason": msg}
            return
        with db.connect(cfg, autocommit=True) as conn:
            run = get_run(conn, cfg, run.id)
        yield run, None


def require(run: Run, status: str) -> None:
    if run.status == "failed":
        raise InputError(
            f"run {run.model_version} is marked failed; start a new one with 'airatings export'"
        )
    if not run.reached(status):
        raise InputError(f"run {run.model_version} is '{run.status}', needs '{status}' first")


def set_status(
    conn: psycopg.Connection,
    cfg: Config,
    run_id: int,
    status: str,
    *,
    step: str | None = None,
    summary: dict[str, Any] | None = None,
    **columns: Any,
) -> None:
    """Move a run to ``status`` and merge ``summary`` into ``params_json[step]``.

    Never moves a run backwards (a re-run of an earlier step leaves a later status alone).
    Extra keyword columns (``artifact_sha256``, ``trained_at``...) are set as given.

    This is every step's final write: it first checks that the job's advisory locks are still
    held (:func:`jobs.db.check_locks`; TransientError, exit 75, and nothing written if not).
    """
    if status not in STATUSES:
        raise ValueError(status)
    db.check_locks()
    runs = table(cfg, "model_training_runs")
    sets = [sql.SQL("updated_at = now()")]
    params: list[Any] = []
    if summary is not None:
        sets.append(sql.SQL("params_json = params_json || jsonb_build_object(%s::text, %s::jsonb)"))
        params += [step or status, json.dumps(summary, default=str)]
    for col, val in columns.items():
        sets.append(sql.SQL("{} = %s").format(sql.Identifier(col)))
        params.append(val)
    # status only moves forward
    sets.append(
        sql.SQL(
            "status = case when status = 'failed' then status"
            " when array_position(%s::text[], status) >= array_position(%s::text[], %s) then status"
            " else %s end"
        )
    )
    params += [list(STATUSES), list(STATUSES), status, status]
    q = sql.SQL("update {} set {} where id = %s").format(runs, sql.SQL(", ").join(sets))
    conn.execute(q, [*params, run_id])


def mark_failed(conn: psycopg.Connection, cfg: Config, run_id: int, reason: str) -> None:
    """Mark the run failed (terminal). Not while a lock is lost: a twin holding it now may
    finish the run, and 'failed' would stick (:func:`jobs.db.check_locks`)."""
    db.check_locks()
    conn.execute(
        sql.SQL(
            "update {} set status = 'failed', failure_reason = %s, updated_at = now() where id = %s"
        ).format(table(cfg, "model_training_runs")),
        (reason[:2000], run_id),
    )


def verify_recorded(path: Path, expected: str | None, *, what: str, fix: str) -> Path:
    """``path`` as the step that wrote it recorded it: present and with that sha256. Missing,
    unrecorded or changed is an InputError (exit 2) naming the file and the command that fixes
    it: every artifact a job reads is verified against the sha256 recorded when it was
    written (docs/faults.md 31)."""
    from jobs.artifacts import sha256_file

    if not path.is_file():
        raise InputError(f"{path} is missing; {fix}")
    if not expected:
        raise InputError(f"{path}: the run records no sha256 for the {what}; {fix}")
    actual = sha256_file(path)
    if actual != expected:
        raise InputError(
            f"{path} changed after it was written (sha256 {actual[:16]}..., the run records "
            f"{expected[:16]}... for the {what}); refusing to read it. {fix}"
        )
    return path


def verified_best_checkpoint(cfg: Config, run: Run, *, then: str = "") -> Path:
    """The run's ``best.pt``, checked against the sha256 the train step recorded (runs trained
    before that was recorded are taken as they are). ``then``: what to run after retraining."""
    from jobs import paths

    best = paths.of(cfg).run(run.model_version).best_checkpoint
    trained = run.params.get("train") or {}
    if "best_checkpoint_sha256" in trained or not best.is_file():
        verify_recorded(
            best,
            trained.get("best_checkpoint_sha256"),
            what="best checkpoint",
            fix=f"run 'airatings train --run {run.model_version}' (it retrains when best.pt is "
            f"not the recorded file){then}",
        )
    return best
