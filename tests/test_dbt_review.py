"""The review loop's dbt models (fct_disagreements, rpt_disagreement_by_slice) on a real
PostgreSQL: a tiny world with inferences of two model versions, built with `airatings dbt build`
(``dbt_runner.cli``), its numbers checked against values computed here from the inserted rows."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import yaml
from export_fixtures import create_app_tables, make_config, scratch_database
from psycopg import sql

from jobs import db, dbt_runner
from jobs.errors import InputError

# webcam id -> (timezone as the app stores it, region, source, the zone to expect or None: UTC)
WEBCAMS = {
    1: ("Europe/Zurich", "alps", "public", "Europe/Zurich"),
    2: ("Not/A_Zone", "coast", "partner", None),  # invalid: must fall back to UTC, not fail
    3: (None, "alps", None, None),
    4: ("asia/tokyo", None, "partner", "Asia/Tokyo"),  # PostgreSQL knows it in any case
}
SNAPSHOTS = 30
TOO_FEW_RATINGS, NO_LABEL, DUPLICATE_URL, REVIEWED, NO_URL = 28, 29, 27, 30, 25
REVIEWED_LABEL = 4.5
STALE = 5  # (STALE, "rev_a") gets a second, older inference row written after the real one
VERSIONS = {"rev_a": range(1, SNAPSHOTS + 1), "rev_b": range(1, 11)}
INFERRED_AT = datetime(2026, 3, 1, 12, tzinfo=UTC)


def _t(cfg, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(cfg.database.app_schema), sql.Identifier(name))


def _snapshot(sid: int) -> dict:
    webcam = 1 + sid % len(WEBCAMS)
    phase = "sunrise" if sid % 4 == 0 else "sunset"
    at = datetime(2026, 1, 1 + sid % 28, 6 if phase == "sunrise" else 18, sid, tzinfo=UTC)
    if sid == 4:  # Zurich (webcam 1): 23:30 UTC on 31 Jan is 00:30 on 1 Feb there
        at = datetime(2026, 1, 31, 23, 30, tzinfo=UTC)
    if sid == 8:  # Zurich in summer time: UTC+2
        at = datetime(2026, 7, 1, 4, 30, tzinfo=UTC)
    ratings = [sid % 6, (sid * 2) % 6]
    if sid == TOO_FEW_RATINGS:
        ratings = ratings[:1]
    if sid in (NO_LABEL, REVIEWED):
        ratings = []
    url = f"https://storage.example.com/review/{sid}.jpg"
    if sid == DUPLICATE_URL:
        url = f"https://storage.example.com/review/{sid - 1}.jpg"
    if sid == NO_URL:
        url = None
    return {"id": sid, "webcam_id": webcam, "phase": phase, "captured_at": at, "url": url,
            "ratings": ratings}  # fmt: skip


def _ai_rating(version: str, sid: int) -> float:
    return ((sid * 7) % 11) / 2 if version == "rev_a" else ((sid * 3) % 11) / 2


def _seed(cfg) -> dict[tuple[str, int], int]:
    """The tiny world; returns the inference id of each (version, snapshot)'s latest row."""
    ids = {}
    with db.connect(cfg) as conn:
        for w, (tz, region, source, _) in WEBCAMS.items():
            conn.execute(
                sql.SQL(
                    "insert into {} (id, name, region, source, timezone) values (%s, %s, %s, %s, %s)"
                ).format(_t(cfg, "webcams")),
                (w, f"cam {w}", region, source, tz),
            )
        for sid in range(1, SNAPSHOTS + 1):
            s = _snapshot(sid)
            mean = sum(s["ratings"]) / len(s["ratings"]) if s["ratings"] else None
            conn.execute(
                sql.SQL(
                    "insert into {} (id, webcam_id, firebase_url, phase, captured_at,"
                    " calculated_rating, rating_count) values (%s, %s, %s, %s, %s, %s, %s)"
                ).format(_t(cfg, "webcam_snapshots")),
                (sid, s["webcam_id"], s["url"], s["phase"], s["captured_at"], mean,
                 len(s["ratings"])),
            )  # fmt: skip
            for u, r in enumerate(s["ratings"]):
                conn.execute(
                    sql.SQL(
                        "insert into {} (snapshot_id, user_id, rating) values (%s, %s, %s)"
                    ).format(_t(cfg, "webcam_snapshot_ratings")),
                    (sid, f"user{u}", r),
                )
        conn.execute(
            sql.SQL(
                "insert into {}.manual_relabels (snapshot_id, label_value, reviewer) values (%s, %s, 'ann')"
            ).format(sql.Identifier(cfg.database.ml_schema)),
            (REVIEWED, REVIEWED_LABEL),
        )
        insert = sql.SQL(
            "insert into {} (snapshot_id, webcam_id, model_version, raw_score, ai_rating,"
            " gate_passed, created_at) values (%s, %s, %s, %s, %s, %s, %s) returning id"
        ).format(_t(cfg, "snapshot_ai_inferences"))
        for version, sids in VERSIONS.items():
            for sid in sids:
                ai = _ai_rating(version, sid)
                at = INFERRED_AT + timedelta(seconds=sid)
                row = (sid, _snapshot(sid)["webcam_id"], version, ai / 5, ai, ai >= 4.0, at)
                ids[(version, sid)] = conn.execute(insert, row).fetchone()[0]
        # A stale row for the same pair, with a higher id but an older created_at: the latest by
        # created_at wins. (The unique index airatings migrate adds is not there: this world's
        # app tables were created after the migration.)
        sid = STALE
        conn.execute(
            insert, (sid, _snapshot(sid)["webcam_id"], "rev_a", 0.0, 0.0, False, INFERRED_AT - timedelta(days=9))
        )  # fmt: skip
    return ids


