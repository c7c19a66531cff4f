"""`airatings evaluate [--run ID|latest]`: the best checkpoint on the run's test split.

Every target yields a 0..5 score (``jobs.train.model.scores_from_outputs``: regression clamps,
binary maps probability * 5, distribution takes the expected rating). On the test rows:

- regression view vs ``label_value``: MAE, RMSE, bias, Spearman, Pearson, bucket calibration
  (mean predicted vs mean human per predicted bucket [0,1), ..., [4,5], with counts);
- classification view at ``dataset.good_threshold`` (human good = label >= t, predicted good =
  score >= t): ROC AUC and PR AUC (average precision) of the score, F1, precision, recall and
  the confusion matrix;
- per slice (phase, hour of day and month of ``captured_at`` in UTC, region, source) when the
  slice has at least ``evaluate.min_slice_size`` rows;
- percentile bootstrap CIs (``evaluate.bootstrap_samples``, seeded per (slice, metric), so a
  re-run reproduces the same numbers);
- baselines on the same rows through one paired bootstrap of the MAE difference: a constant
  predictor (the training mean), another run's best checkpoint (``evaluate.compare_to``), and
  the production model once a ``model_aliases`` table exists (not yet: the summary says so).
  Verdict: "better"/"worse" when the CI of (model MAE - other MAE) excludes 0, else
  "no detectable difference".

Too few rows for a metric gives ``status: insufficient_data`` and no value. Writes
``metrics.json`` and a self-contained ``report.html`` under the run directory, upserts rows in
``model_evaluations`` and moves the run to ``evaluated``.

"Already done" is checked, not assumed (:func:`already_evaluated`): a run whose recorded
evaluation has the same inputs (config, checkpoint and test manifest bytes, compared models),
whose metrics.json and report.html still have the sha256s it recorded and whose rows are all
in ``model_evaluations`` exits 0 with ``already_done``; anything else is evaluated again.

Images: the cached training-size copies (``train_image_path``), preprocessed exactly like
training's validation (``jobs.images.preprocess``: full frame, bilinear, no crop).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs import db, logs, runs
from jobs.artifacts import atomic_write_text, sha256_file
from jobs.errors import InputError

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config

SPLIT = "test"
OK, INSUFFICIENT = "ok", "insufficient_data"
HEADLINE = ("mae", "rmse", "spearman", "pearson", "roc_auc", "pr_auc", "f1", "precision", "recall")
BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)


# ---- metrics on fixed predictions (pure, hand-checkable) ---------------------------------


def _varied(a: np.ndarray) -> bool:
    return len(a) > 0 and float(np.ptp(a)) > 0


def metric_value(name: str, y: np.ndarray, s: np.ndarray, threshold: float) -> float | None:
    """One metric of scores ``s`` against labels ``y`` (both 0..5); None when undefined."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import average_precision_score, roc_auc_score

    n = len(y)
    if n == 0:
        return None
    err = s - y
    if name == "mae":
        return float(np.abs(err).mean())
    if name == "rmse":
        return float(np.sqrt((err**2).mean()))
    if name == "bias":
        return float(err.mean())
    if name in ("spearman", "pearson"):
        if n < 3 or not _varied(y) or not _varied(s):
            return None
        fn = spearmanr if name == "spearman" else pearsonr
        return float(fn(s, y).statistic)
    good = y >= threshold
    if name in ("roc_auc", "pr_auc"):
        if good.all() or not good.any():
            return None
        fn = roc_auc_score if name == "roc_auc" else average_precision_score
        return float(fn(good, s))
    pred = s >= threshold
    tp = int((pred & good).sum())
    fp = int((pred & ~good).sum())
    fn_ = int((~pred & good).sum())
    if name == "precision":
        return tp / (tp + fp) if tp + fp else None
    if name == "recall":
        return tp / (tp + fn_) if tp + fn_ else None
    if name == "f1":
        return 2 * tp / (2 * tp + fp + fn_) if tp + fp + fn_ else None
    raise ValueError(name)


