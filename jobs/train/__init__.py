"""`airatings train [--run ID|latest]`: transfer-learn a torchvision backbone on the run's
cached images, keep the best checkpoint by the validation metric, resume after a kill.

Reads the run's active manifests (``airatings cache``) and writes, under
``<artifacts>/runs/<model_version>/``: ``config.yaml`` (resolved), ``history.csv``, ``last.pt``
(every epoch) and ``best.pt`` (on improvement). Status ``cached`` -> ``trained``.

- A second concurrent train of the same run exits 0 saying so (advisory lock per run).
- A run already ``trained`` with its ``best.pt`` present: exits 0, "already done".
- Empty or single-valued training data, NaN/inf loss: run marked failed, exit 2.
- Missing pretrained weights (no downloads): exit 2 unless ``train.allow_random_init``.

Heavy imports (torch) happen inside ``run`` so the CLI stays light.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from jobs import db, logs, runs
from jobs.config import Config


def run(
    cfg: Config,
    run: str | int = "latest",
    *,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the run; returns the summary. ``epoch_callback(epoch, row)`` runs after each
    completed epoch (its checkpoint is already saved), e.g. to stop a run part-way."""
    from jobs.train import data as D
    from jobs.train import engine

    log = logs.get_logger()
    with runs.claim(cfg, "train", run) as (the_run, skipped):
        if skipped:
            return skipped
        best = runs.run_dir(cfg, the_run.model_version) / "best.pt"
        if the_run.reached("trained") and best.exists():
            log.info("train_already_done", best_checkpoint=str(best))
            return {
                "status": "already_done",
                "model_version": the_run.model_version,
                "best_checkpoint": str(best),
                **{
                    k: the_run.params.get("train", {}).get(k)
                    for k in ("best_metric", "metric", "best_weights_sha256")
                },
            }
        runs.require(the_run, "cached")
        engine.sweep(runs.run_dir(cfg, the_run.model_version))
        try:
            summary = engine.main(cfg, the_run, epoch_callback=epoch_callback)
        except D.DataProblem as exc:
            with db.connect(cfg, autocommit=True) as conn:
                runs.mark_failed(conn, cfg, the_run.id, f"train: {exc}")
            log.error("training_failed", error=str(exc), run_marked="failed")
            raise
        with db.connect(cfg) as conn:
            runs.set_status(
                conn,
                cfg,
                the_run.id,
                "trained",
                step="train",
                summary=summary,
                trained_at=dt.datetime.now(dt.UTC),
            )
        log.info(
            "training_finished",
            best_metric=summary["best_metric"],
            metric=summary["metric"],
            best_epoch=summary["best_epoch"],
            epochs_run=summary["epochs_run"],
            seconds=summary["seconds"],
            run_dir=summary["run_dir"],
        )
        return summary
