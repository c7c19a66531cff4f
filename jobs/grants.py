"""Least privilege and the scorer's database side, applied by `airatings migrate` after the
migrations, every time (idempotent).

The roles (migration 0050, NOLOGIN; an operator grants them to login users):

- ``airatings_export``: reads the app's tables; builds dbt's views in ``database.dbt_schema``;
  reads and writes the project's tables (the run row, the label rows).
- ``airatings_train``: reads the app's tables; reads and writes the project's tables
  (cache, train, evaluate, export-onnx, register).
- ``airatings_score``: reads ``webcam_snapshots``, ``webcams`` and the inference rows, the
  registry and the image index; inserts ``snapshot_ai_inferences`` rows; may update only
  ``webcams.ai_rating`` and ``webcams.ai_model_version`` (a column grant, no table-level
  UPDATE); records its failures in ``score_failures``.
- ``airatings_review``: reads everything; writes relabels (``manual_relabels``), its review
  cycles, items and imports, and its cycles' rows in ``model_evaluations``.

Here, on the app's schema (``database.app_schema``), when its tables exist (the demo creates
them after the first migrate; the next migrate, which every release starts with, grants):

- a unique index ``(snapshot_id, model_version)`` on ``snapshot_ai_inferences`` unless one
  exists: one row per snapshot and version, so a re-run, a second shard or the app's Node
  cron racing the Python scorer (``insert ... on conflict do nothing``) adds nothing twice.
  Existing duplicates stop the migrate with their count (the app's data: not ours to delete);
- ``<ml_schema>.refresh_webcam_ai(webcam_ids, model_version)``, the one implementation of the
  webcam fields' update both scorers call (Python and Node): each webcam gets the aiRating of
  its newest scored snapshot (by ``captured_at``) for that version, and only if the version
  is not older than the one already there. Order of versions
  (``<ml_schema>.model_version_rank``): the latest time it was made ``production`` (its
  alias history id), then its run id; a version the registry does not know ranks lowest, so
  an older model finishing late never overwrites a newer one, and a rolled-back-to version
  does (its promotion is newer). ``refresh_webcam_ai(webcam_ids, model_version,
  snapshot_ids)``, what the Python scorer calls with its batch's snapshots, gives the same
  result at the cost of the batch, not of the history: it keeps each webcam's newest scored
  snapshot per version in ``<ml_schema>.webcam_ai_newest`` (migration 0070) and folds the
  batch's rows into it; a webcam without that row, or whose row's snapshot or inference row is
  gone or changed, is recomputed from its history once. The two-argument form (the app's Node
  cron) recomputes from the history every time, and rewrites that row too. Both assume what
  docs/faults.md 22 asks: whoever inserts inference rows refreshes their webcams in the same
  transaction. The webcam rows are locked in id order first, so two scorers
  of the same version serialise and the later one sees the earlier one's rows (``for no key
update``: ``for update`` would conflict with the key-share locks the inference rows' foreign
key checks hold, and two shards writing for one webcam would deadlock).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jobs import logs
from jobs.errors import InputError

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config

ROLES = ("airatings_export", "airatings_train", "airatings_score", "airatings_review")
APP_TABLES = ("webcams", "webcam_snapshots", "webcam_snapshot_ratings", "snapshot_ai_inferences")
SCORER_COLUMNS = ("ai_rating", "ai_model_version")
INFERENCE_KEY = "snapshot_ai_inferences_snapshot_version_key"


def existing_roles(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("select rolname from pg_roles where rolname = any(%s)", (list(ROLES),))
    return {r[0] for r in rows}


def app_tables_present(conn: psycopg.Connection, schema: str) -> bool:
    (n,) = conn.execute(
        "select count(*) from information_schema.tables"
        " where table_schema = %s and table_name = any(%s)",
        (schema, list(APP_TABLES)),
    ).fetchone()
    return n == len(APP_TABLES)


def apply(cfg: Config, conn: psycopg.Connection) -> dict[str, Any]:
    """Grants, the inference key and the webcam-fields function (module doc); in one
    transaction. Returns what was done."""
    from psycopg import sql

    log = logs.get_logger()
    ml, app = cfg.database.ml_schema, cfg.database.app_schema
    m, a = sql.Identifier(ml), sql.Identifier(app)
    roles = existing_roles(conn)
    out: dict[str, Any] = {"roles": sorted(roles), "app_tables": False}
    missing = sorted(set(ROLES) - roles)
    if missing:
        log.warning(
            "roles_missing", roles=missing, hint="create them (NOLOGIN), then migrate again"
        )
    with conn.transaction():

        def grant(statement: str, role: str, **names: Any) -> None:
            if role in roles:
                conn.execute(sql.SQL(statement).format(role=sql.Identifier(role), **names))

        for role in ("airatings_export", "airatings_train"):
            grant("grant usage on schema {m} to {role}", role, m=m)
            grant(
                "grant select, insert, update, delete on all tables in schema {m} to {role}",
                role,
                m=m,
            )
            grant("grant usage, select on all sequences in schema {m} to {role}", role, m=m)
        grant("grant usage on schema {m} to {role}", "airatings_review", m=m)
        grant("grant select on all tables in schema {m} to {role}", "airatings_review", m=m)
        grant(
            "grant insert, update on {m}.manual_relabels, {m}.review_cycles, {m}.review_items,"
            " {m}.review_imports, {m}.model_evaluations to {role}",
            "airatings_review",
            m=m,
        )
        grant(
            "grant usage, select on all sequences in schema {m} to {role}", "airatings_review", m=m
        )
        grant("grant usage on schema {m} to {role}", "airatings_score", m=m)
        grant(
            "grant select on {m}.model_training_runs, {m}.model_aliases, {m}.model_alias_history,"
            " {m}.image_cache to {role}",
            "airatings_score",
            m=m,
        )
        grant(
            "grant select, insert, update, delete on {m}.score_failures to {role}",
            "airatings_score",
            m=m,
        )
        dbt_schema = cfg.database.dbt_schema
        if conn.execute(
            "select 1 from information_schema.schemata where schema_name = %s", (dbt_schema,)
        ).fetchone():
            d = sql.Identifier(dbt_schema)
            grant("grant usage, create on schema {d} to {role}", "airatings_export", d=d)
            # review builds its two marts (dbt) and reads them
            grant("grant usage, create on schema {d} to {role}", "airatings_review", d=d)
            grant("grant select on all tables in schema {d} to {role}", "airatings_review", d=d)

        if not app_tables_present(conn, app):
            log.info(
                "app_grants_deferred", app_schema=app, reason="the app's tables are not there yet"
            )
            return out
        out["app_tables"] = True
        ensure_inference_key(conn, app)
        install_functions(conn, ml, app)
        tables = sql.SQL(", ").join(
            sql.SQL("{}.{}").format(a, sql.Identifier(t)) for t in APP_TABLES
        )
        for role in ("airatings_export", "airatings_train", "airatings_review"):
            grant("grant usage on schema {a} to {role}", role, a=a)
            grant("grant select on {tables} to {role}", role, tables=tables)
        grant("grant usage on schema {a} to {role}", "airatings_score", a=a)
        grant(
            "grant select on {a}.webcams, {a}.webcam_snapshots, {a}.snapshot_ai_inferences to {role}",
            "airatings_score",
            a=a,
        )
        # --backfill picks the rated snapshots: which snapshot has a rating, not who gave it
        grant(
            "grant select (snapshot_id) on {a}.webcam_snapshot_ratings to {role}",
            "airatings_score",
            a=a,
        )
        # least privilege: no table-level UPDATE on webcams, only the two AI columns
        grant("revoke update on {a}.webcams from {role}", "airatings_score", a=a)
        grant(
            "grant update (ai_rating, ai_model_version) on {a}.webcams to {role}",
            "airatings_score",
            a=a,
        )
        grant("grant insert on {a}.snapshot_ai_inferences to {role}", "airatings_score", a=a)
        seq = conn.execute(
            "select pg_get_serial_sequence(%s, 'id')", (f'"{app}"."snapshot_ai_inferences"',)
        ).fetchone()[0]
        if seq:
            grant("grant usage on sequence {seq} to {role}", "airatings_score", seq=sql.SQL(seq))
        grant(
            "grant execute on function {m}.refresh_webcam_ai(bigint[], text),"
            " {m}.refresh_webcam_ai(bigint[], text, bigint[]),"
            " {m}.webcam_ai_recompute(bigint[], text), {m}.webcam_ai_apply(bigint[], text),"
            " {m}.model_version_rank(text) to {role}",
            "airatings_score",
            m=m,
        )
        grant(
            "grant select, insert, update, delete on {m}.webcam_ai_newest to {role}",
            "airatings_score",
            m=m,
        )
    return out


def ensure_inference_key(conn: psycopg.Connection, app: str) -> None:
    """A unique index on snapshot_ai_inferences (snapshot_id, model_version), unless the app
    has one already (any name)."""
    from psycopg import sql

    has_key = conn.execute(
        """
        select 1 from pg_index i
        join pg_class c on c.oid = i.indrelid
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = %s and c.relname = 'snapshot_ai_inferences' and i.indisunique
          and i.indpred is null
          and (select array_agg(a.attname::text order by a.attname)
               from pg_attribute a where a.attrelid = c.oid and a.attnum = any(i.indkey))
              = array['model_version', 'snapshot_id']
        """,
        (app,),
    ).fetchone()
    if has_key:
        return
    t = sql.SQL("{}.snapshot_ai_inferences").format(sql.Identifier(app))
    (dupes,) = conn.execute(
        sql.SQL(
            "select count(*) from (select 1 from {} group by snapshot_id, model_version"
            " having count(*) > 1) d"
        ).format(t)
    ).fetchone()
    if dupes:
        raise InputError(
            f"{app}.snapshot_ai_inferences holds {dupes} (snapshot_id, model_version) pairs with "
            "more than one row; the scorer needs them unique. Keep one row per pair (the app's "
            "data: airatings does not delete it), then run 'airatings migrate' again"
        )
    conn.execute(
        sql.SQL("create unique index {} on {} (snapshot_id, model_version)").format(
            sql.Identifier(INFERENCE_KEY), t
        )
    )


FUNCTIONS = """
create or replace function {m}.model_version_rank(version text) returns bigint[]
language sql stable
as $fn$
    select array[
        coalesce((select max(h.id) from {m}.model_alias_history h
                  where h.alias = 'production' and h.to_version = version), 0),
        coalesce((select r.id from {m}.model_training_runs r where r.model_version = version), 0)
    ]
