"""Calibration: a monotone map from the model's ``raw_score`` to the app's 0..5 ``aiRating``,
and the capture gate on it. Pure functions: no database, no files.

Fit (:func:`fit`) on the validation split's (raw_score, human label) pairs with
``sklearn.isotonic.IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0,
y_max=5)``. The result is stored as *knots*, the regression's ``X_thresholds_`` and
``y_thresholds_`` as plain float lists, so any runtime (the Python scorer, the Node scorer in
the app's cron) applies it in a few lines: piecewise-linear interpolation between the knots,
clipped to the first/last knot's value outside them, which is ``numpy.interp``::

    aiRating = interp(raw, x, y)      # x strictly increasing, y non-decreasing, 0 <= y <= 5

The Node scorer's ``applyCalibration`` (clients/node/src/aiScoring.ts) is numpy.interp
operation for operation (the same interval search, slope and formula), so both runtimes give
the same double; its tests compare them on a grid that includes both ends.

That equals ``IsotonicRegression.predict`` (it interpolates linearly between the same
thresholds and clips inputs to their range).

Too few points (fewer than :data:`MIN_POINTS` pairs, or fewer than 2 distinct raw scores or
2 distinct labels): no fit; the knots are the model's own score mapping instead
(``jobs.train.model.SCORE_MAPPING``), marked ``method: "fallback"`` with the reason:

- ``regression`` and ``distribution``: raw is already on the 0..5 scale, so the identity
  clipped to 0..5, knots ``x = [0, 5], y = [0, 5]``.
- ``binary``: raw is a logit; ``5 * sigmoid(raw)`` sampled every 0.25 on -10..10 (81 knots;
  the piecewise-linear form is within 0.004 of the curve, and within 0.0003 of 0 and 5
  outside the range).

The capture gate (:func:`gate`): ``aiRating >= threshold`` (``dataset.good_threshold``,
4.0 by default), the same comparison the app's cron makes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Fewer validation pairs than this and an isotonic fit is mostly noise: fall back.
MIN_POINTS = 20
RATING_MIN = 0.0
RATING_MAX = 5.0
_SIGMOID_GRID = np.linspace(-10.0, 10.0, 81)


def fallback(target: str, reason: str) -> dict[str, Any]:
    """Knots of the model's own score mapping for ``target`` (see the module doc)."""
    if target in ("regression", "distribution"):
        x, y = [RATING_MIN, RATING_MAX], [RATING_MIN, RATING_MAX]
    elif target == "binary":
        x = [float(v) for v in _SIGMOID_GRID]
        y = [float(v) for v in RATING_MAX / (1.0 + np.exp(-_SIGMOID_GRID))]
    else:
        raise ValueError(f"unknown target {target!r}")
    return {"method": "fallback", "reason": reason, "target": target, "n": 0, "x": x, "y": y}


def fit(raw: Any, labels: Any, *, target: str) -> dict[str, Any]:
    """Fit the monotone map raw -> 0..5 on (raw_score, label) pairs; returns the knots record:
    ``{"method": "isotonic" | "fallback", "x": [...], "y": [...], "n": pairs, ...}``."""
    from sklearn.isotonic import IsotonicRegression

    raw = np.asarray(raw, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=np.float64).ravel()
    if raw.shape != labels.shape:
        raise ValueError(f"{raw.size} raw scores but {labels.size} labels")
    keep = np.isfinite(raw) & np.isfinite(labels)
    raw, labels = raw[keep], labels[keep]
    n = int(raw.size)
    if n < MIN_POINTS:
        return fallback(target, f"{n} validation pairs, fewer than {MIN_POINTS}") | {"n": n}
    if np.unique(raw).size < 2 or np.unique(labels).size < 2:
        return fallback(target, "raw scores or labels are single-valued") | {"n": n}
    iso = IsotonicRegression(
        increasing=True, out_of_bounds="clip", y_min=RATING_MIN, y_max=RATING_MAX
    ).fit(raw, labels)
    x, y = _dedupe(iso.X_thresholds_, iso.y_thresholds_)
    return {
        "method": "isotonic",
        "target": target,
        "n": n,
        "x": x,
        "y": y,
        "raw_range": [float(raw.min()), float(raw.max())],
    }


def _dedupe(xs: np.ndarray, ys: np.ndarray) -> tuple[list[float], list[float]]:
    """Plain float lists with strictly increasing x (a repeated x keeps its last y, which on a
    non-decreasing map is the larger one)."""
    out_x: list[float] = []
    out_y: list[float] = []
    for xv, yv in zip(
        np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), strict=True
    ):
        xv, yv = float(xv), float(min(max(float(yv), RATING_MIN), RATING_MAX))
        if out_x and xv <= out_x[-1]:
            out_y[-1] = max(out_y[-1], yv)
            continue
        out_x.append(xv)
        out_y.append(yv)
    return out_x, out_y


def apply(knots: dict[str, Any], raw: Any) -> np.ndarray:
    """aiRating (0..5) of raw scores: piecewise-linear between the knots, clipped at the ends."""
    x = np.asarray(knots["x"], dtype=np.float64)
    y = np.asarray(knots["y"], dtype=np.float64)
    if x.size == 0 or x.size != y.size:
        raise ValueError("calibration knots need as many x as y, at least one")
    return np.interp(np.asarray(raw, dtype=np.float64), x, y)


def gate(ai_rating: Any, threshold: float) -> np.ndarray:
    """The capture gate: ``aiRating >= threshold``, per image."""
    return np.asarray(ai_rating, dtype=np.float64) >= float(threshold)