def _min_slice_size(cfg) -> int:
    """The value the build used: the config's, once Config.dbt_vars passes it, else the
    project's default."""
    project = yaml.safe_load((dbt_runner.project_dir() / "dbt_project.yml").read_text())
    return int(
        cfg.dbt_vars().get("review_min_slice_size", project["vars"]["review_min_slice_size"])
    )


@pytest.fixture(scope="module")
def reviewed(pg_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    with scratch_database(pg_server) as url:
        cfg = make_config(url, tmp)
        db.migrate(cfg)
        create_app_tables(cfg)
        ids = _seed(cfg)
        summary = dbt_runner.cli(cfg, ["build"])  # `airatings dbt build`: the whole project
        yield cfg, ids, summary


def _expected_rows(cfg, ids) -> dict[tuple[str, int], dict]:
    """fct_disagreements computed from the inserted rows."""
    out = {}
    for version, sids in VERSIONS.items():
        for sid in sids:
            s = _snapshot(sid)
            if sid in (TOO_FEW_RATINGS, NO_LABEL, DUPLICATE_URL):
                continue
            label = REVIEWED_LABEL if sid == REVIEWED else sum(s["ratings"]) / len(s["ratings"])
            ai = _ai_rating(version, sid)
            _, region, source, zone = WEBCAMS[s["webcam_id"]]
            local = s["captured_at"].astimezone(ZoneInfo(zone) if zone else UTC)
            out[(version, sid)] = {
                "webcam_id": s["webcam_id"],
                "inference_id": ids[(version, sid)],
                "raw_score": ai / 5,
                "ai_rating": ai,
                "gate_passed": ai >= 4.0,
                "label_value": label,
                "label_source": "manual_review" if sid == REVIEWED else "calculated_rating",
                "rating_count": len(s["ratings"]),
                "error": ai - label,
                "abs_error": abs(ai - label),
                "human_good": label >= cfg.dataset.good_threshold,
                "is_trainable": sid != NO_URL,
                "phase": s["phase"],
                "captured_at": s["captured_at"],
                "hour_of_day": local.hour,
                "hour_basis": "local" if zone else "utc",
                "hour_utc": s["captured_at"].hour,
                "month": local.month,
                "timezone_name": zone,
                "region": region,
                "source": source,
                "inference_created_at": INFERRED_AT + timedelta(seconds=sid),
            }
    return out


def _expected_slices(rows: dict[tuple[str, int], dict], min_size: int) -> dict:
    groups: dict[tuple[str, str], list[dict]] = {}
    for (version, _), r in rows.items():
        keys = ["all", f"phase={r['phase']}", f"hour={r['hour_of_day']:02d}",
                f"month={r['month']:02d}"]  # fmt: skip
        keys += [f"{dim}={r[dim]}" for dim in ("region", "source") if r[dim]]
        for key in keys:
            groups.setdefault((version, key), []).append(r)
    out = {}
    for key, members in groups.items():
        n = len(members)
        if key[1] != "all" and n < min_size:
            continue
        out[key] = {
            "n": n,
            "mae": sum(m["abs_error"] for m in members) / n,
            "bias": sum(m["error"] for m in members) / n,
            "share_abs_error_gt_1": sum(m["abs_error"] > 1.0 for m in members) / n,
            "mean_predicted": sum(m["ai_rating"] for m in members) / n,
            "mean_human": sum(m["label_value"] for m in members) / n,
        }
    return out


def _dicts(cfg, query: str, params: tuple = ()) -> list[dict]:
    with db.connect(cfg) as conn:
        cur = conn.execute(query, params)
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def test_build_runs_the_review_models_their_tests_and_unit_tests(reviewed):
    cfg, _, summary = reviewed
    assert set(summary["results"]) <= {"pass", "success", "no-op"}  # no-op: the exposures
    results = json.loads((dbt_runner.target_path(cfg) / "run_results.json").read_text())["results"]
    by_id = {r["unique_id"]: r["status"] for r in results}
    assert by_id["model.airatings.fct_disagreements"] == "success"
    assert by_id["model.airatings.rpt_disagreement_by_slice"] == "success"
    unit = {k.rsplit(".", 1)[1]: v for k, v in by_id.items() if k.startswith("unit_test.")}
    for name in (
        "test_disagreements_latest_inference",
        "test_disagreements_local_hour",
        "test_disagreement_slices_min_size",
    ):
        assert unit[name] == "pass", name
    for model in ("fct_disagreements", "rpt_disagreement_by_slice"):
        assert any(
            k.startswith(f"test.airatings.unique_combination_{model}") and v == "pass"
            for k, v in by_id.items()
        ), model


def test_disagreements_match_the_inserted_rows(reviewed):
    cfg, ids, _ = reviewed
    want = _expected_rows(cfg, ids)
    got = {
        (r.pop("model_version"), r.pop("snapshot_id")): r
        for r in _dicts(cfg, "select * from ml.fct_disagreements")
    }
    assert set(got) == set(want)
    for key, w in want.items():
        for column, value in w.items():
            if isinstance(value, float):
                assert got[key][column] == pytest.approx(value), (key, column)
            else:
                assert got[key][column] == value, (key, column)
    # the world covers what the model must tell apart
    assert {r["hour_basis"] for r in want.values()} == {"local", "utc"}
    assert any(r["hour_of_day"] != r["hour_utc"] for r in want.values())
    assert any(r["month"] != r["captured_at"].month for r in want.values())


def test_latest_inference_wins_over_a_stale_duplicate(reviewed):
    cfg, ids, _ = reviewed
    raw = _dicts(
        cfg,
        "select id, ai_rating from public.snapshot_ai_inferences"
        " where snapshot_id = %s and model_version = 'rev_a' order by id",
        (STALE,),
    )
    assert len(raw) == 2 and raw[1]["ai_rating"] == 0.0  # the stale one has the higher id
    (row,) = _dicts(
        cfg,
        "select inference_id, ai_rating from ml.fct_disagreements"
        " where snapshot_id = %s and model_version = 'rev_a'",
        (STALE,),
    )
    assert row == {"inference_id": ids[("rev_a", STALE)], "ai_rating": _ai_rating("rev_a", STALE)}


def test_slice_report_matches_the_rows(reviewed):
    cfg, ids, _ = reviewed
    min_size = _min_slice_size(cfg)
    want = _expected_slices(_expected_rows(cfg, ids), min_size)
    got = {}
    for r in _dicts(cfg, "select * from ml.rpt_disagreement_by_slice"):
        key = (r.pop("model_version"), r.pop("slice"))
        dim, value = r.pop("slice_dimension"), r.pop("slice_value")
        assert key[1] == ("all" if dim == "all" else f"{dim}={value}")
        got[key] = r
    assert set(got) == set(want)
    for key, w in want.items():
        assert got[key]["n"] == w["n"], key
        for metric in ("mae", "bias", "share_abs_error_gt_1", "mean_predicted", "mean_human"):
            assert got[key][metric] == pytest.approx(w[metric]), (key, metric)
    # both versions have 'all'; rev_a has a slice big enough to keep and others too small (the
    # world is sized for the default minimum, 20)
    assert {("rev_a", "all"), ("rev_b", "all")} <= set(got)
    assert any(v == "rev_a" and s != "all" for v, s in got)
    assert ("rev_a", "phase=sunrise") not in got and ("rev_b", "phase=sunset") not in got


def test_exposures_show_the_review_loop_and_the_app_cron(reviewed):
    cfg, _, _ = reviewed
    manifest = json.loads((dbt_runner.target_path(cfg) / "manifest.json").read_text())
    exposures = {e["name"]: e for e in manifest["exposures"].values()}
    assert set(exposures["review_loop"]["depends_on"]["nodes"]) == {
        "model.airatings.fct_disagreements",
        "model.airatings.rpt_disagreement_by_slice",
    }
    cron = exposures["app_cron_webcam_ai_rating"]
    assert cron["type"] == "application"
    assert "source.airatings.app.webcams" in cron["depends_on"]["nodes"]


def test_an_ai_rating_outside_0_5_fails_the_build(reviewed):
    """docs/faults.md 7: a rating outside 0..5 stops `dbt build`. Runs last: it rebuilds the
    model with the bad row, then takes it out again."""
    cfg, _, _ = reviewed
    delete = "delete from public.snapshot_ai_inferences where model_version = 'rev_bad'"
    with db.connect(cfg) as conn:
        conn.execute(
            "insert into public.snapshot_ai_inferences (snapshot_id, webcam_id, model_version,"
            " raw_score, ai_rating, gate_passed) values (1, %s, 'rev_bad', 1.2, 6.0, true)",
            (_snapshot(1)["webcam_id"],),
        )
    try:
        with pytest.raises(InputError, match=r"value_between_fct_disagreements_ai_rating"):
            dbt_runner.build(cfg, "fct_disagreements")
    finally:
        with db.connect(cfg) as conn:
            conn.execute(delete)
        dbt_runner.build(cfg, "fct_disagreements")
