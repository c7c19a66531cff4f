"""`airatings score`: a registered model scores the app's snapshots under the scorer's role
(least privilege, proven with the database's own privilege checks), writes inference rows and
the webcams' AI fields, survives bad images, re-runs idempotently, shards, and never lets an
older model overwrite a newer one. Real PostgreSQL, onnxruntime and a loopback HTTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from cache_fixtures import http_server, server  # noqa: F401 - fixtures
from conftest import air_env
from psycopg import sql
from registry_fixtures import SETTINGS, shared_exported_world
from score_fixtures import OVERRIDES, register, rows_read, scoring_world

from jobs import db, paths, registry, score
from jobs.errors import InputError

AIRATINGS = str(Path(sys.executable).with_name("airatings"))


@pytest.fixture(scope="module")
def base(request, pg_server, tmp_path_factory):
    return shared_exported_world(request, pg_server, tmp_path_factory)


@pytest.fixture
def world(pg_server, tmp_path, base, server):  # noqa: F811
    with scoring_world(pg_server, tmp_path, base, server) as w:
        yield w


def _cli(world, *args, env_extra=None):
    """`airatings score --json ARGS` as the CronJob runs it: the scorer's login, the model
    named by AI_MODEL_VERSION (the app's variable)."""
    env = {
        **os.environ,
        **air_env(world.scorer_url, world.tmp, **{**SETTINGS, **OVERRIDES}),
        "AI_MODEL_VERSION": world.version,
        **(env_extra or {}),
    }
    r = subprocess.run(
        [AIRATINGS, "score", "--json", *args], capture_output=True, text=True, env=env, timeout=300
    )
    return r, (json.loads(r.stdout) if r.stdout.strip() else None)


def test_scorer_role_may_update_only_the_two_ai_columns(world):
    """Least privilege, asked of PostgreSQL itself; then a denied UPDATE of another column
    under a login user holding only airatings_score."""
    cfg = world.cfg
    webcams = f"{cfg.database.app_schema}.webcams"
    inferences = f"{cfg.database.app_schema}.snapshot_ai_inferences"
    with db.connect(cfg) as conn:

        def ask(q: str, *args: str) -> bool:
            return conn.execute(q, args).fetchone()[0]

        for col in ("ai_rating", "ai_model_version"):
            assert ask(
                "select has_column_privilege('airatings_score', %s, %s, 'UPDATE')", webcams, col
            )
        for col in ("name", "region", "latitude"):
            assert not ask(
                "select has_column_privilege('airatings_score', %s, %s, 'UPDATE')", webcams, col
            )
        assert not ask("select has_table_privilege('airatings_score', %s, 'UPDATE')", webcams)
        assert not ask("select has_table_privilege('airatings_score', %s, 'DELETE')", webcams)
        assert ask("select has_table_privilege('airatings_score', %s, 'INSERT')", inferences)
        assert not ask("select has_table_privilege('airatings_score', %s, 'UPDATE')", inferences)
        assert not ask("select has_table_privilege('airatings_score', %s, 'DELETE')", inferences)
        for role in ("airatings_export", "airatings_train", "airatings_review"):
            assert ask("select has_table_privilege(%s, %s, 'SELECT')", role, webcams)
            for priv in ("INSERT", "UPDATE", "DELETE"):
                assert not ask("select has_table_privilege(%s, %s, %s)", role, webcams, priv)
                assert not ask("select has_table_privilege(%s, %s, %s)", role, inferences, priv)
        ml = cfg.database.ml_schema
        assert ask(
            "select has_table_privilege('airatings_train', %s, 'INSERT')",
            f"{ml}.model_training_runs",
        )
        assert not ask(
            "select has_table_privilege('airatings_score', %s, 'UPDATE')",
            f"{ml}.model_training_runs",
        )
        assert ask(
            "select has_table_privilege('airatings_review', %s, 'INSERT')", f"{ml}.manual_relabels"
        )
        assert not ask(
            "select has_table_privilege('airatings_review', %s, 'INSERT')",
            f"{ml}.model_training_runs",
        )
    with psycopg.connect(world.scorer_url) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(
                sql.SQL("update {} set name = 'x' where id = 1").format(world.app("webcams"))
            )
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.SQL("delete from {}").format(world.app("snapshot_ai_inferences")))
        conn.rollback()
        conn.execute(
            sql.SQL("update {} set ai_rating = 1.5 where id = 1").format(world.app("webcams"))
        )
        conn.rollback()


