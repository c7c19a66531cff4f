"""`airatings release`: the lifecycle of one model version, in order. The only module that calls
other jobs (each step is also a subcommand of its own, and a Kubernetes Job in production).

```
migrate   apply jobs/migrations (idempotent, under an advisory lock)
export    dbt build + test, DuckDB -> Parquet/CSV manifests + dataset hash, run row + labels
cache     download, validate, cache images; failures; active manifests; labels used/excluded
train     torchvision transfer learning, resumable from last.pt, best.pt by val metric
evaluate  test metrics with bootstrap CIs, slices, baselines, report.html
export-onnx  ONNX (resize inside), onnxsim, parity gate vs PyTorch, calibration on val
register  write-once models/<version>/ (model.onnx, model_card.json, release.env, ConfigMap);
          with --promote, 'production' moves to it if it is not worse than production
```

Resuming: the run's status in ``model_training_runs`` is the record. A release first looks for
the newest run that is not finished (status before the last step, not failed) and made with
this config; it carries that run on from its status, without a new export, so a release killed
mid-training continues the same version. Otherwise it exports: unchanged data and config give
the same run back (``already_exported``), and each later step then finds its work done
(checked against the files it recorded, not assumed) and says so. ``--new`` always exports.

A second release at once (a CronJob fired twice, a person beside the schedule) finds the
release lock held and exits 0 saying so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from jobs import db, logs, runs

if TYPE_CHECKING:
    from jobs.config import Config

log = logs.get_logger()


@dataclass(frozen=True)
class Step:
    name: str
    # the status a run has once this step is done (None: not a per-run step)
    done_status: str | None
    call: Callable[..., dict[str, Any]]


def _migrate(cfg: Config, run_ref: str | None) -> dict[str, Any]:
    return db.migrate(cfg) | {"status": "migrated"}


def _export(cfg: Config, run_ref: str | None, *, notes: str | None = None) -> dict[str, Any]:
    from jobs import dbt_runner, export

    # The whole dbt project, not only what training reads: `airatings dbt test` and dbt docs
    # then see every model, and the review loop's marts are fresh.
    return export.run(cfg, notes=notes, select=dbt_runner.PROJECT_SELECTION)


def _cache(cfg: Config, run_ref: str) -> dict[str, Any]:
    from jobs import cache

    return cache.run(cfg, run_ref=run_ref)


def _train(cfg: Config, run_ref: str) -> dict[str, Any]:
    from jobs import train

    return train.run(cfg, run_ref=run_ref)


def _evaluate(cfg: Config, run_ref: str) -> dict[str, Any]:
    from jobs import evaluate

    return evaluate.run(cfg, run_ref=run_ref)


def _export_onnx(cfg: Config, run_ref: str) -> dict[str, Any]:
    from jobs import onnx_export

    return onnx_export.run(cfg, run_ref=run_ref)


def _register(cfg: Config, run_ref: str, *, promote: bool = False) -> dict[str, Any]:
    from jobs import register

    return register.run(cfg, run_ref=run_ref, promote=promote)


# The order of a release.
STEPS: tuple[Step, ...] = (
    Step("migrate", None, _migrate),
    Step("export", "exported", _export),
    Step("cache", "cached", _cache),
    Step("train", "trained", _train),
    Step("evaluate", "evaluated", _evaluate),
    Step("export-onnx", "onnx_exported", _export_onnx),
    Step("register", "registered", _register),
)
FINAL_STATUS = STEPS[-1].done_status


def unfinished_run(cfg: Config) -> runs.Run | None:
    """The newest non-failed run of this config whose status is before the last step's."""
    from psycopg import sql

    with db.connect(cfg) as conn:
        row = conn.execute(
            sql.SQL(
                "select id from {} where status <> 'failed' and config_hash = %s"
                " order by id desc limit 1"
            ).format(runs.table(cfg, "model_training_runs")),
            (cfg.config_hash,),
        ).fetchone()
        if row is None:
            return None
        run = runs.get_run(conn, cfg, row[0])
    return None if run.reached(FINAL_STATUS) else run


def _call(step: Step, cfg: Config, run_ref: str | None, **kw: Any) -> dict[str, Any]:
    """One step with its own log context; a step's bound context (run_id, shard...) must not
    leak into the next one."""
    context = structlog.contextvars.get_contextvars()
    started = time.monotonic()
    log.info("release_step_started", step=step.name, run_ref=run_ref)
    try:
        out = step.call(cfg, run_ref, **kw) or {}
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**context)
    out.setdefault("seconds", round(time.monotonic() - started, 2))
    log.info("release_step_finished", step=step.name, status=out.get("status"))
    return out


