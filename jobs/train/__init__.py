"""`airatings train [--run ID|latest]`: transfer-learn a torchvision backbone on the run's
cached images, keep the best checkpoint by the validation metric, resume after a kill.

Reads the run's active manifests (``airatings cache``) and writes, under
``<artifacts>/runs/<model_version>/``: ``config.yaml`` (resolved), ``history.csv``, ``last.pt``
(every epoch) and ``best.pt`` (on improvement). Status ``cached`` -> ``trained``.

- A second concurrent train of the same run exits 0 saying so (advisory lock per run).
- A run already ``trained`` whose ``best.pt`` is the file the run recorded (sha256): exits 0,
  "already done". Missing or changed: trained again from scratch (a run past ``evaluated``,
  whose ONNX export came from that file, is refused instead, naming the fix).
- Empty or single-valued training data, NaN/inf loss: run marked failed, exit 2.
- Missing pretrained weights (no downloads): exit 2 unless ``train.allow_random_init``.
- Under ``torchrun`` (``WORLD_SIZE`` > 1, :mod:`jobs.distributed`): DistributedDataParallel,
  ``train.batch_size`` the global batch (not divisible by the ranks: exit 2). Only rank 0
  claims the run's lock, reads and writes the database, checkpoints and history; it tells the
  other ranks what it decided, so they all end alike. A lost rank: exit 75, and the re-run
  resumes from ``last.pt`` on every rank.

Heavy imports (torch) happen inside ``run`` so the CLI stays light.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from jobs import db, distributed, logs, paths, runs
from jobs.config import Config
from jobs.errors import InputError


def run(
    cfg: Config,
    run_ref: str | int = "latest",
    *,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the run ``run_ref`` names (an id, a model version or "latest"); returns the
    summary. ``epoch_callback(epoch, row)`` runs after each completed epoch (its checkpoint is
    already saved), e.g. to stop a run part-way."""
    ctx = distributed.from_env()
    if ctx is None:  # one process: no torch.distributed at all
        return _train(cfg, run_ref, epoch_callback=epoch_callback)
    return _train_distributed(cfg, run_ref, ctx, epoch_callback=epoch_callback)


def _train_distributed(
    cfg: Config,
    run_ref: str | int,
    ctx: distributed.Dist,
    *,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """One rank of a torchrun job: rank 0 runs :func:`_train` (lock, database, files), the
    others follow its decision and train beside it."""
    from jobs.train import engine

    engine.per_rank_batch_size(cfg, ctx)  # exit 2 before joining the job
    device = engine.decide_device(cfg, ctx)
    logs.bind(rank=ctx.rank, world_size=ctx.world_size)

    def follower(run: runs.Run) -> dict[str, Any]:
        logs.bind(run_id=run.id, model_version=run.model_version)
        return engine.main(cfg, run, epoch_callback=epoch_callback, dist=ctx)

    with distributed.process_group(ctx, device.type), distributed.peer_loss_is_transient():
        if ctx.is_main:
            return distributed.lead(
                ctx,
                lambda leader: _train(cfg, run_ref, epoch_callback=epoch_callback, leader=leader),
            )
        return distributed.follow(ctx, follower)


def _train(
    cfg: Config,
    run_ref: str | int,
    *,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None,
    leader: distributed.Leader | None = None,
) -> dict[str, Any]:
    """The train step of one process, or of rank 0 (``leader``) for a torchrun job."""
    from jobs.train import data as train_data
    from jobs.train import engine

    log = logs.get_logger()
    with runs.claim(cfg, "train", run_ref) as (run, skipped):
        if skipped:
            return skipped
        run_paths = paths.of(cfg).run(run.model_version)
        out_dir, best = run_paths.root, run_paths.best_checkpoint
        if run.reached("trained"):
            problem = engine.best_checkpoint_problem(cfg, run)
            if problem is None:
                log.info("train_already_done", best_checkpoint=str(best))
                return {
                    "status": "already_done",
                    "model_version": run.model_version,
                    "best_checkpoint": str(best),
                    **{
                        k: run.params.get("train", {}).get(k)
                        for k in ("best_metric", "metric", "best_weights_sha256")
                    },
                }
            if run.reached("onnx_exported"):
                recorded = run.params.get("train", {}).get("best_checkpoint_sha256")
                raise InputError(
                    f"run {run.model_version} is '{run.status}', but its best checkpoint "
                    f"{best} {problem}. Its ONNX export was made from that file, so it is not "
                    f"retrained in place: restore {best}"
                    + (f" (sha256 {recorded})" if recorded else "")
                    + " from a backup, or train a new run ('airatings export' makes one once "
                    "the data or the config differ; an identical export reuses this run)"
                )
            log.warning("train_redone", best_checkpoint=str(best), problem=problem)
            engine.discard_checkpoints(out_dir)
        runs.require(run, "cached")
        engine.sweep(paths.of(cfg).run(run.model_version).root)
        if leader is not None:
            leader.start(run)  # the other ranks train this run from here on
        try:
            summary = engine.main(
                cfg, run, epoch_callback=epoch_callback, dist=leader.ctx if leader else None
            )
        except train_data.DataProblem as exc:
            with db.connect(cfg, autocommit=True) as conn:
                runs.mark_failed(conn, cfg, run.id, f"train: {exc}")
            log.error("training_failed", error=str(exc), run_marked="failed")
            raise
        if leader is not None:
            leader.trained()  # the other ranks wait for the status write's outcome
        before = run.params.get("train") or {}
        if run.reached("evaluated") and before.get("best_weights_sha256") not in (
            None,
            summary["best_weights_sha256"],
        ):
            # retrained after evaluation and the weights came out different: say so
            summary["evaluation_stale"] = True
            log.warning("evaluation_stale", reason="retrained weights differ from the evaluated")
        with db.connect(cfg) as conn:
            runs.set_status(
                conn,
                cfg,
                run.id,
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
