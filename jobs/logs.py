"""structlog, configured once: a console renderer on a TTY, one JSON object per line otherwise.

Jobs bind context once (``job``, ``run_id``, ``model_version``) and log past-tense snake_case
events with data as keywords; each job ends with one summary event. Logs go to stderr so that
``--json`` summaries on stdout stay machine-readable.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure(*, json_logs: bool | None = None, level: str | None = None) -> None:
    global _configured
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    level_name = (level or os.environ.get("AIR_LOG_LEVEL", "INFO")).upper()
    lvl = logging.getLevelName(level_name)
    if not isinstance(lvl, int):
        lvl = logging.INFO
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if json_logs:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Quiet chatty libraries that use stdlib logging.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _configured = True


def get_logger(**initial: object) -> structlog.stdlib.BoundLogger:
    if not _configured:
        configure()
    return structlog.get_logger(**initial)


def bind(**context: object) -> None:
    """Bind context (job, run_id, model_version) for every later event of this job."""
    structlog.contextvars.bind_contextvars(**context)


def clear() -> None:
    structlog.contextvars.clear_contextvars()
