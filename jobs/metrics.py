"""Metrics of fixed predictions: pure functions of arrays (no database, no files).

Scores ``s`` and human labels ``y`` are both on 0..5.

- regression view: MAE, RMSE, bias, Spearman and Pearson (``scipy.stats``), bucket calibration
  (mean predicted vs mean human per predicted bucket [0,1), ..., [4,5], with counts);
- classification view at a good threshold ``t`` (human good = y >= t, predicted good =
  s >= t): ROC AUC, PR AUC (average precision), F1, precision, recall and the confusion matrix,
  all from ``sklearn.metrics``;
- slices (phase, hour and month of ``captured_at`` in UTC, region, source);
- confidence intervals from ``scipy.stats.bootstrap`` over row resamples (``paired=True``:
  a label, its score and any other model's score are resampled together), seeded per
  (slice, metric) so a re-run reproduces the same numbers;
- a paired comparison of two models' MAE on the same resampled rows, with a verdict.

A metric that is undefined on the rows (one class for an AUC, a constant for a correlation,
nothing predicted good for precision, fewer rows than asked) is ``None`` here and
``status: insufficient_data`` in a result entry, never a number.
"""

from __future__ import annotations

import datetime as dt
import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

OK, INSUFFICIENT = "ok", "insufficient_data"
HEADLINE = ("mae", "rmse", "spearman", "pearson", "roc_auc", "pr_auc", "f1", "precision", "recall")
SLICE_METRICS = ("mae", "rmse", "bias", "spearman", "roc_auc")
ERROR_METRICS = ("mae", "rmse", "bias")
CLASSIFICATION_METRICS = ("precision", "recall", "f1")

# Rows times resamples that one bootstrap batch holds (resample indices plus the resampled
# labels and scores), so memory stays bounded however many test rows and resamples there are.
_BATCH_CELLS = 4_000_000


# ---- metrics ---------------------------------------------------------------------------------


def _varied(a: np.ndarray) -> bool:
    return len(a) > 0 and float(np.ptp(a)) > 0


def _error_metric(name: str, err: np.ndarray, axis: int = -1) -> np.ndarray:
    """MAE, RMSE or bias of errors (score - label) along ``axis`` (vectorized: one row of
    ``err`` per bootstrap resample)."""
    if name == "mae":
        return np.abs(err).mean(axis=axis)
    if name == "rmse":
        return np.sqrt(np.square(err).mean(axis=axis))
    if name == "bias":
        return err.mean(axis=axis)
    raise ValueError(name)


def _classification_metric(name: str, good: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Precision, recall or F1 (``sklearn.metrics``) of boolean ``pred`` against ``good``:
    of 1-D arrays, or of each row of 2-D ones (one row per bootstrap resample: sklearn's
    multilabel form with each resample as a label, ``average=None``, one call for all
    resamples instead of one call each). ``zero_division=nan``: precision with nothing
    predicted good, recall with nothing good, F1 with neither are undefined, not 0."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    score = {"precision": precision_score, "recall": recall_score, "f1": f1_score}[name]
    if good.ndim == 1:
        return np.asarray(score(good, pred, zero_division=np.nan))
    if len(good) == 1:  # one column would read as a binary target, not one label
        return np.array([score(good[0], pred[0], zero_division=np.nan)])
    return score(good.T, pred.T, average=None, zero_division=np.nan)


def metric_value(name: str, y: np.ndarray, s: np.ndarray, threshold: float) -> float | None:
    """One metric of scores ``s`` against labels ``y`` (both 0..5); None when undefined."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import average_precision_score, roc_auc_score

    n = len(y)
    if n == 0:
        return None
    if name in ERROR_METRICS:
        return float(_error_metric(name, s - y))
    if name in ("spearman", "pearson"):
        if n < 3 or not _varied(y) or not _varied(s):
            return None
        correlation = spearmanr if name == "spearman" else pearsonr
        return float(correlation(s, y).statistic)
    good = y >= threshold
    if name in ("roc_auc", "pr_auc"):
        if good.all() or not good.any():
            return None
        auc = roc_auc_score if name == "roc_auc" else average_precision_score
        return float(auc(good, s))
    if name not in CLASSIFICATION_METRICS:
        raise ValueError(name)
    value = float(_classification_metric(name, good, s >= threshold))
    return None if math.isnan(value) else value


def confusion(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts at the threshold; positive = good (label >= t, score >= t)."""
    from sklearn.metrics import confusion_matrix

    tn, fp, fn, tp = confusion_matrix(y >= threshold, s >= threshold, labels=[False, True]).ravel()
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)}