$fn$;

create or replace function {m}.webcam_ai_recompute(webcam_ids bigint[], version text)
returns void
language sql
as $fn$
    -- the webcams' newest scored snapshots for the version, from all their inference rows
    delete from {m}.webcam_ai_newest
    where webcam_id = any(webcam_ids) and model_version = version;
    insert into {m}.webcam_ai_newest (webcam_id, model_version, snapshot_id, captured_at, ai_rating)
    select distinct on (i.webcam_id) i.webcam_id, version, s.id, s.captured_at, i.ai_rating
    from {a}.snapshot_ai_inferences i
    join {a}.webcam_snapshots s on s.id = i.snapshot_id
    where i.webcam_id = any(webcam_ids) and i.model_version = version
    order by i.webcam_id, s.captured_at desc, s.id desc;
$fn$;

create or replace function {m}.webcam_ai_apply(webcam_ids bigint[], version text)
returns integer
language plpgsql
as $fn$
declare
    changed integer;
begin
    update {a}.webcams w
    set ai_rating = n.ai_rating, ai_model_version = version
    from {m}.webcam_ai_newest n
    where n.webcam_id = any(webcam_ids) and n.model_version = version
      and w.id = n.webcam_id
      and (w.ai_model_version is null
           or w.ai_model_version = version
           or {m}.model_version_rank(w.ai_model_version) <= {m}.model_version_rank(version))
      and (w.ai_rating is distinct from n.ai_rating
           or w.ai_model_version is distinct from version);
    get diagnostics changed = row_count;
    return changed;
