"""`airatings demo seed`: the demo world's statistics, faults, determinism and safety.

Small worlds (300 snapshots, 160x90 images) on the real embedded PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from psycopg import sql
from scipy.stats import spearmanr

from jobs import db, paths
from jobs.demo.seed import APP_TABLES, app_schema_sql, seed
from jobs.demo.world import START_DATE
from jobs.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SMALL = {"demo__image_width": 160, "demo__image_height": 90, "demo__workers": 1}
N = 300


@pytest.fixture
def small_cfg(make_cfg):
    return make_cfg(DEMO, **SMALL)


def _rows(cfg, table: str) -> list[tuple]:
    with db.connect(cfg) as conn:
        return conn.execute(
            sql.SQL("select * from {} order by id").format(
                sql.Identifier(cfg.database.app_schema, table)
            )
        ).fetchall()


def _url_path(url: str) -> Path:
    return Path(url2pathname(urlparse(url).path))


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _sky_saturation(path: Path) -> float:
    with Image.open(path) as img:
        img.load()
        hsv = np.asarray(img.convert("HSV"), dtype=np.float64)
    return float(hsv[: int(hsv.shape[0] * 0.45), :, 1].mean())


def test_seed_world_statistics_and_faults(small_cfg):
    summary = seed(small_cfg, snapshots=N, seed=11)

    # The summary: counts per region, phase, source and fault kind, and the totals.
    assert summary["status"] == "seeded"
    assert summary["snapshots"] == N and summary["webcams"] == small_cfg.demo.webcams
    assert sum(summary["regions"].values()) == N and sum(summary["phases"].values()) == N
    assert sum(1 for v in summary["regions"].values() if v > 0) >= 4
    assert sum(1 for v in summary["sources"].values() if v > 0) >= 2
    assert min(summary["phases"].values()) > 0.35 * N
    assert summary["images_dir"] == str(paths.of(small_cfg).demo_images)
    assert summary["bytes"] > 0 and summary["seconds"] >= 0

    webcams = _rows(small_cfg, "webcams")
    snaps = _rows(small_cfg, "webcam_snapshots")
    ratings = _rows(small_cfg, "webcam_snapshot_ratings")
    assert (
        len(webcams) == summary["webcams"]
        and len(snaps) == N
        and len(ratings) == summary["ratings"]
    )
    assert [r[0] for r in snaps] == list(range(1, N + 1))
    assert {r[3] for r in snaps} == {"sunrise", "sunset"}
    assert len({w[2] for w in webcams}) >= 4 and len({w[3] for w in webcams}) >= 2

    # captured_at sits at the webcam's local sunrise / sunset (local solar time), in the window.
    lon = {w[0]: w[5] for w in webcams}
    for s in snaps:
        solar_h = (s[4].hour + s[4].minute / 60 + lon[s[1]] / 15) % 24
        assert (3.0 < solar_h < 10.5) if s[3] == "sunrise" else (13.5 < solar_h < 21.0), s
        day = s[4].date().toordinal() - START_DATE.toordinal()  # a UTC date: may be the day before
        assert -1 <= day <= small_cfg.demo.days
        assert s[7] > s[4]  # created_at after the capture (upload delay)

    # Ratings agree with calculated_rating / rating_count over distinct (snapshot, user); the
    # one deliberately duplicated row is an exact copy under a new id.
    by_pair = defaultdict(list)
    for r in ratings:
        assert 0 <= r[3] <= 5 and isinstance(r[3], int)
        by_pair[(r[1], r[2])].append(r)
    dups = [rs for rs in by_pair.values() if len(rs) > 1]
    assert len(dups) == 1 and len(dups[0]) == 2
    assert dups[0][0][1:] == dups[0][1][1:] and dups[0][0][0] != dups[0][1][0]
    assert summary["faults"]["duplicate_rating"] == 1
    per_snap = defaultdict(list)
    for (sid, _), rs in by_pair.items():
        per_snap[sid].append(rs[0][3])
    for s in snaps:
        vals = per_snap.get(s[0], [])
        assert s[6] == len(vals)
        if vals:
            assert math.isclose(s[5], sum(vals) / len(vals), abs_tol=1e-12)
        else:
            assert s[5] is None
    counts = Counter(s[6] for s in snaps)
    assert 0.18 < counts[0] / N < 0.42 and 0.13 < counts[1] / N < 0.37
    assert max(counts) <= 8 and sum(v for k, v in counts.items() if k >= 2) / N > 0.3
    assert len({r[2] for r in ratings}) > 50  # many different people

    # Faults: counts as reported, rates near their settings, and the files behave accordingly.
    f = summary["faults"]
    urls = [s[2] for s in snaps]
    assert sum(u is None for u in urls) == f["null_url"]
    assert sum(u == "" for u in urls) == f["empty_url"]
    assert abs(f["dead_url"] / N - small_cfg.demo.dead_url_rate) < 0.01
    assert abs((f["truncated_jpeg"] + f["html_as_jpg"]) / N - small_cfg.demo.corrupt_rate) < 0.01
    assert abs(f["null_url"] / N - small_cfg.demo.null_url_rate) < 0.01
    assert f["truncated_jpeg"] >= 1 and f["html_as_jpg"] >= 1 and f["empty_url"] >= 1
    root = paths.of(small_cfg).demo_images
    missing, truncated, html, good = [], 0, 0, {}
    for s in snaps:
        if not s[2]:
            continue
        assert s[2].startswith("file://")
        path = _url_path(s[2])
        assert path.is_relative_to(root) and path.suffix == ".jpg"
        if not path.exists():
            missing.append(s)
            continue
        head = path.read_bytes()[:16]
        if head.startswith(b"<!DOCTYPE html"):
            html += 1
            continue
        assert head.startswith(b"\xff\xd8\xff")
        try:
            with Image.open(path) as img:
                img.load()
                assert img.size == (160, 90) and img.mode == "RGB"
            good[s[0]] = path
        except OSError:
            truncated += 1
    assert truncated == f["truncated_jpeg"] and html == f["html_as_jpg"]
    assert len(missing) == f["dead_url"] + f["webcam_images_missing"]
    missing_cam = webcams[-1][0]
    cam_snaps = [s for s in snaps if s[1] == missing_cam]
    assert len(cam_snaps) == f["webcam_images_missing"] > 0
    assert all(s[2] and not _url_path(s[2]).exists() for s in cam_snaps)
    assert summary["images"] == len(good) + truncated + html

    # Learnable: sky saturation tracks people's ratings.
    rated = [s for s in snaps if s[0] in good and s[6] >= 1]
    rho = spearmanr([_sky_saturation(good[s[0]]) for s in rated], [s[5] for s in rated])[0]
    assert rho > 0.3, rho

    # The hidden truth: quality spans the range, about a fifth is good, weather is grouped.
    truth = pq.read_table(paths.of(small_cfg).demo_truth).to_pydict()
    q = np.array(truth["true_quality"])
    assert len(q) == N and q.min() < 0.5 and q.max() > 4.5
    assert 0.08 < (q >= 4).mean() < 0.32
    groups = defaultdict(list)
    for cam, day, v in zip(truth["webcam_id"], truth["day"], q, strict=True):
        groups[(cam, day)].append(v)
    within = np.mean([np.var(v) for v in groups.values() if len(v) > 1])
    assert within < 0.5 * np.var(q)


def test_reseed_same_seed_same_rows_and_bytes(make_cfg):
    first = make_cfg(DEMO, **SMALL)
    s1 = seed(first, snapshots=N, seed=5)
    rows1 = {t: _rows(first, t) for t in APP_TABLES}
    files1 = _file_hashes(paths.of(first).demo_images)
    assert s1["images_written"] == s1["images"] > 0

    # Again into the same database and folder, rendered by a pool of 2 processes this time:
    # same rows (no duplicates, created_at included), same bytes, nothing rewritten.
    again = make_cfg(DEMO, **{**SMALL, "demo__workers": 2})
    s2 = seed(again, snapshots=N, seed=5)
    assert {t: _rows(again, t) for t in APP_TABLES} == rows1
    assert _file_hashes(paths.of(again).demo_images) == files1
    assert s2["images_written"] == 0 and s2["images_unchanged"] == s1["images"]
    assert {k: s2[k] for k in ("faults", "regions", "phases", "bytes")} == {
        k: s1[k] for k in ("faults", "regions", "phases", "bytes")
    }

    # Identities moved past the explicit ids: the app can keep inserting.
    with db.connect(again) as conn:
        new_id = conn.execute(
            "insert into webcams (name, region, source) values ('x', 'europe', 'windy') returning id"
        ).fetchone()[0]
        conn.rollback()
    assert new_id == len(rows1["webcams"]) + 1

    # Another seed replaces the world: different rows, and no file is left behind that the new
    # world does not point at (a dead URL stays dead).
    s3 = seed(again, snapshots=N, seed=6)
    snaps = _rows(again, "webcam_snapshots")
    assert snaps != rows1["webcam_snapshots"] and len(snaps) == N
    pointed = {_url_path(s[2]) for s in snaps if s[2]}
    on_disk = {p for p in paths.of(again).demo_images.rglob("*") if p.is_file()}
    assert on_disk <= pointed and len(on_disk) == s3["images"]
    assert (
        len(pointed - on_disk) == s3["faults"]["dead_url"] + s3["faults"]["webcam_images_missing"]
    )


def test_refuses_app_tables_holding_foreign_rows(make_cfg):
    cfg = make_cfg(DEMO, **SMALL)
    with db.connect(cfg) as conn:
        conn.execute(app_schema_sql())
        conn.execute("insert into webcams (name, region) values ('the real app', 'europe')")
    with pytest.raises(InputError, match="did not write"):
        seed(cfg, snapshots=N, seed=1)
    assert [r[1] for r in _rows(cfg, "webcams")] == ["the real app"]
    assert not paths.of(cfg).demo_images.exists()

    # A separate app schema is created on demand and seeded (identifiers quoted properly).
    other = make_cfg(DEMO, **SMALL, database__app_schema="demo_app")
    out = seed(other, snapshots=N, seed=1)
    assert out["app_schema"] == "demo_app" and len(_rows(other, "webcam_snapshots")) == N
    assert [r[1] for r in _rows(cfg, "webcams")] == ["the real app"]


def test_second_concurrent_seed_exits_zero_and_writes_nothing(small_cfg):
    with db.job_lock(small_cfg, "demo-seed", small_cfg.database.app_schema) as held:
        assert held
        out = seed(small_cfg, snapshots=N, seed=1)
    assert out["status"] == "skipped"
    assert not paths.of(small_cfg).demo_images.exists()
    with db.connect(small_cfg) as conn:
        assert conn.execute("select to_regclass('public.webcams')").fetchone()[0] is None


def test_bad_input(small_cfg, make_cfg):
    with pytest.raises(InputError, match="at least 10"):
        seed(small_cfg, snapshots=3, seed=1)
    with pytest.raises(InputError, match=">= 0"):
        seed(small_cfg, snapshots=N, seed=-1)
    with pytest.raises(ConfigError, match="rater_noise_min"):
        make_cfg(DEMO, demo__rater_noise_min=0.9, demo__rater_noise_max=0.5)
    with pytest.raises(ConfigError, match="demo.bogus: unknown key"):
        make_cfg(DEMO, demo__bogus=1)
    assert not paths.of(small_cfg).demo_images.exists()


def test_cli_json_summary(database_url, tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "AIR_DATA_DIR": str(tmp_path / "data"),
        "AIR_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "AIR__DEMO__IMAGE_WIDTH": "160",
        "AIR__DEMO__IMAGE_HEIGHT": "90",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "demo",
            "seed",
            "--config",
            str(DEMO),
            "--snapshots",
            "120",
            "--seed",
            "3",
            "--json",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["snapshots"] == 120 and out["seed"] == 3
    for key in ("regions", "phases", "faults", "webcams", "ratings", "images", "bytes", "seconds"):
        assert key in out
    assert Path(out["images_dir"]) == tmp_path / "data" / "demo-images"
    assert sum(1 for p in Path(out["images_dir"]).rglob("*.jpg")) == out["images"]

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "demo",
            "seed",
            "--config",
            str(DEMO),
            "--snapshots",
            "2",
            "--json",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "at least 10" in json.loads(bad.stdout)["error"]


def test_reseeding_another_world_forgets_cached_urls_of_rewritten_files(demo_cfg, make_cfg):
    """The image cache trusts a URL's content never to change; a re-seed with another seed
    rewrites files at the same file:// URLs (and removes some), so their index rows must go.
    Re-seeding the same world keeps them (a demo re-run fetches nothing again)."""
    cfg = make_cfg(DEMO, **SMALL)  # same database and dirs as demo_cfg (migrated)
    seed(cfg, snapshots=N, seed=5)
    url = next(s[2] for s in _rows(cfg, "webcam_snapshots") if s[2] and _url_path(s[2]).exists())
    elsewhere = "https://img.example.com/a.jpg"

    def index_rows() -> set[str]:
        with db.connect(cfg) as conn:
            return {r[0] for r in conn.execute("select url from airatings.image_cache")}

    def cache(*urls: str) -> None:
        with db.connect(cfg) as conn:
            for u in urls:
                conn.execute(
                    "insert into airatings.image_cache (url_key, url, sha256, ext, bytes, width,"
                    " height) values (%s, %s, %s, 'jpg', 1, 1, 1) on conflict do nothing",
                    (hashlib.sha256(u.encode()).hexdigest(), u, "0" * 64),
                )

    def failures() -> int:
        with db.connect(cfg) as conn:
            return conn.execute("select count(*) from airatings.score_failures").fetchone()[0]

    cache(url, elsewhere)
    with db.connect(cfg) as conn:  # a permanent scoring failure of snapshot 1 in this world
        conn.execute(
            "insert into airatings.score_failures (snapshot_id, model_version, reason, transient)"
            " values (1, 'v', 'not_an_image', false)"
        )
    assert seed(cfg, snapshots=N, seed=5)["cache_index_rows_forgotten"] == 0
    assert index_rows() == {url, elsewhere} and failures() == 1  # the same world: kept
    out = seed(cfg, snapshots=N, seed=6)
    assert out["cache_index_rows_forgotten"] == 1
    assert index_rows() == {elsewhere}  # only URLs under the demo images dir are forgotten
    assert failures() == 0  # snapshot 1 is another snapshot now
