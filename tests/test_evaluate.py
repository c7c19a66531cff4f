"""`airatings evaluate`: metrics on fixed predictions vs hand-computed values, then the whole
job on a tiny trained world (report, metrics.json, model_evaluations rows, reproducibility)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from browser import inspect_page
from psycopg import sql
from train_fixtures import FAST, make_world, run_status

import jobs.evaluate as E
import jobs.train
from jobs import db
from jobs.errors import InputError, TransientError
from jobs.runs import table


def test_regression_and_classification_metrics_match_hand_computed_values():
    y = np.array([1.0, 2.0, 4.0, 5.0])
    s = np.array([1.5, 2.0, 3.5, 4.0])
    t = 4.0
    # errors 0.5, 0, -0.5, -1
    assert E.metric_value("mae", y, s, t) == pytest.approx(0.5)
    assert E.metric_value("rmse", y, s, t) == pytest.approx(math.sqrt(1.5 / 4))
    assert E.metric_value("bias", y, s, t) == pytest.approx(-0.25)
    assert E.metric_value("spearman", y, s, t) == pytest.approx(1.0)
    # deviations s: -1.25 -0.75 0.75 1.25, y: -2 -1 1 2 -> 6.5 / sqrt(4.25 * 10)
    assert E.metric_value("pearson", y, s, t) == pytest.approx(6.5 / math.sqrt(42.5))
    # good = [F, F, T, T], predicted good = [F, F, F, T]: tp 1, fp 0, fn 1, tn 2
    assert E.confusion(y, s, t) == {"tp": 1, "fp": 0, "fn": 1, "tn": 2}
    assert E.metric_value("precision", y, s, t) == pytest.approx(1.0)
    assert E.metric_value("recall", y, s, t) == pytest.approx(0.5)
    assert E.metric_value("f1", y, s, t) == pytest.approx(2 / 3)

    # ROC AUC: positives score 0.35, 0.8; negatives 0.1, 0.4 -> 3 of 4 pairs ordered = 0.75
    # AP: ranked 0.8(+) 0.4(-) 0.35(+) 0.1(-): precision at the hits 1 and 2/3 -> 5/6
    y2 = np.array([1.0, 1.0, 4.5, 4.5])
    s2 = np.array([0.1, 0.4, 0.35, 0.8])
    assert E.metric_value("roc_auc", y2, s2, t) == pytest.approx(0.75)
    assert E.metric_value("pr_auc", y2, s2, t) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts half
    assert E.metric_value(
        "roc_auc", np.array([1.0, 4.5]), np.array([2.0, 2.0]), t
    ) == pytest.approx(0.5)
    # undefined: one class, constant predictions, nothing predicted good
    assert E.metric_value("roc_auc", y2[:2], s2[:2], t) is None
    assert E.metric_value("spearman", y, np.full(4, 2.0), t) is None
    assert E.metric_value("precision", y, np.zeros(4), t) is None


def test_calibration_buckets():
    y = np.array([1.0, 0.0, 4.0, 5.0, 2.0])
    s = np.array([0.5, 0.7, 4.2, 5.0, 2.5])
    cal = E.calibration(y, s)
    assert [c["n"] for c in cal] == [2, 0, 1, 0, 2]
    assert cal[0]["mean_predicted"] == pytest.approx(0.6) and cal[0]["mean_human"] == pytest.approx(
        0.5
    )
    assert cal[4]["bucket"] == "[4,5]" and cal[4]["mean_predicted"] == pytest.approx(4.6)
    assert cal[1]["mean_predicted"] is None


def test_bootstrap_is_seeded_and_paired_verdicts():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 200)
    good = y + rng.normal(0, 0.3, 200)
    const = np.full(200, y.mean())
    kw = {"samples": 300, "level": 0.95, "seed": 7}
    a = E.bootstrap_ci("mae", y, good, 4.0, key="all|mae", **kw)
    b = E.bootstrap_ci("mae", y, good, 4.0, key="all|mae", **kw)
    assert a == b and a[0] < E.metric_value("mae", y, good, 4.0) < a[1]
    lo, hi = E.bootstrap_ci("spearman", y, good, 4.0, key="all|spearman", **kw)
    assert 0.9 < lo < hi <= 1.0
    assert E.paired_bootstrap(y, good, const, key="k", **kw)["verdict"] == "better"
    assert E.paired_bootstrap(y, const, good, key="k", **kw)["verdict"] == "worse"
    same = E.paired_bootstrap(y, good, good, key="k", **kw)
    assert same["verdict"] == "no detectable difference" and same["mae_diff"] == 0


def test_too_few_rows_is_insufficient_data_not_a_number():
    y = np.array([1.0, 4.5, 3.0])
    s = np.array([1.2, 4.0, 2.0])
    m = E.headline_metrics(y, s, 4.0, min_rows=30, samples=50, level=0.95, seed=1)
    assert all(v["status"] == "insufficient_data" and v["value"] is None for v in m.values())
    m = E.headline_metrics(y, s, 4.0, min_rows=2, samples=50, level=0.95, seed=1)
    assert m["mae"]["status"] == "ok" and m["mae"]["value"] == pytest.approx(1.7 / 3)


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
        E.run(cfg)
    jobs.train.run(cfg)

    cmp_cfg = make_cfg(**FAST, evaluate__bootstrap_samples=200, evaluate__compare_to=version)
    out = E.run(cmp_cfg)
    assert out["status"] == "evaluated" and out["n"] == 45
    assert isinstance(out["mae"], float) and out["vs_constant"] in {
        "better",
        "worse",
        "no detectable difference",
    }
    assert out["comparisons"][f"run:{version}"] == "no detectable difference"  # itself
    assert "no model_aliases table" in out["production"]
    assert run_status(cfg, world["run_id"])[0] == "evaluated"

    run_dir = cfg.artifacts_dir / "runs" / version
    metrics = json.loads((run_dir / "metrics.json").read_text())
    allm = metrics["metrics"]["all"]
    assert allm["mae"]["ci_low"] <= allm["mae"]["value"] <= allm["mae"]["ci_high"]
    assert metrics["metrics"]["phase=sunrise"]["mae"]["status"] == "ok"
    assert (
        metrics["metrics"]["region=north"]["mae"]["status"] == "insufficient_data"
    )  # 15 < 20 rows
    assert set(metrics["confusion_matrix"]) == {"tp", "fp", "fn", "tn"}
    assert sum(metrics["confusion_matrix"].values()) == 45
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5
    assert 'src="http' not in html and "<script" not in html
    # small slices are listed once with their size instead of rows of "insufficient data"
    assert "region=north (n=15)" in html and "<td>region=north</td>" not in html
    # What a person sees in a real browser: every plot decodes, the sections are there.
    seen = inspect_page(run_dir / "report.html")
    assert seen["images"] == 5 and seen["decoded"] == 5, seen["broken"]
    assert seen["title"] == f"Evaluation: {version}"
    assert {"Summary", "Plots", "Slices"} <= set(seen["headings"])
    assert seen["tables"] >= 3

    rows = _db_rows(cfg, version)
    mae_row = next(r for r in rows if r[0] == "all" and r[1] == "mae")
    assert mae_row[2] == pytest.approx(allm["mae"]["value"]) and mae_row[4] == 45
    assert any(r[1] == f"mae_diff_vs_{version}" and r[2] == 0 for r in rows)
    assert any(
        r[0] == "region=north" and r[3] == "insufficient_data" and r[2] is None for r in rows
    )

    # a re-run reproduces the same numbers (seeded bootstrap) and upserts the same keys
    E.run(cmp_cfg)
    assert _db_rows(cfg, version) == rows
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics

    # too few test rows for the whole split: insufficient data, not numbers
    strict = make_cfg(**FAST, evaluate__bootstrap_samples=200, evaluate__min_test_rows=1000)
    out = E.run(strict)
    assert out["mae"] == "insufficient_data" and out["vs_constant"] == "insufficient_data"
    metrics = json.loads((run_dir / "metrics.json").read_text())
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
        out = E.run(cfg)
    assert out["status"] == "skipped"
    assert run_status(cfg, world["run_id"])[0] == "cached"


def test_evaluate_whose_lock_was_lost_exits_75_and_writes_no_result(make_cfg, monkeypatch):
    """The lock's connection dies while the test split is scored (server restart, network):
    a twin may be evaluating too, so nothing is committed (RELIABILITY 27)."""
    cfg = make_cfg(**FAST, evaluate__bootstrap_samples=50)
    db.migrate(cfg)
    world = make_world(cfg, n=120)
    jobs.train.run(cfg)
    real = E.predict_scores

    def score_then_lose_the_lock(*args, **kw):
        out = real(*args, **kw)
        with db.connect(cfg, autocommit=True) as admin:
            pids = admin.execute(
                "select distinct pid from pg_locks where locktype = 'advisory' and granted"
                " and database = (select oid from pg_database where datname = current_database())"
            ).fetchall()
            assert pids
            for (pid,) in pids:
                admin.execute("select pg_terminate_backend(%s)", (pid,))
        return out

    monkeypatch.setattr(E, "predict_scores", score_then_lose_the_lock)
    with pytest.raises(TransientError, match="lost the advisory lock") as info:
        E.run(cfg)
    assert info.value.exit_code == 75
    assert run_status(cfg, world["run_id"])[0] == "trained"
    assert _db_rows(cfg, world["model_version"]) == []
    assert not (cfg.artifacts_dir / "runs" / world["model_version"] / "metrics.json").exists()


def test_already_evaluated_is_checked_against_its_files_rows_and_inputs(make_cfg):
    """RELIABILITY 30 for evaluate: "evaluated" is trusted only while metrics.json and
    report.html are the files it wrote, its rows are there and its inputs are the same;
    otherwise the run is evaluated again (never an exit-2 dead end)."""
    cfg = make_cfg(**FAST, evaluate__bootstrap_samples=50)
    db.migrate(cfg)
    world = make_world(cfg, n=120)
    jobs.train.run(cfg)
    version = world["model_version"]
    run_dir = cfg.artifacts_dir / "runs" / version
    first = E.run(cfg)
    assert first["status"] == "evaluated"
    metrics, report = (run_dir / "metrics.json").read_text(), (run_dir / "report.html").read_text()
    rows = _db_rows(cfg, version)

    again = E.run(cfg)
    assert again["status"] == "already_done" and again["mae"] == first["mae"]

    (run_dir / "report.html").unlink()
    out = E.run(cfg)
    assert out["status"] == "evaluated" and (run_dir / "report.html").read_text() == report

    (run_dir / "metrics.json").write_text(metrics.replace('"n": ', '"n": 1'))
    assert E.run(cfg)["status"] == "evaluated"
    assert (run_dir / "metrics.json").read_text() == metrics  # the seeded numbers, rewritten

    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL("delete from {} where model_version = %s and slice <> 'all'").format(
                table(cfg, "model_evaluations")
            ),
            (version,),
        )
    assert E.run(cfg)["status"] == "evaluated"
    assert _db_rows(cfg, version) == rows
    assert E.run(cfg)["status"] == "already_done"

    # another evaluate setting, or another checkpoint, is another evaluation
    other = make_cfg(**FAST, evaluate__bootstrap_samples=60)
    assert E.run(other)["status"] == "evaluated"
    assert E.run(other)["status"] == "already_done"
    import torch

    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    torch.save({**ckpt, "note": "another checkpoint"}, run_dir / "best.pt")
    assert E.run(other)["status"] == "evaluated"
    assert run_status(cfg, world["run_id"])[0] == "evaluated"
