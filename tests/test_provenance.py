"""Which label rows training used: the cache marks them in the transaction that moves the run
to `cached`, and refuses to record anything that disagrees with the active manifests."""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cache_fixtures import Server, jpeg, make_exported_run
from conftest import AIRATINGS, BASELINE, REPO, air_env

from jobs import cache, db, paths, provenance
from jobs.errors import InputError


@pytest.fixture
def pcfg(make_cfg, server: Server):
    cfg = make_cfg(
        cache__allowed_private_hosts=f'["127.0.0.1:{server.port}"]',
        cache__max_attempts=1,
        cache__backoff_base_s=0,
        cache__total_timeout_s=5,
        cache__failure_rate_limit=0.9,
    )
    db.migrate(cfg)
    return cfg


def _label_rows(cfg, run_id):
    with db.connect(cfg) as conn:
        return conn.execute(
            "select snapshot_id, used_in_training, exclusion_reason"
            " from airatings.model_training_snapshot_labels where training_run_id = %s"
            " order by snapshot_id",
            (run_id,),
        ).fetchall()


def test_cache_marks_each_label_row_used_or_excluded_with_its_reason(pcfg, server: Server):
    urls = [server.add(f"p{i}.jpg", jpeg(320, 180, seed=i)) for i in range(8)]
    urls += [server.url("/status/404"), server.url("/html")]
    run = make_exported_run(pcfg, urls)
    assert {r[1] for r in _label_rows(pcfg, run.id)} == {None}  # not decided before the cache
    summary = cache.run(pcfg, run_ref=run.model_version, env={})
    assert summary["status"] == "cached"

    active = {
        sid
        for p in paths.of(pcfg).run(run.model_version).active_manifests.values()
        for sid in pq.read_table(p).column("snapshot_id").to_pylist()
    }
    failures = dict(
        zip(
            *pq.read_table(paths.of(pcfg).run(run.model_version).failures)
            .select(["snapshot_id", "reason"])
            .to_pydict()
            .values(),
            strict=True,
        )
    )
    rows = _label_rows(pcfg, run.id)
    assert {sid for sid, used, _ in rows if used} == active and len(active) == 8
    assert {sid: reason for sid, used, reason in rows if used is False} == failures
    assert set(failures.values()) == {"http_404", "not_an_image"}
    assert summary["labels"] == {"used": 8, "excluded": 2, "offered": 10}
    with db.connect(pcfg) as conn:
        n = conn.execute(
            "select count(*) from airatings.model_training_labels_used where model_version = %s",
            (run.model_version,),
        ).fetchone()[0]
    assert n == len(active)

    out = provenance.run(pcfg, run.model_version)
    assert out["labels"]["used"] == 8
    assert out["labels"]["excluded_by_reason"] == {"http_404": 1, "not_an_image": 1}
    # no dbt build in this database: today's labels cannot be compared, and it says how to fix it
    assert out["changed_since"]["status"] == "unavailable"
    assert "airatings dbt build" in out["changed_since"]["reason"]


def test_a_record_that_disagrees_with_the_manifests_is_refused_and_rolled_back(pcfg, server):
    run = make_exported_run(pcfg, [server.add(f"q{i}.jpg", jpeg(64, 64, seed=i)) for i in range(3)])
    excluded = pa.table({"snapshot_id": pa.array([2], pa.int64()), "reason": ["http_404"]})
    refused = pytest.raises(InputError, match="do not match the active manifests")
    with refused, db.connect(pcfg) as conn, conn.transaction():
        provenance.record_label_use(conn, pcfg, run.id, excluded, used_rows=3)
    assert {r[1] for r in _label_rows(pcfg, run.id)} == {None}
    # an exclusion for a snapshot the run never offered is refused too
    stray = pa.table({"snapshot_id": pa.array([99], pa.int64()), "reason": ["http_404"]})
    with pytest.raises(InputError), db.connect(pcfg) as conn, conn.transaction():
        provenance.record_label_use(conn, pcfg, run.id, stray, used_rows=3)
    assert {r[1] for r in _label_rows(pcfg, run.id)} == {None}
    with db.connect(pcfg) as conn, conn.transaction():
        assert provenance.record_label_use(conn, pcfg, run.id, excluded, used_rows=2) == {
            "used": 2,
            "excluded": 1,
            "offered": 3,
        }


def test_provenance_cli_json_and_unknown_snapshot(pcfg, server: Server, tmp_path):
    run = make_exported_run(pcfg, [server.add(f"r{i}.jpg", jpeg(64, 64, seed=i)) for i in range(3)])
    env = {**os.environ, **air_env(pcfg.database.url, tmp_path)}
    env["AIR_ARTIFACTS_DIR"] = str(pcfg.artifacts_dir)

    def cli(*args):
        return subprocess.run(
            [AIRATINGS, "provenance", *args, "--config", str(BASELINE), "--json"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    out = cli(run.model_version)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["labels"]["not_cached_yet"] == 3
    assert f"airatings cache --run {run.model_version}" in body["note"]
    one = json.loads(cli(run.model_version, "--snapshot", "2").stdout)["snapshot"]
    assert one["snapshot_id"] == 2 and one["used_in_training"] is None
    missing = cli(run.model_version, "--snapshot", "999")
    assert missing.returncode == 2 and "snapshot 999 is not among the labels" in missing.stderr
    unknown = cli("no_such_version")
    assert unknown.returncode == 2 and "no training run matches" in unknown.stderr