def test_score_writes_rows_and_webcam_fields_under_the_scorer_role(world):  # noqa: PLR0915
    r, out = _cli(world)
    assert r.returncode == 0, r.stderr[-3000:]
    good = [s for s, k in world.kinds.items() if k == "good"]
    assert out["model_version"] == world.version and out["model_from"] == "AI_MODEL_VERSION"
    assert out["scored"] == len(good) == 12
    assert out["failed_by_reason"] == {
        "http_404": 1,
        "http_503": 1,
        "missing_url": 1,
        "not_an_image": 1,
        "truncated": 1,
    }
    assert out["images"]["downloaded"] == 12 + 1  # the good ones and the truncated body
    rows = world.inferences()
    assert set(rows) == set(good)  # the 3-day-old one is outside the default window
    expected = world.expected()
    threshold = out["threshold"]
    for sid, (_, webcam, version, raw, ai, gate) in rows.items():
        assert webcam == world.webcam_of[sid] and version == world.version
        assert raw == pytest.approx(expected[sid][0], abs=1e-5)
        assert ai == pytest.approx(expected[sid][1], abs=1e-5)
        assert gate == (ai >= threshold)
    # each webcam: the aiRating of its newest scored snapshot, and the version
    for w, (ai, version) in world.webcams().items():
        newest = max((s for s in good if world.webcam_of[s] == w), key=world.captured.get)
        assert version == world.version and ai == pytest.approx(rows[newest][4])
    with db.connect(world.cfg) as conn:
        failures = dict(
            conn.execute(
                sql.SQL("select reason, transient from {}.score_failures").format(
                    sql.Identifier(world.cfg.database.ml_schema)
                )
            ).fetchall()
        )
    assert failures == {
        "http_404": False,
        "http_503": True,
        "missing_url": False,
        "not_an_image": False,
        "truncated": False,
    }

    # a re-run changes nothing; only the transient failure is tried again
    world.server.reset()
    r, again = _cli(world)
    assert r.returncode == 0, r.stderr[-3000:]
    assert again["scored"] == 0 and again["already_scored"] == 12
    assert again["failed_by_reason"] == {"http_503": 1}
    assert world.server.total_requests == world.server.hits["/status/503"] > 0
    assert world.inferences() == rows

    # --backfill: every rated snapshot (the old one), not the recent unrated ones again
    r, back = _cli(world, "--backfill")
    assert r.returncode == 0, r.stderr[-3000:]
    assert back["scored"] == 1
    old = next(s for s, k in world.kinds.items() if k == "old")
    assert set(world.inferences()) == {*good, old}
    # an older snapshot scored later does not move its webcam's value off the newest one
    newest_1 = max((s for s in good if world.webcam_of[s] == 1), key=world.captured.get)
    assert world.webcams()[1][0] == pytest.approx(rows[newest_1][4])


