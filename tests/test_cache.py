"""`airatings cache` end to end: real Postgres (migrated), real loopback HTTP server, real files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cache_fixtures import (
    Server,
    cache_files,
    encode,
    gradient,
    jpeg,
    make_exported_run,
    odd_images,
)
from PIL import Image, JpegImagePlugin

from jobs import cache, db, paths, runs
from jobs.errors import InputError

CONTRACT = [
    "snapshot_id",
    "firebase_url",
    "label_source",
    "label_value",
    "split",
    "phase",
    "captured_at",
    "rating_count",
    "is_good",
    "webcam_id",
    "region",
    "source",
    "rating_std",
    "rating_hist",
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ccfg(make_cfg, server: Server):
    """Baseline config allowing only the test server's exact address; fast retries."""

    def build(**kw):
        opts = {
            "cache__allowed_private_hosts": f'["127.0.0.1:{server.port}"]',
            "cache__max_attempts": 2,
            "cache__backoff_base_s": 0,
            "cache__total_timeout_s": 5,
            "cache__max_bytes": 2_000_000,
            "cache__max_pixels": 2_000_000,
            **kw,
        }
        c = make_cfg(**opts)
        db.migrate(c)
        return c

    return build


def good_urls(srv: Server, n: int, prefix: str = "g") -> list[str]:
    return [srv.add(f"{prefix}{i}.jpg", jpeg(640, 360, seed=i)) for i in range(n)]


def read_failures(cfg, run) -> dict[int, str]:
    t = pq.read_table(paths.of(cfg).run(run.model_version).failures).to_pydict()
    return dict(zip(t["snapshot_id"], t["reason"], strict=True))


def test_cache_end_to_end(ccfg, server: Server) -> None:
    cfg = ccfg(cache__failure_rate_limit=0.9)
    good = good_urls(server, 12)
    odd = [server.add(name, data, "image/png") for name, data in sorted(odd_images().items())]
    bad = {
        server.url("/status/404"): "http_404",
        server.url("/status/410"): "http_410",
        server.url("/status/500"): "http_500",
        server.url("/html"): "not_an_image",
        server.url("/json-as-jpeg"): "not_an_image",
        server.add("trunc.jpg", jpeg(400, 300)[:4000]): "truncated",
        server.add("bomb.jpg", jpeg(2000, 1500)): "decompression_bomb",  # 3 MP > 2 MP cap
        server.url("/gzip-bomb"): "too_large",
        server.url(f"/redirect?to=http://127.0.0.1:{server.port + 1}/x.jpg"): "blocked_url",
        server.url("/redirect?to=file:///etc/passwd"): "blocked_url",
        server.url("/loop/0"): "too_many_redirects",
        "file:///etc/passwd": "blocked_url",
        "http://169.254.169.254/latest/meta-data/": "blocked_url",
        "http://[::ffff:127.0.0.1]/": "blocked_url",
        "ftp://example.com/a.jpg": "blocked_url",
    }
    # The same URL on two snapshots is fetched once; a null URL is a recorded failure.
    urls = [*good, good[0], *odd, *bad, None]
    run = make_exported_run(cfg, urls)

    summary = cache.run(cfg, run_ref=run.model_version, env={})
    assert summary["status"] == "cached"
    assert summary["rows"] == len(urls) and summary["failed_rows"] == len(bad) + 1
    assert server.hits["/img/g0.jpg"] == 1  # distinct URLs once
    assert (
        server.hits["/status/404"] == 1 and server.hits["/status/500"] == 2
    )  # permanent vs retried

    fails = read_failures(cfg, run)
    by_url = {u: i + 1 for i, u in enumerate(urls) if u}
    for url, reason in bad.items():
        assert fails[by_url[url]] == reason, url
    assert fails[len(urls)] == "missing_url"
    failures = pq.read_table(paths.of(cfg).run(run.model_version).failures)
    assert set(failures.column_names) == {"snapshot_id", "split", "url", "reason", "attempts"}
    assert "token" not in "".join(failures.column("url").to_pylist())

    # Active manifests: the contract columns + the cache's, only the rows that cached, sorted.
    active = {
        s: pq.read_table(p)
        for s, p in paths.of(cfg).run(run.model_version).active_manifests.items()
    }
    assert sum(t.num_rows for t in active.values()) == len(good) + 1 + len(odd)
    for t in active.values():
        assert t.column_names == [*CONTRACT, "image_sha256", "image_path", "train_image_path"]
        ids = t.column("snapshot_id").to_pylist()
        assert ids == sorted(ids) and not set(ids) & set(fails)
        for sha, orig, train in zip(
            *(t.column(c).to_pylist() for c in ("image_sha256", "image_path", "train_image_path")),
            strict=True,
        ):
            assert (cfg.artifacts_dir / orig).is_file() and sha in orig and ".." not in orig
            with Image.open(cfg.artifacts_dir / train) as im:
                assert im.format == "JPEG" and min(im.size) == min(256, min(im.size))
    g0 = paths.of(cfg).images.train_copy(active["train"].column("image_sha256")[0].as_py(), 256)
    with Image.open(g0) as im:
        assert im.size == (455, 256)  # 640x360 -> short side 256, aspect kept
        # chroma halved horizontally only (cheaper to decode every epoch, images.encode_jpeg)
        assert JpegImagePlugin.get_sampling(im) == 1  # 4:2:2

    # Nothing cached for any failure: one original + one training copy per good content, no temp files.
    files = cache_files(cfg)
    assert not [p for p in files if p.name.startswith(".tmp-")]
    originals = [p for p in files if "/original/" in str(p)]
    assert len(originals) == len(good) + len(odd)
    assert len([p for p in files if "/train256/" in str(p)]) == len(good) + len(odd)

    with db.connect(cfg) as conn:
        r = runs.get_run(conn, cfg, run.id)
        indexed = conn.execute("select count(*) from airatings.image_cache").fetchone()[0]
    assert r.status == "cached" and r.params["cache"]["failed_rows"] == len(bad) + 1
    assert r.params["cache"]["failure_reasons"]["blocked_url"] == 6
    assert indexed == len(good) + len(odd)

    # The same run again: already done, no requests.
    server.reset()
    again = cache.run(cfg, run_ref=run.model_version, env={})
    assert again["status"] == "already_done" and server.total_requests == 0