def confusion(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, int]:
    good, pred = y >= threshold, s >= threshold
    return {
        "tp": int((pred & good).sum()),
        "fp": int((pred & ~good).sum()),
        "fn": int((~pred & good).sum()),
        "tn": int((~pred & ~good).sum()),
    }


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


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def bootstrap_indices(n: int, samples: int, seed: int, key: str) -> np.ndarray:
    return _rng(seed, key).integers(0, n, size=(samples, n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None, None
    a = (1 - level) / 2
    lo, hi = np.percentile(values, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


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
    """Percentile CI of a metric over row resamples; resamples where it is undefined are
    dropped, and if over half are, there is no CI."""
    idx = bootstrap_indices(len(y), samples, seed, key)
    if name == "mae":
        vals = np.abs(s - y)[idx].mean(axis=1)
    elif name == "rmse":
        vals = np.sqrt(((s - y) ** 2)[idx].mean(axis=1))
    else:
        vals = np.array(
            [
                v if (v := metric_value(name, y[i], s[i], threshold)) is not None else np.nan
                for i in idx
            ]
        )
    if np.isfinite(vals).sum() < 0.5 * samples:
        return None, None
    return _percentiles(vals, level)


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
    """MAE(model) - MAE(other) on the same resampled rows; negative = the model is better."""
    diff_rows = np.abs(s_model - y) - np.abs(s_other - y)
    idx = bootstrap_indices(len(y), samples, seed, key)
    lo, hi = _percentiles(diff_rows[idx].mean(axis=1), level)
    diff = float(diff_rows.mean())
    if lo is not None and hi < 0:
        verdict = "better"
    elif lo is not None and lo > 0:
        verdict = "worse"
    else:
        verdict = "no detectable difference"
    return {
        "mae_model": float(np.abs(s_model - y).mean()),
        "mae_other": float(np.abs(s_other - y).mean()),
        "mae_diff": diff,
        "ci_low": lo,
        "ci_high": hi,
        "verdict": verdict,
        "n": int(len(y)),
    }


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


# ---- prediction --------------------------------------------------------------------------


def predict_scores(
    cfg: Config, ckpt_path: Path, image_paths: list[Path], *, batch_size: int
) -> np.ndarray:
    """0..5 scores of a checkpoint on images (preprocess contract, CPU or CUDA)."""
    import torch
    from PIL import Image

    from jobs.images import preprocess
    from jobs.train import model as M

    model, ckpt = M.model_from_checkpoint(ckpt_path)
    spec = ckpt["spec"]
    device = torch.device(
        "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model.to(device, memory_format=torch.channels_last)
    scores = []
    with torch.inference_mode():
        for start in range(0, len(image_paths), batch_size):
            batch = []
            for p in image_paths[start : start + batch_size]:
                try:
                    with Image.open(p, formats=["JPEG", "PNG", "WEBP"]) as img:
                        img.load()
                        batch.append(preprocess(img.convert("RGB"), spec["input_size"]))
                except (OSError, ValueError) as exc:
                    raise InputError(
                        f"cached image {p} cannot be read ({exc}); re-run 'airatings cache'"
                    ) from None
            x = torch.from_numpy(np.stack(batch)).to(device)
            scores.append(M.scores_from_outputs(model(x), spec["target"]).float().cpu().numpy())
    return np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)


# ---- comparisons ---------------------------------------------------------------------------


def _other_checkpoint(cfg: Config, conn: psycopg.Connection, version: str) -> Path:
    other = runs.get_run(conn, cfg, version)
    path = runs.run_dir(cfg, other.model_version) / "best.pt"
    if not path.is_file():
        raise InputError(
            f"evaluate.compare_to={version}: {path} does not exist (train that run first)"
        )
    return path


def production_version(cfg: Config, conn: psycopg.Connection) -> tuple[str | None, str]:
    """The production model version if a registry (model_aliases) exists, and why not if not."""
    from psycopg import sql

    name = f"{cfg.database.ml_schema}.model_aliases"
    if conn.execute("select to_regclass(%s)", (name,)).fetchone()[0] is None:
        return (
            None,
            "no model_aliases table yet (the registry arrives in [5/8]): no production comparison",
        )
    try:
        row = conn.execute(
            sql.SQL("select model_version from {} where alias = %s").format(
                runs.table(cfg, "model_aliases")
            ),
            ("production",),
        ).fetchone()
    except Exception as exc:  # the registry's shape is not ours to know yet
        return (
            None,
            f"model_aliases could not be read ({type(exc).__name__}): no production comparison",
        )
    if row is None:
        return None, "no production alias set: no production comparison"
    return str(row[0]), "ok"


# ---- "already done", checked ---------------------------------------------------------------

# Bump when the evaluation itself changes (metrics, report): older results are then redone.
EVALUATION_FORMAT = 1


def evaluation_key(cfg: Config, the_run: runs.Run, best: Path, test_path: Path) -> str:
    """sha256 of everything an evaluation's numbers depend on: the evaluate config and the
    good threshold, the checkpoint's and the test manifest's bytes, the dataset, the compared
    run's checkpoint and the production version."""
    parts: dict[str, Any] = {
        "format": EVALUATION_FORMAT,
        "evaluate": cfg.evaluate.model_dump(mode="json"),
        "good_threshold": cfg.dataset.good_threshold,
        "dataset_hash": the_run.dataset_hash,
        "checkpoint_sha256": sha256_file(best),
        "test_manifest_sha256": sha256_file(test_path),
    }
    with db.connect(cfg, autocommit=True) as conn:
        if cfg.evaluate.compare_to:
            other = _other_checkpoint(cfg, conn, cfg.evaluate.compare_to)
            parts["compare_to_sha256"] = sha256_file(other)
        parts["production"] = production_version(cfg, conn)[0]
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def already_evaluated(
    cfg: Config, the_run: runs.Run, out_dir: Path, key: str
) -> tuple[dict[str, Any] | None, str]:
    """``(summary, "")`` when the run's recorded evaluation still stands: status at least
    ``evaluated``, made from the same inputs (:func:`evaluation_key`), metrics.json and
    report.html present with the sha256s it recorded, and its model_evaluations rows all
    there. Otherwise ``(None, why)``: the caller evaluates again (RELIABILITY 30), never a
    dead end."""
    from psycopg import sql

    rec = the_run.params.get("evaluate") or {}
    if not the_run.reached("evaluated") or not rec:
        return None, "not evaluated yet"
    if rec.get("evaluation_key") != key:
        return None, "its inputs changed (config, checkpoint, test split or a compared model)"
    for name, sha_key in (("metrics.json", "metrics_sha256"), ("report.html", "report_sha256")):
        path = out_dir / name
        if not path.is_file():
            return None, f"{path} is missing"
        if sha256_file(path) != rec.get(sha_key):
            return None, f"{path} changed since the evaluation wrote it"
    with db.connect(cfg, autocommit=True) as conn:
        (n,) = conn.execute(
            sql.SQL("select count(*) from {} where model_version = %s and split = %s").format(
                runs.table(cfg, "model_evaluations")
            ),
            (the_run.model_version, SPLIT),
        ).fetchone()
    if n != rec.get("db_rows"):
        return (
            None,
            f"model_evaluations holds {n} rows for it, the evaluation wrote {rec.get('db_rows')}",
        )
    return {**rec, "status": "already_done"}, ""


# ---- main ----------------------------------------------------------------------------------


def run(cfg: Config, run: str | int = "latest") -> dict[str, Any]:
    import pyarrow.parquet as pq

    log = logs.get_logger()
    started = time.monotonic()
    e = cfg.evaluate
    with runs.claim(cfg, "evaluate", run) as (the_run, skipped):
        if skipped:
            return skipped
        runs.require(the_run, "trained")
        out_dir = runs.run_dir(cfg, the_run.model_version)
        best = out_dir / "best.pt"
        if not best.is_file():
            raise InputError(
                f"{best} is missing: run 'airatings train --run {the_run.model_version}'"
            )
        from jobs.train import model as M

        ckpt = M.load_weights_only(best)
        if ckpt.get("dataset_hash") != the_run.dataset_hash:
            raise InputError(
                f"{best} was trained on dataset {ckpt.get('dataset_hash')}, the run has {the_run.dataset_hash}"
            )
        target = ckpt["spec"]["target"]
        active = out_dir / "active"
        test_path = active / f"manifest_{SPLIT}.parquet"
        if not test_path.is_file():
            raise InputError(f"{test_path} is missing: run 'airatings cache' first")
        key = evaluation_key(cfg, the_run, best, test_path)
        done, why = already_evaluated(cfg, the_run, out_dir, key)
        if done is not None:
            log.info("evaluate_already_done", report=done.get("report_html"))
            return done | {"seconds": round(time.monotonic() - started, 3)}
        if the_run.reached("evaluated"):
            log.info("evaluation_redone", reason=why)
        tbl = pq.read_table(test_path).to_pydict()
        y = np.asarray(tbl["label_value"], dtype=np.float64)
        paths = [cfg.artifacts_dir / p for p in tbl["train_image_path"]]
        n = len(y)
        threshold = cfg.dataset.good_threshold
        s = predict_scores(cfg, best, paths, batch_size=e.batch_size)
        log.info("test_split_scored", rows=n, target=target)

        kw = {"samples": e.bootstrap_samples, "level": e.ci_level, "seed": e.seed}
        metrics: dict[str, dict[str, dict[str, Any]]] = {
            "all": headline_metrics(
                y, s, threshold, min_rows=e.min_test_rows, names=(*HEADLINE, "bias"), **kw
            )
        }
        for name, mask in slice_masks(tbl).items():
            metrics[name] = headline_metrics(
                y[mask],
                s[mask],
                threshold,
                min_rows=e.min_slice_size,
                slice_name=name,
                names=("mae", "rmse", "bias", "spearman", "roc_auc"),
                ci_names=("mae",),
                **kw,
            )

        # baselines on the same rows
        train_tbl = pq.read_table(active / "manifest_train.parquet", columns=["label_value"])
        train_mean = float(np.mean(train_tbl.column("label_value").to_numpy()))
        enough = n >= e.min_test_rows
        baselines: dict[str, Any] = {}
        const = np.full(n, train_mean)
        baselines["constant"] = {
            "prediction": train_mean,
            **(
                paired_bootstrap(y, s, const, key="baseline|constant", **kw)
                if enough
                else {"status": INSUFFICIENT, "n": n}
            ),
        }
        with db.connect(cfg, autocommit=True) as conn:
            if e.compare_to:
                other = _other_checkpoint(cfg, conn, e.compare_to)
                s_other = predict_scores(cfg, other, paths, batch_size=e.batch_size)
                baselines[f"run:{e.compare_to}"] = (
                    paired_bootstrap(y, s, s_other, key=f"baseline|{e.compare_to}", **kw)
                    if enough
                    else {"status": INSUFFICIENT, "n": n}
                )
            prod, prod_note = production_version(cfg, conn)
        production: dict[str, Any] = {"model_version": prod, "note": prod_note}
        if prod is not None and prod != the_run.model_version:
            with db.connect(cfg, autocommit=True) as conn:
                prod_ckpt = _other_checkpoint(cfg, conn, prod)
            s_prod = predict_scores(cfg, prod_ckpt, paths, batch_size=e.batch_size)
            production.update(
                paired_bootstrap(y, s, s_prod, key="baseline|production", **kw)
                if enough
                else {"status": INSUFFICIENT, "n": n}
            )

        result = {
            "model_version": the_run.model_version,
            "run_id": the_run.id,
            "dataset_hash": the_run.dataset_hash,
            "split": SPLIT,
            "n": n,
            "target": target,
            "score_mapping": M.SCORE_MAPPING[target],
            "good_threshold": threshold,
            "checkpoint": str(best),
            "best_epoch": ckpt.get("epoch"),
            "bootstrap": {"samples": e.bootstrap_samples, "ci_level": e.ci_level, "seed": e.seed},
            "min_test_rows": e.min_test_rows,
            "min_slice_size": e.min_slice_size,
            "metrics": metrics,
            "confusion_matrix": confusion(y, s, threshold) if n else None,
            "calibration": calibration(y, s) if n else [],
            "baselines": baselines,
            "production": production,
        }
        # A lost lock (RELIABILITY 27): a twin may be evaluating too; write nothing.
        db.check_locks()
        metrics_path = out_dir / "metrics.json"
        atomic_write_text(
            metrics_path, json.dumps(result, indent=2, sort_keys=True, allow_nan=False)
        )
        report_path = out_dir / "report.html"
        atomic_write_text(
            report_path, render_report(result, y, s, metrics, out_dir / "history.csv")
        )

        rows = evaluation_rows(result)
        summary = summary_of(result, metrics_path, report_path, len(rows))
        # what a later run checks before it trusts this one (already_evaluated)
        summary |= {
            "evaluation_key": key,
            "metrics_sha256": sha256_file(metrics_path),
            "report_sha256": sha256_file(report_path),
        }
        with db.connect(cfg) as conn, conn.transaction():
            db.check_locks()  # set_status checks again right before the final update
            write_rows(conn, cfg, the_run, rows)
            runs.set_status(conn, cfg, the_run.id, "evaluated", step="evaluate", summary=summary)
        summary["seconds"] = round(time.monotonic() - started, 3)
        log.info(
            "evaluation_finished",
            rows=n,
            mae=summary["mae"],
            spearman=summary["spearman"],
            vs_constant=summary["vs_constant"],
            db_rows=len(rows),
            report=str(report_path),
        )
        return summary


def summary_of(
    result: dict[str, Any], metrics_path: Path, report_path: Path, db_rows: int
) -> dict[str, Any]:
    allm = result["metrics"]["all"]
    const = result["baselines"]["constant"]
    return {
        "status": "evaluated",
        "model_version": result["model_version"],
        "split": SPLIT,
        "n": result["n"],
        "target": result["target"],
        **{
            k: allm[k]["value"] if allm[k]["status"] == OK else INSUFFICIENT
            for k in ("mae", "rmse", "spearman", "roc_auc")
        },
        "mae_ci": [allm["mae"]["ci_low"], allm["mae"]["ci_high"]],
        "vs_constant": const.get("verdict", INSUFFICIENT),
        "mae_diff_vs_constant": const.get("mae_diff"),
        "mae_diff_vs_constant_ci": [const.get("ci_low"), const.get("ci_high")],
        "comparisons": {k: v.get("verdict", INSUFFICIENT) for k, v in result["baselines"].items()},
        "production": result["production"].get("verdict") or result["production"]["note"],
        "metrics_json": str(metrics_path),
        "report_html": str(report_path),
        "report": str(report_path),  # the demo lifecycle's key
        "headline": {
            k: allm[k]["value"] if allm[k]["status"] == OK else INSUFFICIENT
            for k in ("mae", "rmse", "spearman", "pearson", "roc_auc", "pr_auc", "f1")
        }
        | {"vs_constant": const.get("verdict", INSUFFICIENT)},
        "db_rows": db_rows,
    }


def evaluation_rows(
    result: dict[str, Any],
) -> list[tuple[str, str, float | None, str, int, float | None, float | None]]:
    """(slice, metric, value, status, n, ci_low, ci_high) for model_evaluations."""
    rows = []
    for slice_name, ms in result["metrics"].items():
        for metric, m in ms.items():
            rows.append(
                (slice_name, metric, m["value"], m["status"], m["n"], m["ci_low"], m["ci_high"])
            )
    comparisons = dict(result["baselines"])
    if "verdict" in result["production"]:
        comparisons["production"] = result["production"]
    for name, b in comparisons.items():
        key = name.replace("run:", "")
        if "mae_diff" in b:
            rows.append(
                ("all", f"mae_diff_vs_{key}", b["mae_diff"], OK, b["n"], b["ci_low"], b["ci_high"])
            )
            rows.append(("all", f"mae_of_{key}", b["mae_other"], OK, b["n"], None, None))
        else:
            rows.append(("all", f"mae_diff_vs_{key}", None, INSUFFICIENT, b["n"], None, None))
    return rows


def write_rows(conn: psycopg.Connection, cfg: Config, the_run: runs.Run, rows: list[tuple]) -> None:
    from psycopg import sql

    t = runs.table(cfg, "model_evaluations")
    conn.execute(
        sql.SQL(
            "delete from {} where model_version = %s and split = %s and not (slice || '|' || metric = any(%s))"
        ).format(t),
        (the_run.model_version, SPLIT, [f"{r[0]}|{r[1]}" for r in rows]),
    )
    q = sql.SQL(
        "insert into {} (model_version, training_run_id, dataset_hash, split, slice, metric, value, status, n,"
        " ci_low, ci_high) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " on conflict (model_version, split, slice, metric) do update set"
        " training_run_id = excluded.training_run_id, dataset_hash = excluded.dataset_hash,"
        " value = excluded.value, status = excluded.status, n = excluded.n, ci_low = excluded.ci_low,"
        " ci_high = excluded.ci_high, updated_at = now()"
    ).format(t)
    with conn.cursor() as cur:
        cur.executemany(
            q, [(the_run.model_version, the_run.id, the_run.dataset_hash, SPLIT, *r) for r in rows]
        )


# ---- report --------------------------------------------------------------------------------


def _plots(
    y: np.ndarray, s: np.ndarray, result: dict[str, Any], history: Path
) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    from jobs.report import figure_png

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

    cal = [c for c in result["calibration"] if c["n"]]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.plot([0, 5], [0, 5], color="grey", lw=1)
    if cal:
        ax.plot([c["mean_predicted"] for c in cal], [c["mean_human"] for c in cal], marker="o")
        for c in cal:
            ax.annotate(str(c["n"]), (c["mean_predicted"], c["mean_human"]), fontsize=8)
    ax.set(xlabel="mean predicted (bucket)", ylabel="mean human", xlim=(0, 5), ylim=(0, 5))
    out.append(("Calibration by predicted bucket (n annotated)", figure_png(fig)))

    good = y >= t
    fig, ax = plt.subplots(figsize=(5, 4.2))
    if good.any() and not good.all():
        p, r, _ = precision_recall_curve(good, s)
        ax.plot(r, p)
        ax.axhline(good.mean(), color="grey", lw=1, ls="--")
    else:
        ax.text(0.5, 0.5, "insufficient data (one class)", ha="center")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    out.append((f"Precision-recall, good = label >= {t:g}", figure_png(fig)))

    sl = [
        (k, v["mae"])
        for k, v in result["metrics"].items()
        if k != "all" and v["mae"]["status"] == OK
    ]
    fig, ax = plt.subplots(figsize=(5, max(2.5, 0.3 * len(sl) + 1)))
    if sl:
        names = [k for k, _ in sl]
        vals = np.array([m["value"] for _, m in sl])
        lo = np.array([m["ci_low"] if m["ci_low"] is not None else m["value"] for _, m in sl])
        hi = np.array([m["ci_high"] if m["ci_high"] is not None else m["value"] for _, m in sl])
        ax.barh(names, vals, xerr=[vals - lo, hi - vals], color="tab:blue", alpha=0.7)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no slice has enough rows", ha="center")
    ax.set(xlabel="MAE (95% CI)")
    out.append(("Error by slice", figure_png(fig)))

    if history.is_file():
        import csv

        with open(history, newline="") as f:
            hist = list(csv.DictReader(f))
        if hist:
            ep = [int(r["epoch"]) for r in hist]
            fig, ax = plt.subplots(figsize=(5, 4.2))
            for col in ("train_loss", "val_loss", "val_mae"):
                vals = [float(r[col]) if r.get(col) else np.nan for r in hist]
                ax.plot(ep, vals, marker="o", label=col)
            ax.set(xlabel="epoch")
            ax.legend()
            out.append(("Training curves (history.csv)", figure_png(fig)))
    return out


def render_report(
    result: dict[str, Any],
    y: np.ndarray,
    s: np.ndarray,
    metrics: dict[str, Any],
    history: Path,
    plots: Callable[..., list[tuple[str, str]]] = _plots,
) -> str:
    from jobs import report as R

    allm = metrics["all"]
    head = R.table(
        ["metric", "value", "CI low", "CI high", "n"],
        [
            # a metric without a bootstrap interval (bias) shows a dash, not "insufficient data"
            (
                k,
                m["value"],
                *(
                    m[c] if m[c] is not None or m["value"] is None else "-"
                    for c in ("ci_low", "ci_high")
                ),
                m["n"],
            )
            for k, m in allm.items()
        ],
    )
    cm = result["confusion_matrix"] or {}
    conf = R.table(
        ["", "predicted good", "predicted not good"],
        [
            ("human good", cm.get("tp"), cm.get("fn")),
            ("human not good", cm.get("fp"), cm.get("tn")),
        ],
    )
    cal = R.table(
        ["bucket", "n", "mean predicted", "mean human"],
        [
            (c["bucket"], c["n"], c["mean_predicted"], c["mean_human"])
            for c in result["calibration"]
        ],
    )
    base_rows = []
    for name, b in {**result["baselines"], "production": result["production"]}.items():
        compared = b.get("mae_diff") is not None or b.get("status") == "insufficient_data"
        # no comparison made (no production model yet): dashes, not "insufficient data"
        cells = [
            b.get(k) if compared else "-" for k in ("mae_other", "mae_diff", "ci_low", "ci_high")
        ]
        base_rows.append((name, *cells, b.get("verdict") or b.get("note") or b.get("status")))
    base = R.table(
        ["compared with", "its MAE", "MAE diff (model - it)", "CI low", "CI high", "verdict"],
        base_rows,
    )
    sized = {
        k: v for k, v in metrics.items() if k != "all" and v["mae"]["status"] != "insufficient_data"
    }
    small = [(k, v["mae"]["n"]) for k, v in metrics.items() if k != "all" and k not in sized]
    slices = R.table(
        ["slice", "n", "MAE", "MAE CI low", "MAE CI high", "RMSE", "bias", "Spearman", "ROC AUC"],
        [
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
            for k, v in sized.items()
        ],
    )
    if small:
        slices += R.paragraph(
            f"Insufficient data (fewer than {result['min_slice_size']} rows), no metrics: "
            + ", ".join(f"{k} (n={n})" for k, n in small)
            + "."
        )
    intro = R.paragraph(
        f"Run {result['model_version']} (target {result['target']}, score = {result['score_mapping']}), "
        f"dataset {result['dataset_hash']}, {result['n']} test rows, best epoch {result['best_epoch']}. "
        f"Good = label >= {result['good_threshold']:g}. CIs: {result['bootstrap']['samples']} seeded "
        f"bootstrap resamples, level {result['bootstrap']['ci_level']:g}. Slices smaller than "
        f"{result['min_slice_size']} rows get no metrics ('insufficient data')."
    )
    sections = [
        ("Summary", intro + head),
        ("Plots", R.figures(plots(y, s, result, history))),
        ("Classification at the threshold", conf),
        ("Calibration", cal),
        ("Baselines (paired bootstrap on the same rows)", base),
        ("Slices", slices),
    ]
    return R.page(f"Evaluation: {result['model_version']}", sections)
