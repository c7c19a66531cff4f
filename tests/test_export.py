"""`airatings export` on a real PostgreSQL: manifests, hash, run + labels, and the faults it
must survive (bad app data, a failure mid-transaction, concurrent writers, a second export,
SQL smuggled through config)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from export_fixtures import BASELINE, drop_app_constraints, make_config, world
from psycopg import sql

from jobs import db, export
from jobs.errors import InputError

REPO = Path(__file__).resolve().parents[1]
AIRATINGS = REPO / ".venv" / "bin" / "airatings"


def _q(cfg, query, params=()):
    with db.connect(cfg) as conn:
        return conn.execute(query, params).fetchall()


def _labels(cfg, run_id):
    return _q(
        cfg,
        "select snapshot_id, label_source, label_value, split from airatings.model_training_snapshot_labels"
        " where training_run_id = %s order by snapshot_id",
        (run_id,),
    )


def _manifest_rows(summary, name="full"):
    t = pq.read_table(Path(summary["dataset_dir"]) / f"manifest_{name}.parquet")
    return [
        (r["snapshot_id"], r["label_source"], r["label_value"], r["split"])
        for r in t.select(["snapshot_id", "label_source", "label_value", "split"]).to_pylist()
    ]


def _cli(cfg, *args, extra_env=None):
    env = {
        **os.environ,
        "DATABASE_URL": cfg.database.url,
        "AIR_ARTIFACTS_DIR": str(cfg.paths.artifacts_dir),
        "AIR_DATA_DIR": str(cfg.paths.data_dir),
        "AIR_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    return subprocess.run(
        [str(AIRATINGS), *args, "--config", str(BASELINE)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def exported(pg_server, tmp_path_factory):
    with world(pg_server, tmp_path_factory.mktemp("exportworld")) as (cfg, planted):
        summary = export.run(cfg, csv=True)
        yield cfg, planted, summary


def test_manifests_follow_the_contract(exported):
    cfg, _, s = exported
    d = Path(s["dataset_dir"])
    assert d == cfg.artifacts_dir / "datasets" / s["dataset_hash"]
    full = pq.read_table(d / "manifest_full.parquet")
    assert full.schema.remove_metadata() == export.manifest_schema()
    ids = full.column("snapshot_id").to_pylist()
    assert ids == sorted(set(ids))
    parts = {n: pq.read_table(d / f"manifest_{n}.parquet") for n in ("train", "val", "test")}
    for name, t in parts.items():
        assert set(t.column("split").to_pylist()) == {name}
        assert t.column("snapshot_id").to_pylist() == sorted(t.column("snapshot_id").to_pylist())
        assert s["counts"][name] == t.num_rows > 0
    assert sum(t.num_rows for t in parts.values()) == full.num_rows == s["counts"]["total"]
    hist = full.column("rating_hist").to_pylist()
    assert all(len(h) == 6 for h in hist)
    assert [sum(h) for h in hist] == full.column("rating_count").to_pylist()
    std = full.column("rating_std").to_pylist()
    assert all(
        (v is None) == (c < 2)
        for v, c in zip(std, full.column("rating_count").to_pylist(), strict=True)
    )
    for name in ("full", "train", "val", "test"):
        assert (
            (d / f"manifest_{name}.csv")
            .read_text()
            .startswith("snapshot_id,firebase_url,label_source")
        )
    assert not list(d.glob(".tmp-*"))


def test_label_rows_equal_manifest_rows_and_run_row_has_provenance(exported):
    cfg, _, s = exported
    assert _labels(cfg, s["run_id"]) == _manifest_rows(s)
    (version, status, dhash, chash, params) = _q(
        cfg,
        "select model_version, status, dataset_hash, config_hash, params_json"
        " from airatings.model_training_runs where id = %s",
        (s["run_id"],),
    )[0]
    assert version == s["model_version"] == f"sunset_v2_{datetime.now(UTC):%Y_%m_%d}"
    assert (status, dhash, chash) == ("exported", s["dataset_hash"], cfg.config_hash)
    e = params["export"]
    assert e["dataset_dir"] == s["dataset_dir"] and e["dataset_hash"] == s["dataset_hash"]
    assert e["dbt_vars"] == cfg.dbt_vars() and e["config_hash"] == cfg.config_hash
    assert {"duckdb", "pyarrow", "dbt-core"} <= set(e["libraries"])
    assert e["counts"] == s["counts"]


def test_label_rows_carry_the_ratings_behind_each_label(exported):
    """rating_ids = the app's rating rows that made the label: one per person (the latest),
    so the exact duplicate rating row the world plants is not counted twice; a reviewed label
    has no ratings behind it but its review's id."""
    cfg, planted, s = exported
    rows = _q(
        cfg,
        "select l.snapshot_id, l.label_source, l.rating_ids, l.relabel_id, l.label_formula_version"
        " from airatings.model_training_snapshot_labels l where training_run_id = %s",
        (s["run_id"],),
    )
    latest_per_person = dict(
        _q(
            cfg,
            "select snapshot_id, array_agg(id order by id) from ("
            "  select distinct on (snapshot_id, user_id) id, snapshot_id from public.webcam_snapshot_ratings"
            "  where rating is not null order by snapshot_id, user_id, created_at desc, id desc) d"
            " group by snapshot_id",
        )
    )
    all_rows = dict(
        _q(
            cfg,
            "select snapshot_id, count(*) from public.webcam_snapshot_ratings group by snapshot_id",
        )
    )
    relabels = dict(
        _q(cfg, "select snapshot_id, id from airatings.manual_relabels where superseded_at is null")
    )
    assert rows and {r[4] for r in rows} == {1}
    doubled = 0
    for sid, source, ids, relabel_id, _ in rows:
        if source == "manual_review":
            assert ids == [] and relabel_id == relabels[sid]
        else:
            assert ids == latest_per_person[sid] and relabel_id is None
            doubled += all_rows[sid] > len(ids)
    assert doubled >= 1  # the planted duplicate rating row is deduplicated, not counted twice
    assert any(r[1] == "manual_review" for r in rows)


