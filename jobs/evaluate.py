"""`airatings evaluate [--run ID|latest]`: the best checkpoint on the run's test split.

The job: claim the run, load its best checkpoint, score the test rows, compute the metrics
(:mod:`jobs.metrics`: pure functions, no database or files), write ``metrics.json`` and
``report.html`` (:mod:`jobs.report`) in the run's folder (:mod:`jobs.paths`), upsert rows in
``model_evaluations`` and move the run to ``evaluated``.

Every target yields a 0..5 score (``jobs.train.model.scores_from_outputs``: regression clamps,
binary maps probability * 5, distribution takes the expected rating). On the test rows: the
regression and classification metrics at ``dataset.good_threshold``, per slice when the slice
has at least ``evaluate.min_slice_size`` rows, with percentile bootstrap CIs
(``evaluate.bootstrap_samples``, seeded per (slice, metric) from ``evaluate.seed``, so a re-run
reproduces the same numbers). Baselines on the same rows through one paired bootstrap of the
MAE difference: a constant predictor (the training mean), another run's best checkpoint
(``evaluate.compare_to``), and the production model (the ``production`` row of
``model_aliases``, moved by `airatings models promote`; without one the summary says so). Verdict: "better"/"worse" when the CI of (model MAE - other MAE)
excludes 0, else "no detectable difference". Too few rows for a metric gives
``status: insufficient_data`` and no value.

"Already done" is checked, not assumed (:func:`already_evaluated`): a run whose recorded
evaluation has the same inputs (config, checkpoint and test manifest bytes, compared models),
whose metrics.json and report.html still have the sha256s it recorded and whose rows are all
in ``model_evaluations`` exits 0 with ``already_done``; anything else is evaluated again.

Images: the cached training-size copies (``train_image_path``), preprocessed exactly like
training's validation (``jobs.images.preprocess``: full frame, bilinear, no crop).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs import calibration, db, logs, metrics, paths, report, runs
from jobs.artifacts import atomic_write_parquet, atomic_write_text, sha256_file
from jobs.errors import InputError
from jobs.metrics import INSUFFICIENT, OK

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config
    from jobs.paths import RunPaths

SPLIT = "test"


# ---- prediction --------------------------------------------------------------------------


def predict(
    cfg: Config, ckpt_path: Path, image_paths: list[Path], *, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(raw_score, score)`` of a checkpoint on images (preprocess contract, CPU or CUDA):
    the network's ``raw_score`` (``jobs.train.model.raw_scores_from_outputs``: what the ONNX
    graph outputs and the calibration maps) and its own 0..5 score (``SCORE_MAPPING``)."""
    import torch
    from PIL import Image

    from jobs.images import preprocess
    from jobs.train import model as train_model

    model, ckpt = train_model.model_from_checkpoint(ckpt_path)
    spec = ckpt["spec"]
    device = torch.device(
        "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    )
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model.to(device, memory_format=torch.channels_last)
    raws, scores = [], []
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
            outputs = model(x).float()
            raws.append(train_model.raw_scores_from_outputs(outputs, spec["target"]).cpu().numpy())
            scores.append(train_model.scores_from_outputs(outputs, spec["target"]).cpu().numpy())
    if not scores:
        return np.zeros(0), np.zeros(0)
    return (
        np.concatenate(raws).astype(np.float64),
        np.concatenate(scores).astype(np.float64),
    )


def predict_scores(
    cfg: Config, ckpt_path: Path, image_paths: list[Path], *, batch_size: int
) -> np.ndarray:
    """The 0..5 scores of :func:`predict` (what the baselines compare)."""
    return predict(cfg, ckpt_path, image_paths, batch_size=batch_size)[1]


# ---- comparisons ---------------------------------------------------------------------------


def _other_checkpoint(cfg: Config, conn: psycopg.Connection, version: str) -> Path:
    other = runs.get_run(conn, cfg, version)
    path = paths.of(cfg).run(other.model_version).best_checkpoint
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
            "no model_aliases table (run 'airatings migrate'): no production comparison",
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
# 2: intervals from scipy.stats.bootstrap, report from the Jinja2 templates.
# 3: the calibration is fitted here (val split); the capture gate measured on aiRating;
#    each test row's prediction in predictions.parquet.
EVALUATION_FORMAT = 3

# The test manifest's columns copied into predictions.parquet beside the predictions.
PREDICTION_CONTEXT = ("snapshot_id", "webcam_id", "phase", "captured_at", "region", "source",
                      "rating_count", "label_source")  # fmt: skip


def evaluation_key(cfg: Config, run: runs.Run, best: Path, test_path: Path, val_path: Path) -> str:
    """sha256 of everything an evaluation's numbers depend on: the evaluate config and the
    good threshold, the checkpoint's and the test and val manifests' bytes, the dataset, the compared
    run's checkpoint and the production version."""
    parts: dict[str, Any] = {
        "format": EVALUATION_FORMAT,
        "evaluate": cfg.evaluate.model_dump(mode="json"),
        "good_threshold": cfg.dataset.good_threshold,
        "dataset_hash": run.dataset_hash,
        "checkpoint_sha256": sha256_file(best),
        "test_manifest_sha256": sha256_file(test_path),
        # the calibration is fitted on the validation split
        "val_manifest_sha256": sha256_file(val_path),
    }
    with db.connect(cfg, autocommit=True) as conn:
        if cfg.evaluate.compare_to:
            other = _other_checkpoint(cfg, conn, cfg.evaluate.compare_to)
            parts["compare_to_sha256"] = sha256_file(other)
        parts["production"] = production_version(cfg, conn)[0]
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def already_evaluated(
    cfg: Config, run: runs.Run, run_paths: RunPaths, key: str
) -> tuple[dict[str, Any] | None, str]:
    """``(summary, "")`` when the run's recorded evaluation still stands: status at least
    ``evaluated``, made from the same inputs (:func:`evaluation_key`), metrics.json and
    report.html present with the sha256s it recorded, and its model_evaluations rows all
    there. Otherwise ``(None, why)``: the caller evaluates again (docs/faults.md 30), never a
    dead end."""
    from psycopg import sql

    rec = run.params.get("evaluate") or {}
    if not run.reached("evaluated") or not rec:
        return None, "not evaluated yet"
    if rec.get("evaluation_key") != key:
        return None, "its inputs changed (config, checkpoint, test split or a compared model)"
    for path, sha_key in (
        (run_paths.metrics, "metrics_sha256"),
        (run_paths.report, "report_sha256"),
        (run_paths.predictions, "predictions_sha256"),
    ):
        if not path.is_file():
            return None, f"{path} is missing"
        if sha256_file(path) != rec.get(sha_key):
            return None, f"{path} changed since the evaluation wrote it"
    with db.connect(cfg, autocommit=True) as conn:
        (n,) = conn.execute(
            sql.SQL("select count(*) from {} where model_version = %s and split = %s").format(
                runs.table(cfg, "model_evaluations")
            ),
            (run.model_version, SPLIT),
        ).fetchone()
    if n != rec.get("db_rows"):
        return (
            None,
            f"model_evaluations holds {n} rows for it, the evaluation wrote {rec.get('db_rows')}",
        )
    return {**rec, "status": "already_done"}, ""


# ---- main ----------------------------------------------------------------------------------


def run(cfg: Config, run_ref: str | int = "latest") -> dict[str, Any]:
    """Evaluate the best checkpoint of ``run_ref`` (an id, a model version or "latest") on its
    test split; returns the summary (also recorded in the run's params)."""
    import pyarrow.parquet as pq

    from jobs.train import model as train_model

    log = logs.get_logger()
    started = time.monotonic()
    settings = cfg.evaluate
    with runs.claim(cfg, "evaluate", run_ref) as (run, skipped):
        if skipped:
            return skipped
        runs.require(run, "trained")
        run_paths = paths.of(cfg).run(run.model_version)
        version = run.model_version
        best = runs.verified_best_checkpoint(cfg, run)
        recorded_active = (run.params.get("cache") or {}).get("active_files") or {}
        for split in (SPLIT, "val", "train"):
            manifest = run_paths.active_manifest(split)
            runs.verify_recorded(
                manifest,
                (recorded_active.get(manifest.name) or {}).get("sha256"),
                what=f"active {split} manifest",
                fix=f"run 'airatings cache --run {version}' (it rewrites the active manifests "
                "from the image cache without downloading), then evaluate again",
            )
        ckpt = train_model.load_weights_only(best)
        if ckpt.get("dataset_hash") != run.dataset_hash:
            raise InputError(
                f"{best} was trained on dataset {ckpt.get('dataset_hash')}, the run has {run.dataset_hash}"
            )
        target = ckpt["spec"]["target"]
        test_path = run_paths.active_manifest(SPLIT)
        key = evaluation_key(cfg, run, best, test_path, run_paths.active_manifest("val"))
        done, why = already_evaluated(cfg, run, run_paths, key)
        if done is not None:
            log.info("evaluate_already_done", report=done.get("report_html"))
            return done | {"seconds": round(time.monotonic() - started, 3)}
        if run.reached("evaluated"):
            log.info("evaluation_redone", reason=why)
        test_table = pq.read_table(test_path).to_pydict()
        y = np.asarray(test_table["label_value"], dtype=np.float64)
        image_paths = [cfg.artifacts_dir / p for p in test_table["train_image_path"]]
        n = len(y)
        threshold = cfg.dataset.good_threshold
        raw, s = predict(cfg, best, image_paths, batch_size=settings.batch_size)
        log.info("test_split_scored", rows=n, target=target)
        # the calibration (raw_score -> the app's 0..5 aiRating) is fitted here, on the
        # validation split, so the report shows it before/after and the capture gate is
        # measured on the calibrated score; export-onnx and register reuse these knots
        val_table = pq.read_table(
            run_paths.active_manifest("val"), columns=["label_value", "train_image_path"]
        ).to_pydict()
        val_raw, _ = predict(
            cfg,
            best,
            [cfg.artifacts_dir / p for p in val_table["train_image_path"]],
            batch_size=settings.batch_size,
        )
        knots = calibration.fit(val_raw, val_table["label_value"], target=target)
        ai = calibration.apply(knots, raw) if n else np.zeros(0)
        log.info("calibration_fitted", method=knots["method"], knots=len(knots["x"]), n=knots["n"])

        boot = {
            "samples": settings.bootstrap_samples,
            "level": settings.ci_level,
            "seed": settings.seed,
        }
        result_metrics = metrics.sliced_metrics(
            y,
            s,
            test_table,
            threshold,
            min_test_rows=settings.min_test_rows,
            min_slice_size=settings.min_slice_size,
            **boot,
        )
        baselines, production = compare_with_baselines(cfg, run, run_paths, y, s, image_paths, boot)
        result = {
            "model_version": run.model_version,
            "run_id": run.id,
            "dataset_hash": run.dataset_hash,
            "split": SPLIT,
            "n": n,
            "target": target,
            "score_mapping": train_model.SCORE_MAPPING[target],
            "good_threshold": threshold,
            "checkpoint": str(best),
            "best_epoch": ckpt.get("epoch"),
            "bootstrap": {
                "samples": settings.bootstrap_samples,
                "ci_level": settings.ci_level,
                "seed": settings.seed,
            },
            "min_test_rows": settings.min_test_rows,
            "min_slice_size": settings.min_slice_size,
            "metrics": result_metrics,
            "confusion_matrix": metrics.confusion(y, s, threshold) if n else None,
            "calibration": metrics.calibration(y, s) if n else [],
            "calibration_after": metrics.calibration(y, ai) if n else [],
            "calibration_knots": knots,
            "capture_gate": capture_gate(y, ai, threshold, settings, boot),
            "baselines": baselines,
            "production": production,
        }
        page = report.evaluation_page(
            result, report.evaluation_plots(y, s, result, run_paths.history, ai=ai)
        )
        # A lost lock (docs/faults.md 27): a twin may be evaluating too; write nothing.
        db.check_locks()
        atomic_write_text(
            run_paths.metrics, json.dumps(result, indent=2, sort_keys=True, allow_nan=False)
        )
        atomic_write_text(run_paths.report, page)
        atomic_write_parquet(
            predictions_table(test_table, y, raw, s, ai, version), run_paths.predictions
        )

        rows = evaluation_rows(result)
        summary = summary_of(result, run_paths.metrics, run_paths.report, len(rows))
        # what a later run checks before it trusts this one (already_evaluated)
        summary |= {
            "evaluation_key": key,
            "metrics_sha256": sha256_file(run_paths.metrics),
            "report_sha256": sha256_file(run_paths.report),
            "predictions_parquet": str(run_paths.predictions),
            "predictions_sha256": sha256_file(run_paths.predictions),
        }
        with db.connect(cfg) as conn, conn.transaction():
            db.check_locks()  # set_status checks again right before the final update
            write_rows(conn, cfg, run, rows)
            runs.set_status(conn, cfg, run.id, "evaluated", step="evaluate", summary=summary)
        summary["seconds"] = round(time.monotonic() - started, 3)
        log.info(
            "evaluation_finished",
            rows=n,
            mae=summary["mae"],
            spearman=summary["spearman"],
            vs_constant=summary["vs_constant"],
            db_rows=len(rows),
            report=str(run_paths.report),
        )
        return summary


def predictions_table(
    test_table: dict[str, list[Any]],
    y: np.ndarray,
    raw: np.ndarray,
    s: np.ndarray,
    ai: np.ndarray,
    version: str,
) -> Any:
    """predictions.parquet: one row per test row, so any figure of the report can be
    recomputed and a later version compared row by row: the label, the raw score, the model's
    own 0..5 score, the calibrated aiRating, and the slice columns the manifest has."""
    import pyarrow as pa

    columns: dict[str, Any] = {k: test_table[k] for k in PREDICTION_CONTEXT if k in test_table}
    columns |= {
        "model_version": [version] * len(y),
        "label_value": y.tolist(),
        "raw_score": raw.tolist(),
        "score": s.tolist(),
        "ai_rating": np.asarray(ai, dtype=np.float64).tolist(),
    }
    return pa.table(columns)


GATE_METRICS = ("precision", "recall", "f1", "mae", "bias")


def capture_gate(
    y: np.ndarray, ai: np.ndarray, threshold: float, settings: Any, boot: dict[str, Any]
) -> dict[str, Any]:
    """The capture gate as the app applies it (``aiRating >= threshold``, aiRating = the
    calibrated score) on the test rows: precision, recall and F1 of "the gate passes" against
    "people rated it good" (label >= threshold), with bootstrap CIs, the calibrated score's
    MAE and bias, the confusion counts and how often it passes."""
    gate_metrics = metrics.headline_metrics(
        y,
        ai,
        threshold,
        min_rows=settings.min_test_rows,
        slice_name="gate",
        names=GATE_METRICS,
        ci_names=GATE_METRICS,
        **boot,
    )
    n = len(y)
    return {
        "threshold": threshold,
        "score": "aiRating (calibrated)",
        "metrics": gate_metrics,
        "confusion_matrix": metrics.confusion(y, ai, threshold) if n else None,
        "pass_rate": float(np.mean(ai >= threshold)) if n else None,
        "good_rate": float(np.mean(y >= threshold)) if n else None,
    }


def compare_with_baselines(
    cfg: Config,
    run: runs.Run,
    run_paths: RunPaths,
    y: np.ndarray,
    s: np.ndarray,
    image_paths: list[Path],
    boot: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(baselines, production): the model's MAE against the constant training mean, the
    ``evaluate.compare_to`` run and the production model, each on the same rows (paired)."""
    import pyarrow.parquet as pq

    settings = cfg.evaluate

    def compared(s_other: np.ndarray, key: str) -> dict[str, Any]:
        return metrics.comparison(y, s, s_other, min_rows=settings.min_test_rows, key=key, **boot)

    train_labels = pq.read_table(run_paths.active_manifest("train"), columns=["label_value"])
    train_mean = float(np.mean(train_labels.column("label_value").to_numpy()))
    baselines: dict[str, Any] = {
        "constant": {
            "prediction": train_mean,
            **compared(np.full(len(y), train_mean), "baseline|constant"),
        }
    }
    with db.connect(cfg, autocommit=True) as conn:
        other = _other_checkpoint(cfg, conn, settings.compare_to) if settings.compare_to else None
        prod, prod_note = production_version(cfg, conn)
        prod_ckpt = (
            _other_checkpoint(cfg, conn, prod)
            if prod is not None and prod != run.model_version
            else None
        )
    if other is not None:
        s_other = predict_scores(cfg, other, image_paths, batch_size=settings.batch_size)
        baselines[f"run:{settings.compare_to}"] = compared(
            s_other, f"baseline|{settings.compare_to}"
        )
    production: dict[str, Any] = {"model_version": prod, "note": prod_note}
    if prod_ckpt is not None:
        s_prod = predict_scores(cfg, prod_ckpt, image_paths, batch_size=settings.batch_size)
        production.update(compared(s_prod, "baseline|production"))
    return baselines, production


def summary_of(
    result: dict[str, Any], metrics_path: Path, report_path: Path, db_rows: int
) -> dict[str, Any]:
    allm = result["metrics"]["all"]
    const = result["baselines"]["constant"]
    gate = result["capture_gate"]
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
        # export-onnx puts these knots into the graph's metadata and register into the card
        "calibration": result["calibration_knots"],
        "capture_gate": {
            "threshold": gate["threshold"],
            **{
                k: {
                    "value": gate["metrics"][k]["value"],
                    "ci": [gate["metrics"][k]["ci_low"], gate["metrics"][k]["ci_high"]],
                }
                for k in ("precision", "recall", "f1")
            },
            "pass_rate": gate["pass_rate"],
        },
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
    for metric, m in result["capture_gate"]["metrics"].items():
        rows.append(
            ("all", f"gate_{metric}", m["value"], m["status"], m["n"], m["ci_low"], m["ci_high"])
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


def write_rows(conn: psycopg.Connection, cfg: Config, run: runs.Run, rows: list[tuple]) -> None:
    from psycopg import sql

    t = runs.table(cfg, "model_evaluations")
    conn.execute(
        sql.SQL(
            "delete from {} where model_version = %s and split = %s and cycle = ''"
            " and not (slice || '|' || metric = any(%s))"
        ).format(t),
        (run.model_version, SPLIT, [f"{r[0]}|{r[1]}" for r in rows]),
    )
    q = sql.SQL(
        "insert into {} (model_version, training_run_id, dataset_hash, split, slice, metric, value, status, n,"
        " ci_low, ci_high) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " on conflict (model_version, split, slice, metric, cycle) do update set"
        " training_run_id = excluded.training_run_id, dataset_hash = excluded.dataset_hash,"
        " value = excluded.value, status = excluded.status, n = excluded.n, ci_low = excluded.ci_low,"
        " ci_high = excluded.ci_high, updated_at = now()"
    ).format(t)
    with conn.cursor() as cur:
        cur.executemany(q, [(run.model_version, run.id, run.dataset_hash, SPLIT, *r) for r in rows])
