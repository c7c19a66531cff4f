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
