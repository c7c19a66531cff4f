"""jobs.report: report.html from the Jinja2 templates (jobs/templates), autoescaped and
self-contained, for a result made by jobs.metrics from fixed predictions."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from browser import inspect_page

from jobs import metrics, report

EVIL = '<img src=x onerror="alert(1)">'


def result_of(y: np.ndarray, s: np.ndarray, regions: list[str]) -> dict:
    n = len(y)
    table = {
        "captured_at": [dt.datetime(2026, 1, 1, 6, tzinfo=dt.UTC)] * n,
        "phase": ["sunrise"] * n,
        "region": regions,
        "source": ["cam_a"] * n,
    }
    boot = {"samples": 50, "level": 0.95, "seed": 1}
    return {
        "model_version": f"v_{EVIL}",
        "run_id": 1,
        "dataset_hash": "d" * 64,
        "split": "test",
        "n": n,
        "target": "regression",
        "score_mapping": "clamp(raw, 0, 5)",
        "good_threshold": 4.0,
        "checkpoint": "best.pt",
        "best_epoch": 3,
        "bootstrap": {"samples": 50, "ci_level": 0.95, "seed": 1},
        "min_test_rows": 5,
        "min_slice_size": 5,
        "metrics": metrics.sliced_metrics(
            y, s, table, 4.0, min_test_rows=5, min_slice_size=5, **boot
        ),
        "confusion_matrix": metrics.confusion(y, s, 4.0) if n else None,
        "calibration": metrics.calibration(y, s) if n else [],
        "baselines": {
            "constant": {
                "prediction": 2.5,
                **metrics.comparison(y, s, np.full(n, 2.5), min_rows=5, key="c", **boot),
            }
        },
        "production": {"model_version": None, "note": "no production model"},
    }


def test_names_from_the_data_are_text_not_markup(tmp_path):
    """Slice values (regions, sources) and versions come from the app's database: the
    templates autoescape them."""
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, 12)
    s = np.clip(y + rng.normal(0, 0.5, 12), 0, 5)
    result = result_of(y, s, [EVIL] * 8 + ["north"] * 4)
    page = report.evaluation_page(result, [(f"caption {EVIL}", "data:image/png;base64,AAAA")])
    assert EVIL not in page
    assert "region=&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page  # a slice row
    assert "<title>Evaluation: v_&lt;img" in page and "<h1>Evaluation: v_&lt;img" in page
    assert 'alt="caption &lt;img src=x onerror=&#34;alert(1)&#34;&gt;"' in page
    # the small slice is listed with its size, the sized one is a row
    assert "region=north (n=4)." in page and "<td>region=north</td>" not in page
    path = tmp_path / "report.html"
    path.write_text(page)
    seen = inspect_page(path)
    assert seen["title"] == f"Evaluation: v_{EVIL}"
    assert seen["headings"][0] == f"Evaluation: v_{EVIL}"
    assert seen["images"] == 1  # the caption's <img> stayed text


def test_values_render_as_numbers_dashes_or_insufficient_data():
    y = np.array([1.0, 4.5, 3.0, 2.0, 4.8, 0.5])
    s = np.array([1.2, 4.0, 2.0, 2.5, 4.1, 1.0])
    page = report.evaluation_page(result_of(y, s, ["north"] * 6), [])
    # bias has no interval: dashes; a value: 3 decimals; n as an integer
    assert "<tr><td>bias</td><td>-0.167</td><td>-</td><td>-</td><td>6</td></tr>" in page
    # no production model: dashes and the note
    assert "<tr><td>production</td><td>-</td><td>-</td><td>-</td><td>-</td>" in page
    # no rows at all: every metric and count is "insufficient data", nothing fails
    empty = report.evaluation_page(result_of(np.zeros(0), np.zeros(0), []), [])
    muted = '<span class="muted">insufficient data</span>'
    assert f"<tr><td>human good</td><td>{muted}</td><td>{muted}</td></tr>" in empty
    assert f"<tr><td>mae</td><td>{muted}</td>" in empty


def test_a_misspelt_template_name_fails_instead_of_rendering_blank():
    with pytest.raises(Exception, match="no_such_name"):
        report.environment().from_string("{{ no_such_name }}").render()
