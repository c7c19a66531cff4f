"""The demo lifecycle end to end on a small world: seed, then a release (migrate -> dbt + export
-> cache -> train -> evaluate), through `jobs.release.demo` (what `just demo` runs). The demo world's planted
faults must come out of the cache with the right reasons, and re-running changes nothing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from conftest import DEMO
from train_fixtures import FAST

from jobs import db, dbt_runner, paths, provenance, release, score

# What each planted fault must look like in failures.parquet.
EXPECTED_REASON = {
    "dead_url": "file_not_found",
    "webcam_images_missing": "file_not_found",
    "truncated_jpeg": "truncated",
    "html_as_jpg": "not_an_image",
}


def test_demo_lifecycle_on_a_small_world(make_cfg):
    cfg = make_cfg(
        DEMO,
        **{**FAST, "train__epochs": 2},
        demo__snapshots=400,
        demo__image_width=160,
        demo__image_height=90,
        dataset__min_rating_count=1,
        evaluate__min_test_rows=10,
        evaluate__bootstrap_samples=100,
    )
    out = release.demo(cfg)
    assert out["status"] == "released" and out["resumed"] is False
    steps = out["steps"]
    assert steps["export"]["status"] == "exported"
    assert steps["cache"]["status"] == "cached"
    assert steps["train"]["status"] == "trained"
    assert steps["evaluate"]["status"] == "evaluated"
    version = out["model_version"]

    # Every failed snapshot is one the world planted a fault in, with the matching reason,
    # and every planted image fault among the exported snapshots was caught.
    truth = {
        r["snapshot_id"]: r["fault"]
        for r in pq.read_table(cfg.data_dir / "demo-truth.parquet").to_pylist()
    }
    run_paths = paths.of(cfg).run(version)
    failures = pq.read_table(run_paths.failures).to_pylist()
    assert failures, "the demo world plants image faults; some must reach the cache"
    for f in failures:
        assert EXPECTED_REASON.get(truth[f["snapshot_id"]]) == f["reason"], f
    exported = (
        pq.read_table(out["dataset_dir"] + "/manifest_full.parquet")
        .column("snapshot_id")
        .to_pylist()
    )
    planted = {s for s in exported if truth[s] in EXPECTED_REASON}
    assert planted == {f["snapshot_id"] for f in failures}
    # NULL/empty URLs never reach the cache: the dbt gate drops them
    assert not {s for s in exported if truth[s] in {"null_url", "empty_url"}}

    # The active manifests hold exactly the exported rows minus the failures.
    active = sum(
        pq.read_table(run_paths.active_manifest(s)).num_rows for s in ("train", "val", "test")
    )
    assert active == len(exported) - len(failures)

    # Provenance: the run's label rows are exactly the exported manifest.
    with db.connect(cfg) as conn:
        labels = conn.execute(
            "select count(*) from airatings.model_training_snapshot_labels l"
            " join airatings.model_training_runs r on r.id = l.training_run_id where r.model_version = %s",
            (version,),
        ).fetchone()[0]
        status = conn.execute(
            "select status from airatings.model_training_runs where model_version = %s", (version,)
        ).fetchone()[0]
    assert labels == len(exported)
    assert status == "registered"
    # ... and the release took it out of the training box: ONNX within parity, registered
    # write-once with its card and the app's runtime config, promoted (no production before)
    assert steps["export-onnx"]["status"] == "onnx_exported"
    assert steps["register"]["status"] == "registered"
    assert out["parity"]["max_abs_delta_raw"] <= 1e-4
    model_dir = Path(out["model_dir"])
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["model_version"] == version and card["dataset"]["hash"] == out["dataset_hash"]
    assert (model_dir / "model.onnx").is_file()
    env_lines = (model_dir / "release.env").read_text().splitlines()
    assert f"AI_MODEL_VERSION={version}" in env_lines
    assert out["promotion"]["status"] == "promoted"
    with db.connect(cfg) as conn:
        production = conn.execute(
            "select model_version from airatings.model_aliases where alias = 'production'"
        ).fetchone()[0]
    assert production == version

    # ... and say which of them training used: the used rows are the active manifests, the
    # excluded ones the failures with the cache's reasons (`airatings provenance VERSION`).
    prov = provenance.run(cfg, version)
    assert prov["labels"]["offered"] == len(exported)
    assert prov["labels"]["used"] == active
    assert prov["labels"]["not_cached_yet"] == 0
    assert prov["labels"]["excluded_by_reason"] == dict(Counter(f["reason"] for f in failures))
    assert prov["ratings"]["behind_used_labels"] > active  # most labels have several ratings
    assert prov["ratings"]["people"] > 10
    assert prov["changed_since"] == {
        "status": "ok",
        "snapshots_gone": 0,
        "label_value_changed": 0,
        "label_source_changed": 0,
        "ratings_changed": 0,
        "formula_version_changed": 0,
    }
    used_ids = set()
    with db.connect(cfg) as conn:
        used_ids = {
            r[0]
            for r in conn.execute(
                "select snapshot_id from airatings.model_training_labels_used"
                " where model_version = %s",
                (version,),
            )
        }
    active_ids = {
        sid
        for s in ("train", "val", "test")
        for sid in pq.read_table(run_paths.active_manifest(s)).column("snapshot_id").to_pylist()
    }
    assert used_ids == active_ids
    # `airatings dbt test` passes on the demo world (the demo builds the whole project).
    with db.connect(cfg) as conn:
        built = conn.execute(
            "select params_json->'export'->'dbt'->'results' from airatings.model_training_runs"
            " where model_version = %s",
            (version,),
        ).fetchone()[0]
    assert built.get("error", 0) == 0 and built["pass"] > 50  # the whole project's tests
    tested = dbt_runner.cli(cfg, ["test"])
    assert tested["results"].get("pass", 0) > 0 and set(tested["results"]) == {"pass"}

    # The demo ends with a scoring pass: rows and the webcams' AI fields are in the app's tables.
    scoring = out["scoring"]
    assert scoring["model_version"] == version and scoring["scored"] > 0
    with db.connect(cfg) as conn:
        (rows,) = conn.execute(
            "select count(*) from public.snapshot_ai_inferences where model_version = %s",
            (version,),
        ).fetchone()
        (cams,) = conn.execute(
            "select count(*) from public.webcams where ai_model_version = %s and ai_rating is not null",
            (version,),
        ).fetchone()
    assert rows == scoring["scored"]
    assert cams == scoring["webcams_updated"] > 0

    # Running the demo again resumes: same dataset, nothing fetched, training already done.
    again = release.demo(cfg)
    assert again["model_version"] == version
    assert again["dataset_hash"] == out["dataset_hash"]
    assert again["steps"]["export"]["status"] == "already_exported"
    assert again["steps"]["cache"]["status"] in {"already_done", "cached"}
    assert again["steps"]["train"]["status"] == "already_done"
    assert again["steps"]["export-onnx"]["status"] == "already_done"
    assert again["steps"]["register"]["status"] == "already_registered"
    # the reseed empties the app's tables, inference rows included: scored again, the same
    assert again["scoring"]["scored"] == rows
    # and a scoring re-run on an unchanged world adds nothing
    rerun = score.run(cfg, backfill=True)
    assert rerun["scored"] == 0 and rerun["already_scored"] == rows and rerun["failed"] == 0

    # The app moves on: a new rating on one used snapshot, a changed calculated rating on
    # another. Provenance sees both (dbt's label view is live), and one snapshot's detail
    # names the ratings behind its label.
    a, b = sorted(active_ids)[:2]
    with db.connect(cfg) as conn:
        conn.execute(
            "insert into public.webcam_snapshot_ratings (snapshot_id, user_id, rating, created_at)"
            " values (%s, 'new-rater', 5, now())",
            (a,),
        )
        conn.execute(
            "update public.webcam_snapshots set calculated_rating = 5 - calculated_rating"
            " where id = %s and calculated_rating <> 2.5",
            (b,),
        )
    prov = provenance.run(cfg, version)
    assert prov["changed_since"]["ratings_changed"] == 1
    assert prov["changed_since"]["label_value_changed"] == 1
    detail = provenance.run(cfg, version, snapshot=a)["snapshot"]
    assert detail["used_in_training"] is True and detail["exclusion_reason"] is None
    assert [r["rating_id"] for r in detail["ratings"]] == detail["rating_ids"]
    assert all("user_id" in r for r in detail["ratings"])
    assert detail["now"]["changed"] is True
    assert len(detail["now"]["rating_ids"]) == len(detail["rating_ids"]) + 1
    excluded = failures[0]["snapshot_id"]
    assert (
        provenance.run(cfg, version, snapshot=excluded)["snapshot"]["exclusion_reason"]
        == (failures[0]["reason"])
    )

    _review_loop(make_cfg, cfg, out, version)


def _review_loop(make_cfg, cfg, out, v1):
    """The evaluation loop (issue [9/11]) on the demo world: the demo ended with a review
    report (page, review set) and a history; a simulated review is imported; the next export
    carries exactly those labels; a second version is scored and reviewed; the history shows
    both with a verdict."""
    import csv
    import io
    import shutil

    from browser import inspect_page

    from jobs import review

    rv = out["review"]
    assert rv["n"] > 0 and rv["review_items"] > 0
    page = Path(rv["page"])
    shot_dir = Path(__file__).resolve().parents[1] / ".data" / "test-artifacts"
    shot_dir.mkdir(parents=True, exist_ok=True)
    seen = inspect_page(page, screenshot=shot_dir / "review-page.png")
    assert seen["errors"] == [], seen["errors"]
    assert seen["cards"] == rv["review_items"]
    with db.connect(cfg) as conn:
        (cached,) = conn.execute(
            "select count(*) from airatings.review_items i join public.webcam_snapshots s"
            " on s.id = i.snapshot_id join airatings.image_cache c on c.url = s.firebase_url"
            " where i.model_version = %s",
            (v1,),
        ).fetchone()
    assert seen["card_images"] == cached > 0  # every cached thumbnail decodes
    assert seen["decoded"] == seen["images"]  # the calibration plot too
    lines = list(csv.reader(io.StringIO(seen["csv"])))
    assert lines[0] == list(review.CSV_COLUMNS)
    assert len(lines) == 2 and lines[1][1:3] == ["3.5", "tester"]
    assert lines[1][5] == 'a, "quoted" note'
    assert (shot_dir / "review-page.png").stat().st_size > 0
    assert out["history"]["cycles"][0]["model_version"] == v1

    # a re-run of the report reproduces the same numbers and set from the frozen rows
    again = review.report_job(cfg)
    assert again["status"] == "already_reported"
    assert again["items_sha256"] and again["mae"] == rv["mae"]

    # the reviewer's CSV: the top disagreements get the model's rating (the label was wrong)
    with db.connect(cfg) as conn:
        items = conn.execute(
            "select snapshot_id, ai_rating from airatings.review_items"
            " where model_version = %s and reason = 'top_disagreement' order by item_rank limit 5",
            (v1,),
        ).fetchall()
    f = cfg.data_dir / "review.csv"
    f.write_text(
        "snapshot_id,label,reviewer\n"
        + "".join(f"{sid},{round(ai * 2) / 2},tester\n" for sid, ai in items)
    )
    imported = review.import_job(cfg, f)
    assert imported["status"] == "imported" and imported["rows"] == len(items)
    assert imported["accounting"]["flagged_label_errors"] == len(items)
    relabelled = {sid: round(ai * 2) / 2 for sid, ai in items}

    # the next release: its export reads those labels (label precedence), one epoch of training
    cfg2 = make_cfg(
        DEMO,
        **{**FAST, "train__epochs": 1},
        demo__snapshots=400,
        demo__image_width=160,
        demo__image_height=90,
        dataset__min_rating_count=1,
        evaluate__min_test_rows=10,
        evaluate__bootstrap_samples=100,
    )
    second = release.run(cfg2, new=True)
    v2 = second["model_version"]
    assert v2 != v1 and second["run_status"] == "registered"
    with db.connect(cfg) as conn:
        manual = dict(
            conn.execute(
                "select l.snapshot_id, l.label_value from airatings.model_training_snapshot_labels l"
                " join airatings.model_training_runs r on r.id = l.training_run_id"
                " where r.model_version = %s and l.label_source = 'manual_review'",
                (v2,),
            ).fetchall()
        )
    assert manual == relabelled

    # the second version scored and reviewed; the history shows both with a verdict
    assert score.run(cfg2, model=v2, backfill=True)["scored"] > 0
    r2 = review.report_job(cfg2, model_version=v2)
    assert r2["status"] == "reported" and r2["n"] > 0
    hist = review.history_job(cfg2, compare=(v2, v1))
    assert set(hist["versions"]) == {v1, v2}
    cmp = hist["comparison"]
    assert cmp["new"] == v2 and cmp["old"] == v1 and cmp["n"] > 0
    assert cmp["verdict"] in {"improved", "regressed", "no detectable change"}
    assert cmp["ci"][0] <= cmp["mae_diff"] <= cmp["ci"][1]
    # the imported corrections moved the old model's labels toward its own ratings
    labels = cmp["labels"]
    assert labels["labels_changed"] >= len(relabelled)  # and the provenance edits above
    assert labels["mae_change_from_labels"] < 0
    assert Path(hist["chart"]).stat().st_size > 0
    shutil.copy(hist["chart"], shot_dir / "review-history.png")
