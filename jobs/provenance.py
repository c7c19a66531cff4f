"""Which labels, and which people's ratings behind them, trained a model version.

Every label row of a run (``model_training_snapshot_labels``, written by the export) carries
its split, source, value, the ids of the app's rating rows behind the value, the reviewed
label's id and the label formula's version. The cache step marks each row used or excluded
(with the cache's failure reason) in the transaction that moves the run to ``cached``, so
``model_training_labels_used`` is exactly what training read.

``airatings provenance VERSION [--snapshot ID]`` reads those rows back and compares them with
the labels the app's data gives today (dbt's ``int_labels_resolved_to_snapshots`` view), so a
person can answer "which human ratings trained version X" and "how many of its labels have
changed since".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg import sql

from jobs import db, runs
from jobs.errors import InputError
from jobs.logs import get_logger

if TYPE_CHECKING:
    import psycopg
    import pyarrow as pa

    from jobs.config import Config

log = get_logger()

LABELS = "model_training_snapshot_labels"
CURRENT_LABELS_VIEW = "int_labels_resolved_to_snapshots"
RATINGS_VIEW = "stg_app__webcam_snapshot_ratings"


# ---- written by the cache step ---------------------------------------------------------------


def record_label_use(
    conn: psycopg.Connection, cfg: Config, run_id: int, excluded: pa.Table, used_rows: int
) -> dict[str, int]:
    """Mark every label row of the run used, then the ``excluded`` ones (columns snapshot_id,
    reason) not used with their reason; inside the caller's transaction.

    Refuses (InputError, rolling the caller back) when the rows marked used do not number
    ``used_rows``, the active manifests' row count: the record must equal what training reads.
    """
    labels = runs.table(cfg, LABELS)
    conn.execute(
        sql.SQL(
            "update {} set used_in_training = true, exclusion_reason = null"
            " where training_run_id = %s"
        ).format(labels),
        (run_id,),
    )
    conn.execute(
        "create temp table airatings_excluded (snapshot_id bigint primary key, reason text not null)"
        " on commit drop"
    )
    with conn.cursor() as cur, cur.copy("copy airatings_excluded from stdin") as cp:
        for sid, reason in zip(
            excluded.column("snapshot_id").to_pylist(),
            excluded.column("reason").to_pylist(),
            strict=True,
        ):
            cp.write_row((sid, reason))
    marked = conn.execute(
        sql.SQL(
            "update {} as l set used_in_training = false, exclusion_reason = e.reason"
            " from airatings_excluded as e"
            " where l.training_run_id = %s and l.snapshot_id = e.snapshot_id"
        ).format(labels),
        (run_id,),
    ).rowcount
    used = conn.execute(
        sql.SQL(
            "select count(*) filter (where used_in_training), count(*) from {}"
            " where training_run_id = %s"
        ).format(labels),
        (run_id,),
    ).fetchone()
    if marked != excluded.num_rows or used[0] != used_rows:
        raise InputError(
            f"run {run_id}: the label rows do not match the active manifests "
            f"({used[0]} of {used[1]} rows would be marked used, the manifests hold {used_rows}; "
            f"{marked} of {excluded.num_rows} exclusions matched a label row); nothing was changed"
        )
    return {"used": used[0], "excluded": marked, "offered": used[1]}


# ---- read back ------------------------------------------------------------------------------


def _view_exists(conn: psycopg.Connection, cfg: Config, name: str) -> bool:
    qualified = sql.Identifier(cfg.database.dbt_schema, name).as_string(conn)
    return conn.execute("select to_regclass(%s) is not null", (qualified,)).fetchone()[0]


def _dbt(cfg: Config, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(cfg.database.dbt_schema), sql.Identifier(name))


def _current_labels(cfg: Config) -> sql.Composed:
    """Today's label per snapshot (the first row of an id the app duplicated, as the mart)."""
    return sql.SQL(
        "(select distinct on (snapshot_id) snapshot_id, label_source, label_value, rating_ids,"
        " relabel_id, label_formula_version from {} order by snapshot_id, captured_at)"
    ).format(_dbt(cfg, CURRENT_LABELS_VIEW))