def test_csv_manifests_by_default_same_rows_and_hashed(exported, tmp_path):
    """manifest_*.csv are written without --csv, hold the Parquet rows and columns, are in
    the file list with their sha256, and are part of the dataset's identity."""
    import pyarrow.csv as pacsv

    from jobs import artifacts

    cfg, _, s = exported
    assert cfg.dataset.write_csv is True
    d = Path(s["dataset_dir"])
    files = _q(
        cfg,
        "select params_json->'export'->'files' from airatings.model_training_runs where id = %s",
        (s["run_id"],),
    )[0][0]
    for name in ("full", "train", "val", "test"):
        pq_t = pq.read_table(d / f"manifest_{name}.parquet")
        csv_t = pacsv.read_csv(d / f"manifest_{name}.csv")
        assert csv_t.column_names == pq_t.column_names
        assert csv_t.num_rows == pq_t.num_rows == files[f"manifest_{name}.csv"]["rows"]
        assert csv_t.column("snapshot_id").to_pylist() == pq_t.column("snapshot_id").to_pylist()
        assert csv_t.column("label_value").to_pylist() == pq_t.column("label_value").to_pylist()
        assert files[f"manifest_{name}.csv"]["sha256"] == artifacts.sha256_file(
            d / f"manifest_{name}.csv"
        )
    table, _, _ = export.read_snapshot(cfg)
    assert export.dataset_hash(table, export.export_params(cfg, csv=False)) != s["dataset_hash"]
    assert export.dataset_hash(table, export.export_params(cfg, csv=True)) == s["dataset_hash"]


def test_summary_counts_drops_per_gate(exported):
    _, planted, s = exported
    for reason in (
        "missing_url",
        "url_scheme_not_allowed",
        "url_malformed",
        "too_few_ratings",
        "duplicate_snapshot",
    ):
        assert s["dropped"][reason] == len(planted[reason])
    assert s["candidates"] == s["counts"]["total"] + sum(s["dropped"].values())


def test_hash_and_parquet_bytes_are_deterministic(exported, tmp_path):
    cfg, _, s = exported
    t1, _, _ = export.read_snapshot(cfg)
    t2, _, _ = export.read_snapshot(cfg)
    params = export.export_params(cfg)
    assert export.dataset_hash(t1, params) == export.dataset_hash(t2, params) == s["dataset_hash"]
    t1, t2 = export._split_tables(t1)["full"], export._split_tables(t2)["full"]
    export._write_parquet(t1, tmp_path / "a.parquet")
    export._write_parquet(t2, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.parquet").read_bytes() == (
        Path(s["dataset_dir"]) / "manifest_full.parquet"
    ).read_bytes()
    other = cfg.model_copy(
        update={"dataset": cfg.dataset.model_copy(update={"good_threshold": 3.5})}
    )
    assert export.dataset_hash(t1, export.export_params(other)) != s["dataset_hash"]