def test_resume_makes_zero_requests(ccfg, server: Server) -> None:
    cfg = ccfg()
    urls = good_urls(server, 30, prefix="r")
    first = cache.run(cfg, run_ref=make_exported_run(cfg, urls).model_version, env={})
    assert first["fetch"]["fetched"] == 30
    # Lose one training copy (e.g. a changed volume): rebuilt from the original, no request.
    sha = (
        pq.read_table(first["active_dir"] + "/manifest_train.parquet")
        .column("image_sha256")[0]
        .as_py()
    )
    (paths.of(cfg).images.train_copy(sha, 256)).unlink()
    server.reset()
    run2 = make_exported_run(cfg, urls[::-1] + [None], version="test_v2_resume_2")
    second = cache.run(cfg, run_ref=run2.model_version, env={})
    assert server.total_requests == 0
    assert second["fetch"]["requests"] == 0 and second["fetch"]["from_index"] == 30
    assert second["fetch"]["train_copies_regenerated"] == 1
    assert (paths.of(cfg).images.train_copy(sha, 256)).is_file()
    assert second["active_rows"] == 30


def test_a_damaged_cached_original_is_fetched_again(ccfg, server: Server) -> None:
    cfg = ccfg()
    urls = good_urls(server, 3, prefix="d")
    first = cache.run(cfg, run_ref=make_exported_run(cfg, urls).model_version, env={})
    t = pq.read_table(first["active_dir"] + "/manifest_train.parquet")
    sha, orig = t.column("image_sha256")[0].as_py(), t.column("image_path")[0].as_py()
    good_bytes = (cfg.artifacts_dir / orig).read_bytes()
    # Damaged on disk, same size (the index's size check passes), training copy lost.
    (cfg.artifacts_dir / orig).write_bytes(b"\0" * len(good_bytes))
    (paths.of(cfg).images.train_copy(sha, 256)).unlink()
    server.reset()
    second = cache.run(
        cfg, run_ref=make_exported_run(cfg, urls, version="test_v2_damaged_2").model_version, env={}
    )
    assert second["active_rows"] == 3 and second["failed_rows"] == 0
    assert server.total_requests == 1 and second["fetch"]["fetched"] == 1
    assert (cfg.artifacts_dir / orig).read_bytes() == good_bytes
    assert (paths.of(cfg).images.train_copy(sha, 256)).is_file()