def summary(conn: psycopg.Connection, cfg: Config, run: runs.Run) -> dict[str, Any]:
    labels = runs.table(cfg, LABELS)
    rid = (run.id,)
    total, used, excluded, undecided, ratings_behind, relabelled = conn.execute(
        sql.SQL(
            "select count(*), count(*) filter (where used_in_training),"
            " count(*) filter (where not used_in_training),"
            " count(*) filter (where used_in_training is null),"
            " coalesce(sum(cardinality(rating_ids)) filter (where used_in_training), 0),"
            " count(relabel_id) filter (where used_in_training)"
            " from {} where training_run_id = %s"
        ).format(labels),
        rid,
    ).fetchone()
    reasons = dict(
        conn.execute(
            sql.SQL(
                "select exclusion_reason, count(*) from {} where training_run_id = %s"
                " and not used_in_training group by 1 order by 2 desc, 1"
            ).format(labels),
            rid,
        ).fetchall()
    )
    by_split = {
        split: {"offered": n, "used": u}
        for split, n, u in conn.execute(
            sql.SQL(
                "select split, count(*), count(*) filter (where used_in_training) from {}"
                " where training_run_id = %s group by 1 order by 1"
            ).format(labels),
            rid,
        )
    }
    sources = dict(
        conn.execute(
            sql.SQL(
                "select label_source, count(*) from {} where training_run_id = %s"
                " and used_in_training group by 1 order by 1"
            ).format(labels),
            rid,
        ).fetchall()
    )
    formulas = sorted(
        v
        for (v,) in conn.execute(
            sql.SQL(
                "select distinct label_formula_version from {} where training_run_id = %s"
            ).format(labels),
            rid,
        )
    )
    out: dict[str, Any] = {
        "model_version": run.model_version,
        "run_id": run.id,
        "run_status": run.status,
        "dataset_hash": run.dataset_hash,
        "labels": {
            "offered": total,
            "used": used,
            "excluded": excluded,
            "not_cached_yet": undecided,
            "excluded_by_reason": reasons,
            "by_split": by_split,
            "used_by_source": sources,
            "label_formula_versions": formulas,
        },
        "ratings": {"behind_used_labels": int(ratings_behind), "reviewed_labels": relabelled},
    }
    if undecided:
        out["note"] = (
            f"{undecided} label rows are not marked used or excluded yet: run "
            f"'airatings cache --run {run.model_version}'"
        )
    if not _view_exists(conn, cfg, CURRENT_LABELS_VIEW) or not _view_exists(
        conn, cfg, RATINGS_VIEW
    ):
        out["changed_since"] = {
            "status": "unavailable",
            "reason": f"dbt's {CURRENT_LABELS_VIEW} is not built: run 'airatings dbt build'",
        }
        return out
    people, ratings_gone = conn.execute(
        sql.SQL(
            "select count(distinct r.user_id), count(*) filter (where r.rating_id is null)"
            " from {} as l cross join lateral unnest(l.rating_ids) as u(rating_id)"
            " left join {} as r on r.rating_id = u.rating_id"
            " where l.training_run_id = %s and l.used_in_training"
        ).format(labels, _dbt(cfg, RATINGS_VIEW)),
        rid,
    ).fetchone()
    out["ratings"]["people"] = people
    out["ratings"]["no_longer_in_app"] = ratings_gone
    changed = conn.execute(
        sql.SQL(
            "select count(*) filter (where c.snapshot_id is null),"
            " count(*) filter (where c.snapshot_id is not null"
            "   and c.label_value is distinct from l.label_value),"
            " count(*) filter (where c.snapshot_id is not null"
            "   and c.label_source is distinct from l.label_source),"
            " count(*) filter (where c.snapshot_id is not null"
            "   and c.rating_ids is distinct from l.rating_ids),"
            " count(*) filter (where c.snapshot_id is not null"
            "   and c.label_formula_version is distinct from l.label_formula_version)"
            " from {} as l left join {} as c on c.snapshot_id = l.snapshot_id"
            " where l.training_run_id = %s and l.used_in_training"
        ).format(labels, _current_labels(cfg)),
        rid,
    ).fetchone()
    out["changed_since"] = {
        "status": "ok",
        "snapshots_gone": changed[0],
        "label_value_changed": changed[1],
        "label_source_changed": changed[2],
        "ratings_changed": changed[3],
        "formula_version_changed": changed[4],
    }
    return out