def test_second_export_via_cli_returns_the_same_run_and_hash(exported):
    cfg, _, s = exported
    d = Path(s["dataset_dir"])
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    proc = _cli(cfg, "export", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "already_exported"
    assert (out["dataset_hash"], out["run_id"], out["model_version"]) == (
        s["dataset_hash"], s["run_id"], s["model_version"],
    )  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before
    assert len(list((cfg.artifacts_dir / "datasets").iterdir())) == 1
    assert _q(cfg, "select count(*) from airatings.model_training_runs")[0][0] == 1


def test_concurrent_export_skips_on_the_lock(exported):
    cfg, _, _ = exported
    with db.job_lock(cfg, "export") as held:
        assert held
        out = export.run(cfg)
    assert out["status"] == "skipped" and "another export" in out["reason"]
    assert _q(cfg, "select count(*) from airatings.model_training_runs")[0][0] == 1


def test_config_smuggling_sql_is_rejected_naming_the_key(exported):
    cfg, _, _ = exported
    proc = _cli(
        cfg, "export", extra_env={"AIR__DATABASE__APP_SCHEMA": 'public"; drop table webcams; --'}
    )
    assert proc.returncode == 2
    assert "database.app_schema" in proc.stderr
    proc = _cli(
        cfg, "export", extra_env={"AIR__DATASET__ALLOWED_URL_SCHEMES": '["https\') or true; --"]'}
    )
    assert proc.returncode == 2
    assert "dataset.allowed_url_schemes" in proc.stderr
    assert _q(cfg, "select count(*) from public.webcams")[0][0] > 0


def test_bad_app_data_fails_dbt_and_nothing_is_written(pg_server, tmp_path):
    with world(pg_server, tmp_path, snapshots=60) as (cfg, _):
        drop_app_constraints(cfg)
        with db.connect(cfg) as conn:
            conn.execute(
                "insert into public.webcam_snapshots (id, webcam_id, firebase_url, phase, captured_at, rating_count)"
                " values (5, 1, 'https://x.example.com/dup.jpg', 'sunset', now(), 0),"
                " (9001, 1, 'https://x.example.com/noon.jpg', 'noon', now(), 0)"
            )
            conn.execute(
                "alter table public.webcam_snapshot_ratings alter column rating drop not null"
            )
            conn.execute(
                "insert into public.webcam_snapshot_ratings (snapshot_id, user_id, rating)"
                " values (6, 'nul', null), (7, 'big', 9), (999999, 'orphan', 3)"
            )
        with pytest.raises(InputError) as info:
            export.run(cfg)
        msg = str(info.value)
        assert info.value.exit_code == 2
        for name in (
            "source_unique_app_webcam_snapshots_id",
            "source_accepted_values_app_webcam_snapshots_phase__sunrise__sunset",
            "source_not_null_app_webcam_snapshot_ratings_rating",
            "source_value_between_app_webcam_snapshot_ratings_rating__5__0",
            "source_relationships_app_webcam_snapshot_ratings_snapshot_id__id__source_app_webcam_snapshots_",
        ):
            assert name in msg, name
        assert _q(cfg, "select count(*) from airatings.model_training_runs")[0][0] == 0
        assert _q(cfg, "select count(*) from airatings.model_version_reservations")[0][0] == 0
        assert not (cfg.artifacts_dir / "datasets").exists()


def test_failure_between_run_row_and_labels_leaves_no_rows_and_versions_move_on(
    pg_server, tmp_path, monkeypatch
):
    with world(pg_server, tmp_path, snapshots=80) as (cfg, _):
        seen = {}

        def boom(conn, cfg_, run_id, table):
            seen["run_id"] = run_id
            assert (
                conn.execute("select count(*) from airatings.model_training_runs").fetchone()[0]
                == 1
            )
            raise RuntimeError("injected failure after the run row")

        monkeypatch.setattr(export, "_insert_labels", boom)
        with pytest.raises(RuntimeError, match="injected"):
            export.run(cfg)
        assert _q(cfg, "select count(*) from airatings.model_training_runs")[0][0] == 0
        assert _q(cfg, "select count(*) from airatings.model_training_snapshot_labels")[0][0] == 0
        monkeypatch.undo()

        first = export.run(cfg)
        day = f"{datetime.now(UTC):%Y_%m_%d}"
        assert first["model_version"] == f"sunset_v2_{day}_2"  # the failed one's name is not reused
        assert _labels(cfg, first["run_id"]) == _manifest_rows(first)

        retrain = make_config(cfg.database.url, tmp_path, train__epochs=3)
        second = export.run(retrain)
        assert second["status"] == "exported" and second["model_version"] == f"sunset_v2_{day}_3"
        assert second["dataset_hash"] == first["dataset_hash"] and second["reused_dataset"]
        assert len(list((cfg.artifacts_dir / "datasets").iterdir())) == 1


def test_app_writing_during_export_labels_equal_manifest(pg_server, tmp_path):
    with world(pg_server, tmp_path, snapshots=200) as (cfg, _):
        stop = threading.Event()
        written = {"n": 0}

        def app_writes():
            with db.connect(cfg, autocommit=True) as conn:
                sid = 100_000
                while not stop.is_set():
                    sid += 1
                    with conn.transaction():
                        conn.execute(
                            "insert into public.webcam_snapshots (id, webcam_id, firebase_url, phase,"
                            " captured_at, calculated_rating, rating_count)"
                            " values (%s, 1, %s, 'sunset', now(), 3, 2)",
                            (sid, f"https://x.example.com/live/{sid}.jpg"),
                        )
                        conn.execute(
                            sql.SQL("insert into public.webcam_snapshot_ratings (snapshot_id, user_id, rating)"
                                    " values (%s, 'a', 3), (%s, 'b', 3), (1, %s, 4)"),
                            (sid, sid, f"late{sid}"),
                        )  # fmt: skip
                    written["n"] += 1
                    time.sleep(0.005)

        t = threading.Thread(target=app_writes)
        t.start()
        try:
            s = export.run(cfg)
        finally:
            stop.set()
            t.join()
        assert written["n"] > 0
        assert _labels(cfg, s["run_id"]) == _manifest_rows(s)


def test_reserved_versions_count_up_per_day(exported):
    cfg, _, _ = exported
    day = datetime(2030, 5, 6, tzinfo=UTC)
    got = [export.reserve_version(cfg, today=day) for _ in range(3)]
    assert got == ["sunset_v2_2030_05_06", "sunset_v2_2030_05_06_2", "sunset_v2_2030_05_06_3"]
    assert sys.version_info >= (3, 11)


def test_export_reads_the_marts_under_the_dbt_lock_it_built_them_with(exported, monkeypatch):
    """Between the export's `dbt build` and its read, no other dbt run may replace the marts
    (its tables might not have passed the tests): the dbt lock is held from build to read."""
    cfg, _, _ = exported

    def lock_free() -> bool:
        with db.job_lock(cfg, "dbt", cfg.database.dbt_schema) as free:
            return free

    seen = {}

    def fake_build(cfg_, select, **kw):
        seen["build_lock_free"] = lock_free()
        seen["build_kw"] = kw
        return {"select": select, "results": {"pass": 1}}

    def fake_read(cfg_, con=None):
        seen["read_lock_free"] = lock_free()
        raise InputError("stop here")

    monkeypatch.setattr(export.dbt_runner, "build", fake_build)
    monkeypatch.setattr(export, "read_snapshot", fake_read)
    with pytest.raises(InputError, match="stop here"):
        export.run(cfg)
    assert seen == {"build_lock_free": False, "build_kw": {"lock": False}, "read_lock_free": False}
    assert lock_free()


def test_export_whose_lock_died_commits_nothing(exported):
    """The export lock's backend killed before the final transaction (a server restart, a
    network cut): a twin may be exporting, so the run row and labels are not written (75)."""
    from jobs.errors import TransientError

    cfg, _, _ = exported
    snapshot = export.read_snapshot(cfg)
    before = _q(cfg, "select count(*) from airatings.model_training_runs")[0][0]
    with db.job_lock(cfg, "export") as held:
        assert held
        (lock,) = db.held_locks()
        _q(cfg, "select pg_terminate_backend(%s)", (lock.pid,))
        with pytest.raises(TransientError, match="lost the advisory lock"):
            # a changed config, so this is a new run (not the existing one reused)
            other = make_config(cfg.database.url, cfg.paths.artifacts_dir.parent, train__epochs=2)
            export.export_dataset(other, snapshot=snapshot)
    assert _q(cfg, "select count(*) from airatings.model_training_runs")[0][0] == before


def test_notes_are_kept_on_the_run_and_listed(exported):
    """--notes on export: on the run row, shown by `airatings models list`; a re-export of the
    same data replaces the notes of the run it returns."""
    from jobs import registry

    cfg, _, s = exported
    again = export.export_dataset(cfg, csv=True, notes="baseline after the relabel sprint")
    assert again["status"] == "already_exported" and again["run_id"] == s["run_id"]
    listed = {r["model_version"]: r for r in registry.list_models(cfg)["models"]}
    assert listed[s["model_version"]]["notes"] == "baseline after the relabel sprint"