def active_urls(cfg, run) -> set[str]:
    return {
        u
        for p in paths.of(cfg).run(run.model_version).active_manifests.values()
        for u in pq.read_table(p).column("firebase_url").to_pylist()
    }


def test_an_index_hit_is_rechecked_against_the_current_config(
    ccfg, server: Server, tmp_path: Path
) -> None:
    """The image index is no bypass (docs/faults.md 30): a URL cached under a permissive config
    fails, with the reason a fresh fetch would give and without a request, once the config
    forbids it (file:// off, a lower pixel cap, a format removed, a name resolving to a
    private address)."""
    permissive = ccfg(
        cache__allow_file_urls=True,
        cache__allow_private_networks=True,
        cache__failure_rate_limit=1.0,
    )
    pics = permissive.data_dir / "pics"
    pics.mkdir(parents=True)
    (pics / "local.jpg").write_bytes(jpeg(300, 200, seed=61))
    urls = {
        "plain": server.add("plain.jpg", jpeg(320, 200, seed=60)),
        "file": (pics / "local.jpg").as_uri(),
        "big": server.add("big.jpg", jpeg(1280, 720, seed=62)),  # 921,600 px, draft-decoded
        "png": server.add("p.png", encode(gradient(64, 48, 5), "PNG"), "image/png"),
        "name": f"http://localhost:{server.port}/img/plain.jpg",  # resolves to loopback
    }
    first = make_exported_run(permissive, list(urls.values()))
    out = cache.run(permissive, run_ref=first.model_version, env={})
    assert out["active_rows"] == len(urls) and out["failed_rows"] == 0
    with db.connect(permissive) as conn:
        w, h = conn.execute(
            "select width, height from airatings.image_cache where url = %s", (urls["big"],)
        ).fetchone()
    assert (w, h) == (1280, 720)  # the header's size, not the 640x360 draft decode

    def rerun(version: str, **kw) -> dict[int, str]:
        cfg = ccfg(cache__failure_rate_limit=1.0, **kw)
        server.reset()
        run = make_exported_run(cfg, list(urls.values()), version=version)
        summary = cache.run(cfg, run_ref=run.model_version, env={})
        assert server.total_requests == 0 and summary["fetch"]["files_read"] == 0
        assert summary["fetch"]["requests"] == 0
        fails = read_failures(cfg, run)
        assert not set(active_urls(cfg, run)) & {urls[k] for k in fails_by_key(fails)}
        return fails

    keys = list(urls)

    def fails_by_key(fails: dict[int, str]) -> dict[str, str]:
        return {keys[sid - 1]: reason for sid, reason in fails.items()}

    # file:// not allowed; the test server's exact address still is (so is the name
    # resolving to it)
    strict = rerun("test_v2_recheck_1")
    assert fails_by_key(strict) == {"file": "blocked_url"}
    # no private address allowed at all: the literal ones and the name resolving to loopback
    closed = rerun("test_v2_recheck_0", cache__allowed_private_hosts="[]")
    assert fails_by_key(closed) == dict.fromkeys(urls, "blocked_url")
    # private networks allowed again, but a lower pixel cap and PNG removed
    capped = rerun(
        "test_v2_recheck_2",
        cache__allow_private_networks=True,
        cache__max_pixels=500_000,
        cache__formats='["JPEG", "WEBP", "GIF"]',
    )
    assert fails_by_key(capped) == {
        "file": "blocked_url",
        "big": "decompression_bomb",
        "png": "unsupported_format",
    }

    # An index row written before header sizes were recorded holds the draft-decoded size
    # (640x360 here): the pixel cap still sees the real 1280x720.
    with db.connect(permissive) as conn:
        conn.execute(
            "update airatings.image_cache set width = 640, height = 360 where url = %s",
            (urls["big"],),
        )
    legacy = rerun(
        "test_v2_recheck_3", cache__allow_private_networks=True, cache__max_pixels=500_000
    )
    assert fails_by_key(legacy) == {"file": "blocked_url", "big": "decompression_bomb"}

    # The permissive config still uses every cached file: nothing was dropped from the index.
    server.reset()
    again = make_exported_run(permissive, list(urls.values()), version="test_v2_recheck_4")
    out = cache.run(permissive, run_ref=again.model_version, env={})
    assert out["active_rows"] == len(urls) and out["fetch"]["from_index"] == len(urls)
    assert server.total_requests == 0


