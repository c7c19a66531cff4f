"""Sharded cache and score as a Kubernetes Indexed Job runs them: N = 3 concurrent OS
processes (``airatings ... --shard I/3``, one of them through JOB_COMPLETION_INDEX /
JOB_COMPLETIONS, plus a second copy of one shard) against one database, one artifact store and
one loopback image server. Each image is requested once, each snapshot handled by exactly one
shard, and the merged result is the one a 1-shard run gives on a copy of the same world.

The comparison world is a separate database and artifacts dir holding the same exported run
(cache) or the same app world and registered model (score). The ``server`` fixture comes from
cache_fixtures, a plugin of conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cache_fixtures import Server, jpeg, make_exported_run
from conftest import AIRATINGS, air_env
from export_fixtures import make_config, scratch_database
from psycopg import sql
from registry_fixtures import SETTINGS, shared_exported_world
from score_fixtures import OVERRIDES, rows_read, scoring_world

from jobs import db, paths, runs

N = 3


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [AIRATINGS, *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def _finish(procs: list[subprocess.Popen[str]]) -> list[dict]:
    """Wait for every process (all were started before the first wait); each must exit 0."""
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"{p.args}: exit {p.returncode}\n{stderr[-3000:]}"
        outs.append(json.loads(stdout))
    return outs


def _shard_procs(job_args: list[str], env: dict[str, str]) -> list[subprocess.Popen[str]]:
    """Shards 0 and 1 by --shard, shard 2 by the Indexed Job's variables, and a second copy of
    shard 1 (a pod run twice): four processes started together."""
    return [
        _start([*job_args, "--shard", f"0/{N}"], env),
        _start([*job_args, "--shard", f"1/{N}"], env),
        _start(job_args, {**env, "JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": str(N)}),
        _start([*job_args, "--shard", f"1/{N}"], env),
    ]


# ---- cache -------------------------------------------------------------------------------------


def _cache_overrides(srv: Server) -> dict[str, object]:
    return {
        "cache__allowed_private_hosts": f'["127.0.0.1:{srv.port}"]',
        "cache__max_attempts": 2,
        "cache__backoff_base_s": 0,
        "cache__failure_rate_limit": 0.5,
    }


def _cache_outcome(cfg, run: runs.Run) -> dict:
    """What the cache left for a run, in a form two worlds can be compared by: the active
    manifests (rows and file sha256s), the failures, the stored images, the label rows."""
    run = _reload(cfg, run)
    rp = paths.of(cfg).run(run.model_version)
    images = paths.of(cfg).images.root
    with db.connect(cfg) as conn:
        labels = conn.execute(
            sql.SQL(
                "select snapshot_id, split, used_in_training, exclusion_reason from {}"
                " where training_run_id = %s order by snapshot_id"
            ).format(runs.table(cfg, "model_training_snapshot_labels")),
            (run.id,),
        ).fetchall()
        index = conn.execute(
            sql.SQL("select url, sha256, ext, bytes, width, height from {} order by url").format(
                runs.table(cfg, "image_cache")
            )
        ).fetchall()
    return {
        "status": run.status,
        "active": {p.name: pq.read_table(p).to_pylist() for p in rp.active_manifests.values()},
        "active_files": run.params["cache"]["active_files"],  # rows + sha256 of each file
        "failures": pq.read_table(rp.failures).to_pylist(),
        "images": sorted(str(p.relative_to(images)) for p in images.rglob("*") if p.is_file()),
        "labels": labels,
        "index": index,
    }


def _reload(cfg, run: runs.Run) -> runs.Run:
    with db.connect(cfg) as conn:
        return runs.get_run(conn, cfg, run.id)


def test_three_cache_shards_fetch_each_url_once_and_merge_to_the_unsharded_result(
    pg_server: str, database_url: str, tmp_path: Path, server: Server
) -> None:
    good = [server.add(f"shard{i}.jpg", jpeg(64, 48, seed=i)) for i in range(24)]
    # one URL behind two snapshots (fetched once), a 404 and a page that is not an image
    urls = [*good, good[5], server.url("/status/404"), server.url("/html")]
    distinct = set(urls)
    overrides = _cache_overrides(server)

    env_a = air_env(database_url, tmp_path / "a", **overrides)
    cfg_a = make_config(database_url, tmp_path / "a", **overrides)
    db.migrate(cfg_a)
    run_a = make_exported_run(cfg_a, urls)
    job = ["cache", "--run", run_a.model_version]

    server.reset()
    outs = _finish(_shard_procs(job, env_a))
    assert all(p in server.hits for p in (u.removeprefix(server.base) for u in distinct))
    # every distinct URL requested exactly once, across all four processes
    assert Counter(server.hits.values()) == Counter({1: len(distinct)}), server.hits
    done = [o for o in outs if o.get("requests")]
    assert sorted(o["shard"] for o in done) == [f"{i}/{N}" for i in range(N)]
    # of the two copies of shard 1, the other one waited out the lock or found it all cached
    (idle,) = [o for o in (outs[1], outs[3]) if not o.get("requests")]
    assert idle["status"] == "skipped" or idle["fetched"] == 0, idle

    # the shard outputs partition the URLs: disjoint, complete, each where shard_of puts it
    shard_urls = {}
    for i in range(N):
        t = pq.read_table(paths.of(cfg_a).run(run_a.model_version).shard(i, N))
        shard_urls[i] = t.column("url").to_pylist()
    assert sum(len(v) for v in shard_urls.values()) == len(distinct)
    assert set().union(*shard_urls.values()) == distinct
    assert all(len(v) > 0 for v in shard_urls.values())  # 27 URLs over 3 shards

    merged = _finish([_start([*job, "--merge"], env_a)])[0]
    assert merged["status"] == "cached" and merged["shards"] == N
    assert merged["active_rows"] == len(good) + 1 and merged["failed_rows"] == 2
    assert server.total_requests == len(distinct)  # the merge fetches nothing

    # the same exported run in another database and artifact store, cached unsharded
    with scratch_database(pg_server) as url_b:
        env_b = air_env(url_b, tmp_path / "b", **overrides)
        cfg_b = make_config(url_b, tmp_path / "b", **overrides)
        db.migrate(cfg_b)
        run_b = make_exported_run(cfg_b, urls)
        assert run_b.dataset_hash == run_a.dataset_hash
        server.reset()
        single = _finish([_start(["cache", "--run", run_b.model_version], env_b)])[0]
        assert single["status"] == "cached" and single["shards"] == 1
        assert server.total_requests == len(distinct)

        a, b = _cache_outcome(cfg_a, run_a), _cache_outcome(cfg_b, run_b)
        assert a["status"] == b["status"] == "cached"
        for key in ("active", "active_files", "failures", "images", "labels", "index"):
            assert a[key] == b[key], key
        assert {f["reason"] for f in a["failures"]} == {"http_404", "not_an_image"}


# ---- score -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(request, pg_server, tmp_path_factory):
    return shared_exported_world(request, pg_server, tmp_path_factory)


def _score_outcome(world) -> dict:
    with db.connect(world.cfg) as conn:
        failures = conn.execute(
            sql.SQL(
                "select snapshot_id, reason, transient, attempts from {}.score_failures"
                " where model_version = %s order by snapshot_id"
            ).format(sql.Identifier(world.cfg.database.ml_schema)),
            (world.version,),
        ).fetchall()
        (rows,) = conn.execute(
            sql.SQL("select count(*) from {} where model_version = %s").format(
                world.app("snapshot_ai_inferences")
            ),
            (world.version,),
        ).fetchone()
    return {
        "inferences": world.inferences(),
        "rows": rows,
        "webcams": world.webcams(),
        "failures": failures,
    }


def test_three_score_shards_score_each_snapshot_once_like_one_shard(
    pg_server: str, tmp_path: Path, base, server: Server
) -> None:
    with (
        scoring_world(pg_server, tmp_path / "a", base, server) as wa,
        scoring_world(pg_server, tmp_path / "b", base, server) as wb,
    ):
        settings = {**SETTINGS, **OVERRIDES}
        job = ["score", "--model", wa.version]

        server.reset()
        outs = _finish(_shard_procs(job, air_env(wa.scorer_url, wa.tmp, **settings)))
        hits_sharded = Counter(server.hits)
        server.reset()
        single = _finish([_start(job, air_env(wb.scorer_url, wb.tmp, **settings))])[0]

        good = {s for s, k in wa.kinds.items() if k == "good"}
        assert single["status"] == "scored" and single["scored"] == len(good)
        # each shard scored exactly its id % N share; the twin of shard 1 scored nothing new
        by_shard = Counter()
        for o in outs:
            if o["status"] == "scored":
                by_shard[o["shard"]] += o["scored"]
        assert by_shard == Counter(
            {f"{i}/{N}": sum(1 for s in good if s % N == i) for i in range(N)}
        )
        assert sum(o.get("scored", 0) for o in outs) == len(good)
        # each good image fetched exactly once over all the shards and the twin. (Not compared
        # request for request with the single run: on a quiet machine the twin of shard 1 may
        # take the lock after shard 1 finished and retry its transient 503s, legitimately.)
        assert all(hits_sharded[u.removeprefix(server.base)] == 1 for u in _good_urls(wa))

        a, b = _score_outcome(wa), _score_outcome(wb)
        assert a["rows"] == len(a["inferences"]) == len(good)  # one row per (snapshot, model)
        assert set(a["inferences"]) == good
        assert a["inferences"] == b["inferences"]  # raw scores, aiRatings, gates: identical
        assert a["webcams"] == b["webcams"]
        assert {v for _, v in a["webcams"].values()} == {wa.version}

        # Same failures; a transient one's attempts may differ: the twin of shard 1, when it
        # takes the lock after shard 1 finished, retries the 503 (counted, as it should be).
        def settled(fails):
            return [(sid, why, tr, 1 if tr else n) for sid, why, tr, n in fails]

        assert settled(a["failures"]) == settled(b["failures"]) and len(a["failures"]) == 5
        assert all(n >= 1 for *_, n in a["failures"])


def _good_urls(world) -> list[str]:
    with db.connect(world.cfg) as conn:
        return [
            r[1]
            for r in conn.execute(
                sql.SQL("select id, firebase_url from {} order by id").format(
                    world.app("webcam_snapshots")
                )
            ).fetchall()
            if world.kinds[r[0]] == "good"
        ]


# ---- score: the work is read once, not once a page ---------------------------------------------


def test_score_reads_its_work_once_not_once_a_page(pg_server: str, tmp_path: Path, base, server):
    """A window of 10,000 snapshots scored in pages of 16 (625 pages): the table is scanned a
    fixed number of times (the work list, the 'already scored' count), not once per page.
    Paging the window by keyset scanned it for every page (there is no index on captured_at):
    ~6M rows read here, O(N^2) in the window. The extra snapshots have no URL, so they cost a
    failure row each and no decode."""
    import datetime as dt

    from score_fixtures import NOW

    from jobs import score

    extra = 10_000
    with scoring_world(pg_server, tmp_path, base, server) as world:
        with db.connect(world.cfg) as conn, conn.cursor() as cur:
            with cur.copy(
                sql.SQL(
                    "copy {} (id, webcam_id, firebase_url, phase, captured_at, calculated_rating,"
                    " rating_count) from stdin"
                ).format(world.app("webcam_snapshots"))
            ) as cp:
                for k in range(extra):
                    at = NOW - dt.timedelta(hours=1, milliseconds=k)
                    cp.write_row((1000 + k, 1 + k % 3, None, "sunset", at, 3, 2))
            conn.execute(sql.SQL("analyze {}").format(world.app("webcam_snapshots")))
        rows = len(world.kinds) + extra
        cfg = make_config(
            world.scorer_url, world.tmp, **{**SETTINGS, **OVERRIDES, "score__batch_size": 16}
        )
        before = rows_read(world.cfg, "webcam_snapshots", index=False)
        out = score.run(cfg, model=world.version)
        read = rows_read(world.cfg, "webcam_snapshots", index=False) - before
        good = sum(1 for k in world.kinds.values() if k == "good")
        assert out["scored"] == good
        assert out["failed_by_reason"]["missing_url"] == extra + 1
        # the work list and the 'already scored' count: two scans, whatever the page count
        assert rows <= read <= 3 * rows, read