def test_cached_originals_are_read_from_the_store_not_downloaded(world):
    """A URL the image index knows is read from the content-addressed store (no request)."""
    import shutil

    from jobs.cache import ImageIndex

    good = sorted(s for s, k in world.kinds.items() if k == "good")
    sid = good[0]
    path = world.originals[sid]
    sha, ext = path.stem, path.suffix.lstrip(".")
    stored = paths.of(world.cfg).images.original(sha, ext)
    stored.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, stored)  # where the cache keeps originals
    with db.connect(world.cfg) as conn:
        url = conn.execute(
            sql.SQL("select firebase_url from {} where id = %s").format(
                world.app("webcam_snapshots")
            ),
            (sid,),
        ).fetchone()[0]
        ImageIndex(world.cfg, conn).upsert([(url, sha, ext, path.stat().st_size, 640, 360)])
    world.server.reset()
    out = score.run(world.scorer_cfg, model=world.version)
    assert out["images"]["cached"] == 1 and out["scored"] == 12
    assert world.server.hits[url.removeprefix(world.server.base)] == 0


def test_shards_score_each_snapshot_once(world):
    """Two shards and a second copy of one, all at once against one database."""
    procs = []
    env = {**os.environ, **air_env(world.scorer_url, world.tmp, **{**SETTINGS, **OVERRIDES})}
    # the first two as a Kubernetes Indexed Job runs them (JOB_COMPLETION_INDEX, and the
    # JOB_COMPLETIONS the manifests set), the third a second copy of shard 0 by --shard
    for index, args in ((0, []), (1, []), (None, ["--shard", "0/2"])):
        shard_env = (
            {"JOB_COMPLETION_INDEX": str(index), "JOB_COMPLETIONS": "2"}
            if index is not None
            else {}
        )
        procs.append(
            subprocess.Popen(
                [AIRATINGS, "score", "--json", "--model", world.version, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, **shard_env},
            )
        )
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout))
    good = {s for s, k in world.kinds.items() if k == "good"}
    rows = world.inferences()
    assert set(rows) == good  # each exactly once (the key), none missing
    assert sum(o.get("scored", 0) for o in outs) == len(good)
    by_shard = {}
    for o in outs:
        if o["status"] == "scored":
            by_shard.setdefault(o["shard"], 0)
            by_shard[o["shard"]] += o["scored"]
    assert by_shard.get("0/2", 0) == sum(1 for s in good if s % 2 == 0)
    assert by_shard.get("1/2", 0) == sum(1 for s in good if s % 2 == 1)


def test_an_older_model_finishing_late_never_overwrites_a_newer_one(world):
    """v1 is production, then v2. v2 scores; v1 (a late CronJob) scores after it: the
    webcams keep v2's values. A rollback to v1 makes v1 the newer promotion: its values win."""
    cfg = world.cfg
    v1, v2 = world.version, "score_v2"
    register(world.reg, v2)
    registry.promote(cfg, v1)
    # a clone of the same run: its recorded comparison predates v1's promotion
    registry.promote(cfg, v2, force=True, reason="test: a newer model")
    assert score.run(world.scorer_cfg)["model_version"] == v2  # the production alias
    after_v2 = world.webcams()
    assert {v for _, v in after_v2.values()} == {v2}
    late = score.run(world.scorer_cfg, model=v1)
    assert late["scored"] == 12 and late["webcams_updated"] == 0
    assert world.webcams() == after_v2
    registry.rollback(cfg, reason="test")
    with db.connect(cfg) as conn:  # v1 scored already; a new snapshot arrives for it
        conn.execute(
            sql.SQL("delete from {} where model_version = %s and snapshot_id = 1").format(
                world.app("snapshot_ai_inferences")
            ),
            (v1,),
        )
    again = score.run(world.scorer_cfg)
    assert again["model_version"] == v1 and again["webcams_updated"] >= 1
    assert world.webcams()[world.webcam_of[1]][1] == v1


def test_a_tampered_model_is_refused_before_any_row(world):
    onnx = paths.of(world.cfg).model(world.version).onnx
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(onnx, 0o644)
    onnx.write_bytes(bytes(data))
    r, out = _cli(world, "--model", world.version)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "does not match the registered" in out["error"]
    assert world.inferences() == {}


