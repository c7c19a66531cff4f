"""jobs.calibration: the isotonic raw -> 0..5 map as knots, its application and the gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from jobs import calibration


def _pairs(n: int, seed: int = 0, *, slope: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.normal(2.5, 1.2, n)
    labels = np.clip(np.rint(slope * raw + rng.normal(0, 0.8, n)), 0, 5)
    return raw, labels


def test_fit_is_monotone_clipped_and_plain_json():
    raw, labels = _pairs(300, slope=1.8)  # labels pushed past 0..5 before clipping
    knots = calibration.fit(raw, labels, target="regression")
    assert knots["method"] == "isotonic" and knots["n"] == 300
    x, y = np.array(knots["x"]), np.array(knots["y"])
    assert len(x) == len(y) >= 2
    assert np.all(np.diff(x) > 0)  # strictly increasing, deduplicated
    assert np.all(np.diff(y) >= 0)  # monotone
    assert y.min() >= 0 and y.max() <= 5
    assert all(type(v) is float for v in knots["x"] + knots["y"])
    assert json.loads(json.dumps(knots)) == knots  # what the model card stores
    grid = np.linspace(-20, 20, 4001)
    out = calibration.apply(knots, grid)
    assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 5
    # clipped at the ends: the first/last knot's value outside the fitted range
    assert (
        calibration.apply(knots, [-1e9])[0] == y[0] and calibration.apply(knots, [1e9])[0] == y[-1]
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apply_on_the_knots_equals_isotonic_predict(seed):
    raw, labels = _pairs(200, seed)
    knots = calibration.fit(raw, labels, target="regression")
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=5).fit(raw, labels)
    grid = np.concatenate([np.linspace(raw.min() - 3, raw.max() + 3, 5001), raw])
    np.testing.assert_allclose(
        calibration.apply(knots, grid), iso.predict(grid), rtol=0, atol=1e-12
    )


def test_repeated_raw_scores_give_strictly_increasing_knots():
    raw = np.repeat(np.linspace(0, 5, 10), 5)  # ties: each raw score 5 times
    labels = np.clip(raw + np.tile([-1.0, -0.5, 0.0, 0.5, 1.0], 10), 0, 5)
    knots = calibration.fit(raw, labels, target="distribution")
    assert knots["method"] == "isotonic"
    assert np.all(np.diff(knots["x"]) > 0)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=5).fit(raw, labels)
    np.testing.assert_allclose(calibration.apply(knots, raw), iso.predict(raw), atol=1e-12)


def test_too_few_points_fall_back_to_the_models_own_mapping():
    raw, labels = _pairs(calibration.MIN_POINTS - 1)
    reg = calibration.fit(raw, labels, target="regression")
    assert reg["method"] == "fallback" and str(calibration.MIN_POINTS) in reg["reason"]
    assert reg["n"] == calibration.MIN_POINTS - 1
    # regression / distribution: identity clipped to 0..5
    np.testing.assert_array_equal(
        calibration.apply(reg, [-2.0, 0.0, 1.25, 4.0, 5.0, 9.0]), [0, 0, 1.25, 4, 5, 5]
    )
    # binary: 5 * sigmoid(logit), piecewise-linear within 0.004
    logits = np.linspace(-30, 30, 6001)
    binary = calibration.fit(raw, labels, target="binary")
    assert binary["method"] == "fallback"
    assert np.abs(calibration.apply(binary, logits) - 5 / (1 + np.exp(-logits))).max() < 0.004
    # NaNs do not count as points
    raw_nan = np.concatenate([raw, np.full(10, np.nan)])
    assert calibration.fit(raw_nan, np.concatenate([labels, np.ones(10)]), target="regression")[
        "n"
    ] == len(raw)


def test_single_valued_data_falls_back():
    raw = np.ones(50)
    assert calibration.fit(raw, np.linspace(0, 5, 50), target="regression")["method"] == "fallback"
    assert calibration.fit(np.linspace(0, 5, 50), np.full(50, 3.0), target="regression")[
        "method"
    ] == ("fallback")


def test_mismatched_lengths_and_unknown_target_are_refused():
    with pytest.raises(ValueError, match="labels"):
        calibration.fit([1.0, 2.0], [1.0], target="regression")
    with pytest.raises(ValueError, match="target"):
        calibration.fallback("ordinal", "x")


def test_gate_is_at_or_above_the_threshold():
    assert calibration.gate([3.999, 4.0, 4.001, 5.0, 0.0], 4.0).tolist() == [
        False,
        True,
        True,
        True,
        False,
    ]
    assert calibration.gate(np.array([2.5]), 2.5).tolist() == [True]