def snapshot_detail(
    conn: psycopg.Connection, cfg: Config, run: runs.Run, snapshot_id: int
) -> dict[str, Any]:
    """One label row of the run, the ratings behind it as the app holds them now, and the
    label the snapshot would get today."""
    row = conn.execute(
        sql.SQL(
            "select split, label_source, label_value, rating_ids, relabel_id,"
            " label_formula_version, used_in_training, exclusion_reason, included_at"
            " from {} where training_run_id = %s and snapshot_id = %s"
        ).format(runs.table(cfg, LABELS)),
        (run.id, snapshot_id),
    ).fetchone()
    if row is None:
        raise InputError(
            f"snapshot {snapshot_id} is not among the labels of {run.model_version} "
            "(it did not pass the export's gates, or it is not in the app's data)"
        )
    split, source, value, rating_ids, relabel_id, formula, used, reason, included_at = row
    out: dict[str, Any] = {
        "snapshot_id": snapshot_id,
        "split": split,
        "label_source": source,
        "label_value": value,
        "label_formula_version": formula,
        "relabel_id": relabel_id,
        "used_in_training": used,
        "exclusion_reason": reason,
        "included_at": included_at.isoformat(),
        "rating_ids": list(rating_ids),
    }
    if _view_exists(conn, cfg, RATINGS_VIEW):
        found = {
            r[0]: {"rating_id": r[0], "user_id": r[1], "rating": r[2], "rated_at": r[3].isoformat()}
            for r in conn.execute(
                sql.SQL(
                    "select rating_id, user_id, rating, rated_at from {}"
                    " where rating_id = any(%s) order by rating_id"
                ).format(_dbt(cfg, RATINGS_VIEW)),
                (list(rating_ids),),
            )
        }
        out["ratings"] = [found.get(i, {"rating_id": i, "status": "deleted"}) for i in rating_ids]
    if _view_exists(conn, cfg, CURRENT_LABELS_VIEW):
        now = conn.execute(
            sql.SQL(
                "select label_source, label_value, rating_ids, relabel_id, label_formula_version"
                " from {} as c where snapshot_id = %s"
            ).format(_current_labels(cfg)),
            (snapshot_id,),
        ).fetchone()
        out["now"] = (
            {"status": "gone"}
            if now is None
            else {
                "label_source": now[0],
                "label_value": now[1],
                "rating_ids": list(now[2]),
                "relabel_id": now[3],
                "label_formula_version": now[4],
                "changed": (now[0], now[1], list(now[2])) != (source, value, list(rating_ids)),
            }
        )
    return out


def run(cfg: Config, run_ref: str | int, snapshot: int | None = None) -> dict[str, Any]:
    """`airatings provenance VERSION [--snapshot ID]` (``run_ref``: a model version, a run id
    or "latest")."""
    with db.connect(cfg) as conn:
        run = runs.get_run(conn, cfg, run_ref)
        if snapshot is not None:
            return {
                "status": "done",
                "model_version": run.model_version,
                "snapshot": snapshot_detail(conn, cfg, run, snapshot),
            }
        return {"status": "done", **summary(conn, cfg, run)}
