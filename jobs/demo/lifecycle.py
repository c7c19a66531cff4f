"""`airatings demo run` (what `just demo` runs): the lifecycle on the embedded defaults.

Starts the embedded PostgreSQL if no DATABASE_URL is set, applies migrations, seeds the
synthetic world, builds and tests the whole dbt project, then runs export (which builds the
training selection again and refuses on any failed test), cache, train and
evaluate, each through the same function its own subcommand calls. Every step is safe to run
again, so re-running the demo resumes: an unchanged world reuses its dataset, cached images are
not fetched again, and a trained run resumes from its last checkpoint.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from jobs import db
from jobs.logs import get_logger

if TYPE_CHECKING:
    from jobs.config import Config

log = get_logger()


def run(cfg: Config) -> dict[str, Any]:
    from jobs import cache, dbt_runner, demo, evaluate, export, train

    steps: dict[str, Any] = {}
    started = time.monotonic()

    def step(name: str, fn, *args, **kwargs) -> dict[str, Any]:
        t0 = time.monotonic()
        log.info("demo_step_started", step=name)
        context = structlog.contextvars.get_contextvars()
        try:
            out = fn(*args, **kwargs) or {}
        finally:  # a step's bound context (run_id, seed...) must not leak into the next step
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(**context)
        out["seconds"] = round(time.monotonic() - t0, 2)
        steps[name] = out
        log.info("demo_step_finished", step=name, seconds=out["seconds"])
        return out

    step("database", lambda: {"url": db.redact(db.database_url(cfg))})
    step("migrate", db.migrate, cfg)
    step("seed", demo.seed, cfg)
    # The whole dbt project (the export builds only what training reads), so that
    # `airatings dbt test` and `dbt docs` see every model afterwards.
    step("dbt", dbt_runner.build, cfg, "airatings")
    exported = step("export", export.run, cfg)
    model_version = exported.get("model_version", "latest")
    step("cache", cache.run, cfg, run=model_version)
    step("train", train.run, cfg, run=model_version)
    evaluated = step("evaluate", evaluate.run, cfg, run=model_version)
    return {
        "status": "done",
        "model_version": model_version,
        "dataset_hash": exported.get("dataset_hash"),
        "headline": evaluated.get("headline"),
        "report": evaluated.get("report"),
        "steps": steps,
        "seconds": round(time.monotonic() - started, 2),
    }