def test_bad_arguments_exit_2_naming_them(world):
    with pytest.raises(InputError, match="--since 'yesterday'"):
        score.run(world.scorer_cfg, model=world.version, since="yesterday")
    with pytest.raises(InputError, match="exclude each other"):
        score.run(world.scorer_cfg, model=world.version, since="1d", backfill=True)
    with pytest.raises(InputError, match="shard index 2 is out of range"):
        score.run(world.scorer_cfg, model=world.version, shard="2/2")
    with pytest.raises(InputError, match="not registered|no training run"):
        score.run(world.scorer_cfg, model="nope_v0")
    r, out = _cli(world, env_extra={"AI_CAPTURE_THRESHOLD": "seven"})
    assert r.returncode == 2 and "AI_CAPTURE_THRESHOLD" in out["error"]
    assert world.inferences() == {}


def test_duplicate_inference_rows_stop_migrate_naming_them(world):
    """The app's table must be unique per (snapshot, version) for a re-run to add nothing;
    duplicates already there are the app's data: migrate refuses, saying how many."""
    cfg = world.cfg
    t = world.app("snapshot_ai_inferences")
    with db.connect(cfg) as conn:
        conn.execute(sql.SQL("drop index {}.{}").format(
            sql.Identifier(cfg.database.app_schema),
            sql.Identifier("snapshot_ai_inferences_snapshot_version_key")))  # fmt: skip
        for _ in range(2):
            conn.execute(
                sql.SQL(
                    "insert into {} (snapshot_id, webcam_id, model_version, raw_score, ai_rating,"
                    " gate_passed) values (1, 1, 'x', 1, 1, false)"
                ).format(t)
            )
    with pytest.raises(InputError, match="1 \\(snapshot_id, model_version\\) pairs"):
        db.migrate(cfg)


def test_a_missing_grant_exits_2_saying_which_role(world):
    """A deployment whose scorer user lacks a grant gets one line and exit 2, not a
    traceback."""
    with db.connect(world.cfg) as conn:
        conn.execute(
            sql.SQL("revoke select on {} from airatings_score").format(
                world.app("webcam_snapshots")
            )
        )
    r, out = _cli(world)
    assert r.returncode == 2, r.stderr[-2000:]
    assert out["error"].startswith(
        "permission denied: permission denied for table webcam_snapshots"
    )
    assert "Traceback" not in r.stderr
    assert "docs/contracts.md 'Roles'" in out["error"]


def test_two_scorers_on_one_webcam_serialise_without_deadlock(world):
    """Two shards' batches both insert rows for webcam 1 (the foreign key takes a key-share
    lock on it) and then refresh its fields: `for update` there deadlocked; the function locks
    `for no key update`, so the second waits for the first and both commit."""
    import threading

    good = sorted(s for s, k in world.kinds.items() if k == "good" and world.webcam_of[s] == 1)
    a_sid, b_sid = good[0], good[1]
    insert = sql.SQL(
        "insert into {} (snapshot_id, webcam_id, model_version, raw_score, ai_rating,"
        " gate_passed) values (%s, 1, %s, 1, 1, false)"
    ).format(world.app("snapshot_ai_inferences"))
    refresh = sql.SQL("select {}.refresh_webcam_ai(array[1]::bigint[], %s)").format(
        sql.Identifier(world.cfg.database.ml_schema)
    )
    errors = []
    with psycopg.connect(world.scorer_url) as a, psycopg.connect(world.scorer_url) as b:
        a.execute(insert, (a_sid, world.version))
        b.execute(insert, (b_sid, world.version))

        def run(conn):
            try:
                conn.execute(refresh, (world.version,))
                conn.commit()
            except psycopg.Error as exc:
                errors.append(exc)
                conn.rollback()

        ta = threading.Thread(target=run, args=(a,))
        ta.start()
        ta.join(10)  # a must not wait for b's key-share lock
        assert not ta.is_alive(), "refresh_webcam_ai waited on another batch's foreign-key lock"
        tb = threading.Thread(target=run, args=(b,))
        tb.start()
        tb.join(30)
    assert errors == []
    assert set(world.inferences()) == {a_sid, b_sid}


