"""A registered model and an app world to score: the app's tables with webcams and snapshots
whose images a real loopback HTTP server serves (the run's own test originals, plus faults),
and a login user that holds only ``airatings_score``.

Import explicitly: ``from score_fixtures import ScoringWorld, scoring_world``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow.parquet as pq
from cache_fixtures import Server, jpeg
from conftest import with_dbname
from export_fixtures import create_app_tables, make_config
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from registry_fixtures import SETTINGS, Registry, registry_for_test

from jobs import calibration, db, paths, registry
from jobs import register as register_job
from jobs.config import Config
from jobs.images import load_image

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
OVERRIDES = {"cache__allow_private_networks": True, "cache__max_attempts": 2,
             "cache__backoff_base_s": 0.01, "cache__backoff_max_s": 0.05}  # fmt: skip


@dataclass
class ScoringWorld:
    reg: Registry
    cfg: Config  # the owner's (migrations, setup)
    scorer_cfg: Config  # a login user with only airatings_score
    scorer_url: str
    tmp: Path
    server: Server
    version: str
    # snapshot id -> what it is ("good", or the fault it plants)
    kinds: dict[int, str] = field(default_factory=dict)
    webcam_of: dict[int, int] = field(default_factory=dict)
    captured: dict[int, dt.datetime] = field(default_factory=dict)
    originals: dict[int, Path] = field(default_factory=dict)

    def app(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(
            sql.Identifier(self.cfg.database.app_schema), sql.Identifier(name)
        )

    def inferences(self, version: str | None = None) -> dict[int, tuple]:
        with db.connect(self.cfg) as conn:
            rows = conn.execute(
                sql.SQL(
                    "select snapshot_id, webcam_id, model_version, raw_score, ai_rating,"
                    " gate_passed from {} where model_version = %s"
                ).format(self.app("snapshot_ai_inferences")),
                (version or self.version,),
            ).fetchall()
        return {r[0]: r for r in rows}

    def webcams(self) -> dict[int, tuple[float | None, str | None]]:
        with db.connect(self.cfg) as conn:
            rows = conn.execute(
                sql.SQL("select id, ai_rating, ai_model_version from {} order by id").format(
                    self.app("webcams")
                )
            ).fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def expected(self, version: str | None = None) -> dict[int, tuple[float, float]]:
        """(raw, aiRating) of every good snapshot, computed here independently: the verified
        model in a fresh onnxruntime session on load_image's array, the card's knots."""
        import onnxruntime as ort

        data, card = registry.read_verified(self.cfg, version or self.version)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        out = {}
        for sid, path in self.originals.items():
            arr = np.asarray(load_image(path, max_pixels=self.cfg.cache.max_pixels))
            (raw,) = session.run(["raw_score"], {"image": arr[None]})[0].tolist()
            out[sid] = (raw, float(calibration.apply(card["calibration"], raw)))
        return out


def login_url(url: str, user: str) -> str:
    parts = conninfo_to_dict(url)
    parts["user"] = user
    return make_conninfo(**parts)


def register(reg: Registry, version: str) -> None:
    reg.clone(version)
    out = register_job.run(reg.cfg, version)
    assert out["status"] == "registered", out


FAULTS = {
    "http_404": "/status/404",
    "not_an_image": "/html",
    "http_503": "/status/503",
}


@contextlib.contextmanager
def scoring_world(
    pg_server: str, tmp: Path, base: Any, server: Server, *, version: str = "score_v1"
) -> Iterator[ScoringWorld]:
    with registry_for_test(pg_server, tmp, base, **OVERRIDES) as reg:
        cfg = reg.cfg
        register(reg, version)
        create_app_tables(cfg)
        world = _plant(cfg, reg, tmp, server, version)
        db.migrate(cfg)  # the app's tables exist now: grants, key, functions
        user = f"scorer_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("create role {} login in role airatings_score").format(sql.Identifier(user))
            )
        world.scorer_url = login_url(with_dbname(pg_server, _dbname(cfg)), user)
        world.scorer_cfg = make_config(world.scorer_url, tmp, **{**SETTINGS, **OVERRIDES})
        try:
            yield world
        finally:
            with psycopg.connect(pg_server, autocommit=True) as conn:
                conn.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity where usename = %s",
                    (user,),
                )
                # it owns nothing and holds no privilege of its own: only the membership
                conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(user)))


def _dbname(cfg: Config) -> str:
    return conninfo_to_dict(db.database_url(cfg))["dbname"]


def _plant(cfg: Config, reg: Registry, tmp: Path, server: Server, version: str) -> ScoringWorld:
    """Three webcams; per webcam 4 good snapshots (the run's test originals, over HTTP) at
    distinct times in the last day, one 3-day-old good one (outside the default window), and
    the faults spread over them."""
    test = pq.read_table(paths.of(cfg).run(version).active_manifest("test")).to_pydict()
    originals = [cfg.artifacts_dir / p for p in test["image_path"]][:12]
    assert len(originals) == 12
    world = ScoringWorld(reg, cfg, cfg, "", tmp, server, version)
    app = world.app
    rows = []
    sid = 0
    for w in (1, 2, 3):
        for k in range(4):
            sid += 1
            path = originals[(w - 1) * 4 + k]
            url = server.add(f"s{sid}-{path.name}", path.read_bytes())
            rows.append((sid, w, url, NOW - dt.timedelta(hours=2 + 3 * k + w), "good"))
            world.originals[sid] = path
    sid += 1  # old: outside the default 24 h window, inside --backfill (it is rated)
    rows.append((sid, 1, server.add("old.jpg", jpeg(320, 180, seed=9)), NOW - dt.timedelta(days=3),
                 "old"))  # fmt: skip
    for w, (kind, route) in enumerate(FAULTS.items(), start=1):
        sid += 1
        rows.append((sid, w, server.url(route), NOW - dt.timedelta(minutes=30 + w), kind))
    sid += 1
    rows.append((sid, 2, None, NOW - dt.timedelta(minutes=20), "missing_url"))
    sid += 1
    truncated = jpeg(320, 180, seed=3)[:1500]
    rows.append((sid, 3, server.add("cut.jpg", truncated), NOW - dt.timedelta(minutes=10),
                 "truncated"))  # fmt: skip
    with db.connect(cfg) as conn:
        for w in (1, 2, 3):
            conn.execute(
                sql.SQL("insert into {} (id, name, region, source) values (%s, %s, 'north', 'x')")
                .format(app("webcams")),
                (w, f"cam {w}"),
            )  # fmt: skip
        for sid, w, url, at, kind in rows:
            conn.execute(
                sql.SQL(
                    "insert into {} (id, webcam_id, firebase_url, phase, captured_at,"
                    " calculated_rating, rating_count) values (%s, %s, %s, 'sunset', %s, 3, 2)"
                ).format(app("webcam_snapshots")),
                (sid, w, url, at),
            )
            if kind == "old":
                conn.execute(
                    sql.SQL(
                        "insert into {} (snapshot_id, user_id, rating) values (%s, 'u1', 3)"
                    ).format(app("webcam_snapshot_ratings")),
                    (sid,),
                )
            world.kinds[sid] = kind
            world.webcam_of[sid] = w
            world.captured[sid] = at
        conn.execute(
            sql.SQL("select setval(pg_get_serial_sequence(%s, 'id'), 100)"),
            (app("webcam_snapshots").as_string(conn),),
        )
    return world


def rows_read(cfg, table: str, *, index: bool = True) -> int:
    """Rows an app table has given to scans so far (sequential, and index fetches unless
    ``index=False``), once the counts stop moving (each backend reports its counts when it
    exits)."""
    import time

    from jobs import db

    columns = "coalesce(seq_tup_read, 0)" + (" + coalesce(idx_tup_fetch, 0)" if index else "")
    last = None
    for _ in range(40):
        with db.connect(cfg, autocommit=True) as conn:
            conn.execute("select pg_stat_clear_snapshot()")
            (now,) = conn.execute(
                f"select {columns} from pg_stat_user_tables"  # noqa: S608 - two fixed spellings
                " where schemaname = %s and relname = %s",
                (cfg.database.app_schema, table),
            ).fetchone()
        if now == last:
            return int(now)
        last = now
        time.sleep(0.5)
    return int(last)
