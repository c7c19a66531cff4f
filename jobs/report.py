"""HTML pages from Jinja2 templates (``jobs/templates``), and the evaluation's report.html.

Templates are autoescaped (a slice or model name is text, never markup); every page extends
``base.html`` (the shell: styles, the title as header) and uses the pieces in ``macros.html``.
Pages are self-contained: plots are matplotlib (Agg) figures embedded as base64 PNG data URIs,
with no external assets, scripts or fonts, so a page can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import csv
import functools
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.metrics import INSUFFICIENT, OK

if TYPE_CHECKING:
    import jinja2


@functools.cache
def environment() -> jinja2.Environment:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(
        loader=PackageLoader("jobs", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,  # a misspelt name fails the render, not a blank cell
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context: Any) -> str:
    """``jobs/templates/<template>`` rendered with ``context`` (autoescaped)."""
    return environment().get_template(template).render(**context)


def figure_png(fig: Any, *, dpi: int = 100) -> str:
    """A matplotlib figure -> ``data:image/png;base64,...`` (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---- the evaluation report -----------------------------------------------------------------


def evaluation_plots(
    y: np.ndarray,
    s: np.ndarray,
    result: dict[str, Any],
    history: Path,
    *,
    ai: np.ndarray | None = None,
) -> list[tuple[str, str]]:
    """(caption, data URI) of the evaluation's plots: predicted vs human, the reliability
    diagram before and after calibration (``ai``: the calibrated aiRating; before = the
    model's own 0..5 score) with the fitted map beside it, precision-recall, MAE by slice,
    and the training curves when ``history`` exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    out = []
    t = result["good_threshold"]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.scatter(y, s, s=10, alpha=0.6)
    ax.plot([0, 5], [0, 5], color="grey", lw=1)
    ax.axhline(t, color="tab:red", lw=0.8, ls="--")
    ax.set(
        xlabel="human label (0..5)", ylabel="predicted score", xlim=(-0.1, 5.1), ylim=(-0.1, 5.1)
    )
    out.append(("Predicted vs human (test)", figure_png(fig)))

    fig, (ax, ax_map) = plt.subplots(1, 2, figsize=(9, 4.2))
    ax.plot([0, 5], [0, 5], color="grey", lw=1, label="perfect")
    for key, label in (
        ("calibration", "before (model score)"),
        ("calibration_after", "after (aiRating)"),
    ):
        cal = [c for c in result.get(key) or [] if c["n"]]
        if cal:
            ax.plot(
                [c["mean_predicted"] for c in cal],
                [c["mean_human"] for c in cal],
                marker="o",
                label=label,
            )
            for c in cal:
                ax.annotate(str(c["n"]), (c["mean_predicted"], c["mean_human"]), fontsize=7)
    ax.set(xlabel="mean predicted (bucket)", ylabel="mean human", xlim=(0, 5), ylim=(0, 5))
    ax.legend(fontsize=8)
    knots = result.get("calibration_knots")
    if knots:
        ax_map.plot(knots["x"], knots["y"], drawstyle="default", marker=".", ms=3)
        ax_map.axhline(t, color="tab:red", lw=0.8, ls="--")
        ax_map.set(xlabel="raw_score", ylabel="aiRating", ylim=(-0.1, 5.1), title=knots["method"])
    out.append(
        (
            "Reliability before/after calibration (n annotated); the fitted map raw -> aiRating",
            figure_png(fig),
        )
    )

    good = y >= t
    fig, ax = plt.subplots(figsize=(5, 4.2))
    if good.any() and not good.all():
        precision, recall, _ = precision_recall_curve(good, s)
        ax.plot(recall, precision)
        ax.axhline(good.mean(), color="grey", lw=1, ls="--")
    else:
        ax.text(0.5, 0.5, "insufficient data (one class)", ha="center")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    out.append((f"Precision-recall, good = label >= {t:g}", figure_png(fig)))

    sliced = [
        (k, v["mae"])
        for k, v in result["metrics"].items()
        if k != "all" and v["mae"]["status"] == OK
    ]
    fig, ax = plt.subplots(figsize=(5, max(2.5, 0.3 * len(sliced) + 1)))
    if sliced:
        names = [k for k, _ in sliced]
        vals = np.array([m["value"] for _, m in sliced])
        lo = np.array([m["ci_low"] if m["ci_low"] is not None else m["value"] for _, m in sliced])
        hi = np.array([m["ci_high"] if m["ci_high"] is not None else m["value"] for _, m in sliced])
        ax.barh(names, vals, xerr=[vals - lo, hi - vals], color="tab:blue", alpha=0.7)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no slice has enough rows", ha="center")
    ax.set(xlabel="MAE (95% CI)")
    out.append(("Error by slice", figure_png(fig)))

    if history.is_file():
        with open(history, newline="") as f:
            hist = list(csv.DictReader(f))
        if hist:
            epochs = [int(r["epoch"]) for r in hist]
            fig, ax = plt.subplots(figsize=(5, 4.2))
            for col in ("train_loss", "val_loss", "val_mae"):
                vals = [float(r[col]) if r.get(col) else np.nan for r in hist]
                ax.plot(epochs, vals, marker="o", label=col)
            ax.set(xlabel="epoch")
            ax.legend()
            out.append(("Training curves (history.csv)", figure_png(fig)))
    return out


def evaluation_page(result: dict[str, Any], plots: list[tuple[str, str]]) -> str:
    """report.html for an evaluation ``result`` (what metrics.json holds) and its ``plots``
    ((caption, data URI) pairs, :func:`evaluation_plots`)."""
    metrics = result["metrics"]
    summary_rows = [
        # a metric without a bootstrap interval (bias) shows a dash, not "insufficient data"
        (
            name,
            m["value"],
            *(
                m[c] if m[c] is not None or m["value"] is None else "-"
                for c in ("ci_low", "ci_high")
            ),
            m["n"],
        )
        for name, m in metrics["all"].items()
    ]
    cm = result["confusion_matrix"] or {}
    confusion_rows = [
        ("human good", cm.get("tp"), cm.get("fn")),
        ("human not good", cm.get("fp"), cm.get("tn")),
    ]
    after = {c["bucket"]: c for c in result.get("calibration_after") or []}
    calibration_rows = [
        (
            c["bucket"],
            c["n"],
            c["mean_predicted"],
            c["mean_human"],
            after.get(c["bucket"], {}).get("n"),
            after.get(c["bucket"], {}).get("mean_predicted"),
            after.get(c["bucket"], {}).get("mean_human"),
        )
        for c in result["calibration"]
    ]
    gate = result.get("capture_gate") or {"metrics": {}}
    gate_rows = [
        (name, m["value"], m["ci_low"], m["ci_high"], m["n"]) for name, m in gate["metrics"].items()
    ]
    gcm = gate.get("confusion_matrix") or {}
    gate_confusion_rows = [
        ("human good", gcm.get("tp"), gcm.get("fn")),
        ("human not good", gcm.get("fp"), gcm.get("tn")),
    ]
    baseline_rows = []
    for name, b in {**result["baselines"], "production": result["production"]}.items():
        compared = b.get("mae_diff") is not None or b.get("status") == INSUFFICIENT
        # no comparison made (no production model yet): dashes, not "insufficient data"
        cells = [
            b.get(k) if compared else "-" for k in ("mae_other", "mae_diff", "ci_low", "ci_high")
        ]
        baseline_rows.append((name, *cells, b.get("verdict") or b.get("note") or b.get("status")))
    slices = {k: v for k, v in metrics.items() if k != "all"}
    slice_rows = [
        (
            k,
            v["mae"]["n"],
            v["mae"]["value"],
            v["mae"]["ci_low"],
            v["mae"]["ci_high"],
            v["rmse"]["value"],
            v["bias"]["value"],
            v["spearman"]["value"],
            v["roc_auc"]["value"],
        )
        for k, v in slices.items()
        if v["mae"]["status"] != INSUFFICIENT
    ]
    # small slices are listed once with their size instead of rows of "insufficient data"
    small_slices = [
        f"{k} (n={v['mae']['n']})" for k, v in slices.items() if v["mae"]["status"] == INSUFFICIENT
    ]
    return render(
        "report.html",
        title=f"Evaluation: {result['model_version']}",
        result=result,
        plots=plots,
        summary_rows=summary_rows,
        confusion_rows=confusion_rows,
        calibration_rows=calibration_rows,
        gate=gate,
        gate_rows=gate_rows,
        gate_confusion_rows=gate_confusion_rows,
        baseline_rows=baseline_rows,
        slice_rows=slice_rows,
        small_slices=small_slices,
    )
