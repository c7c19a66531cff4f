"""`airatings evaluate`: the whole job on a tiny trained world (report, metrics.json,
model_evaluations rows, reproducibility, "already done"). The metrics themselves:
tests/test_metrics.py; the report's templates: tests/test_report.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from browser import inspect_page
from psycopg import sql
from train_fixtures import FAST, make_world, run_status

import jobs.train
from jobs import calibration, db, evaluate, paths
from jobs.artifacts import sha256_file
from jobs.errors import InputError, TransientError
from jobs.runs import table


def _db_rows(cfg, version):
    with db.connect(cfg) as conn:
        return conn.execute(
            sql.SQL(
                "select slice, metric, value, status, n, ci_low, ci_high from {}"
                " where model_version = %s order by slice, metric"
            ).format(table(cfg, "model_evaluations")),
            (version,),
        ).fetchall()


def test_evaluate_job_end_to_end(make_cfg):
    cfg = make_cfg(**FAST, evaluate__bootstrap_samples=200)
    db.migrate(cfg)
    world = make_world(cfg, n=300)
    version = world["model_version"]
    with pytest.raises(InputError, match="needs 'trained'"):
        evaluate.run(cfg)
    jobs.train.run(cfg)

    cmp_cfg = make_cfg(**FAST, evaluate__bootstrap_samples=200, evaluate__compare_to=version)
    out = evaluate.run(cmp_cfg)
    assert out["status"] == "evaluated" and out["n"] == 45
    assert isinstance(out["mae"], float) and out["vs_constant"] in {
        "better",
        "worse",
        "no detectable difference",
    }
    assert out["comparisons"][f"run:{version}"] == "no detectable difference"  # itself
    assert out["production"] == "no production alias set: no production comparison"
    assert run_status(cfg, world["run_id"])[0] == "evaluated"

    run_paths = paths.of(cfg).run(version)
    metrics = json.loads(run_paths.metrics.read_text())
    allm = metrics["metrics"]["all"]
    assert allm["mae"]["ci_low"] <= allm["mae"]["value"] <= allm["mae"]["ci_high"]
    assert metrics["metrics"]["phase=sunrise"]["mae"]["status"] == "ok"
    assert (
        metrics["metrics"]["region=north"]["mae"]["status"] == "insufficient_data"
    )  # 15 < 20 rows
    assert set(metrics["confusion_matrix"]) == {"tp", "fp", "fn", "tn"}
    assert sum(metrics["confusion_matrix"].values()) == 45

    # calibration fitted on the val split; the capture gate measured on the calibrated score
    knots = metrics["calibration_knots"]
    assert knots["method"] in {"isotonic", "fallback"} and len(knots["x"]) == len(knots["y"])
    assert out["calibration"] == knots  # what export-onnx takes
    test = pq.read_table(run_paths.active_manifest("test")).to_pydict()
    raw, _ = evaluate.predict(
        cfg,
        run_paths.best_checkpoint,
        [cfg.artifacts_dir / p for p in test["train_image_path"]],
        batch_size=32,
    )
    ai = calibration.apply(knots, raw)
    y = np.asarray(test["label_value"])
    t = cfg.dataset.good_threshold
    gate = metrics["capture_gate"]
    assert gate["confusion_matrix"] == {
        "tp": int(np.sum((ai >= t) & (y >= t))),
        "fp": int(np.sum((ai >= t) & (y < t))),
        "fn": int(np.sum((ai < t) & (y >= t))),
        "tn": int(np.sum((ai < t) & (y < t))),
    }
    assert gate["metrics"]["mae"]["value"] == pytest.approx(float(np.mean(np.abs(ai - y))))
    for name in ("precision", "recall"):
        m = gate["metrics"][name]
        if m["status"] == "ok":
            assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert sum(c["n"] for c in metrics["calibration_after"]) == 45
    # each test row's prediction is kept: the report's numbers recompute from it
    pred = pq.read_table(run_paths.predictions).to_pydict()
    assert pred["snapshot_id"] == test["snapshot_id"] and len(pred["ai_rating"]) == 45
    assert np.allclose(pred["raw_score"], raw) and np.allclose(pred["ai_rating"], ai)
    assert {"phase", "captured_at", "region", "source", "label_value", "score"} <= set(pred)
    assert allm["mae"]["value"] == pytest.approx(
        float(np.mean(np.abs(np.asarray(pred["score"]) - np.asarray(pred["label_value"]))))
    )
    assert out["predictions_sha256"] == sha256_file(run_paths.predictions)
    html = run_paths.report.read_text()
    assert html.count("data:image/png;base64,") == 5
    assert 'src="http' not in html and "<script" not in html
    # small slices are listed once with their size instead of rows of "insufficient data"
    assert "region=north (n=15)" in html and "<td>region=north</td>" not in html
    # What a person sees in a real browser: every plot decodes, the sections are there.
    seen = inspect_page(run_paths.report)
    assert seen["images"] == 5 and seen["decoded"] == 5, seen["broken"]
    assert seen["title"] == f"Evaluation: {version}"
    assert {"Summary", "Plots", "Slices", "Calibration"} <= set(seen["headings"])
    assert any(h.startswith("Capture gate (aiRating") for h in seen["headings"])
    assert "Reliability before/after calibration" in html
    assert seen["tables"] >= 3

    rows = _db_rows(cfg, version)
    mae_row = next(r for r in rows if r[0] == "all" and r[1] == "mae")
    assert {"gate_precision", "gate_recall", "gate_f1"} <= {r[1] for r in rows}
    assert mae_row[2] == pytest.approx(allm["mae"]["value"]) and mae_row[4] == 45
    assert any(r[1] == f"mae_diff_vs_{version}" and r[2] == 0 for r in rows)
    assert any(
        r[0] == "region=north" and r[3] == "insufficient_data" and r[2] is None for r in rows
    )

    # a re-run reproduces the same numbers (seeded bootstrap) and upserts the same keys
    evaluate.run(cmp_cfg)
    assert _db_rows(cfg, version) == rows
    assert json.loads(run_paths.metrics.read_text()) == metrics

    # too few test rows for the whole split: insufficient data, not numbers
    strict = make_cfg(**FAST, evaluate__bootstrap_samples=200, evaluate__min_test_rows=1000)
    out = evaluate.run(strict)
    assert out["mae"] == "insufficient_data" and out["vs_constant"] == "insufficient_data"
    metrics = json.loads(run_paths.metrics.read_text())
    assert metrics["metrics"]["all"]["spearman"] == {
        "value": None,
        "status": "insufficient_data",
        "n": 45,
        "ci_low": None,
        "ci_high": None,
    }
    row = next(r for r in _db_rows(cfg, version) if r[0] == "all" and r[1] == "mae")
    assert row[2] is None and row[3] == "insufficient_data"
    assert not any(
        r[1] == f"mae_diff_vs_{version}" for r in _db_rows(cfg, version)
    )  # stale rows gone


def test_concurrent_evaluate_exits_saying_so(make_cfg):
    cfg = make_cfg(**FAST)
    db.migrate(cfg)
    world = make_world(cfg, n=40)
    with db.job_lock(cfg, "evaluate", world["run_id"]):
        out = evaluate.run(cfg)
    assert out["status"] == "skipped"
    assert run_status(cfg, world["run_id"])[0] == "cached"


def test_evaluate_whose_lock_was_lost_exits_75_and_writes_no_result(make_cfg, monkeypatch):
    """The lock's connection dies while the test split is scored (server restart, network):
    a twin may be evaluating too, so nothing is committed (docs/faults.md 27)."""
    cfg = make_cfg(**FAST, evaluate__bootstrap_samples=50)
    db.migrate(cfg)
    world = make_world(cfg, n=120)
    jobs.train.run(cfg)
    real = evaluate.predict
    calls = []

    def score_then_lose_the_lock(*args, **kw):
        out = real(*args, **kw)
        calls.append(1)
        if len(calls) > 1:  # the test split is scored first, then the val split
            return out
        with db.connect(cfg, autocommit=True) as admin:
            pids = admin.execute(
                "select distinct pid from pg_locks where locktype = 'advisory' and granted"
                " and database = (select oid from pg_database where datname = current_database())"
            ).fetchall()
            assert pids
            for (pid,) in pids:
                admin.execute("select pg_terminate_backend(%s)", (pid,))
        return out

    monkeypatch.setattr(evaluate, "predict", score_then_lose_the_lock)
    with pytest.raises(TransientError, match="lost the advisory lock") as info:
        evaluate.run(cfg)
    assert info.value.exit_code == 75
    assert run_status(cfg, world["run_id"])[0] == "trained"
    assert _db_rows(cfg, world["model_version"]) == []
    assert not paths.of(cfg).run(world["model_version"]).metrics.exists()


def test_already_evaluated_is_checked_against_its_files_rows_and_inputs(make_cfg):
    """docs/faults.md 30 for evaluate: "evaluated" is trusted only while metrics.json and
    report.html are the files it wrote, its rows are there and its inputs are the same;
    otherwise the run is evaluated again (never an exit-2 dead end)."""
    cfg = make_cfg(**FAST, evaluate__bootstrap_samples=50)
    db.migrate(cfg)
    world = make_world(cfg, n=120)
    jobs.train.run(cfg)
    version = world["model_version"]
    run_paths = paths.of(cfg).run(version)
    first = evaluate.run(cfg)
    assert first["status"] == "evaluated"
    metrics, report = run_paths.metrics.read_text(), run_paths.report.read_text()
    rows = _db_rows(cfg, version)

    again = evaluate.run(cfg)
    assert again["status"] == "already_done" and again["mae"] == first["mae"]

    run_paths.report.unlink()
    out = evaluate.run(cfg)
    assert out["status"] == "evaluated" and run_paths.report.read_text() == report

    run_paths.metrics.write_text(metrics.replace('"n": ', '"n": 1'))
    assert evaluate.run(cfg)["status"] == "evaluated"
    assert run_paths.metrics.read_text() == metrics  # the seeded numbers, rewritten

    predictions = run_paths.predictions.read_bytes()
    run_paths.predictions.unlink()
    assert evaluate.run(cfg)["status"] == "evaluated"
    assert run_paths.predictions.read_bytes() == predictions

    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL("delete from {} where model_version = %s and slice <> 'all'").format(
                table(cfg, "model_evaluations")
            ),
            (version,),
        )
    assert evaluate.run(cfg)["status"] == "evaluated"
    assert _db_rows(cfg, version) == rows
    assert evaluate.run(cfg)["status"] == "already_done"

    # another evaluate setting, or another checkpoint, is another evaluation
    other = make_cfg(**FAST, evaluate__bootstrap_samples=60)
    assert evaluate.run(other)["status"] == "evaluated"
    assert evaluate.run(other)["status"] == "already_done"
    import torch

    # a best.pt or an active manifest that is not the file its step recorded is refused,
    # naming the command that puts it right (faults 31), instead of being evaluated
    best_bytes = run_paths.best_checkpoint.read_bytes()
    ckpt = torch.load(run_paths.best_checkpoint, weights_only=True)
    torch.save({**ckpt, "note": "another checkpoint"}, run_paths.best_checkpoint)
    with pytest.raises(InputError, match=f"airatings train --run {version}"):
        evaluate.run(other)
    run_paths.best_checkpoint.write_bytes(best_bytes)
    manifest = run_paths.active_manifest("test")
    original = manifest.read_bytes()
    manifest.write_bytes(original + b"\0")
    with pytest.raises(InputError, match=f"airatings cache --run {version}"):
        evaluate.run(other)
    manifest.write_bytes(original)
    assert evaluate.run(other)["status"] == "already_done"
    assert run_status(cfg, world["run_id"])[0] == "evaluated"
