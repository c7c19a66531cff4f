"""structlog, configured once: a console renderer on a TTY, one JSON object per line otherwise.

Jobs bind context once (``job``, ``run_id``, ``model_version``) and log past-tense snake_case
events with data as keywords; each job ends with one summary event. Logs go to stderr so that
``--json`` summaries on stdout stay machine-readable.

Every event passes :func:`scrub_event` last (defence in depth, docs/faults.md 32): a password in
any connection-string form, or a registered secret, is replaced by ``***`` in every string
value, the rendered traceback included.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Any
from urllib.parse import quote

import structlog

_configured = False

# ---- secrets ----------------------------------------------------------------------------

MASK = "***"
_PATTERNS = (
    # URL userinfo: postgresql://user:secret@host (any scheme; up to the first @, as libpq)
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)[^@\s]+@"), rf"\g<1>{MASK}@"),
    # URL query: ?password=secret / &password=secret
    (re.compile(r"(?i)([?&]password=)[^&#\s\"']*"), rf"\g<1>{MASK}"),
    # key=value conninfo and environment dumps: password=secret, password = 'se cret',
    # PGPASSWORD=..., AIR_DBT_PASSWORD=... (a quoted value may hold spaces and \' escapes)
    (
        re.compile(r"(?i)(?<![?&])(\b\w*password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|(?:\\.|[^\s\\])+)"),
        rf"\g<1>{MASK}",
    ),
    # a mapping's repr or JSON: 'password': 'secret', "password": "secret"
    (
        re.compile(r"""(?i)(['"]\w*password['"]\s*:\s*)(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""),
        rf"\g<1>'{MASK}'",
    ),
)
_secrets: set[str] = set()
_secrets_guard = threading.Lock()
# A secret this short is replaced only where a pattern finds it: replacing every occurrence of
# "abc" would garble the logs more than it protects.
_MIN_SECRET = 6


def register_secret(value: str | None) -> None:
    """Scrub this exact value (and its percent-encoded form) from every log event and from
    :func:`scrub_secrets` output, wherever it appears (a password from ``DATABASE_URL`` or
    ``PGPASSWORD``)."""
    if not value or len(value) < _MIN_SECRET:
        return
    with _secrets_guard:
        _secrets.update({value, quote(value, safe="")})


def scrub_secrets(text: str) -> str:
    """``text`` with passwords in any connection-string form and registered secrets masked."""
    with _secrets_guard:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_secrets(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub_value(v) for v in value]
    # anything else is rendered by its str/repr: scrub that text, else leave the object alone
    text = str(value) if isinstance(value, BaseException) else repr(value)
    clean = scrub_secrets(text)
    return value if clean == text else clean


def scrub(value: Any) -> Any:
    """A string, or plain data (a job's summary), with :func:`scrub_secrets` applied to every
    string in it (tuples and sets become lists, as in JSON)."""
    return _scrub_value(value)


def scrub_event(logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: :func:`scrub_secrets` over every value of the event."""
    return {k: _scrub_value(v) for k, v in event_dict.items()}


# ---- configuration ----------------------------------------------------------------------


class _CurrentStderr:
    """``sys.stderr`` as it is when an event is written, not when logging was configured: a
    capture or redirect that has ended (a test's, a tool's) never leaves the loggers writing
    to a closed stream."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


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
    register_secret(os.environ.get("PGPASSWORD"))
    # Tracebacks rendered as plain text before scrubbing (the console renderer's rich
    # tracebacks would show local variables: a URL, a password).
    processors += [structlog.processors.format_exc_info, scrub_event]
    if json_logs:
        processors += [structlog.processors.JSONRenderer()]
    else:
        processors += [
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
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