def run(
    cfg: Config, new: bool = False, notes: str | None = None, promote: bool = False
) -> dict[str, Any]:
    """Run (or resume) a release; returns one summary: version, dataset, steps, headline."""
    started = time.monotonic()
    with db.job_lock(cfg, "release") as held:
        if not held:
            msg = "another 'airatings release' is running on this database; nothing done"
            log.info("release_skipped", reason=msg)
            return {"status": "skipped", "reason": msg}
        steps: dict[str, dict[str, Any]] = {}
        steps["migrate"] = _call(STEPS[0], cfg, None)
        resumed = None if new else unfinished_run(cfg)
        if resumed is not None:
            run_ref = resumed.model_version
            log.info("release_resumed", model_version=run_ref, status=resumed.status)
            steps["export"] = {
                "status": "resumed",
                "model_version": run_ref,
                "run_status": resumed.status,
                "dataset_hash": resumed.dataset_hash,
            }
        else:
            steps["export"] = _call(STEPS[1], cfg, None, notes=notes)
            if steps["export"].get("status") == "skipped":
                return {
                    "status": "skipped",
                    "reason": steps["export"].get("reason"),
                    "steps": steps,
                }
            run_ref = steps["export"]["model_version"]
        logs.bind(model_version=run_ref)
        for step in STEPS[2:]:
            kw = {"promote": promote} if step.name == "register" else {}
            steps[step.name] = out = _call(step, cfg, run_ref, **kw)
            if out.get("status") == "skipped":
                # a twin holds this step's lock: it will carry the run on; say so, stop here
                return {
                    "status": "skipped",
                    "model_version": run_ref,
                    "reason": f"{step.name}: {out.get('reason')}",
                    "steps": steps,
                }
    with db.connect(cfg) as conn:
        run = runs.get_run(conn, cfg, run_ref)
    evaluated = steps.get("evaluate", {})
    registered = steps.get("register", {})
    onnx = run.params.get("onnx") or {}
    return {
        "status": "released" if run.reached(FINAL_STATUS) else run.status,
        "model_version": run_ref,
        "run_status": run.status,
        "resumed": resumed is not None,
        "dataset_hash": run.dataset_hash,
        "dataset_dir": (run.params.get("export") or {}).get("dataset_dir"),
        "counts": (run.params.get("export") or {}).get("counts"),
        "labels": (run.params.get("cache") or {}).get("labels"),
        "headline": evaluated.get("headline"),
        "report": evaluated.get("report"),
        "parity": _parity_brief(onnx.get("parity")),
        "calibration": _calibration_brief(onnx.get("calibration")),
        "model_dir": registered.get("model_dir"),
        "release_env": registered.get("release_env"),
        "promotion": _promotion_brief(registered.get("promotion")),
        "steps": {name: _brief(out) for name, out in steps.items()},
        "seconds": round(time.monotonic() - started, 2),
    }


def _brief(out: dict[str, Any]) -> dict[str, Any]:
    """A step's status and time for the release summary (the full summaries are logged)."""
    return {"status": out.get("status"), "seconds": out.get("seconds")}


def _parity_brief(parity: dict[str, Any] | None) -> dict[str, Any] | None:
    if not parity:
        return None
    gate = parity.get("gate") or {}
    return {
        "passed": parity.get("passed"),
        "max_abs_delta_raw": parity.get("max_abs_delta_raw"),
        "tolerance": parity.get("tolerance"),
        "gate_identical": gate.get("identical"),
        "golden_images": gate.get("golden_images"),
    }


def _calibration_brief(calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    if not calibration:
        return None
    return {
        "method": calibration.get("method"),
        "knots": len(calibration.get("x") or []),
        "fitted_on": calibration.get("n"),
    }


def _promotion_brief(promotion: dict[str, Any] | None) -> dict[str, Any] | None:
    if not promotion:
        return None
    return {k: promotion.get(k) for k in ("status", "alias", "previous", "forced", "reason")}


def demo(cfg: Config, promote: bool = True) -> dict[str, Any]:
    """`airatings demo run` (what `just demo` runs): the synthetic world seeded into the app's
    tables (embedded PostgreSQL unless DATABASE_URL is set), a release of it and, once a
    version is promoted, a scoring pass over the rated snapshots (`airatings score
    --backfill`), the review report (page and review set) and the history. Running it again
    reseeds the same world and every step finds its work done."""
    from jobs.demo import seed

    started = time.monotonic()
    db.migrate(cfg)  # the seed forgets cached URLs of replaced images: it needs our tables
    seeded = seed.seed(cfg)
    if seeded.get("status") == "skipped":
        return seeded
    released = run(cfg, promote=promote)
    released["steps"] = {"seed": _brief(seeded), **released.get("steps", {})}
    if released.get("status") == "released" and promote:
        # what the app's scoring CronJob does next, here over every rated snapshot (the demo
        # world's snapshots are weeks old): inference rows and the webcams' AI fields
        from jobs import score

        scored = score.run(cfg, backfill=True)
        released["steps"]["score"] = _brief(scored)
        released["scoring"] = {
            k: scored.get(k)
            for k in (
                "model_version",
                "scored",
                "already_scored",
                "failed_by_reason",
                "gate_passed",
                "webcams_updated",
                "images_per_s",
            )
        }
        # and the evaluation loop's nightly report: this cycle's disagreements, the review
        # set and its page, then the metrics per version over the cycles
        from jobs import review

        reviewed = review.report_job(cfg)
        released["steps"]["review"] = _brief(reviewed)
        released["review"] = {
            k: reviewed.get(k)
            for k in ("cycle", "n", "mae", "disagreement_rate", "review_items", "page")
        }
        history = review.history_job(cfg)
        released["history"] = {
            "cycles": history["cycles"],
            "chart": history["chart"],
            "comparison": history["comparison"],
        }
    released["seconds"] = round(time.monotonic() - started, 2)
    return released