def rewrite_one_label(path: Path) -> None:
    """Tamper with a manifest the quiet way: still a valid Parquet file, one label changed."""
    import pyarrow as pa

    t = pq.read_table(path)
    labels = t.column("label_value").to_pylist()
    labels[0] = 5.0 if labels[0] != 5.0 else 0.0
    i = t.column_names.index("label_value")
    pq.write_table(t.set_column(i, "label_value", pa.array(labels, pa.float64())), path)


def test_a_changed_export_manifest_is_refused_exit_2(ccfg, server: Server) -> None:
    """The cache verifies each export manifest against the sha256 the run's record holds
    (docs/faults.md 31): a valid Parquet with one label changed is refused, naming the file."""
    from conftest import AIRATINGS, air_env

    cfg = ccfg()
    run = make_exported_run(cfg, good_urls(server, 4, prefix="m"))
    manifest = cache._dataset(cfg, run).manifest("train")
    rewrite_one_label(manifest)
    with pytest.raises(InputError, match="manifest_train.parquet changed after the export"):
        cache.run(cfg, run_ref=run.model_version, env={})
    env = {
        **os.environ,
        **air_env(
            cfg.database.url,
            cfg.paths.artifacts_dir.parent,
            cache__allowed_private_hosts=f'["127.0.0.1:{server.port}"]',
        ),
    }
    proc = subprocess.run(
        [AIRATINGS, "cache", "--run", run.model_version],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and str(manifest) in proc.stderr, proc.stderr
    assert server.total_requests == 0 and cache_files(cfg) == []
    with db.connect(cfg) as conn:
        assert runs.get_run(conn, cfg, run.id).status == "exported"


def test_already_cached_is_checked_not_assumed(ccfg, server: Server) -> None:
    """A run at 'cached' whose active manifests are missing or changed is merged again (the
    images are in the store: no request), unsharded and with --merge alike."""
    cfg = ccfg()
    urls = good_urls(server, 12, prefix="a") + [server.url("/status/404")]
    run = make_exported_run(cfg, urls)
    first = cache.run(cfg, run_ref=run.model_version, env={})
    active = paths.of(cfg).run(run.model_version).active_manifests
    written = {s: p.read_bytes() for s, p in active.items()}
    assert set(first["active_files"]) == {p.name for p in active.values()}

    active["val"].unlink()
    server.reset()
    again = cache.run(cfg, run_ref=run.model_version, env={})
    assert again["status"] == "cached" and server.total_requests == 0
    assert active["val"].read_bytes() == written["val"]

    rewrite_one_label(active["train"])  # still a valid Parquet file, one label changed
    again = cache.run(cfg, run_ref=run.model_version, env={})
    assert again["status"] == "cached" and server.total_requests == 0
    assert {s: p.read_bytes() for s, p in active.items()} == written
    assert list(read_failures(cfg, run).values()) == ["http_404"]
    assert cache.run(cfg, run_ref=run.model_version, env={})["status"] == "already_done"

    # A sharded run: --merge redoes the merge from the shard outputs.
    run2 = make_exported_run(cfg, urls, version="test_v2_checked_2")
    for shard in ("0/2", "1/2"):
        cache.run(cfg, run_ref=run2.model_version, shard=shard, env={})
    cache.run(cfg, run_ref=run2.model_version, merge=True, env={})
    paths2 = paths.of(cfg).run(run2.model_version).active_manifests
    before = paths2["test"].read_bytes()
    rewrite_one_label(paths2["test"])
    server.reset()
    merged = cache.run(cfg, run_ref=run2.model_version, merge=True, env={})
    assert merged["status"] == "cached" and paths2["test"].read_bytes() == before
    assert server.total_requests == 0


def test_failure_rate_over_the_limit_fails_loudly(ccfg, server: Server) -> None:
    cfg = ccfg(cache__failure_rate_limit=0.2)
    urls = (
        good_urls(server, 6, prefix="f")
        + [server.url(f"/status/404?i={i}") for i in range(3)]
        + [server.url("/html")]
    )
    run = make_exported_run(cfg, urls)
    with pytest.raises(InputError) as err:
        cache.run(cfg, run_ref=run.model_version, env={})
    msg = str(err.value)
    assert "4 of 10 images failed" in msg and "http_404 3" in msg and "not_an_image 1" in msg
    assert not any(
        p.exists() for p in paths.of(cfg).run(run.model_version).active_manifests.values()
    )
    with db.connect(cfg) as conn:
        assert runs.get_run(conn, cfg, run.id).status == "exported"
    assert sorted(read_failures(cfg, run).values()) == ["http_404"] * 3 + ["not_an_image"]


def test_failure_rate_over_the_limit_from_transient_failures_exits_75(ccfg, server: Server) -> None:
    """Most failures transient (503s, timeouts): the source is unavailable, not wrong, so the
    job is retried later (exit 75), not stopped as bad input (exit 2)."""
    from jobs.errors import TransientError

    cfg = ccfg(cache__failure_rate_limit=0.2, cache__total_timeout_s=0.3)
    urls = (
        good_urls(server, 4, prefix="u")
        + [server.url(f"/status/503?i={i}") for i in range(4)]
        + [server.url(f"/hang/{i}") for i in range(2)]
        + [server.url("/status/404")]
    )
    run = make_exported_run(cfg, urls)
    with pytest.raises(TransientError) as err:
        cache.run(cfg, run_ref=run.model_version, env={})
    assert err.value.exit_code == 75
    msg = str(err.value)
    assert "7 of 11 images failed" in msg and "6 of them transient" in msg
    assert "http_503 4" in msg and "timeout 2" in msg
    assert server.hits["/status/503?i=0"] == 2  # retried (max_attempts 2), then given up
    assert not any(
        p.exists() for p in paths.of(cfg).run(run.model_version).active_manifests.values()
    )
    with db.connect(cfg) as conn:
        assert runs.get_run(conn, cfg, run.id).status == "exported"
    assert (
        sorted(read_failures(cfg, run).values())
        == ["http_404"] + ["http_503"] * 4 + ["timeout"] * 2
    )
    assert cache.is_transient_reason("http_429") and cache.is_transient_reason("connection_error")
    assert not cache.is_transient_reason("http_404") and not cache.is_transient_reason("truncated")


def test_cache_runs_a_fixed_set_of_workers_not_a_task_per_url(ccfg, server: Server) -> None:
    """Memory does not grow with the number of URLs (docs/faults.md 33): however many URLs,
    the event loop holds about cache.concurrency tasks (a bounded queue feeds them), and the
    results come back as flat arrays."""
    import asyncio

    cfg = ccfg(cache__concurrency=4, cache__per_host=4)
    urls = [server.add(f"w{i}.jpg", jpeg(32, 24, seed=i)) for i in range(300)] + [
        server.url("/status/404")
    ]
    most = 0

    async def main(conn):
        nonlocal most
        done = False

        async def sample() -> None:
            nonlocal most
            while not done:
                most = max(most, len(asyncio.all_tasks()))
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        try:
            return await cache.cache_urls(cfg, urls, index=cache.ImageIndex(cfg, conn))
        finally:
            done = True
            await sampler

    with db.connect(cfg, autocommit=True) as conn:
        results, stats = asyncio.run(main(conn))
    assert stats["fetched"] == 301 and server.total_requests == 301
    assert 5 <= most <= 4 + 10  # the workers, the producer, this test's and aiohttp's own
    assert isinstance(results, cache.UrlResults) and results.failure_counts() == {"http_404": 1}
    table = results.table()
    assert table.column("url").to_pylist() == sorted(urls)  # the input was not sorted
    import pyarrow as pa

    assert pa.Table.from_batches(list(results.batches(rows=64))).equals(table)
    assert table.column("image_sha256").null_count == 1
    assert table.column("reason").to_pylist().count("http_404") == 1


def test_shards_then_merge_equal_the_unsharded_result(ccfg, server: Server) -> None:
    cfg = ccfg()
    urls = good_urls(server, 20, prefix="s") + [server.url("/status/404")]
    run = make_exported_run(cfg, urls)
    with pytest.raises(InputError, match="no cache shard outputs"):
        cache.run(cfg, run_ref=run.model_version, merge=True, env={})
    s0 = cache.run(cfg, run_ref=run.model_version, shard="0/2", env={})
    assert s0["status"] == "shard_done"
    with pytest.raises(InputError, match=r"shards \[1\] of 2"):
        cache.run(cfg, run_ref=run.model_version, merge=True, env={})
    s1 = cache.run(
        cfg, run_ref=run.model_version, env={"JOB_COMPLETION_INDEX": "1", "JOB_COMPLETIONS": "2"}
    )
    assert s1["shard"] == "1/2" and s0["urls"] + s1["urls"] == 21
    assert server.total_requests == 21  # each URL fetched by exactly one shard
    merged = cache.run(cfg, run_ref=run.model_version, merge=True, env={})
    assert merged["status"] == "cached" and merged["active_rows"] == 20 and merged["shards"] == 2
    assert list(read_failures(cfg, run).values()) == ["http_404"]


@pytest.mark.parametrize(
    "shard,env,message",
    [
        ("2/2", {}, "out of range"),
        ("0/0", {}, "out of range"),
        ("a/b", {}, "expected I/N"),
        (None, {"JOB_COMPLETION_INDEX": "0"}, "JOB_COMPLETIONS"),
        (None, {"JOB_COMPLETION_INDEX": "4", "JOB_COMPLETIONS": "4"}, "out of range"),
    ],
)
def test_bad_shard_is_bad_input(shard, env, message) -> None:
    with pytest.raises(InputError, match=message):
        cache.parse_shard(shard, env)


def test_shard_partition_is_stable_and_complete() -> None:
    urls = [f"https://img.example/{i}.jpg" for i in range(200)]
    parts = [[u for u in urls if cache.shard_of(u, 3) == i] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(urls) and all(parts)
    assert cache.parse_shard(None, {}) == (0, 1) and cache.parse_shard("2/3", {}) == (2, 3)


def test_second_concurrent_run_exits_zero_saying_why(ccfg, server: Server) -> None:
    cfg = ccfg()
    run = make_exported_run(cfg, good_urls(server, 2, prefix="l"))
    with db.job_lock(cfg, "cache", run.id) as held:
        assert held
        out = cache.run(cfg, run_ref=run.model_version, env={})
    assert out["status"] == "skipped" and "lock" in out["reason"]
    assert server.total_requests == 0 and cache_files(cfg) == []


def test_stale_temp_files_are_swept(ccfg, server: Server) -> None:
    """The sweep at a shard's start removes what a dead writer left, never another live
    shard's in-flight download (docs/faults.md 29)."""
    from jobs import artifacts

    cfg = ccfg()
    incoming = cfg.artifacts_dir / "images" / "original"
    incoming.mkdir(parents=True)
    stale = incoming / ".tmp-dead-beef.part"  # a legacy, unowned name, long abandoned
    stale.write_bytes(b"half a download")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = stale.with_name(".tmp-live-writer.part")  # unowned but young: may be in flight
    fresh.write_bytes(b"in progress")
    sibling = subprocess.Popen(["sleep", "60"])  # another shard, alive, on this host
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = artifacts.owner_tag()
    live_body = incoming / f".tmp-h{tag}-p{sibling.pid}-0a0b0c-body.part"
    live_body.write_bytes(b"downloading")
    dead_body = incoming / f".tmp-h{tag}-p{dead.pid}-0a0b0c-body.part"
    dead_body.write_bytes(b"killed mid-download")
    try:
        cache.run(
            cfg,
            run_ref=make_exported_run(cfg, good_urls(server, 2, prefix="t")).model_version,
            env={},
        )
        assert not stale.exists() and fresh.exists()
        assert live_body.exists() and not dead_body.exists()
    finally:
        sibling.kill()
        sibling.wait()


def test_file_urls_in_the_demo_config(make_cfg, server: Server, tmp_path: Path) -> None:
    cfg = make_cfg(Path(REPO / "configs" / "demo.yaml"), cache__failure_rate_limit=0.9)
    db.migrate(cfg)
    pics = cfg.data_dir / "demo-images"
    pics.mkdir(parents=True)
    for i in range(3):
        (pics / f"{i}.jpg").write_bytes(jpeg(300, 200, seed=40 + i))
    (pics / "notes.txt").write_text("not a picture")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg(300, 200, seed=50))
    urls = [(pics / f"{i}.jpg").as_uri() for i in range(3)] + [
        (pics / "notes.txt").as_uri(),
        "file:///etc/passwd",
        outside.as_uri(),
        (pics / "gone.jpg").as_uri(),
    ]
    run = make_exported_run(cfg, urls)
    out = cache.run(cfg, run_ref=run.model_version, env={})
    assert (
        out["active_rows"] == 3 and out["fetch"]["files_read"] == 7 and server.total_requests == 0
    )
    assert sorted(read_failures(cfg, run).values()) == [
        "blocked_url",
        "blocked_url",
        "file_not_found",
        "not_an_image",
    ]


def test_cli_bad_shard_exits_2(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "AIR_ARTIFACTS_DIR": str(tmp_path / "a"),
        "AIR_DATA_DIR": str(tmp_path / "d"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "cache", "--shard", "5/2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "out of range" in proc.stderr
    assert not (tmp_path / "a").exists()


# ---- the merge's pieces, without a database ---------------------------------------------------


def _url(i: int) -> str:
    return f"https://img.example/cam/{i:05d}.jpg"


def test_result_rows_find_each_url_like_index_in() -> None:
    """The merge finds each manifest URL's result by binary search in the sorted shard URLs;
    it must answer what a hash lookup (``pc.index_in``, the code before) answers: absent,
    null, empty, before the first and past the last URL included, across batch edges."""
    import random

    import pyarrow as pa
    import pyarrow.compute as pc

    rng = random.Random(7)
    present = sorted({_url(rng.randrange(2000)) for _ in range(600)})
    needles = [_url(rng.randrange(2000)) for _ in range(3000)]
    needles += [None, "", "a", "zzz", present[0], present[-1], "https://img.example/é.jpg"]
    rng.shuffle(needles)
    values = pa.chunked_array([pa.array(present[:250]), pa.array(present[250:])])
    urls = pa.chunked_array([pa.array(needles[:1234]), pa.array(needles[1234:])])
    got = cache._result_rows(values, urls, batch=256)
    assert len(got) == len(needles)
    assert got.to_pylist() == pc.index_in(urls, value_set=values).to_pylist()
    found = sum(r is not None for r in got.to_pylist())
    assert 500 < found < len(needles) - 1500  # both cases, many times
    empty = pa.chunked_array([pa.array([], pa.string())])
    assert cache._result_rows(empty, urls).null_count == len(needles)


def _shard_file(path: Path, urls: list[str]) -> Path:
    import pyarrow as pa

    n = len(urls)
    table = pa.table(
        {
            "url": urls,
            "image_sha256": [f"{i:064x}" for i in range(n)],
            "ext": ["jpg"] * n,
            "reason": pa.nulls(n, pa.string()),
            "attempts": pa.array([1] * n, pa.int32()),
            "bytes": pa.array([100] * n, pa.int64()),
            "from_index": [False] * n,
        },
        schema=cache.results_schema(),
    )
    pq.write_table(table, path)
    return path


def test_several_shards_are_sorted_into_one_url_order(tmp_path: Path) -> None:
    urls = [_url(i) for i in range(300)]
    files = [
        _shard_file(
            tmp_path / f"{i}-of-3.parquet", sorted(u for u in urls if cache.shard_of(u, 3) == i)
        )
        for i in range(3)
    ]
    got = cache._sorted_results(files)
    assert got.column("url").to_pylist() == urls  # every row, in URL order
    one = cache._sorted_results(files[:1])
    assert one.column("url").to_pylist() == sorted(u for u in urls if cache.shard_of(u, 3) == 0)
    twice = _shard_file(tmp_path / "dup.parquet", urls[:5])
    with pytest.raises(InputError, match="list a URL twice"):
        cache._sorted_results([files[0], twice, _shard_file(tmp_path / "d2.parquet", urls[:5])])


def _manifest(path: Path, ids: list[int], urls: list[str | None], row_group: int) -> Path:
    import pyarrow as pa

    from jobs.manifests import MANIFEST_SCHEMA

    n = len(ids)
    cols = {
        "snapshot_id": ids,
        "firebase_url": urls,
        "label_source": ["human"] * n,
        "label_value": [1.0] * n,
        "split": ["train"] * n,
        "phase": ["sunset"] * n,
        "captured_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
        "rating_count": [3] * n,
        "is_good": [True] * n,
        "webcam_id": [i % 7 for i in ids],
        "region": ["eu"] * n,
        "source": ["app"] * n,
        "rating_std": [0.5] * n,
        "rating_hist": [[0, 1, 2, 0, 0, 0]] * n,
    }
    pq.write_table(pa.table(cols, schema=MANIFEST_SCHEMA), path, row_group_size=row_group)
    return path


@pytest.mark.parametrize("in_order", [True, False])
def test_a_split_larger_than_a_row_group_is_streamed_in_row_groups(
    tmp_path: Path, monkeypatch, in_order: bool
) -> None:
    """The merge reads a split MERGE_BATCH rows at a time (4,096; 31 here) and writes row
    groups of ACTIVE_ROW_GROUP rows (16,384; 50 here): every kept row once, in snapshot_id
    order, each with its own image, full row groups but the last; a manifest not in
    snapshot_id order is sorted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    monkeypatch.setattr(cache, "ACTIVE_ROW_GROUP", 50)
    monkeypatch.setattr(cache, "MERGE_BATCH", 31)  # input batches across the output's groups
    n = 1037
    ids = list(range(1, n + 1)) if in_order else [(i * 389) % n + 1 for i in range(n)]
    urls = [None if i % 97 == 0 else _url(i % 400) for i in ids]  # shared URLs, some missing
    path = _manifest(tmp_path / "m.parquet", ids, urls, row_group=73)
    results = cache._sorted_results(
        [_shard_file(tmp_path / "r.parquet", [_url(i) for i in range(0, 400, 2)])]
    )
    pos = cache._result_rows(results.column("url"), pa.chunked_array([pa.array(urls)]))
    keep = pc.is_valid(pos)  # odd URLs and missing ones have no result
    out = tmp_path / "active.parquet"
    written = cache._write_active(path, out, results.drop_columns(["url"]), keep, pos, 224)
    table = pq.read_table(out)
    expect = sorted((i, u) for i, u in zip(ids, urls, strict=True) if u and int(u[-9:-4]) % 2 == 0)
    assert written == table.num_rows == len(expect) > 400
    assert (
        list(
            zip(
                table.column("snapshot_id").to_pylist(),
                table.column("firebase_url").to_pylist(),
                strict=True,
            )
        )
        == expect
    )
    sha_of = dict(
        zip(
            results.column("url").to_pylist(),
            results.column("image_sha256").to_pylist(),
            strict=True,
        )
    )
    assert table.column("image_sha256").to_pylist() == [sha_of[u] for _, u in expect]
    sha = table.column("image_sha256")[0].as_py()
    assert table.column("train_image_path")[0].as_py() == f"images/train224/{sha[:2]}/{sha}.jpg"
    groups = [
        pq.ParquetFile(out).metadata.row_group(g).num_rows
        for g in range(pq.ParquetFile(out).num_row_groups)
    ]
    if in_order:
        assert groups[:-1] == [50] * (len(groups) - 1) and 0 < groups[-1] <= 50
    assert table.schema == __import__("jobs.manifests").manifests.ACTIVE_SCHEMA