def test_refresh_reads_the_batch_not_the_webcams_history(world):
    """Webcam 1 has 3,000 scored snapshots. The two-argument refresh (the Node cron's) reads
    them all; the scorer's form, given its batch's snapshots, reads a few rows whatever the
    history (it read the history on every batch: 56.9 ms a call at 100k snapshots,
    BENCHMARKS.md "Scale"), and gives the same fields: the newest snapshot wins, an older one
    scored late does not, and a newest row deleted by the app falls back to the history's."""
    import datetime as dt

    from score_fixtures import NOW

    cfg, v, history = world.cfg, world.version, 3000
    snaps, infs = world.app("webcam_snapshots"), world.app("snapshot_ai_inferences")

    def add(conn, rows):  # (snapshot id, captured_at, ai_rating) for webcam 1, scored by v
        with conn.cursor() as cur:
            with cur.copy(
                sql.SQL(
                    "copy {} (id, webcam_id, firebase_url, phase, captured_at, calculated_rating,"
                    " rating_count) from stdin"
                ).format(snaps)
            ) as cp:
                for sid, at, _ in rows:
                    cp.write_row((sid, 1, None, "sunset", at, 3, 2))
            with cur.copy(
                sql.SQL(
                    "copy {} (snapshot_id, webcam_id, model_version, raw_score, ai_rating,"
                    " gate_passed) from stdin"
                ).format(infs)
            ) as cp:
                for sid, _, rating in rows:
                    cp.write_row((sid, 1, v, 0.0, rating, True))

    old = NOW - dt.timedelta(days=30)
    with db.connect(cfg) as conn:
        add(conn, [(5000 + k, old - dt.timedelta(seconds=k), 1.0 + k % 3) for k in range(history)])
        conn.execute(sql.SQL("analyze {}, {}").format(snaps, infs))
    m = sql.Identifier(cfg.database.ml_schema)
    full = sql.SQL("select {}.refresh_webcam_ai(array[1]::bigint[], %s)").format(m)
    batch = sql.SQL("select {}.refresh_webcam_ai(array[1]::bigint[], %s, %s::bigint[])").format(m)

    def call(q, *args):  # as the scorer does, in its own connection and transaction
        before = rows_read(cfg, "snapshot_ai_inferences") + rows_read(cfg, "webcam_snapshots")
        with psycopg.connect(world.scorer_url) as conn:
            (changed,) = conn.execute(q, (v, *args)).fetchone()
        after = rows_read(cfg, "snapshot_ai_inferences") + rows_read(cfg, "webcam_snapshots")
        return changed, after - before

    changed, read = call(full)
    assert changed == 1 and world.webcams()[1] == (1.0, v)  # snapshot 5000, the newest
    assert read >= history, read  # the measurement sees a history read

    with db.connect(cfg) as conn:
        add(conn, [(9001, NOW, 4.5)])
    changed, read = call(batch, [9001])
    assert changed == 1 and world.webcams()[1] == (4.5, v)
    assert read <= 20, read  # the batch and the newest row so far, not 3,000

    with db.connect(cfg) as conn:  # older than 9001, scored late
        add(conn, [(9002, NOW - dt.timedelta(days=40), 0.5)])
    changed, read = call(batch, [9002])
    assert changed == 0 and world.webcams()[1] == (4.5, v) and read <= 20, read
    assert call(full)[0] == 0  # the whole history agrees

    with db.connect(cfg) as conn:  # the app deletes the newest snapshot's row
        conn.execute(sql.SQL("delete from {} where snapshot_id = 9001").format(infs))
        add(conn, [(9003, NOW - dt.timedelta(days=50), 2.5)])
    changed, _ = call(batch, [9003])
    assert changed == 1 and world.webcams()[1] == (1.0, v)  # snapshot 5000 again
    assert call(full)[0] == 0
