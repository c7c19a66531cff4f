"""A small deterministic app world for the dbt and export tests (no demo generator needed).

``world_db`` creates a database on the session's embedded server, migrates it, runs the app
table mirror (jobs/demo/app_schema.sql) and inserts a few hundred webcams/snapshots/ratings
with the faults the gates must catch (missing, foreign-scheme and malformed URLs, too few
ratings, a repeated image URL, an exactly duplicated rating row) plus two manual relabels.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from conftest import BASELINE, REPO, air_env, with_dbname
from psycopg import sql

from jobs import db
from jobs.config import Config, load_config

APP_SCHEMA_SQL = REPO / "jobs" / "demo" / "app_schema.sql"
START = datetime(2026, 1, 1, tzinfo=UTC)


def make_config(url: str, tmp: Path, **overrides: object) -> Config:
    return load_config(BASELINE, env=air_env(url, tmp, **overrides))


@contextlib.contextmanager
def scratch_database(pg_server: str) -> Iterator[str]:
    name = f"x_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(pg_server, name)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )


def create_app_tables(cfg: Config) -> None:
    schema = cfg.database.app_schema
    with db.connect(cfg) as conn:
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("set search_path to {}").format(sql.Identifier(schema)))
        conn.execute(APP_SCHEMA_SQL.read_text())


def _t(cfg: Config, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(cfg.database.app_schema), sql.Identifier(name))


def seed_world(
    cfg: Config, *, snapshots: int = 300, webcams: int = 6, days: int = 12, seed: int = 1
) -> dict:
    """Insert a deterministic world; returns what was planted (ids by fault)."""
    rng = random.Random(seed)
    planted: dict[str, list[int]] = {
        "missing_url": [],
        "url_scheme_not_allowed": [],
        "url_malformed": [],
        "too_few_ratings": [],
        "duplicate_snapshot": [],
    }
    with db.connect(cfg) as conn:
        for w in range(1, webcams + 1):
            conn.execute(
                sql.SQL("insert into {} (id, name, region, source) values (%s, %s, %s, %s)").format(
                    _t(cfg, "webcams")
                ),
                (w, f"cam {w}", ["alps", "coast", "city"][w % 3], ["public", "partner"][w % 2]),
            )
        snap_rows, rating_rows = [], []
        for sid in range(1, snapshots + 1):
            w = rng.randint(1, webcams)
            phase = rng.choice(["sunrise", "sunset"])
            hour = 6 if phase == "sunrise" else 18
            at = START + timedelta(days=rng.randrange(days), hours=hour, minutes=rng.randrange(60))
            url = f"https://storage.example.com/snaps/{sid}.jpg"
            n = rng.randint(2, 6)
            if sid % 37 == 3:
                url = None
                planted["missing_url"].append(sid)
            elif sid % 41 == 5:
                url = f"ftp://storage.example.com/{sid}.jpg"
                planted["url_scheme_not_allowed"].append(sid)
            elif sid % 43 == 7:
                url = f"https://bad host/{sid}.jpg"
                planted["url_malformed"].append(sid)
            elif sid % 29 == 11:
                n = 1
                planted["too_few_ratings"].append(sid)
            elif sid % 53 == 13 and sid > 1:
                url = f"https://storage.example.com/snaps/{sid - 1}.jpg"
                planted["duplicate_snapshot"].append(sid)
            base = rng.uniform(0.5, 4.8)
            ratings = [max(0, min(5, round(rng.gauss(base, 0.8)))) for _ in range(n)]
            mean = sum(ratings) / n
            snap_rows.append((sid, w, url, phase, at, mean, n))
            for u, r in enumerate(ratings):
                rating_rows.append((sid, f"user{u}", r, at + timedelta(hours=1 + u)))
        # The app has been seen to write a rating row twice.
        rating_rows.append(rating_rows[0])
        with conn.cursor() as cur:
            with cur.copy(
                sql.SQL(
                    "copy {} (id, webcam_id, firebase_url, phase, captured_at, calculated_rating,"
                    " rating_count) from stdin"
                ).format(_t(cfg, "webcam_snapshots"))
            ) as cp:
                for row in snap_rows:
                    cp.write_row(row)
            with cur.copy(
                sql.SQL("copy {} (snapshot_id, user_id, rating, created_at) from stdin").format(
                    _t(cfg, "webcam_snapshot_ratings")
                )
            ) as cp:
                for row in rating_rows:
                    cp.write_row(row)
        for name in ("webcams", "webcam_snapshots"):
            conn.execute(
                sql.SQL(
                    "select setval(pg_get_serial_sequence(%s, 'id'), (select max(id) from {}))"
                ).format(_t(cfg, name)),
                (f"{cfg.database.app_schema}.{name}",),
            )
        # Reviewed labels: snapshot 2's current review wins; snapshot 4's was superseded.
        relabels = sql.SQL("{}.{}").format(
            sql.Identifier(cfg.database.ml_schema), sql.Identifier("manual_relabels")
        )
        conn.execute(
            sql.SQL(
                "insert into {} (snapshot_id, label_value, reviewer, created_at, superseded_at) values"
                " (2, 1.0, 'ann', '2026-02-01', '2026-02-02'),"
                " (2, 4.5, 'bob', '2026-02-02', null),"
                " (4, 0.5, 'ann', '2026-02-01', '2026-02-03')"
            ).format(relabels)
        )
    planted["manual_review"] = [2]
    return planted


def grow_world(cfg: Config, *, fraction: float = 0.1, seed: int = 2, days: int = 12) -> dict:
    """The app carries on: ~fraction new snapshots (with ratings) and new ratings on old ones."""
    rng = random.Random(seed)
    with db.connect(cfg) as conn:
        (count, max_id, webcams) = conn.execute(
            sql.SQL("select count(*), max(id), (select max(id) from {}) from {}").format(
                _t(cfg, "webcams"), _t(cfg, "webcam_snapshots")
            )
        ).fetchone()
        new = max(1, int(count * fraction))
        old_ids = [
            r[0]
            for r in conn.execute(sql.SQL("select id from {}").format(_t(cfg, "webcam_snapshots")))
        ]
        with conn.cursor() as cur:
            for i in range(new):
                sid = max_id + 1 + i
                at = START + timedelta(days=rng.randrange(days + 3), hours=rng.choice([6, 18]))
                n = rng.randint(2, 5)
                ratings = [rng.randint(0, 5) for _ in range(n)]
                cur.execute(
                    sql.SQL(
                        "insert into {} (id, webcam_id, firebase_url, phase, captured_at,"
                        " calculated_rating, rating_count) values (%s, %s, %s, %s, %s, %s, %s)"
                    ).format(_t(cfg, "webcam_snapshots")),
                    (sid, rng.randint(1, webcams), f"https://storage.example.com/new/{seed}/{sid}.jpg",
                     "sunset", at, sum(ratings) / n, n),
                )  # fmt: skip
                for u, r in enumerate(ratings):
                    cur.execute(
                        sql.SQL(
                            "insert into {} (snapshot_id, user_id, rating) values (%s, %s, %s)"
                        ).format(_t(cfg, "webcam_snapshot_ratings")),
                        (sid, f"user{u}", r),
                    )
            for sid in rng.sample(old_ids, max(1, len(old_ids) // 10)):
                cur.execute(
                    sql.SQL(
                        "insert into {} (snapshot_id, user_id, rating) values (%s, %s, %s)"
                    ).format(_t(cfg, "webcam_snapshot_ratings")),
                    (sid, f"late{seed}", rng.randint(0, 5)),
                )
    return {"new_snapshots": new}


@contextlib.contextmanager
def world(
    pg_server: str, tmp: Path, *, snapshots: int = 300, **overrides: object
) -> Iterator[tuple[Config, dict]]:
    """A fresh migrated database with the app tables and a seeded world."""
    with scratch_database(pg_server) as url:
        cfg = make_config(url, tmp, **overrides)
        db.migrate(cfg)
        create_app_tables(cfg)
        planted = seed_world(cfg, snapshots=snapshots)
        yield cfg, planted


def drop_app_constraints(cfg: Config) -> None:
    """Drop the mirror's PK/FK constraints so that bad app data can be inserted."""
    with db.connect(cfg) as conn:
        rows = conn.execute(
            "select t.relname, c.conname from pg_constraint c"
            " join pg_class t on t.oid = c.conrelid"
            " join pg_namespace n on n.oid = c.connamespace"
            " where n.nspname = %s and c.contype in ('p', 'f') order by c.contype asc",
            (cfg.database.app_schema,),
        ).fetchall()
        for table, name in rows:  # foreign keys first, then primary keys
            conn.execute(
                sql.SQL("alter table {} drop constraint if exists {}").format(
                    _t(cfg, table), sql.Identifier(name)
                )
            )
