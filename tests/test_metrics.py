"""jobs.metrics: metrics on fixed predictions vs hand-computed values, and the bootstrap
intervals (scipy.stats.bootstrap, percentile, paired, seeded) including the resamples where a
metric is undefined."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jobs import metrics


def test_regression_and_classification_metrics_match_hand_computed_values():
    y = np.array([1.0, 2.0, 4.0, 5.0])
    s = np.array([1.5, 2.0, 3.5, 4.0])
    t = 4.0
    # errors 0.5, 0, -0.5, -1
    assert metrics.metric_value("mae", y, s, t) == pytest.approx(0.5)
    assert metrics.metric_value("rmse", y, s, t) == pytest.approx(math.sqrt(1.5 / 4))
    assert metrics.metric_value("bias", y, s, t) == pytest.approx(-0.25)
    assert metrics.metric_value("spearman", y, s, t) == pytest.approx(1.0)
    # deviations s: -1.25 -0.75 0.75 1.25, y: -2 -1 1 2 -> 6.5 / sqrt(4.25 * 10)
    assert metrics.metric_value("pearson", y, s, t) == pytest.approx(6.5 / math.sqrt(42.5))
    # good = [F, F, T, T], predicted good = [F, F, F, T]: tp 1, fp 0, fn 1, tn 2
    assert metrics.confusion(y, s, t) == {"tp": 1, "fp": 0, "fn": 1, "tn": 2}
    assert metrics.metric_value("precision", y, s, t) == pytest.approx(1.0)
    assert metrics.metric_value("recall", y, s, t) == pytest.approx(0.5)
    assert metrics.metric_value("f1", y, s, t) == pytest.approx(2 / 3)

    # ROC AUC: positives score 0.35, 0.8; negatives 0.1, 0.4 -> 3 of 4 pairs ordered = 0.75
    # AP: ranked 0.8(+) 0.4(-) 0.35(+) 0.1(-): precision at the hits 1 and 2/3 -> 5/6
    y2 = np.array([1.0, 1.0, 4.5, 4.5])
    s2 = np.array([0.1, 0.4, 0.35, 0.8])
    assert metrics.metric_value("roc_auc", y2, s2, t) == pytest.approx(0.75)
    assert metrics.metric_value("pr_auc", y2, s2, t) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts half
    assert metrics.metric_value(
        "roc_auc", np.array([1.0, 4.5]), np.array([2.0, 2.0]), t
    ) == pytest.approx(0.5)
    # undefined: one class, constant predictions, nothing predicted good
    assert metrics.metric_value("roc_auc", y2[:2], s2[:2], t) is None
    assert metrics.metric_value("spearman", y, np.full(4, 2.0), t) is None
    assert metrics.metric_value("precision", y, np.zeros(4), t) is None


def test_calibration_buckets():
    y = np.array([1.0, 0.0, 4.0, 5.0, 2.0])
    s = np.array([0.5, 0.7, 4.2, 5.0, 2.5])
    cal = metrics.calibration(y, s)
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
    a = metrics.bootstrap_ci("mae", y, good, 4.0, key="all|mae", **kw)
    b = metrics.bootstrap_ci("mae", y, good, 4.0, key="all|mae", **kw)
    assert a == b and a[0] < metrics.metric_value("mae", y, good, 4.0) < a[1]
    lo, hi = metrics.bootstrap_ci("spearman", y, good, 4.0, key="all|spearman", **kw)
    assert 0.9 < lo < hi <= 1.0
    assert metrics.paired_bootstrap(y, good, const, key="k", **kw)["verdict"] == "better"
    assert metrics.paired_bootstrap(y, const, good, key="k", **kw)["verdict"] == "worse"
    same = metrics.paired_bootstrap(y, good, good, key="k", **kw)
    assert same["verdict"] == "no detectable difference" and same["mae_diff"] == 0


def test_too_few_rows_is_insufficient_data_not_a_number():
    y = np.array([1.0, 4.5, 3.0])
    s = np.array([1.2, 4.0, 2.0])
    m = metrics.headline_metrics(y, s, 4.0, min_rows=30, samples=50, level=0.95, seed=1)
    assert all(v["status"] == "insufficient_data" and v["value"] is None for v in m.values())
    m = metrics.headline_metrics(y, s, 4.0, min_rows=2, samples=50, level=0.95, seed=1)
    assert m["mae"]["status"] == "ok" and m["mae"]["value"] == pytest.approx(1.7 / 3)


def test_intervals_follow_the_seed_and_the_key():
    rng = np.random.default_rng(3)
    y = rng.uniform(0, 5, 120)
    s = np.clip(y + rng.normal(0, 0.8, 120), 0, 5)
    kw = {"samples": 200, "level": 0.9}
    first = metrics.bootstrap_ci("roc_auc", y, s, 4.0, seed=7, key="all|roc_auc", **kw)
    assert metrics.bootstrap_ci("roc_auc", y, s, 4.0, seed=7, key="all|roc_auc", **kw) == first
    assert metrics.bootstrap_ci("roc_auc", y, s, 4.0, seed=8, key="all|roc_auc", **kw) != first
    assert metrics.bootstrap_ci("roc_auc", y, s, 4.0, seed=7, key="hour=06|roc_auc", **kw) != first


def test_interval_is_the_percentile_interval_of_paired_row_resamples():
    """The documented contract, computed by hand: resample row indices with the interval's
    generator (what scipy.stats.bootstrap draws for paired data), take the metric on each
    resample, and the (alpha/2, 1 - alpha/2) percentiles."""
    rng = np.random.default_rng(5)
    y = rng.uniform(0, 5, 60)
    s = np.clip(y + rng.normal(0, 1, 60), 0, 5)
    got = metrics.bootstrap_ci("rmse", y, s, 4.0, samples=300, level=0.9, seed=11, key="all|rmse")
    idx = metrics.rng_for(11, "all|rmse").integers(0, 60, size=(300, 60))
    rmse = np.sqrt(((s - y) ** 2)[idx].mean(axis=1))
    assert got == pytest.approx(tuple(np.percentile(rmse, [5, 95])), rel=1e-12)


def test_resamples_where_the_metric_is_undefined_are_left_out():
    """scipy's interval is NaN as soon as one resample is NaN (an AUC on a resample that drew
    one class); those resamples are dropped instead, and over half undefined is no interval."""
    import warnings

    from scipy.stats import bootstrap

    y = np.array([4.5, 4.5] + [1.0] * 10)  # 2 good of 12: ~11% of resamples draw no good row
    s = np.linspace(5, 0, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = bootstrap(
            (y, s),
            lambda a, b: np.nan if (v := metrics.metric_value("roc_auc", a, b, 4.0)) is None else v,
            paired=True,
            vectorized=False,
            n_resamples=400,
            method="percentile",
            rng=metrics.rng_for(1, "k"),
        )
    assert math.isnan(alone.confidence_interval.low)
    lo, hi = metrics.bootstrap_ci("roc_auc", y, s, 4.0, samples=400, level=0.95, seed=1, key="k")
    assert lo is not None and 0.0 <= lo <= hi <= 1.0

    rows = np.arange(10.0)
    kw = {"vectorized": False, "samples": 400, "level": 0.9, "seed": 2, "key": "k"}

    def mean_if_row_0_drawn(r):  # defined on ~65% of resamples of 10 rows
        return float(r.mean()) if 0.0 in r else np.nan

    got = metrics.percentile_ci((rows,), mean_if_row_0_drawn, **kw)
    idx = metrics.rng_for(2, "k").integers(0, 10, size=(400, 10))
    defined = idx[(idx == 0).any(axis=1)]
    assert 0.55 * 400 < len(defined) < 0.75 * 400
    assert got == pytest.approx(tuple(np.percentile(defined.mean(axis=1), [5, 95])), rel=1e-12)

    def mean_if_rows_0_and_1_drawn(r):  # defined on ~41%
        return float(r.mean()) if 0.0 in r and 1.0 in r else np.nan

    assert metrics.percentile_ci((rows,), mean_if_rows_0_and_1_drawn, **kw) == (None, None)


def test_a_distribution_of_one_value_is_that_value_not_nan():
    """Where BCa is NaN (one value on every resample), the percentile interval is the value:
    F1 of a model that never predicts good, and a model compared with itself."""
    y = np.array([4.5, 1.0, 4.2, 2.0, 0.5, 4.8])
    never_good = np.full(6, 2.0)
    kw = {"samples": 100, "level": 0.95, "seed": 3}
    assert metrics.metric_value("f1", y, never_good, 4.0) == 0.0
    assert metrics.bootstrap_ci("f1", y, never_good, 4.0, key="all|f1", **kw) == (0.0, 0.0)
    itself = metrics.paired_bootstrap(y, never_good, never_good, key="k", **kw)
    assert (itself["ci_low"], itself["ci_high"]) == (0.0, 0.0)


def test_one_row_has_no_interval():
    """scipy refuses fewer than two observations; an interval from one row would claim a
    certainty it does not have."""
    one = np.array([3.0])
    assert metrics.metric_value("mae", one, one + 0.5, 4.0) == pytest.approx(0.5)
    kw = {"samples": 50, "level": 0.95, "seed": 1}
    assert metrics.bootstrap_ci("mae", one, one + 0.5, 4.0, key="k", **kw) == (None, None)
    assert metrics.paired_bootstrap(one, one, one + 1, key="k", **kw)["verdict"] == (
        "no detectable difference"
    )


def test_comparison_needs_enough_rows():
    y = np.array([1.0, 4.5, 3.0])
    assert metrics.comparison(y, y, y + 1, min_rows=4, samples=50, level=0.95, seed=1, key="k") == {
        "status": "insufficient_data",
        "n": 3,
    }
    out = metrics.comparison(y, y, y + 1, min_rows=3, samples=50, level=0.95, seed=1, key="k")
    assert out["mae_diff"] == pytest.approx(-1.0) and out["verdict"] == "better"


def test_batches_of_resamples_give_the_same_interval(monkeypatch):
    """Resamples are drawn in batches that bound memory; the batch size (here 2, 2, then one
    resample, where sklearn would read a lone resample as a binary target) changes nothing."""
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 45)
    s = np.clip(y + rng.normal(0, 0.8, 45), 0, 5)
    names = ("precision", "recall", "f1", "mae", "roc_auc")
    kw = {"samples": 5, "level": 0.9, "seed": 1, "key": "k"}
    whole = {name: metrics.bootstrap_ci(name, y, s, 4.0, **kw) for name in names}
    monkeypatch.setattr(metrics, "_BATCH_CELLS", 2 * 45)
    assert {name: metrics.bootstrap_ci(name, y, s, 4.0, **kw) for name in names} == whole
    assert all(lo is not None and lo < hi for lo, hi in whole.values())