end;
$fn$;

-- the webcams' fields from all their inference rows for the version (what the app's Node
-- cron calls: it does not pass the batch's snapshots); cost: the webcams' history
create or replace function {m}.refresh_webcam_ai(webcam_ids bigint[], version text)
returns integer
language plpgsql
as $fn$
begin
    -- serialise with any other scorer on these webcams (id order: no deadlock); the next
    -- statement then sees what the one before us committed
    -- no key update: the inserts' foreign-key checks hold key-share locks on these rows
    perform 1 from {a}.webcams where id = any(webcam_ids) order by id for no key update;
    perform {m}.webcam_ai_recompute(webcam_ids, version);
    return {m}.webcam_ai_apply(webcam_ids, version);
end;
$fn$;

-- the same result from the batch's own rows (snapshot_ids: the batch's snapshots) and each
-- webcam's newest row so far (webcam_ai_newest); cost: the batch, not the history. A webcam
-- without that row, or whose row's snapshot or inference row is gone or changed, is
-- recomputed from its history (once).
create or replace function {m}.refresh_webcam_ai(
    webcam_ids bigint[], version text, snapshot_ids bigint[]
)
returns integer
language plpgsql
as $fn$
declare
    stale bigint[];
begin
    perform 1 from {a}.webcams where id = any(webcam_ids) order by id for no key update;
    select coalesce(array_agg(w.id), '{{}}') into stale
    from (select distinct unnest(webcam_ids) as id) w
    left join {m}.webcam_ai_newest n on n.webcam_id = w.id and n.model_version = version
    left join {a}.snapshot_ai_inferences i
      on i.snapshot_id = n.snapshot_id and i.model_version = version
    left join {a}.webcam_snapshots s on s.id = n.snapshot_id
    where n.webcam_id is null or i.id is null or s.id is null
       or i.webcam_id <> n.webcam_id or s.captured_at <> n.captured_at
       or i.ai_rating <> n.ai_rating;
    if cardinality(stale) > 0 then
        perform {m}.webcam_ai_recompute(stale, version);
    end if;
    insert into {m}.webcam_ai_newest as n
        (webcam_id, model_version, snapshot_id, captured_at, ai_rating)
    select distinct on (i.webcam_id) i.webcam_id, version, s.id, s.captured_at, i.ai_rating
    from {a}.snapshot_ai_inferences i
    join {a}.webcam_snapshots s on s.id = i.snapshot_id
    where i.snapshot_id = any(snapshot_ids) and i.model_version = version
      and i.webcam_id = any(webcam_ids) and not i.webcam_id = any(stale)
    order by i.webcam_id, s.captured_at desc, s.id desc
    on conflict (webcam_id, model_version) do update
    set snapshot_id = excluded.snapshot_id, captured_at = excluded.captured_at,
        ai_rating = excluded.ai_rating
    where (excluded.captured_at, excluded.snapshot_id) > (n.captured_at, n.snapshot_id);
    return {m}.webcam_ai_apply(webcam_ids, version);
end;
$fn$;
"""


def install_functions(conn: psycopg.Connection, ml: str, app: str) -> None:
    from psycopg import sql

    conn.execute(
        sql.SQL(FUNCTIONS).format(m=sql.Identifier(ml), a=sql.Identifier(app))  # type: ignore[arg-type]
    )