def calibration(y: np.ndarray, s: np.ndarray) -> list[dict[str, Any]]:
    """Mean predicted vs mean human per predicted bucket [0,1), [1,2), ..., [4,5]."""
    idx = np.clip(np.floor(s).astype(int), 0, 4)
    out = []
    for b in range(5):
        m = idx == b
        out.append(
            {
                "bucket": f"[{b},{b + 1}{']' if b == 4 else ')'}",
                "n": int(m.sum()),
                "mean_predicted": float(s[m].mean()) if m.any() else None,
                "mean_human": float(y[m].mean()) if m.any() else None,
            }
        )
    return out


# ---- bootstrap -------------------------------------------------------------------------------


def rng_for(seed: int, key: str) -> np.random.Generator:
    """The generator of one interval: the configured seed and the interval's key."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def percentile_ci(
    data: Sequence[np.ndarray],
    statistic: Callable[..., Any],
    *,
    vectorized: bool,
    samples: int,
    level: float,
    seed: int,
    key: str,
) -> tuple[float | None, float | None]:
    """Percentile CI of ``statistic(*data)`` over paired row resamples (every array in
    ``data`` is resampled with the same row indices), from ``scipy.stats.bootstrap``.

    ``method='percentile'``, not scipy's default BCa: BCa's acceleration is a jackknife (n more
    evaluations of the statistic, n x (n-1) resampled rows) and it is NaN, with a
    DegenerateDataWarning, whenever the bootstrap distribution has one value (F1 of a model
    that predicts nothing good, a model compared with itself), where the percentile interval
    is that value. It also keeps the intervals comparable with the evaluations recorded before.

    A statistic may be undefined (NaN) on some resamples, e.g. an AUC on a resample that drew
    one class. scipy's interval is then NaN; scipy cannot drop those resamples, so that is done
    here: the interval is taken over the defined resamples, and there is none when over half
    are undefined. Fewer than two rows (scipy refuses them): no interval.
    """
    from scipy.stats import DegenerateDataWarning, bootstrap, quantile

    n = len(data[0])
    if n < 2:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateDataWarning)  # NaN resamples: handled below
        res = bootstrap(
            tuple(data),
            statistic,
            n_resamples=samples,
            batch=max(1, _BATCH_CELLS // n),
            vectorized=vectorized,
            paired=True,
            confidence_level=level,
            method="percentile",
            rng=rng_for(seed, key),
        )
    low, high = res.confidence_interval
    if not (math.isnan(low) or math.isnan(high)):
        return float(low), float(high)
    distribution = res.bootstrap_distribution
    if np.count_nonzero(~np.isnan(distribution)) < 0.5 * samples:
        return None, None
    alpha = (1 - level) / 2
    low, high = quantile(distribution, np.array([alpha, 1 - alpha]), nan_policy="omit")
    return float(low), float(high)


def bootstrap_ci(
    name: str,
    y: np.ndarray,
    s: np.ndarray,
    threshold: float,
    *,
    samples: int,
    level: float,
    seed: int,
    key: str,
) -> tuple[float | None, float | None]:
    """Percentile CI of one metric over row resamples (:func:`percentile_ci`)."""
    import sklearn

    boot = {"samples": samples, "level": level, "seed": seed, "key": key}
    if name in ERROR_METRICS:
        return percentile_ci(
            (y, s),
            lambda y_b, s_b, axis: _error_metric(name, s_b - y_b, axis),
            vectorized=True,
            **boot,
        )
    if name in CLASSIFICATION_METRICS:
        return percentile_ci(
            (y, s),
            lambda y_b, s_b, axis: _classification_metric(name, y_b >= threshold, s_b >= threshold),
            vectorized=True,
            **boot,
        )

    # AUCs and correlations: one call per resample, undefined (NaN) on some. sklearn's
    # argument validation would be most of the time; the arrays are ours (finite floats).
    def statistic(y_b: np.ndarray, s_b: np.ndarray) -> float:
        value = metric_value(name, y_b, s_b, threshold)
        return np.nan if value is None else value

    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        return percentile_ci((y, s), statistic, vectorized=False, **boot)


def paired_bootstrap(
    y: np.ndarray,
    s_model: np.ndarray,
    s_other: np.ndarray,
    *,
    samples: int,
    level: float,
    seed: int,
    key: str,
) -> dict[str, Any]:
    """MAE(model) - MAE(other) on the same resampled rows; negative = the model is better.
    Verdict "better"/"worse" when the CI excludes 0, else "no detectable difference"."""
    err_model, err_other = np.abs(s_model - y), np.abs(s_other - y)
    low, high = percentile_ci(
        (err_model, err_other),
        lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis),
        vectorized=True,
        samples=samples,
        level=level,
        seed=seed,
        key=key,
    )
    if low is not None and high < 0:
        verdict = "better"
    elif low is not None and low > 0:
        verdict = "worse"
    else:
        verdict = "no detectable difference"
    return {
        "mae_model": float(err_model.mean()),
        "mae_other": float(err_other.mean()),
        "mae_diff": float((err_model - err_other).mean()),
        "ci_low": low,
        "ci_high": high,
        "verdict": verdict,
        "n": int(len(y)),
    }


def comparison(
    y: np.ndarray,
    s_model: np.ndarray,
    s_other: np.ndarray,
    *,
    min_rows: int,
    samples: int,
    level: float,
    seed: int,
    key: str,
) -> dict[str, Any]:
    """:func:`paired_bootstrap`, or insufficient data with fewer than ``min_rows`` rows."""
    if len(y) < min_rows:
        return {"status": INSUFFICIENT, "n": int(len(y))}
    return paired_bootstrap(y, s_model, s_other, samples=samples, level=level, seed=seed, key=key)


# ---- result entries --------------------------------------------------------------------------


def entry(
    value: float | None, n: int, ci: tuple[float | None, float | None] = (None, None)
) -> dict[str, Any]:
    if value is None or not math.isfinite(value):
        return {"value": None, "status": INSUFFICIENT, "n": n, "ci_low": None, "ci_high": None}
    return {"value": value, "status": OK, "n": n, "ci_low": ci[0], "ci_high": ci[1]}


def headline_metrics(
    y: np.ndarray,
    s: np.ndarray,
    threshold: float,
    *,
    min_rows: int,
    samples: int,
    level: float,
    seed: int,
    slice_name: str = "all",
    names: tuple[str, ...] = HEADLINE,
    ci_names: tuple[str, ...] = HEADLINE,
) -> dict[str, dict[str, Any]]:
    """``names`` for the rows (y, s): value + bootstrap CI, or insufficient_data if n < min_rows."""
    n = len(y)
    out = {}
    for name in names:
        value = metric_value(name, y, s, threshold) if n >= min_rows else None
        ci = (None, None)
        if value is not None and name in ci_names:
            ci = bootstrap_ci(
                name,
                y,
                s,
                threshold,
                samples=samples,
                level=level,
                seed=seed,
                key=f"{slice_name}|{name}",
            )
        out[name] = entry(value, n, ci)
    return out


def slice_masks(table: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    """slice name -> row mask for phase, hour, month (UTC), region and source."""
    captured = table["captured_at"]
    keys = {
        "phase": table["phase"],
        "hour": [None if t is None else f"{t.astimezone(dt.UTC).hour:02d}" for t in captured],
        "month": [None if t is None else f"{t.astimezone(dt.UTC).month:02d}" for t in captured],
        "region": table["region"],
        "source": table["source"],
    }
    masks = {}
    for dim, values in keys.items():
        arr = np.array(["" if v is None else str(v) for v in values], dtype=object)
        for v in sorted(set(arr.tolist())):
            if v:
                masks[f"{dim}={v}"] = arr == v
    return masks


def sliced_metrics(
    y: np.ndarray,
    s: np.ndarray,
    table: dict[str, list[Any]],
    threshold: float,
    *,
    min_test_rows: int,
    min_slice_size: int,
    samples: int,
    level: float,
    seed: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"all": headline metrics + bias, "<dim>=<value>": slice metrics, ...}``; slices get
    an interval for the MAE only."""
    boot = {"samples": samples, "level": level, "seed": seed}
    metrics = {
        "all": headline_metrics(
            y, s, threshold, min_rows=min_test_rows, names=(*HEADLINE, "bias"), **boot
        )
    }
    for name, mask in slice_masks(table).items():
        metrics[name] = headline_metrics(
            y[mask],
            s[mask],
            threshold,
            min_rows=min_slice_size,
            slice_name=name,
            names=SLICE_METRICS,
            ci_names=("mae",),
            **boot,
        )
    return metrics
